"""Host launcher of the Triton RoPE kernel: the ``rope`` function of the backend protocol
(``ring_attn/backends/protocol.py``). The ops layer (``ring_attn.ops.rope``) validates every argument first.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ring_attn.backends import interpreter_enabled
from ring_attn.backends.triton.rope_kernels import rope_kernel

__all__ = ["rope"]

# Elements per [tokens, pairs] tile: with 4 warps, 1024 is 8 per thread (one 16-byte load of bf16 per half-split
# member per head), and every thread computes the cos/sin of its own 8 (token, pair) elements once, for all heads.
_TILE_ELEMENTS = 1024
_NUM_WARPS = 4


def rope(q4: torch.Tensor, k4: torch.Tensor, qo4: torch.Tensor, ko4: torch.Tensor, *, rotary_dim: int,
         interleaved: bool, backward: bool, copy_pass: bool, pos2: Optional[torch.Tensor],
         inv_freq: Optional[torch.Tensor], scaling: float, cos3: Optional[torch.Tensor],
         sin3: Optional[torch.Tensor], qy4: Optional[torch.Tensor], ky4: Optional[torch.Tensor],
         dtheta: Optional[torch.Tensor]) -> None:
    """Protocol ``rope``: one launch over ``B*S`` tokens, ``BLOCK_T`` consecutive tokens per program. All
    q/k-like tensors are 4-D ``[B, S, H, D]`` views (any strides); ``pos2`` is ``[B or 1, S]``;
    ``cos3``/``sin3`` are ``[B or 1, S, ROT]``."""
    B, S, HQ, D = q4.shape
    HK = k4.shape[2]
    if B * S == 0:
        return
    half = rotary_dim // 2
    block_f = triton.next_power_of_2(half)
    n_tokens = B * S
    block_t = min(max(1, _TILE_ELEMENTS // block_f), triton.next_power_of_2(n_tokens))
    block_p = triton.next_power_of_2(max(D - rotary_dim, 1))
    use_table = cos3 is not None
    need_dtheta = dtheta is not None
    dummy = q4  # never dereferenced: the constexpr branches that would read it are compiled out

    def strides(t, n=4):
        if t is None:
            return (0,) * n
        return tuple(st if size != 1 else 0 for st, size in zip(t.stride(), t.shape))

    pos_strides = strides(pos2, 2)
    cs, sn = strides(cos3, 3), strides(sin3, 3)
    rope_kernel[(triton.cdiv(n_tokens, block_t),)](
        q4, k4, qo4, ko4, qy4 if need_dtheta else dummy, ky4 if need_dtheta else dummy,
        pos2 if pos2 is not None else dummy, inv_freq if inv_freq is not None else dummy,
        cos3 if use_table else dummy, sin3 if use_table else dummy, dtheta if need_dtheta else dummy,
        S, n_tokens, HQ, HK, float(scaling),
        *strides(q4), *strides(k4), *strides(qo4), *strides(ko4), *strides(qy4), *strides(ky4),
        *pos_strides, *cs, *sn,
        HALF=half, ROT=rotary_dim, D=D, BLOCK_T=block_t, BLOCK_F=block_f, BLOCK_P=block_p,
        INTERLEAVED=bool(interleaved), USE_TABLE=use_table, BACKWARD=bool(backward),
        COPY_PASS=bool(copy_pass) and D > rotary_dim, NEED_DTHETA=need_dtheta,
        COMPUTE=tl.float64 if q4.dtype == torch.float64 else tl.float32,
        FIX_BF16=qo4.dtype == torch.bfloat16 and qo4.device.type == "cpu" and interpreter_enabled(),
        num_warps=_NUM_WARPS,
    )
