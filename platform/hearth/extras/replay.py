"""Import guard: ``import hearth.extras.replay`` raises an ImportError naming ``hearth[replay]``
when that extra is not installed (imported first by the modules that need it)."""

from hearth.extras import EXTRAS, require

require("replay", *EXTRAS["replay"])
