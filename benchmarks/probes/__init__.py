"""Probes: the diagnostics of finished investigations, kept runnable (``python -m benchmarks.probes.<name>``
from the repository root, most on a GPU). What each one found is in ``docs/performance.md``.

- ``implicit_dev``: every IMPLICIT_GEMM tile of every direction, checked then timed (CUDA graphs), with
  the dense cuBLAS GEMM of the same shape; ``tile_sweep``: forward tiles outside the search space;
  ``implicit_profile``: one launch per tile for ``ncu``; ``implicit_sanitize``: a small run for
  compute-sanitizer.
- ``kmap_sanitize``: the GPU kernel-map paths for compute-sanitizer; ``map_build_sweep``: the map build's
  per-kernel device time for one tile-size setting.
- ``small_layer_profile``, ``train_step_profile``, ``fresh_layer_profile``, ``host_breakdown``: where the
  host time of a small layer, a training step, a fresh scan's first layer and the primitives goes.
- ``autotune_overhead``: what the autotuner costs (first call, cached choice); ``gpu_suite.sh`` runs it
  unless ``SKIP_AUTOTUNE_OVERHEAD`` is set.
- ``depthwise``: depthwise IMPLICIT vs EXPLICIT and its share of the copy bandwidth.
- ``cpu_reference``: the NumPy backend's SubM forward on ~100k voxels (the CPU reference figure).
"""
