"""Tiny random-weight models of every family in ``ring_attn.integrations.hf.MODEL_FAMILIES`` for the HF integration
tests (no downloads).

Configs use the keyword names both transformers 4.48 and 5.x accept (``rope_theta``, ``rope_scaling``). Families
a transformers version does not have (Qwen3, Gemma 3 before 4.50) are reported by :func:`available`.
"""
from __future__ import annotations

import torch

VOCAB = 64
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=64, attention_dropout=0.0, tie_word_embeddings=False)

# name -> (family, config overrides)
CONFIGS = {
    "llama": ("llama", dict(rope_theta=10000.0)),
    "llama-gqa": ("llama", dict(num_key_value_heads=1, rope_theta=500000.0)),
    "llama-yarn": ("llama", dict(num_key_value_heads=2, max_position_embeddings=32, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8})),
    "llama-llama3": ("llama", dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8})),
    # max_position_embeddings below the test lengths, so the frequencies grow with the (global) length
    "llama-dynamic": ("llama", dict(num_key_value_heads=2, max_position_embeddings=8,
                                    rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "mistral": ("mistral", dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2": ("qwen2", dict(num_key_value_heads=2, use_sliding_window=False)),
    # sliding windows shorter than the test sequences: Mistral windows every layer; Qwen2 windows the layers at
    # index >= max_window_layers (here layer 1 of 2, so one full and one windowed layer)
    "mistral-swa": ("mistral", dict(num_key_value_heads=2, sliding_window=4)),
    "qwen2-swa": ("qwen2", dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=5,
                                max_window_layers=1)),
    # the other families: q/k norms (Qwen3, OLMo 2, Gemma 3), MoE blocks (Mixtral, Qwen3-MoE; transformers 5.x's
    # eager experts, since its grouped matmul has no float64 for the oracle), scaled embeddings and soft-capping
    # (Gemma 2: the cap, 0.02, is below this random model's largest scores, about 0.05, so that capping changes
    # the result), Granite's multipliers, and Phi-3's LongRoPE, whose frequencies switch from the short to the
    # long factors past original_max_position_embeddings (12 here: over a ring of 2, zigzag or contiguous shards
    # of 16 tokens see local maxima on both sides of it)
    "qwen3": ("qwen3", dict(num_key_value_heads=2, head_dim=8)),
    "qwen3-dynamic": ("qwen3", dict(num_key_value_heads=2, head_dim=8, max_position_embeddings=8,
                                    rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "qwen3-moe": ("qwen3_moe", dict(num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=16, experts_implementation="eager")),
    "mixtral": ("mixtral", dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                sliding_window=None, experts_implementation="eager")),
    "gemma": ("gemma", dict(num_key_value_heads=1, head_dim=8)),
    "gemma2-swa": ("gemma2", dict(num_key_value_heads=2, head_dim=8, sliding_window=4, attn_logit_softcapping=0.02,
                                  query_pre_attn_scalar=8)),
    "gemma3": ("gemma3", dict(num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
                              layer_types=["sliding_attention", "full_attention"])),
    # (Phi-3's config, 4.48's included, names the rope type with the key "type")
    "phi3-longrope": ("phi3", dict(num_key_value_heads=2, original_max_position_embeddings=12, pad_token_id=0,
                                   bos_token_id=1, eos_token_id=2, rope_scaling={
                                       "type": "longrope", "short_factor": [1.0, 1.0, 1.5, 2.0],
                                       "long_factor": [2.0, 3.0, 5.0, 8.0]})),
    # Phi-4-mini's partial rotary: only the first half of each head rotates
    "phi3-partial": ("phi3", dict(num_key_value_heads=2, original_max_position_embeddings=12, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2, partial_rotary_factor=0.5, rope_scaling={
                                      "type": "longrope", "short_factor": [1.0, 1.5],
                                      "long_factor": [3.0, 6.0]})),
    "granite": ("granite", dict(num_key_value_heads=2, attention_multiplier=0.25, embedding_multiplier=2.0,
                                residual_multiplier=0.5, logits_scaling=2.0)),
    "olmo2": ("olmo2", dict(num_key_value_heads=2)),
    # a model outside MODEL_FAMILIES: attention and the ring through ring_attn, RoPE transformers' own, whose
    # dynamic frequencies must still follow the global length over a ring
    "starcoder2-dynamic": ("starcoder2", dict(num_key_value_heads=2, max_position_embeddings=8,
                                              rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
}
# family -> (config class, model class) in transformers
_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"), "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"), "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"), "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "granite": ("GraniteConfig", "GraniteForCausalLM"), "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM"),
}
# the stock reference implementation where sdpa is not it: transformers runs soft-capped Gemma 2 in eager
_STOCK_ATTN = {"gemma2": "eager"}


def available(name: str) -> bool:
    """Whether the installed transformers has the model ``name`` needs (and, for Phi-3's partial rotary, a
    modeling file that applies it: transformers >= 4.49)."""
    import importlib

    import transformers

    family, kw = CONFIGS[name]
    if not all(hasattr(transformers, c) for c in _CLASSES[family]):
        return False
    if kw.get("partial_rotary_factor", 1.0) != 1.0:
        import inspect

        mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        return "rotary_dim" in inspect.getsource(mod.apply_rotary_pos_emb)
    return True

ORACLE_ATTN = "sdpa_sliding_window_oracle"


def _stock_sdpa_ignores_window(name: str) -> bool:
    """transformers < 4.53's Qwen2 sdpa/eager ignore the sliding window (they log "Sliding Window Attention is
    enabled but not implemented for `sdpa`"): only flash_attention_2 applied it, and that cannot run on CPU."""
    family, kw = CONFIGS[name]
    if family != "qwen2" or not kw.get("use_sliding_window"):
        return False
    import importlib

    return not hasattr(importlib.import_module("transformers.models.qwen2.modeling_qwen2"),
                       "create_sliding_window_causal_mask")


def _sdpa_sliding_window_oracle(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                is_causal=None, sliding_window=None, **kwargs):
    """Stock sdpa with the sliding window added to its mask as transformers >= 4.53 builds it (key ``j`` kept
    for query ``i`` iff ``i - j < sliding_window``, queries the last keys): the oracle where the installed
    version's stock sdpa ignores the window. It never touches ring_attn."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    s_q, s_k = query.shape[2], key.shape[2]
    i = torch.arange(s_q).reshape(-1, 1) + (s_k - s_q)
    j = torch.arange(s_k).reshape(1, -1)
    keep = j <= i
    if sliding_window is not None:
        keep = keep & (i - j < sliding_window)
    if attention_mask is not None:  # 4-D float mask [b, 1, s_q, >= s_k]: 0 where kept
        keep = keep & (attention_mask[:, :, :, :s_k] == 0)
    return sdpa_attention_forward(module, query, key, value, keep, dropout=dropout, scaling=scaling,
                                  is_causal=False, **kwargs)


def runs_whole(name: str) -> bool:
    """Whether a patched ``name`` runs: transformers >= 4.53 hands any model's mask to the patch's mask function;
    before that only the MODEL_FAMILIES' mask builders are wrapped, and other models build 4-D masks, which the
    attention refuses (NotImplementedError)."""
    import importlib.util

    from ring_attn.integrations.hf import MODEL_FAMILIES

    return (CONFIGS[name][0] in MODEL_FAMILIES
            or importlib.util.find_spec("transformers.masking_utils") is not None)


def oracle_attn(name: str) -> str:
    """The attention implementation whose stock model is the reference for ``name``: ``"sdpa"`` (``"eager"`` for
    soft-capped Gemma 2), or (where the installed transformers' Qwen2 sdpa ignores the window) sdpa plus the window
    mask, registered here."""
    if not _stock_sdpa_ignores_window(name):
        return _STOCK_ATTN.get(CONFIGS[name][0], "sdpa")
    from transformers import modeling_utils

    modeling_utils.ALL_ATTENTION_FUNCTIONS[ORACLE_ATTN] = _sdpa_sliding_window_oracle
    return ORACLE_ATTN


def build(name: str, seed: int = 0, dtype=torch.float32, attn: str | None = None, **overrides):
    """A fresh random model for ``name`` (same weights for the same seed), eval mode, with attention ``attn``
    (default: ``sdpa``, or ``eager`` where transformers refuses sdpa). ``attn="oracle"``: the stock reference
    implementation for ``name`` (see :func:`oracle_attn`)."""
    import transformers

    family, kw = CONFIGS[name]
    cls_cfg, cls_model = (getattr(transformers, c) for c in _CLASSES[family])
    cfg = cls_cfg(**{**SMALL, **kw, **overrides})
    oracle = oracle_attn(name) if attn == "oracle" else None
    cfg._attn_implementation = _STOCK_ATTN.get(family, "sdpa") if oracle or attn is None else attn
    torch.manual_seed(seed)
    model = cls_model(cfg)
    if oracle:
        model.config._attn_implementation = oracle
    if family == "qwen2":  # random biases (zeros at init), so the test sees them
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    return model.to(dtype).eval()


def batch_for(case: dict, seed: int = 1) -> dict:
    """The global batch of a case: ``dense`` ``[b, s]`` or ``packed`` (one row, positions restart)."""
    g = torch.Generator().manual_seed(seed)
    if case.get("packed"):
        lens = case["packed"]
        ids = torch.randint(0, VOCAB, (1, sum(lens)), generator=g)
        pos = torch.cat([torch.arange(n) for n in lens])[None]
        return dict(input_ids=ids, labels=ids.clone(), position_ids=pos)
    ids = torch.randint(0, VOCAB, (case["b"], case["s"]), generator=g)
    labels = ids.clone()
    labels[:, 0] = -100  # some ignored labels
    return dict(input_ids=ids, labels=labels)


def param_grads(model) -> dict:
    """Every parameter's gradient by name; a parameter the step did not use (an MoE expert no token was routed
    to, which transformers 4.x keeps as a separate module) has gradient zero."""
    return {k: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for k, p in model.named_parameters()}


def stock_reference(name: str, case: dict, dtype) -> dict:
    """Stock model (``sdpa``, one process) on the whole batch: logits, mean next-token loss, parameter grads.
    Packed batches run sequence by sequence (what packing means), so no version's packing support is assumed."""
    model = build(name, dtype=dtype, attn="oracle")
    batch = batch_for(case)
    ids, labels = batch["input_ids"], batch["labels"]
    if case.get("packed"):
        pieces, n = [], 0
        for seq_ids, seq_lab in zip(ids[0].split(case["packed"]), labels[0].split(case["packed"])):
            pieces.append((model(seq_ids[None], use_cache=False).logits[0], seq_lab))
        logits = torch.cat([p[0] for p in pieces])[None]
        total = sum(torch.nn.functional.cross_entropy(lg[:-1].double(), lb[1:], reduction="sum", ignore_index=-100)
                    for lg, lb in pieces)
        n = sum(int((lb[1:] != -100).sum()) for _, lb in pieces)
    else:
        logits = model(ids, use_cache=False).logits
        tgt = labels[:, 1:]
        total = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).double(), tgt.reshape(-1),
                                                  reduction="sum", ignore_index=-100)
        n = int((tgt != -100).sum())
    loss = total / n
    loss.backward()
    return dict(logits=logits.detach(), loss=loss.detach(), grads=param_grads(model))
