#!/usr/bin/env bash
# Runs every fuzz target, one after the other (each fuzzer uses one core),
# for SECONDS each (default 20), and prints each run's figures: executions,
# coverage (libFuzzer's cov: edges, ft: features) and corpus size.
# docs/fuzzing.md. CI runs it briefly (.ci/run); long runs are by hand:
#   fuzz/run-all.sh 600 [TARGET...]
# New inputs go to a scratch corpus ($FUZZ_WORK, default a temporary
# directory), the committed seeds in corpus/TARGET are only read. Exits
# non-zero at the first crash, timeout or out-of-memory, whose input
# libFuzzer saves under artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")"

secs=${1:-20}
shift || true
work=${FUZZ_WORK:-$(mktemp -d -t vmm-fuzz.XXXXXX)}
cargo +nightly fuzz build
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

# Targets whose devices start worker threads that outlive an input: their
# allocations, freed by the thread later, would make libFuzzer run its leak
# check after every input (most of the time of such a run).
no_leak_check=" pv_request snapshot_state "

for t in "${targets[@]}"; do
  mkdir -p "$work/$t"
  log="$work/$t.log"
  extra=()
  asan=${ASAN_OPTIONS:-}
  if [[ $no_leak_check == *" $t "* ]]; then
    extra+=(-detect_leaks=0)
    # And not at exit either: a worker thread still running then holds its
    # thread handle, which LeakSanitizer reports (CI failed on it once,
    # pv_request, 182 bytes in 6 std::thread handles of page-store workers).
    asan="${asan:+$asan:}detect_leaks=0"
  fi
  if [ -f "dicts/$t.dict" ]; then
    extra+=(-dict="dicts/$t.dict")
  fi
  # A per-input timeout and a memory limit: a slow or greedy input is a
  # finding like a crash.
  if ! ASAN_OPTIONS="$asan" cargo +nightly fuzz run "$t" "$work/$t" "corpus/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "${extra[@]}" \
      </dev/null >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz: $t FAILED (log $log, input under fuzz/artifacts/$t/)"
    exit 1
  fi
  awk -v t="$t" '
    /^#[0-9]+/ && / cov: / { for (i = 1; i <= NF; i++) { if ($i == "cov:") c = $(i+1); if ($i == "ft:") f = $(i+1); if ($i == "corp:") k = $(i+1) } }
    /^stat::number_of_executed_units:/ { n = $2 }
    /^stat::peak_rss_mb:/ { r = $2 }
    END { printf "fuzz: %-18s %10d execs in %ss, cov %s, ft %s, corpus %s, peak RSS %s MB\n", t, n, s, c, f, k, r }
  ' s="$secs" "$log"
done
