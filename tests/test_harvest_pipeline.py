"""The harvest's assembly of batches into shards (harvest.pipeline): rows land where their context
index says, whatever the batching; bad values stop the shard; the token thread hands errors on."""

import threading

import numpy as np
import pytest
import torch

from harvest.pipeline import AssemblyThread, ShardAssembler, background
from shared.cache import CacheError
from shared.cache_stats import shard_statistics

T, D, PER_SHARD = 4, 3, 5  # context length, d_model, contexts per shard
SITES = {"a": "layer 0 site a", "b": "layer 1 site b"}


def contexts(indices):
    """(index, tokens) per context, and the activations of each context as [T, D] per site."""
    batch = [(i, np.full(T, i, np.int32)) for i in indices]
    acts = {s: {i: torch.arange(T * D, dtype=torch.float32).reshape(T, D) + 100 * i + 10 * k
                for i in indices} for k, s in enumerate(SITES)}
    return batch, acts


def assemble(indices, batch_size, depth, dtype="float32", n_contexts=None):
    emitted = []
    asm = ShardAssembler(dtype, torch.device("cpu"), SITES, D, T, PER_SHARD * T,
                         lambda *shard: emitted.append(shard))
    asm.depth = depth  # what CUDA does: batches land `depth` submissions later
    batch, acts = contexts(indices)
    for j in range(0, len(batch), batch_size):
        part = batch[j : j + batch_size]
        asm.submit(part, {s: torch.stack([acts[s][i] for i, _ in part]) for s in SITES})
        if depth:
            assert len(emitted) <= (j + len(part)) // PER_SHARD
    asm.finish()
    return emitted, acts


