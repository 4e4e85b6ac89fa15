"""The row mask (train.row_mask, issue 13): special token ids and high-norm outliers left out of
training, held-out evaluation and the CE splice, recorded in the run config, resumed exactly."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from shared.cache import Cache
from shared.synthetic import SITE, build_synthetic_cache, sparse_codes, synthetic_spec
from tests.helpers import build_cache, cfg_for, final_weights, rows_of, train_cli_run
from train.activation_store import ActivationStore
from train.config import cfg_from_saved
from train.row_mask import RowMask, SplicePositions, resolve_row_mask, row_norms
from train.runs import load_run_config, open_store

BOS_ID, EOS_ID = 3, 7  # what the masked cache's model record names
D, RPS, CTX, SHARDS = 16, 512, 8, 6


def _tokens(k, rows):
    return ((rows * 7919) % 11).astype(np.int32)  # ids 0..10: 3 and 7 on about 2 rows in 11


def build_masked_cache(root):
    """build_sparse_cache's layout (6 x 512 rows, d 16, contexts of 8) with token ids 0..10 and a
    model record naming BOS 3 and EOS 7."""
    spec = synthetic_spec(d_model=D, rows_per_shard=RPS, planned_rows=RPS * SHARDS, context_length=CTX,
                          model={"id": "synthetic", "bos_token_id": BOS_ID, "eos_token_id": EOS_ID},
                          dataset={"kind": "synthetic-masked"})
    return build_synthetic_cache(root, spec, sparse_codes(D, 48, seed=0), tokens=_tokens)


@pytest.fixture(scope="module")
def masked_cache(tmp_path_factory):
    return build_masked_cache(tmp_path_factory.mktemp("masked") / "cache")


MASKED = dict(arch="batchtopk", mask_norm_multiple=1.5)  # and the default mask_token_ids: BOS / EOS


@pytest.fixture(scope="module")
def masked_run(masked_cache, tmp_path_factory):
    from train.training import train_sae

    return train_sae(None, cfg_for(masked_cache, tmp_path_factory.mktemp("mruns"), **MASKED), progress=False)[1]


def naive_keep(cache, shard, drop_bos, ids, threshold, site=SITE):
    """The mask by a Python loop over the shard's rows (float64 norms)."""
    pos, tok = cache.read_vector("positions", shard), cache.read_vector("tokens", shard)
    acts = np.asarray(cache.read_acts(site, shard), dtype=np.float64)
    out = []
    for i in range(len(pos)):
        norm = math.sqrt(sum(float(v) * float(v) for v in acts[i]))
        out.append(not ((drop_bos and int(pos[i]) == 0) or int(tok[i]) in ids
                        or (threshold is not None and norm > threshold)))
    return np.array(out)


def _midway_threshold(cache, q=0.8):
    """A norm threshold halfway between two neighbouring row norms (no row lies near it)."""
    norms = np.sort(np.concatenate([np.linalg.norm(np.asarray(cache.read_acts(SITE, k), np.float64), axis=1)
                                    for k in cache.shards]))
    i = int(q * len(norms))
    return float((norms[i] + norms[i + 1]) / 2)


# --------------------------------------------------------------------------- the rule


def test_mask_equals_a_naive_loop(tmp_path):
    cache = Cache.open(build_cache(tmp_path / "c", n_rows=100, rps=16, ctx=4))  # tokens = row index, x[0] = row
    thr = _midway_threshold(cache)
    for drop_bos, ids, t in [(True, (5, 17, 42, 99), thr), (False, (0, 64), None), (True, (), thr), (False, (), None)]:
        mask = RowMask(drop_bos, ids, t, SITE if t is not None else None)
        for k in cache.shards:
            want = naive_keep(cache, k, drop_bos, ids, t)
            assert mask.shard_keep(cache, k).tolist() == want.tolist()
            assert mask.kept_index(cache, k).tolist() == np.flatnonzero(want).tolist()
            assert mask.kept_rows(cache, k) == int(want.sum())


def test_row_norms_of_bfloat16_rows_are_float32_norms():
    import ml_dtypes

    x = np.random.default_rng(0).normal(size=(70000, 4)).astype(ml_dtypes.bfloat16)  # more than one chunk
    want = np.linalg.norm(x.astype(np.float32), axis=1)
    np.testing.assert_allclose(row_norms(x).numpy(), want, rtol=1e-6)


