"""sparsevox under ``torch.nn.parallel.DistributedDataParallel``: a small sparse UNet trained a few steps,
one process per GPU, a different scan per rank; the all-reduced gradients of step 0 are checked against
one process computing the loss over the union of all ranks' scans.

Run (one process per GPU; NCCL on the GPU, gloo on the CPU)::

    torchrun --standalone --nproc_per_node=2 -m benchmarks.ddp --device cuda --dtype float64 --out r.json
    torchrun --standalone --nproc_per_node=2 -m benchmarks.ddp --device cpu          # gloo, CPU-only
    python -m benchmarks.ddp --device cuda                                           # one rank, no torchrun
    torchrun --standalone --nproc_per_node=2 -m benchmarks.ddp --device cuda --backend gloo --share-gpu
                                                                     # two ranks on ONE GPU (gloo only)

NVLink multicast (NVLS) stays off: this program sets ``NCCL_NVLS_ENABLE=0`` before NCCL starts, whatever
the environment says. Never enable it on the lent machines.

The network: SubM 3³ (C_in→c) → down 2³ s2 (c→2c) → SubM 3³ (2c→2c) → up 2³ s2 transposed onto the finer
level (2c→c) + skip → SubM 3³ (c→1), ReLUs between. Per-scan loss: mean squared error of the output
against "voxel above ground"; DDP averages gradients over ranks, so the single-process reference loss is
the mean over scans of each scan's mean (one multi-batch tensor, batch column = rank).

Prints ``DDP grad check PASS|FAIL ...`` on rank 0; every rank exits 1 on FAIL. ``--out`` writes a JSON
result file (provenance header + one record).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np

from benchmarks import dp_scans

log = logging.getLogger("sparsevox.benchmarks.ddp")


def _single_process_env() -> None:
    """Let ``python -m benchmarks.ddp`` run as one rank without torchrun."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def build_model(c_in: int, c: int, algo, device, dtype):
    import torch
    import sparsevox.adapters.torch as svt

    class SparseUNet(torch.nn.Module):
        """Two-level sparse UNet on ``Voxels`` (see the module docstring)."""

        def __init__(self):
            super().__init__()
            kw = dict(fwd_algo=algo, bwd_algo=algo, device=device, dtype=dtype)
            self.enc = svt.SpatiallySparseConv(c_in, c, 3, **kw)
            self.down = svt.SpatiallySparseConv(c, 2 * c, 2, stride=2, **kw)
            self.mid = svt.SpatiallySparseConv(2 * c, 2 * c, 3, **kw)
            self.up = svt.SpatiallySparseConv(2 * c, c, 2, stride=2, transposed=True, **kw)
            self.head = svt.SpatiallySparseConv(c, 1, 3, **kw)

        def forward(self, v):
            relu = torch.relu
            x0 = self.enc(v)
            x0 = x0.replace(relu(x0.feats))
            x1 = self.down(x0)
            x1 = self.mid(x1.replace(relu(x1.feats)))
            u = self.up(x1.replace(relu(x1.feats)), output_voxels=x0)
            return self.head(u.replace(relu(u.feats) + x0.feats))

    return SparseUNet()


def _voxels(coords, feats, device, dtype):
    import torch
    import sparsevox as sv
    return sv.Voxels(torch.from_numpy(coords).to(device), torch.from_numpy(feats).to(device=device, dtype=dtype))


def scan_loss(out, target):
    """Mean squared error of ``out [N, 1]`` against ``target [N]``."""
    return ((out[:, 0] - target) ** 2).mean()


def union_loss(out, target, batch, num_scans: int):
    """Mean over scans of each scan's :func:`scan_loss` (what DDP's averaged gradients differentiate)."""
    import torch
    counts = torch.bincount(batch, minlength=num_scans).to(out.dtype)
    return (((out[:, 0] - target) ** 2) / counts[batch]).sum() / num_scans


def _grads(model):
    return {n: p.grad.detach().double().cpu().numpy() for n, p in model.named_parameters()}


def reference_grads(init_state, scans, args, device, dtype):
    """Gradients of :func:`union_loss` in this one process, from the initial weights; also the gradients
    of scan 0 alone (to show the check can tell the union from one rank's own batch)."""
    import torch
    out = {}
    for name, subset in (("union", scans), ("scan0", scans[:1])):
        model = build_model(dp_scans.C_IN, args.channels, args.algo, device, dtype)
        model.load_state_dict(init_state)
        coords, feats, target, batch = dp_scans.union(subset)
        y = model(_voxels(coords, feats, device, dtype)).feats
        loss = union_loss(y, torch.from_numpy(target).to(device, dtype), torch.from_numpy(batch).to(device),
                          len(subset))
        loss.backward()
        out[name] = (_grads(model), float(loss.detach()))
    return out


