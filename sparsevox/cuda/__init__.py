"""CUDA plumbing: the one ``RawModule`` loader (``cuda_loader``), raw driver launches (``driver``), the GPU
kernel-map builder (``gpu_kernel_map``), device facts (``gpu_info``), and the CUTLASS library's one
ctypes binding (``cutlass_lib``) and its nvcc build (``cutlass_build``); the same pair for the XLA FFI
custom call through which JAX launches prepared kernels (``ffi_lib``, ``ffi_build``).

May import: the standard library, NumPy, the core (``sparsevox._arrays``, ``geometry``, ``kernel_map``).
CuPy only inside functions, so importing these modules costs nothing without a GPU. Never a framework
(torch, jax), ``sparsevox.algorithms``, ``sparsevox.tuning`` or ``sparsevox.adapters``: plumbing does not
know which algorithm uses it.
"""
