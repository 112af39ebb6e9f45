"""Where Winograd used to live: now :mod:`tinynet.nn.fast.winograd` (re-exported for older imports)."""
from .fast.winograd import *  # noqa: F401,F403
from .fast.winograd import __all__  # noqa: F401
