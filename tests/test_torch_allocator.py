"""CuPy's allocations through torch's caching allocator (adapters/torch/memory.py): the wiring on the CPU
with a stand-in CuPy, the real thing on the GPU (torch sees the maps' memory, results unchanged)."""
import os
import subprocess
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
svt = pytest.importorskip("sparsevox.adapters.torch")
from sparsevox.adapters.torch import memory  # noqa: E402


class _Pool:
    def malloc(self, size):
        return ("pool", size)


@pytest.fixture
def fake_cupy(monkeypatch):
    """A stand-in ``cupy`` module: its allocator slot, a CFunctionAllocator that calls the C function pointers
    it is given (through ctypes, as CuPy does from Cython) and a current stream; torch's raw allocator entry
    points record their calls."""
    pool = _Pool()
    cuda = types.SimpleNamespace()
    cuda.allocator = pool.malloc

    class CFunctionAllocator:
        def __init__(self, param, malloc_func, free_func, owner):
            self._m, self._f, self.owner = memory._C_MALLOC(malloc_func), memory._C_FREE(free_func), owner
            self.param = param

        def malloc(self, size):  # as CuPy's: no call for zero bytes; the callbacks get the param back
            ptr = (self._m(self.param, size, 0) or 0) if size else 0
            return types.SimpleNamespace(ptr=ptr, free=lambda: self._f(self.param, ptr, 0))

    cuda.memory = types.SimpleNamespace(CFunctionAllocator=CFunctionAllocator)
    cuda.get_allocator = lambda: cuda.allocator
    cuda.set_allocator = lambda a: setattr(cuda, "allocator", a)
    cuda.get_current_stream = lambda: types.SimpleNamespace(ptr=0xABC)
    fake = types.ModuleType("cupy")
    fake.cuda = cuda
    fake.get_default_memory_pool = lambda: pool
    monkeypatch.setitem(sys.modules, "cupy", fake)
    calls = []
    monkeypatch.setattr(torch._C, "_cuda_cudaCachingAllocator_raw_alloc",
                        lambda size, stream: calls.append(("alloc", size, stream)) or 0x1000, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_cudaCachingAllocator_raw_delete",
                        lambda ptr: calls.append(("delete", ptr)), raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(memory, "_state", {})
    return fake, calls


def test_allocations_go_to_torch_on_cupys_stream_and_back(fake_cupy):
    fake, calls = fake_cupy
    default = fake.cuda.get_allocator()
    assert memory.use_torch_allocator(True) is True and memory.torch_allocator_in_use()
    mem = fake.cuda.get_allocator()(256)
    assert mem.ptr == 0x1000 and calls == [("alloc", 256, 0xABC)]
    mem.free()  # what the memory object's __dealloc__ does: the C free callback
    assert calls[-1] == ("delete", 0x1000)
    assert memory.use_torch_allocator(True) is True  # again: no second wrapper
    assert memory.use_torch_allocator(False) is False and fake.cuda.get_allocator() is default
    assert not memory.torch_allocator_in_use()


def test_a_failed_allocation_raises_torchs_error_in_the_caller(fake_cupy, monkeypatch):
    fake, _ = fake_cupy

    def oom(size, stream):
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {size} bytes")
    monkeypatch.setattr(torch._C, "_cuda_cudaCachingAllocator_raw_alloc", oom, raising=False)
    assert memory.use_torch_allocator(True)
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate 4096 bytes"):
        fake.cuda.get_allocator()(4096)
    assert fake.cuda.get_allocator()(0).ptr == 0  # zero bytes: no call, no error
    # a failure left behind (an interrupted call) is not raised for a later allocation: that one's own is
    memory._tls.failure = RuntimeError("stale")
    monkeypatch.setattr(torch._C, "_cuda_cudaCachingAllocator_raw_alloc", lambda size, stream: 0, raising=False)
    memory.use_torch_allocator(False)
    memory.use_torch_allocator(True)  # (the routes read torch's entry points when installed)
    with pytest.raises(MemoryError, match="returned no memory for 64 bytes"):
        fake.cuda.get_allocator()(64)
    memory.use_torch_allocator(False)


def test_callbacks_outlive_every_allocator_and_a_failed_free_is_only_logged(fake_cupy, monkeypatch, caplog):
    fake, calls = fake_cupy
    assert memory.use_torch_allocator(True)
    mem = fake.cuda.get_allocator()(128)
    assert memory.use_torch_allocator(False) is False  # off, the allocator dropped: its memory still frees
    first = memory._ADDRESSES
    assert memory.use_torch_allocator(True) and memory._ADDRESSES == first  # the same callbacks, made once
    mem.free()
    assert calls[-1] == ("delete", 0x1000)

    def broken(ptr):
        raise RuntimeError("CUDA driver shutting down")
    monkeypatch.setattr(torch._C, "_cuda_cudaCachingAllocator_raw_delete", broken, raising=False)
    memory.use_torch_allocator(False)
    memory.use_torch_allocator(True)  # (the routes read torch's entry points when installed)
    mem = fake.cuda.get_allocator()(128)
    with caplog.at_level("WARNING", logger="sparsevox.torch_memory"):
        mem.free()  # no exception escapes the C callback
    assert "could not be given back" in caplog.text
    memory.use_torch_allocator(False)


def test_each_allocator_keeps_its_own_routes(fake_cupy, monkeypatch):
    # one global pair of routes let a second allocator (a stand-in CuPy's, in the GPU suite at 7d24ce6) take
    # over the live one's callbacks: the real allocator then got the stand-in's fake pointers
    fake, calls = fake_cupy
    assert memory.use_torch_allocator(True)
    first = fake.cuda.get_allocator()(64)
    memory.use_torch_allocator(False)
    other = []
    monkeypatch.setattr(torch._C, "_cuda_cudaCachingAllocator_raw_alloc",
                        lambda size, stream: other.append(("alloc", size)) or 0x2000, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_cudaCachingAllocator_raw_delete",
                        lambda ptr: other.append(("delete", ptr)), raising=False)
    assert memory.use_torch_allocator(True)
    second = fake.cuda.get_allocator()(32)
    first.free()
    second.free()
    assert calls == [("alloc", 64, 0xABC), ("delete", 0x1000)]
    assert other == [("alloc", 32), ("delete", 0x2000)]
    memory.use_torch_allocator(False)


def test_a_foreign_allocator_is_left_in_place(fake_cupy):
    fake, _ = fake_cupy
    foreign = lambda size: ("foreign", size)  # noqa: E731
    fake.cuda.set_allocator(foreign)
    with pytest.raises(RuntimeError, match="not its default memory pool"):
        memory.use_torch_allocator(True)
    assert fake.cuda.get_allocator() is foreign
    assert memory.use_torch_allocator(False) is False and fake.cuda.get_allocator() is foreign


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="enabled must be True or False"):
        memory.use_torch_allocator(1)
    env = {**os.environ, "SPARSEVOX_TORCH_ALLOCATOR": "maybe"}
    r = subprocess.run([sys.executable, "-c", "import sparsevox.adapters.torch"], env=env, capture_output=True,
                       text=True)
    assert r.returncode != 0 and "SPARSEVOX_TORCH_ALLOCATOR must be 0 or 1" in r.stderr


