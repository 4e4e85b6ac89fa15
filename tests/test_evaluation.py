"""`train eval`: reconstruction and LM figures on held-out data of a tiny offline harvest.

The LM is the tiny GPT-2 of conftest, trained for a few seconds on the tiny corpus so that its
clean loss is well below the loss with the hooked site ablated.
"""

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from harvest.runner import HarvestConfig, run_harvest
from shared.cache import Cache
from shared.hook_sites import capture, resolve_sites
from shared.models import load_model
from train.checkpoints import create_run_dir, latest_checkpoint, save_checkpoint
from train.cli import main as train_cli
from train.config import get_default_cfg, update_cfg
from train.evaluation import (
    DENSE_THRESHOLD,
    Encoding,
    ce_loss_score,
    evaluate_checkpoint,
    format_table,
    heldout_contexts,
    lm_losses,
    log_to_wandb,
    reconstruct_raw,
    splice_fn,
)
from train.training import build_from_cfg, load_run_config, open_store, train_sae

CTX = 16
SITE = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def trained_lm_dir(tmp_path_factory, tiny_gpt2_dir, tiny_corpus):
    """The tiny GPT-2, trained briefly on the corpus (clean CE well below ablated CE)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shared.tokens import load_documents, pack_contexts

    out = tmp_path_factory.mktemp("lm")
    shutil.copytree(tiny_gpt2_dir, out, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    data = torch.from_numpy(np.stack(list(pack_contexts(load_documents(str(tiny_corpus["txt"])), tok, CTX, "context")))).long()
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, much faster on a busy machine
    try:
        for _ in range(80):
            ids = data[torch.randint(0, len(data), (32,))]
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, trained_lm_dir, tiny_corpus):
    out = tmp_path_factory.mktemp("cache") / "c"
    cfg = HarvestConfig(model=str(trained_lm_dir), dataset=str(tiny_corpus["jsonl"]), out=str(out), layers=[1],
                        tokens=CTX * 40, context_length=CTX, batch_size=8, dtype="float32", shard_tokens=CTX * 8,
                        device="cpu")
    run_harvest(cfg, progress=False)
    return out


def _cfg(store, out, **over):
    base = dict(store=str(store), out=str(out), batch_size=64, tokens=64 * 40, expansion=4, k=6, lr=3e-3,
                checkpoint_every=64 * 20, log_every=10, density_every=20, wandb_mode="disabled", device="cpu",
                dead_tokens_threshold=1000, threshold_batches=2, b_dec_init="mean",
                mask_token_ids="none")  # position 0 only (drop_bos): the row counts below; masks: test_row_mask.py
    base.update(over)
    return update_cfg(get_default_cfg(), **base)


@pytest.fixture(scope="module")
def topk_run(cache_dir, tmp_path_factory):
    return train_sae(None, _cfg(cache_dir, tmp_path_factory.mktemp("runs"), arch="topk"), progress=False)[1]


@pytest.fixture(scope="module")
def batchtopk_run(cache_dir, tmp_path_factory):
    return train_sae(None, _cfg(cache_dir, tmp_path_factory.mktemp("runs"), arch="batchtopk"), progress=False)[1]


@pytest.fixture(scope="module")
def lm(trained_lm_dir):
    loaded = load_model(str(trained_lm_dir))
    return loaded.model, resolve_sites(loaded.model, [1], "resid_pre")[0]


# --------------------------------------------------------------------------- pure pieces


def test_ce_loss_score_formula():
    assert ce_loss_score(2.0, 2.5, 4.0) == pytest.approx(0.75)
    assert ce_loss_score(2.0, 2.0, 4.0) == 1.0
    assert ce_loss_score(2.0, 4.0, 4.0) == 0.0
    assert ce_loss_score(2.0, 5.0, 4.0) < 0


def test_splice_keeps_position_zero_clean():
    a = torch.randn(3, 5, 4)
    out = splice_fn(lambda x: torch.zeros_like(x) + 7, 1)(a)
    assert torch.equal(out[:, 0], a[:, 0]) and bool((out[:, 1:] == 7).all())
    assert bool((splice_fn(lambda x: x * 0, 0)(a) == 0).all())
    a16 = a.to(torch.bfloat16)  # the SAE computes in float32, the result goes back in the LM's dtype
    assert splice_fn(lambda x: x, 1)(a16).dtype == torch.bfloat16


def test_heldout_contexts_are_the_harvested_ones(cache_dir, lm):
    cache = Cache.open(cache_dir)
    last = cache.shards[-1]
    ids = heldout_contexts(cache, [last], None)
    assert ids.shape == (cache.shard_rows(last) // CTX, CTX)
    assert bool((ids[:, 0] == cache.spec.bos_policy["context_start_token_id"]).all())  # BOS at position 0
    model, site = lm
    acts = capture(model, [site], ids)[SITE]
    np.testing.assert_allclose(acts.reshape(-1, acts.shape[-1]).numpy(), cache.read_acts(SITE, last), rtol=1e-5, atol=1e-5)
    assert heldout_contexts(cache, [last], 3).shape == (3, CTX)


def test_identity_splice_equals_clean_and_ablations_hurt(cache_dir, lm):
    model, site = lm
    cache = Cache.open(cache_dir)
    ids = heldout_contexts(cache, [cache.shards[-1]], 8)
    mean = torch.tensor(cache.stats(SITE)["mean"])
    res = lm_losses(model, site, ids, {
        "identity": splice_fn(lambda x: x, 1),
        "zero": splice_fn(torch.zeros_like, 1),
        "mean": splice_fn(lambda x: mean.expand_as(x), 1),
        "zero_all": splice_fn(torch.zeros_like, 0),
    }, batch_size=3)
    assert res["predictions"] == 8 * (CTX - 1)
    assert res["identity"]["ce"] == pytest.approx(res["clean"]["ce"], abs=1e-6)
    assert abs(res["identity"]["kl"]) < 1e-7
    assert res["zero"]["ce"] > res["clean"]["ce"] + 0.3, res
    assert res["mean"]["ce"] > res["clean"]["ce"] + 0.3, res
    assert res["zero"]["kl"] > 0.1 and res["mean"]["kl"] > 0.1
    assert res["zero_all"]["ce"] != res["zero"]["ce"]  # position 0 matters when it is spliced
    # the CE is the mean NLL of all next-token predictions
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    want = float(-logp.gather(-1, ids[:, 1:, None]).mean())
    assert res["clean"]["ce"] == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- end to end


def _perfect_run(topk_run, tmp_path):
    """A vanilla SAE with W_enc = [I, -I], W_dec = [I; -I]: relu(x) - relu(-x) = x exactly."""
    ckpt_state = latest_checkpoint(topk_run)[4]
    cfg = load_run_config(topk_run)
    d = cfg.d_in
    cfg = update_cfg(cfg, arch="vanilla", dict_size=2 * d, run_name="perfect", out=str(tmp_path))
    run_dir = create_run_dir(tmp_path, "perfect")
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    sae = build_from_cfg(cfg, torch.device("cpu"))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    save_checkpoint(run_dir, 1, sae.state_dict(), {}, {"tokens": 0, "store": ckpt_state["store"]}, keep=1)
    return run_dir


def test_perfect_sae_scores_one(topk_run, cache_dir, lm, tmp_path):
    run_dir = _perfect_run(topk_run, tmp_path)
    res, dest = evaluate_checkpoint(run_dir, max_contexts=8, lm_batch_size=4, batches=4)
    # the ablations are the cache's held-out contexts with positions 1.. zeroed / set to the cache mean
    cache = Cache.open(cache_dir)
    mean = torch.tensor(cache.stats(SITE)["mean"])
    direct = lm_losses(*lm, heldout_contexts(cache, [cache.shards[-1]], 8),
                       {"zero": splice_fn(torch.zeros_like, 1), "mean": splice_fn(lambda x: mean.expand_as(x), 1)})
    assert res["lm"]["ce_clean"] == pytest.approx(direct["clean"]["ce"], rel=1e-6)
    assert res["lm"]["ce_zero_ablation"] == pytest.approx(direct["zero"]["ce"], rel=1e-6)
    assert res["lm"]["ce_mean_ablation"] == pytest.approx(direct["mean"]["ce"], rel=1e-6)
    assert dest == run_dir / "eval.json" and dest.exists()
    r = res["encodings"]["inference"]
    lm = res["lm"]
    assert r["explained_variance"] == pytest.approx(1.0, abs=1e-6) and r["cosine_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert r["ce_spliced"] == pytest.approx(lm["ce_clean"], abs=1e-5)
    assert r["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert abs(r["ce_degradation"]) < 1e-5 and 0 <= r["kl_spliced"] < 1e-6
    assert lm["ce_zero_ablation"] > lm["ce_clean"] + 0.3
    assert lm["config_hash_matches"] and lm["tokenizer_hash_matches"]


def test_eval_cli_topk(topk_run):
    r = CliRunner().invoke(train_cli, ["eval", str(topk_run), "--max-contexts", "6", "--lm-batch-size", "4",
                                       "--batches", "4"])
    assert r.exit_code == 0, r.output
    dest = Path(r.stdout.strip().splitlines()[-1])
    assert dest == topk_run / "eval.json"
    assert "CE-loss score" in r.stderr and "explained variance" in r.stderr and "[inference]" in r.stderr
    res = json.loads(dest.read_text())
    assert res["primary"] == "inference" and list(res["encodings"]) == ["inference"]
    r0, lm = res["encodings"]["inference"], res["lm"]
    # reconstruction figures: all 4 * 64 >= held-out rows, so they match training's own held-out evaluation
    done = json.loads((topk_run / "done.json").read_text())["results"]["heldout"]
    assert r0["rows"] == done["rows"] == 8 * (CTX - 1)
    assert r0["mse"] == pytest.approx(done["mse"], rel=1e-6) and r0["l0"] == pytest.approx(done["l0"])
    assert r0["explained_variance"] == pytest.approx(done["explained_variance"], rel=1e-6)
    assert r0["mse_raw"] == pytest.approx(r0["mse"] / res["scaling_factor"] ** 2)
    assert r0["dead"] == done["never_fired"] and sum(r0["density_hist"]["counts"]) == res["d_sae"]
    assert 0 < r0["l0"] <= 6 and r0["l1"] > 0 and 0 < r0["cosine_similarity"] <= 1
    assert 0 <= r0["dense"] <= res["d_sae"] and res["settings"]["dense_threshold"] == DENSE_THRESHOLD
    # LM figures
    assert lm["contexts"] == 6 and lm["predictions"] == 6 * (CTX - 1)
    assert lm["ce_zero_ablation"] > lm["ce_clean"] and lm["ce_mean_ablation"] > lm["ce_clean"]
    assert r0["ce_loss_score"] == pytest.approx((lm["ce_zero_ablation"] - r0["ce_spliced"]) /
                                                (lm["ce_zero_ablation"] - lm["ce_clean"]))
    assert r0["ce_degradation"] == pytest.approx(r0["ce_spliced"] - lm["ce_clean"])
    assert r0["kl_spliced"] >= 0 and r0["ce_spliced"] > lm["ce_clean"] - 0.05
    assert res["settings"]["spliced_positions"].startswith("1..T-1")


def test_eval_batchtopk_reports_both_encodings(batchtopk_run, tmp_path):
    out = tmp_path / "e.json"
    res, dest = evaluate_checkpoint(batchtopk_run, max_contexts=4, lm_batch_size=4, batches=4, out=out)
    assert dest == out
    assert list(res["encodings"]) == ["threshold", "batch_topk"] and res["primary"] == "threshold"
    thr, btk = res["encodings"]["threshold"], res["encodings"]["batch_topk"]
    assert "calibrated global threshold" in thr["label"] and "batch top-k" in btk["label"]
    assert btk["l0"] == pytest.approx(6, abs=1e-6)  # exactly k per token on average over each batch
    assert thr["l0"] != btk["l0"] and "ce_loss_score" in thr and "ce_loss_score" in btk
    assert btk["lm_batch_tokens"] == 4 * (CTX - 1)
    table = format_table(res)
    assert "threshold" in table and "batch_topk" in table


def test_skip_lm_and_errors(topk_run, tmp_path):
    res, _ = evaluate_checkpoint(topk_run, skip_lm=True, batches=1, out=tmp_path / "x.json")
    assert res["lm"] == {"skipped": "--skip-lm"} and "ce_spliced" not in res["encodings"]["inference"]
    assert "skipped" in format_table(res)
    r = CliRunner().invoke(train_cli, ["eval", str(topk_run), "--model", str(tmp_path / "no-model"),
                                       "--out", str(tmp_path / "y.json")])
    assert r.exit_code == 2 and "no-model" in r.stderr and "Traceback" not in r.output
    r = CliRunner().invoke(train_cli, ["eval", str(tmp_path)])
    assert r.exit_code == 2 and "neither a run folder" in r.stderr


def test_reconstruct_raw_undoes_the_scaling(topk_run):
    cfg = load_run_config(topk_run)
    _, _, tensors, _, _ = latest_checkpoint(topk_run)
    sae = build_from_cfg(cfg, torch.device("cpu"))
    sae.load_state_dict(tensors)
    store = open_store(cfg, torch.device("cpu"))
    try:
        s = store.scaling_factors[SITE]
        x = next(iter(store.eval_batches()))  # normalised rows
        enc = Encoding("inference", "", None)
        torch.testing.assert_close(reconstruct_raw(sae, x / s, s, enc), sae.decode(sae.encode(x)) / s)
    finally:
        store.close()


def test_wandb_gets_the_figures(topk_run, monkeypatch, tmp_path):
    calls = {}

    class FakeRun:
        summary = {}

        def log(self, payload):
            calls["log"] = payload

        def finish(self):
            calls["finished"] = True

    fake = types.SimpleNamespace(init=lambda **kw: calls.setdefault("init", kw) and FakeRun(),
                                 Histogram=lambda np_histogram: ("hist", np_histogram))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    res, _ = evaluate_checkpoint(topk_run, max_contexts=2, batches=1, out=tmp_path / "e.json", wandb_mode="offline")
    assert calls["init"]["mode"] == "offline" and calls["init"]["dir"] == str(topk_run) and calls["finished"]
    log = calls["log"]
    assert log["eval/inference/ce_loss_score"] == res["encodings"]["inference"]["ce_loss_score"]
    assert log["eval/lm/ce_clean"] == res["lm"]["ce_clean"] and log["eval/inference/density_hist"][0] == "hist"
    calls.clear()
    assert log_to_wandb(topk_run, load_run_config(topk_run), res, "disabled") is False and not calls


# --------------------------------------------------------------------------- SAEBench's core layout

SAEBENCH_GROUPS = {  # SAEBench sae_bench/evals/core/eval_output.py: the metric categories and their fields
    "model_behavior_preservation": {"kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"},
    "model_performance_preservation": {"ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae", "ce_loss_without_sae"},
    "reconstruction_quality": {"explained_variance", "mse", "cossim"},
    "shrinkage": {"l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"},
    "sparsity": {"l0", "l1"},
    "token_stats": {"total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"},
    "misc_metrics": {"freq_over_1_percent", "freq_over_10_percent", "normalized_freq_over_1_percent",
                     "normalized_freq_over_10_percent", "average_max_encoder_cosine_sim",
                     "average_max_decoder_cosine_sim", "frac_alive"},
}
SAEBENCH_TOP = {"eval_type_id", "eval_config", "eval_id", "datetime_epoch_millis", "eval_result_metrics",
                "eval_result_details", "sae_bench_commit_hash", "sae_lens_id", "sae_lens_release_id",
                "sae_lens_version", "sae_cfg_dict", "eval_result_unstructured"}
SAEBENCH_CONFIG = {"model_name", "llm_dtype", "batch_size_prompts", "n_eval_reconstruction_batches",
                   "n_eval_sparsity_variance_batches", "dataset", "context_size", "compute_kl", "compute_ce_loss",
                   "compute_l2_norms", "compute_sparsity_metrics", "compute_variance_metrics",
                   "compute_featurewise_density_statistics", "compute_featurewise_weight_based_metrics",
                   "exclude_special_tokens_from_reconstruction", "verbose"}
SAEBENCH_DETAIL = {"index", "feature_density", "consistent_activation_heuristic", "encoder_bias", "encoder_norm",
                   "encoder_decoder_cosine_sim", "max_decoder_cosine_sim", "max_encoder_cosine_sim"}


def _max_other_cos(v):
    v = torch.nn.functional.normalize(v.double(), dim=-1)
    sims = v @ v.T
    sims.fill_diagonal_(-2.0)
    return sims.max(1).values


def test_saebench_core_layout_and_figures(topk_run, tmp_path):
    from safetensors.torch import load_file

    from train.export import export_checkpoint

    res, dest = evaluate_checkpoint(topk_run, max_contexts=6, lm_batch_size=4, batches=4, out=tmp_path / "e.json")
    bench = json.loads((tmp_path / "saebench_core.json").read_text())
    assert set(bench) == SAEBENCH_TOP and bench["eval_type_id"] == "core"
    assert set(bench["eval_config"]) == SAEBENCH_CONFIG
    m = bench["eval_result_metrics"]
    assert {k: set(v) for k, v in m.items()} == SAEBENCH_GROUPS
    assert bench["sae_lens_id"] is None and "not run by SAEBench" in bench["sae_bench_commit_hash"]
    assert 0 < bench["datetime_epoch_millis"] <= 9999999999999
    # LM figures are eval.json's, under SAEBench's names
    r0, lm = res["encodings"]["inference"], res["lm"]
    assert m["model_performance_preservation"] == {
        "ce_loss_score": r0["ce_loss_score"], "ce_loss_with_ablation": lm["ce_zero_ablation"],
        "ce_loss_with_sae": r0["ce_spliced"], "ce_loss_without_sae": lm["ce_clean"]}
    assert m["model_behavior_preservation"] == {"kl_div_score": r0["kl_div_score"],
                                                "kl_div_with_ablation": lm["kl_zero_ablation"],
                                                "kl_div_with_sae": r0["kl_spliced"]}
    assert m["token_stats"] == {"total_tokens_eval_reconstruction": 6 * CTX,
                                "total_tokens_eval_sparsity_variance": r0["rows"]}
    assert bench["eval_config"]["context_size"] == CTX and bench["eval_config"]["batch_size_prompts"] == 4
    assert bench["eval_config"]["n_eval_reconstruction_batches"] == 2
    # the reconstruction figures, independently: the exported (raw-activation) SAE with SAELens' topk
    # equations on the held-out rows in raw units, batch by batch as the store serves them
    export_checkpoint(topk_run, tmp_path / "x")
    w = {k: v.double() for k, v in load_file(str(tmp_path / "x" / "sae_weights.safetensors")).items()}
    assert bench["sae_cfg_dict"] == json.loads((tmp_path / "x" / "cfg.json").read_text())
    cfg = load_run_config(topk_run)
    store = open_store(cfg, torch.device("cpu"))
    try:
        s = store.scaling_factors[SITE]
        batches = [b.double() / s for b in store.eval_batches()][:4]
    finally:
        store.close()
    per_tok = {k: [] for k in ("n_in", "n_out", "ratio", "cos", "ev", "err", "l0", "l1")}
    rrb, fired = [], torch.zeros(res["d_sae"], dtype=torch.float64)
    for x in batches:
        h = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        top = h.topk(6, dim=-1)
        f = torch.zeros_like(h).scatter(-1, top.indices, top.values.relu())
        y = f @ w["W_dec"] + w["b_dec"]
        per_tok["n_in"].append(x.norm(dim=-1))
        per_tok["n_out"].append(y.norm(dim=-1))
        per_tok["ratio"].append(y.norm(dim=-1) / x.norm(dim=-1))
        per_tok["cos"].append((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)))
        err = ((x - y) ** 2).sum(-1)
        per_tok["err"].append(err)
        per_tok["ev"].append(1 - err / ((x - x.mean(0)) ** 2).sum(-1))
        per_tok["l0"].append((f != 0).sum(-1).double())
        per_tok["l1"].append(f.sum(-1))
        rrb.append(float((y.norm(dim=-1) ** 2).mean() / (x * y).sum(-1).mean()))
        fired += (f > 0).sum(0)
    mean = {k: float(torch.cat(v).mean()) for k, v in per_tok.items()}
    approx = lambda v: pytest.approx(v, rel=1e-4, abs=1e-6)  # noqa: E731 (float32 SAE vs float64 here)
    assert m["shrinkage"] == {"l2_norm_in": approx(mean["n_in"]), "l2_norm_out": approx(mean["n_out"]),
                              "l2_ratio": approx(mean["ratio"]),
                              "relative_reconstruction_bias": approx(sum(rrb) / len(rrb))}
    assert m["reconstruction_quality"] == {"explained_variance": approx(mean["ev"]), "mse": approx(mean["err"]),
                                           "cossim": approx(mean["cos"])}
    assert m["sparsity"] == {"l0": approx(mean["l0"]), "l1": approx(mean["l1"])}
    assert m["reconstruction_quality"]["mse"] == pytest.approx(r0["mse_raw"], rel=1e-5)
    density = fired / sum(len(b) for b in batches)
    misc = m["misc_metrics"]
    assert misc["freq_over_1_percent"] == approx(float((density > 0.01).double().mean()))
    assert misc["freq_over_10_percent"] == approx(float((density > 0.1).double().mean()))
    assert misc["normalized_freq_over_10_percent"] == approx(float(density[density > 0.1].sum() / density.sum()))
    assert misc["frac_alive"] == approx(float((density > 0).double().mean()))
    enc, dec = w["W_enc"].T, w["W_dec"]
    assert misc["average_max_encoder_cosine_sim"] == approx(float(_max_other_cos(enc).mean()))
    assert misc["average_max_decoder_cosine_sim"] == approx(float(_max_other_cos(dec).mean()))
    details = bench["eval_result_details"]
    assert len(details) == res["d_sae"] and all(set(d) == SAEBENCH_DETAIL for d in details)
    i = 3
    assert details[i]["index"] == i and details[i]["feature_density"] == approx(float(density[i]))
    assert details[i]["encoder_norm"] == approx(float(enc[i].norm()))
    assert details[i]["encoder_bias"] == approx(float(w["b_enc"][i]))
    assert details[i]["encoder_decoder_cosine_sim"] == approx(float(torch.nn.functional.cosine_similarity(enc[i], dec[i], 0)))
    assert details[i]["consistent_activation_heuristic"] is None
    assert "consistent_activation_heuristic" in " ".join(bench["eval_result_unstructured"]["null_reasons"])


def test_saebench_core_without_lm_has_nulls_with_reasons(topk_run, tmp_path):
    evaluate_checkpoint(topk_run, skip_lm=True, batches=1, out=tmp_path / "e.json")
    bench = json.loads((tmp_path / "saebench_core.json").read_text())
    m = bench["eval_result_metrics"]
    assert set(m["model_performance_preservation"].values()) == {None}
    assert set(m["model_behavior_preservation"].values()) == {None}
    assert bench["eval_config"]["compute_kl"] is False and bench["eval_config"]["compute_ce_loss"] is False
    reasons = bench["eval_result_unstructured"]["null_reasons"]
    assert "--skip-lm" in reasons["model_performance_preservation"]
    assert m["sparsity"]["l0"] > 0 and m["shrinkage"]["l2_norm_in"] > 0


def test_saebench_core_of_an_uncalibrated_checkpoint_says_why_it_has_no_cfg(batchtopk_run, tmp_path):
    from train.checkpoints import list_checkpoints

    first = list_checkpoints(batchtopk_run)[0]  # intermediate BatchTopK checkpoints are never calibrated
    res, _ = evaluate_checkpoint(first, skip_lm=True, batches=1, out=tmp_path / "e.json")
    bench = json.loads((tmp_path / "saebench_core.json").read_text())
    assert res["primary"] == "batch_topk" and bench["eval_result_unstructured"]["encoding"] == "batch_topk"
    assert bench["sae_cfg_dict"] is None
    assert "train calibrate" in bench["eval_result_unstructured"]["null_reasons"]["sae_cfg_dict"]
    assert bench["eval_result_metrics"]["sparsity"]["l0"] == pytest.approx(res["encodings"]["batch_topk"]["l0"])


@pytest.mark.parametrize("choice,want", [("auto", "float32"), ("bf16", "bfloat16")])
def test_eval_records_what_its_autocast_chose(topk_run, tmp_path, choice, want):
    """settings holds the setting (autocast) and what it chose for the LM (lm_compute_dtype: auto on
    the CPU computes float32); None when the LM is skipped."""
    res, _ = evaluate_checkpoint(topk_run, max_contexts=2, lm_batch_size=2, batches=1, autocast=choice,
                                 out=tmp_path / "e.json")
    assert res["settings"]["autocast"] == choice and res["settings"]["lm_compute_dtype"] == want
    assert json.loads((tmp_path / "e.json").read_text())["settings"]["lm_compute_dtype"] == want
    res, _ = evaluate_checkpoint(topk_run, batches=1, skip_lm=True, out=tmp_path / "s.json")
    assert res["settings"]["lm_compute_dtype"] is None


@pytest.mark.parametrize("arch,over", [("matryoshka", {"matryoshka_widths": "1/8,1/2"}), ("gated", {"l1_coeff": 0.5}),
                                       ("jumprelu", {"target_l0": 6, "l0_coeff": 0.05})])
def test_eval_knows_the_newer_variants(cache_dir, tmp_path, arch, over):
    """train eval on Matryoshka (calibrated threshold, batch top-k, each inner prefix alone), Gated
    and JumpReLU with a target: reconstruction and LM figures for every encoding, SAEBench's core file."""
    run = train_sae(None, _cfg(cache_dir, tmp_path / "runs", arch=arch, **over), progress=False)[1]
    out = tmp_path / "e.json"
    res, _ = evaluate_checkpoint(run, max_contexts=4, lm_batch_size=4, batches=4, out=out)
    names = list(res["encodings"])
    if arch == "matryoshka":
        assert names[:2] == ["threshold", "batch_topk"] and res["primary"] == "threshold"
        prefixes = [n for n in names if n.startswith("prefix_")]
        assert len(prefixes) == 2, names
        evs = [res["encodings"][n]["explained_variance"] for n in prefixes] + [res["encodings"]["threshold"]["explained_variance"]]
        assert evs == sorted(evs), evs  # a longer prefix reconstructs at least as well
        assert all(res["encodings"][n]["l0"] <= res["encodings"]["threshold"]["l0"] for n in prefixes)
    for name in names:
        figures = res["encodings"][name]
        assert 0 < figures["explained_variance"] <= 1 and figures["l0"] > 0 and "ce_loss_score" in figures, (name, figures)
    table = format_table(res)
    assert all(name in table for name in names), table
    core = json.loads((out.parent / "saebench_core.json").read_text())
    assert core["sae_cfg_dict"]["architecture"] == ("gated" if arch == "gated" else "jumprelu")
