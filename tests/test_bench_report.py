"""bench/report.py: the Markdown report and plots made from a pytest-benchmark JSON file.

The GPU-style input is tests/data/bench_fixture.json (hand-written numbers); the CPU-style one,
where the fused rows could not be timed, is built below. Expected cells are worked out by hand
from the medians in those inputs.
"""

import copy
import json
import re
from pathlib import Path

import pytest

from bench import report

FIXTURE = Path(__file__).parent / "data" / "bench_fixture.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GPU_SLUG = "bottleneck-forward-backward-bf16-d768-r8"
MODEL_SLUG = "vit-b16-train-step-bf16-d768-r8"


def gpu_results() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def table_line(text: str, shape: str, *after: str) -> str:
    """The first table line for `shape` after the headings in `after`, found one after another."""
    start = 0
    for heading in after:
        start = text.index(heading, start)
    return next(line for line in text[start:].splitlines() if line.startswith(f"| {shape} "))


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC, path


def cpu_info(rows, provider, variant="-", rank=8, **extra) -> dict:
    """extra_info of a CPU fp32 forward row of the bottleneck op."""
    floor = 2 * rows * 768 * 4  # forward reads x and writes y, fp32
    info = {
        "op": "bottleneck", "pass": "forward", "device": "cpu", "dtype": "fp32",
        "shape": f"M={rows} D=768 r={rank}", "rows": rows, "dim": 768, "rank": rank,
        "provider": provider, "variant": variant, "triton_launches": None, "aten_kernels": 6,
        "saved_bytes": None, "floor_bytes": floor, "moved_bytes": None, "gbps": None,
        "copy_gbps": 9.1, "peak_mem_bytes": None, "host_us": None,
    }
    info.update(extra)
    return info


def cpu_benchmark(info: dict, median: float) -> dict:
    group = f"{info['op']} {info['pass']} {info['dtype']} D={info['dim']} r={info['rank']}"
    name = f"test_bottleneck_speed[{info['shape']}-{info['provider']}]"
    return {"group": group, "name": name, "fullname": f"bench/test_bench_bottleneck.py::{name}",
            "params": {}, "extra_info": info,
            "stats": {"min": median * 0.9, "max": median * 1.5, "mean": median * 1.05, "median": median,
                      "rounds": 50, "iterations": 1}}


def cpu_results() -> dict:
    floor_1576 = 2 * 1576 * 768 * 4
    return {
        "machine_info": {"node": "laptop", "python_version": "3.11.7", "system": "Linux",
                         "cpu": {"brand_raw": "AMD EPYC 7B13"}},
        "commit_info": {"id": "6a82d35c1f0e9b7a", "dirty": True, "branch": "main"},
        # The larger shape first: the report sorts shapes by rows, not by input order.
        "benchmarks": [
            cpu_benchmark(cpu_info(6304, "eager"), 9.6e-3),
            cpu_benchmark(cpu_info(6304, "compile"), 8.0e-3),
            cpu_benchmark(cpu_info(1576, "eager"), 2.4e-3),
            cpu_benchmark(cpu_info(1576, "compile"), 1.6e-3),
        ],
        "datetime": "2026-11-30T12:00:00+00:00",
        "version": "5.3.1",
        "fused_adapters": {
            "device": "cpu", "timed_fused": False, "copy_gbps": 9.1, "sms": 132,
            "note": "fused timings need CUDA: Triton's interpreter is not a speed measurement.",
            "untimed": [
                cpu_info(1576, "fused", "default", triton_launches=1, aten_kernels=0,
                         moved_bytes=round(floor_1576 * 1.25), saved_bytes=1576 * 8 * 4,
                         registers=[48], spill_bytes=[0]),
                cpu_info(1576, "fused", "rows16", triton_launches=1, aten_kernels=0,
                         moved_bytes=round(floor_1576 * 1.30), saved_bytes=1576 * 8 * 4),
                # A group with nothing timed at all: tables, but no plots.
                cpu_info(1576, "fused", "default", rank=64, triton_launches=1, aten_kernels=0,
                         moved_bytes=round(floor_1576 * 1.5)),
            ],
        },
    }


@pytest.fixture(scope="module")
def gpu_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    path = report.render(gpu_results(), out)
    return out, path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu")
    path = report.render(cpu_results(), out)
    return out, path.read_text(encoding="utf-8")


