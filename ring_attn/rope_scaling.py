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
``rope_scaling``) and 5.x configs (``rope_parameters``), objects or plain ``config.json`` dicts, as transformers
reads them: the keys it ignores are ignored (with a warning), the keys it refuses to run without are required;
:func:`from_hf_config_per_layer_type` covers configs whose RoPE differs per layer type (Gemma 3). Every numeric
parameter is range-checked before any arithmetic (transformers only logs a warning, then computes inf or NaN).
"""
from __future__ import annotations

import math
import numbers
import operator
import warnings
from typing import Any, Mapping

import torch

__all__ = ["ROPE_TYPES", "LENGTH_DEPENDENT_ROPE_TYPES", "rope_parameters", "from_hf_config",
           "from_hf_config_per_layer_type", "hf_rope_types", "yarn_correction_range", "yarn_attention_factor"]

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
# rope types whose frequencies transformers recomputes from the sequence length (``max(position_ids) + 1``)
LENGTH_DEPENDENT_ROPE_TYPES = ("dynamic", "longrope")


def _needs(rope_type: str) -> str:
    required, optional = ROPE_TYPES[rope_type]
    req = ", ".join(required) or "nothing"
    opt = ", ".join(f"{k}={v!r}" for k, v in optional.items())
    return f"rope_type={rope_type!r} needs {req}" + (f" (optional: {opt})" if opt else "") + \
        "; every type also takes partial_rotary_factor=1.0"


def _check_params(rope_type: str, params: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
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


# ---------------------------------------------------------------------------------------------------------
# Value checks. transformers only logs a warning for most out-of-range values and then computes NaN/inf or
# divides by zero; here every numeric parameter is checked before any arithmetic, and the message names the
# parameter, the value and the accepted range.


def _bad(rope_type: str, name: str, value: Any, expected: str, exc: type = ValueError) -> Exception:
    return exc(f"rope_type={rope_type!r}: {name}={value!r}; expected {expected}")


def _real(rope_type: str, name: str, value: Any, expected: str) -> float:
    """``value`` as a finite real number (bools and strings refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _bad(rope_type, name, value, expected, TypeError)
    if not math.isfinite(float(value)):
        raise _bad(rope_type, name, value, expected)
    return value


def _positive(rope_type: str, name: str, value: Any) -> float:
    """A finite number > 0."""
    expected = "a finite number > 0"
    if _real(rope_type, name, value, expected) <= 0:
        raise _bad(rope_type, name, value, expected)
    return value


def _positive_int(rope_type: str, name: str, value: Any, minimum: int = 1) -> int:
    """An int >= ``minimum`` (an integral float such as ``4096.0`` from a JSON file is accepted)."""
    expected = f"an int >= {minimum}"
    if isinstance(value, bool):
        raise _bad(rope_type, name, value, expected, TypeError)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        as_int = operator.index(value)
    except TypeError:
        raise _bad(rope_type, name, value, expected, TypeError) from None
    if as_int < minimum:
        raise _bad(rope_type, name, value, expected)
    return as_int


def _factor_list(rope_type: str, name: str, value: Any, length: int) -> list[float]:
    """LongRoPE's per-pair rescale factors: ``length`` finite numbers > 0."""
    expected = f"a list of {length} (= rotary_dim / 2) finite numbers > 0"
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__"):
        raise _bad(rope_type, name, value, expected, TypeError)
    if len(value) != length:
        raise ValueError(f"rope_type={rope_type!r}: {name} has {len(value)} entries; expected {expected}")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) or v <= 0:
            raise ValueError(f"rope_type={rope_type!r}: {name}[{i}]={v!r}; expected {expected}")
    return list(value)


