"""ring_attn.bert_padding: flash-attn's padding helpers (flash-attn >= 2.6 conventions): signatures, the packed
layout against plain boolean indexing, round trips, gradients (gradcheck), concatenated samples, the pipeline
unpad -> flash_attn_varlen_func -> pad against padded_attention, and refusals."""
import inspect

import numpy as np
import pytest
import torch

import ring_attn
from ring_attn import bert_padding as bp

SIGNATURES = {
    "unpad_input": ["hidden_states", "attention_mask", "unused_mask=None"],
    "pad_input": ["hidden_states", "indices", "batch", "seqlen"],
    "index_first_axis": ["input", "indices"],
    "index_put_first_axis": ["values", "indices", "first_axis_dim"],
    "unpad_input_for_concatenated_sequences": ["hidden_states", "attention_mask_in_length"],
}


def test_signatures_are_flash_attn_s():
    for name, params in SIGNATURES.items():
        assert [str(p) for p in inspect.signature(getattr(bp, name)).parameters.values()] == params, name
        assert getattr(bp, name).__doc__


def _mask(g, b, s):
    mask = torch.rand(b, s, generator=g) < 0.7
    mask[0] = False  # an empty row
    mask[1] = True  # a full one
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_unpad_and_pad_round_trip(dtype):
    g = torch.Generator().manual_seed(0)
    b, s = 4, 9
    x = (torch.randn(b, s, 3, 5, generator=g) * 10).to(dtype)
    mask = _mask(g, b, s)
    packed, indices, cu, max_len, seqused = bp.unpad_input(x, mask.int())
    assert torch.equal(packed, x[mask])  # row order, the kept tokens
    assert indices.dtype == torch.int64 and torch.equal(indices, mask.flatten().nonzero().flatten())
    lens = mask.sum(-1)
    assert cu.dtype == torch.int32 and cu.tolist() == [0] + lens.cumsum(0).tolist()
    assert max_len == int(lens.max()) and isinstance(max_len, int)
    assert seqused.dtype == torch.int32 and torch.equal(seqused, lens.int())
    back = bp.pad_input(packed, indices, b, s)
    assert back.shape == x.shape and torch.equal(back[mask], x[mask]) and not back[~mask].any()


def test_unused_mask_is_packed_but_not_used():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 4, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    unused = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    packed, indices, cu, max_len, seqused = bp.unpad_input(x, mask, unused)
    assert cu.tolist() == [0, 4, 7] and max_len == 4 and seqused.tolist() == [2, 3]
    assert torch.equal(packed, x[(mask + unused).bool()])


def test_gradients_flow_like_indexing():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([0, 4, 7, 7, 14])  # a repeated row: its gradients add up
    torch.autograd.gradcheck(lambda t: bp.index_first_axis(t.flatten(0, 1), idx), (x,))
    vals = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: bp.index_put_first_axis(t, torch.tensor([1, 3, 8, 2]), 9), (vals,))
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).bool()
    packed, indices, *_ = bp.unpad_input(x, mask)
    (bp.pad_input(packed * 2, indices, 3, 5).sum()).backward()
    assert torch.equal(x.grad, 2 * mask[..., None].double().expand_as(x))


def test_concatenated_samples():
    x = torch.arange(3 * 6).reshape(3, 6, 1).float()
    lens = torch.tensor([[2, 3, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0]])
    packed, indices, cu, max_len = bp.unpad_input_for_concatenated_sequences(x, lens)
    assert cu.tolist() == [0, 2, 5, 8, 10, 16] and max_len == 6
    assert indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10] + list(range(12, 18))
    assert torch.equal(packed, x.flatten(0, 1)[indices])
    with pytest.raises(ValueError, match="add up to more than seqlen=6"):
        bp.unpad_input_for_concatenated_sequences(x, torch.tensor([[4, 3, 0, 0, 0, 0]] * 3))
    with pytest.raises(TypeError, match="integer lengths"):  # 2.5 was truncated to 2
        bp.unpad_input_for_concatenated_sequences(x, torch.tensor([[2.5, 3, 0, 0, 0, 0]] * 3))


