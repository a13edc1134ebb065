"""``python -m benchmarks [--only a,b] [--quick] [--json PATH]``: run benchmarks, print a table, write JSON."""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import sys
import time
from pathlib import Path

from benchmarks import BENCHMARKS
from benchmarks.common import CACHE_ENV, FIGURE_KEYS, SkipBenchmark, goal_met, machine_info

DEFAULT_JSON = Path(__file__).resolve().parent / "results.json"


def _num(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.3g}" if abs(x) < 999.5 else f"{x:,.0f}"  # .3g would print 999.7 as 1e+03


def format_table(figures: list[dict]) -> str:
    """A Markdown table of figures (pasteable into the README)."""
    rows = [("figure", "ours", "baseline", "unit", "ratio", "goal", "met", "notes")]
    for f in figures:
        met = goal_met(f)
        rows.append((f["name"], _num(f["ours"]), _num(f["baseline"]), f["unit"], _num(f["ratio"]), f["goal"] or "",
                     "" if met is None else ("yes" if met else "NO"), f["notes"]))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def run_benchmarks(names: list[str], quick: bool, log=print) -> tuple[list[dict], list[dict]]:
    """Run the named benchmark modules; return ``(figures, skipped)``."""
    figures, skipped = [], []
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        start = time.perf_counter()
        log(f"[{name}] running{' (quick)' if quick else ''} ...", file=sys.stderr, flush=True)
        try:
            results = module.run(quick)
        except SkipBenchmark as e:
            log(f"[{name}] skipped: {e}", file=sys.stderr, flush=True)
            skipped.append({"benchmark": name, "reason": str(e)})
            continue
        for r in results:
            missing = [k for k in FIGURE_KEYS if k not in r]
            if missing:
                raise ValueError(f"benchmark {name}: figure {r.get('name')!r} lacks {missing}")
            r["benchmark"] = name
            r["goal_met"] = goal_met(r)
        figures.extend(results)
        log(f"[{name}] done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return figures, skipped


def build_report(figures: list[dict], skipped: list[dict], *, quick: bool, started: datetime.datetime,
                 seconds: float, argv: list[str]) -> dict:
    """The JSON document written by :func:`main`."""
    return {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks", *argv]),
        "quick": quick,
        "seconds": round(seconds, 1),
        "machine": machine_info(),
        "figures": figures,
        "skipped": skipped,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--only", help=f"comma-separated benchmarks to run (default all: {','.join(BENCHMARKS)})")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and cases (under ~2 minutes on 2 CPU cores)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the figures (default: %(default)s)")
    parser.add_argument("--cache-dir", help=f"where built inputs are cached (default: ${CACHE_ENV} or the temp dir)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(BENCHMARKS))
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    if args.cache_dir:
        os.environ[CACHE_ENV] = args.cache_dir  # workers inherit it
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    figures, skipped = run_benchmarks(names, args.quick)
    report = build_report(figures, skipped, quick=args.quick, started=started, seconds=time.perf_counter() - t0,
                          argv=argv if argv is not None else sys.argv[1:])
    print(format_table(figures))
    for s in skipped:
        print(f"skipped {s['benchmark']}: {s['reason']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json} ({report['seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
