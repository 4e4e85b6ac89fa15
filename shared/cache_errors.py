"""The one error type of the cache (shared/cache*.py, shared/remote*.py): `CacheError`.

Its message is one line naming the path, shard or field at fault and what to do; the command lines
print it and exit 2. `shared.object_store.RemoteError` is the object-store kind.
"""

from shared.errors import UserError


class CacheError(UserError):
    """A cache problem, with a one-line message naming the path/shard/field and what to do."""
