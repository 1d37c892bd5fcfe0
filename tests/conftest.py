import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py importable as `reference`

from sparsevox.cuda.gpu_info import gpu_available  # noqa: E402


def pytest_collection_modifyitems(config, items):
    ok, reason = gpu_available()
    if ok:
        return
    skip = pytest.mark.skip(reason=f"no GPU ({reason})")
    for item in items:
        if "gpu" in item.keywords or "multigpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """Fresh random inputs every run; the seed is printed on failure so a case can be replayed."""
    seed = np.random.SeedSequence().entropy % (2 ** 32)
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def spconv_cpu_build():
    """``spconv.pytorch`` of spconv's CPU build (CI installs its wheel), else the test is skipped: where it
    is absent, and where it is the CUDA build (the GPU machine's), whose layers assert CUDA tensors."""
    sp = pytest.importorskip("spconv.pytorch", reason="spconv not installed (CI installs its CPU wheel)")
    import spconv.utils
    if not getattr(spconv.utils, "CPU_ONLY_BUILD", False):
        pytest.skip("spconv here is its CUDA build, whose layers take CUDA tensors only (the GPU tests compare it)")
    return sp


def pointcloud_dir():
    """Real scans: the copy carried to the GPU machine, else ../shared beside the checkout."""
    root = Path(__file__).resolve().parents[1]
    for p in (root / ".gpudata" / "pointclouds", root.parent / "shared" / "data" / "pointclouds"):
        if p.is_dir():
            return p
    return None


@pytest.fixture
def one_thread():
    """One torch intra-op thread for the test: torch's threads oversubscribe a shared 2-core machine (tiny
    batch norms took 70 ms). Test modules of torch networks use it for every test."""
    torch = pytest.importorskip("torch", reason="torch not installed")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def jax_x64():
    """Float64 JAX arrays for the duration of a test (the oracle comparisons need them)."""
    jax = pytest.importorskip("jax", reason="jax not installed")
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


@pytest.fixture(scope="module")
def emulated():
    """The kernel-map and slot-table CUDA sources run on the CPU (``cuda_cpu_emulator``), or a skip naming why not."""
    import cuda_cpu_emulator as emu
    ok, reason = emu.available()
    if not ok:
        pytest.skip(f"CUDA CPU emulator unavailable: {reason}")
    return emu.EmulatedDevice()
