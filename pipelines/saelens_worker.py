"""Train one of SAELens' training SAEs with its SAETrainer on rows exported by compare_saelens.py.

Runs under an interpreter that has `sae_lens` installed (its own venv; see
requirements-saelens.txt); needs only numpy, torch and sae_lens, never this repository.

    /opt/saelens-venv/bin/python pipelines/saelens_worker.py --train DIR/train.npy \
        --heldout DIR/heldout.npy --out DIR/result.json --weights DIR/weights.npz \
        --arch topk --k 32 --expansion 8 --batch-size 4096 --steps 245 --lr 4e-4 --decay-fraction 0.2

--arch picks SAELens 6.54's class: topk = TopKTrainingSAE, matryoshka =
MatryoshkaBatchTopKTrainingSAE (--widths, e.g. 288,1152; the whole width is appended), gated =
GatedTrainingSAE (--l1), jumprelu = JumpReLUTrainingSAE (--jumprelu-mode step | quadratic | tanh,
--l0-coeff, --target-l0 for quadratic, --threshold-init, --pre-act-coeff).

train.npy [steps * batch_size, d] float32 holds the training batches in the order to feed them
(already normalised: SAELens' normalize_activations is "none"); they reach `SAETrainer` through a
plain iterator. Everything not set here is SAELens' default for the class's config and
`SAETrainerConfig` (decoder_init_norm 0.1, rescale_acts_by_decoder_norm for the TopK family, b_dec
zeros, AuxK coefficient 1, dead_feature_window 1000 steps, gradient clipping at 1.0, dense TopK
activations: SAELens 6.54.12's use_sparse_activations=True fails in backward on CPU torch 2.13
with "Could not run 'aten::view' with arguments from the 'SparseCPU' backend").

After training, the SAE is saved in SAELens' inference form (`save_inference_model`: TopK with the
decoder norm folded in; Matryoshka as JumpReLU with its learned topk threshold; Gated as gated;
JumpReLU with its threshold) and loaded back with `SAE.load_from_disk`. Writes weights.npz: that
inference SAE's tensors (W_enc [d, m], b_enc or b_gate / r_mag / b_mag [m], W_dec [m, d], b_dec
[d], threshold [m] for jumprelu), its `architecture`, k for topk, apply_b_dec_to_input; and
result.json: SAELens' version, wall time, tokens/s, its own count of dead latents
(dead_feature_window), and a held-out evaluation through the loaded SAE's own encode/decode
(explained variance, L0, never-fired latents) as a cross-check of the caller's evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs under SAELens' interpreter, as a script
from pipelines.measure import heldout_metrics  # noqa: E402


def batches(path: Path, batch_size: int):
    """Iterator over consecutive batch_size rows of a .npy file (memory-mapped), cycling."""
    rows = np.load(path, mmap_mode="r")
    n = rows.shape[0] // batch_size
    while True:
        for i in range(n):
            yield torch.from_numpy(np.array(rows[i * batch_size : (i + 1) * batch_size]))  # a writable copy


def heldout_eval(sae, heldout: torch.Tensor) -> dict:
    """The caller's metrics, through SAELens' own encode/decode."""
    sae.eval()

    def encode(x):
        f = sae.encode(x)
        return f.to_dense() if f.is_sparse else f

    return heldout_metrics(encode, sae.decode, heldout, sae.cfg.d_sae)


def build(args, d: int, extra: dict):
    """SAELens' training SAE and its config for --arch (defaults: SAELens')."""
    common = dict(d_in=d, d_sae=args.expansion * d, device=args.device, normalize_activations="none", **extra)
    if args.arch == "topk":
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        cfg = TopKTrainingSAEConfig(k=args.k, **common)
        return cfg, TopKTrainingSAE(cfg)
    if args.arch == "matryoshka":
        from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                            MatryoshkaBatchTopKTrainingSAEConfig)
        widths = [int(w) for w in args.widths.split(",")] if args.widths else []
        cfg = MatryoshkaBatchTopKTrainingSAEConfig(k=args.k, matryoshka_widths=widths + [args.expansion * d], **common)
        return cfg, MatryoshkaBatchTopKTrainingSAE(cfg)
    if args.arch == "gated":
        from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
        cfg = GatedTrainingSAEConfig(l1_coefficient=args.l1, **common)
        return cfg, GatedTrainingSAE(cfg)
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    jr = {"jumprelu_sparsity_loss_mode": args.jumprelu_mode, "l0_coefficient": args.l0_coeff}
    if args.target_l0 is not None:
        jr["target_l0"] = args.target_l0
    if args.threshold_init is not None:
        jr["jumprelu_init_threshold"] = args.threshold_init
    if args.pre_act_coeff is not None:
        jr["pre_act_loss_coefficient"] = args.pre_act_coeff
    cfg = JumpReLUTrainingSAEConfig(**jr, **common)
    return cfg, JumpReLUTrainingSAE(cfg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=Path, required=True)
    p.add_argument("--heldout", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--arch", default="topk", choices=["topk", "matryoshka", "gated", "jumprelu"])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--widths", default=None, help="matryoshka: comma list of inner prefix widths (latents)")
    p.add_argument("--l1", type=float, default=1.0, help="gated: l1_coefficient")
    p.add_argument("--l0-coeff", type=float, default=1.0, help="jumprelu: l0_coefficient")
    p.add_argument("--jumprelu-mode", default="step", choices=["step", "quadratic", "tanh"])
    p.add_argument("--target-l0", type=float, default=None, help="jumprelu quadratic: target_l0")
    p.add_argument("--threshold-init", type=float, default=None, help="jumprelu: default SAELens' (0.01)")
    p.add_argument("--pre-act-coeff", type=float, default=None, help="jumprelu: Anthropic's pre-activation loss")
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, required=True, help="optimiser steps (batches of train.npy fed)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--decay-fraction", type=float, default=0.0, help="linear decay to 0 over this last fraction of steps")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--aux-coeff", type=float, default=None, help="default: SAELens' (1.0)")
    p.add_argument("--dead-feature-window", type=int, default=None, help="steps; default: SAELens' (1000)")
    p.add_argument("--decoder-init-norm", type=float, default=None, help="default: SAELens' (0.1); <= 0 disables")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    import sae_lens
    from sae_lens import SAE, SAETrainer
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(args.seed)
    d = int(np.load(args.train, mmap_mode="r").shape[1])
    extra = {}
    if args.aux_coeff is not None:
        extra["aux_loss_coefficient"] = args.aux_coeff
    if args.decoder_init_norm is not None:
        extra["decoder_init_norm"] = args.decoder_init_norm if args.decoder_init_norm > 0 else None
    sae_cfg, sae = build(args, d, extra)
    total_steps = args.steps
    # SAETrainer loops while samples < total_training_samples; one step per batch.
    trainer_kw = {}
    if args.dead_feature_window is not None:
        trainer_kw["dead_feature_window"] = args.dead_feature_window
    tcfg = SAETrainerConfig(
        total_training_samples=total_steps * args.batch_size, train_batch_size_samples=args.batch_size,
        lr=args.lr, lr_end=args.lr, lr_scheduler_name="constant", lr_warm_up_steps=args.warmup_steps,
        lr_decay_steps=int(round(args.decay_fraction * total_steps)), device=args.device, **trainer_kw,
    )
    trainer = SAETrainer(tcfg, sae, batches(args.train, args.batch_size))
    t0 = time.perf_counter()
    sae = trainer.fit()
    wall = time.perf_counter() - t0
    saelens_dead = int(trainer.dead_neurons.sum())

    heldout = torch.from_numpy(np.load(args.heldout))
    inference_dir = args.weights.with_suffix(".saelens")
    sae.save_inference_model(inference_dir)  # SAELens' own conversion (decoder-norm fold, threshold)
    loaded = SAE.load_from_disk(str(inference_dir))
    native = heldout_eval(loaded, heldout)
    arch = loaded.cfg.architecture()
    state = {k: v.detach().cpu().numpy() for k, v in loaded.state_dict().items() if v is not None}
    np.savez(args.weights, **state, architecture=np.str_(arch), k=np.int64(args.k),
             apply_b_dec_to_input=np.bool_(loaded.cfg.apply_b_dec_to_input))
    result = {
        "arch": args.arch, "inference_architecture": arch, "inference_class": type(loaded).__name__,
        "version": sae_lens.__version__, "torch": torch.__version__, "steps": trainer.n_training_steps,
        "tokens": trainer.n_training_samples, "wall_s": wall, "tokens_per_s": trainer.n_training_samples / wall,
        "saelens_dead_latents": saelens_dead, "dead_feature_window": tcfg.dead_feature_window,
        "sae_config": {k: v for k, v in sae_cfg.to_dict().items() if k != "metadata"},
        "trainer_config": {k: getattr(tcfg, k) for k in ("lr", "lr_end", "lr_scheduler_name", "lr_warm_up_steps",
                                                          "lr_decay_steps", "adam_beta1", "adam_beta2",
                                                          "dead_feature_window", "total_training_samples",
                                                          "train_batch_size_samples")},
        "native_eval": native,
    }
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: result[k] for k in ("version", "tokens", "wall_s", "tokens_per_s", "native_eval")}))


if __name__ == "__main__":
    main()
