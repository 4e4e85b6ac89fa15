"""AuxK only when latents are dead, one code path on every device (train.sae.losses): no work at
all without candidates, the previous [B, m] masked definition's value and gradients on a
candidate block, and the trainer's refresh schedule (a superset of the dead set at every step,
host reads every N steps and after each checkpoint)."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

import train.training as training
from train.config import get_default_cfg, post_init_cfg, update_cfg
from train.sae import BatchTopKSAE, JumpReLUSAE, TopKSAE
from train.sae.losses import auxk_loss, auxk_refresh_steps, refresh_auxk_candidates

B, D, M, AUX_K = 24, 12, 48, 7


class Calls(TorchFunctionMode):
    """Records the name of every torch function called while active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def previous_definition(sae, x, x_hat, pre_fn):
    """The loss as defined before (and as CUDA computed it): a masked top-k over all of [B, m]."""
    dead = sae.dead_mask()
    pre = pre_fn()
    masked = torch.where(dead, pre, -torch.inf)
    top, idx = masked.topk(min(sae.aux_k, sae.d_sae), dim=1, sorted=False)
    e_hat = torch.zeros_like(pre).scatter(1, idx, top.relu()) @ sae.W_dec
    e = (x - x_hat).detach()
    return sae.aux_coeff * (e_hat - e).pow(2).sum() / e.pow(2).sum() * dead.any()


def make(cls, fast, dtype=torch.float64, aux_k=AUX_K):
    sae = cls(D, M, k=4, fast=fast, aux_k=aux_k, dead_tokens_threshold=100, dtype=dtype,
              generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2, generator=torch.Generator().manual_seed(2))
        sae.b_dec.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    return sae


def batch(dtype=torch.float64):
    return torch.randn(B, D, generator=torch.Generator().manual_seed(1), dtype=dtype)


@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE])
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("keeper", ["trainer", "none"])
def test_no_dead_latents_no_auxk_work(cls, fast, keeper):
    """Nothing dead: AuxK returns zero having run no top-k, no matmul, no gather."""
    sae = make(cls, fast)
    x = batch()
    out = sae(x)
    assert not sae.dead_mask().any()
    if keeper == "trainer":
        refresh_auxk_candidates(sae, horizon_tokens=50)  # counters are B=24 < 100 - 50: no candidate
        assert sae.auxk_candidates.numel() == 0
    with Calls() as calls:
        aux = auxk_loss(sae, x, out.x_hat, out.pre_acts)
    assert aux.item() == 0
    read = {"nonzero"} if keeper == "none" else set()  # without a trainer: the host read of the dead set
    assert not (WORK - read) & set(calls.names), calls.names


WORK = {"topk", "mm", "matmul", "__matmul__", "index_select", "apply", "where", "scatter_", "nonzero"}


@pytest.mark.parametrize("fast", [True, False])
def test_the_skip_is_the_same_on_a_non_cpu_device(fast):
    """On a device other than the CPU (meta here: no data, so any host read would fail) an empty
    candidate block skips AuxK just the same: no masked top-k over [B, m]."""
    sae = TopKSAE(D, M, k=4, fast=fast, aux_k=AUX_K, device="meta")
    sae.auxk_candidates = torch.empty(0, dtype=torch.long, device="meta")
    x, pre = torch.empty(B, D, device="meta"), torch.empty(B, M, device="meta")
    with Calls() as calls:
        aux = auxk_loss(sae, x, x, pre)
    assert aux.device.type == "meta" and aux.shape == ()
    assert not WORK & set(calls.names), calls.names


@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE])
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("aux_k", [3, AUX_K, 2 * M])  # fewer than the dead, and more than the block
@pytest.mark.parametrize("block", ["dead", "superset", "none"])  # trainer's superset, or read per call
def test_with_dead_latents_the_loss_and_gradients_are_the_previous_definitions(cls, fast, aux_k, block):
    sae = make(cls, fast, aux_k=aux_k)
    with torch.no_grad():
        sae.tokens_since_fired[::3] = 10**6  # a third dead, and they stay dead through the step
        sae.tokens_since_fired[1::6] = 90  # near the threshold: candidates with a horizon of 20, still live
    x = batch().requires_grad_()
    if block == "dead":
        sae.auxk_candidates = sae.dead_mask().nonzero().squeeze(1)
    elif block == "superset":
        refresh_auxk_candidates(sae, horizon_tokens=20)
        assert sae.auxk_candidates.numel() > int(sae.dead_mask().sum())
    sae.eval()  # the counters stay as set (training mode would add this batch's tokens)
    out = sae(x)
    params = [x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    got = out.losses["aux"]
    grads = torch.autograd.grad(got, params, allow_unused=True)
    want = previous_definition(sae, x, out.x_hat, lambda: sae.pre_acts(x))
    want_grads = torch.autograd.grad(want, params, allow_unused=True)
    assert got > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g if g is not None else torch.zeros_like(w), w, rtol=1e-9, atol=1e-12)


def test_candidates_all_live_give_exactly_zero():
    sae = make(TopKSAE, True)
    x = batch()
    sae.auxk_candidates = torch.arange(0, M, 5)  # stale candidates, none of them dead
    out = sae(x)
    assert not sae.dead_mask().any() and out.losses["aux"].item() == 0


