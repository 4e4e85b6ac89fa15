"""What the `harvest` and `train` command lines share: the token-count type and the error runner.

`COUNT` parses 200000, 200k, 50M, 1.5G, 1e6 into an int. `run_user_errors(fn, ...)` runs a
command's work: a UserError (and an OSError, e.g. a full disk or a missing permission) becomes one
line on stderr and exit status 2, with no traceback. `AliasedChoice` is a click.Choice that also
accepts older spellings (e.g. AUTOCAST_TYPE: none | bf16 | auto, with bfloat16 for bf16).
"""

from __future__ import annotations

import sys

import click

from shared.autocast import AUTOCAST, AUTOCAST_ALIASES
from shared.errors import UserError


class Count(click.ParamType):
    """An integer with an optional k/M/G suffix: 200k, 50M, 1.5G, 1e6."""

    name = "count"
    _suffix = {"k": 10**3, "m": 10**6, "g": 10**9}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().replace("_", "")
        try:
            if text and text[-1] in self._suffix:
                n = float(text[:-1]) * self._suffix[text[-1]]
            else:
                n = float(text)
        except ValueError:
            self.fail(f"{value!r} is not a count (examples: 200000, 200k, 50M)", param, ctx)
        if n <= 0 or n != int(n):
            self.fail(f"{value!r} must be a positive whole number", param, ctx)
        return int(n)


COUNT = Count()


def format_count(n: int) -> str:
    """The shortest exact spelling COUNT reads back: 10000000 -> 10M, 4096 -> 4096."""
    for suffix, unit in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


class AliasedChoice(click.Choice):
    """click.Choice that maps older spellings (`aliases`: old -> name) onto its choices."""

    def __init__(self, choices, aliases: dict[str, str], case_sensitive: bool = True):
        super().__init__(choices, case_sensitive)
        self.aliases = dict(aliases)

    def convert(self, value, param, ctx):
        return super().convert(self.aliases.get(value, value), param, ctx)


AUTOCAST_TYPE = AliasedChoice(AUTOCAST, AUTOCAST_ALIASES)


def run_user_errors(fn, *args, **kwargs):
    """Run fn; user errors become a one-line message and exit code 2 (no traceback)."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        click.echo(f"error: {e.strerror or e} ({e.filename or ''})", err=True)
        sys.exit(2)
