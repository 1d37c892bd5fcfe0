"""The device radix argsort (sparsevox/cuda/radix_sort.py) against NumPy's stable argsort."""
import numpy as np
import pytest
from gpu_cases import queue_sleep

from sparsevox.cuda import radix_sort


def test_passes_are_eight_bits_each():
    assert [radix_sort.passes(b) for b in (0, 1, 8, 9, 16, 27, 32, 33, 64)] == [0, 1, 1, 2, 2, 4, 4, 5, 8]


@pytest.mark.parametrize("keys,bits,match", [
    (np.zeros(4, np.int32), None, "uint32 or uint64"),
    (np.zeros(4, np.float32), None, "uint32 or uint64"),
    (np.zeros((2, 2), np.uint32), None, "1-D"),
    (np.zeros(4, np.uint32), 33, r"bits must be in \[0, 32\]"),
    (np.zeros(4, np.uint64), -1, r"bits must be in \[0, 64\]"),
])
def test_bad_keys_or_bits_are_refused_by_name(keys, bits, match):
    with pytest.raises(ValueError, match=match):
        radix_sort.argsort(keys, bits)


def _reference(keys: np.ndarray, bits: int) -> np.ndarray:
    mask = np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(2 ** 64 - 1)
    return np.argsort(keys.astype(np.uint64) & mask, kind="stable").astype(np.int32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,bits", [(np.uint32, 1), (np.uint32, 5), (np.uint32, 8), (np.uint32, 9),
                                        (np.uint32, 27), (np.uint32, 32), (np.uint64, 33), (np.uint64, 47),
                                        (np.uint64, 64)])
def test_argsort_is_numpys_stable_argsort_of_the_low_bits(rng, dtype, bits):
    """Sizes around a block's tile and a warp, keys with bits above ``bits`` set (ignored), and keys from
    a narrow range (long runs of ties: the order must stay stable over every pass)."""
    import cupy
    width = 8 * np.dtype(dtype).itemsize
    for n in (0, 1, 2, 31, 33, radix_sort.TILE - 1, radix_sort.TILE, radix_sort.TILE + 1, 5000, 100_003):
        for spread in (width, min(bits, 3)):
            hi = 2 ** spread
            keys = rng.integers(0, hi, size=n, dtype=np.uint64).astype(dtype)
            d_keys = cupy.asarray(keys)
            got = radix_sort.argsort(d_keys, bits)
            assert got.dtype == cupy.int32 and got.shape == (n,)
            np.testing.assert_array_equal(got.get(), _reference(keys, bits), err_msg=f"n={n} spread={spread}")
            np.testing.assert_array_equal(d_keys.get(), keys)  # the caller's keys are left alone


@pytest.mark.gpu
def test_zero_bits_is_the_identity_order(rng):
    import cupy
    keys = cupy.asarray(rng.integers(0, 2 ** 32, size=1000, dtype=np.uint64).astype(np.uint32))
    np.testing.assert_array_equal(radix_sort.argsort(keys, 0).get(), np.arange(1000))


@pytest.mark.gpu
def test_argsort_does_not_wait_for_the_device():
    """Queued behind a kernel that sleeps ~0.5 s on the same stream, the call returns with that work
    still pending (cupy.argsort, which this replaces, would block until the stream drained)."""
    import cupy
    keys = cupy.arange(50_000, 0, -1, dtype=cupy.int64).astype(cupy.uint32)  # (uint32 arange cannot step -1)
    radix_sort.argsort(keys, 16)  # compile first
    cupy.cuda.get_current_stream().synchronize()
    queue_sleep(500_000_000)
    order = radix_sort.argsort(keys, 32)
    pending = not cupy.cuda.get_current_stream().done
    np.testing.assert_array_equal(order.get(), np.arange(50_000)[::-1])
    assert pending, "argsort waited for the work queued before it"