def test_gpu_time_table_has_speedups_and_bolds_the_fastest_fused_variant(gpu_report):
    _, text = gpu_report
    assert "| shape " in text and "| eager " in text and "| fused[rows16] " in text
    # M=1576: eager 60 us; compile 48 us (60/48 = 1.25x); fused 15 us (4.00x); rows16 20 us (3.00x).
    assert cells(table_line(text, "M=1576 D=768 r=8")) == [
        "M=1576 D=768 r=8", "60.0 us (1.00x)", "48.0 us (1.25x)", "**15.0 us (4.00x)**", "20.0 us (3.00x)"]
    # M=6304: eager 150 us; compile 100 us (1.50x); fused 40 us (3.75x); rows16 32 us (150/32 = 4.69x).
    assert cells(table_line(text, "M=6304 D=768 r=8")) == [
        "M=6304 D=768 r=8", "150 us (1.00x)", "100 us (1.50x)", "40.0 us (3.75x)", "**32.0 us (4.69x)**"]


def test_gpu_detail_tables(gpu_report):
    _, text = gpu_report
    # GB/s against the 2900 GB/s copy: 1105.5 / 2900 = 38%, 877.5 / 2900 = 30%.
    assert "1106 (38%)" in table_line(text, "M=1576 D=768 r=8", "GB/s (% of copy)")
    assert "878 (30%)" in table_line(text, "M=1576 D=768 r=8", "GB/s (% of copy)")
    # moved / floor: the fixture's moved bytes are 1.37x and 1.42x the floor at M=6304; no eager entry.
    assert cells(table_line(text, "M=6304 D=768 r=8", "bytes moved / floor")) == [
        "M=6304 D=768 r=8", "", "", "1.37x", "1.42x"]
    assert cells(table_line(text, "M=6304 D=768 r=8", "peak memory (MiB)"))[1:] == ["120", "96.0", "72.0", "72.0"]
    # saved for backward: eager keeps 3 M x D bf16 tensors (27.7 MiB), fused an M x r one.
    assert cells(table_line(text, "M=6304 D=768 r=8", "saved for backward (MiB)"))[1:] == [
        "27.7", "18.5", "0.0962", "0.0962"]
    assert cells(table_line(text, "M=6304 D=768 r=8", "launches (triton + aten)"))[1:] == [
        "0 + 14", "4 + 3", "3 + 0", "3 + 0"]


def test_host_time_and_registers_tables(gpu_report, cpu_report):
    _, text = gpu_report
    line = cells(table_line(text, "M=1576 D=768 r=8", "host time to enqueue one call (us)"))
    assert line[0] == "M=1576 D=768 r=8" and any(cell for cell in line[1:])
    _, text = cpu_report
    line = cells(table_line(text, "M=1576 D=768 r=8", "registers per launch, spill bytes (sm_90)"))
    assert "48, 0 B" in line


def test_gpu_header_and_model_rows(gpu_report):
    _, text = gpu_report
    header = text[:text.index("\n## ")]
    assert "NVIDIA H100 80GB HBM3" in header
    assert "2026-11-30T16:02:11" in header
    assert "torch 2.14.1+cu128" in header and "triton 3.6.0" in header
    assert "2900 GB/s" in header
    # ViT-B/16 train step: eager 512 img/s at 125 ms, fused 640 img/s at 100 ms: 640/512 = 1.25x.
    assert cells(table_line(text, "batch=64 224px")) == [
        "batch=64 224px", "512 img/s, 125 ms (1.00x)", "**640 img/s, 100 ms (1.25x)**"]
    # Op groups come before model groups.
    assert text.index("## bottleneck") < text.index("## vit_b16")


def test_gpu_fastest_list(gpu_report):
    _, text = gpu_report
    fastest = text[text.index("## Fastest fused variant per shape"):]
    assert "M=1576 D=768 r=8: fused, 15.0 us (4.00x)" in fastest
    assert "M=6304 D=768 r=8: fused[rows16], 32.0 us (4.69x)" in fastest
    assert "batch=64 224px: fused, 640 img/s, 100 ms (1.25x)" in fastest


def test_gpu_plots_exist_and_are_linked(gpu_report):
    out, text = gpu_report
    for slug in (GPU_SLUG, MODEL_SLUG):
        for kind in ("time", "speedup", "memory"):
            assert_png(out / f"{slug}-{kind}.png")
            assert f"]({slug}-{kind}.png)" in text


