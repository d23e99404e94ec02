#!/usr/bin/env bash
# Everything GPU-side in one script, each step under its own time limit, the most valuable numbers
# first. Every step writes its files to OUTPUT_DIR as soon as it ends; summary.txt gets one line a
# step (ok, failed, timed out, skipped and why, seconds), so a run cut short still says what it did.
#
#   bash bench/gpu_check.sh OUTPUT_DIR --smoke       # the first call on a new GPU: under 5 minutes
#   bash bench/gpu_check.sh OUTPUT_DIR [--quick]     # smoke steps, then the quick benchmark module by module,
#                                                    # report, test suite, demo, compile check (570 s in all)
#   bash bench/gpu_check.sh OUTPUT_DIR --full        # the same with every benchmark shape and kernel (hours)
#   ... --no-smoke                                   # leave out the smoke steps (a second call after --smoke)
#   ... --budget SECONDS                             # the whole run's time limit (steps past it are skipped)
#
# Smoke steps, in order: env.txt; install; correctness (tests/test_gpu_smoke.py: every op's default
# path in fp16 and bf16, forward and backward); timings of eager and fused (bench/smoke.py ops:
# timings.json/.md); the ViT-B/16 Adapter+ train step (vit.json/.md); the torch.compile timings
# (added to timings.json/.md: Inductor's cold compiles are the slowest part, so they come last).
# See docs/gpu-check.md for the order of calls on a lent GPU and how long each takes.
#
# The GPU machines have torch, triton, timm and pytest but no network, hence --no-deps. Without CUDA
# every step is skipped ("skipped: no CUDA") and the script exits 0; tests/test_gpu_check.py runs it so.
set -uo pipefail
usage="usage: bash bench/gpu_check.sh OUTPUT_DIR [--smoke | --quick | --full] [--no-smoke] [--budget SECONDS]"
[ $# -ge 1 ] && [ "${1#--}" = "$1" ] || { echo "$usage" >&2; exit 2; }
out=$1; shift
mode=quick smoke=1 budget=
while [ $# -gt 0 ]; do
  case $1 in
    --smoke|--quick|--full) mode=${1#--} ;;
    --no-smoke) smoke=0 ;;
    --budget)
      case ${2:-} in ''|*[!0-9]*) echo "--budget takes whole seconds, got '${2:-}'" >&2; exit 2 ;; esac
      budget=$2; shift ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
  shift
done
# Whole-run limits: smoke under 5 minutes; quick within one 10-minute command, with room to spare.
[ -n "$budget" ] || budget=$( case $mode in smoke) echo 290 ;; quick) echo 570 ;; full) echo 21600 ;; esac )
[ "$mode" = smoke ] && [ "$smoke" = 0 ] && { echo "--smoke with --no-smoke leaves nothing to run" >&2; exit 2; }

mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
unset TRITON_INTERPRET
python=${PYTHON:-python3}
deadline=$((SECONDS + budget))
summary=$out/summary.txt
: > "$summary"
problems=0
. bench/steps.sh

{
  date -u
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  "$python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
  git log -1 --format='commit %H %s' 2>/dev/null || echo "commit: not a git checkout"
  echo "mode $mode, smoke steps $smoke, budget $budget s"
} > "$out/env.txt" 2>&1
cuda=0
"$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && cuda=1

install() {
  if "$python" -m pip install --no-build-isolation --no-deps -e . && "$python" -c "import fused_adapters.kernels"; then
    return 0
  fi
  # No setuptools or no writable site-packages: map the package by hand, as setup.py does (the
  # shim's path reaches the later steps through install.env).
  local shim
  shim=$(mktemp -d)
  mkdir -p "$shim/fused_adapters"
  ln -s "$PWD/kernels" "$shim/fused_adapters/kernels"
  ln -s "$PWD/adapters" "$shim/fused_adapters/adapters"
  ln -s "$PWD/package/__init__.py" "$shim/fused_adapters/__init__.py"
  echo "export PYTHONPATH=$shim\${PYTHONPATH:+:\$PYTHONPATH}" > "$out/install.env"
  PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}" "$python" -c "import fused_adapters.kernels, fused_adapters.adapters" \
    && echo "installed through a PYTHONPATH shim"
}

