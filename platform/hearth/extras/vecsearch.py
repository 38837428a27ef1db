"""Import guard: ``import hearth.extras.vecsearch`` raises an ImportError naming ``hearth[vecsearch]``
when that extra is not installed (imported first by the modules that need it)."""

from hearth.extras import EXTRAS, require

require("vecsearch", *EXTRAS["vecsearch"])
