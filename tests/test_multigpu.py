"""sparsevox under data parallelism: PyTorch DDP (``benchmarks/ddp.py``) and JAX ``shard_map``
(``benchmarks/jax_sharded.py``), each checking its all-reduced gradients against one process over the
union of the ranks' scans.

- ``multigpu`` tests: the real thing, one process (torch) or device (JAX) per GPU; skipped with
  "needs 2 GPUs" on fewer.
- ``gpu`` tests: the single-GPU parts (one rank; two gloo ranks sharing one GPU; JAX on one GPU).
- unmarked tests: the same programs on the CPU (torch gloo with 2 processes; JAX with 2 fake host
  devices), so the logic is checked without a GPU; plus unit tests of the padding.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CPU_TIMEOUT = 240  # each CPU run takes ~15-30 s on 2 cores; the margin is for loaded CI machines
GPU_TIMEOUT = 600  # first runs autotune and compile kernels


def _gpu_count() -> int:
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no CuPy or no driver: no GPU
        return 0


def _torch_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


needs_2_gpus = pytest.mark.skipif(_gpu_count() < 2, reason="needs 2 GPUs")
needs_torch_cuda = pytest.mark.skipif(not _torch_cuda(), reason="torch without CUDA")


def _run(args, out: Path, timeout: int, env=None) -> dict:
    """Run ``args`` in the repository root; return the record of the JSON it wrote to ``out``."""
    e = {**os.environ, "NCCL_NVLS_ENABLE": "0", "PYTHONPATH": os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    e.update(env or {})
    p = subprocess.run(args + ["--out", str(out)], cwd=REPO, env=e, capture_output=True, text=True,
                       timeout=timeout)
    log = f"$ {' '.join(args)}\n--- stdout\n{p.stdout[-6000:]}\n--- stderr\n{p.stderr[-6000:]}"
    print(log)
    assert p.returncode == 0, log
    assert out.is_file(), log
    rec = json.loads(out.read_text())["records"][0]
    assert rec["pass"], rec["summary"]
    return rec


def _torchrun(nproc: int, *args) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "benchmarks.ddp", *args]


def _jax(*args) -> list:
    return [sys.executable, "-m", "benchmarks.jax_sharded", *args]


def _check_ddp(rec, world, dtype):
    assert rec["world_size"] == world and rec["dtype"] == dtype
    assert rec["rel_err_max"] <= {"float64": 1e-10, "float32": 1e-5}[dtype]
    assert rec["weight_spread"] == 0.0  # every rank holds the same weights after the steps
    if world > 1:
        assert rec["rel_union_vs_scan0"] > 1e-3  # the check tells the union from rank 0's own batch


def _check_jax(rec, n_dev, dtype):
    assert len(rec["devices"]) == n_dev and rec["dtype"] == dtype
    tol = {"float64": 1e-10, "float32": 1e-5}[dtype]
    assert rec["rel_err_max"] <= tol
    for c in rec["padding_check"]:
        assert max(c["zero_out"], c["zero_grad"], c["poisoned_out"], c["poisoned_grad"]) <= tol
    if n_dev > 1:
        assert rec["rel_union_vs_scan0"] > 1e-3


# --- CPU: the same programs, checked without a GPU ---------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_ddp_cpu_gloo_two_ranks(tmp_path, dtype):
    pytest.importorskip("torch")
    rec = _run(_torchrun(2, "--device", "cpu", "--dtype", dtype, "--crop", "4", "--steps", "2"),
               tmp_path / "ddp.json", CPU_TIMEOUT)
    _check_ddp(rec, 2, dtype)
    assert rec["backend"] == "gloo"


@pytest.mark.parametrize("dtype,pad_multiple", [("float64", 8), ("float32", 1)])
def test_jax_cpu_two_fake_devices(tmp_path, dtype, pad_multiple):
    pytest.importorskip("jax")
    rec = _run(_jax("--platform", "cpu", "--devices", "2", "--dtype", dtype, "--crop", "4", "--steps", "2",
                    "--pad-multiple", str(pad_multiple)),
               tmp_path / "jax.json", CPU_TIMEOUT, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    _check_jax(rec, 2, dtype)
    assert rec["platform"] == "cpu"


def test_pad_map_keeps_pairs_and_order():
    """Padded maps: the real pairs of each offset first (same order), then (dummy_in, dummy_out)."""
    from benchmarks import dp_scans
    from benchmarks.jax_sharded import LEVELS, level_maps, pad_map, pad_plan
    scans = [dp_scans.scan(seed=s, crop=5.0) for s in (0, 1)]
    built = [level_maps(c) for c, _, _ in scans]
    maps, rows = [b[0] for b in built], [b[1] for b in built]
    n_pad, counts = pad_plan(rows, maps, 4)
    assert min(r[0] for r in rows) > 1000 and rows[0] != rows[1]  # real, different geometries
    for lv in (0, 1):
        assert n_pad[lv] % 4 == 0 and n_pad[lv] > max(r[lv] for r in rows)  # a pad row on every device
    for m, r in zip(maps, rows):
        for name, (li, lo) in LEVELS.items():
            km = m[name]
            ins, outs, off = pad_map(km, counts[name], n_pad[li] - 1, n_pad[lo] - 1)
            assert np.all(np.diff(off) == counts[name]) and np.all(counts[name] % 4 == 0)
            for k in range(km.num_offsets):
                a, b, c, e = km.offsets_host[k], km.offsets_host[k + 1], off[k], off[k + 1]
                n = b - a
                np.testing.assert_array_equal(ins[c:c + n], km.in_maps[a:b])
                np.testing.assert_array_equal(outs[c:c + n], km.out_maps[a:b])
                assert np.all(ins[c + n:e] == n_pad[li] - 1) and np.all(outs[c + n:e] == n_pad[lo] - 1)
                assert np.all(np.diff(outs[c:e]) >= 0)  # still sorted by output row within the offset
            assert np.all(ins < n_pad[li]) and np.all(outs < n_pad[lo])
            assert np.all(km.in_maps < r[li]) and np.all(km.out_maps < r[lo])  # real pairs never touch pad rows
    with pytest.raises(ValueError, match="counts"):
        pad_map(maps[0]["subm0"], np.zeros(27, np.int64), 0, 0)


_RACE = """
import threading, numpy as np, sparsevox as sv
v = sv.Voxels(np.array([[0, 0, 0, 0], [0, 1, 0, 0]], np.int32), np.ones((2, 4), np.float32))
k = sv.kernel_map(v, 3)
w = np.ones((27, 4, 4), np.float32)
errors, barrier = [], threading.Barrier(4)
def go():
    barrier.wait()
    try:
        sv.conv_forward(v.feats, w, k)
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=go) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
print(errors)
raise SystemExit(1 if errors else 0)
"""


def test_first_use_from_threads():
    """The first convolution of a process, from 4 threads at once (as JAX's per-device callbacks do)."""
    for _ in range(3):  # the race is timing-dependent: a few fresh processes
        p = subprocess.run([sys.executable, "-c", _RACE], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr


# --- one GPU: the single-GPU parts --------------------------------------------------------------------

@pytest.mark.gpu
@needs_torch_cuda
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_ddp_one_rank_nccl(tmp_path, dtype):
    rec = _run([sys.executable, "-m", "benchmarks.ddp", "--device", "cuda", "--dtype", dtype],
               tmp_path / "ddp.json", GPU_TIMEOUT)
    _check_ddp(rec, 1, dtype)
    assert rec["backend"] == "nccl" and rec["ranks"][0]["device_index"] == 0
    assert rec["ranks"][0]["cupy_current_device"] == 0


@pytest.mark.gpu
@needs_torch_cuda
def test_ddp_two_ranks_sharing_one_gpu_gloo(tmp_path):
    """Two processes on one GPU (gloo: NCCL refuses): separate contexts, caches and kernel maps. Only GPU 0
    is made visible, so the ranks share it on a host with several GPUs too (there, with one rank per GPU
    and gloo, rank 1 was seen holding a context on GPU 0 as well: see docs/performance.md)."""
    rec = _run(_torchrun(2, "--device", "cuda", "--backend", "gloo", "--share-gpu", "--dtype", "float32"),
               tmp_path / "ddp.json", GPU_TIMEOUT, env={"CUDA_VISIBLE_DEVICES": "0"})
    _check_ddp(rec, 2, "float32")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_jax_one_gpu(tmp_path, dtype):
    pytest.importorskip("jax")
    rec = _run(_jax("--platform", "gpu", "--devices", "1", "--dtype", dtype), tmp_path / "jax.json", GPU_TIMEOUT)
    _check_jax(rec, 1, dtype)
    assert rec["platform"] == "gpu"


# --- several GPUs -------------------------------------------------------------------------------------

@pytest.mark.multigpu
@needs_2_gpus
@needs_torch_cuda
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_ddp_two_gpus_nccl(tmp_path, dtype):
    rec = _run(_torchrun(2, "--device", "cuda", "--dtype", dtype), tmp_path / "ddp.json", GPU_TIMEOUT)
    _check_ddp(rec, 2, dtype)
    assert rec["backend"] == "nccl"
    assert [r["device_index"] for r in rec["ranks"]] == [0, 1]
    assert [r["cupy_current_device"] for r in rec["ranks"]] == [0, 1]


@pytest.mark.multigpu
@needs_2_gpus
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_jax_two_gpus(tmp_path, dtype):
    pytest.importorskip("jax")
    rec = _run(_jax("--platform", "gpu", "--devices", "2", "--dtype", dtype), tmp_path / "jax.json", GPU_TIMEOUT)
    _check_jax(rec, 2, dtype)
