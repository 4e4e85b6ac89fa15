"""The errors of train/ that users can hit, defined below every module that raises them; each
message says what to do (the CLI prints it on one line and exits with status 2)."""

from shared.errors import UserError


class TrainingError(UserError):
    """Training stopped (NaN loss, bad store, no held-out rows); the message says what to do."""


class EvalError(UserError):
    """A checkpoint cannot be evaluated/calibrated as asked; the message says what to do."""
