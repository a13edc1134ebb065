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
        overrides_file = run / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.load(overrides_file) if overrides_file.exists() else []
        metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
        monitor = cfg.get("monitor")
        rows.append({"run": run.name, "overrides": " ".join(str(o) for o in overrides), "monitor": monitor,
                     "mode": cfg.get("monitor_mode"), "value": metrics.get(monitor),
                     "status": "done" if metrics else "no metrics"})
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