def test_cpu_untimed_fused_rows_share_the_table(cpu_report):
    _, text = cpu_report
    header = text[:text.index("\n## ")]
    assert "fused timings need CUDA: Triton's interpreter" in header
    assert "- Device: cpu" in header
    assert "9.10 GB/s" in header
    assert "torch" not in header  # no versions in this machine_info, and no crash for it
    # eager 2.40 ms; compile 1.60 ms (2.4/1.6 = 1.50x); the fused rows were not timed.
    assert cells(table_line(text, "M=1576 D=768 r=8")) == [
        "M=1576 D=768 r=8", "2.40 ms (1.00x)", "1.60 ms (1.50x)", "needs CUDA", "needs CUDA"]
    # No fused row at M=6304: empty cells. eager 9.6 ms / compile 8 ms = 1.20x.
    assert cells(table_line(text, "M=6304 D=768 r=8")) == [
        "M=6304 D=768 r=8", "9.60 ms (1.00x)", "8.00 ms (1.20x)", "", ""]
    assert text.index("| M=1576 D=768 r=8") < text.index("| M=6304 D=768 r=8")
    # Bytes were counted without timing: moved / floor shows for the untimed rows.
    assert cells(table_line(text, "M=1576 D=768 r=8", "bytes moved / floor"))[1:] == ["", "", "1.25x", "1.30x"]
    # Nothing fused was timed, so nothing in a table is bold.
    assert not [line for line in text.splitlines() if line.startswith("|") and "**" in line]


def test_cpu_untimed_only_group_has_tables_but_no_plots(cpu_report):
    out, text = cpu_report
    assert "## bottleneck forward fp32 D=768 r=64" in text
    assert cells(table_line(text, "M=1576 D=768 r=64")) == ["M=1576 D=768 r=64", "needs CUDA"]
    assert cells(table_line(text, "M=1576 D=768 r=64", "## bottleneck forward fp32 D=768 r=64",
                                  "bytes moved / floor")) == ["M=1576 D=768 r=64", "1.50x"]
    assert not list(out.glob("*r64*.png"))
    assert "bottleneck forward fp32 D=768 r=64: fused timings need CUDA" in text
    # The timed group still gets its plots (no peak memory on CPU, so no memory plot).
    assert_png(out / "bottleneck-forward-fp32-d768-r8-time.png")
    assert_png(out / "bottleneck-forward-fp32-d768-r8-speedup.png")
    assert not (out / "bottleneck-forward-fp32-d768-r8-memory.png").exists()


def test_single_row(tmp_path):
    results = cpu_results()
    results["benchmarks"] = results["benchmarks"][2:3]  # eager at M=1576 only
    del results["fused_adapters"]
    text = report.render(results, tmp_path).read_text(encoding="utf-8")
    assert cells(table_line(text, "M=1576 D=768 r=8")) == ["M=1576 D=768 r=8", "2.40 ms (1.00x)"]
    assert "no fused rows" in text
    assert_png(tmp_path / "bottleneck-forward-fp32-d768-r8-time.png")
    assert not (tmp_path / "bottleneck-forward-fp32-d768-r8-speedup.png").exists()


def test_grouping_ignores_the_group_string(tmp_path):
    results = gpu_results()
    for benchmark in results["benchmarks"]:
        benchmark["group"] = "renamed"
    text = report.render(results, tmp_path).read_text(encoding="utf-8")
    assert "## bottleneck forward+backward bf16 D=768 r=8" in text
    assert "**32.0 us (4.69x)**" in text


def test_main_writes_the_report(tmp_path, capsys):
    out = tmp_path / "nested" / "report"
    assert report.main([str(FIXTURE), "--out", str(out)]) == 0
    assert (out / "report.md").is_file()
    assert str(out / "report.md") in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    (json.dumps({"machine_info": {}, "commit_info": {}, "benchmarks": [], "datetime": "x", "version": "5"}),
     "no benchmarks"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a pytest-benchmark JSON object"),
])
def test_main_fails_clearly_on_bad_input(tmp_path, capsys, content, message):
    path = tmp_path / "results.json"
    path.write_text(content, encoding="utf-8")
    assert report.main([str(path), "--out", str(tmp_path / "out")]) != 0
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not (tmp_path / "out" / "report.md").exists()


def test_main_fails_clearly_on_a_missing_file(tmp_path, capsys):
    assert report.main([str(tmp_path / "absent.json"), "--out", str(tmp_path)]) != 0
    assert "cannot read" in capsys.readouterr().err


