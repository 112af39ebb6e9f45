"""Ranks agree on the job before training: the same classes, the same data, the same settings.

``mpiexec`` starts whatever command lines it is given: ranks started with
another ``--data`` (other classes, the same counts) or another ``--lr`` would
otherwise average their gradients together and report success.  Each rank
digests each part of its job (SHA-256 of its JSON, cut to 64 bits); one
allgather brings every rank's digests to every rank, and every rank, seeing
the same table, raises the same one-line error naming the first part that
differs and the first rank that differs from rank 0 ("rank 1 differs from
rank 0 in its classes").
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from .communicator import DistributedError

__all__ = ["check_same_job", "job_digests"]


def job_digests(parts: dict) -> np.ndarray:
    """int64 ``(len(parts),)``: the first 64 bits of the SHA-256 of each part's JSON (keys sorted)."""
    return np.array([int.from_bytes(hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode())
                                    .digest()[:8], "little", signed=True) for value in parts.values()],
                    dtype=np.int64)


def check_same_job(comm, parts: dict, error=DistributedError) -> None:
    """Raise ``error`` on every rank unless every rank passed equal ``parts`` (name -> JSON-able value).

    A name is what the message says differs: ``"its classes"``, ``"--lr"``.

    ``parts`` must have the same names, in the same order, on every rank (the
    program's code makes them); their values are what the user chose: the
    class list, the data's identity digest, each setting.
    """
    mine = job_digests(parts)
    everyone = np.asarray(comm.allgather(mine))  # (ranks, parts), the same table on every rank
    for k, name in enumerate(parts):
        differ = np.flatnonzero(everyone[:, k] != everyone[0, k])
        if len(differ):
            raise error(f"the {comm.size} ranks were not started for the same job: rank {int(differ[0])} differs "
                        f"from rank 0 in {name} ({len(differ)} of {comm.size} ranks differ); start every rank with "
                        f"the same data and settings")
