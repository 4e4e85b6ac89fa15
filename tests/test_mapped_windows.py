"""Memory-mapped store windows (window_io="map"): same bytes as copied windows, checked, unmapped.

The caches here have chunk files of whole pages (rows_per_shard * d * itemsize % 4096 == 0), the
condition for mapping; the suite in test_activation_store.py runs its 512-byte shards by copy.
"""

import gc
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.cache import CacheError
from tests.helpers import SITE, SITE2, build_cache, damaged_copy, rows_of, stream
from train.activation_store import ActivationStore
from train.mapped_files import PAGE, MappedFiles, mappable

pytestmark = pytest.mark.skipif(mappable(PAGE) is not None, reason="memory-mapped windows need 64-bit Linux")

RPS, D = 512, 8  # 512 rows x 8 float32 = 16 KiB a shard


@pytest.fixture(scope="module")
def paged_cache(tmp_path_factory):
    """7 shards of 512 rows (the last holds 100: 3172 rows), contexts of 4, two sites."""
    return build_cache(tmp_path_factory.mktemp("mapped") / "c", n_rows=6 * RPS + 100, rps=RPS, d=D, sites=(SITE, SITE2))


def mapped_paths() -> list[str]:
    """Files this process has memory-mapped now (from /proc/self/maps)."""
    return [line.split(maxsplit=5)[5].strip() for line in Path("/proc/self/maps").read_text().splitlines() if len(line.split(maxsplit=5)) == 6]


# --------------------------------------------------------------------------- MappedFiles


