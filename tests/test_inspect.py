"""`train inspect`, the parts without a browser: the streamed per-latent statistics against a
brute-force computation (dense encode of every row, sort), the token windows against the cache, the
logit effect and nearest latents against naive products, the run loading and the site's files."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from shared.cache import Cache
from shared.synthetic import SITE, build_synthetic_cache, synthetic_spec
from train.row_mask import RowMask
from train.inspector.collect import LatentCollector, rank_in_group, sample_priority
from train.inspector.contexts import token_windows
from train.inspector.logits import find_final_norm, logit_effect, nearest_latents, norm_gain, unembedding
from train.inspector.stream import collect_stats
from train.sae import build_sae

D, M, RPS, SHARDS = 8, 24, 96, 4
CONTEXT_LENGTHS = [8, 3, 5, 8, 1, 7, 8, 2, 6, 8]  # contexts of varying length (positions restart at 0)


def _positions(n_total: int) -> np.ndarray:
    out, i = [], 0
    while len(out) < n_total:
        out.extend(range(CONTEXT_LENGTHS[i % len(CONTEXT_LENGTHS)]))
        i += 1
    return np.asarray(out[:n_total], dtype=np.int32)


POSITIONS = _positions(RPS * SHARDS)


def _dyadic(x, step, bound):
    return (np.clip(np.round(np.asarray(x) / step), -bound / step, bound / step) * step).astype(np.float32)


def _acts(k, rows):
    """Heavy-tailed rows (norms over two orders of magnitude, so histogram ranges grow while
    streaming) and, every 7th row, one shared large vector: exact ties at the top of each latent.
    Entries are multiples of 1/16 below 512 and the SAEs' weights multiples of 1/8 (see _sae), so
    every encoder product is exact in float32 whatever the batching or summation order."""
    rng = np.random.default_rng(100 + k)
    x = rng.normal(size=(len(rows), D)) * np.exp(rng.normal(size=(len(rows), 1)) * 1.2)
    x[rows % 7 == 0] = np.random.default_rng(7).normal(size=D) * 40
    return _dyadic(x, 1 / 16, 511)


def _dyadic_weights(sae):
    with torch.no_grad():
        sae.W_enc.copy_(torch.from_numpy(_dyadic(sae.W_enc.numpy() * 2, 1 / 8, 2)))
        sae.W_dec.copy_(sae.W_enc.t())
        sae.b_enc.copy_(torch.from_numpy(_dyadic(np.random.default_rng(0).normal(size=sae.d_sae), 1 / 4, 4)))
    return sae


@pytest.fixture(scope="module")
def odd_cache(tmp_path_factory):
    """4 shards of 96 rows, d 8, contexts of lengths 1..8 (positions say where each starts), token
    ids (31 * row) % 97, ties from repeated rows."""
    spec = synthetic_spec(d_model=D, rows_per_shard=RPS, planned_rows=RPS * SHARDS, context_length=8,
                          model={"id": "none"})
    root = build_synthetic_cache(tmp_path_factory.mktemp("odd") / "cache", spec, _acts,
                                 tokens=lambda k, rows: ((31 * rows) % 97).astype(np.int32),
                                 positions=lambda k, rows: POSITIONS[rows])
    return Cache.open(root)


def _sae(seed=0):
    """A vanilla SAE with latent 3 that never fires and latent 5 that is 1000 on every row (all tied)."""
    torch.manual_seed(seed)
    sae = _dyadic_weights(build_sae("vanilla", d_in=D, d_sae=M))
    with torch.no_grad():
        sae.b_enc[3] = -1e4
        sae.b_enc[5] = 1000.0
        sae.W_enc[:, 5] = 0
    return sae.eval()


def _all_rows(cache, shards, drop_bos, max_rows=None):
    """(global rows, x float32 [N, d]) in cache order: what the pass encodes. drop_bos: a bool, or a
    RowMask (applied by a loop over the rows)."""
    rows, xs = [], []
    for k in shards:
        pos = cache.read_vector("positions", k)
        if isinstance(drop_bos, RowMask):
            m, tok, acts = drop_bos, cache.read_vector("tokens", k), np.asarray(cache.read_acts(SITE, k), np.float64)
            keep = np.array([i for i in range(len(pos)) if not ((m.drop_bos and pos[i] == 0) or int(tok[i]) in m.token_ids
                             or float(np.sqrt((acts[i] ** 2).sum())) > m.norm_threshold)], dtype=np.int64)
        else:
            keep = np.flatnonzero(pos != 0) if drop_bos else np.arange(len(pos))
        rows.append(k * RPS + keep)
        xs.append(np.asarray(cache.read_acts(SITE, k))[keep].astype(np.float32))
    rows, x = np.concatenate(rows), np.concatenate(xs)
    return (rows, x) if max_rows is None else (rows[:max_rows], x[:max_rows])


def _context_span(g: int) -> tuple[int, int]:
    """[start, end) global rows of row g's context, walked row by row: positions go up by one and the
    rows stay in g's shard."""
    lo, hi = (g // RPS) * RPS, (g // RPS + 1) * RPS
    start = g
    while start > lo and POSITIONS[start - 1] == POSITIONS[start] - 1:
        start -= 1
    end = g + 1
    while end < hi and POSITIONS[end] == POSITIONS[end - 1] + 1:
        end += 1
    return start, end


def _np_priority(rows, j):
    return sample_priority(torch.as_tensor(rows, dtype=torch.long), torch.full((len(rows),), j)).numpy()


def brute_force(cache, sae, shards, scale, drop_bos, before, after, K, Q, S, NB, max_rows=None):
    """Per latent, by sorting the dense latents of every encoded row."""
    rows, x = _all_rows(cache, shards, drop_bos, max_rows)
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(x) * scale).numpy()
    where = {int(r): i for i, r in enumerate(rows)}

    def window_acts(g, j):
        start, end = _context_span(int(g))
        return np.array([f[where[t], j] if start <= t < end and t in where else np.nan
                         for t in range(g - before, g + after + 1)], dtype=np.float32)

    out = []
    for j in range(M):
        fired = np.flatnonzero(f[:, j] > 0)
        vals, rws = f[fired, j], rows[fired]
        order = np.lexsort((rws, -vals))  # activation descending, then row ascending
        rec = {"count": len(fired), "mean": float(vals.astype(np.float64).mean()) if len(fired) else 0.0,
               "top_rows": rws[order[:K]], "top_vals": vals[order[:K]],
               "top_windows": [window_acts(g, j) for g in rws[order[:K]]]}
        if len(fired):
            e = np.frexp(vals.max() / NB)[1]
            bins = np.floor(vals / 2.0**e).astype(np.int64)
            rec["exp"], rec["hist"] = e, np.bincount(bins, minlength=NB)
            band = bins // (NB // Q)
            prio = _np_priority(rws, j)
            rec["samples"] = {}
            for q in range(Q):
                sel = np.flatnonzero(band == q)
                sel = sel[np.argsort(prio[sel])][:S]
                rec["samples"][q] = (rws[sel], vals[sel], [window_acts(g, j) for g in rws[sel]])
        out.append(rec)
    return out, len(rows)


