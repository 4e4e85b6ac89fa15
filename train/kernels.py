"""Sparse encoder/decoder kernels for TopK-style SAEs.

Layouts: x [B, d], W_enc [d, m] (row-major), b_enc [m], W_dec [m, d]. An active set of n
latents is kept flat and sorted by row: `rows`, `cols` [n] int64 and `vals` [n], with
`offsets` [B] the start of each row's run (torch.embedding_bag's convention). TopK has exactly
k entries per row (n = B*k, also passed as [B, k]); BatchTopK has n = B*k in total and a
variable number per row, possibly zero.

The forward still forms the dense pre-activations (choosing the top k needs all of them), but
the backward touches only the n active entries: O(n*d) work instead of the dense O(B*m*d), and
no [n, d] temporary, since every gradient is an embedding_bag or index_add reduction.

Threshold rules (Vanilla's ReLU, JumpReLU) have no fixed k: `select_above` lists the entries
of the dense pre-activations above a floor (row-sorted, as BatchTopK's), or gives None when they
are more than a budget, and `SelectedEncode` gathers them with the same sparse backward.

`CenteredEncode` is the dense encoder (x - b_dec) @ W_enc + b_enc with b_dec's gradient taken
as a matvec instead of a [B, m] x [m, d] matmul. `batch_topk` selects BatchTopK's k*B entries
(on the CPU through a sampled threshold, since a top-k over the flattened batch is one long
single-threaded selection).
"""
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor


