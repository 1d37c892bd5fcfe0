"""sparsevox under JAX data-parallel sharding: a jitted train step ``shard_map``-ped over the devices, one
scan per device, the sparse convolutions of each device running through ``sparsevox.adapters.jax``
(``buffer_callback``: the core sees XLA's own buffers, on XLA's stream). Step 0's ``psum``-ed gradients
are checked against one device computing the loss over the union of the scans.

Run::

    python -m benchmarks.jax_sharded --platform gpu --devices 2 --dtype float64 --out r.json
    python -m benchmarks.jax_sharded --platform cpu --devices 2     # fakes 2 host devices (XLA_FLAGS)
    python -m benchmarks.jax_sharded --platform gpu --devices 1     # one GPU: padding + sharding code path

Different scans give different kernel-map sizes, but ``shard_map`` needs one static shape for every
device. So everything is padded per level and per map to a common size (rounded up to ``--pad-multiple``
so that shapes repeat across steps and padding is exercised even on one device):

- features: ``N_pad = round_up(max_d N_d + 1, m)`` rows; rows ``>= N_d`` are zero. Row ``N_pad - 1`` is
  therefore a pad row on every device.
- kernel maps: offset ``k`` gets ``round_up(max_d count_d(k), m)`` pairs on every device (so all devices
  share the static ``offsets``); a device's missing pairs are ``(dummy_in_row, dummy_out_row)`` = the last
  (pad) row of the input level and of the output level. Pad pairs sit at the end of each offset's
  segment, so pairs stay sorted by output row within an offset (the canonical order).
- after every layer the pad rows are zeroed (``where``, not multiply); the loss weights pad rows 0.

Why padded pairs cannot change real results: real pairs never read a pad row, and padded pairs only
write the dummy output row (a pad row), so real outputs never see pad rows. The loss weights pad rows 0,
so every pad row's gradient is 0, and a padded pair adds ``x[dummy_in]ᵀ · 0 = 0`` to the weight gradient
provided ``x[dummy_in]`` is finite. The zeroing after each layer keeps it exactly 0: one padded pair
repeats up to thousands of times per offset, so pad rows left alone would grow layer by layer and could
overflow to inf (and ``inf · 0 = NaN``). The program checks this on every device: the padded computation
equals the unpadded one at the real rows (outputs and gradients), with zero pad rows and with the input
pad rows poisoned (finite garbage).

Prints ``JAX sharded grad check PASS|FAIL ...``; exit status 1 on FAIL. ``--out`` writes a JSON result file.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time

import numpy as np

from benchmarks import dp_scans

LAYERS = (("enc", "subm0"), ("down", "down"), ("mid", "subm1"), ("up", "up"), ("head", "subm0"))
LEVELS = {"subm0": (0, 0), "down": (0, 1), "subm1": (1, 1), "up": (1, 0)}  # map -> (input, output) level
POISON = 1e3  # finite garbage in input pad rows for the padding check (NaN would survive 0 * NaN)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def level_maps(coords):
    """The four core kernel maps of the UNet for one coords array (NumPy int32 ``[N, 4]``) and the row
    counts of its two levels."""
    import sparsevox as sv
    v0 = sv.Voxels(coords, None)
    maps = {"subm0": sv.kernel_map(v0, 3), "down": sv.kernel_map(v0, 2, stride=2)}
    v1 = sv.Voxels(maps["down"].out_coords, None)
    maps["subm1"] = sv.kernel_map(v1, 3)
    maps["up"] = sv.kernel_map(v1, 2, stride=2, transposed=True, output_voxels=v0)
    return maps, (len(coords), maps["down"].num_out)


def pad_plan(rows, maps, multiple: int):
    """Common padded sizes over devices.

    Args:
        rows: per device ``(N0, N1)``; maps: per device ``{name: KernelMap}``; multiple: round-up unit.
    Returns ``(n_pad (N0_pad, N1_pad), counts {name: [K] padded pairs per offset})``.
    """
    n_pad = tuple(_round_up(max(r[lv] for r in rows) + 1, multiple) for lv in (0, 1))
    counts = {}
    for name in LEVELS:
        per = np.stack([np.diff(m[name].offsets_host) for m in maps])  # [D, K]
        counts[name] = np.array([_round_up(int(c), multiple) for c in per.max(0)], np.int64)
    return n_pad, counts


def pad_map(kmap, counts, dummy_in: int, dummy_out: int):
    """One device's map with offset ``k`` padded to ``counts[k]`` pairs of ``(dummy_in, dummy_out)``.

    Returns ``(in_maps int32 [L], out_maps int32 [L], offsets int64 [K + 1])``, L = ``counts.sum()``."""
    off = kmap.offsets_host
    if np.any(np.diff(off) > counts):
        raise ValueError("counts must be >= the map's own pair count at every offset")
    new_off = np.concatenate([[0], np.cumsum(counts)])
    ins = np.full(int(new_off[-1]), dummy_in, np.int32)
    outs = np.full(int(new_off[-1]), dummy_out, np.int32)
    src_in, src_out = np.asarray(kmap.in_maps), np.asarray(kmap.out_maps)
    for k in range(len(counts)):
        a, b, c = int(off[k]), int(off[k + 1]), int(new_off[k])
        ins[c:c + b - a], outs[c:c + b - a] = src_in[a:b], src_out[a:b]
    return ins, outs, new_off


def pad_device(scan, maps, rows, n_pad, counts, np_dtype, pad_value=0.0):
    """One device's padded arrays: feats ``[N0_pad, C]``, target/weight ``[N0_pad]``, masks, maps."""
    _, feats, target = scan
    n0 = rows[0]
    f = np.full((n_pad[0], feats.shape[1]), pad_value, np_dtype)
    f[:n0] = feats
    t = np.zeros(n_pad[0], np_dtype)
    t[:n0] = target
    w = np.zeros(n_pad[0], np_dtype)
    w[:n0] = 1.0 / n0  # the scan's mean
    masks = tuple(np.arange(n_pad[lv]) < rows[lv] for lv in (0, 1))
    pm = {}
    for name, (li, lo) in LEVELS.items():
        pm[name] = pad_map(maps[name], counts[name], n_pad[li] - 1, n_pad[lo] - 1)
    return f, t, w, masks, pm


