"""HF integration: a patched model computes what the stock one does.

Accuracy (tests/accuracy.py's rule, applied to whole models): the oracle is the stock model in float64 on the
whole batch in one process; the baseline is the stock model in float32 (``sdpa``); the patched float32 model
(ring over W = 2 and 3 gloo ranks, or one device) passes when its max error against the oracle is at most 2x
the baseline's (logits, loss) or 3x (every parameter gradient), plus the float32 floor (1e-5 x max(1, |oracle|)).

Distributed cases run in one spawned group per world size (tests/hf_workers.py) on the reference backend (one
case on the Triton kernels through the interpreter); single-device cases run here (Triton, interpreter on CPU).
Both transformers 4.48 and 5.x run this module (see docs/hf.md).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types

import pytest
import torch

import ring_attn

transformers = pytest.importorskip("transformers")

from accuracy import BACKWARD, FORWARD, assert_within_rule  # noqa: E402
from hf_models import (CONFIGS, SMALL, VOCAB, available, batch_for, build, param_grads, runs_whole,  # noqa: E402
                       stock_reference)
from hf_workers import cases_for, hub_kernel_fallback, run_world  # noqa: E402
from ring_attn.integrations import hf  # noqa: E402
from ring_attn.ops import padding as padding_ops  # noqa: E402

WORLDS = (2, 3)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    return {w: run_world(w, str(tmp_path_factory.mktemp(f"hf_w{w}"))) for w in WORLDS}


def _result(worlds, world, name, rank=0):
    st = worlds[world][rank][name]
    assert "error" not in st, f"rank {rank} failed:\n{st['error']}"
    return st


def _check_equivalence(label, got: dict, model_name: str, case: dict):
    oracle = stock_reference(model_name, case, torch.float64)
    base = stock_reference(model_name, case, torch.float32)
    assert_within_rule(f"{label} logits", got["logits"], oracle["logits"], base["logits"], torch.float32, FORWARD)
    assert_within_rule(f"{label} loss", got["loss"].reshape(1), oracle["loss"].reshape(1),
                       base["loss"].reshape(1), torch.float32, FORWARD)
    assert set(got["grads"]) == set(oracle["grads"])
    for name, g in got["grads"].items():
        assert_within_rule(f"{label} grad {name}", g, oracle["grads"][name], base["grads"][name], torch.float32,
                           BACKWARD)


@pytest.mark.parametrize("world,name", [(w, c["name"]) for w in WORLDS for c in cases_for(w) if c["kind"] == "equiv"])
def test_ring_equals_stock(worlds, world, name):
    case = next(c for c in cases_for(world) if c["name"] == name)
    if case.get("packed") and case.get("checkpointing") and _drops_attention_kwargs_when_checkpointing():
        # transformers 4.48 calls checkpointed decoder layers without the attention kwargs, so the packed
        # batch's cu_seq_lens_q never reach attention: the ring must refuse, on every rank, saying why
        for rank in range(world):
            err = worlds[world][rank][name].get("error", "")
            assert "ValueError" in err and "gradient checkpointing" in err and "cu_seq_lens_q" in err, err
        return
    st = _result(worlds, world, name)
    if "skipped" in st:
        pytest.skip(st["skipped"])
    _check_equivalence(name, st, st["case"]["model"], st["case"])
    # one ring attention call per layer, and with gradient checkpointing one more in the backward's recompute
    assert st["attn_calls"] == st["layers"] * (2 if st["case"].get("checkpointing") else 1)


def _drops_attention_kwargs_when_checkpointing() -> bool:
    """Whether this transformers calls checkpointed Llama decoder layers without ``**flash_attn_kwargs``
    (4.48 does: ``_gradient_checkpointing_func(decoder_layer.__call__, hidden_states, ...)``)."""
    import inspect

    from transformers.models.llama import modeling_llama

    src = "".join(inspect.getsource(modeling_llama.LlamaModel.forward).split())
    return "_gradient_checkpointing_func(decoder_layer.__call__," in src


@pytest.mark.parametrize("world", WORLDS)
def test_ring_refusals(worlds, world):
    [name] = [c["name"] for c in cases_for(world) if c["kind"] == "errors"]
    expected = {
        "shard_batch padding": ("ValueError", "attention_mask"),
        "padding mask": ("NotImplementedError", "padding"),
        "use_cache": ("NotImplementedError", "use_cache"),
        "output_attentions": ("NotImplementedError", "output_attentions"),
        "unsharded positions": ("ValueError", "position_ids"),
        "dropout": ("NotImplementedError", "dropout"),
        "sliding window and use_cache": ("NotImplementedError", "use_cache"),
        "rotary imported after the patch": ("NotImplementedError", "LateRotaryEmbedding"),
    }
    everywhere = {  # the same error on every rank, though only some ranks' own inputs are bad
        "position buffer rewritten in place": ("ValueError", "offsets from the global positions"),
        "packed without position_ids": ("ValueError", "shard of the packed sequences"),
        "packed with another packing's boundaries": ("ValueError", "shard of the packed sequences"),
        "contiguous shards without position_ids": ("ValueError", "offsets from the global positions"),
        "packed on one rank": ("ValueError", f"packed sequences (cu_seq_lens_q) on rank(s) [{world - 1}]"),
        "another layout's odd shards": ("ValueError", "are not a 'zigzag' shard"),
        "rope type on one rank": ("ValueError", f"rank(s) [{world - 1}] of {world} run a rotary embedding that "
                                                "recomputes its frequencies"),
        "fused loss without shift_labels": ("ValueError", "shift_labels"),
        "labels without shift_labels": ("ValueError", "labels without shift_labels"),
        "shift_labels without num_items_in_batch": ("ValueError", "without num_items_in_batch"),
    }
    one_rank = {  # the last rank's own refusal there, and on every other rank an error naming that rank
        "padding mask on one rank": ("NotImplementedError", "padding"),
        "use_cache on one rank": ("NotImplementedError", "use_cache"),
        "labels without shift_labels on one rank": ("ValueError", "shift_labels"),
    }
    if not hf._stock_loss_takes_shift_labels():  # (4.48) any labels are refused, on every rank by its own check
        del one_rank["labels without shift_labels on one rank"]
        everywhere["labels without shift_labels on one rank"] = ("ValueError", "ignores shift_labels")
        everywhere["labels without shift_labels"] = ("ValueError", "ignores shift_labels")
        everywhere["shift_labels without num_items_in_batch"] = ("ValueError", "ignores shift_labels")
    later = {"later layer on one rank": ("NotImplementedError", "dropout")}  # the others: the ring's own check
    for rank in range(world):  # every rank raises; nothing hangs
        st = _result(worlds, world, name, rank)
        assert st["after"] == world
        # generate refused on the calling rank alone, at once (only the last rank called it)
        generate = st["raised"].pop("generate on one rank", None)
        assert (generate is not None) == (rank == world - 1)
        if generate is not None:
            assert generate[0] == "NotImplementedError" and "generate with ring attention" in generate[1], generate
        # a stock model beside the ring patch keeps stock bits; a one-rank group is one device per rank, None the
        # default group
        assert st["teacher_equal"] and st["one_rank_world"] == 1 and st["one_rank_undone"], st
        assert st["default_world"] == world and st["one_rank_err"] < 1e-5, st
        # (a positive control of the fused loss over the ring: the ranks' shares sum to the one-process loss)
        assert abs(st["fused_loss_sum"] - st["stock_loss"]) <= 1e-5 * abs(st["stock_loss"]), st
        for label, (typ, word) in {**expected, **everywhere, **one_rank, **later}.items():
            got = st["raised"][label]
            assert got is not None, f"rank {rank}: {label} did not raise"
            if label in one_rank and rank != world - 1:
                typ, word = "ValueError", f"rank(s) [{world - 1}] of {world} raised on this call"
            if label in later and rank != world - 1:
                typ, word = "ValueError", f"rank {world - 1}: invalid arguments (raised on that rank)"
            assert got[0] == typ and word in got[1], f"rank {rank}: {label}: {got}"


@pytest.mark.parametrize("world,name", [(w, c["name"]) for w in WORLDS for c in cases_for(w) if c["kind"] == "adapter"])
def test_adapter_equals_stock(worlds, world, name):
    """ring-flash-attn's HF adapter (ring_attn.compat.substitute_hf_flash_attn + update_ring_flash_attn_params):
    the model on flash_attention_2, each rank its contiguous piece of one packed row; the gathered logits, the
    loss and the summed gradients equal the stock model run sequence by sequence (tests/accuracy.py's rule)."""
    st = _result(worlds, world, name)
    for rank in range(1, world):
        _result(worlds, world, name, rank)
    _check_equivalence(name, st, st["case"]["model"], st["case"])
    assert st["attn_calls"] == st["layers"] * (2 if st["case"].get("checkpointing") else 1)


@pytest.mark.parametrize("world", WORLDS)
def test_adapter_refusals(worlds, world):
    """Each refusal of the adapter raises on every rank (a bad input on some ranks only included), nothing
    waits in a collective; afterwards the model runs, use_ring_attn(False) reaches the previous function, undo
    restores it."""
    [name] = [c["name"] for c in cases_for(world) if c["kind"] == "adapter-errors"]
    same_everywhere = {
        "no params": ("RuntimeError", "update_ring_flash_attn_params"),
        "batch of 2": ("ValueError", "batch size 2"),
        "cu_seqlens differ": ("ValueError", "different cu_seqlens"),
        "token count": ("ValueError", "tokens"),
        "padding mask": ("NotImplementedError", "padding"),
        "dynamic rope": ("NotImplementedError", "dynamic"),
        "kv cache": ("NotImplementedError", "KV cache"),
        "heads_k_stride": ("ValueError", "heads_k_stride=3"),
        "dropout": ("NotImplementedError", "dropout"),
    }
    for rank in range(world):
        st = _result(worlds, world, name, rank)
        assert st["after"] == world and st["ran_after"] and st["restored"], st
        assert st["switch_calls"] == st["layers"]  # use_ring_attn(False): every layer called the previous function
        # flash_attention_2 and the Hub kernel transformers would swap in for it were taken over, and given back
        assert sorted(st["names"]) == sorted(n for n in ("flash_attention_2", hub_kernel_fallback()) if n), st["names"]
        for label, (typ, word) in same_everywhere.items():
            got = st["raised"][label]
            assert got is not None and got[0] == typ and word in got[1], f"rank {rank}: {label}: {got}"
        for label in ("positions on some ranks", "positions rewritten in place"):
            _assert_some_ranks_positions(st["raised"][label], rank)
        got = st["raised"]["no params on one rank"]
        if rank == world - 1:
            assert got is not None and got[0] == "RuntimeError" and "update_ring_flash_attn_params" in got[1], got
        else:
            assert got is not None and got[0] == "ValueError" and f"rank(s) [{world - 1}] raised" in got[1], got
        got = st["raised"]["later layer on one rank"]  # (before 2026-12-07 the other ranks waited: a hang)
        if rank == world - 1:
            assert got is not None and got[0] == "NotImplementedError" and "dropout" in got[1], got
        else:
            assert got is not None and got[0] == "ValueError" and f"rank {world - 1}: invalid arguments" in got[1], got


def _assert_some_ranks_positions(got, rank):
    """arange(n) is rank 0's slice of running positions: the others' own error, and rank 0 names them."""
    if rank == 0:
        assert got == ("ValueError", got[1]) and "rank(s) " in got[1] and "raised for this batch" in got[1], got
    else:
        assert got is not None and got[0] == "ValueError" and f"position_ids on rank {rank}" in got[1], got


# ---------------------------------------------------------------------------------------------------------
# Single device (group=None): the Triton kernels (interpreter on CPU)


def _run_patched(model_name, case, **patch_kw):
    model = build(model_name).train()
    batch = batch_for(case)
    local = hf.shard_batch(batch)
    with hf.patch_hf(model, **patch_kw):
        inputs = {k: v for k, v in local.items() if k not in ("shift_labels", "num_items_in_batch")}
        logits = model(**inputs, use_cache=False).logits
        loss = hf.causal_lm_loss(logits, local["shift_labels"], local["num_items_in_batch"])
        loss.backward()
    if case.get("packed"):
        cu = local["cu_seq_lens_q"]
        keep = torch.cat([torch.arange(int(a), int(a) + n) for a, n in zip(cu[:-1], case["packed"])])
        logits = logits[:, keep]
    else:
        logits = logits[:, :case["s"]]
    return dict(logits=logits.detach(), loss=loss.detach(),
                grads=param_grads(model))


@pytest.mark.parametrize("model_name,case", [
    ("llama-gqa", dict(b=2, s=10)),
    ("llama-yarn", dict(b=1, s=9)),
    ("llama", dict(packed=[4, 6, 3])),
    ("mistral-swa", dict(b=2, s=10)),  # sliding_window=4 on every layer
    ("qwen2-swa", dict(b=1, s=11)),  # sliding_window=5 on layer 1 only (max_window_layers=1)
    ("mistral-swa", dict(packed=[7, 2, 6])),
])
def test_single_device_equals_stock(model_name, case):
    _check_equivalence(f"single {model_name}", _run_patched(model_name, case), model_name, case)


# one case per family beyond Llama / Mistral / Qwen2 (and Starcoder2, outside MODEL_FAMILIES)
FAMILY_CASES = [
    ("qwen3", dict(b=2, s=10)),
    ("qwen3-moe", dict(b=1, s=9)),
    ("mixtral", dict(b=1, s=9)),
    ("gemma", dict(b=2, s=9)),
    ("gemma2-swa", dict(b=2, s=10)),  # soft-capping and a window of 4 on alternate layers
    ("gemma3", dict(b=1, s=11)),  # per-layer-type frequencies, q/k norms, a window on layer 0
    ("phi3-longrope", dict(b=1, s=14)),  # past original_max_position_embeddings=12: the long factors
    ("phi3-partial", dict(b=2, s=11)),  # partial rotary, short factors
    ("granite", dict(b=1, s=9)),
    ("olmo2", dict(b=1, s=9)),
    ("starcoder2-dynamic", dict(b=1, s=12)),
]


@pytest.mark.parametrize("model_name,case", FAMILY_CASES)
def test_every_family_single_device_equals_stock(model_name, case, monkeypatch):
    """Each family's whole model (logits, loss, every gradient) equals stock, with its RoPE on the fused angle
    kernel (one ``apply_rope`` per layer) when the family is in MODEL_FAMILIES, and transformers' own otherwise."""
    if not available(model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name} model")
    if not runs_whole(model_name):  # transformers < 4.53, a model outside MODEL_FAMILIES: 4-D masks, refused
        with pytest.raises(NotImplementedError, match="4-D attention_mask"):
            _run_patched(model_name, case)
        return
    calls = []
    real = ring_attn.apply_rope
    monkeypatch.setattr(ring_attn, "apply_rope", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = _run_patched(model_name, case)
    fused = CONFIGS[model_name][0] in hf.MODEL_FAMILIES
    assert len(calls) == (SMALL["num_hidden_layers"] if fused else 0)
    _check_equivalence(f"single {model_name}", got, model_name, case)


def test_every_model_family_has_a_model_under_test():
    """MODEL_FAMILIES (the modules whose RoPE the patch replaces) lists only families these tests run whole."""
    tested = {CONFIGS[name][0] for name, _ in FAMILY_CASES} | {"llama", "mistral", "qwen2"}
    assert set(hf.MODEL_FAMILIES) <= tested, set(hf.MODEL_FAMILIES) - tested


def test_rotary_of_a_model_outside_transformers_is_wrapped_while_patched():
    """A model whose modules come from outside transformers.models (remote code): its rotary embedding class is
    wrapped by patch_hf(model) (so over a ring its frequencies follow the global length) and restored by undo."""
    remote = types.ModuleType("remote_code_modeling_for_ring_attn_test")
    rotary_cls = type("RemoteRotaryEmbedding", (torch.nn.Module,), {
        "__module__": remote.__name__, "forward": lambda self, x, position_ids: (x, x)})
    remote.RemoteRotaryEmbedding = rotary_cls
    remote.ALL_ATTENTION_FUNCTIONS = {}  # remote code that dispatches attention through the interface imports it
    stock_forward = rotary_cls.forward
    model = torch.nn.Sequential(rotary_cls())
    model.config = types.SimpleNamespace(_attn_implementation="sdpa", use_cache=False)
    sys.modules[remote.__name__] = remote
    try:
        with hf.patch_hf(model):
            assert rotary_cls.forward is not stock_forward
            assert model.config._attn_implementation == hf.ATTN_IMPLEMENTATION
            x = torch.randn(1, 3, 4)
            assert model[0](x, torch.arange(3)[None])[0] is x  # the wrapper calls the stock forward
        assert rotary_cls.forward is stock_forward
        assert model.config._attn_implementation == "sdpa"
    finally:
        del sys.modules[remote.__name__]


def _loss_and_grads(model, inputs, shift_labels, n):
    logits = model(**inputs, use_cache=False).logits
    loss = hf.causal_lm_loss(logits, shift_labels, n)
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    return logits.detach(), loss.detach(), grads


@pytest.mark.parametrize("model_name,case", [
    ("llama-gqa", dict(b=2, s=12)),
    ("llama-gqa", dict(packed=[5, 7, 4])),  # boundaries given (cu_seq_lens_q), as flash-attn collators do
    ("mistral-swa", dict(b=1, s=11)),  # a sliding-window mask creator
    ("phi3-partial", dict(b=1, s=13)),  # LongRoPE past its switch, partial rotary
    ("gemma3", dict(b=1, s=10)),  # per-layer-type frequencies and windows
])
def test_torch_compile_one_graph_forward_and_backward(model_name, case):
    """The patched model compiles as one graph (``fullgraph=True``: no graph break in the attention, the RoPE
    custom ops or the mask function), forward and backward through AOT autograd and the custom ops' fake
    implementations, and computes what it computes eagerly."""
    if not available(model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name} model")
    model = build(model_name).train()
    local = hf.shard_batch(batch_for(case))
    inputs = {k: v for k, v in local.items() if k not in ("shift_labels", "num_items_in_batch")}
    args = (local["shift_labels"], local["num_items_in_batch"])
    torch._dynamo.reset()
    try:  # the stock model first (before 5.24, LongRoPE's frequency switch is a Python `if` on a tensor)
        with torch.no_grad():
            torch.compile(model, backend="eager", fullgraph=True)(**inputs, use_cache=False)
    except torch._dynamo.exc.Unsupported as e:
        pytest.skip(f"transformers {transformers.__version__}'s own {model_name} model does not compile as one "
                    f"graph: {str(e).splitlines()[0]}")
    torch._dynamo.reset()
    with hf.patch_hf(model):
        ref = _loss_and_grads(model, inputs, *args)  # eager (also runs transformers' lazy rope state once)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        got = _loss_and_grads(compiled, inputs, *args)
    for label, a, b in [("logits", got[0], ref[0]), ("loss", got[1], ref[1])] + \
            [(f"grad {i}", x, y) for i, (x, y) in enumerate(zip(got[2], ref[2]))]:
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item()), label


def test_the_fused_apply_rotary_takes_every_call_form_stock_takes():
    # its arguments are bound in plain Python (for torch.compile); every form means what it means to stock, and
    # calls stock refuses raise stock's TypeError
    from transformers.models.llama import modeling_llama

    stock = modeling_llama.apply_rotary_pos_emb
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 1, 5, 8, generator=g)
    ang = torch.arange(5.0)[:, None] * torch.tensor([1.0, 0.1, 0.01, 0.001])
    cos, sin = torch.cat([ang.cos()] * 2, -1)[None], torch.cat([ang.sin()] * 2, -1)[None]
    want = stock(q, k, cos, sin)
    with hf.patch_hf(build("llama")):
        fused = modeling_llama.apply_rotary_pos_emb
        assert fused is not stock
        for got in (fused(q, k, cos, sin), fused(q, k, cos=cos, sin=sin), fused(q=q, k=k, cos=cos, sin=sin),
                    fused(q, k, sin=sin, cos=cos), fused(sin=sin, k=k, cos=cos, q=q),
                    fused(q, k, cos, sin, unsqueeze_dim=1)):
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        q2, k2 = q.transpose(1, 2), k.transpose(1, 2)  # [b, s, h, d] with unsqueeze_dim=2, by keyword
        for a, b in zip(fused(q2, k2, cos, sin, unsqueeze_dim=2), stock(q2, k2, cos, sin, unsqueeze_dim=2)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        for bad in (lambda: fused(q, k, cos), lambda: fused(q, k, cos, sin, bogus=1),
                    lambda: fused(q, k, cos, sin, q=q)):
            with pytest.raises(TypeError):
                bad()


@pytest.mark.parametrize("model_name", ["gemma3", "gemma2-swa"])
def test_torch_compile_one_graph_as_generate_calls_the_model(model_name):
    """``model(ids, return_dict=True)`` (generate's call) compiles as one graph: the fused-RoPE wrapper binds its
    arguments in plain Python (``inspect.Signature.bind`` there broke fullgraph tracing for Gemma 2/3 once the trace
    had changed a dict: "mapping proxy affected by dictionary mutation"), with the eager values."""
    if not available(model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name} model")
    model = build(model_name).eval()
    ids = torch.randint(1, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend="eager", fullgraph=True)(ids, return_dict=True)
    except torch._dynamo.exc.Unsupported as e:
        pytest.skip(f"transformers {transformers.__version__}'s own {model_name} model does not compile as one "
                    f"graph: {str(e).splitlines()[0]}")
    torch._dynamo.reset()
    with hf.patch_hf(model), torch.no_grad():
        ref = model(ids, return_dict=True).logits
        got = torch.compile(model, backend="eager", fullgraph=True)(ids, return_dict=True).logits
    assert (got - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("model_name", ["llama", "mistral-swa"])
def test_torch_compile_one_graph_with_a_padding_mask(model_name):
    """A padded batch compiles as one graph (``fullgraph=True``): whether and where the 2-D mask pads is found
    inside the padded-attention custom op, not by host reads in the traced code. Right padding (training: loss
    and gradients), left padding with position_ids that restart at the first real token (batched generation's
    prefill) and an all-ones mask all equal the eager patched model at the real positions."""
    if not available(model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name} model")
    model = build(model_name).train()
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(8))
    torch._dynamo.reset()
    try:  # the stock model itself (no mask) must compile as one graph for this to say anything
        with torch.no_grad():
            torch.compile(model, backend="eager", fullgraph=True)(ids, use_cache=False)
    except torch._dynamo.exc.Unsupported as e:
        pytest.skip(f"transformers {transformers.__version__}'s own {model_name} model does not compile as one "
                    f"graph: {str(e).splitlines()[0]}")
    right = torch.ones_like(ids)
    right[0, 7:] = 0
    right[2, 10:] = 0
    left = torch.ones_like(ids)
    left[1, :4] = 0
    left_pos = (left.cumsum(1) - 1).masked_fill(left == 0, 1)  # what generate() passes

    def run(m, mask, pos):
        logits = m(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        real = mask.bool()
        loss = logits[real].float().pow(2).mean()
        return logits.detach(), torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])

    with hf.patch_hf(model):
        for label, mask, pos in [("right", right, None), ("left", left, left_pos),
                                 ("all ones", torch.ones_like(ids), None)]:
            ref_logits, ref_grads = run(model, mask, pos)
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
            logits, grads = run(compiled, mask, pos)
            real = mask.bool()
            assert (logits[real] - ref_logits[real]).abs().max().item() < 1e-5, label
            for i, (a, b) in enumerate(zip(grads, ref_grads)):
                assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item()), (label, i)