@pytest.mark.parametrize("batch_size", [1, 3, 5, 7])
@pytest.mark.parametrize("depth", [0, 2])
def test_rows_land_by_context_index_whatever_the_batching(batch_size, depth):
    # shards 0, 2 and 3 wanted (shard 1 already done on resume); shard 3 is the short last one
    indices = [*range(0, 5), *range(10, 15), *range(15, 18)]
    emitted, acts = assemble(indices, batch_size, depth)
    assert [e[0] for e in emitted] == [0, 2, 3]
    for shard, got, tokens, positions in emitted:
        want = [i for i in indices if i // PER_SHARD == shard]
        for s in SITES:
            assert got[s].dtype == np.float32
            assert np.array_equal(got[s], torch.cat([acts[s][i] for i in want]).numpy())
        assert np.array_equal(tokens, np.repeat(want, T))
        assert np.array_equal(positions, np.tile(np.arange(T), len(want)))


def test_storage_dtypes():
    for dtype, np_name in (("float16", "float16"), ("bfloat16", "bfloat16")):
        emitted, acts = assemble(range(5), 2, 0, dtype=dtype)
        got = emitted[0][1]["a"]
        assert got.dtype.name == np_name
        want = torch.cat([acts["a"][i] for i in range(5)]).to(getattr(torch, dtype))
        assert np.array_equal(np.asarray(got, dtype=np.float32), want.float().numpy())


@pytest.mark.parametrize("depth", [0, 2])
@pytest.mark.parametrize("bad,match", [(float("nan"), "NaN or inf"), (1e5, "float16 overflow")])
def test_a_bad_batch_stops_before_its_shard_is_emitted(depth, bad, match):
    emitted = []
    asm = ShardAssembler("float16", torch.device("cpu"), SITES, D, T, PER_SHARD * T, lambda *s: emitted.append(s))
    asm.depth = depth
    batch, acts = contexts(range(10))
    acts["b"][7] = acts["b"][7].clone()
    acts["b"][7][2, 1] = bad
    with pytest.raises(CacheError, match=f"layer 1 site b: .*{match}"):
        for j in range(0, 10, 2):
            part = batch[j : j + 2]
            asm.submit(part, {s: torch.stack([acts[s][i] for i, _ in part]) for s in SITES})
        asm.finish()
    assert [e[0] for e in emitted] == [0]  # shard 1 holds the bad row: never emitted


def test_background_yields_in_order_and_hands_on_errors():
    assert list(background(iter(range(100)), depth=3)) == list(range(100))

    def broken():
        yield 1
        raise ValueError("corpus line 2 is not JSON")

    it = background(broken(), depth=2)
    assert next(it) == 1
    with pytest.raises(ValueError, match="line 2"):
        next(it)


def test_background_stops_its_thread_when_closed():
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    it = background(endless(), depth=2)
    assert next(it) == 0
    it.close()
    n = len(produced)
    assert n <= 5  # the thread stopped (it had at most depth + 2 items made)


def threaded(indices, batch_size, dtype="float32", emit=None, bad=None):
    """assemble() through an AssemblyThread; the launching thread never emits."""
    emitted, launcher = [], threading.get_ident()

    def record(*shard):
        assert threading.get_ident() != launcher
        emitted.append(shard)

    asm = AssemblyThread(ShardAssembler(dtype, torch.device("cpu"), SITES, D, T, PER_SHARD * T, emit or record))
    batch, acts = contexts(indices)
    if bad is not None:
        acts["b"][bad] = acts["b"][bad].clone()
        acts["b"][bad][2, 1] = float("nan")
    try:
        for j in range(0, len(batch), batch_size):
            part = batch[j : j + batch_size]
            asm.submit(part, {s: torch.stack([acts[s][i] for i, _ in part]) for s in SITES})
        asm.finish()
    finally:
        asm.close()
    assert not asm.thread.is_alive()
    return emitted, acts


@pytest.mark.parametrize("batch_size", [1, 3, 7])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_assembly_thread_emits_what_the_assembler_emits(batch_size, dtype):
    indices = [*range(0, 5), *range(10, 15), *range(15, 18)]
    got, _ = threaded(indices, batch_size, dtype)
    want, _ = assemble(indices, batch_size, 0, dtype)
    assert [e[0] for e in got] == [0, 2, 3]
    for (shard, acts, tokens, positions, stats), (w_shard, w_acts, w_tokens, w_positions) in zip(got, want, strict=True):
        assert shard == w_shard
        for s in SITES:
            assert acts[s].dtype == w_acts[s].dtype and np.array_equal(acts[s], w_acts[s])
            # what the writer would have computed, and a naive float64 reference
            assert stats[s] == shard_statistics(w_acts[s])
            x = np.asarray(w_acts[s], np.float64)
            assert stats[s].count == len(x)
            np.testing.assert_allclose(stats[s].sum, x.sum(0), rtol=1e-6)
            np.testing.assert_allclose(stats[s].sum_sq_norm, (x**2).sum(), rtol=1e-6)
            assert stats[s].max_abs == np.abs(x).max()
        assert np.array_equal(tokens, w_tokens) and np.array_equal(positions, w_positions)


def test_assembly_thread_raises_a_bad_batch_and_stops():
    emitted = []
    with pytest.raises(CacheError, match="layer 1 site b: .*NaN or inf"):
        threaded(range(15), 2, emit=lambda *s: emitted.append(s), bad=7)
    assert [e[0] for e in emitted] == [0]  # shard 1 holds the bad row; shard 2 comes after the error


def test_assembly_thread_raises_an_emit_error():
    def emit(*shard):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        threaded(range(10), 3, emit=emit)


def test_assembly_thread_close_stops_without_emitting_short_shards():
    emitted = []
    asm = AssemblyThread(ShardAssembler("float32", torch.device("cpu"), SITES, D, T, PER_SHARD * T,
                                        lambda *s: emitted.append(s)))
    batch, acts = contexts(range(7))
    asm.submit(batch, {s: torch.stack([acts[s][i] for i in range(7)]) for s in SITES})
    asm.close()
    assert not asm.thread.is_alive()
    assert [e[0] for e in emitted] == [0]  # the whole shard 0; shard 1 (2 of 5 contexts) is not emitted


@pytest.mark.parametrize("release", [True, False])
def test_recycled_buffers_are_reused_only_once_released(release):
    emitted, held = [], []

    def emit(shard, acts, tokens, positions, release=None):
        emitted.append((shard, {s: a.copy() for s, a in acts.items()}, tokens.copy(), positions.copy()))
        held.append(acts["a"])
        if release_now:
            release()

    release_now = release
    asm = ShardAssembler("float16", torch.device("cpu"), SITES, D, T, PER_SHARD * T, emit, recycle=True)
    indices = [*range(0, 5), *range(10, 15), *range(15, 18)]
    batch, acts = contexts(indices)
    for j in range(0, len(batch), 3):
        part = batch[j : j + 3]
        asm.submit(part, {s: torch.stack([acts[s][i] for i, _ in part]) for s in SITES})
    asm.finish()
    want, _ = assemble(indices, 3, 0, "float16")
    assert [e[0] for e in emitted] == [0, 2, 3]
    for (shard, got, tokens, positions), (w_shard, w_acts, w_tokens, w_positions) in zip(emitted, want, strict=True):
        assert shard == w_shard and np.array_equal(tokens, w_tokens) and np.array_equal(positions, w_positions)
        for s in SITES:
            assert np.array_equal(got[s], w_acts[s])
    # shard 2's buffer is opened (by the batch of contexts 3, 4, 10) before shard 0 is emitted: new
    # memory; shard 3 reuses shard 0's once released, and only then
    assert not np.shares_memory(held[0], held[1])
    assert np.shares_memory(held[0], held[2]) == release and not np.shares_memory(held[1], held[2])
