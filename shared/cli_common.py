"""What the `harvest` and `train` command lines share: the token-count type and the error runner.

`COUNT` parses 200000, 200k, 50M, 1.5G, 1e6 into an int (shared.counts). `run_user_errors(fn, ...)`
runs a command's work: a UserError (and an OSError, e.g. a full disk or a missing permission)
becomes one line on stderr and exit status 2, with no traceback. `one_line_warnings()` makes every
warning one line, `warning: ...`. `AliasedChoice` is a click.Choice that also
accepts older spellings (e.g. AUTOCAST_TYPE: none | bf16 | auto, with bfloat16 for bf16).
"""

from __future__ import annotations

import sys
import warnings

import click

from shared.autocast import AUTOCAST, AUTOCAST_ALIASES
from shared.counts import format_count, parse_count  # noqa: F401 (format_count: importable from here)
from shared.errors import UserError


class Count(click.ParamType):
    """A positive integer with an optional k/M/G suffix: 200k, 50M, 1.5G, 1e6 (shared.counts)."""

    name = "count"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            n = parse_count(value)
        except ValueError as e:
            self.fail(str(e) if "is not a count" in str(e) else f"{value!r} must be a positive whole number", param, ctx)
        if n <= 0:
            self.fail(f"{value!r} must be a positive whole number", param, ctx)
        return n


COUNT = Count()


class AliasedChoice(click.Choice):
    """click.Choice that maps older spellings (`aliases`: old -> name) onto its choices."""

    def __init__(self, choices, aliases: dict[str, str], case_sensitive: bool = True):
        super().__init__(choices, case_sensitive)
        self.aliases = dict(aliases)

    def convert(self, value, param, ctx):
        return super().convert(self.aliases.get(value, value), param, ctx)


AUTOCAST_TYPE = AliasedChoice(AUTOCAST, AUTOCAST_ALIASES)


def one_line_warnings() -> None:
    """Format each warning as one line, `warning: MESSAGE`, instead of Python's
    `file.py:171: UserWarning: MESSAGE` followed by a line of source code (both commands call it).
    Only the format changes: warnings are shown (or recorded, under pytest) as before."""

    def one_line(message, category, filename, lineno, line=None):
        return f"warning: {message}\n"

    warnings.formatwarning = one_line


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
