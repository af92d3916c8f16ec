"""The README's Python examples run as written (on CPU through the torch fallback).

Blocks fenced ```python must run as they stand; fragments that need a launcher (torchrun) are fenced ```py.
"""
import re
from pathlib import Path

import pytest

from ring_attn import backends

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert BLOCKS


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(i):
    with backends.force("reference"):  # the interpreter is too slow for README-sized shapes
        exec(compile(BLOCKS[i], f"README.md python block {i}", "exec"), {})
