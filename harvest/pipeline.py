"""Keep the device busy during a harvest: tokens are packed ahead in a thread, and activations
go straight from the device into their shard's host buffer without stopping the device.

- `background(items, depth)`: iterate in a daemon thread, up to `depth` items ahead.
- `ShardAssembler`: converts a batch's activations to the storage dtype on their device and copies
  each run of rows directly into the buffer of the shard it belongs to (pinned host memory on
  CUDA, copied without blocking). A batch counts as landed only `depth` batches later (CUDA), so
  batch i+1's forward is launched while batch i is still being copied; on the CPU it lands at
  once. A shard whose rows have all landed goes to `emit`. With `recycle`, a shard's buffers are
  reused for a later shard once `emit`'s consumer calls the `release` it was handed (a fresh 75 MB
  buffer costs its page faults on the first copy, about as much as the copy; pinned ones on CUDA
  also a host allocation on the launching thread).
- `AssemblyThread`: a ShardAssembler run in a thread of its own, for the CPU, where its min/max,
  conversion and copies are real work that would otherwise hold up the launching thread. It also
  computes each shard's statistics (shared.cache_stats.shard_statistics) before handing it on,
  which takes them out of the writer thread.

Every batch's min and max travel with it, and the NaN/inf/float16-overflow check runs on them
before any of its rows can be emitted: a bad batch stops the harvest before it is stored.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, TypeVar

import numpy as np
import torch

from shared.cache_stats import shard_statistics
from shared.cache_storage import check_storage_range, storage_numpy, torch_storage_dtype

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


_FINISH = object()


class AssemblyThread:
    """`assembler` (a ShardAssembler) run in a daemon thread: `submit` only hands the batch over
    (at most `depth` batches wait), so the thread that launches the forward does none of the
    assembly. The captured activations are held until assembled (the forward that made them is
    over: nothing writes them again).

    The assembler's `emit` gets a fifth argument: {site: shard_statistics(acts[site])}, computed
    in this thread (the same function the writer would otherwise run on the same arrays).

    An error in the thread (a bad batch, a failed emit) is raised at the next `submit` or at
    `finish`; after it, the batches still queued are dropped. `close` stops the thread (after the
    batches already handed over, without emitting short shards) and raises nothing.
    """

    def __init__(self, assembler: "ShardAssembler", depth: int = 2):
        emit = assembler.emit
        assembler.emit = lambda shard, acts, tokens, positions, **kw: emit(
            shard, acts, tokens, positions, {s: shard_statistics(a) for s, a in acts.items()}, **kw)
        self.assembler = assembler
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="shard-assembly", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is not None:
                continue
            try:
                with torch.inference_mode():  # thread-local: the activations are inference tensors
                    if job is _FINISH:
                        self.assembler.finish()
                    else:
                        self.assembler.submit(*job)
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                self.error = e

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, batch: list[tuple[int, np.ndarray]], acts: dict[str, torch.Tensor]) -> None:
        """As ShardAssembler.submit, assembled in the thread."""
        self._raise()
        self.queue.put((batch, acts))

    def finish(self) -> None:
        """As ShardAssembler.finish: everything handed over is assembled and emitted when this returns."""
        self.queue.put(_FINISH)
        self.close()
        self._raise()

    def close(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()


class ShardBuffer:
    """One shard's rows while they arrive: acts[site] [rows_per_shard, d] (torch, storage dtype;
    pinned for CUDA), tokens [rows_per_shard] int32, and how many rows have landed."""

    def __init__(self, shard: int, rows: int, sites: list[str], d_model: int, dtype: torch.dtype, pin: bool,
                 reuse: "ShardBuffer | None" = None):
        self.shard = shard
        if reuse is None:
            self.acts = {s: torch.empty((rows, d_model), dtype=dtype, pin_memory=pin) for s in sites}
            self.tokens = np.empty(rows, np.int32)
        else:  # a released buffer's memory: every row is overwritten before it is emitted again
            self.acts, self.tokens = reuse.acts, reuse.tokens
        self.landed = 0
        self.end = 0  # one past the highest row written

    def contents(self, context_length: int) -> tuple[int, dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """(shard, {site: [rows, d] numpy storage dtype}, tokens, positions) of the rows written so far."""
        r = self.end
        positions = np.tile(np.arange(context_length, dtype=np.int32), r // context_length)
        return self.shard, {s: storage_numpy(a[:r]) for s, a in self.acts.items()}, self.tokens[:r], positions


@dataclass
class _InFlight:
    bounds: torch.Tensor  # [n_sites, 2] float32 min and max of each site's activations, on the host
    runs: list[tuple[ShardBuffer, int]]  # (buffer, rows) this batch fills
    done: torch.cuda.Event | None  # recorded after the copies (CUDA only)


class ShardAssembler:
    """Batches of captured activations -> full shards, handed to `emit(shard, acts, tokens, positions)`.

    Context i of the token stream is rows [(i % C) * T, (i % C + 1) * T) of shard i // C (C =
    contexts per shard, T = context length), whichever batch it arrives in. `where` names each
    site in errors (e.g. "layer 8 site blocks.8.hook_resid_pre").
    """

    def __init__(self, storage: str, device: torch.device, where: dict[str, str], d_model: int,
                 context_length: int, rows_per_shard: int, emit, depth: int = 2, recycle: bool = False):
        self.storage, self.where, self.d_model = storage, where, d_model
        self.ctx, self.rows_per_shard, self.emit = context_length, rows_per_shard, emit
        self.cuda = device.type == "cuda"
        self.depth = depth if self.cuda else 0
        self._dtype = torch_storage_dtype(storage)
        self._open: dict[int, ShardBuffer] = {}
        self.recycle = recycle
        self._released: deque[ShardBuffer] = deque()  # appended by the consumer's thread, popped here
        self._inflight: deque[_InFlight] = deque()

    def submit(self, batch: list[tuple[int, np.ndarray]], acts: dict[str, torch.Tensor]) -> None:
        """batch: (context index, tokens [T]) per context, in increasing index order; acts: {site:
        [B, T, d]} on the device, row b * T + t = token t of batch[b]."""
        flat = {s: acts[s].reshape(-1, self.d_model) for s in self.where}
        bounds = torch.stack([torch.stack(torch.aminmax(x)).float() for x in flat.values()])
        if self.cuda:
            flat = {s: x.to(self._dtype) for s, x in flat.items()}  # convert on the device, copy half the bytes
        runs = []
        for buf, src, dst, n in self._runs(batch):
            for s, x in flat.items():
                buf.acts[s][dst : dst + n].copy_(x[src : src + n], non_blocking=self.cuda)
            runs.append((buf, n))
        if self.cuda:
            host_bounds = torch.empty(bounds.shape, dtype=torch.float32, pin_memory=True)
            host_bounds.copy_(bounds, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._inflight.append(_InFlight(host_bounds, runs, done))
        else:
            self._inflight.append(_InFlight(bounds, runs, None))
        while len(self._inflight) > self.depth:
            self._land(self._inflight.popleft())

    def finish(self) -> None:
        """Land every batch; emit the shard left short by the end of the data, if any."""
        while self._inflight:
            self._land(self._inflight.popleft())
        for shard in sorted(self._open):
            self._emit(self._open.pop(shard))

    def _runs(self, batch: list[tuple[int, np.ndarray]]):
        """(buffer, first batch row, first shard row, rows) per run of consecutive contexts of one shard;
        tokens are written as the runs are found."""
        per_shard = self.rows_per_shard // self.ctx
        j = 0
        while j < len(batch):
            first = batch[j][0]
            shard = first // per_shard
            n = 1
            while (j + n < len(batch) and batch[j + n][0] == first + n and (first + n) // per_shard == shard):
                n += 1
            buf = self._open.get(shard)
            if buf is None:
                reuse = self._released.popleft() if self._released else None
                buf = self._open[shard] = ShardBuffer(shard, self.rows_per_shard, list(self.where), self.d_model,
                                                      self._dtype, self.cuda, reuse)
            dst = (first % per_shard) * self.ctx
            for m in range(n):
                buf.tokens[dst + m * self.ctx : dst + (m + 1) * self.ctx] = batch[j + m][1]
            buf.end = max(buf.end, dst + n * self.ctx)
            yield buf, j * self.ctx, dst, n * self.ctx
            j += n

    def _land(self, f: _InFlight) -> None:
        if f.done is not None:
            f.done.synchronize()
        for (low, high), s in zip(f.bounds.tolist(), self.where):
            check_storage_range(low, high, self.storage, self.where[s])
        for buf, n in f.runs:
            buf.landed += n
            if buf.landed == self.rows_per_shard:
                del self._open[buf.shard]
                self._emit(buf)

    def _emit(self, buf: ShardBuffer) -> None:
        """emit(shard, acts, tokens, positions), and with `recycle` release=: a callable (any thread)
        after which the arrays handed over are no longer read, so the buffer is reused."""
        if self.recycle:
            self.emit(*buf.contents(self.ctx), release=lambda: self._released.append(buf))
        else:
            self.emit(*buf.contents(self.ctx))
