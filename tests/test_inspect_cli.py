"""`train inspect` end to end: a tiny TopK run on the tiny Llama harvest (real tokens, a real LM for
the logit effect), the site's data files against the cache and the weights, crash-safe writes,
--serve, and a table of bad inputs that must stop with one line and exit code 2."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from shared.cache import Cache
from tests.helpers import cfg_for
from train.checkpoints import list_checkpoints
from train.cli import main as train_cli
from train.inspector import build as build_mod
from train.inspector.site import make_server
from train.training import train_sae

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="only meaningful without CUDA")


def _scale(cfg, cache) -> float:
    """The factor the run multiplied raw rows by, from the cache statistics (1 without normalize)."""
    return float(cache.stats(cfg.site).norm_scaling_factor) if cfg.normalize else 1.0


def read_js(path: Path):
    """The JSON value of a site data file (SAE_DATA.x = ...; or SAE_DATA.chunk(n, ...);)."""
    text = Path(path).read_text(encoding="utf-8")
    if "SAE_DATA.chunk(" in text:
        body = text[text.index(",") + 1 : text.rindex(")")]
    else:
        body = text[text.index(" = ", text.index("SAE_DATA.")) + 3 : text.rindex(";")]
    return json.loads(body)


def chunk_record(site: Path, j: int, chunk: int = 64) -> dict:
    return read_js(site / "data" / "chunks" / f"{j // chunk:06d}.js")[j % chunk]


def _special(cache) -> list[int]:
    """The BOS / EOS ids the cache's model record names: the default row mask's token ids."""
    return sorted({cache.spec.model["bos_token_id"], cache.spec.model["eos_token_id"]})


def _kept(cache, k) -> int:
    """Rows of shard k the run's default mask keeps (not position 0, not a BOS / EOS id)."""
    return int(((cache.read_vector("positions", k) != 0) & ~np.isin(cache.read_vector("tokens", k), _special(cache))).sum())


@pytest.fixture(scope="module")
def llama_run(reference_cache, tmp_path_factory):
    """A TopK run (k 4, 128 latents) on the tiny Llama harvest (5 shards of 4 contexts x 16 tokens)."""
    out = tmp_path_factory.mktemp("inspect_runs")
    cfg = cfg_for(reference_cache, out, arch="topk", batch_size=64, tokens=64 * 30, checkpoint_every=64 * 30,
                  dead_tokens_threshold=256)
    return train_sae(None, cfg, progress=False)[1]


