"""autocast=auto (train.precision): resolved once by measurement when a run is created, recorded in
config.json (the choice) and precision.json (the timings), never re-measured on resume; a trainer
refuses an unresolved auto; bf16 keeps every parameter, gradient and Adam state float32; tf32 sets
TF32 matmuls during the run's steps only, exists only on CUDA >= sm_80 (CUDA mocked here) and is
refused elsewhere."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from tests.helpers import SITE, SPARSE_D, cfg_for, final_weights, write_sweep_spec
from train import precision
from train.checkpoints import CheckpointError
from train.config import get_default_cfg, post_init_cfg, update_cfg
from train.layout import RunLayout
from train.training import Trainer, make_optimizer, resume_training, train_sae

SHORT = {"tokens": 256 * 12, "checkpoint_every": 256 * 4}  # 12 steps, checkpoints at 4 and 8


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def fake_device(monkeypatch):
    """Set what the capability probe reports and what each precision's step takes (ms); records the
    precisions timed."""
    timed = []

    def set_(units: bool, ms: dict[str, float] | None = None, tf32: bool = False):
        monkeypatch.setattr(precision, "bf16_matrix_units", lambda device: (units, "units of the test"))
        monkeypatch.setattr(precision, "tf32_matrix_units", lambda device: (tf32, "tf32 units of the test"))

        def step_ms(cfg, store, device, autocast):
            if ms is None:
                raise AssertionError("timed although the device has no bf16 units")
            timed.append(autocast)
            return ms[autocast]
        monkeypatch.setattr(precision, "step_ms", step_ms)
        return timed
    return set_


def _store(rows=256):
    return SimpleNamespace(seek=lambda i: None, local_batch_size=rows)


def _cfg(**over):
    return post_init_cfg(update_cfg(get_default_cfg(), autocast="auto", **over), d_in=SPARSE_D, site=SITE)


# --------------------------------------------------------------------------- the choice


def test_no_bf16_units_resolves_none_without_timing(fake_device):
    fake_device(False)
    cfg, m = precision.resolve_autocast(_cfg(), _store(), torch.device("cpu"), log=False)
    assert cfg.autocast == "none" and m.chosen == "none" and m.ms_fp32 is None and m.ms_bf16 is None
    assert not m.bf16_units


@pytest.mark.parametrize("ms,want", [({"none": 100.0, "bf16": 50.0}, "bf16"), ({"none": 50.0, "bf16": 100.0}, "none"),
                                     ({"none": 100.0, "bf16": 97.0}, "none")])  # a near-tie keeps exact float32
def test_bf16_units_pick_what_measured_faster(fake_device, ms, want):
    timed = fake_device(True, ms)
    cfg, m = precision.resolve_autocast(_cfg(), _store(), torch.device("cpu"), log=False)
    assert sorted(timed) == ["bf16", "none"]
    assert cfg.autocast == want == m.chosen and (m.ms_fp32, m.ms_bf16) == (ms["none"], ms["bf16"])
    assert m.to_json()["requested"] == "auto" and m.to_json()["batch_rows"] == 256


def test_resolved_values_pass_through(fake_device):
    fake_device(False)
    for value in ("none", "bf16"):
        cfg = update_cfg(_cfg(), autocast=value)
        assert precision.resolve_autocast(cfg, _store(), torch.device("cpu")) == (cfg, None)


def test_the_probe_reads_torch(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert precision.bf16_matrix_units(torch.device("cpu"))[0] is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert precision.bf16_matrix_units(torch.device("cpu"))[0] is True
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # an older torch without the probe
    has, units = precision.bf16_matrix_units(torch.device("cpu"))
    assert has is False and "no AMX probe" in units


def test_a_trainer_refuses_an_unresolved_auto():
    cfg = _cfg(arch="topk", k=4, expansion=4)
    from train.sae.registry import build_from_cfg
    sae = build_from_cfg(cfg, torch.device("cpu"))
    with pytest.raises(precision.UnresolvedAutocast, match="autocast='auto' is resolved to none, tf32 or bf16 when a run is created"):
        Trainer(cfg, sae, None, make_optimizer(cfg, sae), Path("."), progress=False)


# --------------------------------------------------------------------------- runs record the choice


def test_a_run_records_the_choice_and_computes_as_the_chosen_setting(fake_device, sparse_cache, tmp_path):
    fake_device(True, {"none": 10.0, "bf16": 4.0})
    _, run_dir = train_sae(None, cfg_for(sparse_cache, tmp_path / "auto", autocast="auto", **SHORT), progress=False)
    saved = json.loads(RunLayout(run_dir).config.read_text())
    record = json.loads(RunLayout(run_dir).precision.read_text())
    assert saved["autocast"] == "bf16"
    assert record["chosen"] == "bf16" and record["ms_fp32"] == 10.0 and record["ms_bf16"] == 4.0
    _, explicit = train_sae(None, cfg_for(sparse_cache, tmp_path / "bf16", autocast="bf16", **SHORT), progress=False)
    assert run_dir.name == explicit.name  # the run name hashes the resolved value
    _same(final_weights(run_dir), final_weights(explicit))
    assert not RunLayout(explicit).precision.exists()  # only auto measures


def test_no_units_run_is_the_plain_float32_run(fake_device, sparse_cache, tmp_path):
    fake_device(False)
    _, run_dir = train_sae(None, cfg_for(sparse_cache, tmp_path / "auto", autocast="auto", **SHORT), progress=False)
    assert json.loads(RunLayout(run_dir).config.read_text())["autocast"] == "none"
    assert json.loads(RunLayout(run_dir).precision.read_text())["ms_fp32"] is None
    _, plain = train_sae(None, cfg_for(sparse_cache, tmp_path / "none", **SHORT), progress=False)
    assert run_dir.name == plain.name
    _same(final_weights(run_dir), final_weights(plain))


@pytest.mark.parametrize("over", [{"arch": "jumprelu", "l0_coeff": 0.05},  # thresholds set from the first batch
                                  {"arch": "topk", "b_dec_init": "zeros"}])  # no init read: the store is not rewound
def test_the_real_measurement_leaves_the_run_as_the_explicit_one(monkeypatch, sparse_cache, tmp_path, over):
    """Timing really runs (units reported present): RNG states and the store position are as found,
    so the auto run equals the run made with its recorded choice, bit for bit."""
    monkeypatch.setattr(precision, "bf16_matrix_units", lambda device: (True, "units of the test"))
    _, run_dir = train_sae(None, cfg_for(sparse_cache, tmp_path / "auto", autocast="auto", **over, **SHORT),
                           progress=False)
    record = json.loads(RunLayout(run_dir).precision.read_text())
    assert record["ms_fp32"] > 0 and record["ms_bf16"] > 0
    assert record["chosen"] == precision.choose(record["ms_fp32"], record["ms_bf16"])
    _, explicit = train_sae(None, cfg_for(sparse_cache, tmp_path / "explicit", autocast=record["chosen"], **over,
                                          **SHORT), progress=False)
    _same(final_weights(run_dir), final_weights(explicit))


@pytest.mark.parametrize("arch", ["transcoder", "clt"])
def test_transcoders_measure_on_their_site_pairs(monkeypatch, transcoder_cache, tmp_path, arch):
    """A transcoder's or clt's step reads a dict of sites: the measurement times it, as trained."""
    monkeypatch.setattr(precision, "bf16_matrix_units", lambda device: (True, "units of the test"))
    _, run_dir = train_sae(None, cfg_for(transcoder_cache, tmp_path / "auto", arch=arch, autocast="auto", **SHORT),
                           progress=False)
    record = json.loads(RunLayout(run_dir).precision.read_text())
    assert record["ms_fp32"] > 0 and record["ms_bf16"] > 0
    assert json.loads(RunLayout(run_dir).config.read_text())["autocast"] == record["chosen"]
    _, explicit = train_sae(None, cfg_for(transcoder_cache, tmp_path / "explicit", arch=arch,
                                          autocast=record["chosen"], **SHORT), progress=False)
    _same(final_weights(run_dir), final_weights(explicit))


def test_a_resume_uses_the_recorded_choice_without_measuring(fake_device, fault, monkeypatch, sparse_cache, tmp_path):
    fake_device(True, {"none": 10.0, "bf16": 4.0})
    fault("checkpoint_mid_write@2:enospc")  # the first checkpoint (step 4) is committed, the run stops at step 8
    with pytest.raises(CheckpointError, match="disk full"):
        train_sae(None, cfg_for(sparse_cache, tmp_path / "auto", autocast="auto", **SHORT), progress=False)
    fault(None)
    run_dir = next((tmp_path / "auto").iterdir())

    def no_measuring(*a, **k):
        raise AssertionError("a resume measured again")
    monkeypatch.setattr(precision, "measure", no_measuring)
    monkeypatch.setattr(precision, "step_ms", no_measuring)
    resume_training(None, None, run_dir, progress=False)
    _, explicit = train_sae(None, cfg_for(sparse_cache, tmp_path / "bf16", autocast="bf16", **SHORT), progress=False)
    _same(final_weights(run_dir), final_weights(explicit))


def test_a_sweep_measures_each_shape_once_and_records_it(fake_device, sparse_cache, tmp_path):
    from train.sweep import run_sweep

    timed = fake_device(True, {"none": 10.0, "bf16": 4.0})
    spec = write_sweep_spec(tmp_path / "spec.toml", sparse_cache, tmp_path / "runs", "lr = [1e-3, 3e-3]\nk = [2, 4]",
                            autocast="auto", tokens=256 * 4)
    sweep_dir = run_sweep(spec, progress=False)
    assert sorted(timed) == ["bf16", "bf16", "none", "none"]  # two shapes (k), each lr measured once
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert [r["config"]["autocast"] for r in record["runs"]] == ["bf16"] * 4
    for r in record["runs"]:
        assert json.loads(RunLayout(sweep_dir / r["run_dir"]).precision.read_text())["chosen"] == "bf16"
        assert json.loads(RunLayout(sweep_dir / r["run_dir"]).config.read_text())["autocast"] == "bf16"


# --------------------------------------------------------------------------- end to end, unmocked


def test_train_run_autocast_auto_on_this_machine(sparse_cache, tmp_path):
    """`train run --autocast auto`, measured for real on whatever runs the tests."""
    from train.cli import main as train_cli

    r = CliRunner().invoke(train_cli, ["run", "--store", str(sparse_cache), "--out", str(tmp_path), "--quiet",
                                       "--autocast", "auto", "--k", "4", "--expansion", "4", "--batch-size", "256",
                                       "--tokens", str(256 * 6), "--checkpoint-every", str(256 * 6), "--wandb-mode",
                                       "disabled", "--set", "b_dec_init=mean"])
    assert r.exit_code == 0, r.output
    run_dir = Path(r.output.strip().splitlines()[-1])
    chosen = json.loads(RunLayout(run_dir).config.read_text())["autocast"]
    record = json.loads(RunLayout(run_dir).precision.read_text())
    assert chosen in ("none", "bf16") and record["chosen"] == chosen
    if record["bf16_units"]:
        assert chosen == precision.choose(record["ms_fp32"], record["ms_bf16"])
    else:
        assert chosen == "none" and record["ms_fp32"] is None
    assert (run_dir / "done.json").exists()


# --------------------------------------------------------------------------- what bf16 keeps float32


@pytest.mark.parametrize("arch,extra", [("jumprelu", {"l0_coeff": 0.05, "threshold_init": 0.05}), ("topk", {}),
                                        ("gated", {"l1_coeff": 0.5})])
def test_bf16_steps_keep_master_weights_gradients_and_adam_float32(sparse_cache, tmp_path, arch, extra):
    from train.runs import open_store
    from train.sae.registry import build_from_cfg

    cfg = post_init_cfg(cfg_for(sparse_cache, tmp_path, arch=arch, autocast="bf16", **extra), SPARSE_D, SITE)
    store = open_store(cfg, torch.device("cpu"))
    try:
        sae = build_from_cfg(cfg, torch.device("cpu"))
        trainer = Trainer(cfg, sae, store, make_optimizer(cfg, sae), tmp_path, progress=False)
        before = {n: p.detach().clone() for n, p in sae.named_parameters()}
        for _ in range(2):
            trainer.train_step(store.next_batch())
    finally:
        store.close()
    for name, p in sae.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
        assert not torch.equal(p.detach(), before[name]), name  # it trained
    for state in trainer.optimizer.state.values():
        assert all(t.dtype == torch.float32 for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    if arch == "jumprelu":
        assert sae.log_threshold.dtype == torch.float32 and float(sae.log_threshold.grad.abs().sum()) > 0


# --------------------------------------------------------------------------- tf32 (CUDA mocked)


def _fake_gpu(monkeypatch, capability: tuple[int, int]):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")


@pytest.mark.parametrize("capability,has", [((7, 5), False), ((8, 0), True), ((8, 6), True), ((9, 0), True)])
def test_tf32_exists_from_compute_capability_8(monkeypatch, capability, has):
    _fake_gpu(monkeypatch, capability)
    got, units = precision.tf32_matrix_units(torch.device("cuda"))
    assert got is has and f"sm_{capability[0]}{capability[1]}" in units
    cfg = update_cfg(_cfg(), autocast="tf32")
    if has:
        precision.check_available(cfg, torch.device("cuda"))
    else:
        with pytest.raises(precision.UnavailablePrecision, match=r"compute capability >= 8\.0.*sm_75"):
            precision.check_available(cfg, torch.device("cuda"))
    assert precision.tf32_matrix_units(torch.device("cpu"))[0] is False
    with pytest.raises(precision.UnavailablePrecision, match="this run's device is cpu"):
        precision.check_available(cfg, torch.device("cpu"))
    for value in ("none", "bf16"):  # available everywhere
        precision.check_available(update_cfg(cfg, autocast=value), torch.device("cpu"))


@pytest.mark.parametrize("ms,want", [({"none": 100.0, "tf32": 40.0, "bf16": 50.0}, "tf32"),
                                     ({"none": 100.0, "tf32": 60.0, "bf16": 50.0}, "bf16"),
                                     ({"none": 100.0, "tf32": 96.0, "bf16": 97.0}, "none"),  # near-ties: float32
                                     ({"none": 50.0, "tf32": 60.0, "bf16": 100.0}, "none")])
def test_cuda_times_fp32_tf32_and_bf16_and_picks_the_fastest(fake_device, monkeypatch, ms, want):
    timed = fake_device(True, ms, tf32=True)
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices=(): __import__("contextlib").nullcontext())
    cfg, m = precision.resolve_autocast(_cfg(), _store(), torch.device("cuda"), log=False)
    assert sorted(timed) == ["bf16", "none", "tf32"]
    assert cfg.autocast == want == m.chosen
    assert (m.ms_fp32, m.ms_tf32, m.ms_bf16) == (ms["none"], ms["tf32"], ms["bf16"]) and m.tf32_units
    record = m.to_json()
    assert record["ms_tf32"] == ms["tf32"] and record["chosen"] == want and record["margin"] == precision.BF16_MARGIN
    assert "tf32 %.1f ms/step" % ms["tf32"] in m.line()


def test_a_gpu_with_tf32_but_no_bf16_times_only_those(fake_device):
    timed = fake_device(False, {"none": 100.0, "tf32": 50.0}, tf32=True)
    cfg, m = precision.resolve_autocast(_cfg(), _store(), torch.device("cpu"), log=False)
    assert sorted(timed) == ["none", "tf32"] and cfg.autocast == "tf32" and m.ms_bf16 is None


def test_the_cpu_never_times_tf32(fake_device, monkeypatch):
    """On a CPU auto stays none vs bf16 (the real tf32 probe: no TF32 off CUDA)."""
    real_probe = precision.tf32_matrix_units
    timed = fake_device(True, {"none": 100.0, "bf16": 50.0})
    monkeypatch.setattr(precision, "tf32_matrix_units", real_probe)
    cfg, m = precision.resolve_autocast(_cfg(), _store(), torch.device("cpu"), log=False)
    assert sorted(timed) == ["bf16", "none"]
    assert m.ms_tf32 is None and not m.tf32_units and cfg.autocast == "bf16" and "tf32" not in m.line()


def _spy_steps(monkeypatch):
    """Record the float32 matmul precision (and cuBLAS's TF32 flag) inside every training step."""
    seen = []
    real = Trainer._step

    def spy(self, batch):
        seen.append((torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32))
        return real(self, batch)
    monkeypatch.setattr(Trainer, "_step", spy)
    return seen


@pytest.fixture
def process_precision():
    """The process's matmul precision as a test left it, restored afterwards."""
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("autocast,inside", [("tf32", ("high", True)), ("none", ("highest", False)),
                                             ("bf16", ("highest", False))])
@pytest.mark.parametrize("outside", ["highest", "high"])
def test_tf32_is_set_during_the_steps_only(monkeypatch, sparse_cache, tmp_path, process_precision, autocast, inside,
                                           outside):
    """The run's steps compute in its precision (TF32 under tf32, exact float32 otherwise, whatever
    the process set) and the process's setting is back after the run, so other runs see their own."""
    monkeypatch.setattr(precision, "tf32_matrix_units", lambda device: (True, "tf32 units of the test"))
    seen = _spy_steps(monkeypatch)
    torch.set_float32_matmul_precision(outside)
    train_sae(None, cfg_for(sparse_cache, tmp_path, autocast=autocast, **SHORT), progress=False)
    assert len(seen) == 12 and set(seen) == {inside}
    assert torch.get_float32_matmul_precision() == outside


def test_auto_records_tf32_and_equals_the_explicit_tf32_run(fake_device, monkeypatch, sparse_cache, tmp_path):
    fake_device(True, {"none": 10.0, "tf32": 4.0, "bf16": 6.0}, tf32=True)
    seen = _spy_steps(monkeypatch)
    _, run_dir = train_sae(None, cfg_for(sparse_cache, tmp_path / "auto", autocast="auto", **SHORT), progress=False)
    assert json.loads(RunLayout(run_dir).config.read_text())["autocast"] == "tf32"
    record = json.loads(RunLayout(run_dir).precision.read_text())
    assert (record["chosen"], record["ms_fp32"], record["ms_tf32"], record["ms_bf16"]) == ("tf32", 10.0, 4.0, 6.0)
    assert set(seen) == {("high", True)}
    _, explicit = train_sae(None, cfg_for(sparse_cache, tmp_path / "tf32", autocast="tf32", **SHORT), progress=False)
    assert run_dir.name == explicit.name  # the run name hashes the resolved value
    _, plain = train_sae(None, cfg_for(sparse_cache, tmp_path / "none", **SHORT), progress=False)
    assert plain.name != explicit.name  # tf32 enters the run identity, none keeps older names
    _same(final_weights(run_dir), final_weights(explicit))


def test_a_tf32_run_resumes_in_tf32_and_is_refused_where_tf32_does_not_exist(fake_device, fault, monkeypatch,
                                                                          sparse_cache, tmp_path):
    from train.cli import main as train_cli

    fake_device(True, {"none": 10.0, "tf32": 4.0, "bf16": 6.0}, tf32=True)
    fault("checkpoint_mid_write@2:enospc")  # stops after the first checkpoint
    with pytest.raises(CheckpointError, match="disk full"):
        train_sae(None, cfg_for(sparse_cache, tmp_path / "auto", autocast="auto", **SHORT), progress=False)
    fault(None)
    run_dir = next((tmp_path / "auto").iterdir())
    monkeypatch.setattr(precision, "tf32_matrix_units", lambda device: (False, "no tf32 on the test's device"))
    r = CliRunner().invoke(train_cli, ["resume", str(run_dir), "--quiet"])
    assert r.exit_code == 2 and "autocast='tf32' needs a CUDA GPU" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    monkeypatch.setattr(precision, "tf32_matrix_units", lambda device: (True, "tf32 units of the test"))
    seen = _spy_steps(monkeypatch)
    resume_training(None, None, run_dir, progress=False)
    assert seen and set(seen) == {("high", True)}
    _, explicit = train_sae(None, cfg_for(sparse_cache, tmp_path / "tf32", autocast="tf32", **SHORT), progress=False)
    _same(final_weights(run_dir), final_weights(explicit))


def test_a_sweep_asking_tf32_off_cuda_is_refused_before_any_run_folder(sparse_cache, tmp_path):
    from train.sweep import run_sweep

    spec = write_sweep_spec(tmp_path / "spec.toml", sparse_cache, tmp_path / "runs", "lr = [1e-3, 3e-3]",
                            autocast="tf32", tokens=256 * 4)
    with pytest.raises(precision.UnavailablePrecision, match="autocast='tf32' needs a CUDA GPU"):
        run_sweep(spec, progress=False)
    assert not list((tmp_path / "runs").rglob("config.json"))


@pytest.mark.parametrize("value", ["none", "bf16"])
def test_configs_from_before_tf32_load_and_step_as_they_did(sparse_cache, tmp_path, process_precision, value):
    """A config.json written before tf32 (autocast none or bf16) loads unchanged, keeps its run
    identity and steps at torch's default float32 precision ("highest"), as it did."""
    from train.config import cfg_from_saved, config_hash

    cfg = post_init_cfg(cfg_for(sparse_cache, tmp_path, autocast=value), SPARSE_D, SITE)
    saved = json.loads(json.dumps(cfg.to_dict()))
    loaded = cfg_from_saved(saved)
    assert loaded.autocast == value and config_hash(loaded) == config_hash(cfg)
    precision.check_available(loaded, torch.device("cpu"))
    torch.set_float32_matmul_precision("high")  # whatever the process set
    with precision.step_precision(loaded):
        assert torch.get_float32_matmul_precision() == "highest"
    assert torch.get_float32_matmul_precision() == "high"
