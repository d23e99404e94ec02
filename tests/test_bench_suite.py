"""The benchmark suite's plumbing: which command collects what, the byte floors against hand
counts, and a small real run whose JSON carries every key the report reads."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from bench.measure import floor_bytes, rotation_count
from fused_adapters.kernels import paths

ROOT = pathlib.Path(__file__).resolve().parent.parent
ROW_KEYS = {"op", "pass", "device", "dtype", "shape", "rows", "dim", "rank", "provider", "variant",
            "triton_launches", "aten_kernels", "saved_bytes", "floor_bytes", "moved_bytes", "gbps", "copy_gbps",
            "peak_mem_bytes", "host_us"}


def pytest_run(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run([sys.executable, "-m", "pytest", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def collected(*args):
    done = pytest_run("--collect-only", "-q", "-p", "no:cacheprovider", *args)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return [line.split("::")[0] for line in done.stdout.splitlines() if "::" in line]


def test_floor_bytes_against_hand_counts():
    # ViT-B/16 batch 32, fp16: M x D = 6304 x 768 = 4,841,472 elements of 2 bytes.
    elements = 6304 * 768
    assert elements == 4_841_472
    assert floor_bytes("forward", 6304, 768, 2, 2) == 19_365_888  # read x, write y
    assert floor_bytes("backward", 6304, 768, 2, 2) == 29_048_832  # read dy and x, write dx
    assert floor_bytes("forward+backward", 6304, 768, 2, 2) == 48_414_720
    # Another residual tensor is one more read forward; its gradient is dy itself.
    assert floor_bytes("forward", 6304, 768, 2, 2, residual="tensor") == 29_048_832
    assert floor_bytes("backward", 6304, 768, 2, 2, residual="tensor") == 29_048_832
    # fp32 x under bf16 autocast: x, y, dy and dx all fp32 (the fp32 residual promotes y).
    assert floor_bytes("forward", 1576, 384, 4, 4) == 1576 * 384 * 8
    # bf16 x with an fp32 output (an fp32 residual): y and dy are 4 bytes, x and dx 2.
    assert floor_bytes("backward", 10, 3, 2, 4) == 10 * 3 * (4 + 2 + 2)
    with pytest.raises(ValueError, match="pass_name must be one of"):
        floor_bytes("backwards", 1, 1, 2, 2)
    with pytest.raises(ValueError, match="residual must be"):
        floor_bytes("forward", 1, 1, 2, 2, residual="skip")


def test_lora_floor_against_hand_counts():
    # ViT-B qkv, M = 394, fp32: x [394, 768], y [394, 2304], the frozen W [2304, 768] read once a pass.
    x, y, weight = 394 * 768 * 4, 394 * 2304 * 4, 2304 * 768 * 4
    assert floor_bytes("forward", 394, 768, 4, 4, residual="none", dim_out=2304, weight_bytes=weight) == x + y + weight
    # Backward: read dy and x (and W), write dx.
    assert (floor_bytes("backward", 394, 768, 4, 4, residual="none", dim_out=2304, weight_bytes=weight)
            == y + 2 * x + weight)
    # bf16 y from fp32 x (autocast): y and dy are 2 bytes.
    assert floor_bytes("forward", 10, 3, 4, 2, residual="none", dim_out=9) == 10 * (3 * 4 + 9 * 2)
    with pytest.raises(ValueError, match="needs y as wide as x"):
        floor_bytes("forward", 1, 3, 2, 2, dim_out=9)


def test_lora_suite_rows():
    import bench.test_lora as suite

    assert list(suite.shapes(False, True)) == [("fp32", 768, 2304, 2, 8)]  # the CPU quick run: one shape
    quick, full = set(suite.shapes(True, True)), set(suite.shapes(True, False))
    assert {(dim, dim_out) for _, dim, dim_out, _, _ in quick} == {(768, 2304), (768, 3072)}
    assert {(dim, dim_out) for _, dim, dim_out, _, _ in full} == {(768, 2304), (768, 3072), (1024, 3072), (1024, 4096)}
    assert {rank for *_, rank in quick} == {8} and {rank for *_, rank in full} == {8, 16}
    assert {batch for _, _, _, batch, _ in full} == {8, 32, 128}
    assert {"_bottleneck_forward_kernel", "_backward_hidden_kernel"} <= suite.KERNEL_NAMES


@pytest.mark.skipif(not paths.is_interpreted(), reason="counts launches in Triton's interpreter")
@pytest.mark.parametrize("variant", ["default", "store_act"])
def test_lora_counts_match_the_planned_launches(variant):
    # count_case runs the base GEMM and the fused branch; the branch launches what fused_launches plans.
    from bench.measure import count_case, fused_launches

    case = {"op": "lora", "variant": variant, "rows": 24, "dim": 32, "dim_out": 96, "rank": 8, "scale": 2.0,
            "dtype": "fp32", "sms": 132, "pass": "forward+backward"}
    counts = count_case(dict(case, provider="fused"))
    forward = len(fused_launches(dict(case, **{"pass": "forward"})))
    assert forward == 1 and len(fused_launches(case)) == 3
    assert counts["forward"]["triton_launches"] == forward
    assert counts["backward"]["triton_launches"] == 2
    assert counts["forward"]["aten_kernels"] >= 1  # the base GEMM
    eager = count_case(dict(case, provider="eager"))
    assert eager["forward"]["triton_launches"] == 0 and eager["forward"]["aten_kernels"] > 1


def test_multilora_suite_rows():
    import bench.test_multilora as suite

    assert suite.shapes(False, True) == [("fp32", 768, 2304, 2)]  # the CPU quick run: qkv, batch 2
    assert suite.shapes(False, False) == [("fp32", 768, 2304, 8), ("fp32", 768, 3072, 8)]
    for quick, batches in ((True, {8, 64}), (False, {8, 32, 128})):
        shapes = suite.shapes(True, quick)
        assert {(dim, dim_out) for _, dim, dim_out, _ in shapes} == {(768, 2304), (768, 3072)}
        assert {batch for *_, batch in shapes} == batches
    assert set(suite.PROVIDERS) == {"routed", "loop-fused", "loop-eager", "gather-eager", "compile"}
    assert {"_sparse_forward_kernel", "_sparse_backward_input_kernel",
            "_bottleneck_forward_kernel"} <= suite.KERNEL_NAMES


@pytest.mark.parametrize("images, dim_out", [(8, 96), (3, 32)])
def test_multilora_providers_agree(images, dim_out):
    # Every provider computes base + s (x A_t^T) B_t^T with t each image's task, and the same gradients.
    import torch

    from bench.measure import MULTILORA_FUNCTIONS, differentiable, multilora_call, multilora_inputs

    inputs = multilora_inputs(images, 5, 32, dim_out, 4, min(8, images), torch.float32, "cpu",
                              torch.Generator().manual_seed(0))
    assert sorted(k for k in inputs if k.startswith("index")) == [f"index{t}" for t in range(min(8, images))]
    with pytest.raises(ValueError, match=f"a batch of {images} images holds 1 to {images} tasks"):
        multilora_inputs(images, 5, 32, dim_out, 4, images + 1, torch.float32, "cpu")
    x, weight, bias = inputs["x"], inputs["weight"], inputs["bias"]
    expected = torch.stack([torch.nn.functional.linear(x[b], weight, bias) + 2.0 * (
        x[b] @ inputs[f"lora_A{b % 8}"].T @ inputs[f"lora_B{b % 8}"].T) for b in range(images)])
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    wanted = differentiable(inputs)
    assert len(wanted) == 1 + 2 * min(8, images)  # x and every task's A and B; not W, b or the routing
    grads = torch.autograd.grad(expected, wanted, grad)
    for name, fn in MULTILORA_FUNCTIONS.items():
        y = multilora_call(fn, inputs, 2.0)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5, msg=name)
        for mine, theirs in zip(torch.autograd.grad(y, wanted, grad), grads):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.skipif(not paths.is_interpreted(), reason="counts bytes in Triton's interpreter")
def test_indexed_rows_charge_the_rows_an_indexing_op_touches():
    # The byte counter charges an indexing op its whole tensor; the multi-LoRA counts charge the rows.
    import torch

    from bench.measure import count_moved

    x = torch.randn(8, 4, 32)  # 8 images of 4 x 32 fp32: 512 bytes each
    index = torch.tensor([1, 5])  # 16 bytes
    rows = torch.randn(2, 4, 32)
    for indexed_rows in (False, True):
        with count_moved(132, indexed_rows) as report:
            x[index]
            x.index_select(0, index)
            x.index_add_(0, index, rows)
            x.index_put_((index,), rows, accumulate=True)
            x.index_put_((index,), rows)
        charged = [(event.op, event.read, event.written) for event in report.aten]
        whole = x.numel() * 4
        if not indexed_rows:
            assert charged[0] == ("index", whole + 16, 1024) and charged[2][2] == whole
            assert not hasattr(report, "indexed_rows")
            continue
        assert charged == [("index", 1024 + 16, 1024), ("index_select", 1024 + 16, 1024),
                           ("index_add_", 1024 + 16 + 1024, 1024), ("index_put_", 1024 + 16 + 1024, 1024),
                           ("index_put_", 1024 + 16, 1024)]
        assert len(report.indexed_rows.recharged) == 5
        assert all(counted > recharged for counted, recharged in report.indexed_rows.recharged)


@pytest.mark.skipif(not paths.is_interpreted(), reason="counts launches in Triton's interpreter")
def test_multilora_counts_match_the_planned_launches():
    # routed: one launch forward, two backward, what fused_launches plans (the compile check's
    # launches); loop-fused: the branch's launches once per task.
    from bench.measure import MULTILORA_FUSED, count_case, fused_launches

    case = {"op": "multilora", "variant": "default", "rows": 4 * 3, "images": 4, "tasks": 4, "dim": 32,
            "dim_out": 96, "rank": 8, "scale": 2.0, "dtype": "fp32", "sms": 132, "pass": "forward+backward"}
    counts = {provider: count_case(dict(case, provider=provider)) for provider in MULTILORA_FUSED}
    planned = fused_launches(case)
    assert [launch.kernel.__name__ for launch in planned] == [
        "_sparse_forward_kernel", "_sparse_backward_input_kernel", "_sparse_backward_weights_kernel"]
    assert tuple(planned[0].args["w_up_ptr"].shape) == (4, 96, 8)  # the tasks' B stacked: [T, D_out, r]
    launches = {provider: (count["forward"]["triton_launches"], count["backward"]["triton_launches"])
                for provider, count in counts.items()}
    assert launches == {"routed": (1, 2), "loop-fused": (4, 8)}
    # Beside the launches: the base GEMM (and the loop's gathers and scatters) are aten kernels.
    assert counts["routed"]["forward"]["aten_kernels"] >= 1
    assert counts["loop-fused"]["forward"]["aten_kernels"] >= 1 + 2 * 4


def test_rotation_covers_twice_the_cache():
    import torch

    cpu = torch.device("cpu")
    assert rotation_count(1 << 20, cpu) == 64  # capped: 128 MiB / 1 MiB would be 128 sets
    assert rotation_count(16 << 20, cpu) == 8
    assert rotation_count(1 << 30, cpu) == 1


DENSE_KERNELS = ["_sparse_forward_kernel", "_sparse_backward_input_kernel", "_sparse_backward_weights_kernel"]
GROUPED_FORWARD = ["_grouped_forward_kernel", "_grouped_combine_kernel"]
GROUPED_BACKWARD = ["_grouped_backward_input_kernel", "_grouped_backward_combine_kernel",
                    "_grouped_backward_weights_kernel"]


def sparse_case(op="sparse_adapter", variant="default", experts=8, rank=16, top_k=2, pass_name="forward+backward",
                rows=1576, dim=768, dtype="fp16"):
    return {"op": op, "variant": variant, "experts": experts, "rank": rank, "top_k": top_k, "rows": rows, "dim": dim,
            "dtype": dtype, "sms": 132, "pass": pass_name}


@pytest.mark.parametrize("case, kernels", [
    (sparse_case(), DENSE_KERNELS),
    (sparse_case(variant="store_act", pass_name="forward"), DENSE_KERNELS[:1]),
    (sparse_case(op="routed_adapter", variant="rows16"), DENSE_KERNELS),
    (sparse_case(variant="grouped"), ["_sparse_gate_kernel"] + GROUPED_FORWARD + GROUPED_BACKWARD),
    (sparse_case(variant="grouped", pass_name="forward"), ["_sparse_gate_kernel"] + GROUPED_FORWARD),
    # The routed form has no gate launch; with k = 1 the grouped launch writes y and dx itself.
    (sparse_case(op="routed_adapter", variant="grouped"), GROUPED_FORWARD + GROUPED_BACKWARD),
    (sparse_case(op="routed_adapter", variant="grouped", top_k=1), GROUPED_FORWARD[:1] + GROUPED_BACKWARD[::2]),
    # E*r > 256: the dense design does not fit, every variant runs the grouped kernels.
    (sparse_case(experts=16, rank=32), ["_sparse_gate_kernel"] + GROUPED_FORWARD + GROUPED_BACKWARD),
    (sparse_case(op="routed_adapter", variant="store_act", experts=64, top_k=1, dtype="fp32"),
     GROUPED_FORWARD[:1] + GROUPED_BACKWARD[::2]),
], ids=lambda value: "-".join(f"{value[k]}" for k in ("op", "variant", "experts", "rank", "top_k", "pass"))
    if isinstance(value, dict) else f"{len(value)}launches")
def test_sparse_launches_follow_the_design(case, kernels):
    # The launches the compile check sees for a row (registers, spills): the design's own.
    from bench.measure import fused_launches

    launches = fused_launches(case)
    assert [launch.kernel.__name__ for launch in launches] == kernels
    if "_grouped_forward_kernel" in kernels:
        # The grouped buffers: the saved hidden layer [M*k, r] by sorted position.
        grouped = next(launch for launch in launches if launch.kernel.__name__ == "_grouped_forward_kernel")
        assert tuple(grouped.args["hidden_ptr"].shape) == (case["rows"] * case["top_k"], case["rank"])
        assert tuple(grouped.args["order_ptr"].shape) == (case["rows"] * case["top_k"],)


def test_sparse_suite_rows():
    # The sparse suite's kernel names (CUDA launch counts), its shapes and the rows it skips.
    import bench.test_sparse as suite

    assert set(DENSE_KERNELS + GROUPED_FORWARD + GROUPED_BACKWARD + ["_sparse_gate_kernel"]) <= suite.KERNEL_NAMES
    assert list(suite.shapes(False, True)) == [("fp32", 768, 1, 16, 8, 2)]  # the CPU quick run: one shape
    for cuda in (False, True):
        pairs = {(rank, experts) for _, _, _, rank, experts, _ in suite.shapes(cuda, False)}
        assert {(32, 16), (16, 64)} <= pairs
    assert not any(rank * experts > 256 for _, _, _, rank, experts, _ in suite.shapes(True, True))
    assert not suite.repeats_grouped(8, 16, "default") and not suite.repeats_grouped(16, 32, "grouped")
    assert all(suite.repeats_grouped(16, 32, name) for name in ("default", "rows16", "rows64", "store_act"))


@pytest.mark.skipif(not paths.is_interpreted(), reason="counts launches in Triton's interpreter")
@pytest.mark.parametrize("variant, experts, rank", [("default", 4, 16), ("grouped", 4, 16),
                                                    pytest.param("default", 16, 32, marks=pytest.mark.slow)])
def test_sparse_counts_match_the_planned_launches(variant, experts, rank):
    # count_case runs the public op with the row's variant; it launches what fused_launches plans.
    from bench.measure import count_case, fused_launches

    for op in ("sparse_adapter", "routed_adapter"):
        case = sparse_case(op=op, variant=variant, experts=experts, rank=rank, rows=24, dim=32, dtype="fp32")
        counts = count_case(dict(case, provider="fused"))
        forward = len(fused_launches(dict(case, **{"pass": "forward"})))
        assert counts["forward"]["triton_launches"] == forward
        assert counts["backward"]["triton_launches"] == len(fused_launches(case)) - forward


@pytest.mark.slow
def test_counted_launches_come_from_the_ops_plans(monkeypatch):
    # The benchmark's device-free counts mirror no launch rule: a change to an op's plan (here
    # the bottleneck's act(h) rule and the grouped gate's chunks) changes what it counts.
    from bench.measure import fused_launches
    from fused_adapters.kernels.bottleneck import plan as bottleneck_plan
    from fused_adapters.kernels.sparse import plan as sparse_plan

    case = dict(op="bottleneck", rows=394, dim=768, rank=8, dtype="fp16", variant="default", sms=132,
                **{"pass": "forward+backward"})
    assert fused_launches(case)[1].constexprs["STORE_ACT"] is False
    monkeypatch.setattr(bottleneck_plan, "stores_act", lambda rank, variant: True)
    assert fused_launches(case)[1].constexprs["STORE_ACT"] is True
    grouped = dict(op="sparse_adapter", rows=394, dim=768, rank=16, experts=8, top_k=2, dtype="fp16",
                   variant="grouped", sms=132, **{"pass": "forward+backward"})
    monkeypatch.setattr(sparse_plan, "gate_chunks", lambda *args: 5)
    assert fused_launches(grouped)[-1].grid[0] == 8 + 5  # the experts' programs and the gate's chunks


@pytest.mark.slow
def test_plain_pytest_collects_no_benchmark():
    files = collected()
    assert files and all(path.startswith("tests/") for path in files)


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["--benchmark"],
    ["--benchmark", "--benchmark-json", "/tmp/out.json"],  # a path outside the repo changes pytest's args
    ["--benchmark-quick"],
    ["--benchmark-only"],  # pytest-benchmark's flag: it used to skip every test and run nothing
])
@pytest.mark.slow
def test_benchmark_collects_only_bench(args):
    files = collected(*args)
    assert files and all(path.startswith("bench/") for path in files)
    assert {"bench/test_bottleneck.py", "bench/test_lora.py", "bench/test_multilora.py", "bench/test_sparse.py",
            "bench/test_vit.py"} <= set(files)


@pytest.mark.slow
def test_a_small_run_fills_every_key(tmp_path):
    # One shape: eager timed, the default fused variant timed on CUDA, device-free without it.
    import torch

    cuda = torch.cuda.is_available()
    dtype, size = ("bf16", 2) if cuda else ("fp32", 4)
    out = tmp_path / "run.json"
    done = pytest_run("--benchmark", "--benchmark-quick", "-q", "-p", "no:cacheprovider", "-k",
                      f"test_bottleneck and forward-{dtype}-D768-M1576-r8- and (eager or fused[default])",
                      "--benchmark-json", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    rows = [b["extra_info"] for b in results["benchmarks"]]
    block = results["fused_adapters"]
    rows += block["untimed"]
    assert sorted(row["provider"] for row in rows) == ["eager", "fused"]
    for row in rows:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["floor_bytes"] == 1576 * 768 * size * 2
        assert row["triton_launches"] == (1 if row["provider"] == "fused" else 0)
        assert row["moved_bytes"] > row["floor_bytes"]
        if cuda:
            assert row["gbps"] > 0 and row["copy_gbps"] > 0 and row["host_us"] > 0
            assert row["peak_mem_bytes"] > 0
    fused = next(row for row in rows if row["provider"] == "fused")
    eager = next(row for row in rows if row["provider"] == "eager")
    # The fused forward moves about the floor; eager PyTorch several times it.
    assert fused["moved_bytes"] < 1.1 * fused["floor_bytes"] < eager["moved_bytes"] / 2
    # The pre-activation, M x r in the compute dtype; x by reference (CUDA's allocator rounds
    # blocks up to 512 bytes).
    assert 1576 * 8 * size <= fused["saved_bytes"] < 1576 * 8 * size + 512
    if not block["timed_fused"]:
        assert "fused timings need CUDA" in block["note"]
        assert fused["registers"] and fused["spill_bytes"] == [0]
        assert "fused timings need CUDA" in done.stdout
    report = tmp_path / "report"
    rendered = subprocess.run([sys.executable, "-m", "bench.report", str(out), "--out", str(report)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    assert f"bottleneck forward {dtype} D=768 r=8" in (report / "report.md").read_text()


def sparse_quick_shape(cuda: bool) -> tuple:
    """(dtype, element size, rows) of the sparse suite's quick shape with D = 768, r = 16, E = 8, k = 2."""
    return ("bf16", 2, 32 * 197) if cuda else ("fp32", 4, 197)


