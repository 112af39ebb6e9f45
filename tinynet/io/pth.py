"""PyTorch ``.pth`` / ``.pt`` files, read without PyTorch and without running the pickle.

The file format
---------------
Since PyTorch 1.6, ``torch.save(obj, "resnet18.pth")`` writes a zip archive
whose members all sit in one top-level folder (the file's stem, or
``archive`` when saving to a buffer)::

    resnet18/data.pkl            the object, pickled (protocol 2), every tensor's bytes left out
    resnet18/data/0              one member per storage (the flat buffer a tensor views):
    resnet18/data/1                its raw bytes, STORED uncompressed, 64-byte aligned
    ...
    resnet18/byteorder           b"little" or b"big": byte order of the storages (files from
                                 before PyTorch 1.12 have none and are little-endian)
    resnet18/version             b"3\\n": the archive format version
    resnet18/.format_version, .storage_alignment, .data/serialization_id   bookkeeping

What the pickle contains
------------------------
A state dict pickles as::

    collections.OrderedDict()                             GLOBAL, REDUCE
    key -> torch._utils._rebuild_tensor_v2(               GLOBAL, args, REDUCE; once per key
               storage,          persistent id ('storage', torch.FloatStorage, '0', 'cpu', numel):
                                 no bytes, only the name of member data/0 and its element count
               storage_offset,   index of the tensor's first element in the storage
               size, stride,     shape, and the step in elements along each axis
               requires_grad, backward_hooks (an empty OrderedDict))
    BUILD {'_metadata': ...}                              per-module versions; dropped here

Element ``(i0, i1, ...)`` of the tensor is element
``storage_offset + sum_k i_k * stride_k`` of the storage: exactly
:func:`numpy.lib.stride_tricks.as_strided` with byte strides ``stride_k *
itemsize``, copied into a fresh C-contiguous array.  Views share one storage
(one member, read once), so a transposed weight or two slices of one buffer
come out as PyTorch saw them.  ``location`` (``'cuda:0'``) is ignored: arrays
are loaded on the host, as ``map_location='cpu'`` would.

Why only these globals
----------------------
Unpickling calls whatever callable the file names, with arguments from the
file: a ``__reduce__`` returning ``(os.system, ("...",))`` runs the command the
moment ``pickle.load`` reaches it.  :class:`StateDictUnpickler` overrides
``find_class``, the one door through which a pickle turns a name into a
Python object (GLOBAL, STACK_GLOBAL, protocol 0's INST and OBJ, and the EXT
opcodes all pass through it; EXT skips it only for an extension code that
the program itself registered with ``copyreg`` and used, and none is
registered by default), and opens it only for the names a state dict needs,
each answered by a tinynet stand-in (torch is never imported)::

    torch._utils._rebuild_tensor_v2   -> rebuild a NumPy array from a storage, every index checked
    torch._utils._rebuild_parameter   -> the same array (a Parameter is a tensor plus a flag)
    collections.OrderedDict           -> an OrderedDict that discards BUILD state
    torch.FloatStorage, DoubleStorage, HalfStorage, BFloat16Storage, LongStorage, IntStorage,
    ShortStorage, CharStorage, ByteStorage, BoolStorage
                                      -> a dtype tag, usable only inside a persistent id

Any other name raises :class:`~tinynet.io.errors.UnsafeFileError` naming it,
before it is imported, so nothing else can be called.  The stand-ins refuse
BUILD, item assignment and being called out of place, so even the allowed
names can do nothing but rebuild arrays.
"""
from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import warnings
import zipfile

import numpy as np

from .errors import UnsafeFileError, WeightsFileError, WeightsLimitError
from .files import Limits, bfloat16_to_float32, check_zip_members, is_index, read_member, short_repr

__all__ = ["read_pth", "find_archive_prefix", "refuse_plain_pickle", "scan_pickle", "StateDictUnpickler",
           "CHECKPOINT_KEYS"]

#: Storage class -> element dtype as stored (little-endian).  bfloat16 has no NumPy dtype: its
#: 16-bit patterns are read as uint16 and widened to float32; bool bytes are read as uint8 so
#: that a byte other than 0 or 1 still gives a proper bool.
_STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": "<u2",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "u1",
}