def test_torch_compile_refuses_packed_positions_without_boundaries():
    """Under torch.compile the attention cannot find packed sequences in position_ids (that needs a host read);
    a batch whose positions restart without cu_seq_lens_q fails loudly (a device-side assert), never computes
    attention across the packed sequences."""
    model = build("llama").eval()
    local = hf.shard_batch(batch_for(dict(packed=[5, 7])))
    with hf.patch_hf(model), torch.no_grad():
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        n = local["input_ids"].shape[1]
        compiled(input_ids=local["input_ids"], position_ids=torch.arange(n)[None], use_cache=False)  # one sequence
        with pytest.raises(RuntimeError, match="cu_seq_lens_q"):
            compiled(input_ids=local["input_ids"], position_ids=local["position_ids"], use_cache=False)
        # an all-ones attention_mask (tokenizers return one) does not hide the packing: still refused
        with pytest.raises(RuntimeError, match="cu_seq_lens_q"):
            compiled(input_ids=local["input_ids"], position_ids=local["position_ids"],
                     attention_mask=torch.ones_like(local["input_ids"]), use_cache=False)


@pytest.mark.parametrize("model_name", ["llama", "mistral-swa", "qwen2-swa"])
def test_single_device_padding_matches_stock(model_name):
    """Left-padded batch (as in batched generation): real positions equal the stock model's (with a sliding
    window too: the real tokens of a row are contiguous, so the window counts the same keys)."""
    model = build(model_name, attn="oracle")
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        with hf.patch_hf(model):
            got = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max().item() < 1e-4


