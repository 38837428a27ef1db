"""Import guard: ``import hearth.extras.flower`` raises an ImportError naming ``hearth[flower]``
when that extra is not installed (imported first by the modules that need it)."""

from hearth.extras import EXTRAS, require

require("flower", *EXTRAS["flower"])
