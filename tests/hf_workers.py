"""Worker side of the HF integration tests: one gloo group per world size runs every case.

Each case builds the same tiny random model on every rank, patches it with ``patch_hf(model, group, layout)``,
feeds it ``shard_batch`` of the global batch, takes :func:`causal_lm_loss` (scaled for gradient averaging),
runs backward and averages the gradients over the group like data parallelism does. Rank 0 saves the gathered
(unsharded, unpadded) logits, the loss and the averaged gradients; the parent (tests/test_hf.py) compares them
with the stock model in one process. Error cases record what every rank raised.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
import types

import torch

CASES_2 = [
    dict(kind="equiv", model="llama", layout="zigzag", b=2, s=13),
    dict(kind="equiv", model="llama-gqa", layout="zigzag", b=1, s=16),
    dict(kind="equiv", model="llama-yarn", layout="zigzag", b=1, s=14),
    dict(kind="equiv", model="llama-llama3", layout="contiguous", b=1, s=12),
    dict(kind="equiv", model="llama-dynamic", layout="zigzag", b=2, s=16),  # no padding: see docs/hf.md
    dict(kind="equiv", model="mistral", layout="striped", b=1, s=11),
    dict(kind="equiv", model="qwen2", layout="zigzag", b=1, s=12),
    dict(kind="equiv", model="llama", layout="zigzag", packed=[5, 8, 3]),
    dict(kind="equiv", model="llama", layout="zigzag", b=1, s=12, fused_rope=False),
    # sliding windows (4 and 5) shorter than the sequence, so they cut across shards
    dict(kind="equiv", model="mistral-swa", layout="zigzag", b=2, s=13),
    dict(kind="equiv", model="qwen2-swa", layout="contiguous", b=1, s=12),
    dict(kind="equiv", model="mistral-swa", layout="striped", packed=[9, 3, 6]),
    # the Triton kernels (ring blocks and fused RoPE) through the interpreter, when it is on
    dict(kind="equiv", model="llama-gqa", layout="zigzag", b=1, s=8, backend="triton"),
    dict(kind="equiv", model="mistral-swa", layout="zigzag", b=1, s=8, backend="triton"),  # window 4 over shards
    # gradient checkpointing (what long-context training runs with): the recomputed forward runs the ring's
    # collectives again, in the same order on every rank; both of torch's checkpoint implementations
    dict(kind="equiv", model="llama-gqa", layout="zigzag", b=1, s=13, checkpointing="non-reentrant"),
    dict(kind="equiv", model="mistral-swa", layout="striped", b=2, s=11, checkpointing="reentrant"),
    # the other families (cases the installed transformers cannot run are left out: hf_models.available and
    # runs_whole; test_hf's single-device cases check the refusal): a length-dependent
    # rope type on every side of its threshold (Qwen3 dynamic, Phi-3 LongRoPE, partial rotary; Starcoder2 is
    # outside MODEL_FAMILIES, so its RoPE is transformers' own), Gemma 2's soft-capping with windows over shards,
    # Gemma 3's per-layer-type frequencies
    dict(kind="equiv", model="qwen3-dynamic", layout="zigzag", b=1, s=16),
    dict(kind="equiv", model="phi3-longrope", layout="zigzag", b=1, s=16),
    dict(kind="equiv", model="phi3-partial", layout="contiguous", b=1, s=16),
    dict(kind="equiv", model="starcoder2-dynamic", layout="zigzag", b=1, s=16),
    dict(kind="equiv", model="gemma2-swa", layout="zigzag", b=2, s=13),
    dict(kind="equiv", model="gemma3", layout="striped", b=1, s=11),
    # torch.compile over the ring: graph breaks at the collectives, the same values and gradients
    dict(kind="equiv", model="llama-gqa", layout="zigzag", b=1, s=16, compile=True),
    dict(kind="errors", model="llama", layout="zigzag", b=1, s=12),
]
CASES_3 = [
    dict(kind="equiv", model="llama", layout="zigzag", b=2, s=13),
    dict(kind="equiv", model="llama-dynamic", layout="zigzag", b=1, s=18),
    dict(kind="equiv", model="qwen2", layout="striped", packed=[7, 4, 6]),
    dict(kind="equiv", model="mistral-swa", layout="striped", b=1, s=17),
    dict(kind="equiv", model="qwen2-swa", layout="zigzag", packed=[10, 4, 7]),
    dict(kind="equiv", model="llama", layout="zigzag", packed=[9, 5, 4], checkpointing="non-reentrant"),
    dict(kind="equiv", model="phi3-longrope", layout="zigzag", b=1, s=18),
    dict(kind="errors", model="llama", layout="zigzag", b=1, s=12),
]


def cases_for(world: int) -> list[dict]:
    from hf_models import available, runs_whole

    cases = [c for c in (CASES_2 if world == 2 else CASES_3) if available(c["model"]) and runs_whole(c["model"])]
    for i, c in enumerate(cases):
        c["name"] = (f"w{world}-{i:02d}-{c['kind']}-{c['model']}-{c['layout']}" + ("-packed" if c.get("packed") else "")
                     + ("-tablerope" if c.get("fused_rope") is False else "") + ("-triton" if c.get("backend") else "")
                     + (f"-ckpt-{c['checkpointing']}" if c.get("checkpointing") else "")
                     + ("-compiled" if c.get("compile") else ""))
    return cases


def _equiv_case(case, rank, world, store):
    import torch.distributed as dist

    import ring_attn
    from hf_models import batch_for, build, param_grads
    from ring_attn.integrations import hf

    model = build(case["model"]).train()
    if case.get("checkpointing"):
        kwargs = {"use_reentrant": case["checkpointing"] == "reentrant"}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        assert model.model.gradient_checkpointing
    layout = case["layout"]
    batch = batch_for(case)
    local = hf.shard_batch(batch, layout=layout)
    with hf.patch_hf(model, group=None if world == 1 else dist.group.WORLD, layout=layout,
                     fused_rope=case.get("fused_rope", True)):
        attn_calls = _count_attention_calls()
        inputs = {k: v for k, v in local.items() if k not in ("shift_labels", "num_items_in_batch")}
        run = torch.compile(model, backend="aot_eager") if case.get("compile") else model
        logits = run(**inputs).logits
        loss = hf.causal_lm_loss(logits, local["shift_labels"], local["num_items_in_batch"],
                                 grad_average_world=world)
        loss.backward()
    # data-parallel averaging of gradients and of the reported loss
    grads = {}
    for name, g in param_grads(model).items():
        dist.all_reduce(g)
        grads[name] = g / world
    rep = loss.detach().clone()
    dist.all_reduce(rep)
    # gather logits in global order and drop the padding shard_batch added
    lg = logits.detach().contiguous()
    if case.get("packed"):
        cu = local["cu_seq_lens_q"]
        full = ring_attn.unshard_varlen(lg[0], cu, dim=0, layout=layout)
        keep = torch.cat([torch.arange(int(a), int(a) + n) for a, n in zip(cu[:-1], case["packed"])])
        full = full[keep][None]
    else:
        full = ring_attn.unshard(lg, dim=1, layout=layout)[:, :case["s"]]
    store.update(logits=full, loss=rep / world, grads=grads, attn_calls=len(attn_calls),
                 layers=model.config.num_hidden_layers)


def _count_attention_calls() -> list:
    """Wrap the registered "ring_attn" attention function (inside a patch) so that every call is recorded; the
    patch's undo restores what was there before it, so the wrapper goes with it."""
    from transformers import modeling_utils

    interface = getattr(modeling_utils, "AttentionInterface", None)
    mapping = interface._global_mapping if interface is not None else modeling_utils.ALL_ATTENTION_FUNCTIONS
    real = mapping["ring_attn"]
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    mapping["ring_attn"] = counted
    return calls