def test_single_device_attention_dropout():
    """config.attention_dropout > 0 in training on one device runs the kernels' dropout: reproducible under
    torch.manual_seed, a fresh mask per call, gradients flow; in eval mode the patched model equals stock."""
    model = build("llama", attn="oracle")
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.3
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        stock = model(ids, use_cache=False).logits
    with hf.patch_hf(model):
        with torch.no_grad():
            assert (model(ids, use_cache=False).logits - stock).abs().max().item() < 1e-4  # eval: no dropout
        model.train()
        torch.manual_seed(0)
        a = model(ids, use_cache=False).logits
        b = model(ids, use_cache=False).logits
        torch.manual_seed(0)
        c = model(ids, use_cache=False).logits
        assert torch.equal(a, c) and not torch.equal(a, b)
        assert (a - stock).abs().max().item() > 1e-2  # dropout changed the result
        a.float().pow(2).mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    model.eval()


def test_padding_is_analysed_once_per_forward_and_again_after_an_in_place_change(monkeypatch):
    """The unpadding plan (gather indices, cu_seqlens, host reads) is built once per forward, not once per
    layer; a mask buffer rewritten in place between forwards is analysed again (no stale plan)."""
    model = build("llama", attn="oracle")
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    built = []
    real = padding_ops.UnpadPlan
    monkeypatch.setattr(padding_ops, "UnpadPlan", lambda *a: (built.append(1), real(*a))[1])
    mask = torch.ones_like(ids)
    for pad in (3, 5):
        mask.fill_(1)
        mask[0, :pad] = 0  # in place: the same tensor object, new contents
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        with torch.no_grad():
            ref = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
            with hf.patch_hf(model):
                got = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        real_rows = mask.bool()
        assert (got[real_rows] - ref[real_rows]).abs().max().item() < 1e-4, pad
    assert len(built) == 2, built  # two forwards, each with several layers: one plan each
    # the cache on a mask tensor follows in-place changes (transformers >= 4.53 hands the layers a fresh mask per
    # forward, older releases the caller's own tensor)
    keep, n = hf._padding(mask, 10)
    assert n == 10 and keep is hf._padding(mask, 10)[0]
    assert padding_ops.unpad_plan(keep, 10) is padding_ops.unpad_plan(keep, 10)
    mask.fill_(1)
    assert hf._padding(mask, 10) == (None, 10)
    mask[1, 7:] = 0
    assert torch.equal(hf._padding(mask, 10)[0], mask.bool())
    assert hf._padding(mask[:, :6], 10)[1] == 6  # a static cache's filled slots: the attention uses 6 keys