#: Names that PyTorch writes for tensors of dtypes tinynet does not read: complex and quantized storages,
#: and, since PyTorch 2.3, ``_rebuild_tensor_v3`` with an untyped storage and a dtype name for the
#: dtypes without a typed storage class (uint16/32/64, float8...).  They are data, not code: a file
#: naming one is refused as "unsupported", not as unsafe.
_UNSUPPORTED_GLOBALS = frozenset(
    [("torch", n) for n in ("ComplexFloatStorage", "ComplexDoubleStorage", "ComplexHalfStorage", "QInt8Storage",
                            "QUInt8Storage", "QInt32Storage", "QUInt4x2Storage", "QUInt2x4Storage")]
    + [("torch._utils", "_rebuild_tensor_v3"), ("torch.storage", "UntypedStorage"),
       ("torch._utils", "_rebuild_qtensor")])

#: Keys under which training scripts nest the state dict in a checkpoint (see :func:`_unwrap`).
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")

#: ``pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)``: the magic number that opens
#: PyTorch's legacy (pre-1.6) files, pickled before anything else.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

_RESAVE_HINT = ("if you trust the file, re-save it with PyTorch >= 1.6, whose default is the zip format: "
                "torch.save(torch.load(path, map_location='cpu', weights_only=True), 'new.pth')")


def refuse_plain_pickle(head: bytes, path) -> None:
    """Raise the error for a file that is a bare pickle (PyTorch's legacy format, or any pickle)."""
    if head.startswith(_LEGACY_MAGIC):
        raise WeightsFileError(
            f"{path}: PyTorch legacy serialization format (before 1.6: a sequence of pickles, not a zip "
            f"archive), which tinynet does not read; {_RESAVE_HINT}")
    raise WeightsFileError(
        f"{path}: a bare pickle, not a PyTorch zip checkpoint; tinynet never unpickles outside the "
        f"restricted .pth reader; {_RESAVE_HINT}")


