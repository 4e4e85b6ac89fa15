"""The dataset scaling: one factor per hook site, x_train = s * x_raw.

s = sqrt(d / E||x||^2) from the cache statistics ("norm_scaling_factor"), so that the training
rows have E||x||^2 = d (DESIGN.md section 4), or 1 where the run does not normalise.

    training     the store applies it (train.activation_store); `Scaling.from_store(store)` is
                 what the store applied, recorded in every checkpoint (`to_state`: state.json keys
                 "scaling_factors", the cache's factor of each site, and "normalize")
    evaluation   `Scaling.from_state(checkpoint state)` (a checkpoint older than the record falls
                 back to `from_cache`); figures in raw units divide by factor(site)
    export       `fold_factors(input_site, output_site)`: the factors the SAE folds into its
                 exported weights (BaseAutoencoder.export_tensors), so the export takes raw
                 activations. An SAE reads and predicts one site, so both are the same; a
                 transcoder would read one site and predict another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable


@dataclass(frozen=True)
class Scaling:
    factors: dict[str, float]  # the cache's factor of each site (what normalisation multiplies by)
    normalize: bool = True  # whether the run applied them (False: every factor is 1)

    @classmethod
    def from_store(cls, store) -> Scaling:
        """What an ActivationStore applies to the rows it serves."""
        return cls({s: float(f) for s, f in store.scaling_factors.items()}, bool(store.normalize))

    @classmethod
    def from_cache(cls, cache, sites: Iterable[str], normalize: bool) -> Scaling:
        """The cache statistics' factors of `sites` (shared.cache.Cache)."""
        return cls({s: float(cache.stats(s).norm_scaling_factor) for s in sites}, bool(normalize))

    @classmethod
    def from_state(cls, state: dict[str, Any], normalize: bool) -> Scaling | None:
        """The scaling a checkpoint's state.json records, or None if it records none. `normalize`
        is the run's setting, used where the checkpoint predates the record of it."""
        factors = state.get("scaling_factors")
        if not factors:
            return None
        return cls({s: float(f) for s, f in factors.items()}, bool(state.get("normalize", normalize)))

    def has(self, site: str) -> bool:
        return site in self.factors

    def factor(self, site: str) -> float:
        """s of `site`: rows were multiplied by it for training (1.0 without normalisation)."""
        return float(self.factors[site]) if self.normalize else 1.0

    def fold_factors(self, input_site: str, output_site: str | None = None) -> tuple[float, float]:
        """(s_in, s_out) to fold into exported weights: the encoder reads input_site, the decoder
        predicts output_site (default: the same site, as an SAE does)."""
        return self.factor(input_site), self.factor(output_site or input_site)

    def to_state(self) -> dict[str, Any]:
        """The checkpoint state.json entries (from_state reads them back)."""
        return {"scaling_factors": dict(self.factors), "normalize": self.normalize}
