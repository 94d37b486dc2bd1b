"""polytask.merging: every module here registers itself by name on import."""

from polytask._autoload import import_submodules

import_submodules(__name__, __path__)
