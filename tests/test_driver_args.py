"""sparsevox.cuda.driver.Args (the kernel-map builder's launches): the packed parameter buffer has the C
layout cuLaunchKernel expects (each parameter at an offset aligned to its size), and a launch hands it
to the driver through ``extra`` (CU_LAUNCH_PARAM_BUFFER_POINTER / _SIZE / _END). No GPU needed."""
import ctypes
import types

import numpy as np
import pytest

from sparsevox.cuda import driver

# every kind, with scalars after narrower ones so that padding is needed
ARGS = (np.int8(-3), 0x1234_5678_9ABC, np.int32(-7), np.uint64(2 ** 64 - 1), np.int16(300), np.float64(2.5),
        np.uint8(200), np.float32(-1.25), np.bool_(True), np.int64(-(2 ** 40)), np.uint32(2 ** 32 - 1), 3.75,
        np.uint16(65535), np.int32(9))


def _c_struct(args):
    """The same values in a ctypes.Structure: the C compiler's layout of a kernel's parameters."""
    fields = [(f"f{i}", ctypes.c_void_p if driver.kind(a) == driver.ADDRESS else driver.CTYPES[type(a)])
              for i, a in enumerate(args)]
    s = type("Params", (ctypes.Structure,), {"_fields_": fields})
    return s(*(a.item() if isinstance(a, np.generic) else a for a in args))


def test_packed_buffer_has_the_c_struct_layout():
    args = driver.Args(0, ARGS)
    want = _c_struct(ARGS)
    got = args.pack(ARGS)
    assert len(got) == args.fmt.size
    assert got == bytes(want)[:len(got)]  # (a C struct may add tail padding; the driver reads the size)
    assert args.fmt.size >= 8 * 5  # the int64/uint64/double/address fields alone


def test_launch_hands_the_buffer_through_extra(monkeypatch):
    seen = []

    def launch_kernel(func, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        ext = (ctypes.c_void_p * 5).from_address(extra)
        assert (ext[0], ext[2], ext[4]) == (1, 2, None)  # POINTER, SIZE, END
        size = ctypes.c_size_t.from_address(ext[3]).value
        seen.append(dict(func=func, grid=(gx, gy, gz), block=(bx, by, bz), smem=smem, stream=stream,
                         params=params, buf=ctypes.string_at(ext[1], size)))

    fake = types.SimpleNamespace(ctxGetCurrent=lambda: 1, launchKernel=launch_kernel)
    monkeypatch.setattr(driver, "_driver", fake)
    cupy_like = type("ndarray", (), {"__module__": "cupy._core.core"})()  # what kind() takes for CuPy
    cupy_like.data = types.SimpleNamespace(ptr=0xDEAD_BEE0)
    kinds = (cupy_like, np.int32(0), 0, np.uint64(0))
    a = driver.Args(0xF00D, kinds)
    assert a.kinds == (driver.ARRAY, np.int32, driver.ADDRESS, np.uint64)
    for grid, vals in ((7, (np.int32(5), 0x1000, np.uint64(3))), (0, (np.int32(-1), 0x2000, np.uint64(4)))):
        a.launch(grid, 128, 0x5151, (cupy_like, *vals))
        got = seen[-1]
        assert (got["func"], got["grid"], got["block"], got["smem"], got["stream"], got["params"]) == \
            (0xF00D, (max(1, grid), 1, 1), (128, 1, 1), 0, 0x5151, 0)
        assert got["buf"] == bytes(_c_struct((0xDEAD_BEE0, *vals)))[:a.fmt.size]


@pytest.mark.parametrize("bad", ["3", None, np.float16(1)])
def test_unsupported_argument_type_is_named(bad):
    with pytest.raises(TypeError, match=f"unsupported type {type(bad).__name__}"):
        driver.Args(0, (bad,))
