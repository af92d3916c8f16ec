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
    # the user's own sharding with the unpadded boundaries, a 1-token sequence among them: some ranks hold only the
    # padding the layout adds to it (refused as "not a shard" before 2026-12-07)
    dict(kind="equiv", model="llama-gqa", layout="zigzag", packed=[1, 8, 3], own_cu=True),
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
    # ring-flash-attn's HF adapter (ring_attn.compat.substitute_hf_flash_attn): contiguous pieces of one packed
    # row, K/V all-gathered; GQA, sliding windows across pieces, Gemma 2's soft-capping, Qwen2's biases,
    # gradient checkpointing (the recomputed forward gathers again), positions counting through the batch,
    # torch.compile (graph breaks at the checks and the collectives)
    dict(kind="adapter", model="llama-gqa", layout="contiguous", packed=[5, 9, 2], stride=1),
    dict(kind="adapter", model="mistral-swa", layout="contiguous", packed=[3, 10, 5], stride=2),
    dict(kind="adapter", model="gemma2-swa", layout="contiguous", packed=[6, 7, 3], stride=1),
    dict(kind="adapter", model="qwen2", layout="contiguous", packed=[7, 4, 5], stride=2,
         checkpointing="non-reentrant", positions="running"),
    dict(kind="adapter", model="llama-gqa", layout="contiguous", packed=[5, 9, 2], stride=1, compile=True),
    # the name transformers >= 5.x runs a flash_attention_2 model under where flash-attn is missing (a Hub kernel)
    dict(kind="adapter", model="mistral-swa", layout="contiguous", packed=[8, 8], stride=1, attn="hub-kernel"),
    dict(kind="adapter-errors", model="llama", layout="contiguous", packed=[5, 9, 2], stride=1),
]
CASES_3 = [
    dict(kind="equiv", model="llama", layout="zigzag", b=2, s=13),
    dict(kind="equiv", model="llama-dynamic", layout="zigzag", b=1, s=18),
    dict(kind="equiv", model="qwen2", layout="striped", packed=[7, 4, 6]),
    dict(kind="equiv", model="llama", layout="contiguous", packed=[2, 7, 1, 4], own_cu=True),
    dict(kind="equiv", model="mistral-swa", layout="striped", b=1, s=17),
    dict(kind="equiv", model="qwen2-swa", layout="zigzag", packed=[10, 4, 7]),
    dict(kind="equiv", model="llama", layout="zigzag", packed=[9, 5, 4], checkpointing="non-reentrant"),
    dict(kind="equiv", model="phi3-longrope", layout="zigzag", b=1, s=18),
    dict(kind="errors", model="llama", layout="zigzag", b=1, s=12),
    dict(kind="adapter", model="llama", layout="contiguous", packed=[7, 4, 7], stride=1),
    dict(kind="adapter", model="mistral-swa", layout="contiguous", packed=[9, 3, 6], stride=2),
    dict(kind="adapter-errors", model="llama", layout="contiguous", packed=[7, 4, 7], stride=1),
]