def find_archive_prefix(zf: zipfile.ZipFile, path) -> str | None:
    """The top-level folder holding ``data.pkl`` (PyTorch's archive name), or None if there is none."""
    prefixes = [name[: -len("/data.pkl")] for name in zf.namelist()
                if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(prefixes) > 1:
        raise WeightsFileError(
            f"{path}: zip archive with {len(prefixes)} top-level data.pkl members ({', '.join(prefixes[:4])}); "
            f"a PyTorch checkpoint has exactly one")
    return prefixes[0] if prefixes else None


# ---------------------------------------------------------------------------
# Stand-ins for the allowed globals
# ---------------------------------------------------------------------------
class _Misuse(Exception):
    """A pickle used a stand-in as a state dict never does.  The stand-ins do not know the file;
    :func:`read_pth` turns this into an :class:`UnsafeFileError` naming it."""


class _Inert:
    """Base of the stand-ins: a pickle may build them, never modify or call them."""

    __slots__ = ()

    def __setstate__(self, state):  # BUILD
        raise _Misuse(f"pickle tried to set the state of a {type(self).__name__}; a state dict never does")

    def __setitem__(self, key, value):  # SETITEM
        raise _Misuse(f"pickle tried to assign an item of a {type(self).__name__}; a state dict never does")


class _StorageType(_Inert):
    """What ``torch.FloatStorage`` and its siblings unpickle to: the dtype of a storage's elements."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: str):
        self.name = name
        self.dtype = np.dtype(dtype)

    def __call__(self, *args, **kwargs):  # REDUCE with a storage class as the callable
        raise _Misuse(f"pickle tried to call torch.{self.name}; a state dict only names it in a storage id")


class _Storage(_Inert):
    """One storage: a read-only 1-D array over the bytes of member ``data/<key>``."""

    __slots__ = ("type", "key", "array")

    def __init__(self, storage_type: _StorageType, key: str, array: np.ndarray):
        self.type, self.key, self.array = storage_type, key, array


class _Tensor(_Inert):
    """A rebuilt tensor.  The array is wrapped so that no pickle opcode can reach it (SETITEM would write)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


class _PickledOrderedDict(collections.OrderedDict):
    """``collections.OrderedDict`` as the pickle sees it.

    A state dict is pickled with BUILD ``{'_metadata': {...}}`` (PyTorch's
    per-module version numbers, of no use here); accepting it without storing
    it means no pickle can set attributes on the dict.
    """

    def __setstate__(self, state):
        pass


# ---------------------------------------------------------------------------
# The unpickler
# ---------------------------------------------------------------------------
class StateDictUnpickler(pickle.Unpickler):
    """Unpickle ``data.pkl`` of the archive ``zf`` with only the globals a state dict needs.

    Storages are read from ``<prefix>/data/<key>`` on first reference and shared
    by every tensor that views them.  ``limits.max_bytes`` bounds the total size
    of the arrays rebuilt (stride 0 can make a large tensor of a small storage).
    """

    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str, path, limits: Limits):
        super().__init__(io.BytesIO(data))
        self._zf, self._prefix, self._path, self._limits = zf, prefix, path, limits
        self._storages: dict[str, _Storage] = {}
        self._tensor_bytes = 0
        self._globals = {
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("collections", "OrderedDict"): _PickledOrderedDict,
        }
        for name, dtype in _STORAGE_DTYPES.items():
            self._globals[("torch", name)] = _StorageType(name, dtype)

    def _where(self) -> str:
        return f"{self._path}: {self._prefix}/data.pkl"

    def find_class(self, module, name):
        found = self._globals.get((module, name))
        if found is None and (module, name) in _UNSUPPORTED_GLOBALS:
            raise WeightsFileError(
                f"{self._where()}: unsupported dtype: a tensor is stored through {module}.{name}, which PyTorch "
                f"uses for complex, quantized, uint16/32/64 and float8 tensors; tinynet reads float16/32/64, bfloat16, "
                f"int8/16/32/64, uint8 and bool tensors from .pth files.  Convert the tensor in PyTorch (for "
                f"example tensor.float()) and save again; the file is not unsafe, and nothing in it ran")
        if found is None:
            refused = f"{module}.{name}"
            refused = refused if len(refused) <= 120 else refused[:120] + "..."
            raise UnsafeFileError(
                f"{self._where()}: refused global {refused!r}: a state dict needs only torch._utils."
                f"_rebuild_tensor_v2, torch._utils._rebuild_parameter, collections.OrderedDict and "
                f"torch.<dtype>Storage, so the file was not loaded and nothing in it ran (if you trust it, "
                f"load it with PyTorch and save only the weights: torch.save(model.state_dict(), path))")
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[3], str)
                and is_index(pid[4])):
            raise WeightsFileError(
                f"{self._where()}: persistent id {short_repr(pid, 120)} is not a storage reference; expected "
                f"('storage', torch.<dtype>Storage, key, location, numel)")
        _, storage_type, key, _location, numel = pid
        cached = self._storages.get(key)
        if cached is not None:
            if cached.type is not storage_type:
                raise WeightsFileError(
                    f"{self._where()}: storage {short_repr(key)} is referenced as torch.{cached.type.name} and as "
                    f"torch.{storage_type.name}; PyTorch saves each storage with one dtype")
            return cached
        member = f"{self._prefix}/data/{key}"
        try:
            info = self._zf.getinfo(member)
        except KeyError:
            raise WeightsFileError(
                f"{self._path}: data.pkl refers to storage {short_repr(key)}, but the archive has no member "
                f"{short_repr(member)}; "
                f"the file is truncated or corrupt") from None
        expected = numel * storage_type.dtype.itemsize
        if info.file_size != expected:
            raise WeightsFileError(
                f"{self._path}: member {short_repr(member)} holds {info.file_size} bytes; torch.{storage_type.name} "
                f"of {numel} elements needs {expected}")
        raw = read_member(self._zf, info, self._path)
        storage = _Storage(storage_type, key, np.frombuffer(raw, dtype=storage_type.dtype))
        self._storages[key] = storage
        return storage

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                           metadata=None):
        """``torch._utils._rebuild_tensor_v2``: the view (offset, size, stride) of ``storage``, copied.

        ``requires_grad`` and ``metadata`` do not matter to an array;
        ``backward_hooks`` could only hold callables, which ``find_class`` has
        already refused.
        """
        where = self._where()
        if not isinstance(storage, _Storage):
            raise WeightsFileError(f"{where}: _rebuild_tensor_v2 got a {type(storage).__name__}, expected a storage")
        if not is_index(storage_offset):
            raise WeightsFileError(f"{where}: storage_offset {short_repr(storage_offset)} is not a non-negative int")
        if not (_is_index_tuple(size) and _is_index_tuple(stride) and len(size) == len(stride) <= 64):
            raise WeightsFileError(
                f"{where}: size {short_repr(size)} and stride {short_repr(stride)} must be tuples of as many "
                f"non-negative ints "
                f"(at most 64)")
        numel = math.prod(size)
        capacity = storage.array.size
        if numel:
            # The last element this view reads; every other index is smaller, as no stride is negative.
            last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= capacity:
                raise WeightsFileError(
                    f"{where}: a tensor of size {tuple(size)}, stride {tuple(stride)} at offset {storage_offset} "
                    f"reads element {last} of storage {short_repr(storage.key)}, which has {capacity}")
        out_dtype = np.dtype(np.float32) if storage.type.name == "BFloat16Storage" else storage.array.dtype
        self._tensor_bytes += numel * out_dtype.itemsize
        if self._tensor_bytes > self._limits.max_bytes:
            raise WeightsLimitError(
                f"{where}: the tensors rebuilt so far need {self._tensor_bytes} bytes, more than the limit of "
                f"{self._limits.max_bytes} (Limits.max_bytes; pass a larger max_bytes if the file is trusted)")
        if numel == 0:
            array = np.empty(size, dtype=storage.array.dtype)
        else:
            itemsize = storage.array.itemsize
            view = np.lib.stride_tricks.as_strided(storage.array[storage_offset:], shape=size,
                                                   strides=[s * itemsize for s in stride], writeable=False)
            array = np.array(view, order="C")  # a copy: contiguous, writable, and owning its memory
        if storage.type.name == "BFloat16Storage":
            array = bfloat16_to_float32(array)
        elif storage.type.name == "BoolStorage":
            array = array != 0
        return _Tensor(array.astype(array.dtype.newbyteorder("="), copy=False))

    def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None):
        """``torch._utils._rebuild_parameter``: a Parameter's tensor is all a state dict keeps."""
        if not isinstance(data, _Tensor):
            raise WeightsFileError(f"{self._where()}: _rebuild_parameter got a {type(data).__name__}, expected a tensor")
        return data


