"""Token counts as people write them: 200000, 200k, 50M, 1.5G, 1e6, 20_000.

One spelling everywhere a token count is given: the `harvest` and `train` options (click type
shared.cli_common.COUNT), `train run --set KEY=...`, TOML configs and sweep specs (train.config
reads the keys declared as counts with `parse_count`).
"""

from __future__ import annotations

_SUFFIX = {"k": 10**3, "m": 10**6, "g": 10**9}
EXAMPLES = "200000, 200k, 50M"


def parse_count(value: int | float | str) -> int:
    """A whole, non-negative number of tokens from an int, an integral float or a string with an
    optional k/M/G suffix (case-insensitive, underscores ignored). ValueError says why not."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a count (examples: {EXAMPLES})")
    if isinstance(value, int):
        n: float = value
    elif isinstance(value, float):
        n = value
    else:
        text = str(value).strip().lower().replace("_", "")
        try:
            n = float(text[:-1]) * _SUFFIX[text[-1]] if text and text[-1] in _SUFFIX else float(text)
        except ValueError:
            raise ValueError(f"{value!r} is not a count (examples: {EXAMPLES})") from None
    if not n == n or n in (float("inf"), float("-inf")) or n < 0 or n != int(n):
        raise ValueError(f"{value!r} must be a whole number of tokens (examples: {EXAMPLES})")
    return int(n)


def format_count(n: int) -> str:
    """The shortest exact spelling parse_count reads back: 10000000 -> 10M, 4096 -> 4096."""
    for suffix, unit in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)