def _check(stats, ref, n_rows, K, Q, S):
    assert stats.rows_seen == n_rows
    for j, rec in enumerate(ref):
        assert stats.count[j] == rec["count"], j
        np.testing.assert_allclose(stats.mean_when_firing[j], rec["mean"], rtol=1e-6)
        n = min(K, rec["count"])
        np.testing.assert_array_equal(stats.top_rows[j, :n], rec["top_rows"], err_msg=f"latent {j}")
        assert (stats.top_rows[j, n:] == -1).all()
        np.testing.assert_array_equal(stats.top_values[j, :n], rec["top_vals"])
        for i in range(n):
            np.testing.assert_array_equal(stats.top_windows[j, i], rec["top_windows"][i])
        if not rec["count"]:
            assert stats.hist[j].sum() == 0 and (stats.sample_rows[j] == -1).all()
            assert stats.max_value[j] == 0
            continue
        assert stats.hist_exp[j] == rec["exp"], j
        np.testing.assert_array_equal(stats.hist[j], rec["hist"], err_msg=f"latent {j}")
        for q in range(Q):
            rws, vals, wins = rec["samples"][q]
            got = stats.sample_rows[j, q]
            np.testing.assert_array_equal(got[: len(rws)], rws, err_msg=f"latent {j} band {q}")
            assert (got[len(rws):] == -1).all()
            np.testing.assert_array_equal(stats.sample_values[j, q, : len(rws)], vals)
            for i in range(len(rws)):
                np.testing.assert_array_equal(stats.sample_windows[j, q, i], wins[i])