# The smoke selection in four processes at once (each compiles its own kernels: the cold
# compiles are most of this step's time).
correctness() {
  local group pid rc=0 pids=()
  for group in bottleneck lora sparse fusion; do
    "$python" -m pytest -q -rs -p no:cacheprovider tests/test_gpu_smoke.py -k "$group" \
      > "$out/correctness-$group.txt" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  tail -n 3 "$out"/correctness-*.txt
  return $rc
}

# The whole suite on CUDA, on several workers when pytest-xdist is there.
suite() {
  local workers=()
  "$python" -c "import xdist" 2>/dev/null && workers=(-n 8)
  "$python" -m pytest -q -rs -p no:cacheprovider "${workers[@]}" tests
}

export -f install correctness suite
export out python

step install 90 bash -c install
[ -f "$out/install.env" ] && . "$out/install.env"

if [ "$smoke" = 1 ]; then
  step correctness 100 bash -c correctness
  step timings 75 "$python" -m bench.smoke ops "$out" --providers eager fused
  step vit 50 "$python" -m bench.smoke vit "$out"
  step timings-compile 120 "$python" -m bench.smoke ops "$out" --providers compile
fi

if [ "$mode" != smoke ]; then
  # The benchmark module by module, each its own JSON (pytest-benchmark writes it at the end of a
  # session: a module cut short loses only its own rows), the most wanted first. Quick: the
  # CI-sized shapes, no interpreter byte counts (device-free: a CPU run has them) and no
  # torch.compile rows for the sparse ops (each compiles the eager expert loop anew).
  bench_args=(--benchmark-quick --benchmark-count-rows=0 -k "not (test_sparse and compile)")
  limits=(bottleneck:150 lora:120 sparse:150 vit:240 multitask:120)
  # The compile check needs no GPU: quick runs the bottleneck kernels (with the column-major
  # forward of LoSA's token mixers) and the LoRA linear's single launch (the sparse kernels' 1184
  # cases take minutes even on 16 cores), --full every kernel.
  kernels=(--kernel forward backward_hidden backward_weights forward_column_major lora_forward lora_backward_input
           lora_backward_weights)
  if [ "$mode" = full ]; then
    bench_args=() kernels=() limits=(bottleneck:7200 lora:3600 sparse:7200 vit:3600 multitask:3600)
  fi
  for entry in "${limits[@]}"; do
    module=${entry%%:*}
    step "bench-$module" "${entry#*:}" "$python" -m pytest --benchmark "bench/test_$module.py" "${bench_args[@]}" -q \
      -p no:cacheprovider --benchmark-json "$out/benchmark-$module.json"
  done
  jsons=("$out"/benchmark-*.json)
  if [ "$cuda" = 1 ] && [ ! -e "${jsons[0]}" ]; then
    record report "skipped: no benchmark JSON" 0; problems=$((problems + 1))
  else
    step report 60 "$python" -m bench.report "${jsons[@]}" --out "$out/report"
  fi
  step tests 1800 bash -c suite
  # ViT-B/16, batch 32: 6304 tokens of width 768, Adapter+ rank 8.
  step demo 90 "$python" bench/demo.py --rows 6304 --dim 768 --rank 8
  step compile_check 1800 "$python" -m fused_adapters.tools.compile_check "${kernels[@]}"
fi

echo "=== env"; cat "$out/env.txt"
for file in timings.md vit.md; do [ -f "$out/$file" ] && { echo "=== $file"; cat "$out/$file"; }; done
[ -f "$out/tests.txt" ] && { echo "=== tests"; tail -n 15 "$out/tests.txt"; }
[ -f "$out/compile_check.txt" ] && { echo "=== compile check"; tail -n 2 "$out/compile_check.txt"; }
[ -f "$out/report/report.md" ] && { echo "=== report"; sed -n '1,60p' "$out/report/report.md"; }
[ -f "$out/demo.txt" ] && { echo "=== demo"; cat "$out/demo.txt"; }
echo "=== summary (mode $mode, budget $budget s, $SECONDS s in all)"; cat "$summary"
[ "$problems" = 0 ]
