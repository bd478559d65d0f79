"""Deterministic randomness: uniforms from a stable hash of an example's key, never from process state.

Every worker and every run draws the same values for the same ``(seed, user_id, timestamp, item)``
(:func:`stable_keys`); :func:`stable_uniform` separates uses by stream. Used by the synthetic
context (:mod:`tfrs_ctx.data.examples`) and the synthetic search queries
(:mod:`tfrs_ctx.data.search_context`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

_U64 = np.uint64
_MASK64 = (1 << 64) - 1


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (uint64 in, uint64 out)."""
    z = z + _U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def _u64(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).view(np.uint64)


def stable_keys(seed: int, user_ids: Any, timestamps: np.ndarray, items: np.ndarray) -> np.ndarray:
    """A 64-bit key per (seed, user, timestamp, item): the same in every process and run."""
    timestamps = np.asarray(timestamps, dtype=np.int64)
    with np.errstate(over="ignore"):
        key = _mix(np.full(len(timestamps), seed & _MASK64, dtype=np.uint64))
        key = _mix(key ^ _u64(np.broadcast_to(np.asarray(user_ids, dtype=np.int64), timestamps.shape)))
        key = _mix(key ^ _u64(timestamps))
        return _mix(key ^ _u64(items))


def stable_uniform(keys: np.ndarray, stream: int, n: int) -> np.ndarray:
    """``[len(keys), n]`` uniforms in [0, 1) drawn from the keys; ``stream`` separates uses."""
    with np.errstate(over="ignore"):
        salt = _mix(np.arange(stream * n + 1, stream * n + n + 1, dtype=np.uint64))
        z = _mix(keys[:, None] ^ salt[None, :])
    return (z >> _U64(11)).astype(np.float64) * 2.0**-53
