#!/usr/bin/env bash
# tests/flags.sh (make test-flags): the command-line convention of every example (examples/*.cpp):
#   - NAME --help (and -h) prints "usage: NAME [options]", what the program does, and every option that the program's
#     source compares an argument with, to standard output, and exits 0;
#   - an unknown option is refused in the same words everywhere: NAME: error: unknown option "X" (see NAME --help);
#   - a malformed or meaningless flag value is refused with a message that names the flag, the range and the value,
#     and a non-zero exit, never a signal (the defects of before: "error: stoi", "cannot create std::vector larger
#     than max_size()", --steps 0 exiting 0, --eval-every 0 dividing by zero).
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
# --help: exit 0, the usage line first, and every option of the source (a `== "--name"` comparison) named in it
check_help() {  # check_help PROGRAM
  local program=$1 help rc option missing=""
  help=$("build/$program" --help 2>/dev/null)
  rc=$?
  for option in $(grep -o '== "-[-a-z0-9][-a-z0-9]*"' "examples/$program.cpp" | sed 's/== "//; s/"$//' | sort -u); do
    grep -qE -- "(^|[^-a-z0-9])$option([^-a-z0-9]|$)" <<<"$help" || missing="$missing $option"
  done
  if [ "$rc" -eq 0 ] && [ "$(head -n 1 <<<"$help")" = "usage: $program [options]" ] && [ "$(wc -l <<<"$help")" -ge 3 ] &&
     [ -z "$missing" ] && [ "$("build/$program" -h 2>/dev/null)" = "$help" ]; then
    echo "ok    $program --help"
  else
    echo "FAIL  $program --help: exit $rc, options not named:${missing:- none}; said: $(head -n 3 <<<"$help")"
    failed=$((failed + 1))
  fi
}
programs=$(ls examples/*.cpp | sed 's|examples/||; s|\.cpp$||')
for program in $programs; do
  check_help "$program"
  check "$program" "$program: error: unknown option \"--no-such-option\" (see $program --help)" --no-such-option
done
check plots_demo "plots_demo: error: unknown option \"out\" (see plots_demo --help)" out
check hf_logits "hf_logits: error: --model, --tokens and --out are required (see hf_logits --help)" --model x
check logfmt "--steps: expected an integer in [1, 1000000000], got '0'" --steps 0
check logfmt "--warm-steps: expected an integer in [1, 1000000000], got '-3'" --warm-steps -3
check search "--budget: expected a number in [0.1, 100000], got '0'" --budget 0
check search "--candidates: expected an integer in [2, 1000], got '1'" --candidates 1
# values: a missing one, and at least one malformed number of every program that reads numbers
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
check generate "--tokens: expected an integer in [1, 16777216], got '0'" --tokens 0
check generate "--top-k: expected an integer in [0, 16777216], got '-1'" --top-k -1
check generate "--temperature: expected a number in [0, 100], got 'inf'" --temperature inf
check generate "generate: error: --checkpoint: expected a value" --checkpoint
check balance "balance: error: --steps: expected an integer in [1, 1000000000], got '0'" --steps 0
check balance "--balance-alpha: expected a number in [0, 10], got 'nan'" --balance-alpha nan
check balance "--bias-speed: expected a number in [0, 10], got '-1'" --bias-speed -1
check balance "balance: error: --data: expected a value" --data
check fp8_error "fp8_error: error: --m: expected an integer in [2, 65536], got '1'" --m 1
check fp8_error "--draws: expected an integer in [0, 1000], got '2x'" --draws 2x
check fp8_error "--n: expected an integer in [1, 65536], got '0'" --n 0
check fp8_error "fp8_error: error: --out: expected a value" --out
check fp8_train "fp8_train: error: --batch: expected an integer in [1, 65536], got '-1'" --batch -1
check fp8_train "--seq: expected an integer in [1, 256], got '1000'" --seq 1000
check fp8_train "--steps: expected an integer in [1, 1000000000], got '0'" --steps 0
check fp8_train "--lr: expected a number in [0, 10], got '-1'" --lr -1
check fp8_train "fp8_train: error: --out: expected a value" --out
check params "params: error: --seq: expected an integer in [1, 4194304], got 'abc'" --seq abc
check params "--seq: expected an integer in [1, 4194304], got '0'" --seq 0
check params "--preset: expected tiny, small, large, v2_lite or v3_671b, found \"huge\"" --preset huge
check params "params: error: --preset: expected a value" --preset
check prepare_data "prepare_data: error: --vocab: expected an integer in [256, 1048576], got 'abc'" --vocab abc
check prepare_data "--synthetic: expected an integer in [1, 68719476736], got '0'" --synthetic 0
check prepare_data "--val-fraction: expected a number in [0, 0.999], got '1'" --val-fraction 1
check prepare_data "--seed: expected an integer in [0, 9223372036854775807], got '-1'" --seed -1
check prepare_data "prepare_data: error: give exactly one of --text FILE and --synthetic BYTES" --vocab 512
check prepare_data "prepare_data: error: --out: expected a value" --out
check prepare_data "prepare_data: error: --out-dir: expected a value" --out-dir
check hf_logits "hf_logits: error: --tokens: expected a value" --tokens
check plots_demo "plots_demo: error: --out: expected a value" --out
# and two checkpoints of the defects list, through build/generate: a header line of 5000 bytes (once a double free)
# and a step count beyond int (once "error: stoi")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf 'dsv3-checkpoint 1\n%05000d\n' 0 >"$tmp/long.ckpt"
check generate "checkpoint $tmp/long.ckpt: header line too long" --checkpoint "$tmp/long.ckpt"
printf 'dsv3-checkpoint 1\nstep=99999999999\n' >"$tmp/step.ckpt"
check generate "step: expected an integer in [0, 2147483647], got '99999999999'" --checkpoint "$tmp/step.ckpt"
[ "$failed" -eq 0 ] && echo "flags: every --help complete, every unknown option and malformed value refused with its flag's name" || echo "flags: $failed failed"
exit "$failed"
