"""Test configuration shared by every test module.

* Without CUDA, Triton kernels run through the interpreter: ``TRITON_INTERPRET=1`` is set here, before any
  test imports ``ring_attn`` (Triton reads it when kernels are decorated).
* Hypothesis profiles: ``ci`` (default, bounded so the suite runs in minutes on 2 cores) and ``thorough``;
  pick one with ``HYPOTHESIS_PROFILE=thorough``.
* Markers: ``gpu`` tests are skipped without CUDA (one place decides that, below).
* ``RING_ATTN_TEST_SHARD=i/n`` runs every n-th test only (see ``_shard``).
* ``cpu_backend`` fixture: a module that uses it (``pytestmark = pytest.mark.usefixtures("cpu_backend")``) runs
  every test three times: automatic selection (the Triton interpreter on CPU here), pinned to the native C++
  backend (skipped, with the reason, when ``ring_attn._C`` is not built) and pinned to the plain-torch
  reference, so the CPU suite checks each backend against the float64 oracle. GPU tests run once (automatic).
"""
import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=200, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()


def _shard() -> tuple[int, int]:
    """``RING_ATTN_TEST_SHARD=i/n``: this process runs every n-th collected test starting at the i-th (0-based),
    so n processes run the whole selection between them (scripts/gpu_check.sh runs the GPU tests this way, to
    compile kernels on several cores at once). Unset: ``(0, 1)``, everything."""
    text = os.environ.get("RING_ATTN_TEST_SHARD", "")
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise pytest.UsageError(f"RING_ATTN_TEST_SHARD={text!r}: expected 'i/n' with 0 <= i < n, e.g. '0/4'")
    return i, n


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run scripts/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
    shard, shards = _shard()
    if shards > 1:
        config.hook.pytest_deselected(items=[t for j, t in enumerate(items) if j % shards != shard])
        items[:] = [t for j, t in enumerate(items) if j % shards == shard]


RING_WORLDS = (1, 2, 3, 4)


@pytest.fixture(scope="session")
def ring_worlds(tmp_path_factory):
    """{world: [results of rank 0, rank 1, ...]}: every case of tests/ring_workers.py, run once per session in
    one gloo group per world size (shared by test_ring.py and test_compat.py: a group costs seconds to spawn)."""
    from ring_workers import run_world

    return {w: run_world(w, str(tmp_path_factory.mktemp(f"ring_w{w}"))) for w in RING_WORLDS}


NATIVE_BUILT = importlib.util.find_spec("ring_attn._C") is not None


@pytest.fixture(params=[
    pytest.param(None, id="auto"),
    pytest.param("native", id="native", marks=pytest.mark.skipif(
        not NATIVE_BUILT, reason="ring_attn._C is not built (no C++ compiler at install time)")),
    pytest.param("reference", id="reference"),
])
def cpu_backend(request):
    """Pin the backend for the whole test (None: automatic selection). See the module docstring."""
    if request.param is not None and request.node.get_closest_marker("gpu") is not None:
        pytest.skip("GPU tests run once, with automatic backend selection")
    import ring_attn.backends as backends

    with backends.force(request.param):
        yield request.param
