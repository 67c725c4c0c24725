#!/usr/bin/env bash
# tests/flags.sh (make test-flags): every example refuses a malformed or meaningless flag value with a message that
# names the flag, the range and the value, and a non-zero exit, never a signal (the defects of before: "error: stoi",
# "cannot create std::vector larger than max_size()", --steps 0 exiting 0, --eval-every 0 dividing by zero).
# Needs the examples built (make all).
set -uo pipefail
cd "$(dirname "$0")/.."
failed=0
check() {  # check PROGRAM 'part of the expected message' ARGS...
  local program=$1 want=$2
  shift 2
  local message rc
  message=$("build/$program" "$@" 2>&1 >/dev/null)
  rc=$?
  if [ "$rc" -ne 0 ] && [ "$rc" -lt 128 ] && grep -qF -- "$want" <<<"$message"; then
    echo "ok    $program $*"
  else
    echo "FAIL  $program $*: exit $rc, said: $message"
    failed=$((failed + 1))
  fi
}
check train "train: error: --steps: expected an integer in [1, 1000000000], got 'abc'" --steps abc
check train "--steps: expected an integer in [1, 1000000000], got '0'" --steps 0
check train "--steps: expected an integer in [1, 1000000000], got '99999999999'" --steps 99999999999
check train "--batch: expected an integer in [1, 65536], got '-1'" --batch -1
check train "--eval-every: expected an integer in [1, 1000000000], got '0'" --eval-every 0
check train "--lr: expected a number in [0, 10], got 'nan'" --lr nan
check train "--seq: expected a value" --seq
check train "--attention-head: expected an integer in [0, 65536], got '-1'" --attention-head -1
check train "--time-limit: expected a number in [0, 1e+09], got '-5'" --time-limit -5
check train "--attention-layer 9: the model has layers 0 to 3" --attention-layer 9 --steps 1
check generate "generate: error: --tokens: expected an integer in [1, 16777216], got 'abc'" --tokens abc
check generate "--top-p: expected a number in [0, 1], got '1.5'" --top-p 1.5
check generate "--seed: expected an integer in [0, 9223372036854775807], got '-1'" --seed -1
check balance "balance: error: --steps: expected an integer in [1, 1000000000], got '0'" --steps 0
check fp8_error "fp8_error: error: --m: expected an integer in [2, 65536], got '1'" --m 1
check fp8_error "--draws: expected an integer in [0, 1000], got '2x'" --draws 2x
check fp8_train "fp8_train: error: --batch: expected an integer in [1, 65536], got '-1'" --batch -1
check fp8_train "--seq: expected an integer in [1, 256], got '1000'" --seq 1000
check params "params: error: --seq: expected an integer in [1, 4194304], got 'abc'" --seq abc
check prepare_data "prepare_data: error: --vocab: expected an integer in [256, 1048576], got 'abc'" --vocab abc
check prepare_data "--synthetic: expected an integer in [1, 68719476736], got '0'" --synthetic 0
check prepare_data "--val-fraction: expected a number in [0, 0.999], got '1'" --val-fraction 1
# and two checkpoints of the defects list, through build/generate: a header line of 5000 bytes (once a double free)
# and a step count beyond int (once "error: stoi")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf 'dsv3-checkpoint 1\n%05000d\n' 0 >"$tmp/long.ckpt"
check generate "checkpoint $tmp/long.ckpt: header line too long" --checkpoint "$tmp/long.ckpt"
printf 'dsv3-checkpoint 1\nstep=99999999999\n' >"$tmp/step.ckpt"
check generate "step: expected an integer in [0, 2147483647], got '99999999999'" --checkpoint "$tmp/step.ckpt"
[ "$failed" -eq 0 ] && echo "flags: every malformed value refused with its flag's name" || echo "flags: $failed failed"
exit "$failed"