@pytest.fixture(scope="module")
def site(llama_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect_site") / "site"
    r = CliRunner().invoke(train_cli, ["inspect", str(llama_run), "--out", str(out), "--shards", "0-4", "--top", "6",
                                       "--before", "5", "--after", "2", "--quiet"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1] == str(out)
    return out


def test_the_site_holds_every_latent_and_its_files(site, reference_cache):
    for name in ("index.html", "app.js", "style.css", "data/meta.js", "data/index.js", "data/vocab.js"):
        assert (site / name).is_file(), name
    meta = read_js(site / "data/meta.js")
    # 4 contexts of 16, position 0 skipped, and the rows of the BOS / EOS ids (the run's default row mask)
    cache = Cache.open(reference_cache)
    kept = sum(_kept(cache, k) for k in range(5))
    assert meta["row_mask"]["token_ids"] == _special(cache) and kept < 5 * 60
    assert meta["rows"] == kept and meta["shards"] == [0, 1, 2, 3, 4]
    assert meta["has_logits"] and meta["has_tokenizer"] and meta["notes"] == []
    assert meta["encoding"] == "topk encoder (per token)"
    index = read_js(site / "data/index.js")
    assert len(index["freq"]) == meta["d_sae"] == 128
    assert sorted(p.name for p in (site / "data/chunks").iterdir()) == ["000000.js", "000001.js"]
    html = (site / "index.html").read_text() + (site / "app.js").read_text()
    assert "http://" not in html and "https://" not in html and "fetch(" not in html  # nothing from the network


def test_records_are_the_cache_rows_and_the_sae_activations(site, llama_run, reference_cache):
    """Each top example is the cache's token window around a row the SAE fires on, with its
    activation there; frequencies are counts over the encoded rows."""
    from train.runs import load_sae_checkpoint

    run = load_sae_checkpoint(llama_run)
    cache = Cache.open(reference_cache)
    s = _scale(run.cfg, cache)
    rps = cache.spec.rows_per_shard
    tokens = np.concatenate([cache.read_vector("tokens", k) for k in range(5)])
    positions = np.concatenate([cache.read_vector("positions", k) for k in range(5)])
    x = np.concatenate([np.asarray(cache.read_acts(run.cfg.site, k)) for k in range(5)])
    keep = (positions != 0) & ~np.isin(tokens, _special(cache))  # the run's default row mask
    with torch.no_grad():
        f = run.sae.encode(torch.from_numpy(x[keep]) * s).numpy()
    rows = np.flatnonzero(keep)
    vocab = read_js(site / "data/vocab.js")
    index = read_js(site / "data/index.js")
    for j in (0, 17, 64, 127):
        rec = chunk_record(site, j)
        fired = np.flatnonzero(f[:, j] > 0)
        assert rec["count"] == len(fired) == index["count"][j]
        assert rec["freq"] == pytest.approx(len(fired) / len(rows))
        order = fired[np.lexsort((rows[fired], -f[fired, j]))][:6]
        assert [e[0] for e in rec["top"]] == rows[order].tolist()
        for e, i in zip(rec["top"], order):
            g = rows[i]
            row, pos, value, center, toks, shades = e
            assert pos == positions[g] and value == pytest.approx(float(f[i, j]), rel=1e-3)
            lo = g - min(5, positions[g])
            hi = min(g + 2, (g // 16) * 16 + 15)  # contexts of 16 rows, shards of whole contexts
            assert toks == tokens[lo : hi + 1].tolist() and toks[center] == tokens[g]
            peak = f[:, j].max()
            for shade, t in zip(shades, range(lo, hi + 1)):  # thousandths of the max; -1: not encoded
                if not keep[t]:
                    assert shade == -1
                else:
                    assert shade == round(1000 * float(f[np.searchsorted(rows, t), j]) / peak)
            assert shades[center] == round(1000 * float(f[i, j]) / peak)
            assert all(str(t) in vocab for t in toks)
        assert index["top"][j] == (tokens[rows[order[0]]] if len(order) else -1)
    assert rps == 64


def test_logit_effect_is_the_decoder_times_the_unembedding(site, llama_run, reference_cache):
    from shared.models import load_model
    from train.runs import load_sae_checkpoint

    run = load_sae_checkpoint(llama_run)
    cache = Cache.open(reference_cache)
    lm = load_model(cache.spec.model["id"]).model
    W_U = lm.lm_head.weight.detach().t()
    gain = lm.model.norm.weight.detach()
    naive = (run.sae.W_dec.detach() / _scale(run.cfg, cache)) @ (gain[:, None] * W_U)
    for j in (0, 5, 100):
        rec = chunk_record(site, j)
        top = torch.topk(naive[j], 10)
        bottom = torch.topk(naive[j], 10, largest=False)
        assert [p[0] for p in rec["pos"]] == top.indices.tolist()
        assert [p[0] for p in rec["neg"]] == bottom.indices.tolist()
        np.testing.assert_allclose([p[1] for p in rec["pos"]], top.values.numpy(), rtol=2e-3)
        W = run.sae.W_dec.detach()
        cos = torch.nn.functional.cosine_similarity(W[j][None], W, dim=1)
        cos[j] = -2
        assert [p[0] for p in rec["near"]] == cos.topk(5).indices.tolist()


def test_default_shards_are_the_held_out_ones_and_tokens_cap_the_pass(llama_run, reference_cache, tmp_path):
    site, meta = build_mod.inspect_checkpoint(llama_run, tmp_path / "a", progress=False, no_logits=True)
    assert meta["shards"] == [4] and meta["rows"] == _kept(Cache.open(reference_cache), 4)
    assert "logit effect not computed (--no-logits)" in meta["notes"]
    assert "pos" not in chunk_record(site, 3) and "near" in chunk_record(site, 3)
    site, meta = build_mod.inspect_checkpoint(llama_run, tmp_path / "b", shards="1,3", tokens=70, progress=False,
                                              token_ids=True, no_logits=True)
    assert meta["shards"] == [1, 3] and meta["rows"] == 70 and read_js(site / "data/vocab.js") == {}
    assert "tokens shown as ids (--token-ids)" in meta["notes"]


def test_a_cache_without_a_loadable_model_shows_ids_and_says_so(reference_run, tmp_path):
    """The synthetic cache records model "synthetic": no tokenizer, no logits; BatchTopK is
    inspected with its calibrated threshold."""
    r = CliRunner().invoke(train_cli, ["inspect", str(reference_run), "--out", str(tmp_path / "s"), "--quiet"])
    assert r.exit_code == 0, r.output
    meta = read_js(tmp_path / "s/data/meta.js")
    assert meta["encoding"].startswith("JumpReLU with the calibrated")
    assert not meta["has_logits"] and not meta["has_tokenizer"]
    assert any("no tokenizer could be loaded" in n for n in meta["notes"]), meta["notes"]
    assert any("logit effect skipped" in n for n in meta["notes"]), meta["notes"]
    assert "note: no tokenizer could be loaded" in r.output


# --------------------------------------------------------------------------- writes


def test_force_replaces_only_once_the_new_site_is_complete(llama_run, tmp_path, monkeypatch):
    out = tmp_path / "site"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    r = CliRunner().invoke(train_cli, ["inspect", str(llama_run), "--out", str(out), "--quiet", "--no-logits"])
    assert r.exit_code == 2 and "exists and is not empty; choose another folder or pass --force" in r.output
    stale = tmp_path / ".site.inspect-tmp-999999999-dead"  # left by a killed inspect (no such pid)
    stale.mkdir()

    calls = {"n": 0}
    real = build_mod.Records.latents

    def failing(self, start, stop):
        calls["n"] += 1
        if calls["n"] == 2:  # the second chunk file
            raise RuntimeError("disk on fire")
        return real(self, start, stop)

    monkeypatch.setattr(build_mod.Records, "latents", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_mod.inspect_checkpoint(llama_run, out, force=True, progress=False, no_logits=True)
    assert (out / "mine.txt").read_text() == "keep me" and not (out / "index.html").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]  # no temp folder left, the stale one gone
    monkeypatch.setattr(build_mod.Records, "latents", real)
    build_mod.inspect_checkpoint(llama_run, out, force=True, progress=False, no_logits=True)
    assert (out / "index.html").exists() and not (out / "mine.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]


def test_server_serves_the_site(site):
    server = make_server(site, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=10) as resp:
            assert resp.status == 200 and b"SAE feature browser" in resp.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/chunks/000001.js", timeout=10) as resp:
            assert resp.read().startswith(b"SAE_DATA.chunk(1,")
    finally:
        server.shutdown()
        server.server_close()


def test_cli_serve_prints_the_url_and_stops_on_ctrl_c(llama_run, tmp_path, monkeypatch):
    import http.server

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(http.server.ThreadingHTTPServer, "serve_forever", interrupted)
    r = CliRunner().invoke(train_cli, ["inspect", str(llama_run), "--out", str(tmp_path / "s"), "--quiet",
                                       "--no-logits", "--serve"])
    assert r.exit_code == 0, r.output
    assert "at http://127.0.0.1:" in r.output and "/index.html (Ctrl-C stops)" in r.output


def test_bench_inspect_runs_on_a_tiny_sae(tmp_path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "pipelines/bench_inspect.py", "--d", "16", "--dict-size", "64", "--k", "4",
                        "--rows", "2048", "--rows-per-shard", "1024", "--repeats", "1", "--json", str(out),
                        "--dir", str(tmp_path)], cwd=repo, capture_output=True, text=True, timeout=300,
                       env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
                            "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    figures = json.loads(out.read_text())
    assert figures["rows"] == 2048 - 16 and figures["d_sae"] == 64 and figures["ratio"] > 0
    assert figures["site_files"] == 3 + 3 + 1 and figures["latents_fired"] > 0
    assert "inspect / bare: wall time" in r.stdout and not [p for p in tmp_path.iterdir() if p.is_dir()]


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad(llama_run, reference_run, reference_cache, sparse_cache, tmp_path_factory, tiny_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("inspect_bad")
    gone = tmp / "run_cache_gone"
    shutil.copytree(llama_run, gone)
    cfg = json.loads((gone / "config.json").read_text())
    cfg["store"] = str(tmp / "deleted_cache")
    (gone / "config.json").write_text(json.dumps(cfg))
    no_held = tmp / "run_no_heldout"
    shutil.copytree(llama_run, no_held)
    cfg = json.loads((no_held / "config.json").read_text())
    cfg["heldout_shards"] = 0
    (no_held / "config.json").write_text(json.dumps(cfg))
    junk = tmp / "junk"
    junk.mkdir()
    used = tmp / "used"
    used.mkdir()
    (used / "x.txt").write_text("x")
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    other.add_tokens(["<something-else>"])
    other.save_pretrained(tmp / "other_tokenizer")
    return {"run": llama_run, "btk": reference_run, "tmp": tmp, "gone": gone, "no_held": no_held, "junk": junk,
            "used": used, "sparse": sparse_cache, "other_tok": tmp / "other_tokenizer"}


def _args(b, *extra, run="run"):
    return ["inspect", str(b[run] if run in b else run), "--out", str(b["tmp"] / "out"), "--quiet", *extra]


BAD = [
    pytest.param(lambda b: _args(b, run=str(b["tmp"] / "nowhere")), ["nowhere", "does not exist"], id="run-missing"),
    pytest.param(lambda b: _args(b, run="junk"), ["junk is neither a run folder (no config.json) nor a checkpoint folder"],
                 id="not-a-run"),
    pytest.param(lambda b: _args(b, "--shards", "9"),
                 ["--shards: shard 9 is not in the cache", "(it has 0..4); choose shards from `harvest info`"],
                 id="shard-out-of-range"),
    pytest.param(lambda b: _args(b, "--shards", "2-1"), ["--shards '2-1': range 2-1 is empty; write it low-high"],
                 id="shard-range-backwards"),
    pytest.param(lambda b: _args(b, "--shards", "one"), ["--shards 'one': 'one' is not a shard or a range like 5-7"],
                 id="shard-not-a-number"),
    pytest.param(lambda b: _args(b, run="gone"),
                 ["the run's activation cache", "deleted_cache' does not exist; pass --store PATH"], id="cache-gone"),
    pytest.param(lambda b: _args(b, "--store", str(b["sparse"])),
                 ["is not the cache this run was trained on", "pass --store PATH to the original cache"],
                 id="store-other-cache"),
    pytest.param(lambda b: _args(b, run="no_held"),
                 ["kept no held-out shards (heldout_shards=0); pass --shards"], id="no-heldout-shards"),
    pytest.param(lambda b: _args(b, run=str(list_checkpoints(b["btk"])[-2])),
                 ["is a BatchTopK SAE without a calibrated inference threshold", "run `train calibrate"],
                 id="batchtopk-uncalibrated"),
    pytest.param(lambda b: ["inspect", str(b["run"]), "--out", str(b["used"]), "--quiet"],
                 ["used exists and is not empty; choose another folder or pass --force"], id="out-not-empty"),
    pytest.param(lambda b: ["inspect", str(b["run"]), "--out", str(b["used"] / "x.txt")],
                 ["x.txt", "is a file"], id="out-is-a-file"),
    pytest.param(lambda b: _args(b, "--bins", "48"), ["--bins (48) and --bands (8) must be powers of two"],
                 id="bins-not-power-of-two"),
    pytest.param(lambda b: _args(b, "--tokens", "12x"), ["'--tokens'", "'12x' is not a count"], id="tokens-bad"),
    pytest.param(lambda b: _args(b, "--top", "0"), ["Invalid value for '--top'"], id="top-zero"),
    pytest.param(lambda b: _args(b, "--model", str(b["tmp"] / "no_model")), ["no_model", "does not exist"],
                 id="model-missing"),
    pytest.param(lambda b: _args(b, "--no-logits", "--tokenizer", str(b["tmp"] / "no_tok")),
                 ["tokenizer path", "no_tok' does not exist"], id="tokenizer-missing"),
    pytest.param(lambda b: _args(b, "--no-logits", "--tokenizer", str(b["other_tok"])),
                 ["differs from the one the cache was harvested with (tokenizer hash)", "--token-ids"],
                 id="tokenizer-different"),
    pytest.param(lambda b: _args(b, "--device", "cuda"), ["--device 'cuda': this machine has no CUDA device"],
                 id="device-cuda-without-cuda", marks=NO_CUDA),
    pytest.param(lambda b: _args(b, "--device", "banana"), ["--device 'banana' is not a device"], id="device-unknown"),
]


@pytest.mark.parametrize("make_args,needles", BAD)
def test_bad_input_gives_a_clear_error(bad, make_args, needles):
    args = make_args(bad)
    r = CliRunner().invoke(train_cli, args)
    crashed = r.exception is not None and not isinstance(r.exception, SystemExit)
    assert not crashed, f"train {' '.join(args)} raised {r.exception!r}"
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert "Traceback" not in r.output, r.output
    assert sum(line.lower().startswith("error:") for line in r.output.splitlines()) == 1, r.output  # one error line
    for needle in needles:
        assert needle in r.output, f"{needle!r} not in:\n{r.output}"
    assert not (bad["tmp"] / "out").exists()  # nothing written
