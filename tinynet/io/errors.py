"""The errors a weights file can raise, all sub-classes of ``ValueError``.

    ValueError
    └── WeightsFileError          the file is not what it claims: unknown format, truncated,
        │                         corrupt, inconsistent (an offset past the end, a size that
        │                         does not match its dtype and shape)
        ├── UnsafeFileError       a pickle asks for a global (a function or class) that a
        │                         state dict does not need: refused before anything runs
        ├── WeightsLimitError     the file would unpack to more than a configured limit
        │                         (zip bombs, giant headers, pickles nested or shared too deep)
        └── WeightsValueError     the file reads fine but holds values no model can use: NaN or
                                  infinite weights, a negative running_var (raised by
                                  load_into and check_state_values, not by load_weights)

A missing path raises the built-in ``FileNotFoundError`` instead, so that
``except FileNotFoundError`` works as it does for ``open``.  Every message
names the file, says what was expected and what was found.
"""
from __future__ import annotations

__all__ = ["WeightsFileError", "UnsafeFileError", "WeightsLimitError", "WeightsValueError"]


class WeightsFileError(ValueError):
    """A weights file that cannot be read: unknown format, truncated, corrupt or inconsistent."""


class UnsafeFileError(WeightsFileError):
    """A pickle in a ``.pth`` file refers to a global that loading a state dict never needs.

    Raised from ``find_class`` while the pickle is read, before the global is
    imported or called: nothing in the file runs.
    """


class WeightsLimitError(WeightsFileError):
    """A file that would unpack to more bytes than a limit allows (see :class:`tinynet.io.files.Limits`)."""


class WeightsValueError(WeightsFileError):
    """A weights file whose values no model can use (NaN or inf weights, negative variances)."""
