"""Contracts shared by every layer: supported dtypes, head-dim limits, the packed-sequence description, and
the argument checks that attention, RoPE and the ring all run before any launch or collective.

Everything here is public (no leading underscore) so ``ring_attn.ring``, ``benchmarks/`` and ``scripts/``
import it instead of reaching into ``ring_attn.ops``. Limits of one backend (which dtypes, head dims, devices
it runs) live in the capability table of :mod:`ring_attn.backends`, not here: these are the limits of the
public API, which every backend that can run an op honours.
"""
from __future__ import annotations

import math
import numbers
import operator
import sys
from typing import NamedTuple, Optional

import torch

__all__ = [
    "SUPPORTED_DTYPES",
    "MAX_HEAD_DIM",
    "HEAD_DIM_MULTIPLE",
    "VarlenSeqs",
    "Dropout",
    "KVPages",
    "check_tensor",
    "check_qkv",
    "check_scale",
    "scalar_option",
    "check_real",
    "check_cu_seqlens_form",
    "check_cu_seqlens",
    "check_window",
    "flash_attn_window",
    "check_softcap",
    "check_max_seqlen",
    "check_dropout",
    "check_flag",
    "check_alibi_slopes",
    "check_block_table",
    "check_pages",
    "check_pages_used",
    "last_dim_contiguous",
    "check_int",
]

#: storage dtypes of attention inputs (math is fp32 in every backend)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: attention head dims: any multiple of HEAD_DIM_MULTIPLE in [HEAD_DIM_MULTIPLE, MAX_HEAD_DIM] (kernels pad the
#: head dim inside, with masks: no copies)
MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 1


def last_dim_contiguous(x: torch.Tensor) -> bool:
    """Whether the kernels can address ``x``'s last dim with a unit stride: its stride is 1, or the stride says
    nothing (a last dim of size 1, whose stride torch leaves arbitrary even in ``.contiguous()`` results, or an
    empty tensor)."""
    return x.stride(-1) == 1 or x.shape[-1] <= 1 or x.numel() == 0


class VarlenSeqs(NamedTuple):
    """Where each sequence lives along the token dim of packed q and k/v.

    Sequence ``i`` is q rows ``starts_q[i] : starts_q[i] + lens_q[i]`` attending to k/v rows
    ``starts_k[i] : starts_k[i] + lens_k[i]``. All four are int32 tensors of length ``n_seqs`` on the device of
    q with a unit stride; ``max_len_q``/``max_len_k`` are Python ints at least as large as every length (they
    size the grid). ``covers_all_q`` says whether every q row belongs to a sequence; when False, outputs are
    initialised to 0 / ``-inf`` so rows outside every sequence are well defined.
    """

    starts_q: torch.Tensor
    lens_q: torch.Tensor
    starts_k: torch.Tensor
    lens_k: torch.Tensor
    max_len_q: int
    max_len_k: int
    covers_all_q: bool = False

    @staticmethod
    def from_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int) -> "VarlenSeqs":
        """The sequences of flash-attn style ``cu_seqlens`` (int32 ``[n_seqs + 1]``, any stride); ``covers_all_q``
        is True."""
        # contiguous: the kernels read starts with a unit stride (a strided cu_seqlens was misread by Triton)
        cq, ck = cu_seqlens_q.to(torch.int32).contiguous(), cu_seqlens_k.to(torch.int32).contiguous()
        return VarlenSeqs(cq[:-1], cq[1:] - cq[:-1], ck[:-1], ck[1:] - ck[:-1],
                          int(max_seqlen_q), int(max_seqlen_k), True)


