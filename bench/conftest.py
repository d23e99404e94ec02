"""The benchmark suite's session: which shapes run, the device and its copy bandwidth, the
device-free counts filled in at the end, and the summary.

`pytest --benchmark` runs everything here. Every benchmark row's extra_info carries the keys
the report reads (see ROW_KEYS). Fused rows that cannot be timed (no CUDA) are skipped with
that reason and kept as "untimed" rows: their device-free numbers (launches, bytes moved
against the floor, registers and spills of their kernels) go to the terminal summary and to
the JSON's "fused_adapters" block.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

# bench/ is not a package: its modules import each other by the repo-root name.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.measure import copy_gbps, in_subprocess  # noqa: E402

# Every row has these; the sparse mixture's rows (bench/test_sparse.py) add experts and top_k,
# the LoRA rows (bench/test_lora.py) dim_out and scale.
ROW_KEYS = ("op", "pass", "device", "dtype", "shape", "rows", "dim", "rank", "provider", "variant",
            "triton_launches", "aten_kernels", "saved_bytes", "floor_bytes", "moved_bytes", "gbps", "copy_gbps",
            "peak_mem_bytes", "host_us")

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
        return row

    def count_later(self, row: dict, case: dict) -> None:
        """Fill the row's launch counts and moved bytes from the interpreter at the end of the
        session (one subprocess for all rows), if its shape is small enough to count."""
        if row["rows"] <= self.count_rows:
            self.pending.append((dict(case, sms=self.sms), row))

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
                                  "dim_out", "scale") if k in row} for row in rows]
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


def pytest_benchmark_update_json(config, benchmarks, output_json):
    if SUITE is None:
        return
    output_json["fused_adapters"] = {
        "device": SUITE.device_name,
        "timed_fused": SUITE.cuda,
        "copy_gbps": SUITE._copy_gbps,
        "sms": SUITE.sms,
        "quick": SUITE.quick,
        "note": None if SUITE.cuda else NOTE_NO_CUDA.format(sms=SUITE.sms),
        "untimed": SUITE.untimed,
    }


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
