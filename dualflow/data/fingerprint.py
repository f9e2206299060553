"""Fingerprints of the data a result was computed on."""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["fingerprint"]


def fingerprint(**arrays: np.ndarray) -> str:
    """A short hex digest of named arrays (names, dtypes, shapes and bytes).

    Results files store it; a resumed or reused run compares it with the
    fingerprint of the data it loads now and refuses on a mismatch.
    Order-independent in the keyword names; 16 hex digits (blake2b-64).
    """
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(arrays):
        a = np.ascontiguousarray(np.asarray(arrays[name]))
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()
