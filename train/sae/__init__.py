"""Sparse autoencoder variants, one module each, registered by name.

    base.py       BaseAutoencoder: the SAE's shape (parameters, init, encode/decode, the loss
                  assembly, dead-latent counters, decoder upkeep, the fold of the dataset
                  scaling) and the defaults of everything a variant declares; Encoding
    losses.py     what every variant shares: explained variance, the AuxK dead-latent loss
    functions.py  the JumpReLU / step autograd functions with their pseudo-derivatives
    registry.py   SAE_REGISTRY, register, build_sae, build_from_cfg, sae_record / sae_from_record:
                  the list of architectures, and what rebuilds one from a checkpoint alone
    vanilla.py    VanillaSAE   (rule ReLUL1)     topk.py      TopKSAE     (rule TopK)
    batchtopk.py  BatchTopKSAE (rule BatchTopK)  jumprelu.py  JumpReLUSAE (rule JumpReLU)
    gated.py      GatedSAE     (rule Gated)      matryoshka.py  MatryoshkaSAE (rule MatryoshkaBatchTopK)

A variant is a sparsity rule (a mixin: activation, sparsity loss, encodings and calibration, the
config keys it reads, its run-name label, its export form) placed before a shape, e.g.
`class TopKSAE(TopK, BaseAutoencoder)`. The rule only touches the encoder side (W_enc, b_enc,
pre-activations) and the decoder norms, so another shape (a transcoder: encoder reads one site,
decoder predicts another, train.scaling folding each side's factor) can take any rule unchanged,
and a rule can extend another (BatchTopK extends TopK's arguments).

What a variant declares (defaults in BaseAutoencoder; the rest of train/ asks it, never its name):
    config_keys            constructor keyword -> TrainConfig key (config_args builds the kwargs)
    late_config_keys       the same for keys added after checkpoints recorded their arguments, with
                           the value that computes the old behaviour (passed only when different)
    config_error(cfg)      what is impossible about a config for it (e.g. k > dict_size), or None
    run_label(cfg)         its part of the default run name (k32, l1_5, ...)
    encodings()            how it encodes at inference/evaluation, first the exported one
    needs_calibration, calibrated, calibrate(batches, kind, n)   a threshold set after training
    final_results(evaluate)  its held-out results in done.json
    describe()             k and threshold kind (and the variant's own facts), for reports
    saelens_arch, export_tensors(s_in, s_out), export_config()    its exported (SAELens) form

How to add a variant: write one module in this package (it is imported, and so registered, with
the package: the built-in ones first, then the others in name order), e.g. train/sae/myrule.py::

    from train.sae.base import BaseAutoencoder
    from train.sae.registry import register

    class MyRule:                                   # the sparsity rule, reusable by other shapes
        config_keys = {"my_coeff": "l1_coeff"}      # constructor keyword <- TrainConfig key

        @classmethod
        def run_label(cls, cfg):                    # e.g. myrule_<site>_<width>_c0.5_<hash>
            return f"c{cfg.l1_coeff:g}"

        def __init__(self, d_in, d_sae, *, my_coeff=1.0, **base):
            super().__init__(d_in, d_sae, **base)
            self.my_coeff = my_coeff

        def activation(self, pre):                  # [B, m] -> [B, m]
            return pre.relu()

        def sparsity_loss(self, f, pre):            # a scalar
            return self.my_coeff * f.sum(-1).mean()

    @register("myrule")
    class MySAE(MyRule, BaseAutoencoder):
        pass

A rule may also add reconstruction terms to the loss (`reconstruction_losses`: Matryoshka's
per-prefix errors, Gated's gate path) and follow a schedule (`set_training_tokens`: TopK's k
annealing). And its tests: tests/test_variant_registry.py trains such a variant end to end. A variant that
needs a config key TrainConfig lacks also adds that field to train.config (entering config_hash
only when set, as autocast does, so that existing run names stay valid).
"""

import importlib
import pkgutil

from train.sae.base import Active, BaseAutoencoder, Encoding, SAEOutput, geometric_median
from train.sae.functions import JumpReLUFn, StepFn
from train.sae.losses import auxk_loss, explained_variance
from train.sae.registry import SAE_REGISTRY, arch_names, build_sae, register, sae_class

# The built-in variants, imported (and so registered) in this order: vanilla, topk, batchtopk, jumprelu,
# gated, matryoshka.
from train.sae.vanilla import ReLUL1, VanillaSAE
from train.sae.topk import TopK, TopKSAE
from train.sae.batchtopk import BatchTopK, BatchTopKSAE
from train.sae.jumprelu import JumpReLU, JumpReLUSAE
from train.sae.gated import Gated, GatedSAE
from train.sae.matryoshka import MatryoshkaBatchTopK, MatryoshkaSAE

# Any other module of the package is a variant added later: import it so that it registers itself.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Active", "BaseAutoencoder", "BatchTopK", "BatchTopKSAE", "Encoding", "Gated", "GatedSAE", "JumpReLU", "JumpReLUFn",
    "JumpReLUSAE", "MatryoshkaBatchTopK", "MatryoshkaSAE", "ReLUL1", "SAEOutput", "SAE_REGISTRY", "StepFn", "TopK",
    "TopKSAE", "VanillaSAE", "arch_names", "auxk_loss", "build_sae", "explained_variance", "geometric_median",
    "register", "sae_class",
]