# --- the model ------------------------------------------------------------------------------------

def init_params(seed: int, c: int, np_dtype):
    """``{layer: {"weight": [K, C_in, C_out], "bias": [C_out]}}`` NumPy, Kaiming-uniform like
    ``sparsevox.adapters.jax.init_conv`` (drawn with NumPy: ten tiny jitted RNG calls cost seconds)."""
    rng = np.random.default_rng(seed)
    shapes = {"enc": (dp_scans.C_IN, c, 3), "down": (c, 2 * c, 2), "mid": (2 * c, 2 * c, 3),
              "up": (2 * c, c, 2), "head": (c, 1, 3)}
    params = {}
    for name, (ci, co, ks) in shapes.items():
        bound = 1.0 / np.sqrt(ci * ks ** 3)
        params[name] = {"weight": rng.uniform(-bound, bound, (ks ** 3, ci, co)).astype(np_dtype),
                        "bias": rng.uniform(-bound, bound, co).astype(np_dtype)}
    return params


def forward(params, feats, kmaps, masks=None, algo=None):
    """The UNet of ``benchmarks/ddp.py`` in JAX; ``masks`` (level-0, level-1 bool rows) zero pad rows;
    ``algo``: fwd and bwd algorithm (None: the environment, else auto)."""
    import jax
    import jax.numpy as jnp
    import sparsevox.adapters.jax as svj

    def keep(x, level):
        return x if masks is None else jnp.where(masks[level][:, None], x, 0)

    def conv(name, x):
        return svj.apply_conv(params[name], x, kmaps[dict(LAYERS)[name]], algo, algo)

    relu = jax.nn.relu
    x0 = keep(relu(conv("enc", feats)), 0)
    x1 = keep(relu(conv("down", x0)), 1)
    x1 = keep(relu(conv("mid", x1)), 1)
    u = keep(relu(conv("up", x1)), 0)
    return conv("head", u + x0)


def weighted_loss(params, feats, target, weight, kmaps, masks=None, algo=None):
    """``sum_i weight_i (out_i - target_i)^2`` (weight = 1/N of the row's scan, 0 on pad rows)."""
    out = forward(params, feats, kmaps, masks, algo)
    return (weight * (out[:, 0] - target) ** 2).sum()


