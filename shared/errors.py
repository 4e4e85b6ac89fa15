"""The base of every error a user can hit and fix: `UserError`.

Each kind is defined next to the code that raises it (CacheError in shared/cache_errors.py,
ConfigError in train/config.py, ...) and derives from UserError; its message is one line naming
the file, field, layer or shard at fault and what to do. The command lines catch UserError in one
place (shared.cli_common.run_user_errors), print the message and exit with status 2.
"""


class UserError(Exception):
    """A problem with the user's input or environment; the message says what to do."""