def test_packed_position_buffer_rewritten_in_place_is_analysed_again():
    """The packed-sequence boundaries found from position_ids are cached per tensor (once per forward, not per
    layer); a buffer rewritten in place for the next batch gets its own boundaries, not the previous batch's."""
    model = build("llama", attn="oracle")
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    first = torch.cat([torch.arange(4), torch.arange(12)])[None]
    second = torch.cat([torch.arange(10), torch.arange(6)])[None]
    with torch.no_grad():
        ref = torch.cat([model(ids[:, :10], use_cache=False).logits, model(ids[:, 10:], use_cache=False).logits], 1)
        with hf.patch_hf(model):
            buf = first.clone()
            model(input_ids=ids, position_ids=buf, use_cache=False)
            buf.copy_(second)
            got = model(input_ids=ids, position_ids=buf, use_cache=False).logits
    assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("model_name", ["llama", "mistral-swa"])
def test_batched_generation_with_left_padding_equals_stock(model_name):
    """Batched greedy generation from prompts of different lengths (left padding, as tokenizers pad for
    decoder-only generation), with a KV cache: the same tokens and, at every step, the same logits as stock."""
    model = build(model_name, attn="oracle")
    ids = torch.randint(1, VOCAB, (3, 8), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :6] = 0
    ids = ids * mask  # pad token 0
    _assert_generates_as_stock(model, ids, mask)


def _assert_generates_as_stock(model, ids, mask, max_new_tokens=5, **kw):
    """Greedy ``generate`` patched and stock: the same tokens, and every step's logits within 1e-4."""
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True, **kw)
    ref = model.generate(ids, attention_mask=mask, **kw)
    with hf.patch_hf(model):
        out = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(out.sequences, ref.sequences), (out.sequences, ref.sequences)
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
        assert (a - b).abs().max().item() < 1e-4, f"step {step}: {(a - b).abs().max().item()}"


@pytest.mark.parametrize("model_name", ["llama", "mistral-swa", "qwen2-swa", "qwen3", "gemma2-swa", "gemma3",
                                        "phi3-longrope"])
def test_generate_with_kv_cache_equals_stock(model_name):
    """Greedy generation with a KV cache; the windowed models generate past their window (4 and 5 keys), so
    the window cuts the cache (bottom-right aligned) in every decoding step. Phi-3 generates from 10 to 15
    tokens, across its LongRoPE switch at 12 (stock switches the frequencies mid-generation; so must the patch)."""
    if not available(model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name} model")
    model = build(model_name, attn="oracle")
    prompt = torch.randint(0, VOCAB, (1, 10 if model_name.startswith("phi3") else 6),
                           generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
    with hf.patch_hf(model):
        if model_name == "gemma2-swa" and importlib.util.find_spec("transformers.masking_utils") is None:
            # < 4.53: Gemma 2's generation prepares a 4-D mask for its hybrid cache itself: refused, not guessed
            with pytest.raises(NotImplementedError, match="4-D attention_mask"):
                model.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
            return
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
    got = out.sequences
    assert torch.equal(got, ref.sequences), (got, ref.sequences)
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):  # every decoding step's logits, cache included
        assert (a - b).abs().max().item() < 1e-4, f"step {step}: {(a - b).abs().max().item()}"
    if model_name in ("mistral-swa", "qwen2-swa"):  # the window matters: full attention scores differently
        full = build(model_name, **(dict(sliding_window=None) if model_name == "mistral-swa"
                                    else dict(use_sliding_window=False)))
        with torch.no_grad():
            seq = got[:, :-1]
            windowed = model(seq, use_cache=False).logits
            assert (full(seq, use_cache=False).logits - windowed).abs().max().item() > 1e-3


@pytest.mark.parametrize("model_name", ["llama", "mistral", "qwen2"])
def test_undo_is_bit_identical(model_name):
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(5))
    never = build(model_name)
    with torch.no_grad():
        ref = never(ids, use_cache=False).logits
    model = build(model_name)
    handle = hf.patch_hf(model)
    with torch.no_grad():
        patched = model(ids, use_cache=False).logits
    handle.undo()
    handle.undo()  # idempotent
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        after = model(ids, use_cache=False).logits
    assert torch.equal(after, ref)
    assert (patched - ref).abs().max().item() < 1e-4  # the patch was in effect (and close)
    # a model loaded after undo cannot ask for ring_attn any more
    assert "ring_attn" not in list(_attention_keys())


def _attention_keys():
    from transformers import modeling_utils

    fns = modeling_utils.ALL_ATTENTION_FUNCTIONS
    return list(fns.keys()) if hasattr(fns, "keys") else list(fns)


def test_context_manager_and_loading_by_name():
    with hf.patch_hf() as handle:
        assert "ring_attn" in _attention_keys()
        model = build("llama", attn="ring_attn")  # a model created while patched can name the implementation
        assert model.config._attn_implementation == "ring_attn"
        ids = torch.randint(0, VOCAB, (1, 6))
        with torch.no_grad():
            got = model(ids, use_cache=False).logits
            model.config._attn_implementation = "sdpa"
            ref = model(ids, use_cache=False).logits
        assert (got - ref).abs().max().item() < 1e-4
        with pytest.raises(RuntimeError, match="already active"):
            hf.patch_hf()
    assert not handle.active
    assert "ring_attn" not in _attention_keys()


