"""The structure of shared/: one declared writer interface; (below) imports without circles."""

import inspect

from shared.cache import CacheWriter, ShardWriter
from shared.remote import RemoteCacheWriter


def test_both_writers_declare_the_one_interface():
    abstract = ShardWriter.__abstractmethods__
    assert abstract == {"done_shards", "write_shard", "seal"}
    for cls in (CacheWriter, RemoteCacheWriter):
        assert issubclass(cls, ShardWriter) and not cls.__abstractmethods__, cls
        for name in [*abstract, "shard_bounds"]:
            want = list(inspect.signature(getattr(ShardWriter, name)).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters) == want, (cls, name)