def _check_values(rope_type: str, p: dict[str, Any]) -> None:
    """Range checks for every numeric parameter of ``rope_type`` (``p``: the parameters with defaults filled)."""
    if "factor" in p and p["factor"] is not None:
        _positive(rope_type, "factor", p["factor"])
    for key in ("original_max_position_embeddings", "max_position_embeddings"):
        if p.get(key) is not None:
            p[key] = _positive_int(rope_type, key, p[key])
    if rope_type == "dynamic":
        p["seq_len"] = _positive_int(rope_type, "seq_len", p["seq_len"])
    if rope_type == "yarn":
        # transformers reads 0 or None as the default (``beta_fast or 32``); anything else must be a number > 0
        beta_fast = 32 if not p["beta_fast"] else _positive(rope_type, "beta_fast", p["beta_fast"])
        beta_slow = 1 if not p["beta_slow"] else _positive(rope_type, "beta_slow", p["beta_slow"])
        if beta_fast < beta_slow:  # (equal: one-pair ramp, which transformers widens by 0.001 as done below)
            raise ValueError(f"rope_type='yarn': beta_fast={p['beta_fast']!r}, beta_slow={p['beta_slow']!r}; "
                             "expected beta_fast >= beta_slow > 0 (defaults 32 and 1)")
        if p["attention_factor"] is not None:
            _positive(rope_type, "attention_factor", p["attention_factor"])
        for key in ("mscale", "mscale_all_dim"):
            if p[key] is not None:
                _real(rope_type, key, p[key], "a finite number")
        if p["truncate"] is not None and not isinstance(p["truncate"], bool):
            raise _bad(rope_type, "truncate", p["truncate"], "a bool", TypeError)
    if rope_type == "llama3":
        low = _positive(rope_type, "low_freq_factor", p["low_freq_factor"])
        high = _real(rope_type, "high_freq_factor", p["high_freq_factor"], "a finite number > low_freq_factor")
        if high <= low:
            raise ValueError(f"rope_type='llama3': high_freq_factor={high!r}, low_freq_factor={low!r}; "
                             "expected high_freq_factor > low_freq_factor > 0")
    if rope_type == "longrope":
        # the default attention factor divides by ln(original_max_position_embeddings)
        p["original_max_position_embeddings"] = _positive_int(
            rope_type, "original_max_position_embeddings", p["original_max_position_embeddings"], minimum=2)
        if p["attention_factor"] is not None:
            _positive(rope_type, "attention_factor", p["attention_factor"])
        if p["seq_len"] is not None:
            p["seq_len"] = _positive_int(rope_type, "seq_len", p["seq_len"])


def _rotary_dim(head_dim: int, partial_rotary_factor: float) -> int:
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
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
    """YaRN's correction range ``(low, high)`` as rotation-pair indices (pair ``i`` rotates at ``theta^(-2i/dim)``).

    Pair ``i`` is extrapolated (kept) when ``i < low``, interpolated (divided by ``factor``) when ``i > high`` and
    blended linearly between. ``low`` is the (fractional) pair that completes ``beta_fast`` rotations within the
    original length, ``high`` the one that completes ``beta_slow``. As transformers' ``find_correction_range``, the
    bounds are clamped to ``[0, dim - 1]``: its upper clamp is wider than the ``dim // 2`` pairs, and the blend then
    ends past the last pair.
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
        head_dim: the attention head size (int >= 2).
        theta: the RoPE base (``rope_theta``), a finite number > 0 (and != 1 for yarn, which divides by ln theta).
        **params: the type's parameters (see ``ROPE_TYPES``), plus ``partial_rotary_factor`` (default 1.0).
            ``dynamic`` needs ``seq_len``: the *global* sequence length (the same on every rank).
            ``longrope`` uses ``long_factor`` when ``seq_len > original_max_position_embeddings``, else
            ``short_factor``; its ``factor`` defaults to ``max_position_embeddings / original_max_position_embeddings``.
            Unlike :func:`from_hf_config` (which ignores, with a warning, the keys transformers ignores), a keyword
            this type does not take is an error here: it is a typo in the caller's code.

    Returns:
        ``inv_freq``: float32 CPU tensor ``[rotary_dim // 2]`` (``rotary_dim = int(head_dim * partial_rotary_factor)``;
        ``proportional`` always returns ``head_dim // 2`` entries, zeros for pairs that do not rotate), and
        ``attention_scaling``: float, multiplies cos and sin.

    Raises:
        ValueError: unknown ``rope_type``; missing or unknown parameters (the message lists what the type needs);
            a rotary dim that is odd or < 2; a value out of range (the message names the parameter, the value and
            the range): ``theta``, ``factor``, ``attention_factor`` <= 0, ``beta_fast < beta_slow``,
            ``high_freq_factor <= low_freq_factor``, ``original_max_position_embeddings`` / ``seq_len`` /
            ``max_position_embeddings`` < 1, ``partial_rotary_factor`` outside (0, 1], LongRoPE factor lists of
            the wrong length or with entries <= 0, NaN or inf anywhere.
        TypeError: a parameter of the wrong type (a string or bool where a number is expected, a float where an
            int is expected).
    """
    p = _check_params(rope_type, params)
    if not isinstance(head_dim, (bool, int)) and isinstance(head_dim, numbers.Integral):
        head_dim = operator.index(head_dim)  # numpy ints, as every other int parameter
    try:
        inv_freq, scaling = _compute(rope_type, head_dim, theta, p)
    except (OverflowError, ZeroDivisionError) as e:
        raise ValueError(f"rope_type={rope_type!r}: theta={theta!r}, {_shown(params)} overflow a float64 ({e}); "
                         "expected parameters whose frequencies are finite") from None
    if not bool(torch.isfinite(inv_freq).all()) or not math.isfinite(scaling) or bool((inv_freq < 0).any()):
        raise ValueError(f"rope_type={rope_type!r}: theta={theta!r}, {_shown(params)} give inverse frequencies "
                         f"from {inv_freq.min().item():.3g} to {inv_freq.max().item():.3g} and attention scaling "
                         f"{scaling!r}; expected finite values (a factor or theta too far from 1?)")
    return inv_freq, scaling