# --- the program ----------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--platform", choices=("cpu", "gpu"), default=None, help="default: JAX's default backend")
    ap.add_argument("--devices", type=int, default=None, help="how many devices (default: all; cpu: 2 faked)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    ap.add_argument("--crop", type=float, default=8.0, help="|x|, |y| < crop metres")
    ap.add_argument("--voxel", type=float, default=0.1, help="voxel size, metres")
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--pad-multiple", type=int, default=8, help="round padded rows and pairs up to this")
    ap.add_argument("--algo", default=None, help="fwd and bwd algorithm (default: the environment, else auto)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--out", default=None, help="write a JSON result file here")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.pad_multiple < 1 or (args.devices is not None and args.devices < 1):
        ap.error("--steps, --pad-multiple and --devices must be >= 1")
    return args


def _setup_env(args) -> None:
    """Environment that must be set before jax is imported."""
    if args.platform == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            flags += f" --xla_force_host_platform_device_count={args.devices or 2}"
        # fake host devices are threads of one process: on a loaded 2-core machine one can reach a psum
        # 40 s (XLA's default) before the other, and XLA then aborts the process
        for flag in ("xla_cpu_collective_call_terminate_timeout_seconds", "xla_cpu_collective_timeout_seconds"):
            if flag not in flags:
                flags += f" --{flag}=300"
        os.environ["XLA_FLAGS"] = flags.strip()
    elif args.platform == "gpu":
        os.environ.setdefault("JAX_PLATFORMS", "cuda")
    # the kernels' scratch comes from CuPy's pool: leave it room beside XLA's
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off (XLA's collectives use NCCL on GPUs)


def _shard_map():
    import jax
    if hasattr(jax, "shard_map"):
        return jax.shard_map, {"check_vma": False}
    from jax.experimental.shard_map import shard_map
    return shard_map, {"check_rep": False}


def main(argv=None) -> int:
    args = parse_args(argv)
    _setup_env(args)
    import jax
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import sparsevox.adapters.jax as svj

    devices = jax.devices()
    if args.devices is not None:
        if len(devices) < args.devices:
            raise SystemExit(f"jax_sharded: --devices {args.devices} but JAX sees {len(devices)}: {devices}")
        devices = devices[:args.devices]
    n_dev = len(devices)
    np_dtype, dtype = np.dtype(args.dtype), jnp.dtype(args.dtype)
    tol = dp_scans.TOL[args.dtype]

    scans = [dp_scans.scan(seed=d, crop=args.crop, voxel=args.voxel) for d in range(n_dev)]
    built = [level_maps(s[0]) for s in scans]
    maps, rows = [b[0] for b in built], [b[1] for b in built]
    n_pad, counts = pad_plan(rows, maps, args.pad_multiple)
    padded = [pad_device(s, m, r, n_pad, counts, np_dtype) for s, m, r in zip(scans, maps, rows)]
    offsets = {name: tuple(int(v) for v in np.concatenate([[0], np.cumsum(counts[name])])) for name in LEVELS}
    sizes = {name: (n_pad[li], n_pad[lo]) for name, (li, lo) in LEVELS.items()}

    mesh = Mesh(np.array(devices), ("d",))
    shard = NamedSharding(mesh, P("d"))

    def stacked(get):
        return jax.device_put(np.stack([get(p) for p in padded]), shard)

    batch = {"feats": stacked(lambda p: p[0]), "target": stacked(lambda p: p[1]), "weight": stacked(lambda p: p[2]),
             "m0": stacked(lambda p: p[3][0]), "m1": stacked(lambda p: p[3][1]),
             "in": {n: stacked(lambda p, n=n: p[4][n][0]) for n in LEVELS},
             "out": {n: stacked(lambda p, n=n: p[4][n][1]) for n in LEVELS}}

    def local(params, b):
        kmaps = {n: svj.JaxKernelMap(b["in"][n][0], b["out"][n][0], offsets[n], *sizes[n]) for n in LEVELS}
        loss, g = jax.value_and_grad(weighted_loss)(params, b["feats"][0], b["target"][0], b["weight"][0],
                                                    kmaps, (b["m0"][0], b["m1"][0]), args.algo)
        # each device's loss is its scan's mean; the global loss is the mean over devices
        return jax.lax.psum(loss, "d") / n_dev, jax.tree_util.tree_map(lambda x: jax.lax.psum(x, "d") / n_dev, g)

    smap, smap_kw = _shard_map()
    grad_step = smap(local, mesh=mesh, in_specs=(P(), P("d")), out_specs=(P(), P()), **smap_kw)

    @jax.jit
    def train_step(params, b):
        loss, g = grad_step(params, b)
        return loss, g, jax.tree_util.tree_map(lambda p, gi: p - args.lr * gi, params, g)

    # Load sparsevox's algorithm registry here, on one thread. The devices' callbacks run on parallel
    # threads, and a first use of the registry from two threads at once can see it half-loaded
    # (AlgorithmUnavailableError on one device, which then never reaches the psum: a hang). Reported as
    # a core bug (sparsevox/tuning/registry.py _load_backends is not thread-safe); tests/test_multigpu.py has
    # the reproducer.
    from sparsevox.tuning import registry
    registry.algorithms("conv")

    params0 = jax.device_put(init_params(0, args.channels, np_dtype), NamedSharding(mesh, P()))
    params, losses, step_ms, grads0 = params0, [], [], None
    for step in range(args.steps):
        t0 = time.perf_counter()
        loss, g, params = train_step(params, batch)
        jax.block_until_ready(params)
        step_ms.append((time.perf_counter() - t0) * 1e3)
        losses.append(float(loss))
        if step == 0:
            grads0 = jax.tree_util.tree_map(np.asarray, g)

    ref = _reference(params0, scans, devices[0], dtype, args.algo)
    pad_check = _padding_check(params0, scans, maps, rows, n_pad, counts, offsets, sizes, devices, np_dtype,
                               args.algo)
    names = sorted(ref["grads"])
    per = {n: dp_scans.rel_err(grads0[n[0]][n[1]], ref["grads"][n]) for n in names}
    glob = dp_scans.rel_err(np.concatenate([grads0[n[0]][n[1]].ravel() for n in names]),
                            np.concatenate([ref["grads"][n].ravel() for n in names]))
    sep = ref["rel_union_vs_scan0"]
    pad_worst = max(v for c in pad_check for k, v in c.items() if k.endswith(("_out", "_grad")))
    ok = (max(per.values()) <= tol and abs(losses[0] - ref["loss"]) <= tol * abs(ref["loss"])
          and pad_worst <= tol and (n_dev == 1 or sep > 100 * tol))
    line = (f"JAX sharded grad check {'PASS' if ok else 'FAIL'}: devices={n_dev} ({devices[0].platform}) "
            f"dtype={args.dtype} voxels/device={[r[0] for r in rows]} padded to {n_pad[0]} (level 1 {n_pad[1]}) "
            f"| max param rel err={max(per.values()):.2e} (global {glob:.2e}, tol {tol:.0e}) "
            f"| padded-vs-unpadded (zero / poisoned pad rows) worst={pad_worst:.1e} "
            f"| union vs scan-0-only grads differ by {sep:.2e} | losses={['%.5f' % x for x in losses]}")
    print(line, flush=True)
    if args.out:
        pad_pairs = {n: int(counts[n].sum()) for n in LEVELS}
        real_pairs = [{n: m[n].num_pairs for n in LEVELS} for m in maps]
        record = {"op": "jax_sharded_grad_check", "pass": ok, "summary": line, "devices": [str(d) for d in devices],
                  "platform": devices[0].platform, "dtype": args.dtype, "steps": args.steps, "crop_m": args.crop,
                  "voxel_m": args.voxel, "channels": args.channels, "algo": args.algo, "tolerance": tol,
                  "pad_multiple": args.pad_multiple, "rows": rows, "rows_padded": n_pad,
                  "pairs_padded": pad_pairs, "pairs_real": real_pairs, "rel_err_max": max(per.values()),
                  "rel_err_global": glob, "rel_err_per_param": {"/".join(n): v for n, v in per.items()},
                  "rel_union_vs_scan0": sep, "loss0": losses[0], "reference_loss": ref["loss"],
                  "padding_check": pad_check, "losses": losses, "step_ms": step_ms, "jax": jax.__version__,
                  "time": datetime.datetime.now().isoformat(timespec="seconds")}
        from benchmarks import provenance
        name = getattr(devices[0], "device_kind", devices[0].platform)
        with open(args.out, "w") as f:
            json.dump({**provenance.header(name), "records": [record]}, f, indent=1, default=str)
    return 0 if ok else 1


def _reference(params0, scans, device, dtype, algo):
    """Loss and gradients over the union of the scans on one device (batch column = device index), and
    how far the gradients of scan 0 alone are from them."""
    import jax
    import sparsevox.adapters.jax as svj

    def run(subset):
        coords, feats, target, batch = dp_scans.union(subset)
        with jax.default_device(device):
            core, _ = level_maps(coords)
            kmaps = {n: svj.JaxKernelMap.from_core(m) for n, m in core.items()}
            counts = np.bincount(batch, minlength=len(subset))
            w = 1.0 / (len(subset) * counts[batch])
            args = [jax.device_put(np.asarray(a, dtype), device) for a in (feats, target, w)]
            p = jax.device_put(params0, device)
            loss, g = jax.jit(jax.value_and_grad(weighted_loss), static_argnums=6)(p, *args, kmaps, None, algo)
        return float(loss), {(a, b): np.asarray(v) for a, d in g.items() for b, v in d.items()}

    loss, grads = run(scans)
    _, g0 = run(scans[:1])
    names = sorted(grads)
    sep = dp_scans.rel_err(np.concatenate([g0[n].ravel() for n in names]),
                           np.concatenate([grads[n].ravel() for n in names]))
    return {"loss": loss, "grads": grads, "rel_union_vs_scan0": sep}


def _padding_check(params0, scans, maps, rows, n_pad, counts, offsets, sizes, devices, np_dtype, algo):
    """Per device: the padded computation equals the unpadded one at the real rows (outputs, gradients).

    Two variants: pad rows zero with the run's algorithms (what training does), and pad rows poisoned
    with finite garbage. The poisoned variant pins ``explicit_gemm``: padded pairs repeat one (in, out)
    pair within an offset, and algorithms may sum such repeats differently into the (discarded) dummy
    row; under autotuning that difference would make the tuner drop a correct candidate.
    """
    import jax
    import sparsevox.adapters.jax as svj

    def out_and_grads(p, f, t, w, kmaps, masks, algo):
        grads = jax.grad(weighted_loss)(p, f, t, w, kmaps, masks, algo)
        return forward(p, f, kmaps, masks, algo), grads

    fn = jax.jit(out_and_grads, static_argnums=6)
    result = []
    for d, (s, m, r) in enumerate(zip(scans, maps, rows)):
        dev = devices[d]
        n0 = r[0]
        entry = {"device": str(dev), "pad_pairs": int(sum(int(c.sum()) for c in counts.values()) - m_pairs(m))}
        with jax.default_device(dev):
            put = functools.partial(jax.device_put, device=dev)
            p = put(params0)
            exact = {n: svj.JaxKernelMap.from_core(k) for n, k in m.items()}
            for variant, pad_value, a in (("zero", 0.0, algo), ("poisoned", POISON, "explicit_gemm")):
                plain = fn(p, put(s[1].astype(np_dtype)), put(s[2].astype(np_dtype)),
                           put(np.full(n0, 1.0 / n0, np_dtype)), exact, None, a)
                f, t, w, masks, pm = pad_device(s, m, r, n_pad, counts, np_dtype, pad_value=pad_value)
                kmaps = {n: svj.JaxKernelMap(put(pm[n][0]), put(pm[n][1]), offsets[n], *sizes[n]) for n in LEVELS}
                padded = fn(p, put(f), put(t), put(w), kmaps, tuple(put(x) for x in masks), a)
                entry[f"{variant}_out"] = dp_scans.rel_err(np.asarray(padded[0])[:n0], np.asarray(plain[0]))
                entry[f"{variant}_grad"] = max(dp_scans.rel_err(np.asarray(x), np.asarray(y)) for x, y in
                                               zip(jax.tree_util.tree_leaves(padded[1]),
                                                   jax.tree_util.tree_leaves(plain[1])))
        result.append(entry)
    return result


def m_pairs(m) -> int:
    return sum(k.num_pairs for k in m.values())


if __name__ == "__main__":
    sys.exit(main())
