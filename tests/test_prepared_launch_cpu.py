"""The host-side rules of prepared launches and live-map lookups, on the CPU (no kernel runs here)."""
import ctypes
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from reference import random_voxels

import sparsevox as sv
from sparsevox import conv
from sparsevox.algorithms.implicit_gemm import Launch
from sparsevox.kernel_map import live_map, recall, recall_stats


class _FakeKernel:
    def __init__(self):
        self.calls = []

    def __call__(self, grid, block, args, shared_mem=0):
        self.calls.append((grid, block, args, shared_mem))


def test_launch_fills_the_address_holes_of_every_step():
    k1, k2 = _FakeKernel(), _FakeKernel()
    prep = Launch([(k1, 7, 128, 1024, (None, None, 99, None, np.int32(3))),
                   (k2, 9, 64, 0, (None, None, 98, None, np.int32(4)))], (0, 1, 3), False, (10, 4))
    assert prep.launch(16, 32, 48)
    assert k1.calls == [((7,), (128,), (16, 32, 99, 48, np.int32(3)), 1024)]
    assert k2.calls == [((9,), (64,), (16, 32, 98, 48, np.int32(4)), 0)]
    assert prep.out_shape == (10, 4)


def test_epilogue_goes_to_the_last_step_of_a_fusable_launch_only():
    from sparsevox.algorithms.implicit_gemm import EPILOGUE_ARGS, NO_EPILOGUE, epilogue_args
    k1, k2 = _FakeKernel(), _FakeKernel()
    steps = [(k1, 7, 128, 0, (None, None, 99, None, np.int32(0)) + NO_EPILOGUE),
             (k2, 7, 128, 0, (None, None, 98, None, np.int32(1)) + NO_EPILOGUE)]  # a mask split's two passes
    ep = epilogue_args(0x100, 0x200, 0x300, 0, 0x400, 1e-5, True)
    assert ep == (0x100, 0x200, 0x300, 0, 0x400, np.float64(1e-5), np.int32(1)) and len(ep) == EPILOGUE_ARGS
    prep = Launch(steps, (0, 1, 3), False, (10, 4), fusable=True)
    assert prep.launch(16, 32, 48, epilogue=ep)
    assert k1.calls[0][2][-EPILOGUE_ARGS:] == NO_EPILOGUE  # the first pass stores the plain sum ...
    assert k2.calls[0][2] == (16, 32, 98, 48, np.int32(1)) + ep  # ... the last adds to it, then the epilogue
    assert prep.launch(16, 32, 48) and k2.calls[1][2][-EPILOGUE_ARGS:] == NO_EPILOGUE  # nothing kept
    with pytest.raises(ValueError, match="takes none"):
        Launch(steps, (0, 1, 3), False, (10, 4)).launch(16, 32, 48, epilogue=ep)


@pytest.mark.parametrize("kwargs,match", [(dict(mean=8), "together"), (dict(var=8), "together"),
                                          (dict(weight=8), "need mean"), (dict(bias=8), "need mean")])
def test_epilogue_args_refuses_half_a_batchnorm(kwargs, match):
    from sparsevox.algorithms.implicit_gemm import epilogue_args
    with pytest.raises(ValueError, match=match):
        epilogue_args(**kwargs)
    assert epilogue_args(residual=64, relu=True)[4:] == (64, np.float64(0), np.int32(1))  # residual + ReLU alone


@pytest.mark.parametrize("a,b", [(18, 32), (16, 40), (2, 6)])
def test_vector_launch_refuses_misaligned_inputs(a, b):
    k = _FakeKernel()
    prep = Launch([(k, 1, 32, 0, (None, None, None))], (0, 1, 2), True, (1, 1))
    assert prep.launch(a, b, 64) is False and k.calls == []
    scalar = Launch([(k, 1, 32, 0, (None, None, None))], (0, 1, 2), False, (1, 1))
    assert scalar.launch(a, b, 64) is True and len(k.calls) == 1  # scalar loads take any address