def test_jumprelu_auxk_reads_its_dense_preactivations():
    sae = JumpReLUSAE(D, M, aux_coeff=1 / 32, threshold_init=10.0, dtype=torch.float64)
    sae.tokens_since_fired.fill_(10**9)
    sae.eval()
    x = batch()
    out = sae(x)
    torch.testing.assert_close(out.losses["aux"], previous_definition(sae, x, out.x_hat, lambda: sae.pre_acts(x)))


def test_refresh_steps_keep_the_horizon_small():
    assert auxk_refresh_steps(1_000_000, 4096) == 15  # horizon 61k tokens of a 1M threshold
    assert auxk_refresh_steps(10_000_000, 4096) == 64  # capped
    assert auxk_refresh_steps(1000, 4096) == 1  # every step when the threshold is short
    for thr, bs in [(1_000_000, 4096), (10**7, 512), (5000, 64)]:
        assert auxk_refresh_steps(thr, bs) * bs <= max(thr // 16, bs)


def _trainer(tmp_path, **changes):
    cfg = update_cfg(get_default_cfg(), arch="topk", expansion=4, k=2, batch_size=32, device="cpu",
                     wandb_mode="disabled", b_dec_init="zeros", aux_k=4, **changes)
    cfg = post_init_cfg(cfg, D, "blocks.0.hook_resid_pre")
    sae = training.build_from_cfg(cfg, torch.device("cpu"))
    return training.Trainer(cfg, sae, None, training.make_optimizer(cfg, sae), Path(tmp_path), progress=False)


def test_trainer_reads_the_dead_set_every_n_steps_and_keeps_a_superset(tmp_path, monkeypatch):
    reads = []
    real = training.refresh_auxk_candidates
    monkeypatch.setattr(training, "refresh_auxk_candidates", lambda sae, h: (reads.append(h), real(sae, h)))
    trainer = _trainer(tmp_path, dead_tokens_threshold=32 * 16 * 4)  # N = 4 steps, horizon 128 tokens
    assert trainer._auxk_every == 4
    with torch.no_grad():
        trainer.sae.b_enc[:10] = -100.0  # these never fire: they go dead during the run
    steps = []
    g = torch.Generator().manual_seed(5)
    for step in range(70):
        if trainer.step % 4 == 0:
            steps.append(trainer.step)
        parts = trainer.train_step(torch.randn(32, D, generator=g))
        dead = set(trainer.sae.dead_mask().nonzero().squeeze(1).tolist())
        assert dead <= set(trainer.sae.auxk_candidates.tolist()), step  # every dead latent was in the block
        if dead:
            assert parts["aux"] > 0
    assert len(dead) >= 10 and len(reads) == len(steps) and set(reads) == {4 * 32}


def test_a_checkpoint_makes_the_next_step_read(tmp_path, monkeypatch):
    reads = []
    monkeypatch.setattr(training, "refresh_auxk_candidates", lambda sae, h: reads.append(trainer.step))
    trainer = _trainer(tmp_path, dead_tokens_threshold=32 * 16 * 4)
    x = torch.randn(32, D)
    for _ in range(2):
        trainer.train_step(x)
    # a checkpoint with its writing stubbed out (no store, no files): only its effect on the schedule
    trainer.store = SimpleNamespace(state_dict=lambda: {})
    monkeypatch.setattr(training, "save_checkpoint", lambda *a, **k: Path(tmp_path) / "ckpt")
    monkeypatch.setattr(training.Scaling, "from_store", staticmethod(lambda store: SimpleNamespace(to_state=dict)))
    trainer.checkpoint()
    trainer.train_step(x)
    trainer.train_step(x)
    assert reads == [0, 2]
    off = _trainer(tmp_path, aux_coeff=0.0)
    off.train_step(x)
    assert reads == [0, 2]  # no AuxK, no read


def test_candidates_left_on_another_device_are_read_afresh():
    """An SAE moved after training (its candidates stay where they were kept) reads its dead set anew."""
    sae = make(TopKSAE, True)
    sae.tokens_since_fired[::4] = 10**6
    sae.eval()
    x = batch()
    fresh = sae(x).losses["aux"]
    sae.auxk_candidates = torch.empty(0, dtype=torch.long, device="meta")
    assert fresh > 0 and sae(x).losses["aux"].item() == fresh.item()


def test_a_clt_refreshes_every_layers_candidates_and_its_trainer_hooks_reach_each_layer():
    """A CLT is made of per-layer sources: the host read sets each source's candidates from its own
    row of the CLT's counters, and the trainer's per-step hooks (k schedule, parameter groups) reach
    every layer."""
    from train.sae.clt import CrossLayerTranscoder

    clt = CrossLayerTranscoder(8, 16, n_layers=3, sparsity="jumprelu", dead_tokens_threshold=100)
    with torch.no_grad():
        clt.tokens_since_fired[1, [2, 5]] = 150  # dead in layer 1 only
        clt.tokens_since_fired[2, 7] = 80  # dies within a horizon of 40 tokens
    refresh_auxk_candidates(clt, horizon_tokens=40)
    assert [src.auxk_candidates.tolist() for src in clt.sources] == [[], [2, 5], [7]]
    groups = clt.param_groups()
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in clt.parameters()) and len(set(grouped)) == len(grouped)
    assert groups[0]["params"][0] is clt.b_dec
