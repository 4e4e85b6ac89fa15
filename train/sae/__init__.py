"""Sparse autoencoder variants, one module each, registered by name.

    base.py       BaseAutoencoder: the SAE's shape (parameters, init, encode/decode, the loss
                  assembly, dead-latent counters, decoder upkeep)
    losses.py     what every variant shares: explained variance, the AuxK dead-latent loss
    functions.py  the JumpReLU / step autograd functions with their pseudo-derivatives
    registry.py   SAE_REGISTRY, register, build_sae: the list of architectures
    vanilla.py    VanillaSAE   (rule ReLUL1)     topk.py      TopKSAE     (rule TopK)
    batchtopk.py  BatchTopKSAE (rule BatchTopK)  jumprelu.py  JumpReLUSAE (rule JumpReLU)

A variant is a sparsity rule (a mixin: activation, sparsity loss) combined with the SAE's shape,
e.g. `class TopKSAE(TopK, BaseAutoencoder)`, so that another shape (a transcoder) can reuse a rule
unchanged.

How to add a variant: write one module in this package (it is imported, and so registered, with
the package: the built-in ones first, then the others in name order), e.g. train/sae/myrule.py::

    from train.sae.base import BaseAutoencoder
    from train.sae.registry import register

    class MyRule:                                   # the sparsity rule, reusable by other shapes
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

and its tests (tests/test_variant_registry.py shows one trained end to end).
"""

import importlib
import pkgutil

from train.sae.base import Active, BaseAutoencoder, SAEOutput, geometric_median
from train.sae.functions import JumpReLUFn, StepFn
from train.sae.losses import auxk_loss, explained_variance
from train.sae.registry import SAE_REGISTRY, arch_names, build_sae, register, sae_class

# The built-in variants, imported (and so registered) in this order: vanilla, topk, batchtopk, jumprelu.
from train.sae.vanilla import ReLUL1, VanillaSAE
from train.sae.topk import TopK, TopKSAE
from train.sae.batchtopk import BatchTopK, BatchTopKSAE
from train.sae.jumprelu import JumpReLU, JumpReLUSAE

# Any other module of the package is a variant added later: import it so that it registers itself.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Active", "BaseAutoencoder", "BatchTopK", "BatchTopKSAE", "JumpReLU", "JumpReLUFn", "JumpReLUSAE", "ReLUL1",
    "SAEOutput", "SAE_REGISTRY", "StepFn", "TopK", "TopKSAE", "VanillaSAE", "arch_names", "auxk_loss",
    "build_sae", "explained_variance", "geometric_median", "register", "sae_class",
]