def test_prepared_is_none_on_the_cpu_and_before_any_plan(rng):
    c = random_voxels(rng, 50, extent=5)
    v = sv.Voxels(c, np.zeros((len(c), 4), np.float32))
    kmap = sv.kernel_map(v, 3)
    f = rng.standard_normal((len(c), 4)).astype(np.float32)
    w = rng.standard_normal((27, 4, 3)).astype(np.float32)
    assert conv.prepared("conv", "fwd", f, w, kmap, None) is None  # no plan yet: nothing to hand out
    sv.conv_forward(f, w, kmap)
    assert conv.prepared("conv", "fwd", f, w, kmap, None) is None  # CPU arrays: no GPU launch
    assert conv.prepared("depthwise", "fwd", f, w[:, :, 0], kmap, None) is None
    assert conv.plan("conv", "dgrad", f, w, kmap, None, None, memo_only=True) is None
    conv.remember_prepared(kmap, ("test", 1), "conv", "fwd", f, w, None)
    assert kmap.derived[("test", 1)] is False  # "none for this signature", so adapters do not ask again
    kmap.derived[("test", 1)] = "kept"
    conv.remember_prepared(kmap, ("test", 1), "conv", "fwd", f, w, None)
    assert kmap.derived[("test", 1)] == "kept"  # an existing entry is not recomputed


def test_live_map_by_address_and_empty_maps(rng):
    c = random_voxels(rng, 50, extent=5)
    kmap = sv.kernel_map(sv.Voxels(c, None), 3)
    a, b = kmap.in_maps.ctypes.data, kmap.out_maps.ctypes.data
    hits = recall_stats["hits"]
    assert live_map(a, b, kmap.num_pairs, kmap.num_in, kmap.num_out) is kmap
    assert recall_stats["hits"] == hits + 1
    assert live_map(a, b, kmap.num_pairs, kmap.num_in + 1, kmap.num_out) is None  # other sizes: not this map
    assert live_map(b, a, kmap.num_pairs, kmap.num_in, kmap.num_out) is None
    # empty maps share address 0 whatever their offsets: never matched, always wrapped anew
    assert live_map(0, 0, 0, 5, 5) is None
    empty = recall(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(9, np.int64), 5, 5)
    assert empty.num_offsets == 8 and empty.num_pairs == 0


