"""The README's results table: what every fused op does against eager PyTorch at one ViT-B size,
counted without a GPU (launches, bytes moved against the floor, bytes kept for backward), from a
committed results file.

    python -m bench.headline --count bench/results/DATE-headline-counts-no-gpu.json   # minutes
    python -m bench.headline --readme bench/results/DATE-headline-counts-no-gpu.json  # the table into README.md

--count runs each case forward and backward in Triton's interpreter, launches planned for a
132-SM GPU (an H100), fp16, M = 394 rows (ViT-B/16 at batch 2; --rows for more: minutes grow
with M), and writes the counts as JSON.
--readme renders that file into README.md between its "headline" markers; the tests check that
the README's table is the render of the newest such file, so its numbers are never typed by hand.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PATTERN = "*-headline-counts-no-gpu.json"
START, END = "<!-- headline:start -->", "<!-- headline:end -->"
SMS, ROWS, DIM = 132, 394, 768

# (label, count case without provider/rows/dim/dtype/sms). The fused row runs the op's default
# variant unless the case names another.
CASES = [
    ("Adapter+ bottleneck, r = 8", dict(rank=8)),
    ("LoRA on qkv (768 -> 2304), r = 8", dict(op="lora", rank=8, dim_out=3 * DIM, scale=2.0)),
    ("LoRA on qkv, single launch", dict(op="lora", rank=8, dim_out=3 * DIM, scale=2.0, variant="single_launch")),
    ("Sparse mixture, E = 8, k = 2, r = 16", dict(op="sparse_adapter", rank=16, experts=8, top_k=2)),
    ("Routed (one task per row), E = 8, r = 8", dict(op="routed_adapter", rank=8, experts=8, top_k=1)),
    ("AdapterFusion, N = 4, r = 8", dict(op="adapter_fusion", rank=8, adapters=4)),
]


def latest() -> pathlib.Path:
    """The newest committed counts file (by the date its name starts with)."""
    found = sorted(RESULTS.glob(PATTERN))
    if not found:
        raise FileNotFoundError(f"no {PATTERN} under {RESULTS}")
    return found[-1]


def _floor(case: dict, pass_name: str, rows: int) -> int:
    from bench.measure import floor_bytes, fusion_floor_bytes

    if case.get("op") == "lora":
        weight = case["dim_out"] * DIM * 2
        return floor_bytes(pass_name, rows, DIM, 2, 2, residual="none", dim_out=case["dim_out"], weight_bytes=weight)
    if case.get("op") == "adapter_fusion":
        return fusion_floor_bytes(pass_name, rows, DIM, 2)
    return floor_bytes(pass_name, rows, DIM, 2, 2)


def kept_bytes(case: dict) -> int:
    """Bytes one forward of a count case keeps for backward: activations only. Every input
    (parameters and frozen weights included) and the outputs are left out."""
    import torch

    from bench.measure import _case_call, saved_bytes

    forward_call, inputs, context = _case_call(case, case["rows"], DIM, case.get("dim_out"), torch.float16, None)
    with context():
        return saved_bytes(forward_call, list(inputs.values()), torch.device("cpu"))


def count(rows: int = ROWS) -> dict:
    """Every case's counts, fused and eager, at `rows` rows."""
    import torch

    from bench.measure import count_case

    cases = []
    for label, spec in CASES:
        row = {"label": label, **spec, "floor": {p: _floor(spec, p, rows) for p in ("forward", "backward")}}
        for provider in ("fused", "eager"):
            case = dict(spec, provider=provider, rows=rows, dim=DIM, dtype="fp16", sms=SMS, **{"pass": "forward"})
            counts = count_case(case)
            counts.pop("host_us", None)
            counts["saved_bytes"] = kept_bytes(case)
            row[provider] = counts
            print(f"counted {label}, {provider}", file=sys.stderr, flush=True)
        cases.append(row)
    import triton

    return {"date": datetime.date.today().isoformat(), "sms": SMS, "rows": rows, "dim": DIM, "dtype": "fp16",
            "torch": torch.__version__, "triton": triton.__version__, "cases": cases}


def _kib(value) -> str:
    return "-" if value is None else f"{value / 1024:,.0f} KiB"


def table(results: dict) -> str:
    """The markdown table of a counts file."""
    lines = [
        f"Counted on {results['date']} without a GPU (Triton's interpreter; launches planned for "
        f"{results['sms']} SMs, an H100), {results['dtype']}, M = {results['rows']} rows (ViT-B/16 at "
        f"batch {results['rows'] // 197}), D = {results['dim']}; floor: read x and write y forward, read dy and x and write dx "
        f"backward (LoRA: and read W once per pass; AdapterFusion: and read its three D x D weights once per pass, "
        f"and write their gradients backward). `python -m bench.headline` makes it.",
        "",
        "| op | fused launches fwd / bwd (eager kernels) | bytes / floor, fwd | bytes / floor, bwd | "
        "kept for backward (eager) |",
        "|---|---|---|---|---|",
    ]
    for case in results["cases"]:
        fused, eager, floor = case["fused"], case["eager"], case["floor"]

        def ratio(provider, pass_name):
            return f"{provider[pass_name]['moved_bytes'] / floor[pass_name]:.2f}x"

        launches = (f"{fused['forward']['triton_launches']} / {fused['backward']['triton_launches']} "
                    f"({eager['forward']['aten_kernels']} / {eager['backward']['aten_kernels']})")
        if fused["forward"]["aten_kernels"] or fused["backward"]["aten_kernels"]:
            launches += f" + {fused['forward']['aten_kernels']} / {fused['backward']['aten_kernels']} aten"
        lines.append(f"| {case['label']} | {launches} | {ratio(fused, 'forward')} (eager {ratio(eager, 'forward')}) | "
                     f"{ratio(fused, 'backward')} (eager {ratio(eager, 'backward')}) | "
                     f"{_kib(fused['saved_bytes'])} ({_kib(eager['saved_bytes'])}) |")
    return "\n".join(lines)


def readme_block(results: dict) -> str:
    return f"{START}\n{table(results)}\n{END}"


def write_readme(results: dict, readme: pathlib.Path = ROOT / "README.md") -> None:
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), flags=re.S)
    if not pattern.search(text):
        raise ValueError(f"{readme} has no {START} ... {END} block")
    readme.write_text(pattern.sub(lambda _: readme_block(results), text), encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.headline", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--count", type=pathlib.Path, metavar="JSON", help="count every case and write JSON")
    parser.add_argument("--rows", type=int, default=ROWS, help=f"rows M of the counted calls (default {ROWS})")
    mode.add_argument("--readme", type=pathlib.Path, metavar="JSON", help="render JSON into README.md")
    args = parser.parse_args(argv)
    if args.count:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the counter needs it
        args.count.write_text(json.dumps(count(args.rows), indent=1) + "\n", encoding="utf-8")
        print(table(json.loads(args.count.read_text(encoding="utf-8"))))
    else:
        write_readme(json.loads(args.readme.read_text(encoding="utf-8")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
