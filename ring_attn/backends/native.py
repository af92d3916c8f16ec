"""The native CPU backend: C++17/OpenMP kernels in ``ring_attn._C`` (built from ``csrc/`` by ``setup.py``).

Implements the launcher protocol of :mod:`ring_attn.backends.protocol` for CPU tensors. The extension does not
link libtorch: every tensor is passed as its data pointer, a dtype code and element strides, so one build keeps
working across torch releases. Kernels release the GIL and use ``torch.get_num_threads()`` OpenMP threads.

Supported: CPU tensors; attention storage fp32/fp16/bf16 (fp32 math), any head dim, dense and varlen, merge,
accumulate/overwrite, causal (explicit offset or bottom-right), window, softcap, GQA, ALiBi slopes (fp32
``[n_batch, h_q]``, any strides, read in place), attention dropout (the contract's Philox mask); RoPE storage
fp16/bf16/fp32 (fp32 math) and fp64 (fp64 math), angle and table mode, both pairings, dtheta.
Backward results are deterministic (bitwise) for any thread count.

This module imports ``ring_attn._C`` unconditionally: it is imported only when the native backend is chosen.
"""
from __future__ import annotations

from typing import Optional

import torch

import ring_attn._C as _C  # (missing: ModuleNotFoundError, which pytest.importorskip skips on every pytest)
from ring_attn._contracts import last_dim_contiguous

NAME = "native"

__all__ = ["NAME", "attention_forward", "attention_delta", "attention_backward", "rope"]

_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3, torch.int32: 4, torch.int64: 5}


def _code(t: torch.Tensor) -> int:
    try:
        return _CODES[t.dtype]
    except KeyError:
        raise TypeError(f"native backend: dtype {t.dtype} is not supported") from None


def _t4(x: torch.Tensor) -> tuple:
    """``(ptr, dtype, stride_b, stride_s, stride_h)`` of a dense ``[b, s, h, d]`` or packed ``[t, h, d]``
    tensor (packed: batch stride 0, rows addressed through the sequence starts)."""
    if not last_dim_contiguous(x):
        raise ValueError(f"native backend: the last dim must be contiguous, got strides {tuple(x.stride())}")
    if x.dim() == 4:
        return (x.data_ptr(), _code(x), x.stride(0), x.stride(1), x.stride(2))
    return (x.data_ptr(), _code(x), 0, x.stride(0), x.stride(1))


def _l3(x: torch.Tensor, f64_ok: bool = False) -> tuple:
    """``(ptr, stride_b, stride_h)`` of an fp32 LSE-layout ``[b, h, s]`` (packed ``[h, t]``) tensor (fp64 too
    with ``f64_ok``: the running LSE a forward merges into)."""
    if x.dtype != torch.float32 and not (f64_ok and x.dtype == torch.float64):
        raise TypeError(f"native backend: LSE-layout tensors must be float32{' or float64' if f64_ok else ''}, "
                        f"got {x.dtype}")
    if not last_dim_contiguous(x):
        raise ValueError(f"native backend: LSE-layout tensors need unit stride along s, got {tuple(x.stride())}")
    if x.dim() == 3:
        return (x.data_ptr(), x.stride(0), x.stride(1))
    return (x.data_ptr(), 0, x.stride(0))


def _seq_args(seqs, q: torch.Tensor, k: torch.Tensor):
    """``(shape, seqs tuple, packed, keep-alive tensors)`` for the extension."""
    h_q, d, h_kv = q.shape[-2], q.shape[-1], k.shape[-2]
    if seqs is None:
        b, s_q = q.shape[0], q.shape[1]
        return (b, s_q, k.shape[1], h_q, h_kv, d), (0,) * 6, False, ()
    parts = [t.to(device="cpu", dtype=torch.int32).contiguous()
             for t in (seqs.starts_q, seqs.lens_q, seqs.starts_k, seqs.lens_k)]
    shape = (parts[0].numel(), q.shape[0], k.shape[0], h_q, h_kv, d)
    seq = tuple(p.data_ptr() for p in parts) + (int(seqs.max_len_q), int(seqs.max_len_k))
    return shape, seq, True, parts


def _mask_args(causal, causal_offset, window, softcap):
    left, right = (-1, -1) if window is None else (int(window[0]), int(window[1]))
    return (bool(causal), causal_offset is None, 0 if causal_offset is None else int(causal_offset),
            left, right, float(softcap or 0.0))


def _alibi_args(alibi: Optional[torch.Tensor]) -> tuple:
    """``(ptr, stride_b, stride_h)`` of fp32 ``[n_batch, h_q]`` ALiBi slopes (any strides, e.g. a batch stride
    of 0 for per-head slopes), or ``(0, 0, 0)`` without ALiBi."""
    if alibi is None:
        return (0, 0, 0)
    if alibi.dtype != torch.float32 or alibi.dim() != 2:
        raise TypeError(f"native backend: alibi must be a float32 [n_batch, h_q] tensor, got {alibi.dtype} "
                        f"of shape {tuple(alibi.shape)}")
    return (alibi.data_ptr(), alibi.stride(0), alibi.stride(1))


def _dropout_args(dropout) -> tuple:
    """``((enabled, seed, rows, groups, row0), threshold, scale)`` of a ``ring_attn._contracts.Dropout`` (the
    mask is the contract's Philox function: the same bits as the Triton and reference backends), or off."""
    if dropout is None:
        return (0, 0, 0, 0, 0), 0, 1.0
    return (1, int(dropout.seed), int(dropout.rows), int(dropout.groups), int(dropout.row0)), \
        int(dropout.threshold), float(dropout.scale)