@pytest.mark.parametrize("batch_rows", [1, 13, 64, 10_000])
@pytest.mark.parametrize("drop_bos", [True, False, "row_mask"])
def test_streamed_statistics_equal_brute_force(odd_cache, batch_rows, drop_bos):
    if drop_bos == "row_mask":  # position 0, three token ids and the rows above shard 0's 90th percentile norm
        norms = np.sort(np.linalg.norm(np.asarray(odd_cache.read_acts(SITE, 0), np.float64), axis=1))
        i = int(0.9 * len(norms))
        thr = float(norms[i] + norms[i + 1]) / 2
        drop_bos = RowMask(True, (0, 31, 62), thr, SITE)
    sae = _sae()
    K, Q, S, NB, before, after = 5, 4, 2, 16, 3, 2
    stats, report = collect_stats(sae.encode, M, odd_cache, SITE, [0, 2, 3], scale=0.5, mask=drop_bos,
                                  before=before, after=after, top=K, bands=Q, per_band=S, bins=NB,
                                  batch_rows=batch_rows)
    ref, n = brute_force(odd_cache, sae, [0, 2, 3], 0.5, drop_bos, before, after, K, Q, S, NB)
    _check(stats, ref, n, K, Q, S)
    assert report.rows == n
    assert stats.count[3] == 0 and stats.count[5] == n  # never fires / fires on every row
    assert stats.top_rows[5].tolist() == _all_rows(odd_cache, [0, 2, 3], drop_bos)[0][:K].tolist()
    if isinstance(drop_bos, RowMask):  # the ids and the norm rule left rows out beyond position 0
        assert n < len(_all_rows(odd_cache, [0, 2, 3], True)[0])
    ties = (np.diff(stats.top_values, axis=1) == 0) & (stats.top_rows[:, 1:] >= 0)
    assert ties.sum() >= 10  # the repeated rows tie in the top lists: the earlier row comes first
    assert (np.diff(stats.top_rows, axis=1)[ties] > 0).all()


def test_token_budget_stops_the_pass_and_windows_show_unencoded_rows(odd_cache):
    sae = _sae(1)
    K, Q, S, NB = 4, 2, 3, 8
    stats, _ = collect_stats(sae.encode, M, odd_cache, SITE, [1, 2], scale=1.0, mask=False, before=4, after=4,
                             top=K, bands=Q, per_band=S, bins=NB, batch_rows=20, max_rows=150)
    ref, n = brute_force(odd_cache, sae, [1, 2], 1.0, False, 4, 4, K, Q, S, NB, max_rows=150)
    assert n == 150
    _check(stats, ref, n, K, Q, S)


def test_bfloat16_and_compressed_caches_stream_the_same_way(tmp_path):
    """Storage dtype bfloat16 (ml_dtypes on the host) and zstd chunks: the pass sees the stored values."""
    spec = synthetic_spec(d_model=D, rows_per_shard=RPS, planned_rows=RPS * 2, context_length=8, dtype="bfloat16",
                          compression="zstd", model={"id": "none"})
    root = build_synthetic_cache(tmp_path / "bf16", spec, _acts, positions=lambda k, rows: POSITIONS[rows])
    cache = Cache.open(root)
    sae = _sae(2)
    stats, _ = collect_stats(sae.encode, M, cache, SITE, [0, 1], scale=0.5, mask=True, before=2, after=2,
                             top=4, bands=2, per_band=2, bins=8, batch_rows=16)
    ref, n = brute_force(cache, sae, [0, 1], 0.5, True, 2, 2, 4, 2, 2, 8)
    _check(stats, ref, n, 4, 2, 2)


def test_topk_and_batchtopk_threshold_encodings(odd_cache):
    """TopK encodes per row; BatchTopK with a threshold as JumpReLU: both through the same pass."""
    torch.manual_seed(3)
    for sae in (build_sae("topk", d_in=D, d_sae=M, k=3), build_sae("batchtopk", d_in=D, d_sae=M, k=3)):
        _dyadic_weights(sae)
        if sae.arch == "batchtopk":
            sae.set_threshold(0.25)
        enc = (lambda x, s=sae: s.encode(x, use_threshold=True)) if sae.arch == "batchtopk" else sae.encode
        stats, _ = collect_stats(enc, M, odd_cache, SITE, [0, 1], scale=2.0, mask=True, before=2, after=1,
                                 top=3, bands=2, per_band=2, bins=8, batch_rows=30)

        class Wrapped:
            encode = staticmethod(enc)

        ref, n = brute_force(odd_cache, Wrapped, [0, 1], 2.0, True, 2, 1, 3, 2, 2, 8)
        _check(stats, ref, n, 3, 2, 2)


