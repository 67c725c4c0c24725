#!/usr/bin/env bash
# make bench-shared: training and decoding speed on a CPU that other programs also use.
#
# Measures build/train (tokens/s of the training steps) and build/generate (tokens/s of decoding) with 2 threads on
# a quiet machine, then beside two busy processes (shell loops that spin), then with 1 thread beside them, and, for
# comparison, 2 threads beside them with libgomp's spinning wait (GOMP_SPINCOUNT=300000, what the programs ran with
# before they chose sleeping threads: header section 2, prefer_sleeping_threads). Prints the ratios against the
# target: the loaded speed at least a third of the quiet speed, and never below the 1-thread loaded speed.
# About a minute; the figures are only as quiet as the machine is.
#   examples/bench_shared.sh [STEPS (default 100)] [TOKENS (default 1000)]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-100}
TOKENS=${2:-1000}
TMP=$(mktemp -d)
spinners=()
cleanup() { for p in "${spinners[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT
TRAIN=(build/train --data README.md --batch 8 --seq 64 --eval-every 100000 --eval-windows 1 --sample 0 --warmup 5)

"${TRAIN[@]}" --steps 3 --out "$TMP/run" > /dev/null  # a checkpoint to decode from

train_rate()  { "$@" "${TRAIN[@]}" --steps "$STEPS" --no-save | sed -n 's/^training: \([0-9.]*\) tokens\/s.*/\1/p'; }
decode_rate() { "$@" build/generate --checkpoint "$TMP/run/checkpoint.bin" --tokens "$TOKENS" |
                sed -n 's/.* s: \([0-9.]*\) tokens\/s.*/\1/p'; }
measure() {  # measure NAME ENV...: one line, and the rates in $NAME_train / $NAME_decode
  local name=$1; shift
  local t d
  t=$(train_rate env "$@"); d=$(decode_rate env "$@")
  printf "  %-46s %10s %10s\n" "$name" "$t" "$d"
  eval "${name%% *}_train=$t; ${name%% *}_decode=$d"
}

echo "CPU: $(nproc) cores; train --batch 8 --seq 64 for $STEPS steps; generate $TOKENS tokens"
printf "  %-46s %10s %10s\n" "" "train" "decode"
printf "  %-46s %10s %10s\n" "" "tokens/s" "tokens/s"
measure "quiet (2 threads)" OMP_NUM_THREADS=2
for _ in 1 2; do sh -c 'while :; do :; done' & spinners+=($!); done
sleep 0.5
measure "loaded (2 threads, beside 2 busy processes)" OMP_NUM_THREADS=2
measure "one (1 thread, beside 2 busy processes)" OMP_NUM_THREADS=1
measure "spinning (2 threads, GOMP_SPINCOUNT=300000)" OMP_NUM_THREADS=2 GOMP_SPINCOUNT=300000
for p in "${spinners[@]}"; do kill "$p" 2>/dev/null || true; done
spinners=()

verdict() {  # verdict WHAT QUIET LOADED ONE
  awk -v w="$1" -v q="$2" -v l="$3" -v o="$4" 'BEGIN {
    r = l / q; s = l / o;
    m1 = (r >= 1/3) ? "met" : "NOT met"; m2 = (s >= 1) ? "met" : "NOT met";
    printf "  %-7s loaded/quiet %.2f (target >= 0.33: %s), loaded/1-thread %.2f (target >= 1: %s)\n", w, r, m1, s, m2 }'
}
verdict train "$quiet_train" "$loaded_train" "$one_train"
verdict decode "$quiet_decode" "$loaded_decode" "$one_decode"
awk -v a="$loaded_decode" -v b="$spinning_decode" -v c="$loaded_train" -v d="$spinning_train" 'BEGIN {
  printf "  sleeping threads against spinning ones, loaded: train %.2fx, decode %.2fx\n", c / d, a / b }'