def attention_forward(q, k, v, out, lse, *, softmax_scale: float, causal: bool, causal_offset: Optional[int],
                      seqs, merge: bool, window=(-1, -1), softcap: float = 0.0, alibi=None,
                      num_splits: int = 0, dropout=None, pages=None) -> None:
    """Protocol ``attention_forward`` (see :mod:`ring_attn.backends.protocol`): writes ``out``/``lse`` in place.
    ``alibi``: None or fp32 ``[n_batch, h_q]`` slopes (any strides). ``num_splits``: ignored (each row's keys
    are one pass on a CPU thread). ``dropout``: a ``ring_attn._contracts.Dropout`` or None. ``pages`` must be None
    (not in this backend's capabilities: the ops layer gathers a paged cache's rows before calling)."""
    del num_splits
    if pages is not None:
        raise NotImplementedError("native backend: reads no page table (the ops layer gathers the pages first)")
    shape, seq, packed, keep = _seq_args(seqs, q, k)
    _C.attention_forward(_t4(q), _t4(k), _t4(v), _t4(out), _l3(lse, f64_ok=merge), shape, seq, packed,
                         float(softmax_scale), *_mask_args(causal, causal_offset, window, softcap), _alibi_args(alibi),
                         *_dropout_args(dropout), bool(merge), lse.dtype == torch.float64, torch.get_num_threads())
    del keep


def attention_delta(dout, out, delta, dlse) -> None:
    """Protocol ``attention_delta``: ``delta = rowsum(dout · out) - dlse`` (fp32, LSE layout)."""
    if out.dim() == 4:
        b, s, h, d = out.shape
    else:
        b, (s, h, d) = 1, out.shape
    _C.attention_delta(_t4(dout), _t4(out), _l3(delta), _l3(dlse) if dlse is not None else (0, 0, 0),
                       dlse is not None, b, s, h, d, torch.get_num_threads())


def attention_backward(dout, q, k, v, lse, delta, dq, dk, dv, *, softmax_scale: float, causal: bool,
                       causal_offset: Optional[int], seqs, accumulate: bool, window=(-1, -1),
                       softcap: float = 0.0, alibi=None, dropout=None) -> None:
    """Protocol ``attention_backward``: gradients added into (``accumulate``) or written to dq/dk/dv.
    ``alibi``: None or fp32 ``[n_batch, h_q]`` slopes (any strides; they get no gradient). ``dropout``: the
    forward's ``ring_attn._contracts.Dropout`` or None."""
    shape, seq, packed, keep = _seq_args(seqs, q, k)
    _C.attention_backward(_t4(dout), _t4(q), _t4(k), _t4(v), _l3(lse), _l3(delta), _t4(dq), _t4(dk), _t4(dv),
                          shape, seq, packed, float(softmax_scale),
                          *_mask_args(causal, causal_offset, window, softcap), _alibi_args(alibi),
                          *_dropout_args(dropout), bool(accumulate), torch.get_num_threads())
    del keep


def _r4(x: Optional[torch.Tensor]) -> tuple:
    """``(ptr, dtype, sb, ss, sh, sd)`` of a 4-D view (strides of size-1 dims set to 0)."""
    if x is None:
        return (0, 0, 0, 0, 0, 0)
    st = tuple(s if n != 1 else 0 for s, n in zip(x.stride(), x.shape))
    return (x.data_ptr(), _code(x)) + st


def _table(x: Optional[torch.Tensor]) -> tuple:
    """A ``[B or 1, S, ROT]`` table as ``(ptr, dtype, sb, ss, 0, sd)``."""
    if x is None:
        return (0, 0, 0, 0, 0, 0)
    sb, ss, sd = (s if n != 1 else 0 for s, n in zip(x.stride(), x.shape))
    return (x.data_ptr(), _code(x), sb, ss, 0, sd)


def rope(q4, k4, qo4, ko4, *, rotary_dim: int, interleaved: bool, backward: bool, copy_pass: bool,
         pos2=None, inv_freq=None, scaling: float = 1.0, cos3=None, sin3=None, qy4=None, ky4=None,
         dtheta=None) -> None:
    """Protocol ``rope``: one rotary pass over ``B*S`` tokens of q and k (see the protocol for modes)."""
    B, S, HQ, D = q4.shape
    HK = k4.shape[2]
    use_table = cos3 is not None
    need_dtheta = dtheta is not None
    keep = []
    pos = (0, 4, 0, 0)
    inv = (0, 0)
    if not use_table:
        pb, ps = (s if n != 1 else 0 for s, n in zip(pos2.stride(), pos2.shape))
        pos = (pos2.data_ptr(), _code(pos2), pb, ps)
        invc = inv_freq.contiguous()
        keep.append(invc)
        inv = (invc.data_ptr(), _code(invc))
    dth = (0, 0)
    if need_dtheta:
        if not dtheta.is_contiguous():
            raise ValueError("native backend: dtheta must be contiguous [B*S, rotary_dim/2]")
        dth = (dtheta.data_ptr(), _code(dtheta))
    _C.rope(_r4(q4), _r4(k4), _r4(qo4), _r4(ko4), _r4(qy4), _r4(ky4), _table(cos3), _table(sin3),
            (B, S, HQ, HK, D, int(rotary_dim)), bool(interleaved), bool(backward),
            bool(copy_pass) and D > rotary_dim, use_table, need_dtheta, pos, inv, float(scaling), dth,
            torch.get_num_threads())
    del keep
