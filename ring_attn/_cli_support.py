"""Helpers shared by the ``ring-attn`` subcommands (``demo``, ``rope-plan``, ``kld``): the machine's memory for
their up-front size checks, and JSON without NaN or infinity for their ``--json`` output. Imports nothing from
the package, so every layer's subcommand can use it."""
from __future__ import annotations

import math
import os
from typing import Optional

__all__ = ["physical_memory", "json_safe"]


def physical_memory() -> Optional[int]:
    """This machine's physical memory in bytes, or None where the platform does not report it."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def json_safe(x):
    """``x`` (dicts, lists, tuples, scalars) with every non-finite float replaced by None: JSON has no NaN or
    infinity, and ``json.dumps`` would otherwise write bare ``NaN`` / ``Infinity``, which JSON readers refuse."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x
