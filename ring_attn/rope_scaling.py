"""RoPE frequencies for every context-extension scheme: one ``inv_freq`` vector plus one ``attention_scaling``.

Every rope type in use reduces to the same two things, which :func:`ring_attn.apply_rope` consumes:

* ``inv_freq``: float32 ``[rotary_dim // 2]``; pair ``i`` of a head rotates by ``position * inv_freq[i]``;
* ``attention_scaling``: a float multiplying both cos and sin (YaRN's and LongRoPE's "attention factor").

Types (``rope_parameters(rope_type, head_dim, theta, **params)``; ``d`` is the rotary dim,
``int(head_dim * partial_rotary_factor)``):

==============  ====================================================================================
``default``     ``inv_freq[i] = theta ** (-2i / d)``
``linear``      default / ``factor`` (position interpolation)
``ntk``         static NTK-aware: default with ``theta' = theta * factor ** (d / (d - 2))``
``dynamic``     dynamic NTK: ``theta' = theta * (factor * seq_len / max_pos - (factor - 1)) ** (d / (d - 2))``
                with the *global* ``seq_len`` passed explicitly, so every rank of a sharded sequence agrees
``yarn``        YaRN (Peng et al. 2023): interpolation/extrapolation blended by a linear ramp over the
                correction range; ``attention_scaling = 0.1 * ln(factor) + 1`` unless given
``llama3``      Llama 3.1: low frequencies / factor, high kept, a smooth blend between
``longrope``    LongRoPE / Phi-3: per-pair ``short_factor`` / ``long_factor`` rescaling
``proportional`` Gemma-style: ``inv_freq`` over the whole head, zeros for the non-rotating pairs
==============  ====================================================================================

Every formula mirrors ``transformers.modeling_rope_utils`` (5.x) operation by operation, in float32, so the
results are bitwise equal to transformers' own for the same config (``tests/test_rope_scaling.py`` checks this
against the installed transformers). :func:`from_hf_config` reads transformers 4.x configs (``rope_theta``,
``rope_scaling``) and 5.x configs (``rope_parameters``), objects or plain ``config.json`` dicts.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

__all__ = ["ROPE_TYPES", "rope_parameters", "from_hf_config", "yarn_correction_range", "yarn_attention_factor"]

# rope type -> (required parameters, optional parameters with their defaults). One source of truth: the
# error messages, the docs and the HF reader all read this table.
ROPE_TYPES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "default": ((), {}),
    "linear": (("factor",), {}),
    "ntk": (("factor",), {}),
    "dynamic": (("factor", "max_position_embeddings", "seq_len"), {}),
    "yarn": (
        ("factor", "original_max_position_embeddings"),
        {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": None, "mscale_all_dim": None, "attention_factor": None,
         "truncate": True},
    ),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), {}),
    "longrope": (
        ("short_factor", "long_factor", "original_max_position_embeddings"),
        {"factor": None, "max_position_embeddings": None, "attention_factor": None, "seq_len": None},
    ),
    "proportional": ((), {"factor": 1.0}),
}
_COMMON = ("partial_rotary_factor",)


def _needs(rope_type: str) -> str:
    required, optional = ROPE_TYPES[rope_type]
    req = ", ".join(required) or "nothing"
    opt = ", ".join(f"{k}={v!r}" for k, v in optional.items())
    return f"rope_type={rope_type!r} needs {req}" + (f" (optional: {opt})" if opt else "") + \
        "; every type also takes partial_rotary_factor=1.0"


def _check_params(rope_type: str, params: Mapping[str, Any]) -> dict[str, Any]:
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unknown rope_type {rope_type!r}; expected one of {sorted(ROPE_TYPES)}")
    required, optional = ROPE_TYPES[rope_type]
    unknown = sorted(set(params) - set(required) - set(optional) - set(_COMMON))
    missing = [k for k in required if params.get(k) is None]
    if unknown or missing:
        what = []
        if missing:
            what.append(f"missing {missing}")
        if unknown:
            what.append(f"unknown {unknown}")
        raise ValueError(f"rope parameters: {' and '.join(what)}: {_needs(rope_type)}")
    return {**optional, **params}


def _rotary_dim(head_dim: int, partial_rotary_factor: float) -> int:
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    if not 0.0 < float(partial_rotary_factor) <= 1.0:
        raise ValueError(f"partial_rotary_factor must be in (0, 1], got {partial_rotary_factor!r}")
    dim = int(head_dim * partial_rotary_factor)
    if dim < 2 or dim % 2:
        raise ValueError(
            f"rotary dim int(head_dim * partial_rotary_factor) = int({head_dim} * {partial_rotary_factor}) = {dim}; "
            "expected an even number >= 2")
    return dim


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    # Same ops as transformers: int64 arange -> float32, float32 pow with a Python-scalar base.
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def yarn_attention_factor(factor: float, mscale: float | None = None, mscale_all_dim: float | None = None) -> float:
    """YaRN's attention factor: ``0.1 * ln(factor) + 1`` (or the DeepSeek ``mscale`` ratio when both are set)."""

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if mscale and mscale_all_dim:
        return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
    return get_mscale(factor)


