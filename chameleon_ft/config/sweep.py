"""At the end of a sweep (``-m``): one table of its runs and their monitored metric, and ``sweep_summary.csv``.

Registered as a Hydra callback in ``conf/config.yaml`` (``hydra.callbacks.sweep_summary``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

SUMMARY_FILE = "sweep_summary.csv"


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per run under ``sweep_dir``: its directory, overrides, monitored metric and value."""
    rows = []
    for cfg_file in sorted(sweep_dir.glob("*/config.yaml"), key=lambda p: p.parent.name):
        run = cfg_file.parent
        cfg = OmegaConf.load(cfg_file)
        # Each invocation records under .hydra/<timestamp>/; the latest one is this run's.
        records = sorted((run / ".hydra").glob("**/overrides.yaml"), key=lambda p: p.stat().st_mtime)
        overrides = [str(o) for o in OmegaConf.load(records[-1])] if records else []
        metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
        monitor = cfg.get("monitor")
        rows.append({"run": run.name, "overrides": overrides, "monitor": monitor,
                     "mode": cfg.get("monitor_mode"), "value": metrics.get(monitor),
                     "status": "done" if metrics else "no metrics"})
    # Overrides that every run shares (the recipe, step limits) say nothing about the sweep: show what varies.
    shared = set.intersection(*(set(r["overrides"]) for r in rows)) if len(rows) > 1 else set()
    for r in rows:
        r["overrides"] = " ".join(o for o in r["overrides"] if o not in shared)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The runs as an aligned text table, the best run of the monitored direction marked with ``*``."""
    done = [r for r in rows if isinstance(r["value"], (int, float))]
    best = None
    if done:
        pick = max if done[0]["mode"] == "max" else min
        best = pick(done, key=lambda r: r["value"])
    table = [("run", "overrides", "monitor", "value")]
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:.4g}" + (" *" if r is best else "")
        table.append((r["run"], r["overrides"], str(r["monitor"]), value))
    widths = [max(len(t[i]) for t in table) for i in range(4)]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip() for t in table)


class SweepSummary(Callback):
    """Hydra callback: prints the sweep's table and writes ``<sweep dir>/sweep_summary.csv``."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = sweep_rows(sweep_dir)
        if not rows:
            return
        with open(sweep_dir / SUMMARY_FILE, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"\nsweep summary ({len(rows)} runs, * = best)\n{format_rows(rows)}\nwritten to {sweep_dir / SUMMARY_FILE}")
