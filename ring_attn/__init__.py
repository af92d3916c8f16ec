"""ring-attn: Triton flash attention, ring attention over torch.distributed, and fused RoPE.

Public API (import from here; the other public modules are the drop-ins for the peers, ``ring_attn.compat``,
``ring_attn.bert_padding``, ``ring_attn.layers.rotary``, and the HF patch, ``ring_attn.integrations.hf``):

* attention: ``flash_attn_func``, ``flash_attn_varlen_func`` and their qkv-/kv-packed forms, and
  ``flash_attn_with_kvcache`` (decoding over a KV cache) (flash-attn's signatures); ``padded_attention``
  (a padded batch and its 2-D key-padding mask, one custom op: no graph break under torch.compile)
* ring attention: ``ring_attn_func``, ``ring_attn_varlen_func``, ``shard``, ``unshard``, ``shard_positions``
  and the varlen helpers
* RoPE: ``apply_rope``, ``apply_rope_cos_sin``, ``rope_scaling.rope_parameters`` / ``from_hf_config``
* loss: ``cross_entropy_sum``, ``linear_cross_entropy_sum`` (cross entropy without float32 copies of the logits)
* backends: ``backend_info`` (which backend each op would use for given inputs, and why)

Lower-level pieces the ring builds on (``attention_block_forward``/``attention_block_backward``) are
documented in ``ring_attn.ops.attention``; backend selection and the capability table in
``ring_attn.backends`` (design: ``docs/design.md``).
"""
from ring_attn._version import __version__

# --- attention op (ops/attention.py; kernels in backends/)
from ring_attn.ops.attention import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                                    flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                                    flash_attn_varlen_qkvpacked_func)
from ring_attn.ops.kvcache import flash_attn_with_kvcache
from ring_attn.ops.padding import padded_attention
# --- ring attention (ring/)
from ring_attn.ring import (ring_attn_func, ring_attn_varlen_func, shard, shard_positions, shard_varlen,
                            unshard, unshard_varlen, varlen_local_cu_seqlens, varlen_positions)
# --- which backend runs an op, and why (backends/)
from ring_attn.backends import backend_info
# --- RoPE (ops/rope.py, rope_scaling.py)
from ring_attn import rope_scaling
from ring_attn.ops.rope import apply_rope, apply_rope_cos_sin
# --- loss (ops/loss.py)
from ring_attn.ops.loss import cross_entropy_sum, linear_cross_entropy_sum

__all__ = ["__version__", "flash_attn_func", "flash_attn_varlen_func", "flash_attn_qkvpacked_func",
           "flash_attn_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func",
           "flash_attn_with_kvcache", "padded_attention", "ring_attn_func", "ring_attn_varlen_func", "shard",
           "unshard", "shard_positions", "shard_varlen", "unshard_varlen", "varlen_local_cu_seqlens",
           "varlen_positions", "apply_rope", "apply_rope_cos_sin", "rope_scaling", "cross_entropy_sum",
           "linear_cross_entropy_sum", "backend_info"]