def test_sliding_window_size():
    """transformers' window keeps keys with i - j < sliding_window: left = sliding_window - 1."""
    assert hf.sliding_window_size(None, 100) == (-1, -1)
    assert hf.sliding_window_size(4, 10) == (3, 0)
    assert hf.sliding_window_size(4, 10, causal=False) == (3, 3)
    assert hf.sliding_window_size(4, 4) == (-1, -1)  # cannot cut: the plain causal kernel
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="sliding_window"):
            hf.sliding_window_size(bad, 10)


class _Module(torch.nn.Module):
    is_causal = True


@pytest.mark.parametrize("window", [None, 3])
def test_softcap_from_module_kwargs(window):
    """A module passing ``softcap`` (Gemma 2's attn_logit_softcapping) gets capped scores: equals the float64
    formula softmax(softcap * tanh(q k^T * scale / softcap)) under the causal (and window) mask."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 9, 8, generator=g) * 3  # large scores, so the cap matters
    k = torch.randn(2, 2, 9, 8, generator=g) * 3
    v = torch.randn(2, 2, 9, 8, generator=g)
    cap, scale = 2.0, 8 ** -0.5

    def formula(dtype):
        qq = q.to(dtype)
        kk, vv = (x.to(dtype).repeat_interleave(2, 1) for x in (k, v))  # query head h reads kv head h // 2
        s = cap * torch.tanh(qq @ kk.transpose(-1, -2) * scale / cap)
        i, j = torch.arange(9).reshape(-1, 1), torch.arange(9).reshape(1, -1)
        keep = (j <= i) & ((i - j < window) if window else True)
        return (s.masked_fill(~keep, float("-inf")).softmax(-1) @ vv).transpose(1, 2)

    with hf.patch_hf():
        got, _ = hf.ring_attn_attention_forward(_Module(), q, k, v, None, scaling=scale, sliding_window=window,
                                                softcap=cap)
        uncapped, _ = hf.ring_attn_attention_forward(_Module(), q, k, v, None, scaling=scale,
                                                     sliding_window=window)
        with pytest.raises(ValueError, match="softcap"):
            hf.ring_attn_attention_forward(_Module(), q, k, v, None, scaling=scale, softcap=-1.0)
    assert_within_rule("softcap", got, formula(torch.float64), formula(torch.float32), torch.float32, FORWARD)
    assert (uncapped - got).abs().max().item() > 1e-2  # the cap was applied


def test_gemma2_softcap_and_window_from_the_model():
    """A whole model whose modules pass ``softcap`` and ``sliding_window`` (Gemma 2: attn_logit_softcapping,
    alternating windowed layers) equals stock ``eager`` (the implementation transformers uses for softcap). On
    transformers < 4.53 Gemma 2's sliding layers slice a 4-D mask themselves, so a padding mask is handed to the
    stock builder and its 4-D result refused (NotImplementedError, never silently wrong)."""
    cfg = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    max_position_embeddings=64, sliding_window=4, attn_logit_softcapping=2.0,
                                    query_pre_attn_scalar=8)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # large scores, so the cap matters
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        with hf.patch_hf(model):
            got = model(ids, use_cache=False).logits
            if not hasattr(importlib.import_module("transformers.models.gemma2.modeling_gemma2"),
                           "create_sliding_window_causal_mask"):
                pad = torch.ones_like(ids)
                pad[0, :3] = 0
                with pytest.raises(NotImplementedError, match="4-D attention_mask"):
                    model(ids, attention_mask=pad, use_cache=False)
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        uncapped = model(ids, use_cache=False).logits
    assert (got - ref).abs().max().item() < 1e-4
    assert (uncapped - ref).abs().max().item() > 1e-2  # the cap matters in this model


def _create_mask(name, model, s, **extra):
    """Call transformers' mask creator ``name`` (as the patched modeling modules see it) for ``s`` tokens, naming
    the arguments as the installed version names them."""
    import inspect

    masking_utils = importlib.import_module("transformers.masking_utils")
    creator = getattr(masking_utils, name)
    emb = torch.zeros(1, s, model.config.hidden_size)
    values = dict(config=model.config, inputs_embeds=emb, input_embeds=emb, attention_mask=None, cache=None,
                  past_key_values=None, cache_position=torch.arange(s), position_ids=torch.arange(s)[None],
                  **extra)
    params = inspect.signature(creator).parameters
    if "cache" in params:  # 5.24 renamed past_key_values (5.25 still lists the old name, deprecated)
        values.pop("past_key_values")
    return creator(**{k: v for k, v in values.items() if k in params})


def test_mask_function_refuses_masks_the_kernels_cannot_express():
    """transformers >= 4.53 builds masks through the patch's mask function: causal and sliding-window masks need
    none (None: the kernels mask), while a model's own extra masks (or/and mask functions, bidirectional
    attention) are refused by name, also now that plain creators skip the walk over the mask's closures."""
    if importlib.util.find_spec("transformers.masking_utils") is None:
        pytest.skip(f"transformers {transformers.__version__} builds masks inside the models (no mask interface)")
    model = build("mistral", sliding_window=4)

    def look_ahead(batch_idx, head_idx, q_idx, kv_idx):  # a model's own extra mask: keys after the query
        return kv_idx > q_idx

    with hf.patch_hf(model):
        assert _create_mask("create_causal_mask", model, 8) is None
        assert _create_mask("create_sliding_window_causal_mask", model, 8) is None
        for extra in ("or_mask_function", "and_mask_function"):
            with pytest.raises(NotImplementedError, match="look_ahead"):
                _create_mask("create_causal_mask", model, 8, **{extra: look_ahead})
            with pytest.raises(NotImplementedError, match="look_ahead"):
                _create_mask("create_sliding_window_causal_mask", model, 8, **{extra: look_ahead})
        if hasattr(importlib.import_module("transformers.masking_utils"), "create_bidirectional_mask"):
            with pytest.raises(NotImplementedError, match="bidirectional"):
                _create_mask("create_bidirectional_mask", model, 8)
        assert _create_mask("create_causal_mask", model, 8) is None  # the flag was restored after the refusals


def test_mask_function_alignment_both_signatures():
    """The mask function takes transformers 5.x's ``q_length``/``q_offset`` and 4.53-4.57's ``cache_position``;
    queries that are the last keys, or one query that sees every key (4.x Phi-3 runs a lone token after dropping
    its cache at the LongRoPE switch), pass. Queries ending before the last key are a static cache's (slots
    past the queries are empty): the mask of the filled slots is returned, also when nothing is padded, as
    flash_attention_2's mask function does. Queries past the keys are refused, eagerly and, as a device-side
    assert, under torch.compile."""
    cpu = torch.device("cpu")
    with hf.patch_hf(build("llama")):
        for q_len, q_start, kv_len, filled in [(3, 5, 8, None), (1, 7, 8, None), (1, 12, 1, None), (3, 4, 8, 7),
                                               (1, 3, 8, 4), (2, 12, 1, "refused")]:
            for kw in (dict(q_length=q_len, q_offset=q_start, device=cpu),
                       dict(cache_position=torch.arange(q_start, q_start + q_len))):
                if filled == "refused":
                    with pytest.raises(NotImplementedError, match="not the last"):
                        hf.ring_attn_mask(1, kv_length=kv_len, **kw)
                elif filled is None:
                    assert hf.ring_attn_mask(1, kv_length=kv_len, **kw) is None
                else:
                    assert torch.equal(hf.ring_attn_mask(1, kv_length=kv_len, **kw), torch.ones(1, filled).bool())
        # a static cache's caller mask: covering the filled slots (generate's), or every slot (cut), else refused
        pad = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0]])
        kw = dict(q_length=3, q_offset=4, kv_length=8, device=cpu)
        assert torch.equal(hf.ring_attn_mask(1, attention_mask=pad[:, :7], **kw), pad[:, :7].bool())
        assert torch.equal(hf.ring_attn_mask(1, attention_mask=pad, **kw), pad[:, :7].bool())
        with pytest.raises(NotImplementedError, match="covers 5"):
            hf.ring_attn_mask(1, attention_mask=pad[:, :5], **kw)
        with pytest.raises(ValueError, match="covers 6 tokens, but the queries see 8"):  # no static cache: too short
            hf.ring_attn_mask(1, attention_mask=pad[:, :6], q_length=3, q_offset=5, kv_length=8)
        torch._dynamo.reset()
        compiled = torch.compile(lambda pos, n, m=None: (hf.ring_attn_mask(1, kv_length=n, cache_position=pos,
                                                                            attention_mask=m), pos + 1),
                                 backend="aot_eager", fullgraph=True)
        compiled(torch.arange(5, 8), 8)
        compiled(torch.tensor([12]), 1)
        got, _ = compiled(torch.arange(4, 7), 8, pad[:, :7])  # a static cache with its mask
        assert torch.equal(got, pad[:, :7].bool())
        with pytest.raises(RuntimeError, match="does not end at the last query"):
            compiled(torch.arange(3, 6), 8, pad[:, :7])
        with pytest.raises(RuntimeError, match="static cache"):  # earlier queries and no mask to say which keys
            compiled(torch.arange(4, 7), 8)


