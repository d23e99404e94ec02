#!/usr/bin/env bash
# Everything GPU-side in one call: install, the tests on CUDA (bf16 and real launches included),
# the compile check, the benchmark suite with its JSON and report, and the demo. Results go to
# the folder given, one file each; a summary is printed last.
#
#   bash bench/gpu_check.sh OUTPUT_DIR          # quick benchmark (a few minutes)
#   bash bench/gpu_check.sh OUTPUT_DIR --full   # every shape of the suite (an hour or more)
#
# The GPU machines have torch, triton, timm and pytest but no network, hence --no-deps.
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUTPUT_DIR [--full]}
mode=${2:-}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  git log -1 --oneline 2>/dev/null || true
} > "$out/env.txt" 2>&1

pip install --no-build-isolation --no-deps -e . > "$out/install.log" 2>&1
install_rc=$?
if [ "$install_rc" != 0 ] || ! python3 -c "import fused_adapters.kernels" >> "$out/install.log" 2>&1; then
  # No setuptools or no writable site-packages: map the package by hand, as setup.py does.
  shim=$(mktemp -d)
  mkdir -p "$shim/fused_adapters"
  ln -s "$PWD/kernels" "$shim/fused_adapters/kernels"
  ln -s "$PWD/adapters" "$shim/fused_adapters/adapters"
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c "import fused_adapters.kernels, fused_adapters.adapters" >> "$out/install.log" 2>&1
  install_rc=$?
  echo "installed through a PYTHONPATH shim (rc $install_rc)" >> "$out/install.log"
fi

python3 -m pytest -q -rs tests > "$out/tests.txt" 2>&1
tests_rc=$?

# The compile check needs no GPU (any machine runs it): quick runs the bottleneck kernels (with the
# column-major forward of LoSA's token mixers) and the LoRA linear's single launch only (the sparse kernels' 1184 cases take minutes even on 16
# cores), --full every kernel.
kernels="--kernel forward backward_hidden backward_weights forward_column_major lora_forward lora_backward_input lora_backward_weights"
[ "$mode" = "--full" ] && kernels=
python3 -m fused_adapters.kernels.compile_check $kernels > "$out/compile_check.txt" 2>&1
compile_rc=$?

# Quick: bytes counted (interpreter, on the CPU cores) for the smallest M only, to stay in minutes,
# and no torch.compile rows for the sparse ops (each compiles the eager expert loop anew).
quick=--benchmark-quick
count_rows=--benchmark-count-rows=1576
select="not (test_sparse and compile)"
[ "$mode" = "--full" ] && quick= && count_rows= && select=
python3 -m pytest --benchmark $quick $count_rows -q -p no:cacheprovider -k "$select" \
  --benchmark-json "$out/benchmark.json" > "$out/benchmark.txt" 2>&1
bench_rc=$?
python3 -m bench.report "$out/benchmark.json" --out "$out/report" > "$out/report.log" 2>&1
report_rc=$?

# ViT-B/16, batch 32: 6304 tokens of width 768, Adapter+ rank 8.
python3 bench/demo.py --rows 6304 --dim 768 --rank 8 > "$out/demo.txt" 2>&1
demo_rc=$?

cat "$out/env.txt"
echo "--- tests (rc $tests_rc)"; tail -n 15 "$out/tests.txt"
echo "--- compile check (rc $compile_rc)"; tail -n 2 "$out/compile_check.txt"
echo "--- benchmark (rc $bench_rc, report rc $report_rc)"; tail -n 3 "$out/benchmark.txt"
[ -f "$out/report/report.md" ] && sed -n '1,60p' "$out/report/report.md"
echo "--- demo (rc $demo_rc)"; cat "$out/demo.txt"
echo "install $install_rc tests $tests_rc compile_check $compile_rc benchmark $bench_rc report $report_rc demo $demo_rc"
[ "$install_rc$tests_rc$compile_rc$bench_rc$report_rc$demo_rc" = "000000" ]
