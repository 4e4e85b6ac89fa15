"""`train inspect`: a feature browser built straight from the activation cache.

One streamed pass of the SAE's encoder over cache shards collects, per latent, its top-activating
rows, uniform samples across its activation range, a histogram, its firing frequency and mean
activation (collect.py, bounded memory); the token windows around those rows come from the cache's
`tokens` / `positions` (contexts.py), the logit effect and nearest latents from the weights
(logits.py); records.py shapes them and site.py writes a static site that opens from file://.
build.py runs the whole thing: `inspect_checkpoint(RUN_OR_CHECKPOINT, OUT_DIR, **settings)`.
"""

from train.inspector.loading import InspectError

__all__ = ["InspectError"]
