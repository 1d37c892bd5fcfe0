#!/usr/bin/env bash
# The whole test suite on one GPU in N concurrent pytest processes (test ids dealt out round-robin, or with
# SHARD_BY=file whole files by size, largest first), so a lease's minutes go further: the serial suite takes ~10 minutes on an H200, mostly host
# time. Tests assert no timings, so sharing the GPU changes no verdict.
#
#   bash benchmarks/gpu_tests_sharded.sh [N=4] [LOG=benchmarks/results/tests.log]
#
# JAX does not preallocate here (XLA_PYTHON_CLIENT_PREALLOCATE=false): a JAX shard otherwise takes 75 % of
# the GPU and the others run out of memory (8 shards on an H200, 87a40e9: 17 tests failed that way).
# SHARD_TIMEOUT=<s> stops a shard after that many seconds (its log so far is kept, marked, and the run
# counts as failed), so a lease's time limit cannot lose every log. SHARD_SKIP=<regex>: test files to leave
# out (run them on their own, e.g. one that may crash its process). Each shard has its own autotune cache.
# The shards' logs are concatenated into LOG, with a last line
# "shards: <passed> passed, <failed> failed, <skipped> skipped, <n> stopped by SHARD_TIMEOUT (...)": a stopped
# shard's counts are not in the sums (b4f05a5's "0 failed" hid an F of a stopped shard); each item a stopped
# shard never ran gets a "NOT RUN <id>" line in its log. Exit status non-zero when any failed or stopped.
set -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
n=${1:-4}
log=${2:-benchmarks/results/tests.log}
tmp=$(mktemp -d)
# each shard gets its share of the cores for BLAS/OpenMP/torch threads: 8 shards at 16 threads each on 16
# cores (40ddb40, H200) got 12-54 % through their tests in 400 s, where file shards had finished 900 tests
threads=$(( $(nproc) / n > 0 ? $(nproc) / n : 1 ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-$threads} \
  MKL_NUM_THREADS=${MKL_NUM_THREADS:-$threads}
# SHARD_FILES="<test files>" replaces tests/test_*.py (the script's own test runs it on two small files)
mapfile -t files < <(ls -S ${SHARD_FILES:-tests/test_*.py} | grep -v -E "${SHARD_SKIP:-^$}")
if [ "${SHARD_BY:-test}" = test ]; then
  # deal test ids, not files: one long file (test_gpu_kernel_map, test_minkunet) kept a whole shard past its
  # limit at b4f05a5 and 9622c1e; its tests dealt round-robin spread over every shard
  mapfile -t items < <(python3 -m pytest --collect-only -q -p no:cacheprovider "${files[@]}" 2>/dev/null | grep "::")
  # a file that collected nothing (skipped at import: no torch, no CUTLASS library) still runs whole, so the
  # log keeps its skip reason
  for f in "${files[@]}"; do
    printf '%s\n' "${items[@]}" | grep -q "^$f::" || items+=("$f")
  done
else
  items=("${files[@]}")
fi
echo "dealing ${#items[@]} items (SHARD_BY=${SHARD_BY:-test}) over $n shards"
pids=()
for ((i = 0; i < n; i++)); do
  shard=()
  for ((j = i; j < ${#items[@]}; j += n)); do shard+=("${items[j]}"); done
  if ((${#shard[@]} == 0)); then  # fewer items than shards: pytest without arguments would run every test
    echo "(no items)" >"$tmp/shard-$i.log"
    pids+=("")
    continue
  fi
  printf '%s\n' "${shard[@]}" >"$tmp/items-$i.txt"
  # -v: one line per test, so a stopped shard's log says which of its items never ran; --durations: the
  # slowest tests of a finished shard (what to rebalance)
  SPARSEVOX_CACHE_DIR=$tmp/cache-$i PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${SHARD_TIMEOUT:-0}" python3 -m pytest "${shard[@]}" -v -rfs --tb=short \
    --durations=10 -p no:cacheprovider >"$tmp/shard-$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for ((i = 0; i < n; i++)); do
  [ -z "${pids[i]}" ] && continue
  wait "${pids[i]}"
  code=$?
  if ((code != 0)); then rc=1; fi
  if ((code == 124)); then
    echo "SHARD $i STOPPED by SHARD_TIMEOUT=${SHARD_TIMEOUT}s" >>"$tmp/shard-$i.log"
    # its items with no verdict line (a file item: no line of that file), one "NOT RUN" line each
    python3 - "$tmp/items-$i.txt" "$tmp/shard-$i.log" >>"$tmp/shard-$i.log" <<'PY'
import sys
items = open(sys.argv[1]).read().split("\n")
verdicts = ("PASSED", "FAILED", "SKIPPED", "ERROR", "XFAIL", "XPASS")
lines = [l for l in open(sys.argv[2]).read().splitlines() if "::" in l and l.split()[-1:] and
         any(v in l for v in verdicts)]
# a test id may contain spaces (parametrize ids): an item ran when a line is the item, a space and a verdict;
# a file item (SHARD_BY=file) when some line of that file has a verdict
for it in filter(None, items):
    if "::" in it:
        ran = any(l.startswith(it + " ") and l[len(it) + 1:].split(" ", 1)[0] in verdicts for l in lines)
    else:
        ran = any(l.startswith(it + "::") for l in lines)
    if not ran:
        print("NOT RUN " + it)
PY
  fi
done
: >"$log"
for ((i = 0; i < n; i++)); do echo "==== shard $i" >>"$log"; cat "$tmp/shard-$i.log" >>"$log"; done
sum() { grep -hoE "[0-9]+ $1" "$tmp"/shard-*.log | awk '{s += $1} END {print s + 0}'; }
# a stopped shard prints no summary line of its own: its failures so far show only as F in its progress
stopped=$(grep -l "STOPPED by SHARD_TIMEOUT" "$tmp"/shard-*.log | wc -l)
notrun=$(cat "$tmp"/shard-*.log | grep -c "^NOT RUN ")
echo "shards: $(sum passed) passed, $(sum failed) failed, $(sum skipped) skipped, $stopped stopped by SHARD_TIMEOUT" \
  "(not counted: their tests so far; $notrun items they never ran are listed as NOT RUN)" | tee -a "$log"
grep -h "^FAILED\|^ERROR" "$tmp"/shard-*.log | head -40
exit $rc