def test_store_never_serves_masked_rows_and_holds_them_out_of_eval(tmp_path):
    cache = Cache.open(build_cache(tmp_path / "c", n_rows=100, rps=16, ctx=4))
    thr = _midway_threshold(cache, 0.7)
    mask = RowMask(True, (6, 21, 90), thr, SITE)
    with ActivationStore(cache, batch_size=5, window_shards=2, seed=3, heldout_shards=1, drop_bos=True,
                         row_mask=mask) as store:
        train = [k for k in cache.shards if k not in store.heldout_shards]
        want = sorted(k * 16 + i for k in train for i in np.flatnonzero(naive_keep(cache, k, True, mask.token_ids, thr)))
        assert store.rows_per_epoch == len(want)
        n = store.rows_per_epoch // 5
        served = rows_of(torch.cat([store.next_batch() for _ in range(n)]))  # within the first epoch
        assert len(set(served)) == len(served) == n * 5 and set(served) <= set(want)
        state = store.state_dict()
    assert state["mask_token_ids"] == [6, 21, 90] and state["mask_norm_threshold"] == thr
    thr = _midway_threshold(cache, 0.98)  # leaves the held-out shard (rows 96..99) some rows
    mask = RowMask(True, (6, 98), thr, SITE)
    with ActivationStore(cache, batch_size=5, heldout_shards=1, drop_bos=True, row_mask=mask) as store:
        held = [k * 16 + int(i) for k in store.heldout_shards
                for i in np.flatnonzero(naive_keep(cache, k, True, mask.token_ids, thr))]
        assert held == [97] and rows_of(torch.cat(list(store.eval_batches()))) == held


def test_one_epoch_serves_exactly_the_kept_rows(tmp_path):
    cache = Cache.open(build_cache(tmp_path / "c", n_rows=96, rps=16, ctx=4))  # whole shards: the epoch divides
    thr = _midway_threshold(cache, 0.6)
    mask = RowMask(True, (6, 21), thr, SITE)
    with ActivationStore(cache, batch_size=1, window_shards=3, seed=1, heldout_shards=0, drop_bos=True,
                         row_mask=mask) as store:
        want = sorted(k * 16 + i for k in cache.shards for i in np.flatnonzero(naive_keep(cache, k, True, (6, 21), thr)))
        got = rows_of(torch.cat([store.next_batch() for _ in range(store.rows_per_epoch)]))
    assert sorted(got) == want


# --------------------------------------------------------------------------- the run config


def test_the_run_config_records_the_resolved_mask(masked_cache, masked_run):
    saved = json.loads((masked_run / "config.json").read_text())
    assert saved["mask_token_ids"] == f"{BOS_ID},{EOS_ID}" and saved["mask_norm_multiple"] == 1.5
    cache = Cache.open(masked_cache)
    train = cache.shards[:-1][:8]  # heldout_shards=1
    norms = np.concatenate([np.linalg.norm(np.asarray(cache.read_acts(SITE, k), np.float64), axis=1)
                            [naive_keep(cache, k, True, (BOS_ID, EOS_ID), None)] for k in train])
    assert saved["mask_norm_threshold"] == pytest.approx(1.5 * float(np.median(norms)), rel=1e-6)
    state = json.loads(sorted((masked_run / "checkpoints").iterdir())[-1].joinpath("state.json").read_text())
    assert state["store"]["mask_token_ids"] == [BOS_ID, EOS_ID]
    assert state["store"]["mask_norm_threshold"] == saved["mask_norm_threshold"]
    # a resolved config resolves to itself; explicit ids are kept (sorted, once each)
    cfg = load_run_config(masked_run)
    assert resolve_row_mask(cfg, cache) == cfg
    explicit = resolve_row_mask(cfg_for(masked_cache, "runs", mask_token_ids="9, 2,9"), cache)
    assert RowMask.from_cfg(explicit).token_ids == (2, 9) and explicit.mask_norm_threshold is None


def test_training_and_its_heldout_figures_leave_the_masked_rows_out(masked_cache, masked_run):
    cfg = load_run_config(masked_run)
    cache = Cache.open(masked_cache)
    thr = cfg.mask_norm_threshold
    keep = {k: naive_keep(cache, k, True, (BOS_ID, EOS_ID), thr) for k in cache.shards}
    with open_store(cfg, torch.device("cpu")) as store:
        ids = store.row_ids(0, store.rows_per_epoch)
    want = sorted((k, int(i)) for k in cache.shards[:-1] for i in np.flatnonzero(keep[k]))
    assert sorted(map(tuple, ids.tolist())) == want
    done = json.loads((masked_run / "done.json").read_text())["results"]["heldout"]
    assert done["rows"] == int(keep[cache.shards[-1]].sum()) < RPS * 7 // 8
    from train.evaluation import evaluate_checkpoint

    res, _ = evaluate_checkpoint(masked_run, skip_lm=True, batches=50, out=masked_run / "e.json")
    assert res["encodings"]["threshold"]["rows"] == done["rows"]
    assert res["settings"]["row_mask"] == {"drop_bos": True, "token_ids": [BOS_ID, EOS_ID], "norm_threshold": thr,
                                           "norm_site": SITE}


