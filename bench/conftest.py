"""The benchmark suite's session: which shapes run, the device and its copy bandwidth, the
device-free counts filled in at the end, and the summary.

`pytest --benchmark` runs everything here. Every benchmark row's extra_info carries the keys
the report reads (see ROW_KEYS). Fused rows that cannot be timed (no CUDA) are skipped with
that reason and kept as "untimed" rows: their device-free numbers (launches, bytes moved
against the floor, registers and spills of their kernels) go to the terminal summary and to
the JSON's "fused_adapters" block.

No number goes missing without a reason in the JSON: a row that is not timed (its test skipped,
or failed before timing) is kept among the untimed rows with "not_timed", a few words for its
time cell ("needs CUDA"), and "not_timed_reason", the skip message or the error; every row's
"missing" maps each number it lacks (MEASURED_KEYS) to why, e.g. "needs CUDA" or "not counted:
M above --benchmark-count-rows 1576". The block's "versions" holds torch's, triton's and timm's
versions, and with CUDA the CUDA version, the driver's and the GPU's name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

# bench/ is not a package: its modules import each other by the repo-root name.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.measure import copy_gbps, in_subprocess  # noqa: E402

# Every row has these; the sparse mixture's rows (bench/test_sparse.py) add experts and top_k,
# the LoRA rows (bench/test_lora.py) dim_out and scale, AdapterFusion's (bench/test_fusion.py) adapters,
# the multi-LoRA rows (bench/test_multilora.py) dim_out, scale, tasks and images. dropout: the rate
# the row's op runs at (bottleneck, LoRA and sparse rows: 0 or bench.measure.DROPOUT; None where the
# row has no dropout to set).
ROW_KEYS = ("op", "pass", "device", "dtype", "shape", "rows", "dim", "rank", "dropout", "provider", "variant",
            "triton_launches", "aten_kernels", "saved_bytes", "floor_bytes", "moved_bytes", "gbps", "copy_gbps",
            "peak_mem_bytes", "host_us")

# The measured numbers of a row (ROW_KEYS' and the compile check's registers) that the report shows;
# the row's "missing" says why each of them it lacks is missing.
MEASURED_KEYS = ("triton_launches", "aten_kernels", "saved_bytes", "floor_bytes", "moved_bytes", "gbps",
                 "peak_mem_bytes", "host_us", "registers")
# The numbers that come from the interpreter's counts at the end of the session (on a GPU the
# profiler gives the launches and the timing run the host time first).
COUNT_KEYS = ("triton_launches", "aten_kernels", "moved_bytes", "host_us")

NOTE_NO_CUDA = ("fused timings need CUDA: on this machine the fused kernels run only in Triton's interpreter, "
                "whose speed means nothing; their rows give launches, bytes saved for backward, bytes moved "
                "against the floor (interpreter byte counter, launches planned for {sms} SMs) and the compile "
                "check's registers and spills. Eager and torch.compile rows are timed on the CPU.")


class Suite:
    """Session state shared by the benchmark modules."""

    def __init__(self, config):
        self.quick = config.getoption("--benchmark-quick")
        self.count_rows = config.getoption("--benchmark-count-rows")
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.device_name = torch.cuda.get_device_name() if self.cuda else "cpu"
        # Launch plans for the device-free counts: this GPU's SM count, or an H100's.
        self.sms = torch.cuda.get_device_properties(0).multi_processor_count if self.cuda else 132
        self._copy_gbps = None
        self.untimed: list[dict] = []
        self.skipped: list[dict] = []  # rows of tests that skipped (or failed) with nothing kept, and why
        self.made: list[dict] = []  # the rows made by the test now running
        self._versions = None
        self.pending: list[tuple[dict, dict]] = []  # (count case, row to fill)
        self.compile_rows: list[dict] = []  # untimed fused rows whose kernels get compile-checked

    @property
    def copy_gbps(self) -> float:
        if self._copy_gbps is None:
            self._copy_gbps = copy_gbps(self.device)
        return self._copy_gbps

    def row(self, **values) -> dict:
        row = {key: None for key in ROW_KEYS}
        row.update(device=self.device_name, copy_gbps=round(self.copy_gbps, 1))
        row.update(values)
        self.made.append(row)
        return row

    @property
    def versions(self) -> dict:
        if self._versions is None:
            self._versions = library_versions(self.cuda)
        return self._versions

    def count_later(self, row: dict, case: dict) -> None:
        """Fill the row's launch counts and moved bytes from the interpreter at the end of the
        session (one subprocess for all rows), if its shape is small enough to count."""
        if row["rows"] <= self.count_rows:
            self.pending.append((dict(case, sms=self.sms), row))
        else:
            reason = f"not counted: M above --benchmark-count-rows {self.count_rows}"
            row.setdefault("missing", {}).update({key: reason for key in COUNT_KEYS})

    def not_timed(self, row: dict, short: str, reason: str) -> None:
        """Mark a row whose test did not time it: short for its time cell, reason in full. A row
        the test did not keep among the untimed rows is kept now, every number missing for short
        (its time cell gives the reason in full)."""
        row["not_timed"], row["not_timed_reason"] = short, reason
        if not any(kept is row for kept in self.untimed):
            row.setdefault("missing", {}).update({key: f"not run: {short}" for key in MEASURED_KEYS})
            self.skipped.append(row)

    def missing_reasons(self, row: dict) -> dict:
        """Why each of the row's MEASURED_KEYS without a value has none: the reasons recorded along
        the way (rows above --benchmark-count-rows, rows not run), else the rule that left it out."""
        recorded = row.get("missing") if isinstance(row.get("missing"), dict) else {}
        return {key: recorded.get(key) or self._why_missing(row, key)
                for key in MEASURED_KEYS if row.get(key) in (None, [])}

    def _why_missing(self, row: dict, key: str) -> str:
        provider = str(row.get("provider") or "")
        fused = provider.startswith("fused") or provider == "losa"
        compiled = "compile" in provider
        model = row.get("floor_bytes") is None  # a whole model has no byte floor
        not_timed = row.get("not_timed")
        if key == "floor_bytes":
            return "no byte floor for a whole model"
        if key == "gbps":
            if model:
                return "no byte floor for a whole model"
            return "needs CUDA" if not self.cuda else not_timed or "not measured"
        if key == "peak_mem_bytes":
            return "needs CUDA" if not self.cuda else not_timed or "not measured"
        if key == "saved_bytes":
            if row.get("pass") == "inference":
                return "inference keeps nothing for backward"
            if compiled and not self.cuda:
                return "not measured: the CPU's saved-tensor hooks cannot see inside a compiled graph"
            return not_timed or "not measured"
        if key == "registers":
            if row.get("compile_error"):
                return f"compile check failed: {row['compile_error']}"
            if not fused:
                return "no fused kernels"
            if model:
                return "compile check of op rows only"
            if self.cuda:
                return "compile check of rows without CUDA only"
            return "not compile-checked with --benchmark-quick" if self.quick else "not compile-checked"
        # The interpreter's counts (COUNT_KEYS).
        if row.get("count_error"):
            return f"count failed: {row['count_error']}"
        if model:
            if key == "moved_bytes":
                return "no byte count for a whole model"
            if key == "host_us":
                return "not measured for a whole model"
            return "needs CUDA" if not self.cuda else not_timed or "not counted"
        if compiled:
            if key == "host_us":
                return "not measured: on the CPU a compiled graph's host time is not separable from its compute"
            return "not counted: the interpreter cannot count inside a compiled graph"
        if self.quick:
            return "not counted with --benchmark-quick"
        return "not counted"

    def finish(self) -> None:
        if self.pending:
            unique = {}
            for case, _ in self.pending:
                unique.setdefault(_case_key(case), {k: v for k, v in case.items() if k != "pass"})
            keys = list(unique)
            jobs = max(1, min(len(keys), os.cpu_count() or 1))
            try:
                results = dict(zip(keys, in_subprocess("count", [unique[k] for k in keys], jobs)))
            except Exception as error:  # a timeout or a crash loses the counts, not the timings
                message = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[-1]}"[:300]
                results = {key: {"error": message} for key in keys}
            for case, row in self.pending:
                result = results[_case_key(case)]
                if "error" in result:
                    row["count_error"] = result["error"]
                    continue
                passes = ["forward", "backward"] if case["pass"] == "forward+backward" else [case["pass"]]
                for key in ("triton_launches", "aten_kernels", "moved_bytes"):
                    if row[key] is None or key == "moved_bytes":
                        row[key] = sum(result[p][key] for p in passes)
                if row.get("host_us") is None:  # no CUDA: the host time with no-op launches (measure.case_host_us)
                    row["host_us"] = result["host_us"][case["pass"]]
        if self.compile_rows:
            _compile_check_rows(self.compile_rows)


def _case_key(case: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in case.items() if k != "pass"))


def _compile_check_rows(rows: list[dict]) -> None:
    """Registers and spill bytes (sm_90) of each untimed fused row's launches, from the compile
    check's compiler settings, in a subprocess without the interpreter."""
    cases = [{k: row[k] for k in ("op", "rows", "dim", "rank", "dtype", "variant", "pass", "experts", "top_k",
                                  "dim_out", "scale", "adapters", "tasks", "dropout") if k in row} for row in rows]
    try:
        usage = in_subprocess("registers", [dict(case, sms=SUITE.sms) for case in cases])
    except Exception as error:  # e.g. no ptxas: the row says so, the run goes on
        for row in rows:
            row["compile_error"] = (str(error).strip().splitlines() or [""])[-1][:200]
        return
    for row, found in zip(rows, usage):
        row["registers"] = found["registers"]
        row["spill_bytes"] = found["spill_bytes"]