def _shown(params: Mapping[str, Any]) -> str:
    """The caller's parameters for a message (long factor lists shortened)."""
    def short(v):
        return f"[{len(v)} values]" if isinstance(v, (list, tuple)) and len(v) > 4 else repr(v)
    return ", ".join(f"{k}={short(v)}" for k, v in params.items()) or "no parameters"


def _compute(rope_type: str, head_dim: int, theta: float, p: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """:func:`rope_parameters` on checked names (``p``: the parameters with defaults filled)."""
    theta = _positive(rope_type, "theta", theta)
    if rope_type == "yarn" and theta == 1:
        raise _bad(rope_type, "theta", theta, "a finite number > 0 and != 1 (YaRN divides by ln(theta))")
    prf = p.get("partial_rotary_factor", 1.0)
    prf = 1.0 if prf is None else prf
    if _real(rope_type, "partial_rotary_factor", prf, "a number in (0, 1]") <= 0 or prf > 1:
        raise _bad(rope_type, "partial_rotary_factor", prf, "a number in (0, 1]")
    if rope_type == "proportional" and p["factor"] is None:
        raise _bad(rope_type, "factor", None, "a finite number > 0 (default 1.0)")
    _check_values(rope_type, p)
    base = theta

    if rope_type == "proportional":
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise _bad(rope_type, "head_dim", head_dim, "an even int >= 2")
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
            try:
                attention_factor = yarn_attention_factor(factor, p["mscale"], p["mscale_all_dim"])
            except ZeroDivisionError:
                attention_factor = math.nan
            if not (math.isfinite(attention_factor) and attention_factor > 0):
                raise ValueError(
                    f"rope_type='yarn': mscale={p['mscale']!r}, mscale_all_dim={p['mscale_all_dim']!r} with "
                    f"factor={factor!r} give attention factor {attention_factor!r}; expected mscale values for which "
                    "0.1 * m * ln(factor) + 1 > 0")
        beta_fast = p["beta_fast"] or 32  # transformers treats 0/None as the default
        beta_slow = p["beta_slow"] or 1
        truncate = bool(p["truncate"])  # transformers: get("truncate", True), so an explicit None does not truncate
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
        short = _factor_list(rope_type, "short_factor", p["short_factor"], dim // 2)
        long = _factor_list(rope_type, "long_factor", p["long_factor"], dim // 2)
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
        ext = torch.tensor(long if seq_len and seq_len > orig else short, dtype=torch.float32)
        inv_freq_shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (ext * base**inv_freq_shape), float(attention_factor)

    raise AssertionError(rope_type)  # unreachable: _check_params rejected it


# ---------------------------------------------------------------------------------------------------------
# HF config reader
#
# What transformers (5.x ``RotaryEmbeddingConfigMixin`` and the ``ROPE_INIT_FUNCTIONS``) reads from a rope
# dict, per type: (keys it refuses to run without, keys it uses when present). Every other key is ignored by
# transformers with a logged warning, and here with a ``UserWarning`` (e.g. Yarn-Llama-2's ``finetuned``, or
# ``original_max_position_embeddings`` on a ``linear``/``dynamic`` config). ``rope_type``/``type``,
# ``rope_theta`` and ``partial_rotary_factor`` are read for every type.
_HF_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "ntk": (("factor",), ()),  # not a transformers type; ours
    "dynamic": (("factor",), ()),
    "yarn": (("factor",), ("original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                          "mscale", "mscale_all_dim", "truncate")),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor"), ("original_max_position_embeddings",)),
    "longrope": (("short_factor", "long_factor"), ("original_max_position_embeddings", "factor", "attention_factor")),
    "proportional": ((), ("factor",)),  # transformers' validator does not list factor, but its compute uses it
}
_HF_COMMON = ("rope_type", "type", "rope_theta", "partial_rotary_factor")
_GEMMA3_GLOBAL_THETA = 1_000_000.0  # transformers' Gemma3 default_theta["global"]


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _hf_rope_dicts(config: Any) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any] | None]]:
    """``(flat, nested)``: the config's rope dict when one applies to every layer, else ``None`` and the dicts per
    layer type (``None`` values: layers without RoPE). Copies; the config is never modified."""
    # transformers: a 4.x ``rope_scaling`` takes priority over ``rope_parameters`` (convert_rope_params_to_dict)
    rope = _get(config, "rope_scaling") or _get(config, "rope_parameters") or {}
    if not isinstance(rope, Mapping):
        raise TypeError(f"config rope parameters {rope!r}: expected a dict (rope_parameters or rope_scaling)")
    labels = _get(config, "_rope_type_labels") or _get(config, "layer_types") or ()
    nested = [k for k in rope if k in labels]
    if not nested and any(isinstance(v, Mapping) for v in rope.values()) and \
            all(isinstance(v, Mapping) or v is None for v in rope.values()):
        nested = list(rope)  # a dict config without layer_types
    if nested:
        return None, {k: (dict(rope[k]) if rope[k] is not None else None) for k in nested}
    rope = dict(rope)
    local = _get(config, "rope_local_base_freq")
    if local is not None:
        # Gemma 3 in the 4.x layout: rope_theta + rope_scaling for the full-attention layers, default RoPE with
        # rope_local_base_freq for the sliding ones (what transformers' Gemma3Config converts it to).
        if rope.get("rope_theta") is None:
            rope["rope_theta"] = _get(config, "rope_theta", _GEMMA3_GLOBAL_THETA)
        rope.setdefault("rope_type", rope.get("type", "default"))
        return None, {"full_attention": rope, "sliding_attention": {"rope_type": "default", "rope_theta": local}}
    return rope, {}


