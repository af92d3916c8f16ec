"""Cross entropy that never holds float32 copies of the whole logits: the causal-LM loss at long-context sizes.

At 32k tokens per rank and Llama 3's 128,256-entry vocabulary the logits alone are 8.4 GB in bf16, and
``F.cross_entropy(logits.float(), ...)`` adds a float32 copy (16.8 GB), the float32 log-softmax autograd saves
(16.8 GB) and a float32 gradient (16.8 GB) on top of the bf16 one. These functions do the same float32 math one
block of rows at a time:

* :func:`cross_entropy_sum` ``(logits [N, V], targets [N])``: autograd keeps the logits (a reference, not a
  copy) and two float32 numbers per row (its log-sum-exp as max and shifted log-sum); the backward writes the
  gradient straight in the logits' dtype.
  Extra memory: one block of rows in float32 (``block_bytes``, 256 MB by default) for float32 logits, two for
  16-bit ones (the block's float32 copy and its shifted exponentials), instead of ~50 GB above.
* :func:`linear_cross_entropy_sum` ``(hidden [N, H], weight [V, H], targets [N])``: the logits
  ``hidden @ weight.T`` (optionally scaled and soft-capped, as Granite and Gemma 2 do) are formed one block at a
  time and never exist whole; the backward recomputes each block. No logits-sized tensor at all: a few
  block-sized temporaries (the block in the matmul dtype, its float32 copy, the exponentials).

Both return the float32 *sum* over rows whose target is not ``ignore_index`` (divide by the count you want to
average over), are deterministic (a fixed block order, no atomics) and run on any device (plain torch ops).
"""
from __future__ import annotations

import math

import torch

from ring_attn._contracts import check_int, check_real, check_softcap, scalar_option

__all__ = ["cross_entropy_sum", "linear_cross_entropy_sum", "BLOCK_BYTES"]

BLOCK_BYTES = 256 * 2**20  # float32 bytes of one block of rows (rows = BLOCK_BYTES // (4 * vocab), at least 1)


def _rows_per_block(vocab: int, block_bytes: int) -> int:
    return max(1, int(block_bytes) // (4 * vocab))


def _check_targets(targets, lead: torch.Size, device) -> torch.Tensor:
    """``targets`` shaped as the rows ``lead`` (the logits' or hidden states' leading dims), or flat ``[N]``,
    as a flat int64 tensor on ``device``. Another shape of the same size (``[s, b]`` for ``[b, s]`` rows) would
    pair targets with the wrong rows: refused, as F.cross_entropy refuses it."""
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"targets must be an int32/int64 tensor, got "
                        f"{getattr(targets, 'dtype', type(targets).__name__)}")
    n = math.prod(lead)
    if targets.shape != lead and targets.shape != (n,):
        expected = f"[{n}]" if len(lead) == 1 else f"{list(lead)} or [{n}]"
        raise ValueError(f"targets have shape {tuple(targets.shape)}; expected {expected} (one per row)")
    return targets.reshape(-1).to(device=device, dtype=torch.int64)


