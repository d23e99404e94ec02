"""Markdown report and plots from a benchmark run.

    python -m bench.report RESULTS.json [MORE.json ...] --out DIR

RESULTS.json is what `pytest --benchmark --benchmark-json RESULTS.json` writes (several files
of one run, such as one per benchmark module, are merged). The report (DIR/report.md) has one
table per op, pass, dtype, dim and rank (and for the sparse mixture's rows, experts and top_k;
for LoRA's, the output width D_out; for the multi-LoRA rows, D_out and the tasks T; rows with
dropout get a table of their own after the same rows without, "dropout=0.1" in its title): a row per
shape, a column per provider (and kernel variant), each cell the median time and the speedup
over the table's baseline on the same shape (eager; loop-eager, the PEFT-style loop over the
tasks, in the multi-task tables), then tables of bandwidth, peak memory, bytes moved, bytes
saved for backward and launch counts. Rows that were not timed appear in the same tables with
the suite's reason ("needs CUDA" for fused rows on a machine without CUDA). No cell is left
blank without a reason: a number in brackets, [1], refers to the reasons listed under its
table, and a line under the table says why the remaining blank cells (rows not in the run,
results that give no reason) are empty.
Each group with a timed row also gets PNG plots of time, speedup and peak memory against rows,
except in a quick run where the group has fewer than MIN_PLOT_SIZES sizes: tables only there.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

try:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window: must be chosen before pyplot is imported
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter, NullLocator
except ImportError:  # a machine without matplotlib still gets the tables
    plt = None

BASELINE = "eager"
# Ops whose rows compare against another provider than eager: the multi-task rows (a multi-LoRA
# linear, a ViT-B with 8 tasks' Adapter+ or LoRA) against the loop over the tasks in plain PyTorch.
BASELINES = {"multilora": "loop-eager", "vit_b16_8tasks": "loop-eager", "vit_b16_8tasks_lora": "loop-eager"}
# Providers that run the package's kernels besides "fused..." (the multi-task rows').
FUSED_PROVIDERS = {"routed", "loop-fused", "task_routing"}
MEBIBYTE = 2 ** 20
# Passes in the order a reader follows them: an op's forward before its backward, then the model.
PASS_ORDER = {"forward": 0, "forward+backward": 1, "inference": 2, "train_step": 3}
# Variant names that mean "the only variant", left out of column labels.
PLAIN_VARIANTS = {None, "", "-", "default"}
# What a time cell says for an untimed row whose results give no reason (written before the suite
# gave reasons): such rows were fused rows on a machine without CUDA.
NEEDS_CUDA = "needs CUDA"
# A quick run's group with fewer distinct sizes (rows) than this gets tables only: a plot of one or
# two points says nothing that its table does not.
MIN_PLOT_SIZES = 3


class ReportError(Exception):
    """The input cannot be turned into a report; the message says why."""


@dataclass(frozen=True)
class Row:
    """One measured (or, for fused rows on a machine without CUDA, unmeasured) configuration."""

    op: str
    pass_name: str
    dtype: str
    dim: int | None
    rank: int | None
    rows: int | None
    shape: str
    provider: str
    variant: str
    device: str | None
    median: float | None  # seconds; None when the row was not timed
    not_timed_text: str  # what a timing cell says when median is None
    info: dict = field(compare=False, hash=False)

    @property
    def not_timed_reason(self) -> str | None:
        """The suite's full reason for an untimed row (a skip message, an error), if it gave one."""
        reason = self.info.get("not_timed_reason")
        return reason if isinstance(reason, str) and reason else None

    def missing_reason(self, keys: tuple) -> str | None:
        """The suite's reason for the first of `keys` that the row has no value for (see the
        "missing" entry that bench/conftest.py writes into each row), or None without one."""
        missing = self.info.get("missing")
        if not isinstance(missing, dict):
            return None
        for key in keys:
            if self.info.get(key) in (None, "", []) and isinstance(missing.get(key), str) and missing[key]:
                return missing[key]
        return None

    @property
    def column(self) -> str:
        if self.variant in PLAIN_VARIANTS:
            return self.provider
        return f"{self.provider}[{self.variant}]"

    @property
    def group_key(self) -> tuple:
        return (self.op, self.pass_name, self.dtype, self.dim, self.dim_out, self.rank, self.experts, self.top_k,
                self.adapters, self.tasks, self.dropout)

    @property
    def dropout(self) -> float | None:
        """The dropout rate the row's op ran at; None without dropout (0, or rows that do not say)."""
        value = self.number("dropout")
        return value if value else None

    @property
    def dim_out(self) -> int | None:
        """The output width of a width-changing op (LoRA's D_out; None for rows of other ops)."""
        return _as_int(self.info.get("dim_out"))

    @property
    def experts(self) -> int | None:
        """The sparse mixture's expert count E (None for rows of other ops)."""
        return _as_int(self.info.get("experts"))

    @property
    def top_k(self) -> int | None:
        """The sparse mixture's experts per row k (None for rows of other ops)."""
        return _as_int(self.info.get("top_k"))

    @property
    def adapters(self) -> int | None:
        """AdapterFusion's fused adapter count N (None for rows of other ops)."""
        return _as_int(self.info.get("adapters"))

    @property
    def tasks(self) -> int | None:
        """The multi-LoRA rows' task count T in the batch (None for rows of other ops)."""
        return _as_int(self.info.get("tasks"))

    @property
    def shape_key(self) -> tuple:
        return (self.rows, self.shape)

    @property
    def timed(self) -> bool:
        return self.median is not None and self.median > 0

    @property
    def is_fused(self) -> bool:
        return self.provider.startswith("fused") or self.provider in FUSED_PROVIDERS

    def number(self, key: str) -> float | None:
        """A numeric extra_info value, or None when it is absent, null or not a number."""
        value = self.info.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return None
        return value


