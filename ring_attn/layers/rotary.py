"""flash-attn's rotary helper on ring-attn: ``from flash_attn.layers.rotary import apply_rotary_emb`` becomes
``from ring_attn.layers.rotary import apply_rotary_emb`` (same name, positional order, defaults and return).

It runs ring-attn's fused RoPE kernel in table mode (:func:`ring_attn.ops.rope.apply_rotary_emb`). One
difference, in the direction of not failing silently: a position past the cos/sin tables raises (flash-attn
leaves such tokens unrotated). flash-attn's ``apply_rotary_emb_qkv_``, ``apply_rotary_emb_kv_`` and the
``RotaryEmbedding`` module are not provided; for models, :func:`ring_attn.apply_rope` computes the angles in the
kernel from global positions (no tables).
"""
from ring_attn.ops.rope import apply_rotary_emb

__all__ = ["apply_rotary_emb"]
