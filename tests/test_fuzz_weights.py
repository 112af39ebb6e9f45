"""Property-based fuzzing of the weight readers: mutated files load or fail with the documented error.

Each fuzzer starts from a valid file and applies a few mutations drawn by
Hypothesis, then calls :func:`tinynet.io.load_weights`.  The property:

* it returns a well-formed state dict (str -> C-contiguous, writable, native
  NumPy array of a dtype tinynet reads), and, where the mutation could not
  have changed the values legitimately (any raw byte edit of a zip archive:
  CRC-32 guards every member), exactly the original values;
* or it raises :class:`~tinynet.io.WeightsFileError` (or a sub-class);
* never anything else (no ``MemoryError``, ``RecursionError``, ``KeyError``,
  crash), within ``SECONDS`` per input and under an address-space limit
  (``RLIMIT_AS``: what the process had plus ``EXTRA_ADDRESS_SPACE``), so a
  reader that over-allocates fails the test instead of the machine.

The mutations: raw byte edits of the whole file (bit flips, byte sets,
truncation, insertion, deletion, little-endian integers written over bytes),
and structured ones that get past the checksums: a zip member's content
edited and the archive rebuilt with valid CRCs (this reaches the pickle scanner
and the ``.npy`` header parser), and a safetensors header's JSON fields replaced
by other JSON values.

Budget: ``EXAMPLES`` (500) inputs per fuzzer (3,000 in all, about 20 s on two
cores); ``TINYNET_FUZZ=N`` multiplies it (and drops the fixed seed) for a
longer campaign, e.g. ``TINYNET_FUZZ=20 pytest tests/test_fuzz_weights.py -s``,
which prints how many inputs each fuzzer tried and what came of them.
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import pathlib
import resource
import time
import zipfile

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from byte_edits import apply_edits  # noqa: E402

from tinynet.io import WeightsFileError, load_weights, save_weights  # noqa: E402
from tinynet.io.files import SAVE_DTYPES  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
FUZZ = max(1, int(os.environ.get("TINYNET_FUZZ", "1") or 1))
EXAMPLES = 500 * FUZZ
SECONDS = 2.0  # per input; the files are a few kB, every reader answers in milliseconds
EXTRA_ADDRESS_SPACE = 2 << 30
LIMITS = {"max_bytes": 64 << 20}  # keeps what a mutated size can claim small, as a careful caller would

SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=FUZZ == 1,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])

#: fuzzer -> Counter of outcomes, printed at the end of a campaign.
OUTCOMES: dict = collections.defaultdict(collections.Counter)


# ---------------------------------------------------------------------------
# Seeds: one small valid file per format
# ---------------------------------------------------------------------------
def _seed_state():
    """The zoo's tensors (every dtype, views, a 0-d one) without bfloat16, which loads as float32."""
    return load_weights(FIXTURES / "tensors_zoo.pth")


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    state = _seed_state()
    files = {"pth": (FIXTURES / "tensors_zoo.pth").read_bytes(),
             "npz": save_weights(state, root / "w.npz").read_bytes(),
             "safetensors": save_weights(state, root / "w.safetensors", metadata={"classes": '["a"]'}).read_bytes()}
    return files, {fmt: load_weights(root / f"w.{fmt}") if fmt != "pth" else state for fmt in files}


# ---------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------
def _mutation(size: int):
    pos = st.integers(0, max(size - 1, 0))
    return st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(0, 7)),
        st.tuples(st.just("set"), pos, st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, ord("{"), ord("("), ord("."),
                                                         ord("]"), ord("\x85")])),
        st.tuples(st.just("cut"), pos),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), pos, st.integers(1, 64)),
        st.tuples(st.just("int"), pos, st.sampled_from(["<B", "<H", "<I", "<Q"]),
                  st.sampled_from([0, 1, 2 ** 31 - 1, 2 ** 32 - 1, 2 ** 63 - 1, 2 ** 64 - 1, 10 ** 12])),
    )


def _byte_edits(size: int):
    return st.lists(_mutation(size), min_size=1, max_size=4)


def _rezip(data: bytes, member_index: int, ops, deflate: bool) -> bytes:
    """The archive with one member's content edited, rebuilt so that every CRC is right again."""
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, \
            zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as zout:
        infos = zin.infolist()
        target = infos[member_index % len(infos)]
        for info in infos:
            content = zin.read(info)
            zout.writestr(info.filename, apply_edits(content, ops) if info is target else content)
    return buf.getvalue()


_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=False),
              st.sampled_from(["F32", "F64", "I64", "BF16", "C64", "F8_E4M3", "BOOL", "U16", "", "__metadata__"]),
              st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)