@pytest.mark.parametrize("model_name", ["llama", "mistral-swa", "gemma2-swa", "gemma3"])
@pytest.mark.parametrize("prompt_len", [2, 7])
def test_generate_with_a_static_cache_equals_stock(model_name, prompt_len):
    """``cache_implementation="static"``: transformers hands the attention every slot of the preallocated cache,
    filled only up to the queries. Batched greedy generation with left padding gives stock's tokens and logits
    at every step; the windowed models' caches are shorter than the window (prompt 2: not yet full, static
    shape) or cut by it. transformers < 4.53 builds a 4-D mask for a static cache in generate: refused."""
    if not available(model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name} model")
    model = build(model_name, attn="oracle")
    ids = torch.randint(1, VOCAB, (2, prompt_len), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, :prompt_len // 2] = 0
    ids = ids * mask
    if importlib.util.find_spec("transformers.masking_utils") is None:
        with hf.patch_hf(model), pytest.raises(NotImplementedError, match="4-D attention_mask|StaticCache"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0, cache_implementation="static")
        return
    _assert_generates_as_stock(model, ids, mask, max_new_tokens=6, cache_implementation="static")


def test_forward_with_a_static_cache_equals_stock():
    """A forward over a ``StaticCache`` (prefill, then one decoding step), with and without an attention_mask:
    only the filled slots are attended (transformers < 4.53 included, where an all-ones mask would otherwise
    reach the attention as None and the empty slots would be attended)."""
    from transformers import StaticCache

    model = build("llama", attn="oracle")
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(9))

    def new_cache():
        try:
            return StaticCache(config=model.config, max_cache_len=16)
        except TypeError:  # transformers 4.x
            return StaticCache(config=model.config, batch_size=1, max_cache_len=16, dtype=torch.float32)

    with torch.no_grad():
        for with_mask in (False, True):
            outs = []
            for patched in (False, True):
                cache = new_cache()
                with hf.patch_hf(model) if patched else contextlib.nullcontext():
                    extra = dict(attention_mask=torch.ones(1, 6, dtype=torch.long)) if with_mask else {}
                    first = model(ids, past_key_values=cache, use_cache=True, **extra).logits
                    if with_mask:
                        extra = dict(attention_mask=torch.ones(1, 7, dtype=torch.long))
                    nxt = model(ids[:, :1], past_key_values=cache, use_cache=True, cache_position=torch.tensor([6]),
                                **extra).logits
                outs.append((first, nxt))
            for a, b in zip(*outs):
                assert (a - b).abs().max().item() < 1e-4, (with_mask, (a - b).abs().max().item())


def test_sliding_window_longer_than_the_sequence_is_full_attention():
    """A window that cuts nothing is accepted (the mask function recognises transformers' sliding-window mask)."""
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(6))
    model = build("mistral", sliding_window=16)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        with hf.patch_hf(model):
            got = model(ids, use_cache=False).logits
    assert (got - ref).abs().max().item() < 1e-4


def test_single_device_refusals():
    model = build("mistral", sliding_window=4)
    ids = torch.randint(0, VOCAB, (1, 8))
    holes = torch.ones_like(ids)
    holes[0, 3] = 0  # a hole inside the row: HF's window counts it, the packed kernel would not
    with hf.patch_hf(model), torch.no_grad():
        with pytest.raises(NotImplementedError, match="sliding window"):
            model(ids, attention_mask=holes, use_cache=False)
        with pytest.raises(NotImplementedError, match="output_attentions"):
            model(ids[:, :3], use_cache=False, output_attentions=True)
    # attention dropout in training runs on one device (test_single_device_attention_dropout), not over a ring


def test_models_without_the_attention_interface_are_refused():
    """Bloom runs its own attention (no AttentionInterface): switching it to "ring_attn" would change nothing and
    outputs would silently stay stock. patch_hf refuses it before patching anything (before 2026-12-07 only a
    transformers warning said so, and `ring-attn kld` reported KL 0 for it)."""
    import transformers

    cfg = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4)
    model = transformers.BloomForCausalLM(cfg)
    with pytest.raises(NotImplementedError, match="BloomForCausalLM does not dispatch its attention"):
        hf.patch_hf(model)
    with hf.patch_hf(build("llama")):  # nothing was left active by the refusal
        pass


def test_negative_positions_on_padding_use_the_tables():
    """``position_ids = attention_mask.cumsum(-1) - 1`` puts -1 on left padding; stock rotates those tokens by a
    negative angle and the mask hides them. The fused kernel refuses negative positions, so the patch now runs such
    a forward on the model's own cos/sin tables (before 2026-12-07: ValueError "positions must be >= 0")."""
    model = build("llama").eval()
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    pos = mask.cumsum(-1) - 1
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        with hf.patch_hf(model):
            got = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    assert (got - ref)[mask.bool()].abs().max() < 1e-5
    floats = torch.arange(8.0).expand(2, 8) + 3  # float position_ids (stock takes them): the tables (was TypeError)
    with torch.no_grad():
        ref = model(ids, position_ids=floats, use_cache=False).logits
        with hf.patch_hf(model):
            got = model(ids, position_ids=floats, use_cache=False).logits
    assert (got - ref).abs().max() < 1e-5


def test_mask_shorter_than_the_input_names_the_mask():
    """A mask one column short, no cache: a ValueError naming attention_mask (5.x raised a NotImplementedError
    about bottom-right alignment). transformers 4.48 builds the mask itself and, like stock, runs it."""
    model = build("llama").eval()
    ids = torch.randint(3, VOCAB, (2, 9))
    short = torch.ones(2, 8, dtype=torch.long)
    with torch.no_grad():
        try:
            with hf.patch_hf(model):
                got = model(ids, attention_mask=short, use_cache=False).logits
        except ValueError as exc:
            assert "attention_mask covers 8" in str(exc), exc
        else:
            assert torch.allclose(got, model(ids, attention_mask=short, use_cache=False).logits, atol=1e-5)


def test_packed_keys_follow_cu_seq_lens_k():
    """transformers passes cu_seq_lens_k / max_length_k next to the queries' (flash_attention_2 honours them);
    they were ignored (the queries' boundaries used for the keys)."""
    model = build("llama").eval()
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 8, 8, generator=g)
    k, v = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(2))
    cu_q = torch.tensor([0, 2, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 8], dtype=torch.int32)
    with hf.patch_hf(model):
        out, _ = hf.ring_attn_attention_forward(attn, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu_q,
                                                cu_seq_lens_k=cu_k, max_length_q=6, max_length_k=5)
    want = ring_attn.flash_attn_varlen_func(*(x[0].transpose(0, 1) for x in (q, k, v)), cu_q, cu_k, 6, 5,
                                            causal=True, softmax_scale=0.3)
    assert torch.equal(out[0], want)


def test_mask_longer_than_the_input_is_refused():
    """A mask with more columns than the input and no cache: stock 5.x fails with a shape error and 4.48 uses its
    first columns; the patch used its last ones, silently (before 2026-12-08). Now a ValueError naming the mask."""
    model = build("llama").eval()
    ids = torch.randint(3, VOCAB, (2, 9))
    long = torch.ones(2, 12, dtype=torch.long)
    long[0, :5] = 0
    with torch.no_grad(), hf.patch_hf(model), pytest.raises(ValueError, match="attention_mask covers 12 tokens"):
        model(ids, attention_mask=long, use_cache=False)


def test_padding_mask_wins_over_packing_kwargs():
    """cu_seq_lens_q/k with an attention_mask that pads: the mask decides, as in transformers' flash_attention_2
    (stock sdpa ignores the packing kwargs). The mask was dropped, so real tokens attended to padding (0.25 off on
    logits of magnitude 0.34 before 2026-12-08)."""
    model = build("llama").eval()
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cu = torch.tensor([0, 12], dtype=torch.int32)
    packing = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=12, max_length_k=12)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        with hf.patch_hf(model):
            got = model(ids, attention_mask=mask, position_ids=pos, use_cache=False, **packing).logits
    real = mask[0].bool()
    assert (got[0, real] - ref[0, real]).abs().max() < 1e-5


