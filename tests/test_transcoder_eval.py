"""`train eval` of transcoders and CLTs as replacements of the MLPs they cover, against references
written here by hand on the tiny GPT-2: its blocks' MLP modules swapped for modules that return the
transcoder's prediction from what the MLP was given (a CLT: every covered MLP at once, layer t from
the latents of layers <= t of the same forward), the CE and KL computed from the logits directly;
per-layer FVU, L0 and dead latents from the cache's held-out rows read directly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from shared.cache import Cache
from tests.helpers import HARVEST_CTX, cfg_for, harvest_sites
from train.cli import main as train_cli
from train.evaluation import evaluate_checkpoint
from train.runs import load_sae_checkpoint
from train.training import train_sae

LAYERS = [0, 1]
IN = [f"blocks.{l}.ln2.hook_normalized" for l in LAYERS]
OUT = [f"blocks.{l}.hook_mlp_out" for l in LAYERS]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_gpt2_dir, tiny_corpus):
    out = tmp_path_factory.mktemp("tc-eval") / "cache"
    return harvest_sites(tiny_gpt2_dir, tiny_corpus["jsonl"], out, ["mlp_in", "mlp_out"], LAYERS,
                         tokens=HARVEST_CTX * 40, shard_tokens=HARVEST_CTX * 8)


def _train(cache, out, **over):
    cfg = cfg_for(cache, out, batch_size=64, tokens=64 * 30, checkpoint_every=64 * 30, threshold_batches=2,
                  dead_tokens_threshold=10**6, **over)
    return train_sae(None, cfg, progress=False)[1]


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("tc-runs")
    return {"transcoder": _train(cache, out / "tc", arch="transcoder", out_site=OUT[1]),
            "skip_transcoder": _train(cache, out / "skip", arch="skip_transcoder", sparsity="jumprelu",
                                      threshold_init=0.05, l0_coeff=0.05),
            "clt": _train(cache, out / "clt", arch="clt", sparsity="batchtopk")}


def _predictors(run):
    """Per covered layer t, a function (rows [N, d] raw mlp_in of layer t, latents so far) -> raw mlp_out prediction."""
    sae, factors = run.sae, run.state["scaling_factors"]
    cfg = run.cfg
    ins, outs = cfg.in_site.split(","), cfg.out_site.split(",")
    s_in, s_out = [factors[s] for s in ins], [factors[s] for s in outs]
    if cfg.arch != "clt":
        def one(x, feats):
            xs = x * s_in[0]
            f = sae.encode(xs) if not getattr(sae, "needs_calibration", False) else sae.encode(xs, use_threshold=True)
            y = f @ sae.W_dec + sae.b_dec
            if hasattr(sae, "W_skip"):
                y = y + xs @ sae.W_skip.T
            return y / s_out[0]
        return {int(outs[0].split(".")[1]): one}
    L, m, d = sae.n_layers, sae.d_latent, sae.d_in
    preds = {}
    for t in range(L):
        def at(x, feats, t=t):
            feats[t] = sae.sources[t].encode(x * s_in[t], use_threshold=True)
            y = sae.b_dec[t].clone()
            for l in range(t + 1):
                y = y + feats[l] @ sae.sources[l].W_dec.view(m, L - l, d)[:, t - l]
            return y / s_out[t]
        preds[int(outs[t].split(".")[1])] = at
    return preds


class _Swapped(nn.Module):
    """An MLP module whose output at the positions `where` (bool [B, T]) is fn(its input) (or zeros)."""

    def __init__(self, mlp, fn, feats, where):
        super().__init__()
        self.mlp, self.fn, self.feats, self.where = mlp, fn, feats, where

    def forward(self, h):
        out = self.mlp(h).clone()
        seg = h[self.where]  # [N, d], row-major
        out[self.where] = torch.zeros_like(seg) if self.fn is None else self.fn(seg, self.feats)
        return out


def _masked(cache_dir, contexts):
    """Bool [B, T]: the positions the run's default mask keeps (not position 0, not the BOS / EOS
    ids the cache records), by a loop."""
    model = Cache.open(cache_dir).spec.model
    special = {model["bos_token_id"], model["eos_token_id"]}
    return torch.tensor([[t > 0 and int(c[t]) not in special for t in range(len(c))] for c in contexts])


def _reference_lm(model, preds, contexts, where, zero=False):
    """(ce clean, ce intervened, kl) with the MLPs of `preds`' layers swapped (zero: zero-ablated)."""
    blocks = model.transformer.h
    originals = {l: blocks[l].mlp for l in preds}
    with torch.no_grad():
        clean = torch.log_softmax(model(input_ids=contexts).logits[:, :-1].double(), -1)
        feats: dict = {}
        try:
            for l, fn in preds.items():
                blocks[l].mlp = _Swapped(originals[l], None if zero else fn, feats, where)
            new = torch.log_softmax(model(input_ids=contexts).logits[:, :-1].double(), -1)
        finally:
            for l, mlp in originals.items():
                blocks[l].mlp = mlp
    targets = contexts[:, 1:].unsqueeze(-1)
    ce = lambda lp: float(-lp.gather(-1, targets).mean())  # noqa: E731
    kl = float((clean.exp() * (clean - new)).sum(-1).mean())
    return ce(clean), ce(new), kl