def test_main_merges_the_files_of_one_run(tmp_path, capsys):
    # The suite run module by module writes one JSON each: the report of all of them is the
    # report of one file holding every row.
    whole = cpu_results()
    first, second = copy.deepcopy(whole), copy.deepcopy(whole)
    first["benchmarks"], second["benchmarks"] = whole["benchmarks"][:2], whole["benchmarks"][2:]
    del first["fused_adapters"]
    paths = [tmp_path / "first.json", tmp_path / "second.json"]
    for path, results in zip(paths, (first, second)):
        path.write_text(json.dumps(results), encoding="utf-8")
    assert report.main([*map(str, paths), "--out", str(tmp_path / "merged")]) == 0
    expected = report.render(whole, tmp_path / "whole").read_text(encoding="utf-8")
    assert (tmp_path / "merged" / "report.md").read_text(encoding="utf-8") == expected
    (tmp_path / "bad.json").write_text("[1, 2]", encoding="utf-8")
    assert report.main([str(paths[0]), str(tmp_path / "bad.json"), "--out", str(tmp_path / "out")]) != 0
    error = capsys.readouterr().err
    assert "bad.json is not a pytest-benchmark JSON object" in error and "Traceback" not in error


def test_formatting():
    assert report.format_time(15e-6) == "15.0 us"
    assert report.format_time(999.7e-6) == "1.00 ms"  # rounds into the next unit
    assert report.format_time(2.5) == "2.50 s"
    assert report.significant(1105.5) == "1106"
    assert report.significant(0.09619) == "0.0962"
    assert report.significant(99.96) == "100"


def test_duplicate_cell_prefers_the_timed_row(tmp_path):
    results = copy.deepcopy(gpu_results())
    fused = next(b for b in results["benchmarks"]
                 if b["extra_info"]["provider"] == "fused" and b["extra_info"]["variant"] == "default"
                 and b["extra_info"]["rows"] == 1576)
    results["fused_adapters"]["untimed"] = [dict(fused["extra_info"])]
    text = report.render(results, tmp_path).read_text(encoding="utf-8")
    assert "**15.0 us (4.00x)**" in table_line(text, "M=1576 D=768 r=8")


def test_sparse_rows_get_a_table_per_experts_and_top_k(tmp_path):
    # Sparse mixture rows carry experts and top_k: rows that differ only there are separate tables
    # (titled with E and k), and the bottleneck rows' tables keep their titles.
    results = cpu_results()

    def sparse(provider, median, experts, top_k):
        info = cpu_info(1576, provider, rank=16, op="sparse_adapter", experts=experts, top_k=top_k,
                        shape=f"M=1576 D=768 r=16 E={experts} k={top_k}")
        return cpu_benchmark(info, median)

    results["benchmarks"] += [sparse("eager", 4.0e-3, 8, 2), sparse("compile", 2.0e-3, 8, 2),
                              sparse("eager", 6.0e-3, 16, 2), sparse("eager", 3.0e-3, 8, 1)]
    text = report.render(results, tmp_path).read_text(encoding="utf-8")
    for title in ("sparse_adapter forward fp32 D=768 r=16 E=8 k=1", "sparse_adapter forward fp32 D=768 r=16 E=8 k=2",
                  "sparse_adapter forward fp32 D=768 r=16 E=16 k=2", "bottleneck forward fp32 D=768 r=8"):
        assert f"## {title}\n" in text
    # E=8 before E=16, k=1 before k=2; compile 2 ms against eager 4 ms is 2.00x.
    assert text.index("E=8 k=1\n") < text.index("E=8 k=2\n") < text.index("E=16 k=2\n")
    assert cells(table_line(text, "M=1576 D=768 r=16 E=8 k=2")) == [
        "M=1576 D=768 r=16 E=8 k=2", "4.00 ms (1.00x)", "2.00 ms (2.00x)"]
    assert_png(tmp_path / "sparse-adapter-forward-fp32-d768-r16-e16-k2-time.png")


def multilora_info(rows, provider, tasks=8, **extra) -> dict:
    """extra_info of a GPU bf16 forward row of the multi-LoRA op (ViT-B qkv, rank 8)."""
    floor = rows * (768 + 2304) * 2 + 2304 * 768 * 2
    return cpu_info(rows, provider, "default" if provider in ("routed", "loop-fused") else "-", op="multilora",
                    dtype="bf16", device="NVIDIA H100 80GB HBM3", dim_out=2304, tasks=tasks, images=rows // 197,
                    scale=2.0, floor_bytes=floor, shape=f"M={rows} D=768 D_out=2304 r=8 T={tasks}", **extra)