def _edit_header(data: bytes, key_index: int, field: str, value, fix_length: bool) -> bytes:
    """A safetensors file whose header entry (or its dtype/shape/data_offsets) is replaced by ``value``."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    keys = list(header)
    key = keys[key_index % len(keys)]
    if field == "entry" or not isinstance(header[key], dict):
        header[key] = value
    else:
        header[key][field] = value
    raw = json.dumps(header).encode()
    length = len(raw) if fix_length else n
    return length.to_bytes(8, "little") + raw + data[8 + n:]


# ---------------------------------------------------------------------------
# The property
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def address_space_limit(extra: int):
    """Lower the soft ``RLIMIT_AS`` to what the process maps now plus ``extra`` bytes; restore it after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = mapped + extra if hard == resource.RLIM_INFINITY else min(mapped + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _check(fuzzer: str, path: pathlib.Path, data: bytes, original, values_must_match: bool) -> None:
    path.write_bytes(data)
    start = time.perf_counter()
    try:
        with address_space_limit(EXTRA_ADDRESS_SPACE):
            got = load_weights(path, **LIMITS)
    except WeightsFileError as error:
        OUTCOMES[fuzzer][type(error).__name__] += 1
        assert len(str(error)) < 2000, f"message of {len(str(error))} characters"
        got = None
    seconds = time.perf_counter() - start
    assert seconds < SECONDS, f"{fuzzer}: {seconds:.2f} s for one input"
    if got is None:
        return
    assert isinstance(got, collections.OrderedDict)
    for key, array in got.items():
        assert isinstance(key, str) and isinstance(array, np.ndarray), key
        assert array.flags.c_contiguous and array.flags.writeable and array.dtype.isnative, key
        assert array.dtype in SAVE_DTYPES, (key, array.dtype)
    same = (list(got) == list(original) and all(
        got[k].dtype == original[k].dtype and got[k].shape == original[k].shape
        and np.array_equal(got[k], original[k], equal_nan=got[k].dtype.kind == "f") for k in got))
    OUTCOMES[fuzzer]["loaded, same values" if same else "loaded, other values"] += 1
    if values_must_match:
        assert same, f"{fuzzer}: a raw edit of a CRC-guarded archive loaded other values"


@pytest.mark.parametrize("fmt", ["pth", "npz", "safetensors"])
def test_fuzz_raw_byte_edits(seeds, tmp_path, fmt):
    files, originals = seeds
    data = files[fmt]

    @SETTINGS
    @given(ops=_byte_edits(len(data)))
    def run(ops):
        _check(f"raw {fmt}", tmp_path / f"m.{fmt}", apply_edits(data, ops), originals[fmt],
               values_must_match=fmt != "safetensors")

    run()


@pytest.mark.parametrize("fmt", ["pth", "npz"])
def test_fuzz_zip_member_edits(seeds, tmp_path, fmt):
    files, originals = seeds
    data = files[fmt]
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        members = zf.infolist()
    biggest = max(m.file_size for m in members)
    # The pickle (and each .npy header) is where the parsers are: pick it more often than storages.
    pkl = next((i for i, m in enumerate(members) if m.filename.endswith("data.pkl")), 0)

    @SETTINGS
    @given(member=st.one_of(st.just(pkl), st.integers(0, len(members) - 1)), ops=_byte_edits(biggest),
           deflate=st.booleans())
    def run(member, ops, deflate):
        _check(f"member {fmt}", tmp_path / f"m.{fmt}", _rezip(data, member, ops, deflate), originals[fmt],
               values_must_match=False)

    run()


def test_fuzz_safetensors_header_edits(seeds, tmp_path):
    files, originals = seeds
    data = files["safetensors"]

    @SETTINGS
    @given(key=st.integers(0, 100), field=st.sampled_from(["entry", "dtype", "shape", "data_offsets"]),
           value=_JSON, fix_length=st.booleans())
    def run(key, field, value, fix_length):
        _check("header safetensors", tmp_path / "m.safetensors", _edit_header(data, key, field, value, fix_length),
               originals["safetensors"], values_must_match=False)

    run()


def test_fuzz_report():
    """Not a property: prints what the fuzzers above tried (run with -s), and checks they ran at all."""
    if not OUTCOMES:
        pytest.skip("run together with the fuzzers")
    for fuzzer, counts in sorted(OUTCOMES.items()):
        print(f"\n{fuzzer}: {sum(counts.values())} inputs: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    assert all(sum(c.values()) > 0 for c in OUTCOMES.values())
