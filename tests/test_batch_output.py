"""The store's output side (train.batch_output): pooled output tensors are lent again only once
nothing holds them, and the dtype conversion gives the bits of a direct rounding.

The pool learns that the caller let go because the storage of torch.from_numpy(array) holds the
only reference to that array. If a torch release changed that, these tests fail: a buffer lent
again while held (overwriting what the caller sees), or never lent again.
"""

import gc

import numpy as np
import pytest
import torch

from train.batch_output import BLOCK_ROWS, OutputPool, convert

SHAPE = (16, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_dropped_tensor_is_lent_again_and_a_held_one_never(dtype):
    pool = OutputPool(SHAPE, dtype, capacity=8)
    first = pool.get()
    assert first.shape == SHAPE and first.dtype == dtype and first.is_contiguous()
    ptr = first.data_ptr()
    del first
    again = pool.get()
    assert again.data_ptr() == ptr  # recycled: nothing referred to it any more
    held = {"tensor": again, "view": None, "numpy": None, "graph": None}
    others = [pool.get() for _ in range(3)]
    assert ptr not in {t.data_ptr() for t in others}
    held["view"] = again[3:5]
    held["numpy"] = (again.view(torch.int16) if dtype == torch.bfloat16 else again).numpy()
    w = torch.ones(SHAPE[1], dtype=dtype, requires_grad=True)
    held["graph"] = (again * w).sum()  # the autograd graph saves `again` (for w's gradient)
    del others, again
    for name in ["tensor", "view", "numpy", "graph"]:
        got = [pool.get() for _ in range(4)]
        assert ptr not in {t.data_ptr() for t in got}, f"lent again while a {name} still refers to it"
        del got
        held[name] = None
        gc.collect()
    assert ptr in {t.data_ptr() for t in [pool.get() for _ in range(8)]}  # free once nothing holds it


def test_contents_the_caller_keeps_are_never_overwritten():
    pool = OutputPool(SHAPE, torch.float32, capacity=3)
    kept = []
    for k in range(10):
        t = pool.get()
        t.fill_(k)
        if k % 2 == 0:
            kept.append((k, t))
    assert all(torch.all(t == k) for k, t in kept)
    assert len({t.data_ptr() for _, t in kept}) == len(kept)  # beyond capacity: fresh tensors


def test_buffers_come_back_from_another_thread():
    """The batch thread lends, the training thread drops: the buffer returns to the pool."""
    import threading

    pool = OutputPool(SHAPE, torch.float32, capacity=2)
    box = []
    t = threading.Thread(target=lambda: box.append(pool.get()))
    t.start(), t.join()
    ptr = box[0].data_ptr()
    box.clear()  # dropped here, in the main thread
    done = []
    t = threading.Thread(target=lambda: done.append(pool.get().data_ptr()))
    t.start(), t.join()
    assert done == [ptr]


@pytest.mark.parametrize("src", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale", [None, 0.7310585786300049])
def test_convert_gives_the_bits_of_a_direct_rounding(src, scale):
    n = 3 * BLOCK_ROWS + 17  # several blocks and a short one
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32) * 40).to(src)
    for dtype in (torch.float32, torch.bfloat16):
        want = x.to(torch.float32) if scale is None else x.to(torch.float32) * scale
        got = convert(x, dtype, scale)
        assert got.dtype == dtype and torch.equal(got.view(torch.int16) if dtype == torch.bfloat16 else got,
                                                   want.to(dtype).view(torch.int16) if dtype == torch.bfloat16 else want)
        out = torch.empty((n, 8), dtype=dtype)
        assert convert(x, dtype, scale, out) is out and torch.equal(out, got)


def test_the_pool_keeps_recycling_when_the_caller_holds_every_buffer():
    pool = OutputPool(SHAPE, torch.float32, capacity=3)
    held = [pool.get().fill_(k) for k in range(5)]  # more than the pool keeps: the oldest are forgotten
    ptrs = set()
    for k in range(10):
        t = pool.get()
        t.fill_(-1.0)
        ptrs.add(t.data_ptr())
        del t
    assert len(ptrs) == 1  # one new pooled buffer, lent again and again
    assert ptrs.isdisjoint(t.data_ptr() for t in held)
    assert all(torch.all(t == k) for k, t in enumerate(held))