def _files(tmp_path, sizes):
    out = []
    for j, n in enumerate(sizes):
        p = tmp_path / f"f{j}"
        np.arange(j * 10_000, j * 10_000 + n // 4, dtype=np.float32).tofile(p)
        out.append((str(p), n))
    return out


def test_files_laid_out_back_to_back_at_the_stride(tmp_path):
    files = _files(tmp_path, [PAGE, PAGE, PAGE // 2])  # the last file is short: half its slot
    m = MappedFiles(files, PAGE)
    m.populate()
    rows = m.tensor(torch.float32, 16)  # 4 floats a row
    per_file = PAGE // 16
    assert rows.shape == (3 * per_file, 4)
    for j, (path, n) in enumerate(files):
        want = torch.from_numpy(np.fromfile(path, dtype=np.float32)).view(-1, 4)
        assert torch.equal(rows[j * per_file : j * per_file + n // 16], want)
        assert bytes(m.file_bytes(j)) == Path(path).read_bytes()


def test_mapping_lives_while_a_view_does_and_is_unmapped_after(tmp_path):
    files = _files(tmp_path, [PAGE, PAGE])
    m = MappedFiles(files, PAGE)
    view = m.tensor(torch.float32, 16)[PAGE // 16 :]
    del m
    gc.collect()
    assert files[1][0] in mapped_paths()
    assert view[0, 0].item() == 10_000.0
    del view
    gc.collect()
    assert not {p for p, _ in files} & set(mapped_paths())


def test_unmappable_layouts_refused_with_reasons(tmp_path):
    assert "pages" in mappable(PAGE + 8)
    with pytest.raises(ValueError, match="pages"):
        MappedFiles(_files(tmp_path, [512]), 512)
    with pytest.raises(ValueError, match="stride"):
        MappedFiles(_files(tmp_path, [2 * PAGE]), PAGE)
    short = _files(tmp_path, [PAGE // 2])
    with pytest.raises(OSError, match="fewer than"):  # the file is shorter than promised
        MappedFiles([(short[0][0], PAGE)], PAGE)
    with pytest.raises(OSError):
        MappedFiles([(str(tmp_path / "nope"), PAGE)], PAGE)
    assert str(tmp_path / "f0") not in mapped_paths()  # nothing left mapped after a failure


# --------------------------------------------------------------------------- the store


def test_auto_maps_when_possible_and_copies_otherwise(paged_cache, tmp_path):
    assert ActivationStore(paged_cache, prefetch=False).window_io == "map"
    unaligned = build_cache(tmp_path / "u")  # 16 rows x 8 float32 = 512 bytes a shard
    assert ActivationStore(unaligned, prefetch=False).window_io == "copy"
    with pytest.raises(ValueError, match="not possible.*pages"):
        ActivationStore(unaligned, window_io="map")
    compressed = build_cache(tmp_path / "z", n_rows=2 * RPS, rps=RPS, compression="zstd")
    assert ActivationStore(compressed, prefetch=False).window_io == "copy"
    with pytest.raises(ValueError, match="compressed"):
        ActivationStore(compressed, window_io="map")
    with pytest.raises(ValueError, match="window_io"):
        ActivationStore(paged_cache, window_io="mmap")


@pytest.mark.parametrize("window,drop_bos,prefetch", [(1, False, True), (2, True, True), (3, False, False), (7, False, True)])
def test_mapped_windows_serve_the_copied_bytes(paged_cache, window, drop_bos, prefetch):
    kw = dict(sites=[SITE, SITE2], batch_size=384, window_shards=window, seed=5, drop_bos=drop_bos, heldout_shards=1)
    with ActivationStore(paged_cache, window_io="copy", prefetch=False, **kw) as copied, \
            ActivationStore(paged_cache, window_io="map", prefetch=prefetch, **kw) as mapped:
        n = 2 * copied.rows_per_epoch // 384 + 1  # two epochs and a bit: windows and epochs straddled
        for _ in range(n):
            a, b = copied.next_batch(), mapped.next_batch()
            assert torch.equal(a[SITE], b[SITE]) and torch.equal(a[SITE2], b[SITE2])
        per_epoch = sorted(rows_of(stream_site(mapped, SITE, 0, copied.rows_per_epoch)))
        keep = [i for i in range(6 * RPS) if not (drop_bos and i % 4 == 0)]
        assert per_epoch == keep  # held-out shard 6 never served; every other row once


def stream_site(store, site, position, rows):
    store.seek(position)
    return torch.cat([store.next_batch()[site] for _ in range(-(-rows // store.batch_size))])[:rows]


def test_mapped_seek_equals_uninterrupted(paged_cache):
    with ActivationStore(paged_cache, batch_size=256, window_shards=2, seed=3) as ref:
        full = stream(ref, 30)
    for position in [0, 256, 1024, 2816, 3072, 4096, 5888]:  # window and epoch boundaries among them
        with ActivationStore(paged_cache, batch_size=256, window_shards=2, seed=3) as store:
            store.seek(position)
            got = stream(store, 4)
        assert torch.equal(got, full[position : position + 1024]), position


def test_at_most_two_windows_mapped_and_none_after_close(paged_cache):
    chunk_dir = str(Path(paged_cache) / "acts" / SITE)
    store = ActivationStore(paged_cache, batch_size=256, window_shards=2, seed=1)
    for _ in range(3 * store.rows_per_epoch // 256):
        store.next_batch()
        mine = [p for p in mapped_paths() if p.startswith(chunk_dir)]
        assert len(set(mine)) <= 4, mine  # the served window and the prefetched one, 2 shards each
    store.close()
    gc.collect()
    assert not [p for p in mapped_paths() if p.startswith(str(paged_cache))]


@pytest.mark.parametrize("how,message", [("truncate", "truncated"), ("missing", "missing"), ("flip", "checksum")])
def test_damaged_shard_named_when_its_window_is_mapped(paged_cache, tmp_path, how, message):
    path = damaged_copy(paged_cache, tmp_path / "c", 3, how)
    store = ActivationStore(path, batch_size=RPS, window_shards=1, seed=0, window_io="map")
    store.seek(int(store.order.epoch_layout(0)[0].tolist().index(3)) * RPS)
    for _ in range(2):  # and again: never zeros, never skipped
        with pytest.raises(CacheError, match=f"shard 3.*{message}"):
            store.next_batch()
    store.close()


def test_float16_and_bfloat16_caches_map_to_the_same_batches(tmp_path):
    for dtype in ["float16", "bfloat16"]:  # 1024 rows x 8 x 2 bytes = 16 KiB shards
        path = build_cache(tmp_path / dtype, n_rows=3 * 1024 + 40, rps=1024, d=D, dtype=dtype)
        for out in [torch.float32, torch.bfloat16]:
            kw = dict(batch_size=512, window_shards=2, seed=2, dtype=out, normalize=True)
            with ActivationStore(path, window_io="copy", **kw) as a, ActivationStore(path, window_io="map", **kw) as b:
                assert b.window_io == "map"
                assert torch.equal(stream(a, 20), stream(b, 20))


def test_a_file_system_without_mmap_falls_back_to_copies_or_is_named(paged_cache, monkeypatch):
    import train.window_reader as store_module

    def no_mmap(files, stride):
        raise OSError(19, f"cannot memory-map {files[0][0]}: No such device")

    ref = stream(ActivationStore(paged_cache, batch_size=256, window_shards=2, seed=4, window_io="copy"), 20)
    monkeypatch.setattr(store_module, "MappedFiles", no_mmap)
    auto = ActivationStore(paged_cache, batch_size=256, window_shards=2, seed=4)
    assert auto.window_io == "map"
    with pytest.warns(RuntimeWarning, match="cannot be memory-mapped.*copying"):
        got = stream(auto, 20)
    assert torch.equal(got, ref) and auto.window_io == "copy"
    with pytest.raises(CacheError, match=r"shards \[.*cannot be memory-mapped.*store_io=copy"):
        stream(ActivationStore(paged_cache, batch_size=256, window_shards=2, seed=4, window_io="map"), 1)