SUITE: Suite | None = None


@pytest.fixture(scope="session")
def suite(request):
    global SUITE
    SUITE = Suite(request.config)
    if hasattr(torch, "_dynamo"):
        # One compiled graph per shape and dtype (dynamic=False), as a user's fixed-shape loop
        # gets; the default limit of 8 per function would silently fall back to eager.
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 4096)
    yield SUITE
    SUITE.finish()


def library_versions(cuda: bool) -> dict:
    """torch's, triton's and timm's versions; with CUDA also the CUDA version torch was built
    with, the driver's version and the GPU's name. None for what cannot be found."""
    versions = {"torch": torch.__version__, "triton": None, "timm": None}
    for name, distributions in (("triton", ("triton", "pytorch-triton")), ("timm", ("timm",))):
        for distribution in distributions:
            try:
                versions[name] = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                continue
        if versions[name] is None and name in sys.modules:
            versions[name] = getattr(sys.modules[name], "__version__", None)
    if cuda:
        versions.update(cuda=torch.version.cuda, driver=_driver_version(), gpu=torch.cuda.get_device_name())
    return versions


def _driver_version() -> str | None:
    """The NVIDIA driver's version (e.g. 570.124.06), from NVML or nvidia-smi; None without either."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # no pynvml, or no NVML library: ask nvidia-smi
        pass
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines() if done.returncode == 0 else []
    return lines[0].strip() if lines else None


def _short_reason(message: str) -> str:
    """A few words for the time cell of a row whose test skipped with this message."""
    if message.startswith("fused timings need CUDA"):
        return "needs CUDA"
    if "--benchmark-quick" in message:
        return "skipped (quick run)"
    return "skipped"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A row whose test skipped, or failed before it was timed, is kept with its reason."""
    yield
    if SUITE is None or call.when != "call":
        return
    made, SUITE.made = SUITE.made, []
    if call.excinfo is None:
        return
    if call.excinfo.errisinstance(pytest.skip.Exception):
        message = str(call.excinfo.value.msg or "skipped")
        short = _short_reason(message)
    else:
        fixture = getattr(item, "funcargs", {}).get("benchmark")
        if fixture is not None and fixture.stats is not None and not fixture.has_error:
            return  # it failed after the timing: the timed row is in the JSON
        error = call.excinfo.value
        message = f"failed: {type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"[:300]
        short = "failed"
    for row in made:
        SUITE.not_timed(row, short, message)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    if SUITE is None:
        return
    untimed = SUITE.untimed + SUITE.skipped
    for row in [bench.get("extra_info") for bench in output_json.get("benchmarks") or []] + untimed:
        if isinstance(row, dict) and "provider" in row:
            row["missing"] = SUITE.missing_reasons(row)
    output_json["fused_adapters"] = {
        "device": SUITE.device_name,
        "timed_fused": SUITE.cuda,
        "copy_gbps": SUITE._copy_gbps,
        "sms": SUITE.sms,
        "quick": SUITE.quick,
        "count_rows": SUITE.count_rows,
        "versions": SUITE.versions,
        "note": None if SUITE.cuda else NOTE_NO_CUDA.format(sms=SUITE.sms),
        "untimed": untimed,
    }


