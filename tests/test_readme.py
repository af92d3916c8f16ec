"""The README's Python examples run as written (on CPU through the native backend, or the torch fallback
where the extension is not built).

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
    # what a CPU user without TRITON_INTERPRET gets (the interpreter, on in the test suite, is too slow here)
    with backends.force("native" if backends.native_available() else "reference"):
        exec(compile(BLOCKS[i], f"README.md python block {i}", "exec"), {})
