"""Measurement helpers shared by the benchmark scripts and the SAELens workers.

Imports only torch and the standard library: the workers run under SAELens' own interpreter.
"""

from __future__ import annotations

import os
import threading
import time

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size of this process, in bytes (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


class PeakRSS:
    """Samples RSS every `interval` seconds in a daemon thread between start() and stop()."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return self.peak


@torch.no_grad()
def heldout_metrics(encode, decode, heldout: torch.Tensor, d_sae: int, batch: int = 4096) -> dict:
    """Held-out explained variance 1 - sum||x - x_hat||^2 / sum||x - mean||^2, MSE per row, mean L0,
    and the latents that never fired on these rows (count and fraction). heldout [n, d]; encode
    returns dense [b, d_sae] latents; float64 accumulation."""
    sq_err = 0.0
    l0 = 0.0
    fired = torch.zeros(d_sae, dtype=torch.bool)
    for x in heldout.split(batch):
        f = encode(x)
        x_hat = decode(f)
        sq_err += float((x - x_hat).double().pow(2).sum())
        l0 += float((f > 0).sum())
        fired |= (f > 0).any(0)
    x64 = heldout.double()
    total = float((x64 - x64.mean(0)).pow(2).sum())
    n = heldout.shape[0]
    return {"explained_variance": 1 - sq_err / total, "mse": sq_err / n, "l0": l0 / n,
            "dead": int((~fired).sum()), "dead_fraction": float((~fired).float().mean()), "rows": n}