@dataclass
class Group:
    """The rows of one table: same op, pass, dtype, dim and rank (and dim_out, experts, top_k,
    adapters, tasks and dropout)."""

    key: tuple
    rows: list[Row]
    slug: str = ""

    @property
    def title(self) -> str:
        op, pass_name, dtype, dim, dim_out, rank, experts, top_k, adapters, tasks, dropout = self.key
        parts = [op, pass_name, dtype]
        if dim is not None:
            parts.append(f"D={dim}")
        if dim_out is not None:
            parts.append(f"D_out={dim_out}")
        if rank is not None:
            parts.append(f"r={rank}")
        if experts is not None:
            parts.append(f"E={experts}")
        if top_k is not None:
            parts.append(f"k={top_k}")
        if adapters is not None:
            parts.append(f"N={adapters}")
        if tasks is not None:
            parts.append(f"T={tasks}")
        if dropout is not None:
            parts.append(f"dropout={dropout:g}")
        return " ".join(parts)

    @property
    def baseline_column(self) -> str:
        """The provider the table's speedups are over: eager, or the op's own (BASELINES)."""
        return BASELINES.get(self.key[0], BASELINE)

    @property
    def is_model(self) -> bool:
        return any(row.number("images_per_s") is not None for row in self.rows)

    @property
    def shapes(self) -> list[tuple]:
        # Rows without a row count go last, in shape order.
        keys = {row.shape_key for row in self.rows}
        return sorted(keys, key=lambda key: (key[0] is None, key[0] or 0, key[1]))

    @property
    def columns(self) -> list[str]:
        first_rows = {}
        for row in self.rows:
            first_rows.setdefault(row.column, row)
        return sorted(first_rows, key=lambda column: _column_order(first_rows[column], self.baseline_column))

    def cell(self, shape_key: tuple, column: str) -> Row | None:
        for row in self.rows:
            if row.shape_key == shape_key and row.column == column:
                return row
        return None

    def baseline(self, shape_key: tuple) -> Row | None:
        row = self.cell(shape_key, self.baseline_column)
        return row if row is not None and row.timed else None

    def fastest_fused(self, shape_key: tuple) -> Row | None:
        candidates = [row for row in self.rows if row.shape_key == shape_key and row.is_fused and row.timed]
        return min(candidates, key=lambda row: row.median, default=None)


def _column_order(row: Row, baseline: str = BASELINE) -> tuple:
    # Baseline first, then the other unfused providers, then fused; within a provider the
    # default variant leads.
    if row.provider == baseline:
        rank = 0
    elif row.provider == "compile":
        rank = 1
    elif not row.is_fused:
        rank = 2
    else:
        rank = 3
    return (rank, row.provider, row.variant not in PLAIN_VARIANTS, row.variant or "")


def _group_order(group: Group) -> tuple:
    op, pass_name, dtype, dim, dim_out, rank, experts, top_k, adapters, tasks, dropout = group.key
    return (group.is_model, op, PASS_ORDER.get(pass_name, len(PASS_ORDER)), pass_name, dtype,
            dim is None, dim or 0, dim_out is None, dim_out or 0, rank is None, rank or 0,
            experts is None, experts or 0, top_k is None, top_k or 0, adapters is None, adapters or 0,
            tasks is None, tasks or 0, dropout or 0)