def test_multilora_rows_compare_against_the_peft_loop(tmp_path):
    # The multi-LoRA tables: one per target shape, pass and task count; loop-eager (PEFT's loop)
    # is the baseline column and the speedups are over it; routed and loop-fused are fused rows.
    results = cpu_results()
    medians = {"loop-eager": 400e-6, "compile": 250e-6, "gather-eager": 200e-6, "loop-fused": 160e-6, "routed": 50e-6}
    results["benchmarks"] = [cpu_benchmark(multilora_info(rows, provider, peak_mem_bytes=rows * 4096), median * rows
                                           / 1576)
                             for rows in (1576, 6304, 25216) for provider, median in medians.items()]
    results["fused_adapters"]["untimed"] = [
        dict(multilora_info(394, provider, tasks=2), device="cpu", not_timed="needs CUDA", moved_bytes=10 ** 7)
        for provider in ("routed", "loop-fused")]
    out = tmp_path / "report"
    text = report.render(results, out).read_text(encoding="utf-8")
    title = "## multilora forward bf16 D=768 D_out=2304 r=8 T=8\n"
    assert title in text and "## multilora forward bf16 D=768 D_out=2304 r=8 T=2\n" in text
    header, *_ = next(table for table in tables(text[text.index(title):]))
    assert header == ["shape", "loop-eager", "compile", "gather-eager", "loop-fused", "routed"]
    # 400 us against 250, 200, 160 and 50 us: 1.60x, 2.00x, 2.50x and 8.00x; routed the fastest fused row.
    assert cells(table_line(text, "M=1576 D=768 D_out=2304 r=8 T=8")) == [
        "M=1576 D=768 D_out=2304 r=8 T=8", "400 us (1.00x)", "250 us (1.60x)", "200 us (2.00x)", "160 us (2.50x)",
        "**50.0 us (8.00x)**"]
    assert "M=1576 D=768 D_out=2304 r=8 T=8: routed, 50.0 us (8.00x)" in text
    slug = "multilora-forward-bf16-d768-d-out2304-r8-t8"
    group = next(group for group in report.group_rows(report.collect_rows(results)) if group.slug == slug)
    assert group.baseline_column == "loop-eager"
    captions = [plot.caption for plot in report.make_plots(group)]
    assert captions == ["median time", "speedup over loop-eager", "peak memory"]
    for kind in ("time", "speedup", "memory"):
        assert_png(out / f"{slug}-{kind}.png")
    # The other ops keep eager as their baseline.
    assert report.Group(("bottleneck",) + (None,) * 9, []).baseline_column == "eager"
    assert_every_blank_cell_explained(text)


# ---------------------------------------------------------------------------------------------
# Plot axes, reasons for cells without a number, versions, quick runs and groups of untimed rows


def lines_under(text: str, *after: str) -> list[str]:
    """The list lines ("- [1] ...", "- Empty cells: ...") under the first table after the headings
    in `after`, found one after another."""
    start = 0
    for heading in after:
        start = text.index(heading, start)
    lines = text[start:].splitlines()
    first = next(index for index, line in enumerate(lines) if line.startswith("|"))
    end = next(index for index in range(first, len(lines)) if not lines[index].startswith("|"))
    under = []
    for line in lines[end + 1:]:
        if not line.startswith("- "):
            break
        under.append(line)
    return under


def notes_under(text: str, *after: str) -> dict:
    """The notes under that table: "[1]" -> its reason."""
    return dict(line[2:].split(" ", 1) for line in lines_under(text, *after) if line.startswith("- ["))


def tables(text: str) -> list[tuple[list[str], list[list[str]], list[str]]]:
    """Every table of the report: its header cells, its body rows' cells and the list lines under it."""
    lines = text.splitlines()
    found, index = [], 0
    while index < len(lines):
        if not lines[index].startswith("|"):
            index += 1
            continue
        start = index
        while index < len(lines) and lines[index].startswith("|"):
            index += 1
        after = index + 1
        notes = []
        while after < len(lines) and lines[after].startswith("- "):
            notes.append(lines[after])
            after += 1
        found.append((cells(lines[start]), [cells(line) for line in lines[start + 2:index]], notes))
    return found


def assert_every_blank_cell_explained(text: str) -> None:
    """A blank cell is listed in an "Empty cells" line under its table, and every note number in
    a cell is listed under it."""
    for header, body, notes in tables(text):
        empty = " ".join(line for line in notes if line.startswith("- Empty cells: "))
        listed = {line[2:].split(" ")[0] for line in notes if line.startswith("- [")}
        for line in body:
            for column, cell in zip(header[1:], line[1:]):
                if not cell:
                    assert column in empty, (header, line)
                for marker in re.findall(r"\[\d+\]", cell):
                    assert marker in listed, (header, line, notes)


def speedup_results(median_compile: dict) -> dict:
    """eager and compile rows of the bottleneck op at the given rows, compile with the given medians
    (eager 1 ms at every size), with peak memory; no fused rows."""
    results = cpu_results()
    del results["fused_adapters"]
    results["benchmarks"] = []
    for rows, median in median_compile.items():
        for provider, value in (("eager", 1e-3), ("compile", median)):
            peak = rows * 4096 * (2 if provider == "eager" else 1)
            results["benchmarks"].append(cpu_benchmark(cpu_info(rows, provider, peak_mem_bytes=peak), value))
    return results


