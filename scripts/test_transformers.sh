#!/usr/bin/env bash
# The HuggingFace integration's tests under other transformers releases. The main test run uses the newest
# release pip resolves; this runs tests/test_hf.py, tests/test_kld.py and tests/test_example_train.py again under
# each VERSION given (default: 4.48.3, the oldest supported, and 4.57.6, the last 4.x, whose mask interface
# takes cache_position), each in its own virtual environment that sees this one's packages (torch, the built
# ring_attn, accelerate, peft) behind its own transformers. scripts/test.sh calls it after the main run.
#
#     scripts/test_transformers.sh                  # the default releases
#     scripts/test_transformers.sh 5.17.0 -k ring   # one release, extra pytest arguments after the versions
#
# The environments are kept under ${RING_ATTN_TF_VENVS:-${TMPDIR:-/tmp}/ring-attn-transformers} and reused.
set -euo pipefail
cd "$(dirname "$0")/.."
versions=()
while [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+\.[0-9]+(\.[0-9]+)?$ ]]; do
  versions+=("$1")
  shift
done
[ ${#versions[@]} -gt 0 ] || versions=(4.48.3 4.57.6)
root="${RING_ATTN_TF_VENVS:-${TMPDIR:-/tmp}/ring-attn-transformers}"
outer=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
status=0
for v in "${versions[@]}"; do
  env_dir="$root/$v"
  if [ ! -x "$env_dir/bin/python" ]; then
    echo "=== transformers $v: creating $env_dir"
    python -m venv "$env_dir"
    inner=$("$env_dir/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    # this environment's packages after the venv's own (addsitedir also runs their .pth files)
    echo "import site; site.addsitedir('$outer')" > "$inner/ring_attn_outer.pth"
    "$env_dir/bin/python" -m pip install --quiet "transformers==$v"
  fi
  got=$("$env_dir/bin/python" -c "import transformers; print(transformers.__version__)")
  [ "$got" = "$v" ] || { echo "transformers $v: the environment imports $got" >&2; exit 1; }
  echo "=== transformers $v"
  "$env_dir/bin/python" -m pytest -q -p no:cacheprovider tests/test_hf.py tests/test_kld.py \
    tests/test_example_train.py "$@" || status=$?
done
exit $status