def _is_index_tuple(value) -> bool:
    return isinstance(value, tuple) and all(is_index(v) for v in value)


# ---------------------------------------------------------------------------
# Reading a file
# ---------------------------------------------------------------------------
class _Value:
    """What :func:`scan_pickle` knows of one object on the pickle's stack: how deep, how big, contained or not.

    ``depth`` is 1 for a scalar and 1 + the deepest part for a container;
    ``size`` counts the objects in it with every shared part counted each
    time it is shared (what ``repr`` or a recursive walk would visit).
    """

    __slots__ = ("depth", "size", "contained")

    def __init__(self, depth: int, size: int):
        self.depth, self.size, self.contained = depth, size, False


_MARK = object()  # the MARK opcode's entry on the stack

#: Opcodes that a state dict, as PyTorch or Python's pickler writes it (protocols 0 to 5), may use.
#: Left out: DUP (no pickler writes it), NEWOBJ/NEWOBJ_EX/INST/OBJ (they construct classes, which a
#: state dict never needs), EXT1/2/4 (globals through the copyreg registry), NEXT_BUFFER and
#: READONLY_BUFFER (out-of-band data) and BYTEARRAY8.
_ALLOWED_OPCODES = frozenset("""
    PROTO FRAME STOP MARK POP POP_MARK
    NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT BINFLOAT
    STRING BINSTRING SHORT_BINSTRING BINBYTES SHORT_BINBYTES BINBYTES8
    UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8
    EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_LIST APPEND APPENDS LIST EMPTY_DICT DICT SETITEM SETITEMS
    EMPTY_SET ADDITEMS FROZENSET
    GET BINGET LONG_BINGET PUT BINPUT LONG_BINPUT MEMOIZE
    GLOBAL STACK_GLOBAL REDUCE BUILD PERSID BINPERSID
""".split())

