#!/usr/bin/env bash
# THE one command for the GPU machine: install, GPU test suite, layer benchmarks; results under
# benchmarks/results/ with the stem <yyyy-mm-dd>-<gpu>-<short commit>, bundled into $OUT.
#
#   bash benchmarks/gpu_suite.sh [--quick] [--no-tests] [--tests-only] [--cpu] [benchmarks.MODULE ...]
#   (a module is benchmarks.NAME or benchmarks.probes.NAME)
#
# Run from anywhere (it changes to the repository root). It expects, at the repository root:
#   .peers/*.tar.xz           the peers packed by ../shared/tools/pack-peers (optional: no peers, no ratios)
#   .gpudata/pointclouds/     semantickitti_000000.bin, scannet_scene0000_00.bin (optional: scenes skipped)
# Steps: pip install -e . (no index, no deps); unpack the peers into /tmp/peers (PYTHONPATH); pytest tests
# (log: <stem>-tests.log); python -m benchmarks.layers; benchmarks.probes.autotune_overhead; the
# modules named as arguments (each gets --out --stem [--quick] --budget-s). The whole run keeps to
# SUITE_BUDGET_S seconds (default 470; --quick 300): tests get at most TESTS_TIMEOUT_S (default 240; quick
# 150), the benchmarks the time left (they stop starting measurements at their budget and write what
# they have). The commit is $COMMIT when set, else git's. LAYERS_ARGS adds options to
# benchmarks.layers (e.g. LAYERS_ARGS="--peers spconv spconv_triton"; spconv-triton autotunes for minutes);
# SKIP_LAYERS=1 leaves benchmarks.layers out (diagnostic runs of the named modules only).
#
# $OUT (when set) receives at most 4 files: results.tar (every file of this run, paths relative to the
# repository root: `tar -xf results.tar -C <repo>`), summary.md (the short table), tests-tail.log and
# suite-tail.log. The short summary table is printed last. Exit status: non-zero when the tests failed
# or a benchmark crashed.
set -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

quick=""; cpu=(); run_tests=1; run_bench=1; mods=()
for a in "$@"; do
  case "$a" in
    --quick) quick=--quick ;;
    --cpu) cpu=(--cpu) ;;  # plumbing check without a GPU: the layers dry run (tiny scenes, NumPy backend)
    --no-tests) run_tests=0 ;;
    --tests-only) run_bench=0 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    -*) echo "gpu_suite.sh: unknown option $a" >&2; exit 2 ;;
    *) mods+=("${a#python3 -m }") ;;
  esac
done

t0=$(date +%s)
budget=${SUITE_BUDGET_S:-$([ -n "$quick" ] && echo 300 || echo 470)}
tests_timeout=${TESTS_TIMEOUT_S:-$([ -n "$quick" ] && echo 150 || echo 240)}
left() { echo $(( budget - ($(date +%s) - t0) )); }
export PYTHONUNBUFFERED=1
# A fresh autotune cache for this run (archived with the results): choices are made by this run.
export SPARSEVOX_CACHE_DIR=${SPARSEVOX_CACHE_DIR:-/tmp/sparsevox-cache-$t0}
RES=benchmarks/results
mkdir -p "$RES"
suite_log=$(mktemp /tmp/gpu_suite.XXXXXX.log)
exec > >(tee "$suite_log") 2>&1

echo "== sparsevox GPU suite $(date -u '+%F %T') UTC, budget ${budget}s ${quick}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"

echo "== install"
python3 -m pip install --no-deps --no-build-isolation --no-index -e . -q 2>&1 | grep -v -i "warning: running pip as" | tail -5