# ---------------------------------------------------------------------------------------------
# Reading the input


def _as_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _as_text(value, fallback: str) -> str:
    return fallback if value is None or value == "" else str(value)


def _make_row(info: dict, median, fallback_name: str, fallback_device, not_timed_text: str) -> Row:
    rows = _as_int(info.get("rows"))
    dim, rank = _as_int(info.get("dim")), _as_int(info.get("rank"))
    default_shape = f"rows={rows}" if rows is not None else fallback_name
    if isinstance(median, bool) or not isinstance(median, (int, float)):
        median = None
    return Row(
        op=_as_text(info.get("op"), fallback_name),
        pass_name=_as_text(info.get("pass"), "-"),
        dtype=_as_text(info.get("dtype"), "-"),
        dim=dim,
        rank=rank,
        rows=rows,
        shape=_as_text(info.get("shape"), default_shape),
        # A benchmark that does not say what it runs is taken as its own provider, not as eager,
        # so that nothing is ever compared against it by mistake.
        provider=_as_text(info.get("provider"), fallback_name),
        variant=_as_text(info.get("variant"), "-"),
        device=info.get("device") or fallback_device,
        median=median,
        not_timed_text=not_timed_text,
        info=info,
    )


def collect_rows(results: dict) -> list[Row]:
    """Timed benchmarks and the suite's untimed fused rows, as one list."""
    if not isinstance(results, dict):
        raise ReportError("the input is not a pytest-benchmark JSON object")
    benchmarks = results.get("benchmarks") or []
    fused_block = results.get("fused_adapters") or {}
    untimed = (fused_block.get("untimed") or []) if isinstance(fused_block, dict) else []
    if not isinstance(benchmarks, list) or not isinstance(untimed, list):
        raise ReportError("'benchmarks' and 'fused_adapters.untimed' must be lists")
    rows = []
    for benchmark in benchmarks:
        if not isinstance(benchmark, dict):
            continue
        info = benchmark.get("extra_info")
        info = info if isinstance(info, dict) else {}
        stats = benchmark.get("stats")
        stats = stats if isinstance(stats, dict) else {}
        name = str(benchmark.get("group") or benchmark.get("name") or "benchmark")
        rows.append(_make_row(info, stats.get("median"), name, None, "-"))
    for info in untimed:
        if isinstance(info, dict):
            rows.append(_make_row(info, None, "fused", fused_block.get("device"),
                                  _as_text(info.get("not_timed"), NEEDS_CUDA)))
    if not rows:
        raise ReportError("no benchmarks in the input (was the suite run with --benchmark?)")
    return rows


