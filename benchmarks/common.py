"""Shared pieces of the benchmark harness: figures, medians, fresh-process memory measurement."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIGURE_KEYS = ("name", "ours", "baseline", "ratio", "goal", "unit", "notes")
RESULT_PREFIX = "BENCH_RESULT "
CACHE_ENV = "CHAMELEON_FT_BENCH_CACHE"
GiB = 2**30


class SkipBenchmark(Exception):
    """Raised by a benchmark's ``run`` when it cannot run here; the message says why."""


class WorkerError(RuntimeError):
    """A measurement subprocess failed or printed no result."""


def figure(name: str, ours: float, baseline: float, *, goal: str | None = None, unit: str = "",
           notes: str = "", ratio: float | None = None, **extra) -> dict:
    """One reported figure. ``ratio`` defaults to ``ours / baseline``; ``goal`` is e.g. ``"<= 0.25"``.

    Extra keyword arguments (e.g. ``samples``) are kept in the JSON but not printed in the table.
    """
    if ratio is None:
        ratio = ours / baseline if baseline else float("nan")
    out = {"name": name, "ours": ours, "baseline": baseline, "ratio": ratio, "goal": goal, "unit": unit, "notes": notes}
    out.update(extra)
    return out


def goal_met(fig: dict) -> bool | None:
    """Whether ``fig['ratio']`` satisfies ``fig['goal']`` (``"<= x"`` or ``">= x"``); None if no goal."""
    goal = fig.get("goal")
    if not goal:
        return None
    op, _, value = goal.strip().partition(" ")
    if op == "<=":
        return fig["ratio"] <= float(value)
    if op == ">=":
        return fig["ratio"] >= float(value)
    raise ValueError(f"figure {fig['name']!r}: goal {goal!r} is not '<= x' or '>= x'")


def median(values) -> float:
    return float(statistics.median(values))


def require_cuda() -> None:
    """For GPU benchmarks: raise :class:`SkipBenchmark` unless a CUDA device is usable."""
    import torch

    if not torch.cuda.is_available():
        raise SkipBenchmark("no CUDA device (GPU figures are only quoted when measured on a GPU)")


def cache_dir() -> Path:
    """Where built benchmark inputs (e.g. checkpoints) are kept between runs."""
    path = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "chameleon_ft_benchmarks")
    path.mkdir(parents=True, exist_ok=True)
    return path


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["ram_gib"] = round(int(f.readline().split()[1]) * 1024 / GiB, 1)
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


# ---------------------------------------------------------------------------------------------
# Memory of the current process (used inside workers)
# ---------------------------------------------------------------------------------------------
def current_rss() -> int:
    """Resident set size now, in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()  # no /proc: best available is the high-water mark


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux ``clear_refs``), so the peak covers only what follows.

    Returns False where unsupported; then the peak also covers everything before (imports, inputs).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident set size of this process's address space, in bytes.

    Linux: ``VmHWM`` of ``/proc/self/status``, which :func:`reset_peak_rss` resets. Not ``ru_maxrss``:
    Linux carries that across ``execve`` from the parent, so a worker started by a large process (a test
    session) would report the parent's size as its own peak. Elsewhere: ``getrusage`` ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class PeakMeter:
    """Peak RSS above the RSS at entry: ``with PeakMeter() as m: ...; m.delta``."""

    def __enter__(self):
        import gc

        gc.collect()
        self.baseline = current_rss()
        self.reset = reset_peak_rss()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.peak = peak_rss()
        self.delta = max(self.peak - self.baseline, 0)
        return False


class CudaPeakMeter:
    """Peak CUDA memory allocated above what was allocated at entry (``torch.cuda.max_memory_allocated``).

    Same fields as :class:`PeakMeter`; ``reset`` is always True (the peak statistics are reset at entry).
    """

    def __enter__(self):
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.baseline = torch.cuda.memory_allocated()
        self.reset = True
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        self.peak = torch.cuda.max_memory_allocated()
        self.delta = max(self.peak - self.baseline, 0)
        return False


def peak_meter(device: str):
    """The peak-memory meter for ``device``: CUDA allocations on a GPU, resident set size on CPU."""
    return CudaPeakMeter() if str(device).startswith("cuda") else PeakMeter()


# ---------------------------------------------------------------------------------------------
# Fresh-process workers
# ---------------------------------------------------------------------------------------------
def run_worker(module: str, function: str, timeout: float = 600, **kwargs) -> dict:
    """Run ``benchmarks.<module>.<function>(**kwargs)`` in a fresh Python process; return its dict.

    A fresh process per measurement keeps each peak free of earlier allocations and allocator caches.
    """
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "benchmarks._worker", json.dumps({"module": module, "function": function, "kwargs": kwargs})]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            if proc.returncode == 0:
                return json.loads(line[len(RESULT_PREFIX):])
    raise WorkerError(
        f"benchmark worker {module}.{function}({kwargs}) exited with {proc.returncode}:\n"
        f"{proc.stderr[-3000:] or proc.stdout[-3000:]}"
    )