class KVPages(NamedTuple):
    """A paged KV cache (flash-attn's ``block_table``): the keys of packed sequence ``i`` live in pages of
    ``page_size`` rows, listed in order by row ``i`` of ``block_table``.

    With pages, packed k/v are the pages flattened to rows, ``[n_pages · page_size, h_kv, d]``, and key ``j``
    of sequence ``i`` is row ``block_table[i, j // page_size] · page_size + j % page_size``
    (``VarlenSeqs.starts_k`` is not read; ``lens_k[i] <= block_table.shape[1] · page_size``). ``block_table`` is
    int32 ``[n_seqs, max_pages]`` on q's device with a unit last stride; entries past a sequence's last page are
    never read (they may hold anything). Forward only (as flash-attn's: no gradient reaches a paged cache).
    """

    block_table: torch.Tensor
    page_size: int

    def key_rows(self, max_len_k: int, n_pages: int) -> torch.Tensor:
        """int64 ``[n_seqs, max_len_k]``: the page row of each sequence's key ``j``. Table entries are clamped
        to ``[0, n_pages)`` first, so the unread entries past a sequence's end index safely."""
        j = torch.arange(max_len_k, device=self.block_table.device)
        table = self.block_table.long().clamp(0, max(n_pages - 1, 0))
        return table[:, j // self.page_size] * self.page_size + j % self.page_size


class Dropout(NamedTuple):
    """Attention dropout of one call (flash-attn's ``dropout_p``): which probabilities are zeroed is a pure
    function of ``seed`` and the element's place, so the backward regenerates the forward's mask and every
    backend draws the same one.

    Element (query row ``r``, query head ``h``, key ``j``) is kept iff word ``j mod 4`` of
    ``philox(seed, (h · rows + r) · groups + j div 4) >= threshold``, where ``groups = ceil(keys / 4)``: one
    Philox call decides four adjacent keys (Philox-4x32, 10 rounds, counter ``(offset_lo, offset_hi, 0, 0)``, key
    ``(seed_lo, seed_hi)``, its four output words in order: Triton's ``tl.randint4x``;
    ``ring_attn.reference.philox4`` is the same in torch), with ``threshold = floor(p · 2^32)``. ``r`` is the
    row's index in the call's query rows (dense: ``batch · s_q + i``; packed: the packed row), ``j`` the key's
    index in its sequence; ``rows`` is the number of query rows (dense ``b · s_q``, packed ``t_q``) and ``keys``
    the key extent (dense ``s_k``; packed: the call's ``max_seqlen_k``, capped at the number of key rows, as the
    public functions cap it). Kept probabilities are scaled by ``1 / (1 - p)``;
    the LSE is that of the softmax before dropout (as flash-attn's). ``row0`` offsets ``r`` for a chunk of a
    larger call.
    """

    p: float
    seed: int
    rows: int
    keys: int
    row0: int = 0

    @staticmethod
    def draw_seed() -> int:
        """A seed from torch's default CPU generator (``torch.manual_seed`` reproduces it; no device sync), in
        ``[2^32, 2^62)`` so the kernels always receive a 64-bit integer (one compiled variant)."""
        return int(torch.randint(2 ** 32, 2 ** 62, (1,), dtype=torch.int64).item())

    @property
    def groups(self) -> int:
        """Philox counters per (head, row): one per four keys."""
        return (int(self.keys) + 3) // 4

    @property
    def threshold(self) -> int:
        return min(int(self.p * 4294967296.0), 4294967295)

    @property
    def scale(self) -> float:
        return 1.0 / (1.0 - self.p)


def check_inplace_target(name: str, x: torch.Tensor) -> None:
    """RuntimeError (autograd's own type for it) when an in-place write into ``x`` could not be recorded: ``x``
    requires grad and is a leaf or a view of one, with grad mode on. Autograd itself refuses only after the
    kernel has written, so the caller asks first, before any launch."""
    if torch.is_grad_enabled() and x.requires_grad and (x.is_leaf or (x._base is not None and x._base.is_leaf)):
        raise RuntimeError(f"{name} {tuple(x.shape)} is a leaf tensor that requires grad (or a view of one): autograd "
                           "cannot record an in-place write into it; pass inplace=False, or rotate a tensor computed "
                           "from the leaf (e.g. a projection's output)")


def _common_element(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether views ``a`` and ``b`` of one storage, with the same strides, share an element: is there a vector
    ``t`` with ``-(b.shape[d] - 1) <= t[d] <= a.shape[d] - 1`` and ``sum(t[d] * stride[d]) == offset(b) -
    offset(a)``? A depth-first search over the dims, largest stride first, keeping only the ``t[d]`` the
    smaller dims can still make up (a few per dim for any strided view)."""
    dims = sorted((st, na, nb) for st, na, nb in zip(a.stride(), a.shape, b.shape) if st > 0 and max(na, nb) > 1)
    dims.reverse()
    lo_rest = [0] * (len(dims) + 1)  # the reach of dims i.. : sums of t[d] * stride over the bounds
    hi_rest = [0] * (len(dims) + 1)
    for i in range(len(dims) - 1, -1, -1):
        st, na, nb = dims[i]
        lo_rest[i], hi_rest[i] = lo_rest[i + 1] - (nb - 1) * st, hi_rest[i + 1] + (na - 1) * st
    budget = [10_000]

    def search(i: int, rest: int) -> bool:
        if i == len(dims):
            return rest == 0
        st, na, nb = dims[i]
        first = max(-(nb - 1), -((hi_rest[i + 1] - rest) // st))  # ceil((rest - hi) / st)
        last = min(na - 1, (rest - lo_rest[i + 1]) // st)
        for t in range(first, last + 1):
            budget[0] -= 1
            if budget[0] < 0 or search(i + 1, rest - t * st):
                return True  # (out of budget: assume they share one)
        return False

    size = a.element_size()
    delta = b.data_ptr() - a.data_ptr()
    return delta % size != 0 or search(0, delta // size)


def check_no_overlap(fn: str, *named: tuple[str, torch.Tensor]) -> None:
    """ValueError when an in-place write would read or write one memory location twice (torch's in-place ops
    refuse the same): a written tensor whose elements share memory (an expanded, stride-0 view), or two written
    tensors that share an element (the same tensor twice, overlapping views of one buffer). Views of one buffer
    that do not overlap (q and k of a fused projection) pass; strided views with different strides are not
    compared (as torch, which calls that too hard to tell)."""
    for name, x in named:
        if x.numel() > 1 and torch._debug_has_internal_overlap(x) == 1:
            raise ValueError(f"{fn}: {name} {tuple(x.shape)} (strides {tuple(x.stride())}) has elements that share "
                             "memory (an expanded view?): an in-place write would write them twice; pass a "
                             ".contiguous() copy, or inplace=False")
    for i, (name_a, a) in enumerate(named):
        for name_b, b in named[i + 1:]:
            if a.numel() == 0 or b.numel() == 0 or a.device != b.device or \
                    a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
                continue
            if a.data_ptr() == b.data_ptr() or (a.stride() == b.stride() and a.dim() == b.dim() and
                                                 _common_element(a, b)):
                raise ValueError(f"{fn}: {name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} share memory: an "
                                 "in-place write into both would write the shared elements twice; pass tensors that "
                                 "do not overlap, or inplace=False")


def check_tensor(name: str, x) -> None:
    """Raise TypeError unless ``x`` is a ``torch.Tensor``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_qkv(q, k, v, packed: bool, names: tuple[str, str, str] = ("q", "k", "v"),
              max_head_dim: Optional[int] = MAX_HEAD_DIM) -> tuple[int, int, int]:
    """Validate attention q/k/v: ranks (4-D dense ``[b, s, h, d]`` or 3-D packed ``[t, h, d]``), dtypes
    (:data:`SUPPORTED_DTYPES`, shared), one device, k/v shapes, head dims and the GQA head ratio. ``names``: what
    the caller calls the three tensors (e.g. ``q, k_cache, v_cache``), used in the messages. ``max_head_dim``:
    None leaves the head dim's upper bound to the backend's capability (the block API: native takes any).

    Returns:
        ``(h_q, h_kv, d)``.

    Raises:
        TypeError / ValueError naming the argument, the value and what was expected.
    """
    nq, nk, nv = names
    for name, x in ((nq, q), (nk, k), (nv, v)):
        check_tensor(name, x)
    layout = "[total_tokens, heads, head_dim]" if packed else "[batch, seqlen, heads, head_dim]"
    ndim = 3 if packed else 4
    for name, x in ((nq, q), (nk, k), (nv, v)):
        if x.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}.dtype is {x.dtype}; expected one of float16, bfloat16, float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{nq}, {nk}, {nv} must share a dtype; got {nq} {q.dtype}, {nk} {k.dtype}, {nv} {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{nq}, {nk}, {nv} must be on one device; got {nq} {q.device}, {nk} {k.device}, "
                         f"{nv} {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"{nk} and {nv} must have the same shape; got {nk} {tuple(k.shape)}, {nv} {tuple(v.shape)}")
    if not packed and k.shape[0] != q.shape[0]:
        raise ValueError(f"{nk} batch size {k.shape[0]} != {nq} batch size {q.shape[0]} (shapes {layout})")
    d = q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"{nk} head_dim {k.shape[-1]} != {nq} head_dim {d}")
    if d % HEAD_DIM_MULTIPLE != 0 or d <= 0 or (max_head_dim is not None and d > max_head_dim):
        raise ValueError(f"head_dim {d} is not supported; expected 1 .. {max_head_dim or 'any'}")
    h_q, h_kv = q.shape[-2], k.shape[-2]
    if h_kv == 0 or h_q % h_kv != 0:
        raise ValueError(f"{nq} heads ({h_q}) must be a positive multiple of {nk}/{nv} heads ({h_kv}) for GQA/MQA")
    return h_q, h_kv, d


def finite(x) -> bool:
    """``x`` (a real number) is finite as a float: comparisons only, so a symbolic float under
    ``torch.compile(dynamic=True)`` is guarded on instead of breaking the graph (``math.isfinite`` does); an int
    past the float range (``float()`` would overflow) is not."""
    if type(x).__module__ == "numpy":  # a numpy float32 compared with the float64 bounds warns of overflow
        x = float(x)
    return bool(x == x and -sys.float_info.max <= x <= sys.float_info.max)


def scalar_option(name: str, value, int_tensors: bool = False):
    """A one-element tensor given for a scalar option, read once as a Python number (a floating tensor; any real
    dtype with ``int_tensors``); ValueError for one that requires grad (the option is a constant: no gradient
    would reach it). Anything else is returned as it is, for :func:`check_real`."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and (
            value.dtype.is_floating_point or (int_tensors and not value.is_complex() and value.dtype != torch.bool)):
        if value.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} is a tensor that requires grad: it is read as a constant (no gradient would "
                             f"reach it); pass {name}.detach() or a float")
        return value.item()
    return value


def check_real(name: str, value, expected: str) -> float:
    """``value`` as a float: TypeError unless a real number (numpy's and symbolic floats too; not a bool),
    ValueError unless finite; both say ``{name} must be {expected}``."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat)):
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    if not finite(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)


def check_scale(softmax_scale, d: int) -> float:
    """``softmax_scale`` as a float (default ``1 / sqrt(d)`` for None): TypeError unless a real number (numpy's
    too), ValueError unless finite."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(d)
    return check_real("softmax_scale", softmax_scale, "a finite float or None")


def check_cu_seqlens_form(name: str, cu) -> None:
    """A cu_seqlens argument is an int32 1-D tensor of length n_seqs + 1 >= 2 (no host read)."""
    check_tensor(name, cu)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name}.dtype is {cu.dtype}; expected torch.int32")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D of length n_seqs + 1 >= 2, got shape {tuple(cu.shape)}")


def check_cu_seqlens(name: str, cu, total: Optional[int], max_seqlen: int, max_name: str, device) -> None:
    """Validate a cu_seqlens tensor's values (one host read of a small tensor): starts at 0, non-decreasing,
    ends at ``total`` (None: anywhere, e.g. keys in a paged cache), no sequence longer than ``max_seqlen``, on
    ``device``. Raises TypeError/ValueError."""
    check_cu_seqlens_form(name, cu)
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device}; expected the device of q ({device})")
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name}[0] is {vals[0]}; expected 0")
    lens = [b - a for a, b in zip(vals[:-1], vals[1:])]
    if any(n < 0 for n in lens):
        i = next(i for i, n in enumerate(lens) if n < 0)
        raise ValueError(f"{name} must be non-decreasing; {name}[{i + 1}] = {vals[i + 1]} < {name}[{i}] = {vals[i]}")
    if total is not None and vals[-1] != total:
        raise ValueError(f"{name}[-1] is {vals[-1]}; expected the number of packed tokens {total}")
    if max(lens) > max_seqlen:
        raise ValueError(f"{max_name} is {max_seqlen} but {name} has a sequence of length {max(lens)}")


def _as_int(name: str, val, what: str) -> int:
    """An integer argument given as an int, a numpy integer or a one-element integer tensor, as an int (an int, or
    an int subclass, is returned as it is: under torch.compile it may be symbolic and must stay so)."""
    if isinstance(val, torch.Tensor):
        if val.numel() != 1 or val.dtype == torch.bool or val.dtype.is_floating_point or val.dtype.is_complex:
            raise TypeError(f"{name} must be {what}, got a tensor of shape {tuple(val.shape)} and dtype {val.dtype}")
        return int(val.item())
    if isinstance(val, bool) or type(val).__name__ == "bool_":
        raise TypeError(f"{name} must be {what}, got {val!r}")
    if isinstance(val, (int, torch.SymInt)):  # an int traced by torch.compile stays symbolic (operator.index would
        return val  # specialize it: one graph per value, e.g. per batch's max_seqlen)
    try:
        return operator.index(val)
    except TypeError:
        raise TypeError(f"{name} must be {what}, got {val!r} ({type(val).__name__})") from None


def check_int(name: str, val, minimum: Optional[int] = None) -> int:
    """An integer argument (an int, a numpy integer or a one-element integer tensor) as a Python int, at least
    ``minimum`` when given. TypeError for floats/bools/others, ValueError below ``minimum``."""
    what = "an int" if minimum is None else f"an int >= {minimum}"
    n = _as_int(name, val, what)
    if minimum is not None and n < minimum:
        raise ValueError(f"{name} must be {what}, got {n}")
    return n


def check_max_seqlen(name: str, val) -> int:
    """``max_seqlen_q``/``max_seqlen_k`` as a Python int: an int, a numpy integer or a one-element integer tensor
    (as flash-attn users pass them), ``>= 0``. TypeError for floats/bools, ValueError for negatives."""
    n = _as_int(name, val, "a non-negative int")
    if n < 0:
        raise ValueError(f"{name} must be a non-negative int, got {n}")
    return n


def check_window(window) -> tuple[int, int]:
    """flash-attn's ``window_size=(left, right)`` as a pair of ints; any negative side becomes -1 (unbounded).
    Query ``i`` sees keys ``i + off - left ..= i + off + right`` (``ring_attn/backends/protocol.py``)."""
    if isinstance(window, torch.Tensor):
        window = window.tolist()
    if isinstance(window, (str, bytes)) or not hasattr(window, "__len__") or len(window) != 2:
        raise TypeError(f"window_size must be a pair (left, right) of ints (-1: unbounded), got {window!r}")
    left, right = (_as_int(f"window_size[{i}]", w, "an int (-1: unbounded)") for i, w in enumerate(window))
    return (max(left, -1), max(right, -1))


def flash_attn_window(window: tuple[int, int], seqlen_k: int, seqlen_q: int) -> tuple[int, int]:
    """flash-attn's own normalisation of a checked window in its entry points: a side ``>= seqlen_k`` (the keys'
    length; varlen: ``max_seqlen_k`` as passed; a KV cache: its capacity) becomes -1, unbounded; then a window
    bounded on the left only gets ``seqlen_k`` as its right side (``set_params_fprop``). Both change which keys a
    query sees only when ``seqlen_q > seqlen_k + 1`` (bottom-right alignment puts the first queries' windows
    before the first key, so they see fewer keys, or none); applied so that results are flash-attn's. The right
    side is added only then (``seqlen_q``: the longest query sequence, or a bound on it), so other calls keep
    the kernels' unbounded-right variant."""
    left, right = window
    left, right = (-1 if left >= seqlen_k else left, -1 if right >= seqlen_k else right)
    return (left, seqlen_k if left >= 0 and right < 0 and seqlen_q > seqlen_k + 1 else right)


def check_softcap(softcap) -> float:
    """Gemma 2's logit ``softcap`` as a float: 0 (off) or a finite positive number."""
    softcap = scalar_option("softcap", softcap)
    expected = "a finite float >= 0 (0: off)"
    if check_real("softcap", softcap, expected) < 0:
        raise ValueError(f"softcap must be {expected}, got {softcap!r}")
    return float(softcap)


def check_flag(name: str, val) -> bool:
    """A bool (numpy bools and the ints 0/1 too, as the ring accepts); TypeError otherwise (often an argument
    in the wrong position)."""
    ok = isinstance(val, bool) or type(val).__name__ == "bool_" or (isinstance(val, int) and val in (0, 1))
    if not ok:
        raise TypeError(f"{name} must be a bool, got {val!r} ({type(val).__name__})")
    return bool(val)


def check_dropout(dropout_p) -> float:
    """``dropout_p`` as a float in [0, 1): TypeError when it is not a real number (a bool, a string, None),
    ValueError when it is outside [0, 1) or NaN."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {dropout_p!r} ({type(dropout_p).__name__})")
    if not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def check_alibi_slopes(alibi_slopes, device, n_batch: int, n_heads: int, batch_name: str = "batch"):
    """flash-attn's ``alibi_slopes``: None, or a float32 tensor on ``device`` of shape ``(n_heads,)`` or
    ``(n_batch, n_heads)`` (``batch_name`` says what the first dim counts: the batch, or the packed sequences).

    Returns:
        None, or the slopes as a detached fp32 ``[n_batch, n_heads]`` view (``(n_heads,)`` expanded with a
        batch stride of 0: no copy), what the backends take.

    Raises:
        TypeError: not a tensor, or not float32. ValueError: another shape or device. Each names
        ``alibi_slopes``, what it got and what was expected.
    """
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a float32 torch.Tensor of shape ({n_heads},) or ({n_batch}, "
                        f"{n_heads}) or None, got {type(alibi_slopes).__name__} {alibi_slopes!r}")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32 (as flash-attn requires), got {alibi_slopes.dtype} "
                        f"(shape {tuple(alibi_slopes.shape)})")
    shape = tuple(alibi_slopes.shape)
    if shape not in ((n_heads,), (n_batch, n_heads)):
        raise ValueError(f"alibi_slopes has shape {shape}; expected (heads_q,) = ({n_heads},) or "
                         f"({batch_name}, heads_q) = ({n_batch}, {n_heads})")
    if alibi_slopes.device != torch.device(device):
        raise ValueError(f"alibi_slopes is on {alibi_slopes.device}; expected q's device {device}")
    slopes = alibi_slopes.detach()
    return slopes[None].expand(n_batch, n_heads) if slopes.dim() == 1 else slopes


def check_block_table(block_table, n_seqs: int, device, where: str) -> torch.Tensor:
    """flash-attn's ``block_table`` (a paged KV cache): an int32 ``[n_seqs, max_pages]`` tensor on ``device`` with
    a unit last stride. ``where`` prefixes the message (the public function's name)."""
    check_tensor("block_table", block_table)
    if block_table.dim() != 2 or block_table.shape[0] != n_seqs or block_table.dtype != torch.int32 or \
            block_table.device != device or (block_table.numel() and block_table.stride(-1) != 1):
        raise ValueError(f"{where}: block_table must be an int32 tensor [{n_seqs}, max_num_blocks_per_seq] on "
                         f"{device} with a contiguous last dim, got {block_table.dtype} "
                         f"{tuple(block_table.shape)} on {block_table.device}")
    return block_table


def check_pages(name: str, x: torch.Tensor, where: str) -> None:
    """A paged cache ``[n_pages, page_size, h_kv, d]`` whose pages follow each other in memory (so the pages
    flatten to rows without a copy) and hold at least one row each."""
    if x.shape[1] == 0:
        raise ValueError(f"{where}: {name} has pages of 0 rows (shape {tuple(x.shape)})")
    if x.shape[0] > 1 and x.stride(0) != x.shape[1] * x.stride(1):
        raise ValueError(f"{where}: the pages of {name} must follow each other (stride(0) == page_block_size * "
                         f"stride(1)), got shape {tuple(x.shape)} and strides {tuple(x.stride())}")


def check_pages_used(block_table: torch.Tensor, lens_k: torch.Tensor, page_size: int, n_pages: int, where: str,
                     sync: bool) -> None:
    """Every table entry a sequence reads (its first ``ceil(lens_k[i] / page_size)``) names one of the
    ``n_pages`` pages. ``sync``: read the answer on the host (ValueError naming the first bad entry); else a
    device-side assert (no host sync: a GPU error at the next synchronisation)."""
    used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] * page_size < \
        lens_k.to(block_table.device)[:, None]
    bad = used & ((block_table < 0) | (block_table >= n_pages))
    if not sync:
        torch._assert_async(~bad.any(), f"{where}: block_table names a page outside the cache ({n_pages} pages)")
        return
    if bad.any():
        i, j = (int(t) for t in bad.nonzero()[0])
        raise ValueError(f"{where}: block_table[{i}, {j}] = {int(block_table[i, j])} is read (sequence {i} has "
                         f"{int(lens_k[i])} keys) but the cache has {n_pages} pages (k.shape[0])")