def _check_ignore_index(value) -> int:
    ignore_index = check_int("ignore_index", value)
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64 (the targets' dtype), got {ignore_index}")
    return ignore_index


def _check_logit_scale(value) -> float:
    return check_real("logit_scale", scalar_option("logit_scale", value), "a finite number")


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The math dtype: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_target_values(targets: torch.Tensor, valid: torch.Tensor, vocab: int) -> None:
    # a target outside [0, vocab) on a row that is not ignored fails loudly, as F.cross_entropy does, instead of
    # reading another class's logit: on the host in eager CPU calls (naming the row and value), else a device-side
    # assert (no host read)
    bad = ((targets < 0) | (targets >= vocab)) & valid
    if targets.device.type == "cpu" and not torch.compiler.is_compiling():
        rows = bad.nonzero()
        if rows.numel():
            i = int(rows[0, 0])
            raise RuntimeError(f"cross entropy: targets[{i}] = {int(targets[i])} is outside [0, {vocab}) and is not "
                               f"ignore_index ({int(rows.shape[0])} such row(s))")
        return
    torch._assert_async(~bad.any(), f"cross entropy: targets hold a class outside [0, {vocab}) on a row that is "
                                    f"not ignore_index")


def _block_loss(x: torch.Tensor, t: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits block ``x`` [R, V] in the math dtype: (``[2, R]``: each row's max and the log of its shifted
    exponential sum, the summed NLL of the valid rows).

    The log-sum-exp is kept as its two parts, ``max + log(sum(exp(x - max)))``, never added into one number: at
    logits sharing a large offset (1e4) one float32 LSE carries a rounding error of half an ulp of the offset
    (5e-4) into every probability, where ``x - max`` is exact (F.cross_entropy's log_softmax does the same)."""
    m = x.amax(dim=-1)
    m = torch.where(torch.isfinite(m), m, 0.0)  # a row of -inf: log(0) = -inf below, as logsumexp
    log_sum = (x - m[:, None]).exp_().sum(dim=-1).log()  # one block-sized temporary
    picked = x.gather(1, _gather_index(t, valid))[:, 0]
    return torch.stack((m, log_sum)), torch.where(valid, (m - picked) + log_sum, 0.0).sum(dtype=torch.float64)


def _gather_index(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    # ignored rows read (and write) class 0: their ignore_index may be any int, e.g. vocab itself
    return torch.where(valid, t, 0)[:, None]


def _block_grad(x: torch.Tensor, lse: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, g) -> torch.Tensor:
    """d(sum NLL)/dx for the float32 block ``x``, times the upstream gradient ``g``: softmax - one-hot.
    ``lse``: :func:`_block_loss`'s ``[2, R]`` (row max, log of the shifted sum)."""
    p = (x - lse[0][:, None]).sub_(lse[1][:, None]).exp_()  # one block-sized temporary
    p.scatter_add_(1, _gather_index(t, valid), torch.full_like(lse[1], -1.0)[:, None])
    # ignored rows: exactly 0, also where their logits hold a NaN or an inf (F.cross_entropy gives NaN there)
    return p.mul_(g).masked_fill_(~valid[:, None], 0.0)


class _CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, rows):
        n, acc = logits.shape[0], _acc(logits.dtype)
        lse = torch.empty(2, n, dtype=acc, device=logits.device)
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        valid = targets != ignore_index
        _check_target_values(targets, valid, logits.shape[1])
        for s in range(0, n, rows):
            e = min(n, s + rows)
            lse[:, s:e], part = _block_loss(logits[s:e].to(acc), targets[s:e], valid[s:e])
            total += part
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index, ctx.rows = ignore_index, rows
        return total.to(acc)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        valid = targets != ctx.ignore_index
        g = g.to(lse.dtype)
        for s in range(0, logits.shape[0], ctx.rows):
            e = min(logits.shape[0], s + ctx.rows)
            grad[s:e] = _block_grad(logits[s:e].to(lse.dtype), lse[:, s:e], targets[s:e], valid[s:e], g)
        return grad, None, None, None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                      block_bytes: int = BLOCK_BYTES) -> torch.Tensor:
    """``F.cross_entropy(logits.float(), targets, ignore_index=..., reduction="sum")`` without float32 copies.

    Args:
        logits: ``[N, V]`` float16/bfloat16/float32/float64 (a ``[b, s, V]`` tensor is viewed as ``[b*s, V]``).
        targets: int ``[N]`` (or ``[b, s]``); rows equal to ``ignore_index`` add nothing and get zero gradient.
        ignore_index: any int (also one >= vocab, as F.cross_entropy).
        block_bytes: float32 bytes of one block of rows (memory of the temporaries), an int >= 1.

    Returns:
        float32 scalar (float64 for float64 logits): summed over the non-ignored rows (accumulated in float64),
        differentiable w.r.t. logits. As accurate as F.cross_entropy on the float32 logits, also for logits
        sharing a large offset (the log-sum-exp is kept as the row max and the log of the shifted sum).

    Raises:
        TypeError / ValueError naming the argument (dtypes, shapes, an empty vocabulary, a non-int
        ``ignore_index``, one outside int64, targets of another shape than the rows); a target outside ``[0, V)``
        that is not ignored raises RuntimeError, as in F.cross_entropy (eager CPU calls name the row and value;
        elsewhere a device-side assert, without a host read).
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point torch.Tensor, got "
                        f"{logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if logits.dim() < 2:
        raise ValueError(f"logits have shape {tuple(logits.shape)}; expected [N, vocab] (or [b, s, vocab])")
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ValueError(f"logits have shape {tuple(logits.shape)}: a vocabulary of 0 classes")
    ignore_index = _check_ignore_index(ignore_index)
    block_bytes = check_int("block_bytes", block_bytes, minimum=1)
    logits2 = logits.reshape(-1, vocab)
    t = _check_targets(targets, logits.shape[:-1], logits.device)
    return _CrossEntropySum.apply(logits2, t, ignore_index, _rows_per_block(vocab, block_bytes))


def _scaled_logits(z: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    x = z.to(_acc(z.dtype))
    if scale != 1.0:
        x = x * scale
    if softcap:
        x = torch.tanh(x / softcap) * softcap
    return x


class _LinearCrossEntropySum(torch.autograd.Function):
    # The matmuls run in ``mm_dtype`` with autocast off, in the forward and in the backward's recomputation alike
    # (autocast's dtype when the call was made under autocast, else the inputs'): recomputed logits must be the
    # forward's bit for bit, or softmax(x) - lse would not sum to one.
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, rows, scale, softcap, mm_dtype):
        n = hidden.shape[0]
        w = weight.to(mm_dtype)
        lse = torch.empty(2, n, dtype=_acc(mm_dtype), device=hidden.device)
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        valid = targets != ignore_index
        _check_target_values(targets, valid, weight.shape[0])
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, rows):
                e = min(n, s + rows)
                x = _scaled_logits(hidden[s:e].to(mm_dtype) @ w.t(), scale, softcap)
                lse[:, s:e], part = _block_loss(x, targets[s:e], valid[s:e])
                total += part
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.meta = (ignore_index, rows, scale, softcap, mm_dtype)
        return total.to(lse.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        hidden, weight, targets, lse = ctx.saved_tensors
        ignore_index, rows, scale, softcap, mm_dtype = ctx.meta
        valid = targets != ignore_index
        g = g.to(lse.dtype)
        w = weight.to(mm_dtype)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], rows):
                e = min(hidden.shape[0], s + rows)
                h = hidden[s:e].to(mm_dtype)
                x = _scaled_logits(h @ w.t(), scale, softcap)
                gx = _block_grad(x, lse[:, s:e], targets[s:e], valid[s:e], g)
                if softcap:
                    gx.mul_(1.0 - (x / softcap) ** 2)  # d(cap·tanh(u/cap))/du
                if scale != 1.0:
                    gx.mul_(scale)
                gz = gx.to(mm_dtype)
                if grad_h is not None:
                    grad_h[s:e] = gz @ w
                if grad_w is not None:
                    grad_w += gz.t() @ h
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             ignore_index: int = -100, logit_scale: float = 1.0, softcap: float = 0.0,
                             block_bytes: int = BLOCK_BYTES) -> torch.Tensor:
    """Cross entropy of the logits ``cap·tanh(scale·(hidden @ weight.T) / cap)`` without forming them whole.

    Args:
        hidden: ``[N, H]`` (or ``[b, s, H]``) last hidden states, float16/bfloat16/float32/float64.
        weight: ``[V, H]`` output embedding (``lm_head.weight``), same dtype and device as ``hidden``. Under
            autocast the matmuls run in autocast's dtype (as ``lm_head`` would), in the forward and in the
            backward's recomputation alike, and the dtypes may differ.
        targets: int ``[N]`` (or ``[b, s]``); ``ignore_index`` rows add nothing.
        logit_scale: multiplies the logits (Granite divides by ``config.logits_scaling``: pass its inverse).
        softcap: 0 = off; else Gemma 2's ``final_logit_softcapping``.
        ignore_index: any int, as :func:`cross_entropy_sum`.
        block_bytes: float32 bytes of one block of logits rows, an int >= 1.

    Returns:
        float32 scalar (float64 for float64 inputs), summed over the non-ignored rows; differentiable w.r.t.
        ``hidden`` and ``weight`` (the weight's gradient is accumulated in float32 over the blocks, then cast).
    """
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden has shape {tuple(hidden.shape)}; expected [N, hidden] (or [b, s, hidden])")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1] or weight.shape[0] == 0:
        raise ValueError(f"weight {tuple(weight.shape)} must be [vocab, hidden] with vocab >= 1 and hidden = "
                         f"{hidden.shape[-1]} (hidden {tuple(hidden.shape)})")
    autocast = torch.is_autocast_enabled(hidden.device.type)
    if weight.device != hidden.device or (weight.dtype != hidden.dtype and not autocast):
        raise TypeError(f"hidden ({hidden.dtype}, {hidden.device}) and weight ({weight.dtype}, {weight.device}) "
                        f"must share dtype and device (dtypes may differ under autocast)")
    mm_dtype = torch.get_autocast_dtype(hidden.device.type) if autocast else hidden.dtype
    ignore_index = _check_ignore_index(ignore_index)
    block_bytes = check_int("block_bytes", block_bytes, minimum=1)
    logit_scale = _check_logit_scale(logit_scale)
    softcap = check_softcap(softcap)
    h2 = hidden.reshape(math.prod(hidden.shape[:-1]), hidden.shape[-1])  # (-1 is ambiguous for hidden size 0)
    t = _check_targets(targets, hidden.shape[:-1], hidden.device)
    return _LinearCrossEntropySum.apply(h2, weight, t, ignore_index, _rows_per_block(weight.shape[0], block_bytes),
                                        logit_scale, softcap, mm_dtype)