def pytest_sessionfinish(session):
    """pytest-benchmark writes no JSON when nothing was timed (a module whose every row skipped, as
    the multitask rows of a quick run without CUDA): the untimed rows and their reasons still go to
    --benchmark-json, in the same form, so that the report shows their groups."""
    config = session.config
    path = config.getoption("benchmark_json", None)
    benchmark_session = getattr(config, "_benchmarksession", None)
    if (SUITE is None or path is None or benchmark_session is None or getattr(benchmark_session, "benchmarks", True)
            or not (SUITE.untimed or SUITE.skipped)):
        return
    hook = config.hook
    machine_info = hook.pytest_benchmark_generate_machine_info(config=config)
    hook.pytest_benchmark_update_machine_info(config=config, machine_info=machine_info)
    commit_info = hook.pytest_benchmark_generate_commit_info(config=config)
    hook.pytest_benchmark_update_commit_info(config=config, commit_info=commit_info)
    output_json = hook.pytest_benchmark_generate_json(config=config, benchmarks=[], include_data=True,
                                                      machine_info=machine_info, commit_info=commit_info)
    hook.pytest_benchmark_update_json(config=config, benchmarks=[], output_json=output_json)
    Path(path).write_text(json.dumps(output_json, indent=4, default=str), encoding="utf-8")


