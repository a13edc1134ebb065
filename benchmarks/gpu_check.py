"""The one-shot GPU check: the ``gpu`` test tier, then the GPU benchmarks, every figure in one JSON.

``python -m benchmarks.gpu_check --json PATH [--budget-s S] [--cpu] [--tests-k EXPR]`` (normally run by
``benchmarks/gpu_check.sh``, which first makes the project importable on a bare GPU machine).

Parts, in order, each a process (group) of its own with a time box cut from one overall budget, so a
hang in one part costs that part only:

1. ``setup``: build the embedded tiny checkpoint (cached).
2. ``tests``: ``pytest -m gpu`` over ``tests/gpu`` (``--cpu``: the CPU twins, ``-m "not gpu"``); each
   check's figures and each test's outcome reach the JSON as soon as they are known.
3. ``bench_ckpt_on``, ``bench_ckpt_off``: LoRA on the 7B shape at seq 4096 with activation checkpointing
   on and off (:mod:`benchmarks.gpu_training`: MFU, HFU, tokens/s, peak memory); ``bench_full_ft``:
   full fine-tuning of the tiny model's shape (peak memory). With ``--cpu``: the same code at a tiny
   shape on CPU, which checks the plumbing (CUDA-only figures stay null).

The JSON is rewritten after every part, so a run killed from outside still leaves what it measured.
``headline`` holds the figures a README table needs under fixed keys (null when not measured; the keys
left null are listed in ``missing``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import RESULT_PREFIX, machine_info

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "chameleon_ft.gpu_check/1"
DEFAULT_BUDGET_S = 450
# Part: its own cap in seconds (it also never runs past the overall budget).
CAPS = {"setup": 150, "tests": 240, "bench_ckpt_on": 120, "bench_ckpt_off": 120, "bench_full_ft": 60}
TEST_FILES = ("tests/gpu/test_inference.py", "tests/gpu/test_training.py", "tests/gpu/test_packed_attention.py",
              "tests/gpu/test_fsdp.py")  # FSDP last
PER_TEST_TIMEOUT_S = 180
RESERVE_S = 5  # kept back for writing the report
BENCH_CASES = {"warmup": 3, "steps": 8}
# --cpu: the benchmark's own code path at a shape a CPU runs in seconds.
CPU_BENCH = {"shape": {"hidden": 64, "intermediate": 160, "layers": 2, "heads": 4, "kv_heads": 4, "vocab": 512,
                       "num_codes": 16, "groups": 1},
             "seq": 64, "batch": 1, "device": "cpu", "attn": "eager", "peak_n": 128}

# headline key -> where it comes from: ("check", check-name prefix, figure) or ("figure", name, field).
HEADLINE = {
    "bf16_loss_max_rel_diff": ("check", "losses_track_fp32_cpu_bf16", "loss_max_rel_diff"),
    "bf16_loss_rtol": ("check", "losses_track_fp32_cpu_bf16", "loss_rtol"),
    "bf16_grad_norm_max_rel_diff": ("check", "losses_track_fp32_cpu_bf16", "grad_norm_max_rel_diff"),
    "bf16_grad_norm_rtol": ("check", "losses_track_fp32_cpu_bf16", "grad_norm_rtol"),
    "adapter_loaded_vs_cpu_norm_diff": ("check", "adapter_roundtrip_bf16", "loaded_vs_cpu_norm_diff"),
    "adapter_trained_vs_cpu_norm_diff": ("check", "adapter_roundtrip_bf16", "trained_vs_cpu_norm_diff"),
    "adapter_trained_tol": ("check", "adapter_roundtrip_bf16", "trained_tol"),
    "fsdp_loss_max_rel_diff": ("check", "fsdp_resume_export", "loss_max_rel_diff"),
    "fsdp_resume_loss_max_rel_diff": ("check", "fsdp_resume_export", "resume_loss_max_rel_diff"),
    "fsdp_resume_export_norm_diff": ("check", "fsdp_resume_export", "resume_export_norm_diff"),
    "fsdp_multi_loss_max_rel_diff": ("check", "fsdp_multi", "loss_max_rel_diff"),
    "vq_agreement_fp32": ("check", "vq_codes", "fp32_agreement"),
    "vq_agreement_tf32_default": ("check", "vq_codes", "tf32_default_agreement"),
    "text_logits_norm_diff_bf16": ("check", "generation_bf16", "text_teacher_forced_norm_diff"),
    "text_greedy_equal_rows_bf16": ("check", "generation_bf16", "text_equal_rows"),
    "image_scores_norm_diff_bf16": ("check", "generation_bf16", "image_teacher_forced_norm_diff"),
    "image_greedy_equal_rows_bf16": ("check", "generation_bf16", "image_equal_rows"),
    "text_greedy_equal_rows_fp32": ("check", "generation_fp32", "text_equal_rows"),
    "sampled_image_equal_to_cpu": ("check", "generation_bf16", "sampled_equal_to_cpu"),
    "fused_loss_rel_diff_bf16": ("check", "fused_loss_bf16", "loss_rel_diff"),
    "fused_loss_grad_hidden_norm_diff_bf16": ("check", "fused_loss_bf16", "grad_hidden_norm_diff"),
    "loss_memory_ratio": ("check", "loss_memory", "ratio"),
    "loss_memory_fused_gib": ("check", "loss_memory", "fused_gib"),
    "loss_memory_plain_gib": ("check", "loss_memory", "plain_gib"),
    "act_ckpt_loss_rel_diff": ("check", "activation_checkpointing_bf16", "loss_rel_diff"),
    "act_ckpt_peak_bytes_on": ("check", "activation_checkpointing_bf16", "peak_bytes_on"),
    "act_ckpt_peak_bytes_off": ("check", "activation_checkpointing_bf16", "peak_bytes_off"),
    "mfu_ckpt_on": ("figure", "gpu_training mfu ckpt=on", "ratio"),
    "mfu_ckpt_off": ("figure", "gpu_training mfu ckpt=off", "ratio"),
    "hfu_ckpt_on": ("figure", "gpu_training hfu ckpt=on", "ratio"),
    "hfu_ckpt_off": ("figure", "gpu_training hfu ckpt=off", "ratio"),
    "tokens_per_s_ckpt_on": ("figure", "gpu_training mfu ckpt=on", "tokens_per_s"),
    "tokens_per_s_ckpt_off": ("figure", "gpu_training mfu ckpt=off", "tokens_per_s"),
    "peak_memory_7b_lora_ckpt_on_gib": ("figure", "gpu_training peak memory ckpt=on", "ours"),
    "peak_memory_7b_lora_ckpt_off_gib": ("figure", "gpu_training peak memory ckpt=off", "ours"),
    "peak_memory_tiny_full_ft_gib": ("figure", "gpu_training tiny full-FT peak memory", "ours"),
}
# Null on a machine without CUDA whatever happens (the --cpu plumbing run).
CUDA_ONLY = {"vq_agreement_tf32_default", "act_ckpt_peak_bytes_on", "act_ckpt_peak_bytes_off",
             "peak_memory_7b_lora_ckpt_on_gib", "peak_memory_7b_lora_ckpt_off_gib", "peak_memory_tiny_full_ft_gib"}


# ---------------------------------------------------------------------------------------------
# Time-boxed parts
# ---------------------------------------------------------------------------------------------
def run_part(cmd: list[str], timeout: float, *, env: dict | None = None, echo=sys.stdout, tail_chars: int = 4000) -> dict:
    """Run ``cmd`` in a process group of its own for at most ``timeout`` seconds, echoing its output.

    On timeout the whole group is killed (Lightning's extra ranks and benchmark workers included).
    Returns ``{"rc", "seconds", "timed_out", "tail", "output"}`` (``rc`` None when it was killed).
    """
    start = time.monotonic()
    if timeout <= 0:
        return {"rc": None, "seconds": 0.0, "timed_out": True, "tail": "not started: no time left", "output": ""}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(ROOT),
                            env=env, start_new_session=True, bufsize=1)
    lines: collections.deque[str] = collections.deque()
    size = [0]

    def pump():
        for line in proc.stdout:
            echo.write(line)
            echo.flush()
            lines.append(line)
            size[0] += len(line)
            while size[0] > 200_000:  # keep the output bounded
                size[0] -= len(lines.popleft())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    reader.join(timeout=5)
    output = "".join(lines)
    return {"rc": None if timed_out else proc.returncode, "seconds": round(time.monotonic() - start, 1),
            "timed_out": timed_out, "tail": output[-tail_chars:], "output": output}


def worker_result(output: str) -> dict | None:
    """The ``BENCH_RESULT`` line a benchmark worker printed, parsed; None if there is none."""
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return None


# ---------------------------------------------------------------------------------------------
# Records of the test tier
# ---------------------------------------------------------------------------------------------
def read_records(path: Path) -> tuple[dict, dict]:
    """``(tests, checks)`` from the JSON lines ``tests/gpu/conftest.py`` appended to ``path``.

    ``tests``: counts by outcome, outcome per node id, messages of failures. ``checks``: per check
    name the record of the preferred device (cuda over cpu; the later one among equals).
    """
    outcomes, messages, checks = {}, {}, {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if entry.get("kind") == "outcome":
                outcomes[entry["nodeid"]] = entry["outcome"]
                if entry["outcome"] in ("failed", "error") or (entry["outcome"] == "skipped" and entry.get("message")):
                    messages[entry["nodeid"]] = entry.get("message", "")
            elif entry.get("kind") == "check":
                name, old = entry["check"], checks.get(entry["check"])
                if old is None or not (old["device"] == "cuda" and entry["device"] != "cuda"):
                    checks[name] = entry
    counts = dict(collections.Counter(outcomes.values()))
    return {"counts": counts, "outcomes": outcomes, "messages": messages}, checks


def _check_figure(checks: dict, prefix: str, key: str):
    for name in sorted(checks):
        if name.startswith(prefix) and key in checks[name]["figures"]:
            return checks[name]["figures"][key]
    return None


def headline(checks: dict, figures: list[dict], tests: dict) -> dict:
    """The fixed headline keys (see :data:`HEADLINE`) plus test counts; None where not measured."""
    by_name = {f["name"]: f for f in figures}
    out = {f"tests_{k}": tests["counts"].get(k, 0) for k in ("passed", "failed", "error", "skipped")}
    out["checks_failed"] = sorted(n for n, c in checks.items() if c["failures"])
    for key, (kind, name, field) in HEADLINE.items():
        if kind == "check":
            out[key] = _check_figure(checks, name, field)
        else:
            out[key] = by_name.get(name, {}).get(field)
    return out


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
class Report:
    """The JSON document, rewritten to ``path`` after every part."""

    def __init__(self, path: Path, budget_s: float, mode: str):
        self.path = path
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        self.doc = {"schema": SCHEMA, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "mode": mode, "budget_s": budget_s, "seconds": 0.0, "machine": machine_info(), "versions": versions(),
                    "parts": {}, "tests": {"counts": {}, "outcomes": {}, "messages": {}}, "checks": {},
                    "benchmarks": {"figures": [], "results": {}}, "headline": {}, "missing": []}

    def left(self, cap: float) -> float:
        return min(cap, self.deadline - time.monotonic() - RESERVE_S)

    def part(self, name: str, result: dict) -> None:
        self.doc["parts"][name] = {k: v for k, v in result.items() if k != "output"}
        self.write()

    def write(self) -> None:
        tests, checks, figures = self.doc["tests"], self.doc["checks"], self.doc["benchmarks"]["figures"]
        self.doc["headline"] = headline(checks, figures, tests)
        self.doc["missing"] = [k for k in HEADLINE if self.doc["headline"][k] is None]
        self.doc["seconds"] = round(time.monotonic() - self.started, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


def versions() -> dict:
    """Versions of the libraries the checks exercise, and the CUDA build."""
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "lightning", "transformers", "peft", "datasets", "hydra-core", "safetensors", "triton"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
        out["cuda_available"] = torch.cuda.is_available()
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return out


def _bench_measure(report: Report, part: str, cpu: bool, **kwargs) -> dict | None:
    """One :func:`benchmarks.gpu_training.measure` in a worker process, time-boxed as part ``part``."""
    if cpu:
        kwargs = {**kwargs, **CPU_BENCH, "layers": CPU_BENCH["shape"]["layers"]}
        kwargs["shape"] = CPU_BENCH["shape"]
    spec = json.dumps({"module": "gpu_training", "function": "measure", "kwargs": kwargs})
    res = run_part([sys.executable, "-m", "benchmarks._worker", spec], report.left(CAPS[part]), env=_env())
    result = worker_result(res["output"]) if res["rc"] == 0 else None
    res["result"] = "ok" if result is not None else "no result"
    report.part(part, res)
    return result


def run_benchmarks(report: Report, cpu: bool) -> None:
    from benchmarks import gpu_training

    results: dict[bool, list[dict]] = {}
    for act_ckpt in (True, False):
        part = f"bench_ckpt_{'on' if act_ckpt else 'off'}"
        if cpu:
            res = _bench_measure(report, part, cpu, act_ckpt=act_ckpt, warmup=1, steps=2)
        else:
            try:
                res = gpu_training.fit_layers(act_ckpt, BENCH_CASES,
                                              lambda **kw: _bench_measure(report, part, cpu, **kw) or _missing())
            except (RuntimeError, _NoResult) as e:
                report.doc["parts"][part]["error"] = str(e)
                res = None
        if res is not None:
            results[act_ckpt] = [res]
            report.doc["benchmarks"]["results"][part] = {k: v for k, v in res.items() if k != "intervals"}
        report.doc["benchmarks"]["figures"] = gpu_training.figures_from(results)
        report.write()
    shape_kwargs = {} if cpu else {"shape": gpu_training.tiny_shape(), "layers": gpu_training.tiny_shape()["layers"]}
    full = _bench_measure(report, "bench_full_ft", cpu, act_ckpt=False, warmup=2, steps=4, peft="none", **shape_kwargs)
    if full is not None:
        report.doc["benchmarks"]["results"]["bench_full_ft"] = {k: v for k, v in full.items() if k != "intervals"}
        report.doc["benchmarks"]["figures"] += gpu_training.full_ft_figure(full)
    report.write()


class _NoResult(Exception):
    pass


def _missing():
    raise _NoResult("the worker printed no result (killed by its time box, or failed: see the part's tail)")


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


def run_tests(report: Report, cpu: bool, keyword: str | None) -> None:
    records = report.path.with_name(report.path.stem + ".records.jsonl")
    records.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", *TEST_FILES, "-m", "not gpu" if cpu else "gpu", "-q", "-p", "no:cacheprovider",
           "-rfEs", "-W", "ignore::FutureWarning"]
    if keyword:
        cmd += ["-k", keyword]
    import importlib.util

    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += [f"--timeout={PER_TEST_TIMEOUT_S}"]
    res = run_part(cmd, report.left(CAPS["tests"]), env=_env(GPU_CHECK_RECORD=str(records)))
    report.doc["tests"], report.doc["checks"] = read_records(records)
    records.unlink(missing_ok=True)
    report.part("tests", res)


def format_summary(doc: dict) -> str:
    """Two short Markdown tables: each part's status, then every headline figure (null: not measured)."""

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else "null" if v is None else str(v)

    def table(header, rows):
        width = max(len(r[0]) for r in [header, *rows])
        lines = [f"| {a.ljust(width)} | {b} |" for a, b in [header, *rows]]
        lines.insert(1, f"|{'-' * (width + 2)}|---|")
        return "\n".join(lines)

    parts = [(name, f"{'TIMED OUT' if p['timed_out'] else 'rc ' + str(p['rc'])}, {p['seconds']} s")
             for name, p in doc["parts"].items()]
    figures = [(k, fmt(v)) for k, v in doc["headline"].items()]
    return table(("part", "status"), parts) + "\n\n" + table(("figure", "value"), figures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="where the report goes")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="overall time budget (default %(default)s)")
    parser.add_argument("--cpu", action="store_true", help="no GPU: run the CPU twins and the benchmark at a tiny shape")
    parser.add_argument("--tests-k", help="pytest -k expression to narrow the test tier (plumbing runs)")
    args = parser.parse_args(argv)
    report = Report(args.json.resolve(), args.budget_s, "cpu" if args.cpu else "cuda")
    report.write()
    report.part("setup", run_part([sys.executable, "-c", "from chameleon_ft.tiny import tiny_checkpoint; print(tiny_checkpoint())"],
                                  report.left(CAPS["setup"]), env=_env()))
    run_tests(report, args.cpu, args.tests_k)
    run_benchmarks(report, args.cpu)
    print(format_summary(report.doc))
    print(f"wrote {args.json} ({report.doc['seconds']:.0f} s)")
    failed = report.doc["headline"]["tests_failed"] + report.doc["headline"]["tests_error"]
    timed_out = any(p["timed_out"] for p in report.doc["parts"].values())
    return 1 if failed or timed_out else 0


if __name__ == "__main__":
    sys.exit(main())
