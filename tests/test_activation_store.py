"""The activation store: keyed permutation, exact order and resume, ranks, held-out data, memory, errors.

Synthetic caches encode the global row index in column 0 and the site index in column 1, so
every test can see which rows were served.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from shared.cache import Cache, CacheError
from tests.helpers import REPO, SITE, SITE2, build_cache, damaged_copy, rows_of, stream
from train.activation_store import ActivationStore, RowOrder
from train.permutation import derive_key, permutation, permute, splitmix64, splitmix64_int


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory):
    """7 shards of 16 rows (the last holds 4): 100 rows, contexts of 4."""
    return build_cache(tmp_path_factory.mktemp("store") / "c")


# --------------------------------------------------------------------------- permutation


def test_permutation_is_a_bijection_exhaustively():
    for n in range(0, 257):
        for key in (0, 1, derive_key(7, 3)):
            assert sorted(permutation(n, key).tolist()) == list(range(n)), (n, key)
    for n in (1000, 4097, 65537):
        p = permutation(n, 5)
        assert np.array_equal(np.sort(p), np.arange(n))
        idx = np.array([0, n // 3, n - 1])
        assert np.array_equal(permute(idx, n, 5), p[idx])  # pointwise == whole


def test_permutation_values_are_pinned():
    """Changing these changes every stored training order: bump ORDER_VERSION instead."""
    assert splitmix64_int(0) == 16294208416658607535
    assert splitmix64(np.array([0, 1], np.uint64)).tolist() == [16294208416658607535, splitmix64_int(1)]
    assert derive_key(0, 0, 0) == splitmix64_int(splitmix64_int(splitmix64_int(0)))
    assert permutation(10, derive_key(0, 0, 0)).tolist() == [1, 8, 0, 2, 6, 7, 5, 4, 9, 3]
    assert permutation(16, 7).tolist() == [13, 9, 1, 7, 14, 11, 8, 5, 6, 10, 2, 12, 3, 4, 15, 0]
    assert permute(np.array([0, 1, 2, 999_999]), 1_000_000, 42).tolist() == [340598, 759672, 169923, 178438]


def test_permutation_shuffles_well():
    n = 10_000
    p = permutation(n, derive_key(1, 2))
    assert (p == np.arange(n)).sum() < 10  # about one fixed point expected
    assert abs(np.abs(p - np.arange(n)).mean() / n - 1 / 3) < 0.02  # uniform: E|pi(i) - i| = n/3
    assert not np.array_equal(p, permutation(n, derive_key(1, 3)))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        permute(np.array([5]), 5, 0)


# --------------------------------------------------------------------------- order


@pytest.mark.parametrize("window,batch,drop_bos", [(1, 7, False), (2, 10, False), (3, 13, True), (99, 32, False)])
def test_every_row_served_once_per_epoch(cache_path, window, batch, drop_bos):
    with ActivationStore(cache_path, batch_size=batch, window_shards=window, seed=3, drop_bos=drop_bos) as store:
        n = store.rows_per_epoch
        want = [i for i in range(100) if not (drop_bos and i % 4 == 0)]
        assert n == len(want)
        served = rows_of(stream(store, math.ceil(3 * n / batch)))
        epochs = [served[e * n : (e + 1) * n] for e in range(3)]
        for ep in epochs:
            assert sorted(ep) == want
        assert epochs[0] != epochs[1] != epochs[2]
        # the served data is what row_ids() names
        ids = store.row_ids(0, len(served))
        assert (ids[:, 0] * 16 + ids[:, 1]).tolist() == served


def test_window_structure_and_global_shuffle(cache_path):
    with ActivationStore(cache_path, batch_size=16, window_shards=2, seed=1, prefetch=False) as store:
        order, cum = store.order.epoch_layout(0)
        assert sorted(order.tolist()) == list(range(7)) and cum[-1] == 100
        for w in range(store.order.n_windows):
            shards = set(store.row_ids(int(cum[w]), int(cum[w + 1] - cum[w]))[:, 0].tolist())
            assert shards == set(store.order.window(0, w).tolist())  # a window serves its own shards only
    with ActivationStore(cache_path, batch_size=100, window_shards=7, seed=1) as store:
        assert store.order.n_windows == 1
        first = rows_of(store.next_batch())
        assert len({r // 16 for r in first[:10]}) > 2  # W = all shards: rows of all shards interleave


def test_order_depends_only_on_seed_window_position(cache_path):
    a = ActivationStore(cache_path, batch_size=8, window_shards=2, seed=5)
    b = ActivationStore(cache_path, batch_size=8, window_shards=2, seed=5, prefetch=False)
    c = ActivationStore(cache_path, batch_size=8, window_shards=2, seed=6)
    sa, sb, sc = stream(a, 30), stream(b, 30), stream(c, 30)
    assert torch.equal(sa, sb) and not torch.equal(sa, sc)
    for s in (a, b, c):
        s.close()


# --------------------------------------------------------------------------- seek / resume


def test_seek_equals_uninterrupted_at_many_positions(cache_path):
    b = 12
    ref_store = ActivationStore(cache_path, batch_size=b, window_shards=2, seed=9, drop_bos=True)
    n = ref_store.rows_per_epoch
    ref = stream(ref_store, math.ceil(3 * n / b) + 2)
    positions = set(range(0, 3 * n, b))  # every batch start
    for e in range(3):  # window and epoch boundaries, and one row either side
        _, cum = ref_store.order.epoch_layout(e)
        for c in cum:
            positions |= {e * n + int(c) + d for d in (-1, 0, 1)}
    positions = sorted(p for p in positions if 0 <= p <= 3 * n - b)
    store = ActivationStore(cache_path, batch_size=b, window_shards=2, seed=9, drop_bos=True)
    for p in positions[::-1]:  # backwards: every seek is a real jump
        store.seek(p)
        got = torch.cat([store.next_batch(), store.next_batch()])
        assert torch.equal(got, ref[p : p + 2 * b]), p
        assert store.position == p + 2 * b and store.epoch == (p + 2 * b) // n
    for s in (ref_store, store):
        s.close()


def test_seek_is_arithmetic_not_replay(cache_path):
    order = RowOrder([0, 1, 2, 3, 4], [16, 16, 0, 16, 4], window_shards=2, seed=3)
    assert order.rows_per_epoch == 52 and order.n_windows == 3
    for p in range(0, 3 * 52):
        e, w, off = order.locate(p)
        _, cum = order.epoch_layout(e)
        assert e == p // 52 and cum[w] + off == p % 52 and off < cum[w + 1] - cum[w]
    with ActivationStore(cache_path, batch_size=10, window_shards=2, seed=3) as store:
        far = 10**9 * store.rows_per_epoch + 37  # epoch 10^9: only reachable without replay
        store.seek(far)
        ids = store.row_ids(far, 10)
        assert rows_of(store.next_batch()) == (ids[:, 0] * 16 + ids[:, 1]).tolist()
        assert store.epoch == 10**9 and store.position == far + 10


def test_state_dict_resume_is_exact(cache_path):
    kw = dict(batch_size=10, window_shards=3, seed=2, heldout_shards=1)
    run = ActivationStore(cache_path, **kw)
    states, batches = [], []
    for _ in range(25):  # crosses several windows and epochs (84 training rows)
        states.append(run.state_dict())
        batches.append(run.next_batch())
    for k in (0, 1, 8, 9, 17, 24):
        resumed = ActivationStore(cache_path, **kw)
        resumed.load_state_dict(json.loads(json.dumps(states[k])))  # survives a JSON checkpoint
        for j in range(k, min(k + 3, 25)):
            assert torch.equal(resumed.next_batch(), batches[j])
        resumed.close()
    run.close()


def test_state_from_another_configuration_refused(cache_path, tmp_path):
    state = ActivationStore(cache_path, batch_size=10, seed=1, prefetch=False).state_dict()
    for field, kw in [("seed", dict(seed=2)), ("window_shards", dict(window_shards=2)),
                      ("batch_size", dict(batch_size=20)), ("heldout_shards", dict(heldout_shards=1)),
                      ("drop_bos", dict(drop_bos=True))]:
        args = dict(batch_size=10, seed=1, prefetch=False) | kw
        with pytest.raises(CacheError, match=f"{field}=.*this store has {field}="):
            ActivationStore(cache_path, **args).load_state_dict(state)
    other = build_cache(tmp_path / "other", n_rows=96)
    with pytest.raises(CacheError, match="cache_id"):
        ActivationStore(other, batch_size=10, seed=1, prefetch=False).load_state_dict(state)


# --------------------------------------------------------------------------- ranks, sites, options


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_slices_union_to_the_global_batch(cache_path, world):
    b = 24
    single = stream(ActivationStore(cache_path, batch_size=b, window_shards=2, seed=4, prefetch=False), 12)
    ranks = [ActivationStore(cache_path, batch_size=b, window_shards=2, seed=4, rank=r, world_size=world) for r in range(world)]
    for k in range(12):
        parts = [s.next_batch() for s in ranks]
        assert all(p.shape == (b // world, 8) for p in parts)
        assert torch.equal(torch.cat(parts), single[k * b : (k + 1) * b])
    assert all(s.position == 12 * b for s in ranks)
    with pytest.raises(ValueError, match="world_size"):
        ActivationStore(cache_path, batch_size=10, rank=0, world_size=4)


def test_multi_site_batches_share_rows(tmp_path):
    path = build_cache(tmp_path / "c", sites=(SITE, SITE2))
    with ActivationStore(path, sites=[SITE, SITE2], batch_size=16, window_shards=2) as store:
        for _ in range(10):
            batch = store.next_batch()
            assert set(batch) == {SITE, SITE2}
            assert torch.equal(batch[SITE][:, 0], batch[SITE2][:, 0])
            assert (batch[SITE][:, 1] == 0).all() and (batch[SITE2][:, 1] == 1).all()
    with ActivationStore(path, sites=SITE2, batch_size=16, prefetch=False) as store:
        x = store.next_batch()
        assert isinstance(x, torch.Tensor) and (x[:, 1] == 1).all()


def test_normalize_scales_to_d_and_exposes_factor(cache_path):
    raw = ActivationStore(cache_path, batch_size=100, window_shards=7, prefetch=False)
    norm = ActivationStore(cache_path, batch_size=100, window_shards=7, normalize=True, prefetch=False)
    x, y = raw.next_batch(), norm.next_batch()
    factor = norm.scaling_factors[SITE]
    assert factor == pytest.approx(math.sqrt(8 / Cache.open(cache_path).stats(SITE)["mean_sq_norm"]))
    assert torch.equal(y, x * factor)
    assert y.pow(2).sum(1).mean().item() == pytest.approx(8.0, rel=1e-5)  # one epoch: E||x||^2 = d
    assert norm.describe()["scaling_factors"] == {SITE: factor}


def test_bfloat16_cache_and_output(tmp_path):
    path = build_cache(tmp_path / "c", dtype="bfloat16")
    f32 = ActivationStore(path, batch_size=20, window_shards=2, seed=1)
    bf = ActivationStore(path, batch_size=20, window_shards=2, seed=1, dtype=torch.bfloat16, normalize=True)
    for _ in range(6):
        x, y = f32.next_batch(), bf.next_batch()
        assert x.dtype == torch.float32 and y.dtype == torch.bfloat16
        assert torch.equal(x.to(torch.bfloat16).float(), x)  # values came from bf16 storage
        assert torch.equal(y, (x * bf.scaling_factors[SITE]).to(torch.bfloat16))
    assert sorted(rows_of(stream(ActivationStore(path, batch_size=100, prefetch=False), 1))) == list(range(100))


@pytest.mark.parametrize("normalize", [False, True])
def test_float16_cache_to_bfloat16(tmp_path, normalize):
    """bfloat16 output is converted through float32 in 256-row blocks: the bits of a direct rounding."""
    path = build_cache(tmp_path / "c", n_rows=1000, rps=252, dtype="float16")
    x = stream(ActivationStore(path, batch_size=600, prefetch=False), 2)
    store = ActivationStore(path, batch_size=600, dtype="bfloat16", normalize=normalize, prefetch=False)
    y = stream(store, 2)
    want = x * store.scaling_factors[SITE] if normalize else x
    assert y.dtype == torch.bfloat16 and torch.equal(y.view(torch.int16), want.to(torch.bfloat16).view(torch.int16))


def test_batches_kept_by_the_caller_are_never_overwritten(cache_path):
    """Output buffers are recycled only once nothing (tensor, view, numpy, autograd graph) holds them."""
    store = ActivationStore(cache_path, batch_size=16, window_shards=2, seed=1)
    ref = stream(ActivationStore(cache_path, batch_size=16, window_shards=2, seed=1, prefetch=False), 40)
    kept, views, arrays = [store.next_batch() for _ in range(6)], [], []
    views.append(store.next_batch()[2:5])
    arrays.append(store.next_batch().numpy())
    w = torch.ones(8, 3, requires_grad=True)
    loss = (store.next_batch() @ w).pow(2).sum()  # the graph alone keeps batch 8
    ptrs = set()
    for _ in range(30):
        x = store.next_batch()
        ptrs.add(x.data_ptr())
        del x
    assert all(torch.equal(k, ref[16 * i : 16 * (i + 1)]) for i, k in enumerate(kept))
    assert torch.equal(views[0], ref[16 * 6 + 2 : 16 * 6 + 5])
    assert np.array_equal(arrays[0], ref[16 * 7 : 16 * 8].numpy())
    loss.backward()
    x8 = ref[16 * 8 : 16 * 9]
    assert torch.allclose(w.grad, 2 * x8.T @ (x8 @ torch.ones(8, 3)))
    assert len(ptrs) <= 5  # dropped batches are recycled
    store.close()


@pytest.mark.parametrize("dtype,normalize", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)])
def test_cuda_path_converts_after_the_copy_bit_identically(tmp_path, dtype, normalize):
    """The CUDA path ships storage-dtype rows and converts on the device; exercised here on CPU."""
    path = build_cache(tmp_path / "c", dtype="float16")
    kw = dict(batch_size=20, window_shards=2, seed=2, dtype=dtype, normalize=normalize, heldout_shards=1)
    host, late = ActivationStore(path, **kw), ActivationStore(path, **kw)
    late._late = True
    for _ in range(8):
        a, b = host.next_batch(), late.next_batch()
        assert b.dtype == dtype and torch.equal(a, b)
    assert torch.equal(torch.cat(list(host.eval_batches())), torch.cat(list(late.eval_batches())))
    host.close(), late.close()


def test_max_tokens_caps_iteration(cache_path):
    store = ActivationStore(cache_path, batch_size=16, max_tokens=250)
    assert len(list(store)) == 15 and store.position == 240  # 15 full batches; epochs continue
    store.max_tokens = 272
    assert len(list(store)) == 2
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.next_batch()


def test_drop_bos_never_serves_position_zero(cache_path):
    with ActivationStore(cache_path, batch_size=25, window_shards=2, drop_bos=True) as store:
        served = rows_of(stream(store, 12))
        assert served and all(r % 4 for r in served) and store.rows_per_epoch == 75


# --------------------------------------------------------------------------- held-out data


def test_heldout_shards_never_trained_on_and_served_for_eval(cache_path):
    store = ActivationStore(cache_path, batch_size=9, window_shards=2, heldout_shards=2, drop_bos=True)
    assert store.heldout_shards == [5, 6] and store.state_dict()["heldout_shards"] == [5, 6]
    held = [i for i in range(80, 100) if i % 4]
    train = set(rows_of(stream(store, 2 * store.rows_per_epoch // 9 + 1)))
    assert train == {i for i in range(80) if i % 4}
    evals = list(store.eval_batches(batch_size=7))
    assert [len(e) for e in evals] == [7, 7, 1]
    assert rows_of(torch.cat(evals)) == held  # cache order, drop_bos applied
    store.close()
    frac = ActivationStore(cache_path, heldout_fraction=0.2, prefetch=False)  # ceil(0.2 * 7) = 2
    assert frac.heldout_shards == [5, 6] and frac.describe()["heldout_shards"] == [5, 6]
    with pytest.raises(CacheError, match="no held-out shards"):
        next(ActivationStore(cache_path, prefetch=False).eval_batches())
    with pytest.raises(CacheError, match="leaves no training shard"):
        ActivationStore(cache_path, heldout_shards=7)
    with pytest.raises(ValueError, match="not both"):
        ActivationStore(cache_path, heldout_shards=1, heldout_fraction=0.1)


# --------------------------------------------------------------------------- errors


def test_unsealed_cache_refused_unless_completed_shards_asked(tmp_path):
    path = build_cache(tmp_path / "c", shards=[0, 1, 3], seal=False)
    with pytest.raises(CacheError, match="not sealed.*allow_unsealed"):
        ActivationStore(path)
    with pytest.raises(CacheError, match="not sealed"):
        ActivationStore(Cache.open(path, allow_unsealed=True))
    with ActivationStore(path, batch_size=16, allow_unsealed=True) as store:
        assert store.train_shards == [0, 1, 3]
        assert sorted(rows_of(stream(store, 3))) == list(range(32)) + list(range(48, 64))


@pytest.mark.parametrize("how,message", [("truncate", "truncated"), ("missing", "missing"), ("flip", "checksum")])
def test_damaged_shard_named_by_the_batch_that_needs_it(cache_path, tmp_path, how, message):
    path = damaged_copy(cache_path, tmp_path / "c", 3, how)
    store = ActivationStore(path, batch_size=16, window_shards=1, seed=0)
    bad_position = int(store.order.epoch_layout(0)[0].tolist().index(3)) * 16  # shard 3's window
    store.seek(max(bad_position - 16, 0))
    if bad_position:
        store.next_batch()  # the prefetch thread meets the bad shard meanwhile
    with pytest.raises(CacheError, match=f"shard 3.*{message}"):
        store.next_batch()
    with pytest.raises(CacheError, match="shard 3"):  # and again: never zeros, never skipped
        store.next_batch()
    store.close()


def test_compressed_cache_same_order_and_checked(cache_path, tmp_path):
    path = build_cache(tmp_path / "z", compression="zstd")
    plain = stream(ActivationStore(cache_path, batch_size=16, window_shards=2, seed=8, prefetch=False), 10)
    with ActivationStore(path, batch_size=16, window_shards=2, seed=8) as store:
        assert torch.equal(stream(store, 10), plain)
    chunk = path / f"acts/{SITE}/c/2/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="shard 2 .*checksum"):
        stream(ActivationStore(path, batch_size=100, window_shards=7), 1)


def test_sae_config_mismatch_names_both_values(cache_path):
    store = ActivationStore(cache_path, prefetch=False)
    store.check_compatible(SITE, 8)
    with pytest.raises(CacheError, match="d_in=16.*d_model=8"):
        store.check_compatible(SITE, 16)
    with pytest.raises(CacheError, match=f"'blocks.5.hook_resid_post'.*{SITE}"):
        store.check_compatible("blocks.5.hook_resid_post", 8)
    with pytest.raises(CacheError, match="no site 'nope'"):
        ActivationStore(cache_path, sites="nope")


# --------------------------------------------------------------------------- memory


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, time
    import psutil, torch
    from train.activation_store import ActivationStore
    def warm_torch():  # torch's intra-op thread pool costs ~25 MB once per calling thread: not the store's
        torch.index_select(torch.ones(64, 256), 0, torch.arange(64)).mul_(2)
    warm_torch(); w = threading.Thread(target=warm_torch); w.start(); w.join()
    store = ActivationStore(sys.argv[1], batch_size=2048, window_shards=1, seed=0, window_io=sys.argv[2])
    proc, peak, done = psutil.Process(), [0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)
    base = proc.memory_info().rss
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    rows = 0
    while rows < 2 * store.rows_per_epoch:
        rows += len(store.next_batch())
        peak[0] = max(peak[0], proc.memory_info().rss)
    done.set(); t.join()
    print(json.dumps({"base": base, "peak": peak[0], "window": store.window_bytes, "rows": rows}))
    """
)


@pytest.mark.parametrize("window_io", ["map", "copy"])
def test_memory_bounded_by_window(tmp_path, window_io):
    psutil = pytest.importorskip("psutil")
    path = build_cache(tmp_path / "big", n_rows=16 * 8192, rps=8192, ctx=128, d=256)  # 128 MiB, 8 MiB shards
    cache_bytes = 16 * 8192 * 256 * 4
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(path), window_io], capture_output=True, text=True, cwd=REPO,
        # A fixed mmap threshold stops glibc from caching freed batch-sized blocks (its dynamic
        # threshold does, up to ~30 MB here): what remains is what the store itself holds.
        env={**os.environ, "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": str(2**20)}, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    growth = r["peak"] - r["base"]
    assert r["window"] == 8 * 2**20 and r["rows"] >= 2 * 16 * 8192
    assert growth < 3 * r["window"] + 12 * 2**20, growth  # two windows + one mapped shard + batches
    assert growth < cache_bytes / 3, growth
