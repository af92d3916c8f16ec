"""flash-attn's rotary helpers on ring-attn: ``from flash_attn.layers.rotary import ...`` becomes
``from ring_attn.layers.rotary import ...`` (same names, positional order, defaults and returns).

* :func:`apply_rotary_emb` (alias ``apply_rotary_emb_func``): one tensor, cos/sin tables.
* :func:`apply_rotary_emb_qkv_`: q and k of a packed qkv rotated in place.
* :func:`apply_rotary_emb_kv_`: k of a packed kv rotated in place.
* :class:`RotaryEmbedding`: the module that builds the tables (with XPos when ``scale_base`` is set) and calls
  the two in-place forms.

Everything runs ring-attn's fused RoPE kernel in table mode (:mod:`ring_attn.ops.rope`): q and k of a packed
tensor in one launch where they take the same tables. One difference, in the direction of not failing
silently: a position past the cos/sin tables raises (flash-attn leaves such tokens unrotated). flash-attn's
autograd classes (``ApplyRotaryEmb``, ...) are not exported; the functions above are their entry points. For
models, :func:`ring_attn.apply_rope` computes the angles in the kernel from global positions (no tables).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ring_attn.ops.rope import apply_rotary_emb, check_rotary_x, rotate_parts_

__all__ = ["RotaryEmbedding", "apply_rotary_emb", "apply_rotary_emb_func", "apply_rotary_emb_kv_",
           "apply_rotary_emb_qkv_"]

apply_rotary_emb_func = apply_rotary_emb  # flash-attn keeps this name for backward compatibility


def _qkv_split(num_heads_q: Optional[int], num_heads_k: int):
    """The (q, k) views of a qkv tensor: ``[b, s, 3, h, d]`` (num_heads_q None) or ``[b, s, h_q + 2 h_k, d]``."""
    if num_heads_q is None:
        return lambda t: (t[:, :, 0], t[:, :, 1])
    return lambda t: (t[:, :, :num_heads_q], t[:, :, num_heads_q:num_heads_q + num_heads_k])


def _split_k(t: torch.Tensor):
    k = t[:, :, 0]
    return k, k[:, :, :0]


def apply_rotary_emb_qkv_(qkv, cos, sin, cos_k=None, sin_k=None, interleaved=False,
                          seqlen_offsets: Union[int, torch.Tensor] = 0, num_heads_q: Optional[int] = None):
    """flash-attn's ``apply_rotary_emb_qkv_``: rotary embedding of q and k, *in place* in ``qkv``.

    Args:
        qkv: ``[batch, seqlen, 3, heads, head_dim]``, or ``[batch, seqlen, num_heads_q + 2 * num_heads_k,
            head_dim]`` (GQA/MQA; then ``num_heads_q`` is required); float16, bfloat16, float32 or float64.
        cos, sin: ``[seqlen_ro, rotary_dim / 2]`` for q (and k), floating, on qkv's device;
            ``rotary_dim <= head_dim``.
        cos_k, sin_k: optional tables for k (XPos scales q and k differently); both or neither.
        interleaved: True rotates dim pairs ``(2i, 2i+1)`` (GPT-J); False ``(i, i + rotary_dim / 2)`` (GPT-NeoX).
        seqlen_offsets: int, or int32/int64 ``[batch]``: token ``j`` of sequence ``b`` takes table row
            ``j + seqlen_offsets[b]``.
        num_heads_q: q's head count in the 4-D layout.

    Returns:
        ``qkv`` itself, its q and k parts rotated (math in float32, float64 for float64); v and the dims past
        ``rotary_dim`` unchanged. Differentiable with respect to qkv when it is not a leaf (an in-place op).

    Raises:
        TypeError / ValueError naming the argument, before anything is written; ValueError when a position
        reaches past a table (flash-attn leaves such tokens unrotated).
    """
    layout = "[batch, seqlen, 3, heads, head_dim] or [batch, seqlen, num_heads_q + 2 * num_heads_k, head_dim]"
    check_rotary_x("qkv", qkv, (4, 5), layout)
    if qkv.dim() == 5:
        if qkv.shape[2] != 3:
            raise ValueError(f"qkv must be {layout}, got shape {tuple(qkv.shape)} (dim 2 must be 3)")
        if num_heads_q is not None and num_heads_q != qkv.shape[3]:
            raise ValueError(f"num_heads_q={num_heads_q} does not match qkv {tuple(qkv.shape)} (heads "
                             f"{qkv.shape[3]}); it is only needed for the 4-D layout")
        split = _qkv_split(None, 0)
    else:
        if isinstance(num_heads_q, bool) or not isinstance(num_heads_q, int):
            raise ValueError(f"num_heads_q must be given (an int) for a 4-D qkv {tuple(qkv.shape)} "
                             f"([batch, seqlen, num_heads_q + 2 * num_heads_k, head_dim]), got {num_heads_q!r}")
        rest = qkv.shape[2] - num_heads_q
        if num_heads_q < 1 or rest < 2 or rest % 2:
            raise ValueError(f"qkv {tuple(qkv.shape)} does not split into num_heads_q={num_heads_q} q heads and "
                             f"two equal k and v head groups (dim 2 must be num_heads_q + 2 * num_heads_k)")
        split = _qkv_split(num_heads_q, rest // 2)
    return rotate_parts_(qkv, split, qkv.shape[-1], cos, sin, cos_k, sin_k, interleaved, seqlen_offsets,
                         "apply_rotary_emb_qkv_")


def apply_rotary_emb_kv_(kv, cos, sin, interleaved=False, seqlen_offsets: Union[int, torch.Tensor] = 0):
    """flash-attn's ``apply_rotary_emb_kv_``: rotary embedding of k, *in place* in ``kv``.

    Args:
        kv: ``[batch, seqlen, 2, heads, head_dim]``; float16, bfloat16, float32 or float64.
        cos, sin: ``[seqlen_ro, rotary_dim / 2]``, floating, on kv's device; ``rotary_dim <= head_dim``.
        interleaved, seqlen_offsets: as in :func:`apply_rotary_emb_qkv_`.

    Returns:
        ``kv`` itself with k rotated; v and the dims past ``rotary_dim`` unchanged. Differentiable with respect
        to kv when it is not a leaf.
    """
    layout = "[batch, seqlen, 2, heads, head_dim]"
    check_rotary_x("kv", kv, (5,), layout)
    if kv.shape[2] != 2:
        raise ValueError(f"kv must be {layout}, got shape {tuple(kv.shape)} (dim 2 must be 2)")
    return rotate_parts_(kv, _split_k, kv.shape[-1], cos, sin, None, None, interleaved, seqlen_offsets,
                         "apply_rotary_emb_kv_")


class RotaryEmbedding(torch.nn.Module):
    """flash-attn's ``RotaryEmbedding`` module: rotary position embeddings (RoFormer), with XPos when
    ``scale_base`` is set.

    Args:
        dim: the rotary dims (even; the first ``dim`` dims of each head rotate).
        base: θ of ``inv_freq[i] = base ** (-2i / dim)``.
        interleaved: True rotates dim pairs ``(2i, 2i+1)`` (GPT-J); False ``(i, i + dim / 2)`` (GPT-NeoX).
        scale_base: None, or XPos's scale base (flash-attn recommends 512): q is scaled by
            ``scale ** ((p - n // 2) / scale_base)`` and k by its inverse, ``scale[i] = (2i + 0.4 dim) / (1.4 dim)``,
            ``n`` the table length.
        device: where ``inv_freq`` is built.
        pos_idx_in_fp32: older flash-attn's keyword; positions are always float32 here, so only True is accepted.

    The cos/sin tables (float32 angles, stored in the input's dtype) are rebuilt when a call needs more rows, or
    another device or dtype, or when a training call follows tables built under inference mode.
    """

    def __init__(self, dim: int, base=10000.0, interleaved=False, scale_base=None, device=None, *,
                 pos_idx_in_fp32: bool = True):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ValueError(f"dim must be an even int >= 2 (the rotary dims), got {dim!r}")
        if isinstance(device, bool):
            raise TypeError(f"device={device!r}: a bool where the device goes (flash-attn 2.0-2.7 took "
                            "pos_idx_in_fp32 in this position); pass pos_idx_in_fp32= by keyword")
        if not pos_idx_in_fp32:
            raise NotImplementedError("pos_idx_in_fp32=False is not supported: positions are float32 here")
        if scale_base is not None and not float(scale_base) > 0:
            raise ValueError(f"scale_base must be None or > 0, got {scale_base!r}")
        self.dim = dim
        self.base = float(base)
        if not self.base > 1:
            raise ValueError(f"base must be > 1, got {base!r}")
        self.register_buffer("inv_freq", self._compute_inv_freq(device), persistent=False)
        self.interleaved = interleaved
        self.scale_base = scale_base
        self.register_buffer("scale", self._compute_scale(device) if scale_base is not None else None,
                             persistent=False)
        self._seq_len_cached = 0
        self._cos_cached = self._sin_cached = self._cos_k_cached = self._sin_k_cached = None

    def _compute_inv_freq(self, device=None) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim))

    def _compute_scale(self, device=None) -> torch.Tensor:
        return (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) + 0.4 * self.dim) / (1.4 * self.dim)

    def _update_cos_sin_cache(self, seqlen: int, device=None, dtype=None) -> None:
        cached = self._cos_cached
        if (seqlen <= self._seq_len_cached and cached is not None and cached.device == device
                and cached.dtype == dtype and not (self.training and cached.is_inference())):
            return
        self._seq_len_cached = seqlen
        # float32 throughout: a module-wide .half()/.bfloat16() may have cast the buffers, and positions times
        # frequencies in 16 bits lose the angle
        inv_freq = self.inv_freq if self.inv_freq.dtype == torch.float32 else self._compute_inv_freq(device)
        t = torch.arange(seqlen, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.to(device))
        cos, sin = torch.cos(freqs), torch.sin(freqs)
        if self.scale is None:
            self._cos_cached, self._sin_cached = cos.to(dtype), sin.to(dtype)
            self._cos_k_cached = self._sin_k_cached = None
            return
        scale = self.scale if self.scale.dtype == torch.float32 else self._compute_scale(self.scale.device)
        power = (torch.arange(seqlen, dtype=torch.float32, device=device) - seqlen // 2) / self.scale_base
        xpos = scale.to(device) ** power[:, None]
        self._cos_cached, self._sin_cached = (cos * xpos).to(dtype), (sin * xpos).to(dtype)
        self._cos_k_cached, self._sin_k_cached = (cos / xpos).to(dtype), (sin / xpos).to(dtype)

    def forward(self, qkv: torch.Tensor, kv: Optional[torch.Tensor] = None,
                seqlen_offset: Union[int, torch.Tensor] = 0, max_seqlen: Optional[int] = None,
                num_heads_q: Optional[int] = None):
        """Rotate *in place* and return ``qkv`` (``[b, s, 3, h, d]``, or ``[b, s, h_q + 2 h_k, d]`` with
        ``num_heads_q``), or, with ``kv`` ``[b, s, 2, h_k, d]``, q ``[b, s, h, d]`` given as ``qkv``: returns
        ``(q, kv)``. ``seqlen_offset``: int or ``[batch]`` (per-row offsets: pass ``max_seqlen`` so that the
        tables cover ``max_seqlen`` rows; a position past the tables raises)."""
        if not isinstance(qkv, torch.Tensor) or qkv.dim() < 2:
            raise ValueError(f"qkv must be a tensor [batch, seqlen, ...], got "
                             f"{tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")
        if qkv.shape[-1] < self.dim:
            raise ValueError(f"RotaryEmbedding(dim={self.dim}) rotates {self.dim} dims but the heads have "
                             f"head_dim={qkv.shape[-1]}")
        seqlen = qkv.shape[1]
        if max_seqlen is not None:
            self._update_cos_sin_cache(int(max_seqlen), device=qkv.device, dtype=qkv.dtype)
        elif isinstance(seqlen_offset, int):
            self._update_cos_sin_cache(seqlen + seqlen_offset, device=qkv.device, dtype=qkv.dtype)
        elif self._cos_cached is None:
            raise ValueError("seqlen_offset is a tensor and no tables exist yet: pass max_seqlen (the table rows "
                             "to build)")
        xpos = self.scale is not None
        cos_k = self._cos_k_cached if xpos else self._cos_cached
        sin_k = self._sin_k_cached if xpos else self._sin_cached
        if kv is None:
            return apply_rotary_emb_qkv_(qkv, self._cos_cached, self._sin_cached, cos_k if xpos else None,
                                         sin_k if xpos else None, interleaved=self.interleaved,
                                         seqlen_offsets=seqlen_offset, num_heads_q=num_heads_q)
        q = apply_rotary_emb(qkv, self._cos_cached, self._sin_cached, interleaved=self.interleaved, inplace=True,
                             seqlen_offsets=seqlen_offset)
        kv = apply_rotary_emb_kv_(kv, cos_k, sin_k, interleaved=self.interleaved, seqlen_offsets=seqlen_offset)
        return q, kv
