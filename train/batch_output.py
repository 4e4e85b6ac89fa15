"""The output side of a store's batches: recycled output tensors and the storage-dtype -> output-dtype
conversion (with the dataset scaling).

Shapes and units
    An output tensor is [local_batch_size, d_model] (rows x features) per site, in the store's
    output dtype (float32 or bfloat16), or in the cache's storage dtype on the CUDA path (the rows
    are converted on the device after the copy). A scale is the site's dataset factor
    sqrt(d / E||x||^2) (`train.scaling`), applied in float32 arithmetic.

OutputPool
    Recycles output tensors once the caller holds nothing of them (no batch, view, numpy array or
    autograd graph), never while it does: recycling spares the page faults of a fresh multi-MB
    allocation per batch. It learns that the caller let go through public APIs only (the class
    docstring says how). Pinned memory (CUDA targets) is never recycled: torch's host allocator
    already caches it and tracks the asynchronous copies out of it.

convert
    x [n, d] storage dtype -> [n, d] output dtype, times the scale if given. bfloat16 output on the
    CPU goes through float32 in blocks of BLOCK_ROWS rows: an exact step for float16 / bfloat16
    input, so the same bits as a direct rounding, and about 3.5x faster than torch's scalar
    float16 -> bfloat16 copy.

Threads
    The store's batch thread takes tensors from the pools and converts into them (the caller's
    thread without prefetch, and on the CUDA path the caller's thread converts on the device).
"""

from __future__ import annotations

import weakref
from collections import deque

import numpy as np
import torch

OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BLOCK_ROWS = 256  # rows converted at a time through float32 for bfloat16 output (fits in L2)


def _lendable(buf: torch.Tensor) -> np.ndarray:
    """A numpy array of buf's shape over buf's memory (bfloat16, which numpy lacks, as int16)."""
    return (buf.view(torch.int16) if buf.dtype == torch.bfloat16 else buf).numpy()


class OutputPool:
    """Output tensors of one shape and dtype, recycled once nothing else holds their memory.

    The pool keeps up to `capacity` buffers and lends each as a tensor of its own: torch.from_numpy
    of a fresh numpy array object over the buffer, of which that tensor's storage holds the only
    reference. The array dies when the storage does, i.e. when no tensor, view, numpy array or
    autograd graph of the caller's refers to the lent memory any more; a weak reference on the
    array then puts the buffer back on the free list (in whichever thread dropped the last
    reference; a deque is thread-safe). So nothing the caller can see is ever overwritten, and
    only public APIs are used (torch.from_numpy, Tensor.numpy, weakref): torch offers no public
    storage use count (torch._C._storage_Use_Count is private). When the caller holds every
    buffer, the pool forgets the oldest (it stays the caller's) and makes a new one. Pinned
    memory is never pooled (module docstring).
    """

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, pin: bool = False, capacity: int = 4):
        self.shape, self.dtype, self.pin, self.capacity = tuple(shape), dtype, pin, capacity
        # buffer id -> (the buffer as a numpy array, bfloat16 as int16; weak reference to the array
        # lent now). Oldest first; a forgotten buffer's weak reference dies with it, unfired.
        self._keep: dict[int, tuple[np.ndarray, weakref.ref | None]] = {}
        self._free: deque[int] = deque()  # ids of buffers nothing outside the pool refers to
        self._made = 0

    def get(self) -> torch.Tensor:
        """A [shape] tensor of dtype with stale contents, which the caller may keep."""
        if self.pin:
            return torch.empty(self.shape, dtype=self.dtype, pin_memory=True)
        while self._free:
            key = self._free.popleft()
            if key in self._keep:  # else forgotten since it was lent
                return self._lend(key)
        if len(self._keep) >= self.capacity:  # all still held by the caller: forget the oldest
            del self._keep[next(iter(self._keep))]
        key, self._made = self._made, self._made + 1
        self._keep[key] = (_lendable(torch.empty(self.shape, dtype=self.dtype)), None)
        return self._lend(key)

    def _lend(self, key: int) -> torch.Tensor:
        buf = self._keep[key][0]
        arr = buf.view()  # a new array object: only the lent tensor's storage will hold it
        self._keep[key] = (buf, weakref.ref(arr, lambda _, key=key, free=self._free: free.append(key)))
        lent = torch.from_numpy(arr)
        return lent if lent.dtype == self.dtype else lent.view(self.dtype)


def convert(x: torch.Tensor, dtype: torch.dtype, scale: float | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """[n, d] storage dtype -> [n, d] `dtype` (into `out`, else a new tensor on x's device), times
    `scale` in float32 arithmetic if given (module docstring)."""
    if out is None:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    if dtype == torch.float32:
        out.copy_(x)
        if scale is not None:
            out.mul_(scale)
    elif x.device.type == "cpu" and (x.dtype != dtype or scale is not None):
        scratch = torch.empty((min(BLOCK_ROWS, len(x)), x.shape[1]), dtype=torch.float32)
        for i in range(0, len(x), BLOCK_ROWS):
            block = scratch[: len(x) - i].copy_(x[i : i + BLOCK_ROWS])
            out[i : i + BLOCK_ROWS].copy_(block if scale is None else block.mul_(scale))
    elif scale is not None:
        out.copy_(x.to(torch.float32).mul_(scale))
    else:
        out.copy_(x)
    return out
