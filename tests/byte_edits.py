"""Byte-level edits of a file, shared by the fuzzers (tests/test_fuzz_images.py, tests/test_fuzz_weights.py).

An edit is a tuple whose first two entries are its kind and a position (clamped to the data)::

    ("flip", pos, bit)        flip one bit
    ("set", pos, value)       overwrite one byte
    ("int", pos, fmt, value)  overwrite with ``struct.pack(fmt, value)``, ``value`` wrapped to the format's width
    ("insert", pos, bytes)    insert bytes
    ("delete", pos, count)    delete ``count`` bytes
    ("cut", pos)              truncate

Each fuzzer draws edits from its own strategy (which values, how many); this applies them.
"""
from __future__ import annotations

import struct


def apply_edits(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for edit in edits:
        kind, at = edit[0], min(edit[1], max(len(out) - 1, 0))
        if kind == "flip" and out:
            out[at] ^= 1 << edit[2]
        elif kind == "set" and out:
            out[at] = edit[2]
        elif kind == "int":
            fmt, value = edit[2], edit[3]
            packed = struct.pack(fmt, value & ((1 << (8 * struct.calcsize(fmt))) - 1))
            out[at:at + len(packed)] = packed
        elif kind == "insert":
            out[at:at] = edit[2]
        elif kind == "delete":
            del out[at:at + edit[2]]
        elif kind == "cut":
            del out[at:]
    return bytes(out)