#: Refused opcodes that would reach code: why each is refused (UnsafeFileError).
_REFUSED_OPCODES = {
    **{n: "it names a global through the copyreg extension registry" for n in ("EXT1", "EXT2", "EXT4")},
    **{n: "it constructs an object of a class, which a state dict never needs"
       for n in ("INST", "OBJ", "NEWOBJ", "NEWOBJ_EX")},
}

#: Opcodes that change the object below their arguments (a list, dict, set or BUILD's target) in place.
_MUTATORS = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})


def scan_pickle(data: bytes, where: str, limits: Limits | None = None) -> None:
    """Walk the pickle's opcodes without running them, and refuse what could exhaust time, memory or stack.

    Run before the (C) unpickler sees a byte.  Refused:

    * opcodes outside :data:`_ALLOWED_OPCODES` (the EXT ones as unsafe);
    * more than ``limits.max_pickle_items`` opcodes;
    * nesting deeper than ``limits.max_pickle_depth``, or more MARKs open
      at once.  A tuple nested a million deep takes 1 MB to write; building
      it is cheap, but every recursive walk of it (``repr``, ``==``) ends in
      a RecursionError, or, in C code without a recursion check, overflows
      the stack and kills the interpreter;
    * an object that would expand to more than ``limits.max_pickle_items``
      objects.  Through the memo, each level of a pickle of a few hundred
      bytes can hold the previous level twice: 40 levels make 2**40 paths,
      which any walk (``repr`` in an error message) follows for hours;
    * changing a list, dict or set after it was put inside another object,
      or putting it inside itself (a state dict never does either; allowing
      them would let a pickle nest objects without the nesting showing up
      here, or build cycles);
    * sizes that :func:`pickletools.genops` cannot read from the data (it
      reads every counted argument through ``BytesIO.read``, which never
      returns more than is there: a 10-byte BINBYTES8 claiming 4 EiB fails
      here, where CPython's C unpickler would allocate it first), memo indices
      above the number of opcodes so far (``LONG_BINPUT 4294967295`` would grow
      the C unpickler's memo to 32 GiB), and FRAME lengths beyond the data.

    The walk mirrors the unpickler's stack: each entry is a :class:`_Value`
    (or the MARK), and each opcode pops and pushes what
    :mod:`pickletools` says it does (``stack_before`` / ``stack_after``), so
    the depth and size of everything built are known before it is built.
    Time and memory are linear in the opcodes, at most ``max_pickle_items``.
    """
    limits = limits or Limits()
    stack: list = []
    marks = [0]  # how many MARKs are on the stack, in a list so that _pop can change it
    memo: dict = {}
    count = 0
    try:
        for opcode, arg, pos in pickletools.genops(data):
            count += 1
            name = opcode.name
            if count > limits.max_pickle_items:
                raise WeightsLimitError(
                    f"{where}: more than {limits.max_pickle_items} opcodes (Limits.max_pickle_items); a state "
                    f"dict takes about 40 per tensor")
            if name not in _ALLOWED_OPCODES:
                why = _REFUSED_OPCODES.get(name)
                raise (UnsafeFileError if why else WeightsFileError)(
                    f"{where}: refused opcode {name} at byte {pos}"
                    + (f" ({short_repr(arg)})" if isinstance(arg, str) else "")
                    + f": {why or 'a state dict never uses it'}, so the file was not loaded and nothing in it ran")
            if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                index = len(memo) if name == "MEMOIZE" else arg
                if index > count:
                    raise WeightsFileError(
                        f"{where}: memo index {index} at byte {pos} after only {count} opcodes; a pickler numbers "
                        f"its memo 0, 1, 2, ..., so the file is corrupt or forged")
                if not stack or stack[-1] is _MARK:
                    raise WeightsFileError(f"{where}: {name} at byte {pos} with nothing to store")
                memo[index] = stack[-1]
                continue
            if name in ("GET", "BINGET", "LONG_BINGET"):
                if arg not in memo:
                    raise WeightsFileError(f"{where}: {name} at byte {pos} fetches memo index {arg}, never stored")
                stack.append(memo[arg])
                continue
            if name == "FRAME" and arg > len(data) - pos:
                raise WeightsFileError(
                    f"{where}: frame of {arg} bytes at byte {pos}, but only {len(data) - pos} remain")
            if name == "MARK":
                stack.append(_MARK)
                marks[0] += 1
                if marks[0] > limits.max_pickle_depth:  # each open MARK becomes one more level of nesting
                    raise WeightsLimitError(
                        f"{where}: more than {limits.max_pickle_depth} MARKs open at byte {pos}: objects would "
                        f"nest more than {limits.max_pickle_depth} deep (Limits.max_pickle_depth)")
                continue
            parts = _pop(stack, marks, opcode, where, pos)
            if name == "STOP":
                break
            if not opcode.stack_after:  # POP, POP_MARK, PROTO, FRAME
                continue
            if name in _MUTATORS:
                target, parts = parts[0], parts[1:]
                if target.contained:
                    raise WeightsFileError(
                        f"{where}: {name} at byte {pos} changes an object already placed inside another; "
                        f"a state dict is built inside out, so the file is corrupt or forged")
                if any(part is target for part in parts):
                    raise WeightsFileError(f"{where}: {name} at byte {pos} places an object inside itself; a "
                                           f"state dict holds no cycles, so the file is corrupt or forged")
                value = target
            else:
                value = _Value(1, 1)
            for part in parts:
                part.contained = True
                value.depth = max(value.depth, part.depth + 1)
                value.size += part.size
            if value.depth > limits.max_pickle_depth:
                raise WeightsLimitError(
                    f"{where}: objects nest more than {limits.max_pickle_depth} deep at byte {pos} "
                    f"(Limits.max_pickle_depth); a torch.save state dict nests 6 deep, a checkpoint with "
                    f"optimizer state 9")
            if value.size > limits.max_pickle_items:
                raise WeightsLimitError(
                    f"{where}: the object built at byte {pos} holds more than {limits.max_pickle_items} objects "
                    f"once its shared parts are counted each time they are shared (Limits.max_pickle_items); "
                    f"a pickle that shares parts this much is built to exhaust whoever reads it")
            stack.append(value)
    except WeightsFileError:
        raise
    except Exception as exc:  # genops raises ValueError for most damage, others for the rest
        raise WeightsFileError(
            f"{where}: not a valid pickle ({type(exc).__name__}: {str(exc)[:200]}); the file is truncated or "
            f"corrupt") from None