def cases_for(world: int) -> list[dict]:
    from hf_models import available, runs_whole

    cases = [c for c in (CASES_2 if world == 2 else CASES_3) if available(c["model"]) and runs_whole(c["model"])
             and (c.get("attn") != "hub-kernel" or hub_kernel_fallback() is not None)]
    for i, c in enumerate(cases):
        c["name"] = (f"w{world}-{i:02d}-{c['kind']}-{c['model']}-{c['layout']}" + ("-packed" if c.get("packed") else "")
                     + ("-tablerope" if c.get("fused_rope") is False else "") + ("-triton" if c.get("backend") else "")
                     + (f"-ckpt-{c['checkpointing']}" if c.get("checkpointing") else "")
                     + ("-compiled" if c.get("compile") else "") + (f"-{c['positions']}" if c.get("positions") else "")
                     + ("-hubkernel" if c.get("attn") == "hub-kernel" else "") + ("-owncu" if c.get("own_cu") else ""))
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
    if case.get("own_cu"):
        local = _own_packed_shard(batch, case["packed"], rank, world, layout, local["num_items_in_batch"])
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
    if case.get("own_cu"):  # unpadded boundaries: unshard_varlen drops the padding itself
        full = ring_attn.unshard_varlen(lg[0], local["cu_seq_lens_q"], dim=0, layout=layout)[None]
    elif case.get("packed"):
        cu = local["cu_seq_lens_q"]
        full = ring_attn.unshard_varlen(lg[0], cu, dim=0, layout=layout)
        keep = torch.cat([torch.arange(int(a), int(a) + n) for a, n in zip(cu[:-1], case["packed"])])
        full = full[keep][None]
    else:
        full = ring_attn.unshard(lg, dim=1, layout=layout)[:, :case["s"]]
    store.update(logits=full, loss=rep / world, grads=grads, attn_calls=len(attn_calls),
                 layers=model.config.num_hidden_layers)


def _own_packed_shard(batch, lens, rank, world, layout, num_items):
    """A packed batch sharded as a user may do it without shard_batch: each tensor through
    ``varlen_shard_for_rank`` (the layout pads sequences it cannot split; pad id 0, position 0, label -100) and the
    *unpadded* global boundaries as ``cu_seq_lens_q`` / ``cu_seq_lens_k``."""
    from ring_attn.ring.layout import varlen_shard_for_rank

    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    targets = torch.full_like(batch["labels"][0], -100)
    targets[:-1] = batch["labels"][0, 1:]
    targets[cu[1:].long() - 1] = -100  # a sequence's last token predicts nothing

    def mine(x, pad):
        return varlen_shard_for_rank(x, cu, rank, world, 0, layout, pad_value=pad)[None]

    assert int((targets != -100).sum()) == int(num_items)
    return dict(input_ids=mine(batch["input_ids"][0], 0), position_ids=mine(batch["position_ids"][0], 0),
                shift_labels=mine(targets, -100), num_items_in_batch=num_items, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                max_length_q=max(lens), max_length_k=max(lens))


def hub_kernel_fallback():
    """The Hub kernel name transformers swaps in for flash_attention_2 without flash-attn (None before 5.x)."""
    from transformers import modeling_flash_attention_utils as fa_utils

    return getattr(fa_utils, "FLASH_ATTN_KERNEL_FALLBACK", {}).get("flash_attention_2")


def _attempt(raised: dict, label: str, fn) -> None:
    """Run ``fn``; record ``(type, message)`` of what it raised under ``label`` (None: it returned)."""
    try:
        fn()
        raised[label] = None
    except Exception as e:  # noqa: BLE001 - recorded for the parent
        raised[label] = (type(e).__name__, str(e))


def _adapter_inputs(case, rank, world):
    """The packed row, its global cu_seqlens, next-token targets within each sequence, and this rank's slice."""
    from hf_models import batch_for

    batch = batch_for(case)
    ids, pos = batch["input_ids"], batch["position_ids"]
    total = ids.shape[1]
    cu = torch.tensor([0] + torch.tensor(case["packed"]).cumsum(0).tolist(), dtype=torch.int32)
    tgt = torch.full_like(ids, -100)
    tgt[0, :-1] = ids[0, 1:]
    tgt[0, cu[1:].long() - 1] = -100  # a sequence's last token predicts nothing
    if case.get("positions") == "running":
        pos = torch.arange(total)[None]
    n = total // world
    return ids, pos, cu, tgt, slice(rank * n, (rank + 1) * n)