def _context_devices():
    """GPU indices on which this process holds a CUDA context (nvidia-smi), or None when that cannot be
    seen (no nvidia-smi, or a PID namespace that hides our process)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        q = ["nvidia-smi", "--format=csv,noheader"]
        gpus = subprocess.run(q + ["--query-gpu=index,uuid"], capture_output=True, text=True, timeout=30).stdout
        apps = subprocess.run(q + ["--query-compute-apps=pid,gpu_uuid"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    index = {u.strip(): int(i) for i, u in (line.split(",") for line in gpus.strip().splitlines() if "," in line)}
    mine = sorted({index.get(u.strip(), -1) for p, u in (line.split(",") for line in apps.strip().splitlines()
                                                          if "," in line) if p.strip() == str(os.getpid())})
    return mine or None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    ap.add_argument("--backend", choices=("nccl", "gloo"), default=None, help="default: nccl on cuda, gloo on cpu")
    ap.add_argument("--share-gpu", action="store_true",
                    help="allow more ranks than GPUs (rank r on GPU r %% count; gloo only: NCCL refuses)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    ap.add_argument("--crop", type=float, default=8.0, help="|x|, |y| < crop metres")
    ap.add_argument("--voxel", type=float, default=0.1, help="voxel size, metres")
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--algo", default=None, help="fwd and bwd algorithm (default: the environment, else auto)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--out", default=None, help="write a JSON result file here (rank 0)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # NVLink multicast (NVLS) off before NCCL reads its environment: the lent machines' rule.
    if os.environ.get("NCCL_NVLS_ENABLE", "0") != "0":
        print(f"ddp: overriding NCCL_NVLS_ENABLE={os.environ['NCCL_NVLS_ENABLE']} with 0", file=sys.stderr)
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    _single_process_env()
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    backend = args.backend or ("nccl" if use_cuda else "gloo")
    if use_cuda:
        n_gpu = torch.cuda.device_count()
        if n_gpu == 0:
            raise SystemExit("ddp: --device cuda but torch sees no GPU")
        if local_rank >= n_gpu and not args.share_gpu:
            raise SystemExit(f"ddp: local rank {local_rank} has no GPU of its own ({n_gpu} visible); run "
                             f"--nproc_per_node <= {n_gpu}, or --share-gpu --backend gloo")
        if args.share_gpu and backend == "nccl" and world > n_gpu:
            raise SystemExit("ddp: --share-gpu with more ranks than GPUs needs --backend gloo (NCCL refuses "
                             "two ranks on one GPU)")
        device = torch.device("cuda", local_rank % n_gpu)
        torch.cuda.set_device(device)  # before anything touches CUDA: CuPy follows the runtime's device
    else:
        if backend == "nccl":
            raise SystemExit("ddp: the nccl backend needs --device cuda")
        device = torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    init_kw = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, **init_kw)
    try:
        return _run(args, rank, world, device, dtype, backend, dist, torch)
    finally:
        dist.destroy_process_group()


def _run(args, rank, world, device, dtype, backend, dist, torch) -> int:
    coords, feats, target = dp_scans.scan(seed=rank, crop=args.crop, voxel=args.voxel)
    v = _voxels(coords, feats, device, dtype)
    t = torch.from_numpy(target).to(device, dtype)

    torch.manual_seed(0)  # same init everywhere (DDP also broadcasts rank 0's weights)
    model = build_model(dp_scans.C_IN, args.channels, args.algo, device, dtype)
    init_state = copy.deepcopy(model.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr)

    all_scans = [None] * world
    dist.all_gather_object(all_scans, (coords, feats, target))

    losses, step_ms, check = [], [], None
    for step in range(args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = ddp(v)
        if out.feats.device != device:
            raise RuntimeError(f"rank {rank}: sparsevox returned features on {out.feats.device}, expected {device}")
        loss = scan_loss(out.feats, t)
        loss.backward()  # DDP all-reduces (averages) the gradients here
        if step == 0:
            check = _check_step0(args, rank, world, device, dtype, model, init_state, all_scans, dist, torch)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_ms.append((time.perf_counter() - t0) * 1e3)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        losses.append(float(mean_loss) / world)

    # After the steps every rank must hold the same weights.
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    ref = flat.clone()
    dist.broadcast(ref, 0)
    spread = (flat - ref).abs().max()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    spread = float(spread)

    devices = _device_report(device, torch)
    reports = [None] * world
    dist.all_gather_object(reports, {"rank": rank, "n_voxels": int(len(coords)), **devices})
    foreign = [r for r in reports if r.get("context_devices") not in (None, [r["device_index"]])]
    verdict = [check["pass"] and spread == 0.0 and not foreign]
    dist.broadcast_object_list(verdict, src=0)  # every rank exits with the same status
    ok = bool(verdict[0])
    if rank == 0:
        _report(args, ok, world, backend, device, reports, check, spread, losses, step_ms, foreign, torch)
    # Leave together: a rank that tears gloo down while rank 0 still reports can abort the job at exit
    # ("terminate called without an active exception", seen here about one run in four).
    dist.barrier()
    return 0 if ok else 1


def _report(args, ok, world, backend, device, reports, check, spread, losses, step_ms, foreign, torch) -> None:
    tol = dp_scans.TOL[args.dtype]
    line = (f"DDP grad check {'PASS' if ok else 'FAIL'}: world={world} backend={backend} device={device.type} "
            f"dtype={args.dtype} voxels/rank={[r['n_voxels'] for r in reports]} "
            f"max param rel err={check['rel_err_max']:.2e} (global {check['rel_err_global']:.2e}, tol {tol:.0e}) "
            f"| union vs scan-0-only grads differ by {check['rel_union_vs_scan0']:.2e} "
            f"| weight spread after {args.steps} steps={spread:.1e} | losses={['%.5f' % x for x in losses]}")
    if foreign:
        line += f" | ranks with CUDA contexts on foreign GPUs: {foreign}"
    print(line, flush=True)
    if args.out:
        _write(args, line, ok, check, world, backend, device, spread, losses, step_ms, reports, torch)


def _check_step0(args, rank, world, device, dtype, model, init_state, all_scans, dist, torch):
    """Rank 0 recomputes step 0's gradients in one process over the union; the verdict goes to all ranks."""
    result = [None]
    if rank == 0:
        ref = reference_grads(init_state, all_scans, args, device, dtype)
        mine = _grads(model)
        union, _ = ref["union"]
        scan0, _ = ref["scan0"]
        per = {n: dp_scans.rel_err(mine[n], union[n]) for n in union}
        names = sorted(union)
        glob = dp_scans.rel_err(np.concatenate([mine[n].ravel() for n in names]),
                                np.concatenate([union[n].ravel() for n in names]))
        sep = dp_scans.rel_err(np.concatenate([scan0[n].ravel() for n in names]),
                               np.concatenate([union[n].ravel() for n in names]))
        tol = dp_scans.TOL[args.dtype]
        # world 1: the union *is* scan 0, so there is nothing to tell apart
        result[0] = {"pass": max(per.values()) <= tol and (world == 1 or sep > 100 * tol),
                     "rel_err_max": max(per.values()), "rel_err_global": glob, "rel_err_per_param": per,
                     "rel_union_vs_scan0": sep, "reference_loss": ref["union"][1]}
    dist.broadcast_object_list(result, src=0)
    return result[0]