def yarn_correction_range(dim: int, theta: float, original_max_position_embeddings: int,
                          beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True) -> tuple[float, float]:
    """YaRN's correction range ``(low, high)`` in units of dimension index (0 .. dim-1).

    Pair ``i`` (dimension ``2i``) is extrapolated (kept) when ``i < low``, interpolated (divided by ``factor``)
    when ``i > high`` and blended linearly between. ``low`` is the dimension that completes ``beta_fast``
    rotations within the original length, ``high`` the one that completes ``beta_slow``.
    """

    def correction_dim(num_rotations):
        return (dim * math.log(original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def rope_parameters(rope_type: str, head_dim: int, theta: float, **params: Any) -> tuple[torch.Tensor, float]:
    """``(inv_freq, attention_scaling)`` for one rope type.

    Args:
        rope_type: one of ``ROPE_TYPES`` (default, linear, ntk, dynamic, yarn, llama3, longrope, proportional).
        head_dim: the attention head size.
        theta: the RoPE base (``rope_theta``).
        **params: the type's parameters (see ``ROPE_TYPES``), plus ``partial_rotary_factor`` (default 1.0).
            ``dynamic`` needs ``seq_len``: the *global* sequence length (the same on every rank).
            ``longrope`` uses ``long_factor`` when ``seq_len > original_max_position_embeddings``, else
            ``short_factor``; its ``factor`` defaults to ``max_position_embeddings / original_max_position_embeddings``.

    Returns:
        ``inv_freq``: float32 CPU tensor ``[rotary_dim // 2]`` (``rotary_dim = int(head_dim * partial_rotary_factor)``;
        ``proportional`` always returns ``head_dim // 2`` entries, zeros for pairs that do not rotate), and
        ``attention_scaling``: float, multiplies cos and sin.

    Raises:
        ValueError: unknown ``rope_type``, missing or unknown parameters (the message lists what the type needs),
            a rotary dim that is odd or < 2, or a non-positive theta.
    """
    p = _check_params(rope_type, params)
    if not (isinstance(theta, (int, float)) and theta > 0):
        raise ValueError(f"theta must be a positive number, got {theta!r}")
    prf = p.get("partial_rotary_factor", 1.0)
    prf = 1.0 if prf is None else prf
    base = theta

    if rope_type == "proportional":
        if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim must be an even int >= 2 for proportional rope, got {head_dim!r}")
        rope_angles = int(prf * head_dim // 2)
        inv_freq = 1.0 / (base ** (torch.arange(0, 2 * rope_angles, 2, dtype=torch.int64).to(dtype=torch.float)
                                    / head_dim))
        nope = head_dim // 2 - rope_angles
        if nope > 0:
            inv_freq = torch.cat((inv_freq, torch.zeros(nope, dtype=torch.float32)))
        return inv_freq / p["factor"], 1.0

    dim = _rotary_dim(head_dim, prf)

    if rope_type == "default":
        return _default_inv_freq(base, dim), 1.0

    if rope_type == "linear":
        inv_freq = _default_inv_freq(base, dim)
        inv_freq /= p["factor"]
        return inv_freq, 1.0

    if rope_type == "ntk":
        if dim <= 2:
            raise ValueError(f"ntk scaling needs rotary dim > 2 (the exponent is d/(d-2)), got {dim}")
        return _default_inv_freq(base * p["factor"] ** (dim / (dim - 2)), dim), 1.0

    if rope_type == "dynamic":
        if dim <= 2:
            raise ValueError(f"dynamic ntk scaling needs rotary dim > 2 (the exponent is d/(d-2)), got {dim}")
        factor, max_pos = p["factor"], p["max_position_embeddings"]
        seq_len = max(int(p["seq_len"]), max_pos)
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return _default_inv_freq(base, dim), 1.0

    if rope_type == "yarn":
        factor = p["factor"]
        attention_factor = p["attention_factor"]
        if attention_factor is None:
            attention_factor = yarn_attention_factor(factor, p["mscale"], p["mscale_all_dim"])
        beta_fast = p["beta_fast"] or 32  # transformers treats 0/None as the default
        beta_slow = p["beta_slow"] or 1
        truncate = True if p["truncate"] is None else p["truncate"]
        pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
        inv_freq_extrapolation = 1.0 / pos_freqs
        inv_freq_interpolation = 1.0 / (factor * pos_freqs)
        low, high = yarn_correction_range(dim, base, p["original_max_position_embeddings"], beta_fast, beta_slow,
                                          truncate)
        if low == high:
            high += 0.001  # prevent a singular ramp (as transformers does)
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extrapolation_factor = 1 - ramp
        inv_freq = (inv_freq_interpolation * (1 - extrapolation_factor)
                    + inv_freq_extrapolation * extrapolation_factor)
        return inv_freq, float(attention_factor)

    if rope_type == "llama3":
        inv_freq = _default_inv_freq(base, dim)
        factor, low_ff, high_ff = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_context_len = p["original_max_position_embeddings"]
        if high_ff == low_ff:
            raise ValueError(f"llama3 rope needs high_freq_factor != low_freq_factor, got both {high_ff}")
        low_freq_wavelen = old_context_len / low_ff
        high_freq_wavelen = old_context_len / high_ff
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, inv_freq_llama), 1.0

    if rope_type == "longrope":
        orig = p["original_max_position_embeddings"]
        factor = p["factor"]
        if factor is None:
            if p["max_position_embeddings"] is None:
                raise ValueError("longrope needs factor, or max_position_embeddings to derive it as "
                                 f"max_position_embeddings / original_max_position_embeddings: {_needs(rope_type)}")
            factor = p["max_position_embeddings"] / orig
        attention_factor = p["attention_factor"]
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        seq_len = p["seq_len"]
        chosen = "long_factor" if seq_len and seq_len > orig else "short_factor"
        ext = torch.tensor(p[chosen], dtype=torch.float32)
        if ext.shape != (dim // 2,):
            raise ValueError(f"longrope {chosen} has {tuple(ext.shape)} entries; expected ({dim // 2},) = rotary_dim/2")
        inv_freq_shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (ext * base**inv_freq_shape), float(attention_factor)

    raise AssertionError(rope_type)  # unreachable: _check_params rejected it


# ---------------------------------------------------------------------------------------------------------
# HF config reader


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def from_hf_config(config: Any, seq_len: int | None = None, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """``(inv_freq, attention_scaling)`` for a transformers config (object or ``config.json`` dict).

    Reads transformers 5.x ``rope_parameters`` and 4.x ``rope_theta`` + ``rope_scaling`` (``"type"`` or
    ``"rope_type"``), ``partial_rotary_factor`` (in the rope dict or on the config), ``head_dim`` (or
    ``hidden_size // num_attention_heads``), ``max_position_embeddings`` and ``original_max_position_embeddings``.

    Args:
        config: a ``PretrainedConfig`` or a dict.
        seq_len: the *global* sequence length; used by ``dynamic`` (default: ``max_position_embeddings``, i.e. no
            change, as at transformers' init) and ``longrope`` (long factors when above the original length).
        layer_type: for configs whose ``rope_parameters`` are nested per layer type (e.g. ``"sliding_attention"``).

    Raises:
        ValueError: no RoPE in the config, an unknown rope type, missing parameters, nested parameters without
            ``layer_type``.
    """
    head_dim = _get(config, "head_dim") or None
    if head_dim is None:
        hidden, heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
        if not hidden or not heads:
            raise ValueError("config has neither head_dim nor hidden_size and num_attention_heads")
        head_dim = hidden // heads
    head_dim = int(head_dim)

    rope = _get(config, "rope_parameters") or _get(config, "rope_scaling") or {}
    rope = dict(rope)
    if layer_type is not None:
        if layer_type not in rope:
            raise ValueError(f"layer_type={layer_type!r} not in rope_parameters (keys: {sorted(rope)})")
        rope = dict(rope[layer_type] or {})
    elif rope and all(isinstance(v, Mapping) or v is None for v in rope.values()):
        raise ValueError(f"rope_parameters are nested per layer type {sorted(rope)}; pass layer_type=")

    rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    theta = rope.pop("rope_theta", None)
    if theta is None:
        theta = _get(config, "rope_theta", None)
    if theta is None:
        theta = 10000.0
    prf = rope.pop("partial_rotary_factor", None)
    if prf is None:
        prf = _get(config, "partial_rotary_factor", None)

    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unknown rope_type {rope_type!r} in config; expected one of {sorted(ROPE_TYPES)}")
    max_pos = _get(config, "max_position_embeddings")
    if rope_type in ("yarn", "llama3", "longrope"):
        # transformers gives a config-level original_max_position_embeddings priority (Phi-3), else falls back
        # to max_position_embeddings.
        top = _get(config, "original_max_position_embeddings")
        if top is not None:
            rope["original_max_position_embeddings"] = top
        elif rope.get("original_max_position_embeddings") is None:
            rope["original_max_position_embeddings"] = max_pos
    if rope_type == "yarn" and rope.get("factor") is None and max_pos and rope.get("original_max_position_embeddings"):
        rope["factor"] = max_pos / rope["original_max_position_embeddings"]
    if rope_type == "dynamic":
        rope.setdefault("max_position_embeddings", max_pos)
        rope["seq_len"] = seq_len if seq_len is not None else max_pos
    if rope_type == "longrope":
        rope.setdefault("max_position_embeddings", max_pos)
        rope["seq_len"] = seq_len
    if prf is not None:
        rope["partial_rotary_factor"] = prf
    return rope_parameters(rope_type, head_dim, theta, **rope)
