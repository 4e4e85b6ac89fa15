"""The harvest loop: tokens (packed ahead in a thread) -> LM (stopped after the last hooked layer)
-> hooks -> shard buffers (harvest.pipeline.ShardAssembler, no device sync per batch; on the CPU
in a thread of its own) -> shard writer thread (pipelined: shard k+1 staged before k commits).

Shard k always holds contexts [k * C, (k + 1) * C) of the deterministic token stream (C contexts
per shard), so a run can resume from the ledger, and ranks can split shards (k mod R) and still
produce the same cache as one process.

`out` may be a URL (s3://, gs://, any fsspec URL): shards are staged in a local folder and
published to the store one by one (shared.remote.RemoteCacheWriter); resume works the same.
"""

from __future__ import annotations

import fcntl
import math
import os
import queue
import sys
import threading
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from shared.autocast import autocast_dtype as resolve_autocast
from shared.devices import resolve_device as resolve_any_device
from harvest.pipeline import AssemblyThread, ShardAssembler, background
from harvest.selection import select_sites
from harvest.space import plan_space
from shared.cache import Cache, CacheError, CacheSpec, CacheWriter, ShardWriter, SiteRecord
from shared.cache_writer import StagedShard
from shared.hook_sites import MLP_IO_KINDS, capture
from shared.models import check_context_length, load_model
from shared.remote import RemoteCacheWriter, is_remote
from shared.tokens import DatasetError, load_documents, pack_contexts, policy_record


@dataclass
class HarvestConfig:
    """Settings of one harvest. Fields marked (identity) must match when resuming a cache."""

    model: str  # hub id, local HF folder or .gguf file (identity)
    dataset: str  # hub id or local .txt/.jsonl/.parquet (identity)
    out: str  # a folder, or a URL (s3://bucket/path, gs://..., any fsspec URL)
    layers: list[int] | str = field(default_factory=lambda: [8])  # indices, or "all" (identity)
    site: str | Sequence[str] = "resid_pre"  # one site kind, or several: each at every layer (identity)
    tokens: int = 1_000_000  # budget, rounded up to whole contexts (identity)
    context_length: int = 128  # (identity)
    batch_size: int | None = None  # contexts per forward pass; None: default_batch_size(device)
    dtype: str = "float16"  # storage dtype (identity)
    text_column: str = "text"
    split: str = "train"
    device: str = "auto"
    shard_tokens: int = 65_536  # rows per shard, rounded up to whole contexts (identity)
    compression: str = "none"  # (identity)
    bos: str = "context"  # (identity)
    autocast: str = "auto"  # compute dtype, shared.autocast: none | bf16 | auto (bf16 on CUDA) (identity)
    rank: int = 0
    world_size: int = 1
    staging: str | None = None  # local staging folder when out is a URL (default: one per URL under ~/.cache)
    space_check: bool = True  # refuse to start when the file system of `out` cannot hold what is left to write


def resolve_device(device: str) -> torch.device:
    return resolve_any_device(device, "--device")


