"""The errors of train/ that users can hit, defined below every module that raises them; each
message says what to do. Like every user error they derive from shared.errors.UserError, which the
CLI prints on one line, exiting with status 2 (shared.cli_common.run_user_errors)."""

from shared.errors import UserError


class TrainingError(UserError):
    """Training stopped (NaN loss, bad store, no held-out rows); the message says what to do."""


class EvalError(UserError):
    """A checkpoint cannot be evaluated/calibrated as asked; the message says what to do."""