def _autocast_state(x: Tensor) -> tuple[str, torch.dtype] | None:
    """The autocast (device type, dtype) active in a forward, to replay in its backward (what
    torch.amp.custom_bwd does, for any device type); None when autocast is off."""
    dev = x.device.type
    return (dev, torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else None


def _replay_autocast(ctx):
    return torch.autocast(*ctx.amp) if ctx.amp else nullcontext()


def row_offsets(rows: Tensor, n_rows: int) -> Tensor:
    """Start of each row's run in a sorted index list. rows [n] -> offsets [n_rows]."""
    return torch.searchsorted(rows, torch.arange(n_rows, device=rows.device))  # no host sync, unlike bincount


def sparse_decode(vals: Tensor, idx: Tensor, W_dec: Tensor, offsets: Tensor | None = None) -> Tensor:
    """out[b] = sum_j vals[b, j] * W_dec[idx[b, j]] -> [B, d]; no bias.

    vals, idx: [B, k]; or flat [n] with offsets [B] (row-sorted). Differentiable in vals and W_dec.
    Under autocast vals may be bfloat16: the sum is taken in W_dec's dtype.
    """
    return F.embedding_bag(idx, W_dec, offsets, mode="sum", per_sample_weights=vals.to(W_dec.dtype))


class CenteredEncode(torch.autograd.Function):
    """pre = CenteredEncode.apply(x, b_dec, W_enc, b_enc) = (x - b_dec) @ W_enc + b_enc. x [B, d] -> [B, m].

    Same forward as autograd's addmm; the backward gives b_dec the gradient -W_enc @ sum_B(grad)
    (a matvec) where autograd would form the [B, d] gradient of x - b_dec with a matmul as large as
    the forward one and sum it, and forms that gradient only when x itself needs one.
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc):
        xc = x - b_dec
        ctx.save_for_backward(xc, W_enc)
        ctx.amp = _autocast_state(x)
        return torch.addmm(b_enc, xc, W_enc)

    @staticmethod
    def backward(ctx, grad):
        with _replay_autocast(ctx):
            return CenteredEncode._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        xc, W_enc = ctx.saved_tensors
        need_x, need_bdec, need_W, need_b = ctx.needs_input_grad
        grad_x = grad_bdec = grad_W = grad_b = None
        if need_x:
            grad_x = grad @ W_enc.t()
        if need_bdec or need_b:
            gsum = grad.sum(0)
            grad_b = gsum if need_b else None
            grad_bdec = -(W_enc @ gsum) if need_bdec else None
        if need_W:
            grad_W = xc.t() @ grad
        return grad_x, grad_bdec, grad_W, grad_b


def batch_topk(pre: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The n largest entries of relu(pre) over the whole batch. pre [B, m] -> (values [n], flat indices [n]).

    Flat index i is row i // m, column i % m; the indices come back ascending (row-sorted). Exact
    up to the choice among tied values (when fewer than n entries are positive, which zeros fill
    the list differs from torch.topk's choice; they are inactive either way).
    On the CPU, instead of one top-k over all B*m entries (single-threaded): a threshold t below
    the n-th largest entry is read off every 97th entry (a fixed prime stride, no RNG; every
    entry for small inputs) with a 1.5x margin; the entries >= t (about 1.5n, found in one
    parallel pass, already in row order) are checked to number at least n, and the n largest of
    them are kept by their exact n-th value. When the check fails, on NaN, when n > B*m / 8, or
    on CUDA, it is the plain flattened top-k.
    """
    B, m = pre.shape
    flat = pre.reshape(-1)
    if pre.device.type == "cpu" and 8 * n <= flat.numel():
        sample = flat[:: 97 if flat.numel() >= 97 * 4096 else 1]
        if not bool(torch.isnan(sample).any()):  # NaN rows or columns: leave them to topk (it ranks NaN first)
            s = sample.numel()
            r = min(s, int(1.5 * n * s / flat.numel()) + 32)  # rank from the top of the threshold in the sample
            t = sample.kthvalue(s - r + 1).values
            cand = (flat >= t).nonzero().squeeze(1)
            if cand.numel() >= n:
                v = flat[cand]
                nth = v.kthvalue(v.numel() - n + 1).values  # the exact n-th largest entry
                keep = v > nth
                tied = v == nth
                keep |= tied & (tied.cumsum(0) <= n - int(keep.sum()))  # the first ties, up to n in all
                return v[keep].relu(), cand[keep]
    top, idx = pre.relu().flatten().topk(n, sorted=False)
    idx, order = idx.sort()
    return top[order], idx


def _save_active(ctx, xc: Tensor, W_enc: Tensor, rows: Tensor, cols: Tensor, offsets: Tensor, pre_sel: Tensor):
    """Keep what the sparse backward needs: xc = x - center [B, d]; pre_sel [n] the selected
    pre-activations (pre-ReLU)."""
    ctx.save_for_backward(xc, W_enc, rows, cols, offsets, pre_sel > 0)


def _encoder_grads(ctx, grad_vals: Tensor):
    """Gradients of vals[j] = relu((x - center)[rows[j]] @ W_enc[:, cols[j]] + b_enc[cols[j]]) for
    x, center, W_enc, b_enc (the Function's first four inputs)."""
    xc, W_enc, rows, cols, offsets, active = ctx.saved_tensors
    g = (grad_vals.reshape(-1) * active).to(W_enc.dtype)  # [n], zero where the ReLU is off
    return _centered_grads(xc, W_enc, rows, cols, offsets, g, ctx.needs_input_grad[:4])


def _centered_grads(xc: Tensor, W_enc: Tensor, rows: Tensor, cols: Tensor, offsets: Tensor, g: Tensor,
                    needs: tuple[bool, bool, bool, bool], by_column: tuple[Tensor, Tensor] | None = None):
    """Gradients for (x, center, W_enc, b_enc) of sum_j g[j] * z_j, z_j = (x - center)[rows[j]] @
    W_enc[:, cols[j]] + b_enc[cols[j]], None where not needed: center's is the matvec
    -W_enc @ grad_b_enc (as CenteredEncode's), so no [B, d] gradient is formed unless x needs one."""
    need_x, need_center, need_W, need_b = needs
    grad_x, grad_W, grad_b = _active_grads(xc, W_enc, rows, cols, offsets, g, need_x, need_W, need_b or need_center,
                                           by_column)
    grad_center = -(W_enc @ grad_b) if need_center else None
    return grad_x, grad_center, grad_W, grad_b if need_b else None


def column_order(cols: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """The active entries by column: (order [n], the permutation sorting cols; by_col [m], each
    column's start in cols[order])."""
    order = torch.argsort(cols)
    return order, row_offsets(cols[order], m)


def _active_grads(x: Tensor, W_enc: Tensor, rows: Tensor, cols: Tensor, offsets: Tensor, g: Tensor,
                  need_x: bool, need_W: bool, need_b: bool, by_column: tuple[Tensor, Tensor] | None = None):
    """Gradients for x, W_enc, b_enc (None where not needed) of sum_j g[j] * (x[rows[j]] @ W_enc[:, cols[j]] + b_enc[cols[j]]).
    by_column: column_order(cols, m) when already computed."""
    grad_x = grad_W = grad_b = None
    if need_x:  # grad_x[b] = sum_j g[j] * W_enc[:, cols[j]] over row b's run
        # A contiguous [m, d] copy: embedding_bag on the transposed view is several times slower.
        grad_x = F.embedding_bag(cols, W_enc.t().contiguous(), offsets, mode="sum", per_sample_weights=g)
    m = W_enc.shape[1]
    if need_W:  # grad_W[:, c] = sum_j g[j] * x[rows[j]] over entries with cols[j] = c
        order, by_col = by_column if by_column is not None else column_order(cols, m)
        grad_W = F.embedding_bag(rows[order], x, by_col, mode="sum", per_sample_weights=g[order]).t()
    if need_b:
        grad_b = torch.zeros(m, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
    return grad_x, grad_W, grad_b


class TopKEncode(torch.autograd.Function):
    """vals, idx, pre = TopKEncode.apply(x, center, W_enc, b_enc, k).

    pre = (x - center) @ W_enc + b_enc [B, m] (returned without grad); idx [B, k] the k largest
    per row; vals = relu(pre.gather(1, idx)) [B, k]. Backward is sparse in the B*k active entries
    (center's gradient a matvec: _centered_grads).
    """

    @staticmethod
    def forward(ctx, x, center, W_enc, b_enc, k):
        ctx.set_materialize_grads(False)  # else autograd fills a [B, m] zero gradient for pre every step
        x = x - center
        pre = torch.addmm(b_enc, x, W_enc)
        top, idx = pre.topk(k, dim=1, sorted=False)
        B = x.shape[0]
        rows = torch.arange(B, device=x.device)[:, None].expand(B, k).reshape(-1)
        offsets = torch.arange(B, device=x.device) * k
        _save_active(ctx, x, W_enc, rows, idx.reshape(-1), offsets, top.reshape(-1))
        ctx.mark_non_differentiable(idx, pre)
        return top.relu(), idx, pre

    @staticmethod
    def backward(ctx, grad_vals, _grad_idx, _grad_pre):
        if grad_vals is None:  # vals reached no loss
            return None, None, None, None, None
        return *_encoder_grads(ctx, grad_vals), None


class BatchTopKEncode(torch.autograd.Function):
    """vals, rows, cols, offsets, pre = BatchTopKEncode.apply(x, center, W_enc, b_enc, k).

    Keeps the k*B largest entries of relu((x - center) @ W_enc + b_enc) over the whole batch, as a
    flat row-sorted list: vals, rows, cols [k*B], offsets [B]; pre [B, m] is returned without grad.
    """

    @staticmethod
    def forward(ctx, x, center, W_enc, b_enc, k):
        ctx.set_materialize_grads(False)  # else autograd fills a [B, m] zero gradient for pre every step
        x = x - center
        pre = torch.addmm(b_enc, x, W_enc)
        B, m = pre.shape
        top, flat = batch_topk(pre, k * B)
        rows, cols = flat // m, flat % m
        offsets = row_offsets(rows, B)
        _save_active(ctx, x, W_enc, rows, cols, offsets, top)
        ctx.mark_non_differentiable(rows, cols, offsets, pre)
        return top, rows, cols, offsets, pre

    @staticmethod
    def backward(ctx, grad_vals, *_unused):
        if grad_vals is None:  # vals reached no loss
            return None, None, None, None, None
        return *_encoder_grads(ctx, grad_vals), None


SELECT_ROWS = 256  # rows per block of select_above's comparison: the block's bool mask stays in cache


def select_above(pre: Tensor, floor: Tensor | float, max_n: int) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """The entries of pre [B, m] with pre > floor (a scalar or [m]), row-sorted: (flat indices
    b * m + i, rows, cols [n] int64, offsets [B]); None when there are more than max_n of them
    (the count is one host sync). Not differentiated. Compared and listed by blocks of
    SELECT_ROWS rows into one reused mask (on the CPU a [B, m] bool mask written and read back
    costs twice the blocks' time)."""
    B, m = pre.shape
    with torch.no_grad():
        flat = pre.reshape(-1)
        block = SELECT_ROWS * m
        mask = torch.empty(min(block, flat.numel()), dtype=torch.bool, device=pre.device)
        # a block of floors, also for a scalar one: on the CPU gt against a Python number runs ~1.5x slower
        floor = floor if isinstance(floor, Tensor) else torch.tensor(floor, dtype=pre.dtype, device=pre.device)
        floor_row = floor.expand(m).repeat(min(SELECT_ROWS, B))  # a tensor floor keeps its dtype (no rounding)
        parts, n = [], 0
        for start in range(0, flat.numel(), block):
            chunk = flat[start:start + block]
            torch.gt(chunk, floor_row[:chunk.numel()], out=mask[:chunk.numel()])
            idx = mask[:chunk.numel()].nonzero().squeeze(1)
            n += idx.numel()
            if n > max_n:
                return None
            parts.append(idx.add_(start))
        idx = torch.cat(parts) if len(parts) > 1 else parts[0]
        rows = idx.div(m, rounding_mode="floor")
        return idx, rows, idx - rows * m, row_offsets(rows, B)


class SelectedEncode(torch.autograd.Function):
    """z = SelectedEncode.apply(x, center, W_enc, b_enc, pre, flat, rows, cols, offsets) = pre[rows, cols] [n].

    pre [B, m] must equal (x - center) @ W_enc + b_enc at the listed entries (it is not
    differentiated); flat = rows * m + cols, rows, cols [n] row-sorted with offsets [B]
    (select_above). The gradient of z (the raw pre-activation, no ReLU) reaches W_enc and b_enc
    through the n entries only, and center as the matvec -W_enc @ grad_b_enc (CenteredEncode's),
    so no [B, d] gradient is formed unless x itself needs one.
    """

    @staticmethod
    def forward(ctx, x, center, W_enc, b_enc, pre, flat, rows, cols, offsets, order, by_col):
        ctx.save_for_backward(x - center, W_enc, rows, cols, offsets, order, by_col)
        return pre.reshape(-1)[flat]

    @staticmethod
    def backward(ctx, grad):
        xc, W_enc, rows, cols, offsets, order, by_col = ctx.saved_tensors
        return *_centered_grads(xc, W_enc, rows, cols, offsets, grad.to(W_enc.dtype), ctx.needs_input_grad[:4],
                                (order, by_col)), *[None] * 7


class SelectedDecode(torch.autograd.Function):
    """out = SelectedDecode.apply(vals, W_dec, rows, cols, offsets, order, by_col) [B, d]:
    sparse_decode(vals, cols, W_dec, offsets) of a row-sorted flat list, with (order, by_col) =
    column_order(cols, m) shared with SelectedEncode's backward.

    The forward is embedding_bag without autograd (with it, torch keeps the bookkeeping of its own
    backward: about 3x the time on the CPU); the backward gives vals the dots
    <grad[rows[j]], W_dec[cols[j]]> (embedding_bag's per-sample-weight gradient, offset2bag = rows)
    and W_dec the per-column sums of vals[j] grad[rows[j]] (an embedding_bag over grad by column).
    Under autocast vals may be bfloat16: the sums are taken in W_dec's dtype."""

    @staticmethod
    def forward(ctx, vals, W_dec, rows, cols, offsets, order, by_col):
        w = vals.to(W_dec.dtype)
        ctx.save_for_backward(w, W_dec, rows, cols, offsets, order, by_col)
        ctx.vals_dtype = vals.dtype
        # detached: embedding_bag picks its bookkeeping-free kernel only for inputs without requires_grad
        return F.embedding_bag(cols, W_dec.detach(), offsets, mode="sum", per_sample_weights=w.detach())

    @staticmethod
    def backward(ctx, grad):
        w, W_dec, rows, cols, offsets, order, by_col = ctx.saved_tensors
        grad = grad.to(W_dec.dtype).contiguous()
        grad_vals = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_vals = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad, W_dec, cols, offsets, rows, 0, -1).to(ctx.vals_dtype)  # mode 0: sum; no padding index
        if ctx.needs_input_grad[1]:
            grad_W = F.embedding_bag(rows[order], grad, by_col, mode="sum", per_sample_weights=w[order])
        return grad_vals, grad_W, None, None, None, None, None
