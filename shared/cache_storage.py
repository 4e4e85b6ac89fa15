"""How activations are stored in a cache: storage dtypes and compression.

* Storage dtypes: `float16`, `float32` as themselves; `bfloat16` as its raw 16-bit pattern in a
  `uint16` zarr array (zarr-python 3.1 cannot declare bfloat16), viewed in memory as
  `ml_dtypes.bfloat16`.
* `to_storage` converts activations ([rows, d], torch or numpy, any float dtype) to a storage
  dtype, refusing NaN/inf and float16 overflow (|x| > 65504) with the layer and site named.
* Compression: `none` (each chunk file is the array's raw little-endian bytes: memory-mappable),
  `zstd` or `blosc` (zarr's codecs).
"""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np
import zarr.codecs

from shared.cache_errors import CacheError

STORAGE_DTYPES = ("float16", "bfloat16", "float32")
COMPRESSIONS = ("none", "zstd", "blosc")
FLOAT16_MAX = 65504.0


def numpy_storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype activations have in memory (bfloat16 via ml_dtypes)."""
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)


def zarr_dtype(dtype: str) -> str:
    """The dtype of the zarr array holding a storage dtype."""
    # zarr-python 3.1 cannot store bfloat16: keep its raw 16-bit pattern as uint16, tagged.
    return "uint16" if dtype == "bfloat16" else dtype


def compressors(compression: str):
    """zarr's codec for a compression name (None for 'none')."""
    if compression == "zstd":
        return zarr.codecs.ZstdCodec(level=3)
    if compression == "blosc":
        return zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
    return None


def to_storage(x: "Any", dtype: str, where: str) -> np.ndarray:
    """Convert activations (torch tensor or numpy, any float dtype, [rows, d]) to storage dtype.

    Raises CacheError naming `where` if float16 storage would overflow (|x| > 65504) or the
    input holds NaN/inf, instead of silently writing inf.
    """
    import torch

    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    # One reduction (one device sync on CUDA) for both checks: NaN propagates through aminmax,
    # inf shows as the min or max.
    low, high = torch.stack(torch.aminmax(x)).tolist() if x.numel() else (0.0, 0.0)
    check_storage_range(low, high, dtype, where)
    return storage_numpy(x.to(torch_storage_dtype(dtype)).cpu())


def check_storage_range(low: float, high: float, dtype: str, where: str) -> None:
    """CacheError naming `where` if [low, high] (the activations' min and max) holds NaN or inf, or
    would overflow float16 storage."""
    if not (math.isfinite(low) and math.isfinite(high)):
        raise CacheError(f"{where}: activations contain NaN or inf before storage; check the model/dtype")
    max_abs = max(-low, high)
    if dtype == "float16" and max_abs > FLOAT16_MAX:
        raise CacheError(
            f"{where}: float16 overflow (max |activation| = {max_abs:.4g} > 65504); "
            "harvest with --dtype bfloat16 or --dtype float32"
        )


def torch_storage_dtype(dtype: str) -> "Any":
    """The torch dtype of a storage dtype name (float16, bfloat16, float32)."""
    import torch

    return getattr(torch, dtype)


def storage_numpy(x: "Any") -> np.ndarray:
    """A CPU tensor in storage dtype as numpy, without a copy (bfloat16 as ml_dtypes.bfloat16)."""
    import torch

    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()