def default_batch_size(device: torch.device, context_length: int) -> int:
    """Contexts per forward pass when none is given: 8 on the CPU (enough to fill its matrix
    products); on a GPU 8192 tokens' worth, where small batches leave it waiting on kernel
    launches (SmolLM2-135M on an H100: 4096 tokens per batch ran at 0.4M tokens/s, 16384 at 1.6M)."""
    return 8 if device.type == "cpu" else max(1, 8192 // context_length)


def autocast_dtype(cfg: HarvestConfig, device: torch.device) -> torch.dtype | None:
    """The LM's autocast dtype (shared.autocast; auto = bfloat16 on CUDA, none on the CPU)."""
    return resolve_autocast(cfg.autocast, torch.bfloat16 if device.type == "cuda" else None)


def build_spec(cfg: HarvestConfig, info, sites, documents, tokenizer, compute: torch.dtype | None) -> CacheSpec:
    """The cache identity of this harvest."""
    ctx = cfg.context_length
    planned_rows = math.ceil(cfg.tokens / ctx) * ctx
    rows_per_shard = min(math.ceil(cfg.shard_tokens / ctx) * ctx, planned_rows)
    model = info.to_dict()
    model["compute_dtype"] = str(compute).replace("torch.", "") if compute else "float32"
    return CacheSpec(
        model=model,
        dataset=documents.identity,
        context_length=ctx,
        bos_policy=policy_record(tokenizer, cfg.bos),
        sites=[SiteRecord(s.name, s.layer, s.kind, s.hf_module, s.io if s.kind in MLP_IO_KINDS else None) for s in sites],
        d_model=info.d_model,
        dtype=cfg.dtype,
        rows_per_shard=rows_per_shard,
        planned_rows=planned_rows,
        compression=cfg.compression,
    )


@contextmanager
def writer_lock(root: Path, rank: int) -> Iterator[None]:
    """One writer per (cache, rank): a second harvest on the same cache is refused, not interleaved."""
    path = root / f".writer-rank{rank}.lock"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(
                f"another harvest process (rank {rank}) is already writing {root}; wait for it or "
                "use torchrun to split shards across processes"
            ) from None
        yield
    finally:
        os.close(fd)


class ShardWriterThread:
    """Writes finished shards in the background so disk I/O overlaps the model's compute.

    Pipelined: shard k+1 is staged (files written, fsyncs started, statistics and checksums
    computed: `ShardWriter.stage_shard`) before shard k is committed (its fsyncs waited for, its
    record written), so one shard's fsyncs overlap the next one's writing. Records are written in
    submission order, each only after its own files are durable. When no shard is waiting, the
    staged one is committed at once rather than held.

    The queue holds at most `depth` shards; an error in the thread is re-raised on the caller's
    next `submit` or at `close`. A shard staged before an error is still committed.
    """

    def __init__(self, writer: ShardWriter, depth: int = 2):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self._staged: StagedShard | None = None
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                self._guard(self._commit_staged)  # nothing to overlap its fsyncs with
                item = self.queue.get()
            if item is None:
                break
            *args, release = item
            try:
                if self.error is None:
                    self._guard(lambda: self._stage(args))
            finally:
                if release is not None:
                    release()  # staged (or skipped): its arrays are not read again
        self._guard(self._commit_staged)

    def _guard(self, step: Callable[[], None]) -> None:
        try:
            step()
        except BaseException as e:  # surfaced in the main thread
            if self.error is None:
                self.error = e

    def _stage(self, item) -> None:
        try:
            staged = self.writer.stage_shard(*item)
        finally:  # shard k-1 is committed after shard k is staged, or failed to be
            self._commit_staged()
        self._staged = staged

    def _commit_staged(self) -> None:
        staged, self._staged = self._staged, None
        if staged is not None and self.error is None:
            staged.commit()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, shard: int, acts, tokens, positions, stats=None, release: Callable[[], None] | None = None) -> None:
        """ShardWriter.write_shard's arguments; written in the thread. release: called (in the thread)
        once the arrays are no longer read: after the shard is staged, or skipped after an error."""
        self._raise()
        self.queue.put((shard, acts, tokens, positions, stats, release))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise()


def _batches(contexts: Iterator[tuple[int, np.ndarray]], size: int) -> Iterator[list[tuple[int, np.ndarray]]]:
    batch = []
    for item in contexts:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_harvest(cfg: HarvestConfig, progress: bool = True, barrier=None,
                log: Callable[[str], None] | None = None) -> Path | str:
    """Harvest (or resume) a cache; returns its path (or URL). `barrier` synchronises ranks when
    distributed. Before writing, rank 0 reports the size still to write through `log` (default:
    stderr when `progress`, else nothing); CacheError if the disk cannot hold it (cfg.space_check)."""
    if log is None:
        log = _stderr if progress else lambda message: None
    device = resolve_device(cfg.device)
    compute = autocast_dtype(cfg, device)
    loaded = load_model(cfg.model, device=str(device))
    model, tokenizer, info = loaded.model, loaded.tokenizer, loaded.info
    check_context_length(model, info.id, cfg.context_length)  # before anything is written
    sites = select_sites(model, cfg.layers, cfg.site)
    documents = load_documents(cfg.dataset, split=cfg.split, text_column=cfg.text_column)
    spec = build_spec(cfg, info, sites, documents, tokenizer, compute)
    _check_corpus_fills_a_context(cfg, documents, tokenizer)
    space = plan_space(cfg.out, spec, check=cfg.space_check)  # before anything is created
    if space and cfg.rank == 0:
        log(space)

    open_writer: Callable[[], ShardWriter]  # CacheWriter for a folder, RemoteCacheWriter for a URL
    if is_remote(cfg.out):
        # The staging folder is locked before the store's state is pulled into it.
        out, staging = cfg.out, RemoteCacheWriter.claim_staging(cfg.out, cfg.staging)
        open_lock = writer_lock(staging, cfg.rank)
        open_writer = lambda: RemoteCacheWriter.create_or_open(cfg.out, spec, staging, rank=cfg.rank)  # noqa: E731
    else:
        out, open_lock = Path(cfg.out), nullcontext()
        open_writer = lambda: CacheWriter.create_or_open(out, spec)  # noqa: E731

    with open_lock:
        if cfg.rank == 0:
            writer = open_writer()
        if barrier:
            barrier()
        if cfg.rank != 0:
            writer = open_writer()
        if writer.layout.seal.exists():
            return out
        # a local cache is locked once it exists
        with nullcontext() if is_remote(cfg.out) else writer_lock(out, cfg.rank):
            n_data_shards = _harvest_shards(cfg, writer.spec, writer, model, tokenizer, documents, sites, device, compute, progress)
            if barrier:
                barrier()
            if cfg.rank == 0:
                writer.seal(n_data_shards)
    return out


