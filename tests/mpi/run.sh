#!/usr/bin/env bash
# The MPI tests (header section 9.3b), run by `make test-mpi` and, when MPI is installed, at the end of `make test`.
# Ranks are processes of this machine (loopback), under mpirun with 2 and 4 processes (oversubscribed on 2 cores):
#   1. build/test_mpi: collectives, DP, EP and DP x EP over MPI, bitwise against thread ranks, and against one rank
#      (EP bitwise, DP and DP x EP within tolerance)
#   2. a rank that fails ends the whole job with its error, within a timeout (no hang): fail-throw, fail-size, fail-long
#   3. build/train_mpi: DP and DP x EP losses track build/train; a DP x EP run resumed from its checkpoint repeats the
#      uninterrupted run bit for bit (so rank 0 saved every rank's experts)
#   4. Ctrl-C (SIGINT to mpirun) saves a checkpoint that resumes bit for bit
set -euo pipefail
cd "$(dirname "$0")/../.."
MPIRUN=(mpirun --allow-run-as-root --oversubscribe)   # CI may run as root; more processes than cores
export OMP_NUM_THREADS=1                              # one thread per process: 4 processes on 2 cores stay fast
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
failed=0
ok()  { echo "  ok    $*"; }
bad() { echo "  FAIL  $*"; failed=1; }

echo "MPI tests ($(mpirun --version | head -1))"
for np in 2 4; do
  if timeout 300 "${MPIRUN[@]}" -np $np build/test_mpi > "$TMP/out" 2>&1; then ok "$(tail -1 "$TMP/out")"
  else cat "$TMP/out"; bad "build/test_mpi on $np processes"; fi
done

# A failing rank: mpirun must return non-zero, with the rank's message, long before the timeout (124).
for np in 2 4; do
  for mode in fail-throw:"fails on purpose" fail-size:"which sends 8 bytes" fail-long:"MPI_ERR_TRUNCATE"; do
    name=${mode%%:*} want=${mode#*:} rc=0
    timeout 60 "${MPIRUN[@]}" -np $np build/test_mpi "$name" > "$TMP/out" 2>&1 || rc=$?
    if [ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -q "error: rank .*$want" "$TMP/out"; then
      ok "$name on $np processes: exit $rc, $(grep -m1 'error: rank' "$TMP/out")"
    else cat "$TMP/out"; bad "$name on $np processes: exit $rc (124: hung until the timeout)"; fi
  done
done

# build/train_mpi against build/train, same data, seed and batches: the main loss of every step within 1e-4.
ARGS=(--data README.md --steps 6 --batch 4 --seq 64 --sample 0 --eval-every 3 --eval-windows 4)
close() {  # close FILE_A FILE_B: same steps, main losses within 1e-4 relative
  awk 'NR == FNR { a[$1] = $2; next } { n++; d = $2 - a[$1]; if (d < 0) d = -d; if (!($1 in a) || d > 1e-4 * $2) bad++ }
       END { exit (n == 6 && !bad) ? 0 : 1 }' "$1" "$2"
}
timeout 120 build/train "${ARGS[@]}" --no-save --loss-log "$TMP/single" > /dev/null
timeout 120 "${MPIRUN[@]}" -np 2 build/train_mpi "${ARGS[@]}" --no-save --loss-log "$TMP/dp2" > /dev/null
timeout 120 "${MPIRUN[@]}" -np 4 build/train_mpi "${ARGS[@]}" --ep --no-save --loss-log "$TMP/ep4" > /dev/null
if close "$TMP/single" "$TMP/dp2"; then ok "train_mpi on 2 processes (DP): losses within 1e-4 of build/train"
else bad "train_mpi DP losses"; paste "$TMP/single" "$TMP/dp2"; fi
if close "$TMP/single" "$TMP/ep4"; then ok "train_mpi --ep on 4 processes (DP x EP): losses within 1e-4 of build/train"
else bad "train_mpi --ep losses"; paste "$TMP/single" "$TMP/ep4"; fi

# Resume under EP: 3 steps and a checkpoint, then 3 more from it, against 6 in one go (the first 100 steps are
# warm-up, whose learning rate does not depend on --steps). Also checks that the checkpoint, the Hugging Face
# directory and the plots are written by rank 0 under EP.
EP4=(timeout 120 "${MPIRUN[@]}" -np 4 build/train_mpi "${ARGS[@]}" --ep)
"${EP4[@]}" --out "$TMP/full" --loss-log "$TMP/full.log" > /dev/null
"${EP4[@]}" --steps 3 --out "$TMP/part" --loss-log "$TMP/a.log" > /dev/null
"${EP4[@]}" --resume "$TMP/part/checkpoint.bin" --out "$TMP/part" --loss-log "$TMP/b.log" > /dev/null
if cat "$TMP/a.log" "$TMP/b.log" | cmp -s - "$TMP/full.log" && [ -f "$TMP/full/hf/model.safetensors" ]; then
  ok "train_mpi --ep on 4 processes: resumed run bitwise the uninterrupted one (loss, MTP loss, gradient norm)"
else bad "train_mpi --ep resume"; paste "$TMP/full.log" <(cat "$TMP/a.log" "$TMP/b.log"); fi

# Ctrl-C under mpirun: SIGINT to mpirun reaches the ranks, which stop after the same step (they agree on it in
# every step's all-reduce of the stop flags), rank 0 saves atomically, and the run resumed from that checkpoint ends
# with the uninterrupted run's losses bit for bit.
DP2=(timeout 120 "${MPIRUN[@]}" -np 2 build/train_mpi "${ARGS[@]}" --steps 300 --eval-every 1000)
"${DP2[@]}" --out "$TMP/full2" --loss-log "$TMP/full2.log" > /dev/null
"${DP2[@]}" --out "$TMP/int" --loss-log "$TMP/c.log" > "$TMP/int.out" 2>&1 &
job=$!
for _ in $(seq 600); do grep -q "step [2-9][0-9]/300" "$TMP/int.out" 2>/dev/null && break; sleep 0.1; done
pkill -INT -P "$job" -x mpirun || true   # timeout's child: mpirun, as a terminal's Ctrl-C would reach it
rc=0; wait "$job" || rc=$?
stopped=$(sed -n 's/^interrupted after step \([0-9]*\) of 300.*/\1/p' "$TMP/int.out")
if [ -n "$stopped" ] && [ "$stopped" -lt 300 ] && [ -f "$TMP/int/checkpoint.bin" ]; then
  "${DP2[@]}" --resume "$TMP/int/checkpoint.bin" --out "$TMP/int" --loss-log "$TMP/d.log" > /dev/null
  if cat "$TMP/c.log" "$TMP/d.log" | cmp -s - "$TMP/full2.log"; then
    ok "train_mpi on 2 processes: Ctrl-C to mpirun saved after step $stopped (exit $rc); resumed: bitwise uninterrupted"
  else bad "train_mpi Ctrl-C resume"; paste "$TMP/full2.log" <(cat "$TMP/c.log" "$TMP/d.log") | head; fi
else tail -5 "$TMP/int.out"; bad "train_mpi Ctrl-C under mpirun: exit $rc, no 'interrupted after step' or checkpoint"; fi

[ $failed -eq 0 ] && echo "MPI tests passed" || { echo "MPI tests FAILED"; exit 1; }