def _pop(stack: list, marks: list, opcode, where: str, pos: int) -> list:
    """Pop what ``opcode`` consumes (``opcode.stack_before``) off ``stack``; the popped values, bottom first.

    ``stackslice`` is everything down to the topmost MARK, ``markobject`` the
    MARK itself; any other entry is one value, which must not be a MARK
    (the C unpickler would take an object from below the MARK instead).
    """
    popped = []
    for kind in reversed(opcode.stack_before):
        if kind is pickletools.stackslice:
            if not marks[0]:
                raise WeightsFileError(f"{where}: {opcode.name} at byte {pos} without a MARK before it")
            while stack[-1] is not _MARK:
                popped.append(stack.pop())
        elif kind is pickletools.markobject:
            stack.pop()  # the MARK that the stackslice above stopped at
            marks[0] -= 1
        else:
            if not stack or stack[-1] is _MARK:
                raise WeightsFileError(f"{where}: {opcode.name} at byte {pos} finds too few objects on the stack")
            popped.append(stack.pop())
    popped.reverse()
    return popped


def read_pth(zf: zipfile.ZipFile, prefix: str, path, limits: Limits) -> "collections.OrderedDict[str, np.ndarray]":
    """The state dict in the PyTorch zip archive ``zf`` (whose folder is ``prefix``), as NumPy arrays."""
    names = set(zf.namelist())
    if f"{prefix}/constants.pkl" in names or any(n.startswith(f"{prefix}/code/") for n in names):
        raise WeightsFileError(
            f"{path}: a TorchScript archive (torch.jit.save), not a state dict; save the weights with "
            f"torch.save(model.state_dict(), path)")
    check_zip_members(zf, path, limits)

    byteorder_name = f"{prefix}/byteorder"
    if byteorder_name in names:
        info = zf.getinfo(byteorder_name)
        byteorder = read_member(zf, info, path).strip() if info.file_size <= 16 else b"(oversized member)"
        if byteorder != b"little":
            raise WeightsFileError(
                f"{path}: member {byteorder_name!r} says {byteorder.decode('ascii', 'replace')!r}; tinynet reads "
                f"little-endian storages only (re-save the weights with PyTorch on an x86 or ARM machine)")

    info = zf.getinfo(f"{prefix}/data.pkl")
    if info.file_size > limits.max_pickle_bytes:
        raise WeightsLimitError(
            f"{path}: {info.filename} is {info.file_size} bytes, more than the limit of {limits.max_pickle_bytes} "
            f"(Limits.max_pickle_bytes; a ResNet50 state dict needs about 40 kB)")
    data = read_member(zf, info, path)
    with warnings.catch_warnings():
        # Protocol 0's STRING opcode is decoded with Python's escapes; an invalid one ("\\_") is a
        # DeprecationWarning in both pickletools and the unpickler, noise about the file, not the program.
        warnings.simplefilter("ignore", DeprecationWarning)
        scan_pickle(data, f"{path}: {info.filename}", limits)
        unpickler = StateDictUnpickler(data, zf, prefix, path, limits)
        try:
            obj = unpickler.load()
        except _Misuse as exc:
            raise UnsafeFileError(f"{unpickler._where()}: {exc}, so the file was not loaded") from None
        except WeightsFileError:
            raise
        except Exception as exc:  # a malformed pickle can raise a dozen types (UnpicklingError, EOFError...)
            raise WeightsFileError(
                f"{path}: {info.filename} is not a valid state-dict pickle ({type(exc).__name__}: "
                f"{str(exc)[:200]}); the file is truncated or corrupt") from None
    return _unwrap(obj, path)


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, _Tensor) for k, v in obj.items())