def test_speedup_and_memory_axes_show_every_value(tmp_path):
    # A speedup above 1 used to fall off the plot: the axis was started at zero before anything was
    # drawn, which fixed its top at 1.
    results = speedup_results({394: 1e-3 / 1.26, 1576: 1e-3 / 1.10, 6304: 1e-3 / 0.95})
    text = report.render(results, tmp_path).read_text(encoding="utf-8")
    assert cells(table_line(text, "M=394 D=768 r=8"))[2] == "794 us (1.26x)"
    slug = "bottleneck-forward-fp32-d768-r8"
    for kind in ("time", "speedup", "memory"):
        assert_png(tmp_path / f"{slug}-{kind}.png")
    [group] = report.group_rows(report.collect_rows(results))
    plots = {plot.caption: plot for plot in report.make_plots(group)}
    try:
        bottom, top = plots["speedup over eager"].axes.get_ylim()
        assert bottom == 0 and top > 1.26
        bottom, top = plots["peak memory"].axes.get_ylim()
        assert bottom == 0 and top > 6304 * 4096 * 2 / 2 ** 20  # eager's 50.2 MiB at M=6304
    finally:
        for plot in plots.values():
            report.plt.close(plot.figure)


def suite_style_results() -> dict:
    """A CPU run as the suite now writes it: every row says why each number it lacks is missing,
    and untimed rows say why they were not timed."""
    count_rows = "not counted: M above --benchmark-count-rows 1000"
    compiled = "not counted: the interpreter cannot count inside a compiled graph"
    cpu_only = {"gbps": "needs CUDA", "peak_mem_bytes": "needs CUDA"}
    quick_message = ("torch.compile of the expert loop takes tens of seconds on a few CPU cores: run without "
                     "--benchmark-quick")

    def counts(reason):
        return {key: reason for key in ("triton_launches", "aten_kernels", "moved_bytes", "host_us")}

    floor_394 = 2 * 394 * 768 * 4
    results = cpu_results()
    results["benchmarks"] = [
        cpu_benchmark(cpu_info(394, "eager", moved_bytes=floor_394 * 3, saved_bytes=1 << 20, host_us=40.0,
                               triton_launches=0, missing={**cpu_only, "registers": "no fused kernels"}), 7e-4),
        cpu_benchmark(cpu_info(1576, "eager", aten_kernels=None, saved_bytes=4 << 20,
                               missing={**cpu_only, **counts(count_rows), "registers": "no fused kernels"}), 2.4e-3),
        cpu_benchmark(cpu_info(394, "compile", aten_kernels=None, missing={
            **cpu_only, **counts(compiled), "registers": "no fused kernels",
            "saved_bytes": "not measured: the CPU's saved-tensor hooks cannot see inside a compiled graph"}), 5e-4),
    ]
    results["fused_adapters"]["quick"] = False
    results["fused_adapters"]["untimed"] = [
        cpu_info(394, "fused", "default", triton_launches=1, aten_kernels=0, moved_bytes=round(floor_394 * 1.02),
                 saved_bytes=394 * 8 * 4, host_us=25.0, registers=[48], spill_bytes=[0], not_timed="needs CUDA",
                 not_timed_reason="fused timings need CUDA: device-free counts for this row are in the summary",
                 missing=cpu_only),
        # Untimed, and no bytes either: the shape is above --benchmark-count-rows.
        cpu_info(1576, "fused", "default", aten_kernels=None, saved_bytes=1576 * 8 * 4, registers=[48],
                 spill_bytes=[0], not_timed="needs CUDA", not_timed_reason="fused timings need CUDA",
                 missing={**cpu_only, **counts(count_rows)}),
        # Skipped before anything was measured.
        cpu_info(1576, "compile", aten_kernels=None, not_timed="skipped (quick run)", not_timed_reason=quick_message,
                 missing={key: "not run: skipped (quick run)" for key in (
                     "triton_launches", "aten_kernels", "saved_bytes", "moved_bytes", "gbps", "peak_mem_bytes",
                     "host_us", "registers")}),
    ]
    return results


