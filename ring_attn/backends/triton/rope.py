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

# Bytes of one head of the program's tokens (all the dims it reads of that head): 4 KB is, at d = 128 in bf16,
# 16 tokens, i.e. a [16 tokens, 64 pairs] tile per half-split member, 8 elements (one 16-byte load) per thread
# with 4 warps; every thread computes the cos/sin of its own 8 (token, pair) elements once, for all heads.
# Scaled by the element size (fp32: 8 tokens, fp64: 4) and halved when the backward also reads the forward's
# output (d/dtheta), so registers stay bounded (sm_90: <= 128, no spills, for 2-byte types).
_HEAD_TILE_BYTES = 4096
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
    block_p = triton.next_power_of_2(max(D - rotary_dim, 1))
    use_table = cos3 is not None
    need_dtheta = dtheta is not None
    copy = bool(copy_pass) and D > rotary_dim
    row_elems = 2 * block_f + (block_p if copy else 0)
    budget = _HEAD_TILE_BYTES // (q4.element_size() * (2 if need_dtheta else 1))
    block_t = max(1, budget // row_elems)
    block_t = min(1 << (block_t.bit_length() - 1), triton.next_power_of_2(n_tokens))  # a power of two
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
        COPY_PASS=copy, NEED_DTHETA=need_dtheta,
        COMPUTE=tl.float64 if q4.dtype == torch.float64 else tl.float32,
        FIX_BF16=qo4.dtype == torch.bfloat16 and qo4.device.type == "cpu" and interpreter_enabled(),
        num_warps=_NUM_WARPS,
    )
