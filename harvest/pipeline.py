"""Keep the device busy during a harvest: tokens are packed ahead in a thread, and activations
come back to the host without stopping the device.

- `background(items, depth)`: iterate in a daemon thread, up to `depth` items ahead.
- `DeviceToHost`: converts captured activations to the storage dtype on their device, starts a
  non-blocking copy into pinned host memory and hands the arrays back only once `depth` later
  batches are queued, so batch i+1's forward is launched while batch i is still being copied.
  On the CPU everything is synchronous and each batch is handed back at once.

Every batch's min and max travel with it, and the NaN/inf/float16-overflow check runs on them
before the rows are handed back: a bad batch still stops the harvest before any of it is stored.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, TypeVar

import numpy as np
import torch

from shared.cache import check_storage_range, storage_numpy, torch_storage_dtype

T = TypeVar("T")


@dataclass
class _Raised:
    error: BaseException


_DONE = object()


def background(items: Iterable[T], depth: int = 4) -> Iterator[T]:
    """Yield `items`, produced in a daemon thread up to `depth` ahead. An exception raised while
    producing is raised here; closing this generator stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for x in items:
                if not put(x):
                    return
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(_Raised(e))

    thread = threading.Thread(target=produce, name="harvest-tokens", daemon=True)
    thread.start()
    try:
        while True:
            x = q.get()
            if x is _DONE:
                return
            if isinstance(x, _Raised):
                raise x.error
            yield x
    finally:
        stop.set()
        thread.join()


@dataclass
class _InFlight:
    item: Any
    host: dict[str, torch.Tensor]  # site -> [rows, d] storage dtype, on the host
    bounds: torch.Tensor  # [n_sites, 2] float32 min and max of each site's activations
    done: torch.cuda.Event | None  # recorded after the copies (CUDA only)


class DeviceToHost:
    """Activations of a batch -> host arrays in storage dtype, `depth` batches behind on CUDA.

    `submit(item, acts)` takes {site: [B, T, d] or [rows, d] tensor} and returns the batches now
    complete as (item, {site: np.ndarray [rows, d] in storage dtype}); `drain()` returns the rest.
    `where` names each site in errors (e.g. "layer 8 site blocks.8.hook_resid_pre").
    """

    def __init__(self, storage: str, device: torch.device, where: dict[str, str], depth: int = 2):
        self.storage, self.where = storage, where
        self.cuda = device.type == "cuda"
        self.depth = depth if self.cuda else 0
        self._dtype = torch_storage_dtype(storage)
        self._queue: deque[_InFlight] = deque()

    def submit(self, item: Any, acts: dict[str, torch.Tensor]) -> list[tuple[Any, dict[str, np.ndarray]]]:
        names = list(self.where)
        flat = [acts[s].reshape(-1, acts[s].shape[-1]) for s in names]
        bounds = torch.stack([torch.stack(torch.aminmax(x)).float() if x.numel() else x.new_zeros(2, dtype=torch.float32)
                              for x in flat])
        if self.cuda:
            host = {s: torch.empty(x.shape, dtype=self._dtype, pin_memory=True) for s, x in zip(names, flat)}
            for s, x in zip(names, flat):
                host[s].copy_(x.to(self._dtype), non_blocking=True)
            host_bounds = torch.empty(bounds.shape, dtype=torch.float32, pin_memory=True)
            host_bounds.copy_(bounds, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._queue.append(_InFlight(item, host, host_bounds, done))
        else:
            self._queue.append(_InFlight(item, {s: x.to(self._dtype).cpu() for s, x in zip(names, flat)},
                                         bounds.cpu(), None))
        out = []
        while len(self._queue) > self.depth:
            out.append(self._finish(self._queue.popleft()))
        return out

    def drain(self) -> list[tuple[Any, dict[str, np.ndarray]]]:
        out = [self._finish(f) for f in self._queue]
        self._queue.clear()
        return out

    def _finish(self, f: _InFlight) -> tuple[Any, dict[str, np.ndarray]]:
        if f.done is not None:
            f.done.synchronize()
        for (low, high), s in zip(f.bounds.tolist(), self.where):
            check_storage_range(low, high, self.storage, self.where[s])
        return f.item, {s: storage_numpy(t) for s, t in f.host.items()}
