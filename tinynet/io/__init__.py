"""Loading and saving weights: PyTorch ``.pth``, ``.npz`` and ``.safetensors``.

    sd = tinynet.io.load_weights("resnet18-f37072fd.pth")     # OrderedDict[str, np.ndarray]
    tinynet.io.load_into(model, "resnet18-f37072fd.pth", skip_prefixes="fc.")
    tinynet.io.save_weights(model.state_dict(), "run1.safetensors")   # or .npz, written atomically

Reading needs neither PyTorch nor the ``safetensors`` package, and never
runs code from a file: ``.pth`` pickles go through an unpickler that knows
only the handful of names a state dict uses (:mod:`tinynet.io.pth`), ``.npz``
is read with ``allow_pickle=False``, and ``.safetensors`` holds no code at all.
Every reader works under size limits (:class:`tinynet.io.files.Limits`)
against zip bombs and giant headers, and every problem is a ``ValueError``
sub-class naming the file (:mod:`tinynet.io.errors`).

Modules: :mod:`~tinynet.io.weights` (the three calls), :mod:`~tinynet.io.pth`,
:mod:`~tinynet.io.npz`, :mod:`~tinynet.io.safetensors` (one per format),
:mod:`~tinynet.io.files` (limits, zip checks, atomic writes), :mod:`~tinynet.io.errors`.
"""
from .errors import UnsafeFileError, WeightsFileError, WeightsLimitError
from .files import Limits
from .weights import load_into, load_weights, save_weights

__all__ = ["load_weights", "save_weights", "load_into", "Limits", "WeightsFileError", "UnsafeFileError",
           "WeightsLimitError"]