@pytest.mark.parametrize("value, wanted", [(None, True), ("", True), ("1", True), ("yes", True), ("0", False),
                                           ("false", False), ("no", False)])
def test_on_by_default_and_off_with_0(monkeypatch, value, wanted):
    monkeypatch.setattr(memory.importlib.util, "find_spec", lambda name: object())
    calls = []
    monkeypatch.setattr(memory, "use_torch_allocator", lambda enabled=True: calls.append(enabled) or enabled)
    if value is None:
        monkeypatch.delenv("SPARSEVOX_TORCH_ALLOCATOR", raising=False)
    else:
        monkeypatch.setenv("SPARSEVOX_TORCH_ALLOCATOR", value)
    memory._from_env()
    assert calls == ([True] if wanted else [])


def test_by_default_a_foreign_allocator_is_a_warning_and_asked_for_an_error(monkeypatch, caplog):
    monkeypatch.setattr(memory.importlib.util, "find_spec", lambda name: object())

    def foreign(enabled=True):
        raise RuntimeError("CuPy's allocator is not its default memory pool")
    monkeypatch.setattr(memory, "use_torch_allocator", foreign)
    monkeypatch.delenv("SPARSEVOX_TORCH_ALLOCATOR", raising=False)
    with caplog.at_level("WARNING", logger="sparsevox.torch_memory"):
        memory._from_env()
    assert "stay in its own pool" in caplog.text
    monkeypatch.setenv("SPARSEVOX_TORCH_ALLOCATOR", "1")
    with pytest.raises(RuntimeError, match="not its default memory pool"):
        memory._from_env()


def test_without_cupy_nothing_is_routed_and_cuda_is_not_initialised(monkeypatch):
    monkeypatch.setattr(memory.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(memory, "use_torch_allocator", lambda enabled=True: pytest.fail("routed without CuPy"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("CUDA queried at import"))
    monkeypatch.delenv("SPARSEVOX_TORCH_ALLOCATOR", raising=False)
    memory._from_env()


@pytest.mark.gpu
def test_torch_sees_the_maps_memory_and_results_do_not_change(rng):
    import cupy
    from reference import random_voxels

    import sparsevox as sv
    coords = torch.from_numpy(random_voxels(rng, 20000, extent=40, batches=2)).cuda()
    feats = torch.randn(len(coords), 32, device="cuda")
    w = torch.randn(27, 32, 32, device="cuda") / 30

    def run():
        v = sv.Voxels(coords.clone(), feats)
        return svt.spatially_sparse_conv(v, w).feats
    was = svt.torch_allocator_in_use()  # (on by default)
    try:
        svt.use_torch_allocator(False)
        ref = run()  # in CuPy's pool
        torch.cuda.synchronize()
        pool = cupy.get_default_memory_pool()
        assert svt.use_torch_allocator(True)
        before_pool = pool.used_bytes()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        got = run()
        torch.cuda.synchronize()
        grew = torch.cuda.max_memory_allocated() - base
        maps = 27 * len(coords) * 4  # at least the neighbour table of the SubM map
        assert grew >= maps, f"torch saw {grew} bytes, the map alone is {maps}"
        assert pool.used_bytes() <= before_pool  # nothing new in CuPy's pool
        np.testing.assert_array_equal(got.cpu().numpy(), ref.cpu().numpy())
    finally:
        svt.use_torch_allocator(was)


@pytest.mark.gpu
def test_memory_freed_by_the_cycle_collector_goes_back_to_torch():
    """A CuPy array that dies in a reference cycle is freed by ``gc.collect``, which clears Python attributes
    before deallocation: with CuPy's PythonFunctionAllocator that lost the free call (and the memory)."""
    import gc

    import cupy
    was = svt.torch_allocator_in_use()
    try:
        assert svt.use_torch_allocator(True)
        gc.collect()  # earlier tests' cyclic garbage first (its memory went below the base at c6a9d98)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        node = {"array": cupy.zeros(1 << 20, dtype=cupy.float32)}
        node["self"] = node  # a cycle: only the cycle collector frees it
        assert torch.cuda.memory_allocated() - base >= 4 << 20
        del node
        gc.collect()
        assert torch.cuda.memory_allocated() == base
    finally:
        svt.use_torch_allocator(was)
