"""Several sites from one store: the same rows in the same order for every site, each site scaled
by its own dataset factor (what an input site and a target site of one cache need).

Synthetic caches (tests.helpers.build_cache) hold row i of site j as x[0] = i, x[1] = j, the rest
N(0, 1) drawn per site, so the two sites' mean squared norms (and factors) differ.
"""

import math

import pytest
import torch

from shared.cache import Cache
from tests.helpers import SITE, SITE2, build_cache
from train.activation_store import ActivationStore

KW = dict(batch_size=24, window_shards=2, seed=4, heldout_shards=1, drop_bos=True)


@pytest.fixture(scope="module")
def two_site_cache(tmp_path_factory):
    """7 shards of 16 rows (the last holds 4), contexts of 4, sites SITE and SITE2."""
    return build_cache(tmp_path_factory.mktemp("sites") / "c", sites=(SITE, SITE2))


def _batches(store, n):
    return [store.next_batch() for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_sites_come_back_row_aligned_with_their_own_scaling(two_site_cache, dtype):
    stats = Cache.open(two_site_cache)
    with ActivationStore(two_site_cache, sites=[SITE, SITE2], normalize=True, dtype=dtype, **KW) as both, \
            ActivationStore(two_site_cache, sites=[SITE, SITE2], **KW) as raw, \
            ActivationStore(two_site_cache, sites=SITE, normalize=True, dtype=dtype, **KW) as only_in, \
            ActivationStore(two_site_cache, sites=SITE2, normalize=True, dtype=dtype, **KW) as only_out:
        factors = both.scaling_factors
        assert set(factors) == {SITE, SITE2} and factors[SITE] != factors[SITE2]
        for s in (SITE, SITE2):
            assert factors[s] == pytest.approx(math.sqrt(8 / stats.stats(s)["mean_sq_norm"]))
        assert both.describe()["scaling_factors"] == factors
        n = 2 * both.rows_per_epoch // 24 + 2  # across windows and an epoch boundary
        for b, r, x_in, x_out in zip(_batches(both, n), _batches(raw, n), _batches(only_in, n), _batches(only_out, n)):
            assert set(b) == {SITE, SITE2} and all(t.dtype == dtype for t in b.values())
            assert torch.equal(r[SITE][:, 0], r[SITE2][:, 0])  # the same rows, in the same order
            assert (r[SITE][:, 1] == 0).all() and (r[SITE2][:, 1] == 1).all()  # each from its own site
            for s in (SITE, SITE2):  # each site scaled by its own factor, as a one-site store serves it
                assert torch.equal(b[s], (r[s] * factors[s]).to(dtype))
            assert torch.equal(b[SITE], x_in) and torch.equal(b[SITE2], x_out)


def test_two_sites_resume_and_eval_stay_aligned(two_site_cache):
    kw = dict(sites=[SITE2, SITE], normalize=True, **KW)  # the order the sites are named in is no matter
    with ActivationStore(two_site_cache, **kw) as ref:
        full = _batches(ref, 12)
        state = ref.state_dict()
        held = list(ref.eval_batches(2))
    with ActivationStore(two_site_cache, sites=[SITE, SITE2], normalize=True, **KW) as other:
        assert other.state_dict() == {**state, "position": 0}  # the sites are not part of the order
        other.seek(5 * 24)
        for want in full[5:]:
            got = other.next_batch()
            assert torch.equal(got[SITE], want[SITE]) and torch.equal(got[SITE2], want[SITE2])
    with ActivationStore(two_site_cache, **kw) as resumed:
        resumed.load_state_dict({**state, "position": 7 * 24})
        for want in full[7:]:
            got = resumed.next_batch()
            assert torch.equal(got[SITE], want[SITE]) and torch.equal(got[SITE2], want[SITE2])
    with ActivationStore(two_site_cache, sites=[SITE, SITE2], **KW) as raw:
        held_raw = list(raw.eval_batches(2))
    assert [len(b[SITE]) for b in held] == [2, 1]  # the held-out shard's 3 kept rows (drop_bos)
    assert [i for r in held_raw for i in r[SITE][:, 0].tolist()] == [97, 98, 99]  # in cache order
    for b, r in zip(held, held_raw):
        assert torch.equal(r[SITE][:, 0], r[SITE2][:, 0])
        for s in (SITE, SITE2):
            assert torch.equal(b[s], r[s] * ref.scaling_factors[s])
