"""Tiny random-weight Llama / Mistral / Qwen2 models for the HF integration tests (no downloads).

Configs use the keyword names both transformers 4.48 and 5.x accept (``rope_theta``, ``rope_scaling``).
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
}


def build(name: str, seed: int = 0, dtype=torch.float32, attn: str = "sdpa", **overrides):
    """A fresh random model for ``name`` (same weights for the same seed), ``sdpa`` attention, eval mode."""
    import transformers

    family, kw = CONFIGS[name]
    cls_cfg, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    cfg = cls_cfg(**{**SMALL, **kw, **overrides})
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = cls_model(cfg)
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


def stock_reference(name: str, case: dict, dtype) -> dict:
    """Stock model (``sdpa``, one process) on the whole batch: logits, mean next-token loss, parameter grads.
    Packed batches run sequence by sequence (what packing means), so no version's packing support is assumed."""
    model = build(name, dtype=dtype)
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
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    return dict(logits=logits.detach(), loss=loss.detach(), grads=grads)