def test_an_old_config_and_store_state_load_with_no_extra_mask(masked_run, tmp_path):
    saved = json.loads((masked_run / "config.json").read_text())
    for key in ("mask_token_ids", "mask_norm_multiple", "mask_norm_threshold"):
        del saved[key]
    old = cfg_from_saved(saved)
    assert old.mask_token_ids == "none" and old.mask_norm_threshold is None
    assert RowMask.from_cfg(old) == RowMask(drop_bos=True)
    cache = Cache.open(build_cache(tmp_path / "c", n_rows=100, rps=16, ctx=4))
    with ActivationStore(cache, batch_size=5, drop_bos=True) as plain:
        state = {k: v for k, v in plain.state_dict().items() if not k.startswith("mask_")}  # saved before issue 13
        plain.load_state_dict({**state, "position": 10})
        assert plain.position == 10
    with ActivationStore(cache, batch_size=5, drop_bos=True, row_mask=RowMask(True, (6,))) as masked:
        with pytest.raises(Exception, match="mask_token_ids=\\[\\] but this store has mask_token_ids=\\[6\\]"):
            masked.load_state_dict(state)


def test_kill9_and_resume_of_a_masked_run_is_bit_identical(masked_cache, masked_run, tmp_path):
    first = train_cli_run(masked_cache, tmp_path, "after_optimizer_step@17", extra=["--set", "mask_norm_multiple=1.5"])
    assert first.returncode == -signal.SIGKILL, first.stderr
    run_dir = next(tmp_path.iterdir())
    r = subprocess.run([sys.executable, "-m", "train", "resume", str(run_dir), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((run_dir / "config.json").read_text())["mask_norm_threshold"] == \
        json.loads((masked_run / "config.json").read_text())["mask_norm_threshold"]
    a, b = final_weights(run_dir), final_weights(masked_run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- the CE splice


def test_the_ce_splice_keeps_masked_positions_clean(tiny_gpt2_dir):
    from shared.hook_sites import capture, resolve_sites, splice
    from shared.models import load_model
    from train.lm_figures import lm_losses, splice_fn

    model = load_model(str(tiny_gpt2_dir)).model
    site = resolve_sites(model, [1], "resid_pre")[0]
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 12, size=(5, 9))).long()  # ids 0 and 1: BOS, EOS
    clean = capture(model, [site], ids)[site.name].float()  # [5, 9, d]
    norms = clean.norm(dim=-1)
    thr = float(norms.flatten().sort().values[30:32].mean())  # between two row norms
    mask = RowMask(True, (0, 1), thr, site.name)
    replace = lambda x: x * 0.5 + 1.0  # noqa: E731
    where = SplicePositions(mask, site)
    res = lm_losses(model, site, ids, {"masked": splice_fn(replace, where), "from1": splice_fn(replace, 1)},
                    batch_size=2, positions=where)

    keep = [[not (t == 0 or int(ids[b, t]) in (0, 1) or float(norms[b, t]) > thr) for t in range(ids.shape[1])]
            for b in range(ids.shape[0])]
    assert 0 < sum(map(sum, keep)) < ids.numel() - ids.shape[0]

    def by_hand(a):
        out = a.clone()
        for b in range(a.shape[0]):
            for t in range(a.shape[1]):
                if keep[b][t]:
                    out[b, t] = replace(a[b, t].float()).to(a.dtype)
        return out

    with torch.no_grad(), splice(model, site, by_hand):
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    want = float(-logp.gather(-1, ids[:, 1:, None]).mean())
    assert res["masked"]["ce"] == pytest.approx(want, rel=1e-6)
    assert res["masked"]["ce"] != pytest.approx(res["from1"]["ce"], rel=1e-6)  # the mask changed what was spliced


def test_a_sweep_resolves_one_mask_and_each_member_equals_its_separate_run(masked_cache, masked_run, tmp_path):
    from tests.helpers import write_sweep_spec
    from train.sweep import run_sweep

    spec = write_sweep_spec(tmp_path / "spec.toml", masked_cache, tmp_path / "runs", "k = [4, 6]", name="masked",
                            arch="batchtopk", mask_norm_multiple=1.5)
    sweep = run_sweep(spec, progress=False)
    record = json.loads((sweep / "sweep.json").read_text())["runs"]
    want = json.loads((masked_run / "config.json").read_text())
    for r in record:
        assert r["config"]["mask_token_ids"] == want["mask_token_ids"]
        assert r["config"]["mask_norm_threshold"] == want["mask_norm_threshold"]
    four = next(r for r in record if r["config"]["k"] == 4)  # masked_run's settings
    a, b = final_weights(sweep / four["run_dir"]), final_weights(masked_run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