def _reference_rows(cache_dir, run, shards):
    """Per covered layer: (fvu, l0, dead) over the held-out rows (position 0 and the rows of the cache's
    BOS / EOS ids dropped: the default mask), read from the cache."""
    cache = Cache.open(cache_dir)
    cfg, sae = run.cfg, run.sae
    factors = run.state["scaling_factors"]
    ins, outs = cfg.in_site.split(","), cfg.out_site.split(",")
    special = [cache.spec.model["bos_token_id"], cache.spec.model["eos_token_id"]]
    keep = np.concatenate([(cache.read_vector("positions", k) != 0) & ~np.isin(cache.read_vector("tokens", k), special)
                           for k in shards])
    X = [torch.from_numpy(np.concatenate([np.array(cache.read_acts(s, k)) for k in shards])[keep]).float() * factors[s]
         for s in ins]
    Y = [torch.from_numpy(np.concatenate([np.array(cache.read_acts(s, k)) for k in shards])[keep]).double() * factors[s]
         for s in outs]
    out = []
    with torch.no_grad():
        if cfg.arch == "clt":
            f = sae.encode(torch.stack(X, 1), use_threshold=True)
            y_hat = sae.decode(f)
            fs = f.view(f.shape[0], sae.n_layers, sae.d_latent)
            pairs = [(fs[:, l], y_hat[:, l]) for l in range(sae.n_layers)]
        else:
            f = sae.encode(X[0]) if not sae.needs_calibration else sae.encode(X[0], use_threshold=True)
            pairs = [(f, sae.decode(f, X[0]))]
    for (f, y_hat), y in zip(pairs, Y):
        fvu = float(((y - y_hat.double()) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
        out.append((fvu, float((f > 0).sum(1).double().mean()), int(((f > 0).sum(0) == 0).sum())))
    return out


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder", "clt"])
def test_replacement_figures_equal_the_hand_computed_reference(runs, cache, tiny_gpt2_dir, arch):
    from transformers import AutoModelForCausalLM

    results, dest = evaluate_checkpoint(runs[arch], max_contexts=8, lm_batch_size=3)
    assert dest.exists() and json.loads(dest.read_text())["kind"] == "transcoder"
    run = load_sae_checkpoint(runs[arch])
    run.sae.eval()
    primary = results["encodings"][results["primary"]]
    # per-layer reconstruction of the targets
    ref_rows = _reference_rows(cache, run, results["settings"]["heldout_shards"])
    assert len(primary["per_layer"]) == len(ref_rows)
    for got, (fvu, l0, dead) in zip(primary["per_layer"], ref_rows):
        assert got["fvu"] == pytest.approx(fvu, rel=1e-4, abs=1e-6)
        assert got["l0"] == pytest.approx(l0, rel=1e-6)
        assert got["dead"] == dead
    assert primary["l0"] == pytest.approx(sum(r[1] for r in ref_rows), rel=1e-6)
    # the LM with the covered MLPs replaced, from the same forward's MLP inputs
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    contexts = torch.from_numpy(np.concatenate([Cache.open(cache).read_vector("tokens", k).reshape(-1, HARVEST_CTX)
                                                for k in results["settings"]["heldout_shards"]])[:8].astype(np.int64))
    preds = _predictors(run)
    where = _masked(cache, contexts)
    assert 0 < int(where.sum()) < where.numel() - len(where)  # the token mask leaves out some positions
    clean, replaced, kl = _reference_lm(model, preds, contexts, where)
    _, zero, kl_zero = _reference_lm(model, preds, contexts, where, zero=True)
    lm = results["lm"]
    assert lm["contexts"] == 8 and lm["replaced_sites"] == run.cfg.out_site.split(",")
    assert lm["ce_clean"] == pytest.approx(clean, rel=1e-5)
    assert lm["ce_zero_ablation"] == pytest.approx(zero, rel=1e-5)
    assert lm["kl_zero_ablation"] == pytest.approx(kl_zero, rel=1e-4, abs=1e-6)
    assert primary["ce_replaced"] == pytest.approx(replaced, rel=1e-5)
    assert primary["kl_replaced"] == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert primary["ce_loss_score"] == pytest.approx((zero - replaced) / (zero - clean), rel=1e-4)
    assert abs(replaced - clean) > 1e-4  # the replacement changed the model (the reference is not trivially clean)


def test_cli_eval_of_a_clt_prints_per_layer_figures(runs, tmp_path):
    res = CliRunner().invoke(train_cli, ["eval", str(runs["clt"]), "--max-contexts", "4", "--out",
                                         str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    assert "CE replaced" in res.output and "blocks.1.hook_mlp_out" in res.output
    saved = json.loads((tmp_path / "e.json").read_text())
    assert set(saved["encodings"]) == {"threshold", "batch_topk"}
    assert [r["layer"] for r in saved["encodings"]["threshold"]["per_layer"]] == LAYERS
    assert saved["lm"]["replaced_sites"] == OUT