def group_rows(rows: list[Row]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for row in rows:
        group = groups.setdefault(row.group_key, Group(row.group_key, []))
        existing = group.cell(row.shape_key, row.column)
        if existing is None:
            group.rows.append(row)
        elif row.timed and not existing.timed:
            # One cell, two rows: the timed one says more.
            group.rows[group.rows.index(existing)] = row
        else:
            print(f"warning: two rows for {group.title}, {row.shape}, {row.column}; keeping the first",
                  file=sys.stderr)
    ordered = sorted(groups.values(), key=_group_order)
    taken = set()
    for group in ordered:
        slug = re.sub(r"[^a-z0-9]+", "-", group.title.lower().replace("=", "")).strip("-") or "group"
        unique, count = slug, 2
        while unique in taken:
            unique, count = f"{slug}-{count}", count + 1
        taken.add(unique)
        group.slug = unique
    return ordered


# ---------------------------------------------------------------------------------------------
# Formatting


def significant(value: float, digits: int = 3) -> str:
    """value with `digits` significant digits, never in scientific notation."""
    if value == 0:
        return "0"
    if abs(value) >= 10 ** (digits - 1):
        return f"{value:.0f}"  # whole numbers keep all their digits: 1106 GB/s, not 1110
    rounded = float(f"{value:.{digits}g}")  # round first so that 99.96 becomes 100, not 100.0
    magnitude = math.floor(math.log10(abs(rounded)))
    return f"{rounded:.{max(digits - 1 - magnitude, 0)}f}"


def format_time(seconds: float) -> str:
    rounded = float(f"{seconds:.3g}")  # pick the unit after rounding: 999.7 us reads 1.00 ms
    if rounded < 1e-3:
        return f"{significant(seconds * 1e6)} us"
    if rounded < 1:
        return f"{significant(seconds * 1e3)} ms"
    return f"{significant(seconds)} s"


def format_mebibytes(value: float) -> str:
    return significant(value / MEBIBYTE)


def speedup(group: Group, row: Row) -> float | None:
    """How many times faster than the group's baseline (eager, or BASELINES') on the same shape;
    None without a timed baseline row."""
    baseline = group.baseline(row.shape_key)
    if baseline is None or not row.timed:
        return None
    if group.is_model:
        # Model rows report throughput; compare that, so the cell agrees with its own numbers.
        mine, theirs = row.number("images_per_s"), baseline.number("images_per_s")
        if mine is not None and theirs:
            return mine / theirs
    return baseline.median / row.median


class Notes:
    """Why the cells of one table have no number. A reason the suite gave gets a note number, [1],
    written in its cells and listed under the table; the cells without a given reason (no row for
    that shape in the run, or results written before the suite gave reasons) stay blank and are
    listed by column in one line under the table."""

    def __init__(self, shapes: list[tuple]):
        self.shapes = [shape for _, shape in shapes]
        self.reasons: list[str] = []
        self.blanks: dict[str, dict[str, list[str]]] = {}  # why -> column -> shapes

    def marker(self, reason: str) -> str:
        if reason not in self.reasons:
            self.reasons.append(reason)
        return f"[{self.reasons.index(reason) + 1}]"

    def blank(self, row: Row | None, keys: tuple, shape_key: tuple, column: str) -> str:
        """The text of a cell with no number: the note number of the suite's reason, or "" (then
        listed in the line of blank cells)."""
        reason = row.missing_reason(keys) if row is not None else None
        if reason is not None:
            return self.marker(reason)
        why = "no such row in this run" if row is None else "no value, and the results give no reason"
        self.blanks.setdefault(why, {}).setdefault(column, []).append(shape_key[1])
        return ""

    def lines(self) -> list[str]:
        lines = [f"- [{number}] {reason}" for number, reason in enumerate(self.reasons, 1)]
        for why, where in self.blanks.items():
            # Columns blank at the same shapes share one entry; a column blank everywhere needs no shapes.
            by_shapes: dict[tuple, list[str]] = {}
            for column, shapes in where.items():
                by_shapes.setdefault(tuple(shapes), []).append(column)
            parts = [", ".join(columns) + ("" if list(shapes) == self.shapes else f" at {', '.join(shapes)}")
                     for shapes, columns in by_shapes.items()]
            lines.append(f"- Empty cells: {'; '.join(parts)} ({why})")
        return lines + [""] if lines else []


def timing_cell(group: Group, row: Row | None, bold: bool, notes: Notes | None = None) -> str:
    if row is None:
        return ""
    if not row.timed:
        # "needs CUDA" is explained in the report's header; any other reason gets a note.
        text, reason = row.not_timed_text, row.not_timed_reason
        if notes is not None and reason and text != NEEDS_CUDA and reason != text:
            text += f" {notes.marker(reason)}"
        return text
    text = format_time(row.median)
    images_per_s = row.number("images_per_s")
    if images_per_s is not None:
        text = f"{significant(images_per_s)} img/s, {text}"
    ratio = speedup(group, row)
    if ratio is not None:
        text += f" ({ratio:.2f}x)"
    return f"**{text}**" if bold else text


def markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    """A Markdown table padded to line up in plain text too."""
    cells = [[cell.replace("|", "\\|") for cell in line] for line in [header, *body]]
    widths = [max(3, *(len(line[index]) for line in cells)) for index in range(len(header))]

    def line_text(line):
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |"

    return [line_text(cells[0]), "|" + "|".join("-" * (width + 2) for width in widths) + "|",
            *(line_text(line) for line in cells[1:])]


# ---------------------------------------------------------------------------------------------
# Header


def _devices(rows: list[Row], results: dict) -> list[str]:
    devices = list(dict.fromkeys(str(row.device) for row in rows if row.device))
    if devices:
        return devices
    cpu = (results.get("machine_info") or {}).get("cpu") or {}
    return [cpu.get("brand_raw")] if isinstance(cpu, dict) and cpu.get("brand_raw") else ["unknown"]


# (key, label) of each version in the header, in order; the GPU's name goes in without a label.
VERSION_KEYS = (("torch", "torch"), ("triton", "triton"), ("timm", "timm"), ("cuda", "CUDA"),
                ("driver", "driver"), ("gpu", None))


def _versions(results: dict) -> list[str]:
    """torch, triton and timm versions, and with CUDA its version, the driver and the GPU, from
    the suite's "fused_adapters" block (its "versions") or wherever else they are in machine_info;
    then Python's."""
    sources = []
    fused_block = results.get("fused_adapters")
    if isinstance(fused_block, dict) and isinstance(fused_block.get("versions"), dict):
        sources.append(fused_block["versions"])
    machine_info = results.get("machine_info")
    machine_info = machine_info if isinstance(machine_info, dict) else {}
    # machine_info may hold them at the top level or one level down (e.g. under "versions").
    candidates = dict(machine_info)
    for name, value in machine_info.items():
        if isinstance(value, dict) and name != "cpu":
            for key, inner in value.items():
                candidates.setdefault(key, inner)
    sources.append(candidates)
    found = []
    for library, label in VERSION_KEYS:
        value = None
        for source in sources:
            for key in (library, f"{library}_version", f"{library}version", f"{library}_name"):
                value = source.get(key)
                if isinstance(value, dict):
                    value = value.get("version")
                if value not in (None, "") and not isinstance(value, (dict, list)):
                    break
                value = None
            if value is not None:
                break
        if value is not None:
            found.append(f"{label} {value}" if label else str(value))
    if machine_info.get("python_version"):
        found.append(f"python {machine_info['python_version']}")
    return found


def copy_bandwidths(rows: list[Row], results: dict) -> dict[str | None, float]:
    """Measured copy bandwidth per device (GB/s); the key None holds the run-wide value."""
    bandwidths: dict[str | None, float] = {}
    fused_block = results.get("fused_adapters")
    if isinstance(fused_block, dict):
        value = fused_block.get("copy_gbps")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            bandwidths[None] = value
    for row in rows:
        value = row.number("copy_gbps")
        if value is not None and value > 0:
            bandwidths.setdefault(row.device, value)
    return bandwidths


def header_lines(rows: list[Row], results: dict) -> list[str]:
    lines = ["# Benchmark report", ""]
    lines.append(f"- Device: {', '.join(_devices(rows, results))}")
    if results.get("datetime"):
        lines.append(f"- Date: {results['datetime']}")
    versions = _versions(results)
    if versions:
        lines.append(f"- Versions: {', '.join(versions)}")
    commit = results.get("commit_info") or {}
    if isinstance(commit, dict) and commit.get("id"):
        text = str(commit["id"])[:10]
        if commit.get("branch"):
            text += f" on {commit['branch']}"
        if commit.get("dirty"):
            text += " (uncommitted changes)"
        lines.append(f"- Commit: {text}")
    bandwidths = copy_bandwidths(rows, results)
    if len({significant(value) for value in bandwidths.values()}) > 1:
        # Several devices measured copy speeds that differ in the digits shown: say which is which.
        parts = [f"{significant(value)} GB/s ({device or 'run'})" for device, value in bandwidths.items()]
        lines.append(f"- Copy bandwidth: {', '.join(parts)}")
    elif bandwidths:
        lines.append(f"- Copy bandwidth: {significant(next(iter(bandwidths.values())))} GB/s")
    else:
        lines.append("- Copy bandwidth: not measured")
    fused_block = results.get("fused_adapters") or {}
    if isinstance(fused_block, dict) and fused_block.get("sms"):
        lines.append(f"- Fused launches planned for {fused_block['sms']} SMs")
    lines.append("")
    if isinstance(fused_block, dict) and fused_block.get("note"):
        lines += [f"> **Note:** {fused_block['note']}", ""]
    lines += ["Time cells: median time (speedup over eager on the same shape; in the multi-task tables over "
              "loop-eager, the PEFT-style loop over the tasks); model rows lead with "
              "images per second. Bold: the fastest timed fused variant on that shape. "
              "\"needs CUDA\": a fused row that this machine could not time; other rows that were not "
              "timed say why. A variant other than the default is written in brackets, e.g. fused[rows16]. "
              "A cell with no number says why, or holds a note number such as [1] whose reason is listed "
              "under its table.", ""]
    return lines


# ---------------------------------------------------------------------------------------------
# Group tables


def _copy_for(row: Row, bandwidths: dict) -> float | None:
    return row.number("copy_gbps") or bandwidths.get(row.device) or bandwidths.get(None)


def _bandwidth_cell(row: Row, bandwidths: dict) -> str:
    gbps = row.number("gbps")
    if gbps is None:
        return ""
    copy = _copy_for(row, bandwidths)
    return f"{significant(gbps)} ({gbps / copy:.0%})" if copy else significant(gbps)


def _bytes_cell(key: str):
    def cell(row: Row, bandwidths: dict) -> str:
        value = row.number(key)
        return "" if value is None else format_mebibytes(value)
    return cell


def _moved_cell(row: Row, bandwidths: dict) -> str:
    moved, floor = row.number("moved_bytes"), row.number("floor_bytes")
    return f"{moved / floor:.2f}x" if moved is not None and floor else ""


def _launches_cell(row: Row, bandwidths: dict) -> str:
    triton, aten = row.number("triton_launches"), row.number("aten_kernels")
    if triton is None and aten is None:
        return ""
    return " + ".join("?" if count is None else str(int(count)) for count in (triton, aten))


def _host_cell(row: Row, bandwidths: dict) -> str:
    value = row.number("host_us")
    return "" if value is None else significant(value)


def _registers_cell(row: Row, bandwidths: dict) -> str:
    # Per launch, from the compile check (rows that could not run on a GPU): "48/47/128, 0 B".
    registers, spills = row.info.get("registers"), row.info.get("spill_bytes")
    if not isinstance(registers, list) or not registers:
        return ""
    text = "/".join(str(value) for value in registers)
    if isinstance(spills, list):
        text += f", {sum(spills)} B"
    return text


# (title, short name, cell maker, the row keys whose absence leaves the cell blank: the suite's
# reasons are keyed by them)
DETAIL_TABLES = [
    ("GB/s (% of copy)", "GB/s", _bandwidth_cell, ("gbps",)),
    ("peak memory (MiB)", "peak memory", _bytes_cell("peak_mem_bytes"), ("peak_mem_bytes",)),
    ("bytes moved / floor", "bytes moved", _moved_cell, ("moved_bytes", "floor_bytes")),
    ("saved for backward (MiB)", "saved for backward", _bytes_cell("saved_bytes"), ("saved_bytes",)),
    ("launches (triton + aten)", "launches", _launches_cell, ("triton_launches", "aten_kernels")),
    ("host time to enqueue one call (us)", "host time", _host_cell, ("host_us",)),
    ("registers per launch, spill bytes (sm_90)", "registers", _registers_cell, ("registers",)),
]
MEASURED_KEYS = tuple(dict.fromkeys(key for *_, keys in DETAIL_TABLES for key in keys if key != "floor_bytes"))


def _left_out_reasons(group: Group, keys: tuple) -> tuple:
    """Why a table of the group has no number at all: the distinct reasons the suite gave for its
    rows that have some number (a row with none is explained in the time table); none for results
    written before the suite gave reasons."""
    reasons = []
    for row in group.rows:
        if row.timed or any(row.info.get(key) not in (None, "", []) for key in MEASURED_KEYS):
            if (reason := row.missing_reason(keys)) is not None:
                reasons.append(reason)
    return tuple(dict.fromkeys(reasons))


def group_lines(group: Group, bandwidths: dict, plots: list[tuple[str, str]], no_plots: str | None = None) -> list[str]:
    """The group's tables, each with the reasons for its cells without a number under it, then
    its plots (or no_plots: why it has none)."""
    columns, shapes = group.columns, group.shapes
    lines = [f"## {group.title}", ""]
    notes = Notes(shapes)
    body = []
    for shape_key in shapes:
        fastest = group.fastest_fused(shape_key)
        line = [shape_key[1]]
        for column in columns:
            row = group.cell(shape_key, column)
            text = timing_cell(group, row, bold=row is not None and row is fastest, notes=notes)
            line.append(text or notes.blank(row, (), shape_key, column))
        body.append(line)
    lines += markdown_table(["shape", *columns], body) + [""] + notes.lines()
    left_out: dict[tuple, list[str]] = {}  # reasons -> short names of the tables left out for them
    for title, name, make_cell, keys in DETAIL_TABLES:
        notes = Notes(shapes)
        values = [[make_cell(row, bandwidths) if (row := group.cell(shape_key, column)) else ""
                   for column in columns] for shape_key in shapes]
        if not any(any(line) for line in values):
            # A table with no number at all is left out; one line at the end says why.
            if reasons := _left_out_reasons(group, keys):
                left_out.setdefault(reasons, []).append(name)
            continue
        body = [[shape_key[1]] + [text or notes.blank(group.cell(shape_key, column), keys, shape_key, column)
                                  for column, text in zip(columns, line)]
                for shape_key, line in zip(shapes, values)]
        lines += [f"{title}:", ""] + markdown_table(["shape", *columns], body) + [""] + notes.lines()
    if left_out:
        parts = [f"{', '.join(names)} ({'; '.join(reasons)})" for reasons, names in left_out.items()]
        lines += [f"No tables of {'; '.join(parts)}.", ""]
    if plots:
        lines += [" ".join(f"![{caption}]({name})" for caption, name in plots), ""]
    elif no_plots:
        lines += [no_plots, ""]
    return lines


def fastest_lines(groups: list[Group]) -> list[str]:
    lines = ["## Fastest fused variant per shape", ""]
    for group in groups:
        fused = [row for row in group.rows if row.is_fused]
        if not fused:
            lines.append(f"- {group.title}: no fused rows")
            continue
        if not any(row.timed for row in fused):
            lines.append(f"- {group.title}: {_not_timed_text(fused)}")
            continue
        lines.append(f"- {group.title}:")
        for shape_key in group.shapes:
            fastest = group.fastest_fused(shape_key)
            here = [row for row in fused if row.shape_key == shape_key]
            if fastest is not None:
                text = f"{fastest.column}, {timing_cell(group, fastest, bold=False)}"
            elif here:
                text = _not_timed_text(here)
            else:
                text = "no fused row"
            lines.append(f"  - {shape_key[1]}: {text}")
    return lines + [""]


def _not_timed_text(rows: list[Row]) -> str:
    """Why none of these fused rows was timed, in a few words."""
    reasons = list(dict.fromkeys(row.not_timed_text for row in rows))
    if reasons == [NEEDS_CUDA]:
        return "fused timings need CUDA (not timed on this machine)"
    return f"fused rows not timed: {'; '.join(reasons)}"


# ---------------------------------------------------------------------------------------------
# Plots


def _time_unit(seconds: list[float]) -> tuple[str, float]:
    typical = sorted(seconds)[len(seconds) // 2]
    if typical < 1e-3:
        return "us", 1e6
    if typical < 1:
        return "ms", 1e3
    return "s", 1.0


def _new_axes(group: Group, ylabel: str, rows: list[int], log_y: bool):
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    axes.set_xscale("log")
    if log_y:
        axes.set_yscale("log")
        # Plain numbers (60, 100) rather than 6x10^1; minor ticks labelled when the range is narrow.
        plain = LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5))
        axes.yaxis.set_major_formatter(plain)
        axes.yaxis.set_minor_formatter(plain)
    # Only the measured row counts as ticks: a log axis over a narrow range labels too few.
    axes.set_xticks(rows, [str(value) for value in rows])
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xlabel("batch size" if group.is_model else "rows (M)")
    axes.set_ylabel(ylabel)
    axes.set_title(group.title, fontsize=10)
    axes.grid(True, which="major", alpha=0.3)
    return figure, axes


