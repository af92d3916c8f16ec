"""Cross entropy that never holds float32 copies of the whole logits: the causal-LM loss at long-context sizes.

At 32k tokens per rank and Llama 3's 128,256-entry vocabulary the logits alone are 8.4 GB in bf16, and
``F.cross_entropy(logits.float(), ...)`` adds a float32 copy (16.8 GB), the float32 log-softmax autograd saves
(16.8 GB) and a float32 gradient (16.8 GB) on top of the bf16 one. These functions do the same float32 math one
block of rows at a time:

* :func:`cross_entropy_sum` ``(logits [N, V], targets [N])``: autograd keeps the logits (a reference, not a
  copy) and one float32 log-sum-exp per row; the backward writes the gradient straight in the logits' dtype.
  Extra memory: one block of rows in float32 (``block_bytes``, 256 MB by default) instead of ~50 GB above.
* :func:`linear_cross_entropy_sum` ``(hidden [N, H], weight [V, H], targets [N])``: the logits
  ``hidden @ weight.T`` (optionally scaled and soft-capped, as Granite and Gemma 2 do) are formed one block at a
  time and never exist whole; the backward recomputes each block. No logits-sized tensor at all.

Both return the float32 *sum* over rows whose target is not ``ignore_index`` (divide by the count you want to
average over), are deterministic (a fixed block order, no atomics) and run on any device (plain torch ops).
"""
from __future__ import annotations

import torch

__all__ = ["cross_entropy_sum", "linear_cross_entropy_sum", "BLOCK_BYTES"]

BLOCK_BYTES = 256 * 2**20  # float32 bytes of one block of rows (rows = BLOCK_BYTES // (4 * vocab), at least 1)


def _rows_per_block(vocab: int, block_bytes: int) -> int:
    return max(1, int(block_bytes) // (4 * vocab))


def _check_targets(targets: torch.Tensor, n: int, device) -> torch.Tensor:
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"targets must be an int32/int64 tensor, got "
                        f"{getattr(targets, 'dtype', type(targets).__name__)}")
    if targets.shape != (n,):
        raise ValueError(f"targets have shape {tuple(targets.shape)}; expected [{n}] (one per row)")
    return targets.to(device=device, dtype=torch.int64)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The math dtype: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_target_values(targets: torch.Tensor, valid: torch.Tensor, vocab: int) -> None:
    # a device-side check (no host read): a target outside [0, vocab) on a row that is not ignored fails loudly,
    # as F.cross_entropy does, instead of reading another class's logit
    torch._assert_async(((targets >= 0) & (targets < vocab) | ~valid).all(),
                        f"cross entropy: a target outside [0, {vocab}) that is not ignore_index")


def _block_loss(x: torch.Tensor, t: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits block ``x`` [R, V] in the math dtype: (log-sum-exp per row, summed NLL of the valid rows)."""
    lse = torch.logsumexp(x, dim=-1)
    picked = x.gather(1, t.clamp(min=0)[:, None])[:, 0]
    return lse, torch.where(valid, lse - picked, 0.0).sum(dtype=torch.float64)


def _block_grad(x: torch.Tensor, lse: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, g) -> torch.Tensor:
    """d(sum NLL)/dx for the float32 block ``x``, times the upstream gradient ``g``: softmax - one-hot."""
    p = torch.exp(x - lse[:, None])
    p.scatter_add_(1, t.clamp(min=0)[:, None], torch.full_like(lse, -1.0)[:, None])
    return p.mul_(torch.where(valid, g, 0.0)[:, None])


class _CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, rows):
        n, acc = logits.shape[0], _acc(logits.dtype)
        lse = torch.empty(n, dtype=acc, device=logits.device)
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        valid = targets != ignore_index
        _check_target_values(targets, valid, logits.shape[1])
        for s in range(0, n, rows):
            e = min(n, s + rows)
            lse[s:e], part = _block_loss(logits[s:e].to(acc), targets[s:e], valid[s:e])
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
            grad[s:e] = _block_grad(logits[s:e].to(lse.dtype), lse[s:e], targets[s:e], valid[s:e], g)
        return grad, None, None, None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                      block_bytes: int = BLOCK_BYTES) -> torch.Tensor:
    """``F.cross_entropy(logits.float(), targets, ignore_index=..., reduction="sum")`` without float32 copies.

    Args:
        logits: ``[N, V]`` float16/bfloat16/float32/float64 (a ``[b, s, V]`` tensor is viewed as ``[b*s, V]``).
        targets: int ``[N]`` (or ``[b, s]``); rows equal to ``ignore_index`` add nothing and get zero gradient.
        block_bytes: float32 bytes of one block of rows (memory of the temporaries).

    Returns:
        float32 scalar (float64 for float64 logits): summed over the non-ignored rows (accumulated in float64),
        differentiable w.r.t. logits.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
    if logits.dim() < 2:
        raise ValueError(f"logits have shape {tuple(logits.shape)}; expected [N, vocab] (or [b, s, vocab])")
    vocab = logits.shape[-1]
    logits2 = logits.reshape(-1, vocab)
    t = _check_targets(targets.reshape(-1) if isinstance(targets, torch.Tensor) else targets, logits2.shape[0],
                       logits.device)
    return _CrossEntropySum.apply(logits2, t, int(ignore_index), _rows_per_block(vocab, block_bytes))


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
        lse = torch.empty(n, dtype=_acc(mm_dtype), device=hidden.device)
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        valid = targets != ignore_index
        _check_target_values(targets, valid, weight.shape[0])
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, rows):
                e = min(n, s + rows)
                x = _scaled_logits(hidden[s:e].to(mm_dtype) @ w.t(), scale, softcap)
                lse[s:e], part = _block_loss(x, targets[s:e], valid[s:e])
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
                gx = _block_grad(x, lse[s:e], targets[s:e], valid[s:e], g)
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
        block_bytes: float32 bytes of one block of logits rows.

    Returns:
        float32 scalar (float64 for float64 inputs), summed over the non-ignored rows; differentiable w.r.t.
        ``hidden`` and ``weight`` (the weight's gradient is accumulated in float32 over the blocks, then cast).
    """
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [vocab, hidden] with hidden = "
                         f"{hidden.shape[-1]} (hidden {tuple(hidden.shape)})")
    autocast = torch.is_autocast_enabled(hidden.device.type)
    if weight.device != hidden.device or (weight.dtype != hidden.dtype and not autocast):
        raise TypeError(f"hidden ({hidden.dtype}, {hidden.device}) and weight ({weight.dtype}, {weight.device}) "
                        f"must share dtype and device (dtypes may differ under autocast)")
    mm_dtype = torch.get_autocast_dtype(hidden.device.type) if autocast else hidden.dtype
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 = off), got {softcap}")
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t = _check_targets(targets.reshape(-1) if isinstance(targets, torch.Tensor) else targets, h2.shape[0],
                       hidden.device)
    return _LinearCrossEntropySum.apply(h2, weight, t, int(ignore_index),
                                        _rows_per_block(weight.shape[0], block_bytes), float(logit_scale),
                                        float(softcap), mm_dtype)