echo "== peers"
if compgen -G ".peers/*.tar.xz" >/dev/null; then
  mkdir -p /tmp/peers
  for f in .peers/*.tar.xz; do tar -xJf "$f" -C /tmp/peers || echo "could not unpack $f"; done
  export PYTHONPATH=/tmp/peers${PYTHONPATH:+:$PYTHONPATH}
  python3 -c "import spconv.pytorch, spconv; print('spconv', spconv.__version__)" 2>&1 | tail -1
  python3 -c "import spconv_triton.pytorch, spconv_triton; print('spconv_triton', spconv_triton.__version__)" 2>&1 | tail -1
else
  echo "no .peers/*.tar.xz: benchmarks run without peers"
fi

if [ -n "${COMMIT:-}" ]; then commit_src='$COMMIT'
elif git -c safe.directory='*' rev-parse --short HEAD >/dev/null 2>&1; then commit_src=git
else commit_src=none; fi
stem=$(python3 -m benchmarks.provenance "${cpu[@]}") || stem="$(date +%F)-gpu-${COMMIT:-unknown}"
export SPARSEVOX_RESULT_COMMIT=${stem##*-}
gpu=$(python3 -c "from benchmarks.provenance import gpu_name; print(gpu_name())" 2>/dev/null)
echo "== stem $stem (commit from $commit_src; device $gpu)"

pack() {  # re-bundle everything of this run into $OUT (called after each step: a killed run keeps the rest)
  [ -n "${OUT:-}" ] || return 0
  cp "$suite_log" "$RES/$stem-suite.log" 2>/dev/null
  [ -f "$SPARSEVOX_CACHE_DIR/autotune.json" ] && cp "$SPARSEVOX_CACHE_DIR/autotune.json" "$RES/$stem-autotune-cache.json"
  tar -cf "$OUT/results.tar" "$RES"/"$stem"-* 2>/dev/null
  [ -f "$RES/$stem-tests.log" ] && tail -n 60 "$RES/$stem-tests.log" > "$OUT/tests-tail.log"
  [ -f "$RES/$stem-layers.json" ] && python3 -m benchmarks.report "$RES/$stem-layers.json" --summary > "$OUT/summary.md" 2>/dev/null
  tail -n 150 "$suite_log" > "$OUT/suite-tail.log"
}

test_rc=skipped
if [ "$run_tests" = 1 ]; then
  echo "== tests (timeout ${tests_timeout}s)"
  { echo "# sparsevox GPU test log"; echo "# device: $gpu"; echo "# date: $(date -u '+%F %T') UTC";
    echo "# commit: ${stem##*-} (from $commit_src)"; echo "# command: python3 -m pytest tests -q -rs ${PYTEST_ARGS:-}"; } > "$RES/$stem-tests.log"
  timeout --signal=INT --kill-after=15 "$tests_timeout" python3 -m pytest tests -q -rs ${PYTEST_ARGS:-} 2>&1 | tee -a "$RES/$stem-tests.log"
  test_rc=$?
  [ "$test_rc" = 124 ] && echo "tests STOPPED at the ${tests_timeout}s timeout" | tee -a "$RES/$stem-tests.log"
  pack
fi

bench_rc=0
run_bench_module() {  # module, then its extra arguments
  local m=$1; shift
  local b=$(( $(left) - 25 ))
  if [ "$b" -lt 20 ]; then echo "== $m skipped: suite budget spent"; return 0; fi
  echo "== $m (budget ${b}s)"
  python3 -m "$m" --out "$RES" --stem "$stem" $quick --budget-s "$b" "$@" 2>&1 | tee "$RES/$stem-${m##*.}.log"
  local rc=$?
  [ "$rc" = 0 ] || { echo "$m exited with $rc"; bench_rc=$rc; }
  pack
}
if [ "$run_bench" = 1 ]; then
  # shellcheck disable=SC2086  # LAYERS_ARGS is split on purpose, e.g. "--peers spconv spconv_triton"
  [ -z "${SKIP_LAYERS:-}" ] && run_bench_module benchmarks.layers "${cpu[@]}" ${LAYERS_ARGS:-}
  [ -z "${SKIP_AUTOTUNE_OVERHEAD:-}" ] && [ -f benchmarks/probes/autotune_overhead.py ] && run_bench_module benchmarks.probes.autotune_overhead
  for m in "${mods[@]}"; do
    # shellcheck disable=SC2086
    if [ "$m" = benchmarks.layers ]; then run_bench_module "$m" "${cpu[@]}" ${LAYERS_ARGS:-}; else run_bench_module "$m"; fi
  done
fi

echo
echo "== summary ($stem, $(( $(date +%s) - t0 ))s)"
if [ "$run_tests" = 1 ]; then
  echo "tests: exit $test_rc: $(grep -E '(passed|failed|error|skipped|no tests ran)' "$RES/$stem-tests.log" | tail -1)"
fi
if [ "$run_bench" = 1 ] && [ -f "$RES/$stem-layers.json" ]; then
  python3 -m benchmarks.report "$RES/$stem-layers.json" --summary
fi
ls -1 "$RES"/"$stem"-* 2>/dev/null | sed 's/^/  /'
pack
[ "$test_rc" = 0 ] || [ "$test_rc" = skipped ] || exit 1
exit "$bench_rc"