def _adapter_case(case, rank, world, store):
    """ring_attn.compat's substitute_hf_flash_attn / update_ring_flash_attn_params, used as ring-flash-attn's
    users do: the model on flash_attention_2, each rank its contiguous piece of one packed row."""
    import torch.distributed as dist

    from hf_models import param_grads
    from ring_attn import compat

    model = build_for_adapter(case["model"], hub_kernel=case.get("attn") == "hub-kernel").train()
    if case.get("checkpointing"):
        kwargs = {"use_reentrant": case["checkpointing"] == "reentrant"}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    ids, pos, cu, tgt, mine = _adapter_inputs(case, rank, world)
    with compat.substitute_hf_flash_attn(dist.group.WORLD, case["stride"]):
        calls = _count_attention_calls(model.config._attn_implementation)
        compat.update_ring_flash_attn_params(cu, dist.group.WORLD)
        run = torch.compile(model, backend="aot_eager") if case.get("compile") else model
        logits = run(input_ids=ids[:, mine], position_ids=pos[:, mine], use_cache=False).logits
        n_items = int((tgt != -100).sum())
        loss = torch.nn.functional.cross_entropy(logits[0], tgt[0, mine], reduction="sum", ignore_index=-100) / n_items
        loss.backward()
    grads = {}
    for name, g in param_grads(model).items():
        dist.all_reduce(g)
        grads[name] = g
    rep = loss.detach().clone()
    dist.all_reduce(rep)
    parts = [torch.empty_like(logits.detach()) for _ in range(world)]
    dist.all_gather(parts, logits.detach().contiguous())
    store.update(logits=torch.cat(parts, 1), loss=rep, grads=grads, attn_calls=len(calls),
                 layers=model.config.num_hidden_layers)


def build_for_adapter(name, hub_kernel=False, **overrides):
    """A model of ``name`` switched to ``flash_attention_2`` after it is built (transformers would refuse the name
    at construction where flash-attn is not installed; the adapter replaces the function behind it). With
    ``hub_kernel``: to the Hub kernel's name transformers >= 5.x swaps in for flash_attention_2 when flash-attn is
    missing (loading it needs the network; the adapter takes the name over all the same)."""
    from hf_models import build

    model = build(name, **overrides)
    if hub_kernel:
        model.config._attn_implementation = hub_kernel_fallback()
    else:
        model.config._attn_implementation = "flash_attention_2"
    return model