def _mib(value):
    return "-" if value is None else f"{value / 2**20:.2f}"


def pytest_terminal_summary(terminalreporter):
    if SUITE is None or not SUITE.untimed:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fused kernels without a GPU (device-free)")
    for line in _wrap(NOTE_NO_CUDA.format(sms=SUITE.sms)):
        write(line)
    write("")
    header = (f"{'op':<14} {'pass':<17} {'dtype':<6} {'shape':<27} {'variant':<10} {'launches':>8} {'aten':>4} "
              f"{'saved MiB':>9} {'moved/floor':>11} {'regs (sm_90)':<14} {'spills':>6}")
    write(header)
    write("-" * len(header))
    for row in SUITE.untimed:
        ratio = f"{row['moved_bytes'] / row['floor_bytes']:.3f}x" if row.get("moved_bytes") else "-"
        registers = "/".join(str(r) for r in row.get("registers") or []) or "-"
        spills = sum(row.get("spill_bytes") or []) if row.get("spill_bytes") is not None else "-"
        write(f"{row['op']:<14} {row['pass']:<17} {row['dtype']:<6} {row['shape']:<27} {row['variant']:<10} "
              f"{_dash(row['triton_launches']):>8} {_dash(row['aten_kernels']):>4} {_mib(row['saved_bytes']):>9} "
              f"{ratio:>11} {registers:<14} {spills:>6}")


def _dash(value):
    return "-" if value is None else value


def _wrap(text, width=100):
    import textwrap

    return textwrap.wrap(text, width)