def _unwrap(obj, path) -> "collections.OrderedDict[str, np.ndarray]":
    """The state dict inside what ``torch.save`` saved.

    The rule: a dict whose keys are all str and values all tensors *is* the
    state dict.  Otherwise a dict in which exactly one of the keys
    :data:`CHECKPOINT_KEYS` (``state_dict``, ``model_state_dict``, ``model``)
    holds such a dict is a training checkpoint, and that dict is returned
    (``epoch``, ``optimizer`` and the like are dropped).  Anything else (no such
    key, or two of them: which model was meant?) is an error listing what the
    file holds.
    """
    if _is_tensor_dict(obj):
        return collections.OrderedDict((k, v.array) for k, v in obj.items())
    if isinstance(obj, dict):
        found = [k for k in CHECKPOINT_KEYS if k in obj and _is_tensor_dict(obj[k])]
        if len(found) == 1:
            return collections.OrderedDict((k, v.array) for k, v in obj[found[0]].items())
        keys = ", ".join(f"{short_repr(k)}: {type(v).__name__.lstrip('_')}" for k, v in list(obj.items())[:12])
        if len(found) > 1:
            raise WeightsFileError(
                f"{path}: checkpoint holds several state dicts ({', '.join(found)}); load it with PyTorch and "
                f"save the one you want with torch.save(checkpoint[key], path)")
        raise WeightsFileError(
            f"{path}: expected a state dict (str -> tensor) or a checkpoint with one of the keys "
            f"{', '.join(CHECKPOINT_KEYS)} holding one; the file holds a dict {{{keys}}}")
    raise WeightsFileError(
        f"{path}: expected a state dict (a dict of str -> tensor), the file holds a {type(obj).__name__.lstrip('_')}")
