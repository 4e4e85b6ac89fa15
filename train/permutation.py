"""Keyed permutations of [0, n) that never build anything of size n unless asked to.

`permute(idx, n, key)` maps indices through a pseudo-random bijection of [0, n): a Feistel
network on the smallest power-of-two domain 2**bits >= n (so 2**bits < 2n), with cycle-walking
(apply the network again while the value is >= n). It is vectorised in numpy uint64 arithmetic,
costs O(len(idx)) and is a pure function of (n, key, idx): no RNG state, no platform or numpy
version dependence. The values are pinned in tests/test_activation_store.py; changing anything
here changes every stored training order, so bump ORDER_VERSION if you must.

Network (ROUNDS rounds). A value x of `bits` bits is split into L (the high `bits - lo` bits)
and R (the low `lo = bits // 2` bits). One round maps (L, R) -> (R, L ^ F_i(R)) where
F_i(R) = splitmix64(R ^ K_i) truncated to the width of L, and the two widths swap for the next
round (an unbalanced Feistel, still a bijection each round). K_i = derive_key(key, i).

Keys are derived from tuples of integers with `derive_key(*parts)` (splitmix64 chaining), e.g.
the store's row order (`train.row_order`) uses derive_key(seed, epoch, 0) for the shard order of
an epoch and derive_key(seed, epoch, 1, window) for the row order inside a window. Pure
functions of their arguments: safe from any thread.
"""

from __future__ import annotations

import numpy as np

ORDER_VERSION = 1
ROUNDS = 6
_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB


def splitmix64_int(x: int) -> int:
    """splitmix64 finaliser of one Python int (taken mod 2**64); returns an int in [0, 2**64)."""
    z = (x + _GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * _C1) & _M64
    z = ((z ^ (z >> 27)) * _C2) & _M64
    return z ^ (z >> 31)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, elementwise on a uint64 array (wrapping arithmetic). Same values as
    `splitmix64_int`."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_C1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_C2)
        return z ^ (z >> np.uint64(31))


def derive_key(*parts: int) -> int:
    """A 64-bit key from a tuple of integers (each taken mod 2**64), order-sensitive."""
    h = 0
    for p in parts:
        h = splitmix64_int(h ^ (int(p) & _M64))
    return h


def _network(x: np.ndarray, bits: int, round_keys: list[np.uint64]) -> np.ndarray:
    """One pass of the Feistel network over [0, 2**bits); x: uint64 array, values < 2**bits."""
    lo = bits // 2
    hi = bits - lo
    for k in round_keys:
        left = x >> np.uint64(lo)
        right = x & np.uint64((1 << lo) - 1)
        f = splitmix64(right ^ k) & np.uint64((1 << hi) - 1)
        x = (right << np.uint64(hi)) | (left ^ f)
        lo, hi = hi, lo
    return x


def permute(idx: np.ndarray | int, n: int, key: int) -> np.ndarray:
    """pi(idx) for the keyed bijection pi of [0, n).

    idx: integer array (any shape) with values in [0, n). Returns int64 array, same shape.
    Cost: O(idx.size) times the expected number of cycle-walks (< 2 on average).
    """
    idx = np.asarray(idx)
    if n < 0:
        raise ValueError(f"permutation size must be >= 0, got {n}")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"indices must lie in [0, {n})")
    if n <= 1:
        return idx.astype(np.int64, copy=True)
    bits = (n - 1).bit_length()
    round_keys = [np.uint64(derive_key(key, i)) for i in range(ROUNDS)]
    x = _network(idx.astype(np.uint64).ravel(), bits, round_keys)
    bad = np.flatnonzero(x >= np.uint64(n))
    while bad.size:  # cycle-walking: terminates because x's cycle passes through idx < n
        x[bad] = _network(x[bad], bits, round_keys)
        bad = bad[x[bad] >= np.uint64(n)]
    return x.astype(np.int64).reshape(idx.shape)


def permutation(n: int, key: int) -> np.ndarray:
    """The whole permutation [pi(0), ..., pi(n-1)] as int64 [n]. Only for small n (a window)."""
    return permute(np.arange(n, dtype=np.int64), n, key)
