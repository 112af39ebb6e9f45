"""Where the layout helpers used to live: now :mod:`tinynet.nn.fast.layout` (the CHWN views) and
:mod:`tinynet.nn.fast.threads` (splitting a pass over the threads).  Re-exported for older imports."""
from .fast.layout import add, channel_matrix, from_channel_matrix, from_chwn, to_chwn  # noqa: F401
from .fast.threads import (BLOCK_ELEMENTS, FLAT_SPLIT_MIN_ELEMENTS, flat_views, for_channel_blocks,  # noqa: F401
                           for_flat_pieces)

__all__ = ["to_chwn", "from_chwn", "channel_matrix", "from_channel_matrix", "add",
           "BLOCK_ELEMENTS", "FLAT_SPLIT_MIN_ELEMENTS", "for_channel_blocks", "flat_views", "for_flat_pieces"]