def _adapter_errors_case(case, rank, world, store):
    """The adapter's refusals over a real group: each raises on every rank (one rank's bad input included),
    before any K/V collective, and the group stays usable."""
    import torch.distributed as dist

    from ring_attn import compat
    from ring_attn.integrations import hf_adapter
    from transformers import modeling_utils

    ids, pos, cu, tgt, mine = _adapter_inputs(case, rank, world)
    n = mine.stop - mine.start
    raised = {}
    table = modeling_utils.ALL_ATTENTION_FUNCTIONS
    before = table.get("flash_attention_2")
    sentinel = []

    def previous(module, query, key, value, attention_mask, **kwargs):  # stands for transformers' flash path
        sentinel.append(1)
        return query.transpose(1, 2), None

    table["flash_attention_2"] = previous

    def attempt(label, fn):
        _attempt(raised, label, fn)

    model = build_for_adapter(case["model"])
    group = dist.group.WORLD
    try:
        handle = compat.substitute_hf_flash_attn(group, case["stride"])
        with torch.no_grad():
            attempt("no params", lambda: model(input_ids=ids[:, mine], position_ids=pos[:, mine]))
            # only the last rank skips update_ring_flash_attn_params: it raises its error, the others (in the batch
            # agreement) raise too instead of waiting for it (they hung until the group timeout)
            if rank != world - 1:
                compat.update_ring_flash_attn_params(cu, group)
            attempt("no params on one rank", lambda: model(input_ids=ids[:, mine], position_ids=pos[:, mine]))
            compat.update_ring_flash_attn_params(cu, group)
            # every rank passes arange(n): right on rank 0 (it counts through the batch), wrong on the others
            attempt("positions on some ranks", lambda: model(input_ids=ids[:, mine],
                                                             position_ids=torch.arange(n)[None]))
            # a position buffer agreed on, then rewritten in place (every rank) with those same arange(n)
            buf = pos[:, mine].clone()
            model(input_ids=ids[:, mine], position_ids=buf)
            buf.copy_(torch.arange(n)[None])
            attempt("positions rewritten in place", lambda: model(input_ids=ids[:, mine], position_ids=buf))
            attempt("batch of 2", lambda: model(input_ids=ids[:, mine].repeat(2, 1),
                                                position_ids=pos[:, mine].repeat(2, 1)))
            other = cu.clone()
            other[2] += 1 if rank == 0 else 0  # rank 0 describes another batch of the same size (its own piece
            # unchanged, so its positions still fit)
            compat.update_ring_flash_attn_params(other, group)
            attempt("cu_seqlens differ", lambda: model(input_ids=ids[:, mine], position_ids=pos[:, mine]))
            compat.update_ring_flash_attn_params(torch.tensor([0, (n + 1) * world], dtype=torch.int32), group)
            attempt("token count", lambda: model(input_ids=ids[:, mine], position_ids=pos[:, mine]))
            compat.update_ring_flash_attn_params(cu, group)
            pad = torch.ones_like(ids[:, mine])
            pad[:, 0] = 0
            attempt("padding mask", lambda: model(input_ids=ids[:, mine], position_ids=pos[:, mine],
                                                  attention_mask=pad))
            first = model(input_ids=ids[:, mine], position_ids=pos[:, mine], use_cache=True)
            nxt = pos[:, mine][:, -1:] + 1
            attempt("kv cache", lambda: model(input_ids=ids[:, mine][:, :1], position_ids=nxt,
                                              past_key_values=first.past_key_values, use_cache=True))
            dynamic = build_for_adapter("llama-dynamic")
            attempt("dynamic rope", lambda: dynamic(input_ids=ids[:, mine], position_ids=pos[:, mine]))
            compat.substitute_hf_flash_attn(group, 3)
            attempt("heads_k_stride", lambda: model(input_ids=ids[:, mine], position_ids=pos[:, mine]))
            compat.substitute_hf_flash_attn(group, case["stride"])
            model.train()
            for layer in model.model.layers:
                layer.self_attn.attention_dropout = 0.1
            attempt("dropout", lambda: model(input_ids=ids[:, mine], position_ids=pos[:, mine]))
            # the last rank refuses at its last layer only (after the batch was agreed at the first): it joins the
            # all-gather's signature exchange as failed, so the others raise instead of waiting in the K/V gather
            for layer in model.model.layers:
                layer.self_attn.attention_dropout = 0.0
            model.model.layers[-1].self_attn.attention_dropout = 0.1 if rank == world - 1 else 0.0
            attempt("later layer on one rank", lambda: model(input_ids=ids[:, mine], position_ids=pos[:, mine]))
            model.model.layers[-1].self_attn.attention_dropout = 0.0
            model.eval()
            ok = model(input_ids=ids[:, mine], position_ids=pos[:, mine]).logits  # the same model now runs
            compat.use_ring_attn(False)
            model(input_ids=ids[:, mine], position_ids=pos[:, mine])
            compat.use_ring_attn(True)
            store.update(switch_calls=len(sentinel), layers=model.config.num_hidden_layers)
            names = [n for n in table if table.get(n) is hf_adapter.flash_attention_forward]
            handle.undo()
            store["restored"] = table.get("flash_attention_2") is previous and not any(
                table.get(n) is hf_adapter.flash_attention_forward for n in table)
            store["names"] = names
            handle.undo()  # idempotent
        store["ran_after"] = bool(torch.isfinite(ok).all())
    finally:
        if hasattr(table, "_local_mapping"):  # transformers >= 4.50: drop the test's local entry
            table._local_mapping.pop("flash_attention_2", None)
        else:
            table["flash_attention_2"] = before
    t = torch.ones(1)
    dist.all_reduce(t)
    store.update(raised=raised, after=t.item())