@pytest.mark.slow
def test_a_small_sparse_run_fills_every_key(tmp_path):
    # Both sparse ops at the quick shape, forward: eager timed, the default fused variant timed on
    # CUDA, device-free without it (the bytes it saves, its launches and bytes moved).
    import torch

    cuda = torch.cuda.is_available()
    dtype, size, rows = sparse_quick_shape(cuda)
    experts, rank = 8, 16
    out = tmp_path / "run.json"
    # On CUDA the quick shape has M = 6304: no interpreter counts (they would take many minutes).
    count_rows = ["--benchmark-count-rows=0"] if cuda else []
    done = pytest_run("--benchmark", "--benchmark-quick", "-q", "-p", "no:cacheprovider", *count_rows, "-k",
                      f"test_sparse and forward-{dtype}-D768-M{rows}-r16-E8-k2- and (eager or fused[default])",
                      "--benchmark-json", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    block = results["fused_adapters"]
    rows_seen = [b["extra_info"] for b in results["benchmarks"]] + block["untimed"]
    assert sorted((row["op"], row["provider"]) for row in rows_seen) == [
        ("routed_adapter", "eager"), ("routed_adapter", "fused"), ("sparse_adapter", "eager"),
        ("sparse_adapter", "fused")]
    for row in rows_seen:
        assert ROW_KEYS | {"experts", "top_k"} <= set(row), ROW_KEYS - set(row)
        assert (row["rows"], row["dim"], row["rank"], row["experts"], row["top_k"]) == (rows, 768, rank, experts, 2)
        assert row["floor_bytes"] == rows * 768 * size * 2  # read x, write y
        assert row["saved_bytes"] > 0
    for op in ("sparse_adapter", "routed_adapter"):
        eager = next(row for row in rows_seen if row["op"] == op and row["provider"] == "eager")
        fused = next(row for row in rows_seen if row["op"] == op and row["provider"] == "fused")
        assert eager["triton_launches"] == 0 and eager["aten_kernels"] > 0
        # The fused forward keeps h [M, E*r] in the compute dtype and the weights [M, E] in fp32,
        # x by reference (CUDA's allocator rounds blocks up to 512 bytes); eager far more.
        kept = rows * (experts * rank * size + experts * 4)
        assert kept <= fused["saved_bytes"] < kept + 1024 < eager["saved_bytes"]
        if cuda:
            assert fused["triton_launches"] == 1
            for row in (eager, fused):
                assert row["gbps"] > 0 and row["host_us"] > 0 and row["peak_mem_bytes"] > 0
        else:
            # The quick run counts the default fused variant too: one launch, a few times fewer
            # bytes than the expert loop, which moves many times the floor.
            assert eager["moved_bytes"] > 4 * eager["floor_bytes"]
            assert fused["triton_launches"] == 1
            assert fused["floor_bytes"] < fused["moved_bytes"] < eager["moved_bytes"] / 4
    if not block["timed_fused"]:
        assert "fused timings need CUDA" in done.stdout
    report = tmp_path / "report"
    rendered = subprocess.run([sys.executable, "-m", "bench.report", str(out), "--out", str(report)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    text = (report / "report.md").read_text()
    for op in ("sparse_adapter", "routed_adapter"):
        assert f"## {op} forward {dtype} D=768 r=16 E=8 k=2" in text
