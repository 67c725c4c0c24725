#!/usr/bin/env bash
# tests/fuzz/run.sh SECONDS [TARGET...]: runs each fuzz target of build/fuzz/ (`make fuzz`; default: all) for SECONDS,
# two at a time, each from the seeds of build/fuzz/make_seeds plus the corpus earlier runs kept (build/fuzz/corpus/),
# under libFuzzer's limits: 2 GB of memory (-rss_limit_mb=2048, also for any single allocation), 10 s an input.
# Prints one line a target (inputs run, coverage, corpus) and fails if any target found a crash, a sanitizer report,
# a leak, a time-out or an allocation beyond the limit; the input that did it is left in build/fuzz/<target>.crash/.
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:?usage: tests/fuzz/run.sh SECONDS [TARGET...]}
shift
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then  # every tests/fuzz/*.cpp but make_seeds
  for f in tests/fuzz/*.cpp; do t=$(basename "$f" .cpp); [ "$t" = make_seeds ] || targets+=("$t"); done
fi
rm -rf build/fuzz/seeds
build/fuzz/make_seeds build/fuzz/seeds >/dev/null
run_one() {
  local t=$1 seconds=$2
  mkdir -p "build/fuzz/corpus/$t" "build/fuzz/$t.crash"
  if build/fuzz/"$t" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
       -artifact_prefix="build/fuzz/$t.crash/" "build/fuzz/corpus/$t" "build/fuzz/seeds/$t" \
       >"build/fuzz/$t.log" 2>&1; then
    local runs cov corpus
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "build/fuzz/$t.log")
    cov=$(grep -o 'cov: [0-9]*' "build/fuzz/$t.log" | tail -1)
    corpus=$(grep -o 'corp: [0-9]*/[0-9]*[a-zA-Z]*' "build/fuzz/$t.log" | tail -1)
    printf 'fuzz %-12s %9s inputs in %ss  %s  %s  ok\n' "$t" "$runs" "$seconds" "$cov" "$corpus"
  else
    printf 'fuzz %-12s FAILED (build/fuzz/%s.log, input in build/fuzz/%s.crash/):\n' "$t" "$t" "$t"
    grep -m1 -A12 'ERROR\|==ERROR\|deadly signal\|out-of-memory\|timeout\|property failed\|terminate' "build/fuzz/$t.log" || tail -20 "build/fuzz/$t.log"
    return 1
  fi
}
export -f run_one
printf '%s\n' "${targets[@]}" | xargs -P 2 -I{} bash -c 'run_one {} '"$seconds"