def _count_attention_calls(key: str = "ring_attn") -> list:
    """Wrap the attention function registered as ``key`` (inside a patch) so that every call is recorded; the
    patch's undo restores what was there before it, so the wrapper goes with it."""
    from transformers import modeling_utils

    interface = getattr(modeling_utils, "AttentionInterface", None)
    # patch_hf registers "ring_attn" class-wide (transformers' register); the adapter sets its entry on
    # ALL_ATTENTION_FUNCTIONS, as ring-flash-attn does (transformers < 4.50: a plain dict either way)
    if key == "ring_attn" and interface is not None:
        mapping = interface._global_mapping
    else:
        mapping = modeling_utils.ALL_ATTENTION_FUNCTIONS
    real = mapping[key]
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    mapping[key] = counted
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
        _attempt(raised, label, fn)

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
            # one rank's own refusal: every other rank raises too (the ranks agree before the ring), none waits
            last = rank == world - 1
            attempt("padding mask on one rank", lambda: model(**inputs, attention_mask=pad if last else None))
            attempt("use_cache on one rank", lambda: model(**inputs, use_cache=last))
            n_local = inputs["input_ids"].shape[1]
            cu = torch.tensor([0, n_local], dtype=torch.int32)
            packed = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=n_local, max_length_k=n_local)
            attempt("packed on one rank", lambda: model(**inputs, **(packed if last else {})))
            # the model's own loss given a shard's labels but not shard_batch's shift_labels: HF shifts them within
            # each shard, wrong at every shard's edge (ran silently before 2026-12-07 without fused_loss)
            attempt("labels without shift_labels", lambda: model(**inputs, labels=inputs["input_ids"]))
            shifted = {k: local[k] for k in ("shift_labels", "num_items_in_batch")}
            attempt("labels without shift_labels on one rank", lambda: model(
                **inputs, labels=local["shift_labels"], **({} if last else shifted)))
            # shift_labels without num_items_in_batch: the loss would be a mean over this rank's labelled tokens,
            # not the whole batch's (ran silently before 2026-12-08)
            attempt("shift_labels without num_items_in_batch", lambda: model(
                **inputs, labels=local["shift_labels"], shift_labels=local["shift_labels"]))
            # generate: refused at once on the calling rank, with no collective (it waited in the agreement for
            # the other ranks until the group's timeout before 2026-12-08); only the last rank calls it
            if last:
                attempt("generate on one rank", lambda: model.generate(
                    input_ids=inputs["input_ids"], max_new_tokens=2, do_sample=False, pad_token_id=0))
            # a position_ids buffer checked once, then rewritten in place with positions numbered from 0
            buf = inputs["position_ids"].clone()
            model(input_ids=inputs["input_ids"], position_ids=buf)
            buf.copy_(torch.arange(n_local)[None] + (1 if rank == 0 else 0))  # rank 0: not the others' offset
            attempt("position buffer rewritten in place", lambda: model(input_ids=inputs["input_ids"],
                                                                        position_ids=buf))
            # packed batches: their position_ids are checked against cu_seq_lens too (before 2026-12-07 they were
            # not: each of these ran with wrong positions or boundaries, silently)
            unit = 2 * world if layout == "zigzag" else world
            half = 2 * unit  # two sequences of 2 units each
            two = dict(input_ids=torch.randint(3, 60, (1, 2 * half), generator=torch.Generator().manual_seed(5)),
                       position_ids=torch.cat([torch.arange(half), torch.arange(half)])[None])
            pk = hf.shard_batch(two, layout=layout)
            kw = {k: pk[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
            model(input_ids=pk["input_ids"], position_ids=pk["position_ids"], **kw)  # the control runs
            attempt("packed without position_ids", lambda: model(input_ids=pk["input_ids"], **kw))
            # contiguous shards of an odd length fed to the zigzag patch: the documented ValueError (was a shape
            # RuntimeError from inside the check)
            odd = hf.shard_batch(dict(input_ids=batch["input_ids"][:1, :3 * world]), layout="contiguous")
            attempt("another layout's odd shards", lambda: model(input_ids=odd["input_ids"],
                                                                 position_ids=odd["position_ids"]))
            stale = torch.tensor([0, unit, 2 * half], dtype=torch.int32)  # another packing of the same tokens
            attempt("packed with another packing's boundaries", lambda: model(
                input_ids=pk["input_ids"], position_ids=pk["position_ids"], cu_seq_lens_q=stale, cu_seq_lens_k=stale,
                max_length_q=2 * half - unit, max_length_k=2 * half - unit))
        model.train()
        # one rank refuses at its second layer only (the forward's agreement ran at the first): it joins the ring
        # call's own signature exchange as failed, so the others raise there instead of waiting for it
        model.model.layers[1].self_attn.attention_dropout = 0.1 if last else 0.0
        attempt("later layer on one rank", lambda: model(**inputs))
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
    # the last rank's model picks its RoPE frequencies from the global length (dynamic), the others' do not: its
    # extra exchange pairs with their agreement and every rank raises (this hung until the group timeout)
    mixed = build("llama-dynamic" if rank == world - 1 else "llama")
    with hf.patch_hf(mixed, group=dist.group.WORLD, layout=layout), torch.no_grad():
        attempt("rope type on one rank", lambda: mixed(**inputs))
    # a stock model (its own attention, not ring_attn) used while the ring patch is active, each rank on its own
    # batch of its own length (a frozen teacher, an evaluation copy): stock bits, no exchange over the ring (it
    # all-gathered its dynamic RoPE length, and was off or waited for the others, before 2026-12-08)
    teacher = build("llama-dynamic")
    mine = torch.randint(3, 60, (1, 6 + 5 * rank), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        unpatched = teacher(input_ids=mine, use_cache=False).logits
        with hf.patch_hf(build("llama-dynamic"), group=dist.group.WORLD, layout=layout):
            during = teacher(input_ids=mine, use_cache=False).logits
        # a data-parallel job (each rank its own batch): the one-device patch through a one-rank group, as docs/hf.md
        # says; group=None is the default group there (a ring over every rank, as in shard_batch and ring_attn_func)
        own = dist.new_subgroups(group_size=1)[0]
        with hf.patch_hf(teacher, group=own) as one_device:
            alone = teacher(input_ids=mine, use_cache=False).logits
            world_seen = hf._active.world
        with hf.patch_hf(build("llama")):
            default_world = hf._active.world
    store.update(teacher_equal=torch.equal(unpatched, during), one_rank_world=world_seen, default_world=default_world,
                 one_rank_err=float((alone - unpatched).abs().max()), one_rank_undone=not one_device.active)
    # shards numbered from 0 on every rank (no position_ids): contiguous shards are each a run of positions,
    # off from the global ones by a different constant per rank
    contiguous = hf.shard_batch(batch, layout="contiguous")
    model.eval()
    with hf.patch_hf(model, group=dist.group.WORLD, layout="contiguous"), torch.no_grad():
        attempt("contiguous shards without position_ids", lambda: model(input_ids=contiguous["input_ids"]))
    # the fused loss given a shard's labels but not shard_batch's shift_labels: shifted within the shard, wrong
    fused = build(case["model"]).train()
    with hf.patch_hf(fused, group=dist.group.WORLD, layout=layout, fused_loss=True):
        attempt("fused loss without shift_labels", lambda: fused(**inputs, labels=inputs["input_ids"]))
        # and with them: this rank's share of the one-process loss (the shares sum to it)
        share = fused(**inputs, labels=local["shift_labels"], shift_labels=local["shift_labels"],
                      num_items_in_batch=local["num_items_in_batch"]).loss.detach().reshape(1)
    dist.all_reduce(share)
    whole = build(case["model"]).train()(**batch, use_cache=False).loss.item()
    store.update(fused_loss_sum=share.item(), stock_loss=whole)
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
                elif case["kind"] == "adapter":
                    _adapter_case(case, rank, world, store)
                elif case["kind"] == "adapter-errors":
                    _adapter_errors_case(case, rank, world, store)
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
