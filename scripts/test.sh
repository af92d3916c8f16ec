#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, then run it. CI (.ci/run) calls exactly this.
#
# torch: when none is installed, the CPU build is installed first (on these machines `pip install
# torch==2.13.0` takes a local file; a bare `torch` requirement would pull a multi-GB CUDA build).
# Extra arguments go to pytest, e.g. `scripts/test.sh -k attention` or `scripts/test.sh -m gpu`.
# Without arguments, the HuggingFace tests then run again under other transformers releases
# (scripts/test_transformers.sh; RING_ATTN_OTHER_TRANSFORMERS=0 leaves that out).
# pytest's own exit status is returned (5, "no tests collected", fails too).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e '.[test]'
if [ $# -gt 0 ] || [ "${RING_ATTN_OTHER_TRANSFORMERS:-1}" = 0 ]; then
  exec python -m pytest -q "$@"
fi
python -m pytest -q
exec scripts/test_transformers.sh
