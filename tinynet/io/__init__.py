"""Loading and saving weights: PyTorch ``.pth``, ``.npz`` and ``.safetensors``.

    sd = tinynet.io.load_weights("resnet18-f37072fd.pth")     # OrderedDict[str, np.ndarray]
    tinynet.io.load_into(model, "resnet18-f37072fd.pth", skip_prefixes="fc.")
    tinynet.io.save_weights(model.state_dict(), "run1.safetensors")   # or .npz, written atomically

    tinynet.io.save_weights(sd, "run1.safetensors", metadata={"classes": '["cat", "dog"]'})
    tinynet.io.read_metadata("run1.safetensors")                      # {'classes': '["cat", "dog"]'}

Reading needs no PyTorch, and never runs code from a file: ``.pth``
pickles are scanned (depth, sharing, opcodes) and then read by an unpickler
that knows only the handful of names a state dict uses
(:mod:`tinynet.io.pth`), ``.npz`` is read with ``allow_pickle=False``, and
``.safetensors`` (read and written by the ``safetensors`` package) holds no
code at all.
Every reader works under size limits (:class:`tinynet.io.files.Limits`)
against zip bombs and giant headers, and every problem is a ``ValueError``
sub-class naming the file (:mod:`tinynet.io.errors`).  :func:`load_into`
also refuses NaN/inf weights and negative variances (:func:`check_state_values`).

Modules: :mod:`~tinynet.io.weights` (the three calls), :mod:`~tinynet.io.pth`,
:mod:`~tinynet.io.npz`, :mod:`~tinynet.io.safetensors` (one per format),
:mod:`~tinynet.io.files` (limits, zip checks, atomic writes), :mod:`~tinynet.io.errors`.
"""
from .errors import UnsafeFileError, WeightsFileError, WeightsLimitError, WeightsValueError
from .files import Limits
from .weights import check_state_values, load_into, load_weights, read_metadata, save_weights

__all__ = ["load_weights", "save_weights", "load_into", "read_metadata", "check_state_values", "Limits",
           "WeightsFileError", "UnsafeFileError", "WeightsLimitError", "WeightsValueError"]
