"""Memory-map plumbing of the store's window reading (`train.window_reader`), Linux.

`MappedFiles`: files memory-mapped back to back into one read-only address range, viewed as one
tensor. `copy_file`: a file copied into an array through short-lived memory maps.

The activation store serves a window of W shards as one `[W * rows_per_shard, d]` tensor. Instead
of copying the shards' chunk files into private memory, `MappedFiles` reserves W * stride bytes of
address space and maps file j at offset j * stride (mmap MAP_FIXED over the reservation), so a
random-row gather reads the page cache directly: no copy, no second resident copy of the window.

Requirements (`mappable`): Linux, a 64-bit process, and a stride that is a multiple of the page
size. Files shorter than the stride (a short last shard) leave the rest of their slot unmapped
(PROT_NONE): callers index only rows that exist.

Lifetime: the tensors and memoryviews handed out keep the mapping alive; it is unmapped when the
last of them is garbage-collected, never under a reader (there is deliberately no close()).
Contract: the files must not be truncated while mapped (cache chunk files are write-once;
rewriting is always temp file + rename, which leaves a mapped file intact); a truncation by
another process makes reads past the new end fault with SIGBUS, as with any memory map.

Both run in whichever thread calls them (the store's loader thread, or the caller's).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import weakref
from typing import Sequence

import numpy as np
import torch

PAGE = mmap.PAGESIZE
_PROT_NONE, _PROT_READ = 0, 1
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20  # Linux uapi values
_MADV_WILLNEED = 3
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14; uapi value where Python lacks it
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        lib.munmap.restype = ctypes.c_int
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.madvise.restype = ctypes.c_int
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc = lib
    return _libc


def mappable(stride: int) -> str | None:
    """None if files of `stride` bytes can be mapped back to back here, else the reason why not."""
    if not sys.platform.startswith("linux"):
        return f"memory-mapped windows need Linux (this is {sys.platform})"
    if ctypes.sizeof(ctypes.c_void_p) != 8:
        return "memory-mapped windows need a 64-bit process"
    if stride <= 0 or stride % PAGE:
        return f"a shard's chunk file ({stride} bytes) is not a whole number of {PAGE}-byte pages"
    return None


def _unmap(base: int, length: int) -> None:
    _lib().munmap(base, length)


class MappedFiles:
    """files[j] = (path, size) mapped read-only at byte j * stride of one range of len(files) * stride.

    Raises OSError naming the file if a file cannot be opened or mapped (nothing stays mapped).
    """

    def __init__(self, files: Sequence[tuple[str, int]], stride: int):
        why = mappable(stride)
        if why:
            raise ValueError(why)
        self.stride, self.sizes = int(stride), [int(n) for _, n in files]
        if any(n > self.stride or n < 0 for n in self.sizes):
            raise ValueError(f"file sizes {self.sizes} must lie in [0, stride={self.stride}]")
        self.length = max(len(files), 1) * self.stride
        lib = _lib()
        base = lib.mmap(None, self.length, _PROT_NONE, _MAP_PRIVATE | _MAP_ANONYMOUS, -1, 0)
        if base in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"cannot reserve {self.length} bytes of address space: {os.strerror(err)}")
        self.base = int(base)
        self._finalizer = weakref.finalize(self, _unmap, self.base, self.length)
        try:
            for j, (path, size) in enumerate(files):
                if size:
                    self._map(j, os.fspath(path), size)
        except BaseException:
            self._finalizer()
            raise

    def _map(self, j: int, path: str, size: int) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            held = os.fstat(fd).st_size
            if held < size:
                raise OSError(f"{path} holds {held} bytes, fewer than the {size} expected")
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)  # start reading a cold file, in large requests
            at = self.base + j * self.stride
            got = _lib().mmap(at, size, _PROT_READ, _MAP_SHARED | _MAP_FIXED, fd, 0)
            if got != at:
                err = ctypes.get_errno()
                raise OSError(err, f"cannot memory-map {path}: {os.strerror(err)}")
        finally:
            os.close(fd)

    def populate(self) -> None:
        """Read every file into the page cache and map its pages now (a cold file is read
        sequentially), so later random reads take no page faults. Falls back to an asynchronous
        read-ahead hint on kernels older than 5.14."""
        lib = _lib()
        for j, size in enumerate(self.sizes):
            if size and lib.madvise(self.base + j * self.stride, size, MADV_POPULATE_READ) != 0:
                lib.madvise(self.base + j * self.stride, size, _MADV_WILLNEED)

    def _buffer(self, offset: int, nbytes: int) -> ctypes.Array:
        """A ctypes byte array over [offset, offset + nbytes) that keeps this mapping alive."""
        if not self._finalizer.alive:
            raise ValueError("this mapping is closed")
        kind = type("_MappedBytes", (ctypes.Array,), {"_type_": ctypes.c_uint8, "_length_": nbytes})
        raw = kind.from_address(self.base + offset)
        raw.owner = self  # numpy / torch views hold raw, raw holds the mapping
        return raw

    def file_bytes(self, j: int) -> memoryview:
        """The bytes of file j (read-only view; keeps the mapping alive)."""
        return memoryview(self._buffer(j * self.stride, self.sizes[j])).cast("B").toreadonly()

    def tensor(self, dtype: torch.dtype, row_bytes: int) -> torch.Tensor:
        """The whole range as [len(files) * stride / row_bytes, row_bytes / itemsize] of dtype.
        Read-only memory: writing to it crashes the process."""
        if self.stride % row_bytes:
            raise ValueError(f"stride {self.stride} is not a whole number of {row_bytes}-byte rows")
        itemsize = torch.empty((), dtype=dtype).element_size()
        flat = torch.from_numpy(np.frombuffer(self._buffer(0, self.length), dtype=np.uint8))
        return flat.view(dtype).view(self.length // row_bytes, row_bytes // itemsize)


def copy_file(path: str, size: int, dst: np.ndarray, chunk: int = 1 << 25) -> None:
    """Copy the first `size` bytes of a file into the C-contiguous array dst (dst.nbytes == size).

    The file is memory-mapped `chunk` bytes at a time, each piece's page tables populated in one
    call (MADV_POPULATE_READ, Linux >= 5.14; a cold file is read sequentially by the kernel),
    copied with one memcpy and unmapped: about twice as fast as faulting page by page, and at
    most `chunk` bytes of the file are mapped at any time.
    """
    out = dst.reshape(-1).view(np.uint8)
    with open(path, "rb") as f:
        for off in range(0, size, chunk):
            n = min(chunk, size - off)
            with mmap.mmap(f.fileno(), n, access=mmap.ACCESS_READ, offset=off) as m:
                try:
                    m.madvise(MADV_POPULATE_READ)
                except (OSError, ValueError):  # older kernel: plain page faults, same result
                    pass
                src = np.frombuffer(m, dtype=np.uint8)
                np.copyto(out[off : off + n], src)
                del src  # release the buffer before the map closes