def _hf_type_name(rope: Mapping[str, Any]) -> str:
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type == "su" or (rope_type == "yarn" and "short_factor" in rope and "long_factor" in rope):
        rope_type = "longrope"  # Phi-3's legacy names, as transformers' Phi3Config maps them
    return rope_type


def hf_rope_types(config: Any) -> dict[str, str]:
    """The rope type of a transformers config, as transformers reads it: ``{"all": type}``, or one entry per
    layer type (Gemma 3: ``{"full_attention": ..., "sliding_attention": ...}``; layers without RoPE are left
    out). Legacy names are mapped (Phi-3's ``su`` is ``longrope``). Reads ``rope_scaling`` (4.x) or
    ``rope_parameters`` (5.x); a config with neither is ``{"all": "default"}``.

    Raises:
        TypeError: the rope parameters are not a dict.
    """
    flat, nested = _hf_rope_dicts(config)
    if flat is not None:
        return {"all": _hf_type_name(flat)}
    return {k: _hf_type_name(v) for k, v in nested.items() if v is not None}


def _hf_resolve(config: Any, rope: dict[str, Any], nested: bool, where: str
                ) -> tuple[str, int, float, dict[str, Any]]:
    """``(rope_type, head_dim, theta, params)`` for one (flat or per-layer-type) rope dict, as transformers
    standardizes it; ``params`` still lacks ``seq_len``."""
    head_dim = _get(config, "head_dim") or None
    if head_dim is None:
        hidden, heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
        if not hidden or not heads:
            raise ValueError("config has neither head_dim nor hidden_size and num_attention_heads")
        head_dim = hidden // heads
    head_dim = _positive_int("<config>", "head_dim", head_dim)

    rope_type = _hf_type_name(rope)
    if rope_type not in _HF_KEYS:
        raise ValueError(f"{where}: unknown rope_type {rope_type!r}; expected one of {sorted(_HF_KEYS)}")
    required, optional = _HF_KEYS[rope_type]
    missing = sorted(k for k in required if k not in rope)
    if missing:  # transformers raises KeyError("Missing required keys in `rope_parameters` ...") here too
        raise ValueError(f"{where}: rope_type={rope_type!r} is missing {missing} (transformers refuses it too); "
                         f"it needs {list(required)}, optionally {list(optional)}")
    ignored = sorted(set(rope) - set(required) - set(optional) - set(_HF_COMMON))
    if ignored:
        warnings.warn(f"{where}: ignoring {ignored} for rope_type={rope_type!r}, as transformers does "
                      f"(it reads {sorted(set(required) | set(optional))}, rope_theta and partial_rotary_factor)",
                      UserWarning, stacklevel=4)
    params = {k: rope[k] for k in (*required, *optional) if k in rope}

    theta = rope.get("rope_theta")
    if theta is None:
        theta = _get(config, "rope_theta")
    if theta is None:
        theta = 10000.0  # transformers' default_theta
    prf = rope.get("partial_rotary_factor")
    if prf is None:
        prf = _get(config, "partial_rotary_factor")
    if prf is not None:
        params["partial_rotary_factor"] = prf

    max_pos = _get(config, "max_position_embeddings")
    if rope_type in ("yarn", "llama3", "longrope"):
        # transformers gives a config-level original_max_position_embeddings priority (Phi-3) for a flat dict,
        # else falls back to max_position_embeddings.
        top = None if nested else _get(config, "original_max_position_embeddings")
        if top is not None:
            params["original_max_position_embeddings"] = top
        elif params.get("original_max_position_embeddings") is None:
            if max_pos is None:
                raise ValueError(f"{where}: rope_type={rope_type!r} needs original_max_position_embeddings (in the "
                                 "rope parameters or on the config) or max_position_embeddings; the config has neither")
            params["original_max_position_embeddings"] = max_pos
    if rope_type == "yarn" and params["factor"] is None:
        if max_pos is None:
            raise ValueError(f"{where}: yarn factor=None needs max_position_embeddings to derive it as "
                             "max_position_embeddings / original_max_position_embeddings")
        params["factor"] = max_pos / _positive_int(
            "yarn", "original_max_position_embeddings", params["original_max_position_embeddings"])
    if rope_type in ("dynamic", "longrope"):
        if rope_type == "dynamic" and max_pos is None:
            raise ValueError(f"{where}: rope_type='dynamic' needs max_position_embeddings on the config")
        params["max_position_embeddings"] = max_pos
    return rope_type, head_dim, theta, params


