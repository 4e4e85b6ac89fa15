"""Named fault points for crash and disk-full testing.

Set SAEFORGE_FAULT=<point>[@<n>][:<action>] to act at the n-th time (default 1st) the process
reaches `fault_point(<point>)`. Actions: `kill` (default: SIGKILL itself, like kill -9 or a
preempted node) or `enospc` (raise OSError(ENOSPC), like a full disk). Unset, it costs one dict
lookup.
"""

from __future__ import annotations

import errno
import os
import signal

_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("SAEFORGE_FAULT")
    if not spec:
        return
    point, _, action = spec.partition(":")
    point, _, nth = point.partition("@")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != int(nth or 1):
        return
    if action in ("", "kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"<injected at {name}>")
    else:
        raise ValueError(f"SAEFORGE_FAULT action {action!r} is not kill or enospc")