def test_collector_with_a_latent_that_grows_past_every_bin():
    """Exponent jumps larger than log2(bins) collapse the old counts into bin 0."""
    c = LatentCollector(2, 1, 0, top=2, bands=2, per_band=1, bins=4)
    window = torch.zeros(1, 1, dtype=torch.long)
    for i, v in enumerate([0.001, 0.002, 1000.0, 0.003]):
        c.update(torch.tensor([[v, 0.0]]), torch.tensor([i]), window)
    s = c.result()
    e = np.frexp(1000.0 / 4)[1]
    assert s.hist_exp[0] == e and s.hist[0].tolist() == [3, 0, 0, 1]
    assert s.count.tolist() == [4, 0] and s.top_rows[0].tolist() == [2, 3]
    assert s.sample_rows[1].tolist() == [[-1], [-1]]


def test_rank_in_group_orders_within_groups():
    groups = torch.tensor([2, 0, 2, 1, 0, 2])
    keys = torch.tensor([5, 1, 9, 4, 3, 7])
    order, rank = rank_in_group(groups, keys, descending=True)
    assert groups[order].tolist() == [0, 0, 1, 2, 2, 2]
    assert keys[order].tolist() == [3, 1, 4, 9, 7, 5]
    assert rank.tolist() == [0, 1, 0, 0, 1, 2]


def test_sample_priority_is_a_bijection_of_the_row():
    rows = torch.arange(1 << 16)
    for j in (0, 1, 12345):
        p = sample_priority(rows, torch.full_like(rows, j))
        assert len(torch.unique(p)) == len(rows) and int(p.max()) < 1 << 32 and int(p.min()) >= 0


# --------------------------------------------------------------------------- contexts


def test_token_windows_equal_the_cache_tokens_around_each_row(odd_cache):
    before, after = 4, 2
    rows = np.array([0, 1, 7, 8, 10, 95, 96, 97, 200, 383, 383, 150])
    win = token_windows(odd_cache, rows, before, after)
    assert win.rows.tolist() == sorted(set(rows.tolist()))
    all_tokens = np.concatenate([odd_cache.read_vector("tokens", k) for k in range(SHARDS)])
    for i, g in enumerate(win.rows.tolist()):
        start, end = _context_span(g)
        expect = [int(all_tokens[t]) if start <= t < end else -1 for t in range(g - before, g + after + 1)]
        assert win.tokens[i].tolist() == expect, g
        assert win.positions[i] == POSITIONS[g]


# --------------------------------------------------------------------------- logits


def test_logit_effect_equals_the_naive_product():
    torch.manual_seed(0)
    W_dec, W_U, gain = torch.randn(37, 12), torch.randn(12, 50), torch.rand(12) + 0.5
    got = logit_effect(W_dec, W_U, gain, k=6, block=8)
    full = W_dec @ (gain[:, None] * W_U)
    pv, pi = full.topk(6, dim=1)
    nv, ni = full.topk(6, dim=1, largest=False)
    assert torch.equal(got.pos_ids, pi) and torch.equal(got.neg_ids, ni)
    torch.testing.assert_close(got.pos_values, pv)
    torch.testing.assert_close(got.neg_values, nv)


def test_nearest_latents_equal_the_naive_cosines():
    torch.manual_seed(1)
    W = torch.randn(45, 6)
    ids, cos = nearest_latents(W, k=5, block=7)
    unit = W / W.norm(dim=1, keepdim=True)
    sim = unit @ unit.t()
    sim.fill_diagonal_(-2)
    v, i = sim.topk(5, dim=1)
    assert torch.equal(ids, i)
    torch.testing.assert_close(cos, v)
    assert not (ids == torch.arange(45)[:, None]).any()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_final_norm_gain_is_the_norms_elementwise_weight(loaded_models, arch):
    """RMSNorm (llama), LayerNorm (gpt2: its bias cancels) and Gemma's (1 + weight) RMSNorm."""
    model = loaded_models(arch).model
    norm = find_final_norm(model)
    assert norm is not None
    saved = norm.weight.detach().clone()
    bias = getattr(norm, "bias", None)
    saved_bias = bias.detach().clone() if bias is not None else None
    try:
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(0.5, 2.0, len(saved)))
            if bias is not None:
                bias.fill_(3.0)
        expect = norm.weight.detach() + (1 if arch == "gemma2" else 0)
        torch.testing.assert_close(norm_gain(norm, len(saved)), expect.float(), rtol=1e-4, atol=1e-4)
    finally:
        with torch.no_grad():
            norm.weight.copy_(saved)
            if bias is not None:
                bias.copy_(saved_bias)
    assert unembedding(model).shape == (model.config.hidden_size, model.config.vocab_size)