def _from_zero(axes) -> None:
    """Start a linear axis at zero (speedups and memory read as proportions), once its lines are
    drawn: set before them, the top would stay at matplotlib's empty-axes 1 and hide every larger
    value. The top is where the plotted values put it, raised by 5% so that the highest marker is
    not cut in half by the frame."""
    axes.set_ylim(0, axes.get_ylim()[1] * 1.05)


def _save(figure, axes, path: Path) -> None:
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _series(group: Group, column: str, value) -> tuple[list[int], list[float]]:
    points = []
    for row in group.rows:
        if row.column == column and row.rows is not None:
            y = value(row)
            if y is not None:
                points.append((row.rows, y))
    points.sort()
    return [x for x, _ in points], [y for _, y in points]


@dataclass
class Plot:
    """One figure of a group, drawn but not saved: its caption, file name, figure and axes."""

    caption: str
    name: str
    figure: object
    axes: object


def no_plots_reason(group: Group, quick: bool) -> str | None:
    """Why the group gets no plots (a line for the report), or None when it gets them."""
    sizes = {row.rows for row in group.rows if row.timed and row.rows is not None}
    if not sizes:
        return "No plots: nothing in this group was timed."
    if quick and len(sizes) < MIN_PLOT_SIZES:
        return (f"No plots: this quick run timed {len(sizes)} size{'s' if len(sizes) > 1 else ''} of this group "
                f"(plots need {MIN_PLOT_SIZES}); the tables above have its numbers.")
    return None