def test_cells_without_a_number_say_why(tmp_path):
    text = report.render(suite_style_results(), tmp_path).read_text(encoding="utf-8")
    group = "## bottleneck forward fp32 D=768 r=8"
    # Time cells: "needs CUDA" (explained in the header), and a skipped row with its reason as a note.
    assert cells(table_line(text, "M=1576 D=768 r=8", group)) == [
        "M=1576 D=768 r=8", "2.40 ms (1.00x)", "skipped (quick run) [1]", "needs CUDA"]
    assert notes_under(text, group) == {"[1]": "torch.compile of the expert loop takes tens of seconds on a few "
                                               "CPU cores: run without --benchmark-quick"}
    # Bytes moved: the untimed fused row at M=1576 has no bytes, and says why.
    moved = cells(table_line(text, "M=1576 D=768 r=8", group, "bytes moved / floor"))
    notes = notes_under(text, group, "bytes moved / floor")
    assert notes[moved[3]] == "not counted: M above --benchmark-count-rows 1000"
    assert notes[moved[1]] == notes[moved[3]]  # eager at M=1576: the same reason, the same note
    assert notes[moved[2]] == "not run: skipped (quick run)"
    line = cells(table_line(text, "M=394 D=768 r=8", group, "bytes moved / floor"))
    assert line[1] == "3.00x" and line[3] == "1.02x"
    assert notes[line[2]] == "not counted: the interpreter cannot count inside a compiled graph"
    saved = cells(table_line(text, "M=394 D=768 r=8", group, "saved for backward (MiB)"))
    assert "saved-tensor hooks" in notes_under(text, group, "saved for backward (MiB)")[saved[2]]
    # Tables with no number at all are left out, and one line says why.
    assert "No tables of GB/s, peak memory (needs CUDA)." in text
    # No cell of any table is blank: every row gave its reasons.
    for header, body, _ in tables(text):
        assert all(all(line) for line in body), (header, body)
    assert_every_blank_cell_explained(text)


def test_blank_cells_without_a_reason_are_listed_under_the_table(cpu_report, gpu_report):
    # Results written before the suite gave reasons, and a shape the fused rows did not run at.
    _, text = cpu_report
    assert lines_under(text, "## bottleneck forward fp32 D=768 r=8") == [
        "- Empty cells: fused, fused[rows16] at M=6304 D=768 r=8 (no such row in this run)"]
    assert "- Empty cells: eager, compile (no value, and the results give no reason)" in lines_under(
        text, "## bottleneck forward fp32 D=768 r=8", "bytes moved / floor")
    assert_every_blank_cell_explained(text)
    assert_every_blank_cell_explained(gpu_report[1])


def test_suite_gives_a_reason_for_every_missing_number():
    # bench/conftest.py's Suite: what the report reads from a run without CUDA.
    import types

    from bench import conftest

    options = {"--benchmark-quick": True, "--benchmark-count-rows": 1000}
    suite = conftest.Suite(types.SimpleNamespace(getoption=options.__getitem__))
    suite.cuda = False

    def row(**values):
        made = {key: None for key in conftest.ROW_KEYS}
        made.update(op="bottleneck", rows=394, floor_bytes=1, **{"pass": "forward"})
        made.update(values)
        return made

    big = row(provider="eager", variant="-", rows=1576)
    suite.count_later(big, {})
    assert suite.missing_reasons(big)["moved_bytes"] == "not counted: M above --benchmark-count-rows 1000"
    compiled = row(provider="compile", variant="-")
    assert "compiled graph" in suite.missing_reasons(compiled)["moved_bytes"]
    assert "compiled graph" in suite.missing_reasons(compiled)["saved_bytes"]
    fused = row(provider="fused", variant="rows16", saved_bytes=100)
    suite.untimed.append(fused)
    suite.not_timed(fused, "needs CUDA", "fused timings need CUDA: ...")
    reasons = suite.missing_reasons(fused)
    assert reasons["gbps"] == reasons["peak_mem_bytes"] == "needs CUDA"
    assert reasons["moved_bytes"] == "not counted with --benchmark-quick"
    assert reasons["registers"] == "not compile-checked with --benchmark-quick"
    assert "saved_bytes" not in reasons and suite.skipped == []
    # A row whose test skipped before measuring anything is kept, every number missing for that reason.
    skipped = row(provider="compile", variant="-", op="vit_b16", floor_bytes=None)
    suite.not_timed(skipped, conftest._short_reason("slow: run without --benchmark-quick"),
                    "slow: run without --benchmark-quick")
    assert suite.skipped == [skipped] and skipped["not_timed"] == "skipped (quick run)"
    assert set(suite.missing_reasons(skipped).values()) == {"not run: skipped (quick run)"}
    assert conftest._short_reason("fused timings need CUDA: on the CPU ...") == "needs CUDA"
    versions = conftest.library_versions(False)
    assert set(versions) == {"torch", "triton", "timm"} and all(versions.values())


