#!/usr/bin/env bash
# Resume is a continuation (run by `make test`, after the doctest suite): build/train interrupted by Ctrl-C (SIGINT)
# part way, then `--resume` with no other flag, against the same run uninterrupted. The interrupted run must exit
# with status 130 after saving its checkpoint; the resumed run must take the recorded flags, and end with the same
# history (train_log.txt: every step's losses and learning rate, every evaluation) and the same loss and expert-load
# plots, byte for byte, as the uninterrupted run.
set -euo pipefail
cd "$(dirname "$0")/.."
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export OMP_NUM_THREADS=1  # two runs side by side would share the cores anyway
ARGS=(--data README.md --steps 40 --batch 4 --seq 32 --warmup 5 --eval-every 8 --eval-windows 4 --sample 0)
failed=0
ok()  { echo "  ok    $*"; }
bad() { echo "  FAIL  $*"; failed=1; }

echo "train: Ctrl-C and --resume"
timeout 120 build/train "${ARGS[@]}" --out "$TMP/full" > "$TMP/full.out"

# --foreground: timeout passes the SIGINT to build/train once; without it, it sends it to the child and then again to
# its process group, and the second one, arriving after the handler (SA_RESETHAND) has reset itself, killed the run
# before it had saved (about 1 run in 6 on a busy machine)
timeout --foreground 120 build/train "${ARGS[@]}" --out "$TMP/part" > "$TMP/part.out" &
pid=$!
for _ in $(seq 600); do  # until step 14 or later is printed (the run prints every 2 steps to a file), at most 60 s
  grep -q "^step 1[4-9]/40" "$TMP/part.out" && break
  sleep 0.1
done
kill -INT $pid
rc=0; wait $pid || rc=$?
step=$(sed -n 's/^step=//p' <(head -c 4096 "$TMP/part/checkpoint.bin" | tr -c '[:print:]\n' ' ') | head -1)
if [ $rc -eq 130 ] && grep -q "^interrupted after step" "$TMP/part.out" && [ "${step:-40}" -lt 40 ]; then
  ok "interrupted at step $step: exit 130, checkpoint saved"
else cat "$TMP/part.out"; bad "interrupt: exit $rc, checkpoint step ${step:-none} (expected 130 and a step below 40)"; fi

timeout 120 build/train --resume "$TMP/part/checkpoint.bin" > "$TMP/resume.out"
if cmp -s "$TMP/full/train_log.txt" "$TMP/part/train_log.txt"; then
  ok "the resumed run's log (losses, learning rates, evaluations) equals the uninterrupted run's"
else bad "train_log.txt differs"; diff "$TMP/full/train_log.txt" "$TMP/part/train_log.txt" | head -20; fi
for png in loss expert_load attention; do
  if cmp -s "$TMP/full/$png.png" "$TMP/part/$png.png"; then ok "$png.png equals the uninterrupted run's"
  else bad "$png.png differs"; fi
done
[ $failed -eq 0 ] && echo "train resume tests passed" || { echo "train resume tests FAILED"; exit 1; }