def make_plots(group: Group) -> list[Plot]:
    """The group's figures of time, speedup and peak memory against rows (those it has values
    for), drawn and not yet saved; write_plots saves them."""
    timed = [row for row in group.rows if row.timed and row.rows is not None]
    if not timed or plt is None:
        return []
    columns = group.columns
    colors = {column: f"C{index % 10}" for index, column in enumerate(columns)}
    all_rows = sorted({row.rows for row in timed})
    plots = []

    unit, scale = _time_unit([row.median for row in timed])
    figure, axes = _new_axes(group, f"median time ({unit})", all_rows, log_y=True)
    for column in columns:
        xs, ys = _series(group, column, lambda row: row.median * scale if row.timed else None)
        if xs:
            axes.plot(xs, ys, marker="o", color=colors[column], label=column)
    plots.append(Plot("median time", f"{group.slug}-time.png", figure, axes))

    speedup_series = [(column, *_series(group, column, lambda row: speedup(group, row)))
                      for column in columns if column != group.baseline_column]
    speedup_series = [series for series in speedup_series if series[1]]
    if speedup_series:
        figure, axes = _new_axes(group, f"speedup over {group.baseline_column} (x)", all_rows, log_y=False)
        axes.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        for column, xs, ys in speedup_series:
            axes.plot(xs, ys, marker="o", color=colors[column], label=column)
        _from_zero(axes)
        plots.append(Plot(f"speedup over {group.baseline_column}", f"{group.slug}-speedup.png", figure, axes))

    def peak(row):
        value = row.number("peak_mem_bytes")
        return None if value is None else value / MEBIBYTE

    memory_series = [(column, *_series(group, column, peak)) for column in columns]
    memory_series = [series for series in memory_series if series[1]]
    if memory_series:
        memory_rows = sorted({x for _, xs, _ in memory_series for x in xs})
        figure, axes = _new_axes(group, "peak memory (MiB)", memory_rows, log_y=False)
        for column, xs, ys in memory_series:
            axes.plot(xs, ys, marker="o", color=colors[column], label=column)
        _from_zero(axes)
        plots.append(Plot("peak memory", f"{group.slug}-memory.png", figure, axes))
    return plots