def test_the_flash_attn_pipeline_equals_padded_attention():
    """unpad q/k/v -> flash_attn_varlen_func -> pad, the way flash-attn users write it, gives padded_attention's
    result (the same packed kernels) bit for bit, forward and gradients."""
    g = torch.Generator().manual_seed(3)
    b, s, h, d = 3, 10, 2, 16
    q, k, v = (torch.randn(b, s, h, d, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, 7:] = False
    mask[2, 3:] = False
    q_u, idx, cu, max_len, _ = bp.unpad_input(q, mask)
    k_u, *_ = bp.unpad_input(k, mask)
    v_u, *_ = bp.unpad_input(v, mask)
    out_u = ring_attn.flash_attn_varlen_func(q_u, k_u, v_u, cu, cu, max_len, max_len, causal=True)
    out = bp.pad_input(out_u, idx, b, s)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref = ring_attn.padded_attention(q, k, v, mask, causal=True)
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    assert torch.equal(out, ref)
    for a, c in zip(grads, ref_grads):
        assert torch.equal(a, c)


def test_refusals():
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, seqlen\]"):
        bp.unpad_input(x, torch.ones(2, 5))
    with pytest.raises(TypeError, match="attention_mask"):
        bp.unpad_input(x, [[1, 1, 1, 1]] * 2)
    with pytest.raises(ValueError, match="1-D int64"):
        bp.index_first_axis(x.flatten(0, 1), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="at least 2-D"):
        bp.index_first_axis(torch.randn(5), torch.tensor([0]))
    with pytest.raises(ValueError, match="indices has 2 entries but values has 3 rows"):
        bp.index_put_first_axis(torch.randn(3, 2), torch.tensor([0, 1]), 4)
    # row indices outside the rows (torch would raise from inside the Function, or wrap a negative one)
    with pytest.raises(ValueError, match=r"indices\[2\] = 99 is not a row index in \[0, 10\)"):
        bp.pad_input(torch.randn(3, 4), torch.tensor([0, 1, 99]), 2, 5)
    with pytest.raises(ValueError, match=r"indices\[0\] = 7 is not a row index in \[0, 5\)"):
        bp.index_first_axis(torch.randn(5, 3), torch.tensor([7]))
    with pytest.raises(ValueError, match=r"indices\[2\] = -1 is not a row index in \[0, 10\)"):
        bp.index_put_first_axis(torch.randn(3, 4), torch.tensor([0, 1, -1]), 10)
    with pytest.raises(ValueError, match="hidden_states must be at least 2-D"):
        bp.pad_input(torch.randn(3), torch.tensor([0, 1, 2]), 1, 3)
    with pytest.raises(ValueError, match="seqlen must be an int >= 0, got 2.5"):
        bp.pad_input(torch.randn(3, 4), torch.tensor([0, 1, 2]), 2, 2.5)
    # 2-D hidden states would unpad to 1-D tokens, which pad_input (and flash-attn's unpad_input) refuse
    with pytest.raises(ValueError, match=r"hidden_states must be at least 3-D .* got shape \(2, 4\)"):
        bp.unpad_input(torch.randn(2, 4), torch.ones(2, 4))
    # sizes as numpy / tensor ints still work (shapes often come from there)
    out = bp.pad_input(torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.tensor(1), np.int64(3))
    assert out.shape == (1, 3, 4)


def test_the_index_helpers_compile_into_one_graph():
    # the index check is a device-side assert when traced (it was a host-side branch: a graph break on CPU)
    v = torch.randn(3, 2, requires_grad=True)
    i = torch.tensor([0, 3, 5])
    torch._dynamo.reset()
    out = torch.compile(lambda v, i: bp.pad_input(v, i, 2, 3), fullgraph=True)(v, i)
    assert torch.equal(out, bp.pad_input(v, i, 2, 3))
    x = torch.randn(6, 2)
    got = torch.compile(lambda x, i: bp.index_first_axis(x, i), fullgraph=True)(x, i)
    assert torch.equal(got, x[i])