def _hf_compute(config: Any, rope: dict[str, Any], nested: bool, where: str,
                seq_len: int | None) -> tuple[torch.Tensor, float]:
    rope_type, head_dim, theta, params = _hf_resolve(config, rope, nested, where)
    if seq_len is not None:
        seq_len = _positive_int(rope_type, "seq_len", seq_len)
    if rope_type == "dynamic":
        params["seq_len"] = seq_len if seq_len is not None else params["max_position_embeddings"]
    if rope_type == "longrope":
        params["seq_len"] = seq_len
    return rope_parameters(rope_type, head_dim, theta, **params)


def from_hf_config(config: Any, seq_len: int | None = None, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """``(inv_freq, attention_scaling)`` for a transformers config (object or ``config.json`` dict), read as
    transformers reads it.

    Layouts: transformers 5.x ``rope_parameters`` (``rope_theta`` inside), 4.x ``rope_scaling`` + ``rope_theta``
    (``"type"`` or ``"rope_type"``; ``rope_scaling`` wins when both are set, as in transformers), no rope dict at
    all (default RoPE with ``rope_theta``, or 10000), and per-layer-type dicts (see ``layer_type``). Also read:
    ``partial_rotary_factor`` (rope dict, else config), ``head_dim`` (else ``hidden_size // num_attention_heads``),
    ``max_position_embeddings`` and a config-level ``original_max_position_embeddings`` (Phi-3: it wins over
    the rope dict's). Keys transformers ignores are ignored with a ``UserWarning`` (Yarn-Llama-2's
    ``"finetuned": true``, ``original_max_position_embeddings`` on ``linear``/``dynamic``, ...). Phi-3's legacy
    ``"su"`` type reads as ``longrope``.

    The numbers follow transformers 5.x (and 4.x from the release that reads YaRN's
    ``original_max_position_embeddings``). transformers 4.48 and older computed YaRN's correction range from
    ``max_position_embeddings`` and ignored ``original_max_position_embeddings``; the two agree whenever the
    config's ``max_position_embeddings`` is the original length (Yarn-Llama-2-7b-128k's is), and where they
    differ this reader follows the YaRN paper and current transformers.

    Args:
        config: a ``PretrainedConfig`` or a dict.
        seq_len: the *global* sequence length; used by ``dynamic`` (default: ``max_position_embeddings``, i.e. no
            change, as at transformers' init) and ``longrope`` (long factors when above the original length).
        layer_type: which layer type's RoPE to return. Needed when the config's RoPE differs per layer type:
            5.x ``rope_parameters`` nested by layer type (Gemma 3: ``{"full_attention": {...},
            "sliding_attention": {...}}``) or a 4.x Gemma 3 config (``rope_local_base_freq`` is the sliding
            layers' theta). For a config with one RoPE for every layer it may be given (it must then be one of
            the config's ``layer_types``, when the config lists them) and changes nothing.
            :func:`from_hf_config_per_layer_type` returns every layer type's at once.

    Returns:
        ``(inv_freq, attention_scaling)`` as :func:`rope_parameters` returns them.

    Raises:
        ValueError: an unknown rope type; a key transformers also refuses to run without (``factor`` for
            linear/dynamic/yarn/llama3, ``low_freq_factor``/``high_freq_factor`` for llama3,
            ``short_factor``/``long_factor`` for longrope); a per-layer-type config without ``layer_type``; a
            ``layer_type`` the config does not have, or one whose layers have no RoPE; any value
            :func:`rope_parameters` refuses (the message names it).
        TypeError: a rope dict that is not a dict, or a value of the wrong type.
    """
    flat, per_type = _hf_rope_dicts(config)
    if flat is not None:
        declared = _get(config, "layer_types")
        if layer_type is not None and declared and layer_type not in declared:
            raise ValueError(f"layer_type={layer_type!r}: expected one of the config's layer_types "
                             f"{sorted(set(declared))}")
        return _hf_compute(config, flat, False, "config rope parameters", seq_len)
    if layer_type is None:
        raise ValueError(f"the config's RoPE differs per layer type {sorted(per_type)}; pass layer_type= one of "
                         "them, or call from_hf_config_per_layer_type(config) for all")
    if layer_type not in per_type:
        raise ValueError(f"layer_type={layer_type!r}: expected one of {sorted(per_type)} (the config's rope "
                         "parameters per layer type)")
    if per_type[layer_type] is None:
        raise ValueError(f"layer_type={layer_type!r} has no RoPE (its rope parameters are None)")
    return _hf_compute(config, per_type[layer_type], True, f"rope parameters of layer type {layer_type!r}", seq_len)


def from_hf_config_per_layer_type(config: Any, seq_len: int | None = None
                                  ) -> dict[str, tuple[torch.Tensor, float] | None]:
    """``{layer_type: (inv_freq, attention_scaling) or None}`` for every layer type of a transformers config.

    For a per-layer-type config (Gemma 3), one entry per layer type in its rope parameters (``None`` for a
    layer type without RoPE). For a config with one RoPE for every layer, one entry per distinct name in its
    ``layer_types`` (all equal), or ``{"full_attention": ...}`` when it lists none (transformers' name for the
    flat case). Each entry is what ``from_hf_config(config, seq_len, layer_type=name)`` returns; the errors
    are the same.
    """
    flat, per_type = _hf_rope_dicts(config)
    if flat is not None:
        value = _hf_compute(config, flat, False, "config rope parameters", seq_len)
        names = list(dict.fromkeys(_get(config, "layer_types") or ())) or ["full_attention"]
        return {name: (value[0].clone(), value[1]) for name in names}
    return {name: (None if rope is None else
                   _hf_compute(config, rope, True, f"rope parameters of layer type {name!r}", seq_len))
            for name, rope in per_type.items()}