def write_plots(group: Group, out_dir: Path) -> list[tuple[str, str]]:
    """PNG plots for one group; returns (caption, file name) pairs to link from the report."""
    plots = make_plots(group)
    for plot in plots:
        _save(plot.figure, plot.axes, out_dir / plot.name)
    return [(plot.caption, plot.name) for plot in plots]


# ---------------------------------------------------------------------------------------------
# Entry points


def render(results: dict, out_dir: Path) -> Path:
    """Write report.md and the plots into out_dir; returns the report's path."""
    out_dir = Path(out_dir)
    rows = collect_rows(results)
    groups = group_rows(rows)
    bandwidths = copy_bandwidths(rows, results)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = header_lines(rows, results)
    fused_block = results.get("fused_adapters")
    quick = isinstance(fused_block, dict) and fused_block.get("quick") is True
    for group in groups:
        no_plots = no_plots_reason(group, quick)
        plots = [] if no_plots else write_plots(group, out_dir)
        lines += group_lines(group, bandwidths, plots, no_plots)
    lines += fastest_lines(groups)
    if plt is None:
        lines.append("(No plots: matplotlib is not installed.)")
    report = out_dir / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


def load(path: Path) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ReportError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ReportError(f"{path} is not valid JSON: {error}") from None


def merge(results: list, paths: list) -> dict:
    """One run's results from several JSON files (the suite run module by module, each with its
    own --benchmark-json): the benchmarks and the untimed fused rows of all, in order; the
    machine, commit, device and copy bandwidth of the first."""
    for result, path in zip(results, paths):
        block = result.get("fused_adapters") if isinstance(result, dict) else None
        untimed = block.get("untimed") if isinstance(block, dict) else None
        if (not isinstance(result, dict) or not isinstance(result.get("benchmarks") or [], list)
                or not isinstance(untimed or [], list)):
            raise ReportError(f"{path} is not a pytest-benchmark JSON object with lists of benchmarks")
    merged = dict(results[0])
    merged["benchmarks"] = [bench for result in results for bench in (result.get("benchmarks") or [])]
    blocks = [result["fused_adapters"] for result in results if isinstance(result.get("fused_adapters"), dict)]
    if blocks:
        merged["fused_adapters"] = dict(blocks[0], untimed=[row for block in blocks for row in
                                                           (block.get("untimed") or [])])
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+",
                        help="JSON written by pytest --benchmark-json (several: one run's modules, merged)")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md and the plots")
    args = parser.parse_args(argv)
    try:
        results = [load(path) for path in args.results]
        report = render(results[0] if len(results) == 1 else merge(results, args.results), args.out)
    except ReportError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