def _errors_case(case, rank, world, store):
    """Every refusal in ring mode: record (type, message) per setting, on every rank."""
    import torch.distributed as dist

    from hf_models import batch_for, build
    from ring_attn.integrations import hf

    layout = case["layout"]
    batch = batch_for(case)
    raised = {}

    def attempt(label, fn):
        try:
            fn()
            raised[label] = None
        except Exception as e:  # noqa: BLE001 - recorded for the parent
            raised[label] = (type(e).__name__, str(e))

    attempt("shard_batch padding", lambda: hf.shard_batch(
        dict(batch, attention_mask=torch.cat([torch.zeros(1, 2), torch.ones(1, case["s"] - 2)], 1).long()),
        layout=layout))
    local = hf.shard_batch(batch, layout=layout)
    inputs = dict(input_ids=local["input_ids"], position_ids=local["position_ids"])

    model = build(case["model"])
    with hf.patch_hf(model, group=dist.group.WORLD, layout=layout):
        with torch.no_grad():
            pad = torch.ones_like(inputs["input_ids"])
            pad[:, 0] = 0
            attempt("padding mask", lambda: model(**inputs, attention_mask=pad))
            attempt("use_cache", lambda: model(**inputs, use_cache=True))
            attempt("output_attentions", lambda: model(**inputs, output_attentions=True))
            s_local = inputs["input_ids"].shape[1]
            attempt("unsharded positions", lambda: model(input_ids=inputs["input_ids"],
                                                         position_ids=torch.arange(s_local)[None]))
        model.train()
        model.config.attention_dropout = 0.1
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.1
        attempt("dropout", lambda: model(**inputs))
    mistral = build("mistral", sliding_window=8)
    with hf.patch_hf(mistral, group=dist.group.WORLD, layout=layout), torch.no_grad():
        attempt("sliding window and use_cache", lambda: mistral(**inputs, use_cache=True))
        # a modeling module imported after the patch: its rotary embedding was not wrapped, so a length-dependent
        # rope type would differ between ranks; the attention refuses before any collective
        late = types.ModuleType("late_modeling_for_ring_attn_test")
        late.LateRotaryEmbedding = type("LateRotaryEmbedding", (torch.nn.Module,), {
            "__module__": late.__name__, "forward": lambda self, x, position_ids: (x, x)})
        late.LateAttention = type("LateAttention", (torch.nn.Module,), {"__module__": late.__name__})
        sys.modules[late.__name__] = late
        q = torch.randn(1, 2, local["input_ids"].shape[1], 8)
        attempt("rotary imported after the patch", lambda: hf.ring_attn_attention_forward(
            late.LateAttention(), q, q, q, None, position_ids=local["position_ids"]))
        del sys.modules[late.__name__]
    # the group is still usable afterwards (no rank hangs in a collective)
    t = torch.ones(1)
    dist.all_reduce(t)
    store.update(raised=raised, after=t.item())


def _worker(rank, world, init_file, outdir):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from spawn_world import worker_group

    with worker_group(rank, world, init_file, outdir) as results:
        for case in cases_for(world):
            store = {"case": case}
            t0 = time.monotonic()
            try:
                if case.get("backend") and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
                    store["skipped"] = "needs TRITON_INTERPRET=1 (set by tests/conftest.py without CUDA)"
                elif case["kind"] == "equiv":
                    os.environ["RING_ATTN_BACKEND"] = case.get("backend", "reference")
                    _equiv_case(case, rank, world, store)
                else:
                    _errors_case(case, rank, world, store)
            except Exception:  # noqa: BLE001 - reported to the parent, which fails the case
                store["error"] = traceback.format_exc()
            os.environ["RING_ATTN_BACKEND"] = "reference"
            store["wall_s"] = time.monotonic() - t0
            results[case["name"]] = store


def run_world(world: int, outdir: str, timeout_s: float = 300.0) -> list[dict]:
    """Spawn ``world`` gloo ranks once, run every case, return each rank's results (index = rank)."""
    from spawn_world import run_world as spawn

    return spawn(_worker, world, outdir, timeout_s)