def test_packing_kwargs_without_max_lengths():
    """cu_seq_lens_q/k without max_length_q/k: the longest sequence of each is used (a TypeError from int(None)
    before 2026-12-08; with only max_length_k missing, the queries' maximum was used for the keys)."""
    model = build("llama").eval()
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    cu_q = torch.tensor([0, 2, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 8], dtype=torch.int32)
    with hf.patch_hf(model):
        out, _ = hf.ring_attn_attention_forward(attn, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu_q,
                                                cu_seq_lens_k=cu_k)
        with pytest.raises(ValueError, match="cu_seq_lens_q must be a 1-D int32 tensor"):
            hf.ring_attn_attention_forward(attn, q, k, v, None, cu_seq_lens_q=torch.tensor(3, dtype=torch.int32))
    want = ring_attn.flash_attn_varlen_func(*(x[0].transpose(0, 1) for x in (q, k, v)), cu_q, cu_k, 6, 7,
                                            causal=True, softmax_scale=0.3)
    assert torch.equal(out[0], want)


def test_a_model_beside_the_patch_keeps_stock_rope():
    """While a patch is active, a model that does not run ring_attn (a stock teacher, an evaluation copy) sharing
    the patched rotary classes and apply_rotary_pos_emb gets transformers' own RoPE, bit for bit (it got the fused
    kernel before 2026-12-08); the patched model and one loaded with attn_implementation='ring_attn' still do."""
    stock = build("llama").eval()
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = stock(ids, use_cache=False).logits
        calls = []
        with hf.patch_hf(build("llama")), _count_fused_rope(calls):
            beside = stock(ids, use_cache=False).logits
            assert not calls
            loaded = build("llama", attn=hf.ATTN_IMPLEMENTATION)
            loaded(ids, use_cache=False)
            assert calls  # a model whose config names ring_attn: fused
    assert torch.equal(beside, ref)


@contextlib.contextmanager
def _count_fused_rope(calls: list):
    """Record every call of the fused RoPE kernels (apply_rope, apply_rope_cos_sin) made through ring_attn."""
    saved = ring_attn.apply_rope, ring_attn.apply_rope_cos_sin

    def counted(fn):
        def call(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)
        return call

    ring_attn.apply_rope, ring_attn.apply_rope_cos_sin = (counted(f) for f in saved)
    try:
        yield
    finally:
        ring_attn.apply_rope, ring_attn.apply_rope_cos_sin = saved


@pytest.mark.parametrize("backward_inside", [True, False])
def test_undo_before_a_checkpointed_backward_warns(backward_inside):
    """Reentrant gradient checkpointing recomputes each layer in backward(); after undo() that recompute runs stock
    attention on ring_attn's masks (none for packed rows), and the gradients are wrong (0.48 off here). undo()
    warns when such recomputes are still to come; a backward inside the block gives no warning."""
    import warnings

    model = build("llama").train()
    kw = dict(gradient_checkpointing_kwargs=dict(use_reentrant=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # 5.25 renamed gradient_checkpointing_enable
        model.gradient_checkpointing_enable(**kw)
    ids = torch.randint(3, VOCAB, (1, 11), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(5), torch.arange(6)])[None]  # two packed sequences
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with hf.patch_hf(model):
            with torch.no_grad():  # a forward that records nothing is never recomputed: not counted
                model(ids, position_ids=pos, use_cache=False)
            loss = model(ids, position_ids=pos, use_cache=False).logits.pow(2).mean()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
    ours = [w for w in seen if "undo() while" in str(w.message)]
    assert len(ours) == (0 if backward_inside else 1), [str(w.message) for w in seen]
    if ours:
        assert "2 attention call(s)" in str(ours[0].message) and ours[0].category is RuntimeWarning


def test_patch_argument_errors():
    with pytest.raises(ValueError, match="layout"):
        hf.patch_hf(layout="diagonal")
    with pytest.raises(TypeError, match="model"):
        hf.patch_hf(model=object())
    with pytest.raises(TypeError, match="fused_rope"):
        hf.patch_hf(fused_rope="yes")
    with pytest.raises(TypeError, match="fused_loss"):
        hf.patch_hf(fused_loss=1)


# ---------------------------------------------------------------------------------------------------------
# Data helpers (no process group: one rank)


def test_shift_labels_over_packed_sequences():
    labels = torch.tensor([[10, 11, 12, 20, 21, 30]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert hf.shift_labels(labels).tolist() == [[11, 12, 20, 21, 30, -100]]
    assert hf.shift_labels(labels, pos).tolist() == [[11, 12, -100, 21, -100, -100]]


def test_shard_batch_pads_and_counts():
    ids = torch.arange(5)[None] + 1
    out = hf.shard_batch(dict(input_ids=ids, labels=ids))  # one rank, zigzag unit 2 -> pad to 6
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5]]
    assert out["shift_labels"].tolist() == [[2, 3, 4, 5, -100, -100]]
    assert int(out["num_items_in_batch"]) == 4
    packed = hf.shard_batch(dict(input_ids=ids, labels=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1]])))
    assert packed["cu_seq_lens_q"].tolist() == [0, 4, 6]
    assert packed["input_ids"].tolist() == [[1, 2, 3, 0, 4, 5]]
    assert packed["shift_labels"].tolist() == [[2, 3, -100, -100, 5, -100]]
    assert packed["max_length_q"] == 4


@pytest.mark.parametrize("bad,match", [
    (dict(), "input_ids"),
    (dict(input_ids=torch.zeros(3, dtype=torch.long)), "input_ids"),
    (dict(input_ids=torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1]])), "attention_mask"),
    (dict(input_ids=torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 3, dtype=torch.long)), "labels"),
])
def test_shard_batch_errors(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        hf.shard_batch(bad)


@pytest.mark.parametrize("model_name", ["llama-gqa", "granite", "gemma2-swa"])
def test_causal_lm_loss_from_hidden_equals_the_loss_on_logits(model_name):
    """The head applied block by block, with the model's own logit transforms (Granite's logits_scaling, Gemma 2's
    final soft-capping at 30): loss and every parameter gradient equal causal_lm_loss on ``model(...).logits``."""
    model = build(model_name).train()
    local = hf.shard_batch(batch_for(dict(b=2, s=9)))
    ids, pos = local["input_ids"], local["position_ids"]
    args = (local["shift_labels"], local["num_items_in_batch"])
    with hf.patch_hf(model):
        ref = hf.causal_lm_loss(model(input_ids=ids, position_ids=pos, use_cache=False).logits, *args,
                                grad_average_world=2)
        g_ref = torch.autograd.grad(ref, list(model.parameters()))
        hidden = model.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        got = hf.causal_lm_loss_from_hidden(model, hidden, *args, grad_average_world=2)
        g_got = torch.autograd.grad(got, list(model.parameters()))
    assert abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for (name, _), a, b in zip(model.named_parameters(), g_got, g_ref):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item()), name


@pytest.mark.parametrize("model_name", ["llama-gqa", "gemma2-swa", "gemma3", "granite", "phi3-longrope"])
@pytest.mark.parametrize("with_counts", [False, True])
def test_fused_loss_equals_the_stock_loss(model_name, with_counts):
    """patch_hf(model, fused_loss=True): in training with labels the loss comes from the hidden states (logits
    None) and equals stock's, value and every gradient, with transformers' own normalisation: the mean over
    labelled tokens, or the sum over num_items_in_batch (Trainer's gradient accumulation); eval mode and calls
    without labels are stock. Gemma 3's text model (model_type 'gemma3_text') with a final soft-cap small enough
    to change its logits."""
    if not available(model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name} model")
    extra = dict(final_logit_softcapping=0.05) if model_name == "gemma3" else {}
    stock, model = build(model_name, **extra).train(), build(model_name, **extra).train()
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :4] = -100
    kw = dict(num_items_in_batch=torch.tensor(40)) if with_counts else {}
    ref = stock(ids, labels=labels, use_cache=False, **kw)
    g_ref = torch.autograd.grad(ref.loss, list(stock.parameters()))
    with hf.patch_hf(model, fused_loss=True):
        out = model(ids, labels=labels, use_cache=False, **kw)
        assert out.logits is None
        g = torch.autograd.grad(out.loss, list(model.parameters()))
        model.eval()
        with torch.no_grad():
            assert model(ids, labels=labels, use_cache=False).logits is not None
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
    for (name, _), a, b in zip(model.named_parameters(), g, g_ref):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item()), name
    assert "forward" not in vars(model)  # undone