def test_versions_line_lists_the_libraries_and_with_cuda_the_driver_and_gpu(tmp_path):
    results = cpu_results()
    results["fused_adapters"]["versions"] = {"torch": "2.14.1+cu128", "triton": "3.8.0", "timm": "1.0.31"}
    text = report.render(results, tmp_path / "cpu").read_text(encoding="utf-8")
    assert "- Versions: torch 2.14.1+cu128, triton 3.8.0, timm 1.0.31, python 3.11.7\n" in text
    results["fused_adapters"]["versions"].update(cuda="12.8", driver="570.124.06", gpu="NVIDIA H100 80GB HBM3")
    text = report.render(results, tmp_path / "gpu").read_text(encoding="utf-8")
    assert ("- Versions: torch 2.14.1+cu128, triton 3.8.0, timm 1.0.31, CUDA 12.8, driver 570.124.06, "
            "NVIDIA H100 80GB HBM3, python 3.11.7\n") in text


def test_quick_run_groups_with_few_sizes_get_tables_only(tmp_path):
    results = cpu_results()
    results["fused_adapters"]["quick"] = True
    # A second group with three sizes keeps its plots.
    results["benchmarks"] += [cpu_benchmark(cpu_info(rows, "eager", rank=16), rows * 1e-6)
                              for rows in (394, 1576, 6304)]
    text = report.render(results, tmp_path).read_text(encoding="utf-8")
    r8 = text[text.index("## bottleneck forward fp32 D=768 r=8\n"):text.index("## bottleneck forward fp32 D=768 r=16")]
    assert "No plots: this quick run timed 2 sizes of this group (plots need 3)" in r8
    assert cells(table_line(r8, "M=6304 D=768 r=8"))[1] == "9.60 ms (1.00x)"  # the table is still there
    assert not list(tmp_path.glob("*r8-*.png")) and ".png)" not in r8
    assert_png(tmp_path / "bottleneck-forward-fp32-d768-r16-time.png")
    assert "](bottleneck-forward-fp32-d768-r16-time.png)" in text
    # The same results from a full run plot every group.
    results["fused_adapters"]["quick"] = False
    report.render(results, tmp_path / "full")
    assert_png(tmp_path / "full" / "bottleneck-forward-fp32-d768-r8-time.png")


def test_every_group_that_ran_appears(tmp_path):
    # Eager timed and every fused row untimed; fused rows only; and a group whose every row was
    # skipped, written by a module run (its own JSON) that timed nothing.
    results = cpu_results()
    message = "a ViT-B with 8 adapters per block is slow on a few CPU cores: run without --benchmark-quick"
    skipped = [dict(cpu_info(8, provider, op="vit_b16_8tasks", shape="batch=8 224px 8 tasks", floor_bytes=None,
                             aten_kernels=None, **{"pass": "train_step"}),
                    not_timed="skipped (quick run)", not_timed_reason=message)
               for provider in ("loop-eager", "task_routing")]
    only_skipped = {"machine_info": results["machine_info"], "commit_info": results["commit_info"],
                    "benchmarks": [], "datetime": results["datetime"], "version": results["version"],
                    "fused_adapters": dict(results["fused_adapters"], untimed=skipped)}
    paths = [tmp_path / "bottleneck.json", tmp_path / "multitask.json"]
    for path, content in zip(paths, (results, only_skipped)):
        path.write_text(json.dumps(content), encoding="utf-8")
    assert report.main([*map(str, paths), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    for title in ("bottleneck forward fp32 D=768 r=8", "bottleneck forward fp32 D=768 r=64",
                  "vit_b16_8tasks train_step fp32 D=768 r=8"):
        assert f"## {title}\n" in text
    assert cells(table_line(text, "M=1576 D=768 r=8"))[3:] == ["needs CUDA", "needs CUDA"]
    tasks = "## vit_b16_8tasks train_step fp32 D=768 r=8"
    assert cells(table_line(text, "batch=8 224px 8 tasks", tasks)) == [
        "batch=8 224px 8 tasks", "skipped (quick run) [1]", "skipped (quick run) [1]"]
    assert notes_under(text, tasks) == {"[1]": message}
    assert "No plots: nothing in this group was timed." in text[text.index(tasks):]
    assert_every_blank_cell_explained(text)
    # The single file with only untimed rows makes a report of its own too.
    assert report.main([str(paths[1]), "--out", str(tmp_path / "alone")]) == 0
    assert tasks in (tmp_path / "alone" / "report.md").read_text(encoding="utf-8")
