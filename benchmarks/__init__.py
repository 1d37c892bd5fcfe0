"""Benchmark programs of sparsevox and their recorded results (``benchmarks/results/``).

Every program here is a module run as ``python -m benchmarks.<name>`` from the repository root and
accepts the same core options, so that ``benchmarks/gpu_suite.sh`` can run any of them:

    --out DIR        where result files go (default ``benchmarks/results``)
    --stem STEM      file-name stem ``<yyyy-mm-dd>-<gpu>-<short commit>`` (default: computed here)
    --quick          fewer sizes and repeats (the suite's ``--quick``)
    --budget-s S     stop starting new measurements after S seconds and still write what was measured

Results follow DESIGN.md ("Recorded GPU results"): ``<stem>-<what>.json`` holding
``{"device", "date", "commit", "records"}``; Markdown tables and plots are generated from it
(:mod:`benchmarks.report`).
"""