def test_fused_loss_with_shift_labels():
    """transformers' ``shift_labels`` (labels already shifted, as shard_batch gives them for a ring) are used as
    they are, as stock's loss uses them."""
    import inspect

    from transformers.loss import loss_utils

    if "shift_labels" not in inspect.signature(loss_utils.ForCausalLMLoss).parameters:
        pytest.skip(f"transformers {transformers.__version__}'s loss takes no shift_labels")
    stock, model = build("llama").train(), build("llama").train()
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    shift = hf.shift_labels(ids)
    shift[0, 2] = -100
    ref = stock(ids, labels=ids, shift_labels=shift, use_cache=False).loss
    with hf.patch_hf(model, fused_loss=True):
        got = model(ids, labels=ids, shift_labels=shift, use_cache=False).loss
    assert abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item())


def test_trainer_with_fused_loss_trains_as_stock(tmp_path):
    """HF Trainer (batch 2, gradient accumulation 2: it passes num_items_in_batch) on a patched model with
    fused_loss: every logged loss and the weights after two optimizer steps equal the stock run's."""
    pytest.importorskip("accelerate")  # transformers' Trainer needs it (in the test extras)

    class Data(torch.utils.data.Dataset):
        ids = torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    def train(fused):
        model = build("llama").train()
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(fused)), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
            seed=0, dataloader_num_workers=0, disable_tqdm=True)
        with hf.patch_hf(model, fused_loss=fused):
            trainer = transformers.Trainer(model=model, args=args, train_dataset=Data())
            trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return losses, [p.detach().clone() for p in model.parameters()]

    (stock_losses, stock_params), (losses, params) = train(False), train(True)
    assert len(losses) == 2 and losses == pytest.approx(stock_losses, rel=1e-6)
    for a, b in zip(params, stock_params):
        assert (a - b).abs().max().item() <= 1e-6


@pytest.mark.parametrize("order", ["patch_then_peft", "peft_then_patch"])
def test_fused_loss_with_a_peft_lora_model(order):
    """A LoRA model (PEFT), patched before or after get_peft_model: the fused loss and the LoRA gradients equal
    stock's (the patched forward is the causal LM's own, which PEFT calls, whichever object patch_hf was given)."""
    peft = pytest.importorskip("peft")  # in the test extras
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))

    def run(fused, order):
        torch.manual_seed(0)
        model = build("llama").train()
        config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        if order == "patch_then_peft":
            handle = hf.patch_hf(model, fused_loss=fused)
            lora = peft.get_peft_model(model, config)
        else:
            lora = peft.get_peft_model(model, config)
            handle = hf.patch_hf(lora, fused_loss=fused)
        with handle:
            with torch.no_grad():  # LoRA B starts at zero: make the adapters matter
                for name, p in lora.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
            out = lora(input_ids=ids, labels=ids, use_cache=False)
            grads = torch.autograd.grad(out.loss, [p for p in lora.parameters() if p.requires_grad])
        return out, grads

    (ref, g_ref), (got, g) = run(False, "patch_then_peft"), run(True, order)
    assert got.logits is None and ref.logits is not None
    assert abs(got.loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
    assert len(g) == len(g_ref) == 8  # lora_A and lora_B of q_proj and v_proj in 2 layers
    for a, b in zip(g, g_ref):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


def test_fused_loss_return_dict_and_logits_to_keep_as_stock():
    """return_dict=False gives a tuple with the loss first, as stock's; logits_to_keep (logits of the last
    positions only) runs the stock forward, whatever stock makes of it."""
    stock, model = build("llama").train(), build("llama").train()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    ref = stock(ids, labels=ids, use_cache=False, return_dict=False)
    with hf.patch_hf(model, fused_loss=True):
        got = model(ids, labels=ids, use_cache=False, return_dict=False)
        assert isinstance(got, tuple) and isinstance(ref, tuple)
        assert abs(got[0].item() - ref[0].item()) <= 1e-5 * abs(ref[0].item())
        for keep in (1, 3):
            try:
                want = stock(ids, labels=ids[:, -keep:], use_cache=False, logits_to_keep=keep)
            except Exception as e:  # noqa: BLE001 (stock's own verdict, whatever it is)
                with pytest.raises(type(e)):
                    model(ids, labels=ids[:, -keep:], use_cache=False, logits_to_keep=keep)
                continue
            out = model(ids, labels=ids[:, -keep:], use_cache=False, logits_to_keep=keep)
            assert out.logits.shape == want.logits.shape and torch.allclose(out.loss, want.loss, atol=1e-6,
                                                                                   equal_nan=True)


def test_fused_loss_refusals():
    with pytest.raises(ValueError, match="needs the model"):
        hf.patch_hf(fused_loss=True)
    if available("starcoder2-dynamic"):
        with pytest.raises(NotImplementedError, match="starcoder2"):
            hf.patch_hf(build("starcoder2-dynamic"), fused_loss=True)
    with pytest.raises(NotImplementedError, match="LlamaModel .*not the causal LM"):  # no head of its own
        hf.patch_hf(build("llama").model, fused_loss=True)
    model = build("mixtral").train()
    ids = torch.randint(0, VOCAB, (1, 6))
    with hf.patch_hf(model, fused_loss=True):
        model(ids, labels=ids, use_cache=False).loss.backward()  # no router loss asked: fused
        with pytest.raises(NotImplementedError, match="output_router_logits"):
            model(ids, labels=ids, use_cache=False, output_router_logits=True)


def test_wrapped_models_are_unwrapped():
    """DistributedDataParallel / FSDP-style wrappers (the model is their ``.module``) are accepted by patch_hf and
    causal_lm_loss_from_hidden."""
    class Wrapper(torch.nn.Module):  # what DDP looks like from here: no config, the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = build("llama")
    with hf.patch_hf(Wrapper(Wrapper(model))):
        assert model.config._attn_implementation == hf.ATTN_IMPLEMENTATION
        hidden = torch.randn(1, 3, SMALL["hidden_size"])
        labels = torch.tensor([[1, 2, -100]])
        torch.testing.assert_close(hf.causal_lm_loss_from_hidden(Wrapper(model), hidden, labels, 2),
                                   hf.causal_lm_loss(model.lm_head(hidden), labels, 2))
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(TypeError, match="Linear .inside Wrapper"):
        hf.patch_hf(Wrapper(torch.nn.Linear(2, 2)))
    # torch.compile's wrapper forwards attribute reads (config) to the model: it is unwrapped too, so the model's
    # own forward is the one patched (before, the wrapper was taken for the model: the ring's labels check skipped)
    compiled = torch.compile(Wrapper(model))
    with hf.patch_hf(compiled):
        assert model.config._attn_implementation == hf.ATTN_IMPLEMENTATION
    assert model.config._attn_implementation == "sdpa"


def test_causal_lm_loss_from_hidden_refuses_other_heads():
    model = build("starcoder2-dynamic") if available("starcoder2-dynamic") else None
    hidden, labels = torch.zeros(1, 3, SMALL["hidden_size"]), torch.zeros(1, 3, dtype=torch.long)
    if model is not None:
        with pytest.raises(NotImplementedError, match="starcoder2"):
            hf.causal_lm_loss_from_hidden(model, hidden, labels, 3)
    with pytest.raises(ValueError, match="shift_labels"):
        hf.causal_lm_loss_from_hidden(build("llama"), hidden, labels[:, :2], 3)


def test_causal_lm_loss_scaling():
    logits = torch.randn(1, 4, 7)
    labels = torch.tensor([[1, 2, -100, 3]])
    mean = torch.nn.functional.cross_entropy(logits[0], labels[0], ignore_index=-100)
    assert torch.allclose(hf.causal_lm_loss(logits, labels, 3), mean)
    assert torch.allclose(hf.causal_lm_loss(logits, labels, 3, grad_average_world=2), 2 * mean)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        hf.causal_lm_loss(logits, labels, 0)
