"""bench/gpu_check.sh and what its smoke steps run, on a machine without CUDA: every step is
skipped with that reason and the script exits 0; the step runner's time limits, failures and
budget hold; bench/smoke.py's measurements run (on the CPU, at tiny sizes). So the script cannot
rot while no GPU is at hand."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMOKE_STEPS = ["install", "correctness", "timings", "vit", "timings-compile"]
QUICK_STEPS = ["bench-bottleneck", "bench-lora", "bench-sparse", "bench-vit", "bench-multitask", "report", "tests",
               "demo", "compile_check"]

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run on a machine without CUDA")


def gpu_check(out, *flags):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out), *flags], env=env,
                          capture_output=True, text=True, timeout=120)


def summary(out) -> list[tuple[str, str]]:
    lines = (pathlib.Path(out) / "summary.txt").read_text().splitlines()
    return [(line.split()[0], " ".join(line.split()[1:-2])) for line in lines]


@needs_no_cuda
@pytest.mark.parametrize("flags, steps", [
    (["--smoke"], SMOKE_STEPS),
    ([], SMOKE_STEPS + QUICK_STEPS),
    (["--full", "--no-smoke"], ["install"] + QUICK_STEPS),
])
@pytest.mark.slow
def test_every_step_is_skipped_without_cuda(tmp_path, flags, steps):
    done = gpu_check(tmp_path, *flags)
    assert done.returncode == 0, done.stdout + done.stderr
    assert summary(tmp_path) == [(step, "skipped: no CUDA") for step in steps]
    env = (tmp_path / "env.txt").read_text()
    assert "no CUDA device" in env and "torch" in env and "commit" in env
    assert "=== summary" in done.stdout


@pytest.mark.parametrize("flags", [["--fast"], ["--budget", "ten"], ["--smoke", "--no-smoke"], ["--budget"]])
def test_bad_flags_are_refused(tmp_path, flags):
    done = gpu_check(tmp_path, *flags)
    assert done.returncode == 2 and done.stderr.strip(), (done.stdout, done.stderr)
    assert not (tmp_path / "summary.txt").exists()


def test_no_output_folder_is_refused():
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr


@pytest.mark.slow
def test_step_runner_limits_and_records(tmp_path):
    # The step runner as gpu_check.sh sources it, with CUDA declared present.
    marker = tmp_path / "survived"
    script = f"""
        out={tmp_path} summary={tmp_path}/summary.txt cuda=1 problems=0 budget=40
        deadline=$((SECONDS + budget))
        . {ROOT}/bench/steps.sh
        step fine 5 echo written
        step broken 5 false
        # A background child must die with its step: it would touch the marker after 4 s.
        step slow 1 bash -c '(sleep 4; touch {marker}) & sleep 30'
        deadline=$((SECONDS + 5))
        step late 60 true
        echo "problems $problems"
    """
    start = time.monotonic()
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    assert summary(tmp_path) == [("fine", "ok"), ("broken", "failed (rc 1)"), ("slow", "timed out after 1 s"),
                                 ("late", "skipped: out of time (budget 40 s)")]
    assert (tmp_path / "fine.txt").read_text() == "written\n"
    assert "problems 3" in done.stdout
    assert elapsed < 20
    time.sleep(4)
    assert not marker.exists(), "the timed-out step's background child outlived it"


@pytest.mark.slow  # torch.compile of every op's reference: about 20 s on two cores
def test_smoke_op_timings_run(tmp_path):
    # Tiny shapes: the fused ops run in the interpreter (times meaningless), every row is written;
    # a second call (the torch.compile step) adds its rows to the same files.
    from bench import smoke

    tiny = ["--rows", "37", "--dim", "48", "--dtype", "fp16", "--rounds", "1"]
    assert smoke.main(["ops", str(tmp_path), "--providers", "eager", "fused", *tiny]) == 0
    data = json.loads((tmp_path / "timings.json").read_text())
    rows = {(r["op"], r["pass"], r["provider"], r["variant"]) for r in data["rows"]}
    ops = ["bottleneck", "sparse_adapter", "routed_adapter", "lora", "adapter_fusion"]
    expected = {(op, p, provider, "default") for op in ops for p in smoke.PASSES for provider in ("eager", "fused")}
    expected |= {("lora", p, "fused", "single_launch") for p in smoke.PASSES}
    assert rows == expected
    assert all("error" not in r and r["median_us"] > 0 and r["floor_bytes"] > 0 for r in data["rows"])
    assert data["copy_gbps"] > 0
    table = (tmp_path / "timings.md").read_text()
    assert table.count("| lora |") == 6 and "fused[single_launch]" in table
    assert smoke.main(["ops", str(tmp_path), "--providers", "compile", *tiny]) == 0
    data = json.loads((tmp_path / "timings.json").read_text())
    assert len(data["rows"]) == len(expected) + 2 * len(ops)
    assert all("error" not in r for r in data["rows"])


@pytest.mark.slow
def test_smoke_vit_step_runs(tmp_path):
    from bench import smoke

    assert smoke.main(["vit", str(tmp_path), "--batch", "2", "--model", "vit_tiny_patch16_224", "--img-size", "32",
                       "--rounds", "1"]) == 0
    data = json.loads((tmp_path / "vit.json").read_text())
    assert [r["provider"] for r in data["rows"]] == ["eager", "fused"]
    assert all(r["images_per_s"] > 0 for r in data["rows"])