def _device_report(device, torch) -> dict:
    if device.type != "cuda":
        return {"device_index": None, "context_devices": None}
    import cupy
    return {"device_index": device.index, "torch_current_device": torch.cuda.current_device(),
            "cupy_current_device": int(cupy.cuda.runtime.getDevice()),
            "gpu_name": torch.cuda.get_device_name(device),
            "context_devices": _context_devices()}


def _write(args, line, ok, check, world, backend, device, spread, losses, step_ms, reports, torch):
    from benchmarks import provenance
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    record = {"op": "ddp_grad_check", "pass": ok, "summary": line, "world_size": world, "backend": backend,
              "device": device.type, "dtype": args.dtype, "steps": args.steps, "crop_m": args.crop,
              "voxel_m": args.voxel, "channels": args.channels, "algo": args.algo,
              "tolerance": dp_scans.TOL[args.dtype],
              **{k: v for k, v in check.items() if k != "pass"}, "weight_spread": spread, "losses": losses,
              "step_ms": step_ms, "ranks": reports, "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
              "torch": torch.__version__, "time": datetime.datetime.now().isoformat(timespec="seconds")}
    doc = {**provenance.header(name), "records": [record]}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1, default=str)


if __name__ == "__main__":
    code = main()
    # Leave without the interpreter's teardown: gloo's worker threads sometimes abort it ("terminate
    # called without an active exception", SIGABRT) after a run that passed and destroyed its group,
    # about 1 CPU-suite run in 8 on a loaded 2-core machine. Everything is written and flushed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