def test_kmap_items_override_is_range_checked():
    env = dict(os.environ, SPARSEVOX_KMAP_ITEMS="0")
    p = subprocess.run([sys.executable, "-c", "import sparsevox.cuda.gpu_kernel_map"], env=env, capture_output=True,
                       text=True)
    assert p.returncode != 0 and "SPARSEVOX_KMAP_ITEMS must be in [1, 16], got 0" in p.stderr
    env["SPARSEVOX_KMAP_ITEMS"] = "4"
    p = subprocess.run([sys.executable, "-c", "import sparsevox.cuda.gpu_kernel_map as g; print(g.ITEMS)"], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "4"


# --- the driver path (Launch.launch with a stream), against a fake CUDA driver ---------------------

def _cupy_bytes(v) -> bytes:
    """The bytes CuPy's RawKernel call passes for argument ``v`` (cupy/cuda/function.pyx ``_pointer``)."""
    if isinstance(v, np.generic):
        return v.tobytes()
    if isinstance(v, float):
        return np.float64(v).tobytes()
    return np.int64(v).tobytes()


class _DriverKernel(_FakeKernel):
    """A RawKernel stand-in with a CUfunction handle (``kernel.ptr``) and its argument count."""

    def __init__(self, ptr, n_args):
        super().__init__()
        self.ptr, self.n_args, self.loads = ptr, n_args, 0

    @property
    def kernel(self):
        self.loads += 1
        return types.SimpleNamespace(ptr=self.ptr)


@pytest.fixture
def fake_driver(monkeypatch):
    """Record driver launches (reading each argument's bytes back through the parameter array at launch
    time, as cuLaunchKernel copies them) and fake the CUDA calls the driver path makes."""
    cupy = pytest.importorskip("cupy")
    from cupy_backends.cuda.api import driver
    rec = types.SimpleNamespace(launches=[], kernels={}, devices=[], context=1, mem_info=0)

    def launch_kernel(func, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        n = rec.kernels[func].n_args
        if params:  # an array of pointers to each argument
            ptrs = (ctypes.c_void_p * n).from_address(params)
            args = [ctypes.string_at(p, 8) for p in ptrs]
        else:  # one buffer through extra (CU_LAUNCH_PARAM_BUFFER_POINTER, _SIZE, _END): split by _assert_args
            ext = (ctypes.c_void_p * 5).from_address(extra)
            assert (ext[0], ext[2], ext[4]) == (1, 2, None)
            args = ctypes.string_at(ext[1], ctypes.c_size_t.from_address(ext[3]).value)
        rec.launches.append(dict(func=func, grid=(gx, gy, gz), block=(bx, by, bz), smem=smem, stream=stream,
                                 args=args))

    class Device:
        def __init__(self, dev):
            rec.devices.append(dev)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def mem_get_info():
        rec.mem_info += 1
        rec.context = 1

    monkeypatch.setattr(driver, "launchKernel", launch_kernel)
    monkeypatch.setattr(driver, "ctxGetCurrent", lambda: rec.context)
    monkeypatch.setattr(cupy.cuda, "Device", Device)
    monkeypatch.setattr(cupy.cuda.runtime, "getDevice", lambda: 3)
    monkeypatch.setattr(cupy.cuda.runtime, "memGetInfo", mem_get_info)

    def kernel(ptr, n_args):
        k = _DriverKernel(ptr, n_args)
        rec.kernels[ptr] = k
        return k
    rec.kernel = kernel
    return rec


def _assert_args(launch, template, holes, a, b, out):
    want = list(template)
    for h, v in zip(holes, (a, b, out)):
        want[h] = v
    got_args = launch["args"]
    if isinstance(got_args, bytes):  # a packed buffer: each argument at an offset aligned to its size (C)
        buf, got_args, offset = got_args, [], 0
        for v in want:
            size = len(_cupy_bytes(v))
            offset = -(-offset // size) * size
            got_args.append(buf[offset:offset + size])
            offset += size
        assert len(buf) >= offset
    for i, (got, v) in enumerate(zip(got_args, want)):
        expect = _cupy_bytes(v)
        assert got[:len(expect)] == expect, f"argument {i} ({v!r}): {got[:len(expect)]!r} != {expect!r}"


ARG_KINDS = (None, None, 0x7F00_0000_1200, np.int32(-3), np.uint32(0xFFFF_FFF0), np.int64(-(1 << 40)),
             np.uint64((1 << 63) + 5), np.float32(1.5), np.float64(-2.25), 2.5, None, np.int16(-7), np.uint8(200),
             np.bool_(True), np.int32(0))


def test_driver_launch_packs_every_argument_as_cupy_passes_it(fake_driver):
    k = fake_driver.kernel(0xF00D, len(ARG_KINDS))
    prep = Launch([(k, 7, 128, 2048, ARG_KINDS)], (0, 1, 10), False, (4, 4), device_id=1)
    assert prep.launch(0x1000, 0x2000, 0x3000, stream=0x5151)
    (got,) = fake_driver.launches
    assert (got["func"], got["grid"], got["block"], got["smem"], got["stream"]) == \
        (0xF00D, (7, 1, 1), (128, 1, 1), 2048, 0x5151)
    _assert_args(got, ARG_KINDS, (0, 1, 10), 0x1000, 0x2000, 0x3000)
    assert k.calls == []  # nothing went through CuPy's launch
    assert fake_driver.devices == [1]  # the handle was looked up on the launch's device


def test_driver_launch_fills_the_holes_per_call_and_packs_once(fake_driver):
    args1 = (None, None, 99, None, np.int32(3))
    args2 = (None, None, 98, None, np.int32(4))
    k1, k2 = fake_driver.kernel(0xA1, 5), fake_driver.kernel(0xA2, 5)
    prep = Launch([(k1, 7, 128, 1024, args1), (k2, 0, 64, 0, args2)], (0, 1, 3), False, (10, 4))
    for a, b, out, stream in ((16, 32, 48, 0), (160, 320, 480, 7)):
        fake_driver.launches.clear()
        assert prep.launch(a, b, out, stream)
        first, second = fake_driver.launches
        assert (first["func"], first["grid"], first["block"], first["smem"], first["stream"]) == \
            (0xA1, (7, 1, 1), (128, 1, 1), 1024, stream)
        # a grid of 0 launches one block, as through CuPy (its launcher takes max(1, dim))
        assert (second["func"], second["grid"], second["block"], second["smem"]) == (0xA2, (1, 1, 1), (64, 1, 1), 0)
        _assert_args(first, args1, (0, 1, 3), a, b, out)
        _assert_args(second, args2, (0, 1, 3), a, b, out)
    assert (k1.loads, k2.loads) == (1, 1)  # function handles and parameter layouts are made once
    again = Launch([(k1, 5, 128, 1024, (None, None, 97, None, np.int32(5)))], (0, 1, 3), False, (10, 4))
    fake_driver.launches.clear()
    assert again.launch(1, 2, 3, 0)  # a fresh map's Launch of the same kernel: its layout is reused
    _assert_args(fake_driver.launches[0], (None, None, 97, None, np.int32(5)), (0, 1, 3), 1, 2, 3)
    assert k1.loads == 1
    # device_id None: the current device at the first driver launch, one handle lookup per kernel function
    assert fake_driver.devices == [3, 3]


def test_driver_launch_refuses_misaligned_inputs_and_establishes_a_context(fake_driver):
    k = fake_driver.kernel(0xB0, 3)
    prep = Launch([(k, 1, 32, 0, (None, None, None))], (0, 1, 2), True, (1, 1))
    assert prep.launch(18, 32, 64, stream=0) is False and fake_driver.launches == []
    fake_driver.context = 0  # a thread that has not used the CUDA runtime yet
    assert prep.launch(16, 32, 64, stream=0) is True and len(fake_driver.launches) == 1
    assert fake_driver.mem_info == 1
    assert prep.launch(16, 32, 64, stream=0) and fake_driver.mem_info == 1  # only when none is current


def test_driver_launch_rejects_an_argument_it_cannot_type(fake_driver):
    k = fake_driver.kernel(0xC0, 4)
    prep = Launch([(k, 1, 32, 0, (None, None, None, "3"))], (0, 1, 2), False, (1, 1))
    with pytest.raises(TypeError, match="unsupported type str"):
        prep.launch(16, 32, 64, stream=0)


class _Dev:
    """A CuPy array stand-in: an address and a shape."""

    def __init__(self, ptr, shape=(1,)):
        self.data, self.shape = types.SimpleNamespace(ptr=ptr), shape


@pytest.mark.parametrize("direction,params", [("fwd", {}), ("fwd", {"mask_split": 2}), ("dgrad", {"mask_split": 3}),
                                              ("wgrad", {"gemm_block_size": 64, "split_k_factor": 2})])
def test_driver_launch_of_the_implicit_gemm_launches(fake_driver, monkeypatch, direction, params):
    """The argument tuples implicit_gemm builds (forward/dgrad, mask splits, weight gradient) pack and
    read back as CuPy would pass them."""
    from sparsevox.algorithms import implicit_gemm as ig
    made = []

    def kernel(kind, dt, bm, bn, vec, device_id, variant=None, tf32x3=False):
        k = fake_driver.kernel(0xE000 + len(made), 19 if kind == "fwd" else 8)
        made.append(k)
        return k, 128, 4096
    ptrs = iter(range(0x10_0000, 0x20_0000, 0x100))
    monkeypatch.setattr(ig, "_kernel", kernel)
    monkeypatch.setattr(ig, "_sm_count", lambda dev: 132)
    monkeypatch.setattr(ig, "slot_table", lambda kmap, rev, sort, part=None: (_Dev(next(ptrs)), _Dev(next(ptrs))))
    monkeypatch.setattr(ig, "tile_masks", lambda kmap, rev, bm, sort, part=None: _Dev(next(ptrs), (9, 1)))
    monkeypatch.setattr(ig, "wgrad_chunks", lambda kmap, chunk: (_Dev(next(ptrs)), 11))
    kmap = types.SimpleNamespace(num_in=500, num_out=400, num_pairs=3000, num_offsets=27, derived={},
                                 in_maps=_Dev(0xAAA0), out_maps=_Dev(0xBBB0), kind="strided",
                                 kernel_size=(3, 3, 3), stride=(2, 2, 2), dilation=(1, 1, 1))
    prep = ig.prepare(direction, "float16", 32, 64, kmap, 2, **params)
    assert prep.device_id == 2
    assert prep.fusable == (direction == "fwd")  # dgrad runs the same kernel, but nothing follows it in a network
    ep = ig.epilogue_args(0x5_0000, 0x6_0000, 0, 0, 0x7_0000, 1e-3, True) if prep.fusable else None
    assert prep.launch(0x1_0000, 0x2_0000, 0x3_0000, stream=0x77, epilogue=ep)
    assert len(fake_driver.launches) == len(prep.steps) == params.get("mask_split", 1)
    for s, (got, (fn, grid, block, smem, template)) in enumerate(zip(fake_driver.launches, prep.steps)):
        assert (got["func"], got["grid"], got["block"], got["smem"], got["stream"]) == \
            (fn.ptr, (grid, 1, 1), (block, 1, 1), smem, 0x77)
        if ep is not None and s == len(prep.steps) - 1:
            template = template[:-ig.EPILOGUE_ARGS] + ep
        _assert_args(got, template, prep.holes, 0x1_0000, 0x2_0000, 0x3_0000)
    assert fake_driver.devices == [2]


def test_hold_from_a_del_inside_the_pruning_neither_hangs_nor_lets_go():
    """A Hold dropped while release_held prunes (the cyclic GC can run a __del__ there, on the thread that
    holds the lock) must not wait for that lock (a hang), and its objects must stay held until their
    event is done."""
    import gc
    import threading
    import weakref

    from sparsevox import _arrays

    class Event:
        done = False

    class Obj:
        pass
    inner_ev, inner = Event(), Obj()
    r_inner = weakref.ref(inner)
    box = [_arrays.Hold(inner_ev, (inner,))]
    del inner

    class DropsTheHold:  # not done when held; while being pruned (lock held) it drops the Hold
        calls = 0

        @property
        def done(self):
            self.calls += 1
            if self.calls == 1:
                return False
            box.clear()
            return True
    t = threading.Thread(target=_arrays.hold_until_done, args=(DropsTheHold(), ()), daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive(), "hold_until_done re-entered from a __del__ hung on its lock"
    gc.collect()
    assert r_inner() is not None  # still held: its event is not done
    inner_ev.done = True
    _arrays.release_held()
    gc.collect()
    assert r_inner() is None


def test_used_maps_are_freed_with_their_voxels(rng):
    """Nothing global keeps a map alive once its Voxels are gone (a global plan memo holding maps kept
    every fresh scan's map and tables: device memory grew each training step): core and torch calls."""
    import gc
    import weakref

    import torch

    from sparsevox.adapters import torch as svt
    coords = random_voxels(rng, 300, extent=8, batches=1)
    feats = rng.standard_normal((len(coords), 3))
    w = rng.standard_normal((27, 3, 2))
    refs = []
    for _ in range(3):
        v = sv.Voxels(coords, feats)
        kmap = sv.kernel_map(v, 3)
        sv.conv_forward(feats, w, kmap)
        sv.conv_backward(rng.standard_normal((len(coords), 2)), feats, w, kmap)
        refs.append(weakref.ref(kmap))
        tv = sv.Voxels(torch.from_numpy(coords), torch.from_numpy(feats).requires_grad_(True))
        out = svt.spatially_sparse_conv(tv, torch.from_numpy(w), 3)
        out.feats.sum().backward()
        refs.append(weakref.ref(sv.kernel_map(tv, 3)))
        del v, kmap, tv, out
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)


def test_hold_until_done_keeps_objects_until_their_event():
    """Objects that queued work still uses (pinned buffers, a table) outlive their owner until the event
    after that work is done, and are let go afterwards, also through Hold's __del__."""
    import gc
    import weakref

    from sparsevox import _arrays

    class Event:
        done = False

    class Obj:
        pass
    ev, a, b = Event(), Obj(), Obj()
    ra, rb = weakref.ref(a), weakref.ref(b)
    _arrays.hold_until_done(ev, (a,))
    h = _arrays.Hold(ev, (b,))
    del a, b, h
    gc.collect()
    assert ra() is not None and rb() is not None
    ev.done = True
    _arrays.release_held()
    gc.collect()
    assert ra() is None and rb() is None
    done, c = Event(), Obj()
    done.done = True
    rc = weakref.ref(c)
    _arrays.hold_until_done(done, (c,))
    del c
    assert rc() is None  # nothing to wait for: not held


def test_driver_kernel_launches_like_a_raw_kernel_call(fake_driver, monkeypatch):
    """cuda_loader.DriverKernel (slot tables, tile masks, radix sort): CuPy's call convention, the arguments
    packed as CuPy passes them, on CuPy's current stream, the handle looked up once."""
    import cupy

    from sparsevox.cuda.cuda_loader import DriverKernel
    monkeypatch.setattr(cupy.cuda, "get_current_stream", lambda: types.SimpleNamespace(ptr=0x5EA))
    fn = fake_driver.kernel(0xD0, 4)
    k = DriverKernel(fn, 0)
    arr = type("ndarray", (), {"__module__": "cupy._core.core"})()  # what driver.kind() takes for CuPy
    for ptr, n, addr in ((0x4000, 7, 0), (0x8000, 9, 0x1230)):
        arr.data = types.SimpleNamespace(ptr=ptr)
        k((5,), (128,), (arr, np.int32(n), addr, np.uint32(3)), shared_mem=64)
        got = fake_driver.launches[-1]
        assert (got["func"], got["grid"], got["block"], got["smem"], got["stream"]) == \
            (0xD0, (5, 1, 1), (128, 1, 1), 64, 0x5EA)
        _assert_args(got, (ptr, np.int32(n), addr, np.uint32(3)), (), 0, 0, 0)
    # 2-D grids and blocks (the BatchNorm kernel's), on a raw stream handle
    k((7, 3), (4, 64), (arr, np.int32(1), 0, np.uint32(2)), stream=0xBEE)
    got = fake_driver.launches[-1]
    assert (got["grid"], got["block"], got["stream"]) == ((7, 3, 1), (4, 64, 1), 0xBEE)
    assert fn.loads == 1 and fn.calls == []  # nothing through CuPy's launch


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_dgrad_weight_is_one_contiguous_copy_of_the_transposed_and_flipped_weight(flip, dtype):
    """The prepared dgrad's B operand, ``W[K-1-k]^T`` for a mirrored map (else ``W[k]^T``), contiguous, a
    new tensor (the launch must not read the caller's weight in another layout)."""
    torch = pytest.importorskip("torch")
    svt = pytest.importorskip("sparsevox.adapters.torch")
    fn = sys.modules[svt.conv_features.__module__]
    w = torch.randn(27, 5, 7).to(getattr(torch, dtype))
    got = fn._dgrad_weight(w, flip)
    want = (w.flip(0) if flip else w).transpose(1, 2).contiguous()
    assert got.is_contiguous() and got.shape == (27, 7, 5) and got.data_ptr() != w.data_ptr()
    assert torch.equal(got, want)


def test_dgrad_weights_reversed_index_is_not_cached_during_graph_capture(monkeypatch):
    """An index made while a CUDA graph is captured lives in the graph's private pool: not kept for later."""
    torch = pytest.importorskip("torch")
    svt = pytest.importorskip("sparsevox.adapters.torch")
    fn = sys.modules[svt.conv_features.__module__]
    monkeypatch.setattr(fn, "_REVERSED", {})
    w = torch.randn(8, 3, 4)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))  # as on the GPU, for the check
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert torch.equal(fn._dgrad_weight(w, True), w.flip(0).transpose(1, 2).contiguous()) and fn._REVERSED == {}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    fn._dgrad_weight(w, True)
    assert list(fn._REVERSED) == [(8, w.device)]
