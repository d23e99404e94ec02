# Step runner for bench/gpu_check.sh (sourced): each step under its own time limit, one summary
# line a step. Expects out (the output folder), summary (its summary file), deadline and budget
# (seconds, against bash's SECONDS), cuda (1 when a CUDA device is there) and problems (a count).

# One summary line per step, also printed as it happens.
record() {
  printf '%-16s %-44s %5s s\n' "$1" "$2" "$3" >> "$summary"
  echo "[gpu_check] $1: $2 ($3 s)"
}

# step NAME LIMIT COMMAND...: COMMAND under timeout (LIMIT seconds, less if the budget has less
# left), its stdout and stderr in $out/NAME.txt. Without CUDA, or with under 10 s of the budget
# left, the step is skipped and says why.
step() {
  local name=$1 limit=$2 left start rc status
  shift 2
  if [ "$cuda" != 1 ]; then record "$name" "skipped: no CUDA" 0; return; fi
  left=$((deadline - SECONDS))
  if [ "$left" -lt 10 ]; then
    record "$name" "skipped: out of time (budget ${budget} s)" 0; problems=$((problems + 1)); return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  start=$SECONDS
  # timeout signals the command's whole process group, so background shards die with it.
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.txt" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out after ${limit} s" ;;
    *) status="failed (rc $rc)" ;;
  esac
  [ "$rc" = 0 ] || problems=$((problems + 1))
  record "$name" "$status" $((SECONDS - start))
}
