"""Benchmark programs of sparsevox and their recorded results (``benchmarks/results/``).

What a user or CI runs (``python -m benchmarks.<name>`` from the repository root):

- ``layers``: every layer kind against spconv in the same process (the headline ratios);
  ``report`` turns its JSON into the Markdown table, the plot and the summary.
- ``latency``: where the time of one call goes (host, device, harness), the map build and a fresh
  scan's first layer.
- ``adapters``: one layer through the core, the torch adapter and the JAX adapter.
- ``map_build_timeline``: host and device of one kernel-map build on one clock (ours and spconv's).
- ``ddp``, ``jax_sharded`` (with ``dp_scans``): data-parallel gradient checks, run by
  ``tests/test_multigpu.py``.
- ``gpu_suite.sh``: the one command for a GPU machine (install, GPU tests, benchmarks, bundle).
- Helpers: ``scenes`` (the geometries), ``peers`` (spconv / spconv-triton), ``runners`` (sparsevox's
  side of a layer), ``timing``, ``provenance`` (date, device, commit, file stem).

``probes/``: the diagnostics of past investigations (profiles, sweeps, sanitizer drivers), kept runnable
as ``python -m benchmarks.probes.<name>``; ``docs/performance.md`` says what each one found.

The programs accept the same core options, so that ``benchmarks/gpu_suite.sh`` can run any of them:

    --out DIR        where result files go (default ``benchmarks/results``)
    --stem STEM      file-name stem ``<yyyy-mm-dd>-<gpu>-<short commit>`` (default: computed here)
    --quick          fewer sizes and repeats (the suite's ``--quick``)
    --budget-s S     stop starting new measurements after S seconds and still write what was measured

Results follow DESIGN.md ("Recorded GPU results"): ``<stem>-<what>.json`` holding
``{"device", "date", "commit", "records"}``; Markdown tables and plots are generated from it
(:mod:`benchmarks.report`). ``benchmarks/results/README.md`` lists the files kept (the latest run of
each benchmark).
"""