def _check_corpus_fills_a_context(cfg: HarvestConfig, documents, tokenizer) -> None:
    """Fail before anything is written if the corpus cannot fill one context."""
    try:
        next(iter(pack_contexts(documents, tokenizer, cfg.context_length, cfg.bos)))
    except DatasetError as e:
        raise DatasetError(f"{cfg.dataset}: {e}") from None


def _harvest_shards(cfg, spec, writer: ShardWriter, model, tokenizer, documents, sites, device, compute, progress) -> int:
    """Write this rank's pending shards; returns how many shards the data fills."""
    ctx = spec.context_length
    per_shard = spec.rows_per_shard // ctx
    planned_contexts = spec.planned_rows // ctx
    done = writer.done_shards()
    mine = [k for k in range(spec.n_shards) if k % cfg.world_size == cfg.rank and k not in done]
    pending = set(mine)
    bar = tqdm(
        total=sum(np.subtract(*writer.shard_bounds(k)[::-1]) for k in mine),
        unit="tok",
        unit_scale=True,
        disable=not progress,
        desc=f"harvest rank {cfg.rank}" if cfg.world_size > 1 else "harvest",
    )
    writer_thread = ShardWriterThread(writer)
    where = {s.name: f"layer {s.layer} site {s.name}" for s in sites}
    assembler = ShardAssembler(spec.dtype, device, where, spec.d_model, ctx, spec.rows_per_shard, writer_thread.submit,
                               recycle=True)
    # On CUDA the assembler only queues copies; on the CPU it does the copying: in its own thread.
    assembly = nullcontext(assembler) if device.type == "cuda" else closing(AssemblyThread(assembler))
    n_contexts = 0

    def wanted() -> Iterator[tuple[int, np.ndarray]]:
        nonlocal n_contexts
        for i, tokens in enumerate(pack_contexts(documents, tokenizer, ctx, cfg.bos)):
            if i >= planned_contexts:
                break
            n_contexts = i + 1
            if i // per_shard in pending:
                yield i, tokens

    def token_batches() -> Iterator[tuple[list[tuple[int, np.ndarray]], torch.Tensor]]:
        """(contexts, input ids [B, T] int64, pinned for CUDA): made in a thread, ahead of the forward."""
        for batch in _batches(wanted(), cfg.batch_size or default_batch_size(device, ctx)):
            ids = torch.from_numpy(np.stack([t for _, t in batch]).astype(np.int64))
            yield batch, ids.pin_memory() if device.type == "cuda" else ids

    autocast = torch.autocast(device.type, dtype=compute) if compute else nullcontext()
    try:
        with assembly as assembler, closing(background(token_batches(), depth=4)) as batches:
            for batch, ids in batches:
                with torch.inference_mode():
                    with autocast:
                        captured = capture(model, sites, ids.to(device, non_blocking=True))
                    assembler.submit(batch, captured)
                bar.update(len(batch) * ctx)
            assembler.finish()
    finally:
        writer_thread.close()
        bar.close()
    return math.ceil(n_contexts / per_shard)


def cache_summary(path: str | os.PathLike) -> dict:
    """Facts for `harvest info`: model, sites, rows, shards done of planned, dtype, bytes on disk (or on the store)."""
    cache = Cache.open(path, allow_unsealed=True)
    spec = cache.spec
    return {
        "path": str(path) if is_remote(path) else str(Path(path).resolve()),
        "model": spec.model.get("id"),
        "architecture": spec.model.get("architecture"),
        "sites": spec.site_names,
        "d_model": spec.d_model,
        "dtype": spec.dtype,
        "compression": spec.compression,
        "context_length": spec.context_length,
        "dataset": spec.dataset.get("id") or spec.dataset.get("path"),
        "rows": cache.n_rows,
        "planned_rows": spec.planned_rows,
        "shards_done": len(cache.ledger),
        "shards_planned": cache.seal.n_shards if cache.sealed else spec.n_shards,
        "sealed": cache.sealed,
        "bytes_on_disk": cache.disk_bytes(),
        "mean_sq_norm": {s: cache.stats(s).mean_sq_norm for s in spec.site_names} if cache.ledger else {},
    }
