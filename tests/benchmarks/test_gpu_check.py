"""The one-shot GPU check's plumbing, on CPU: time boxes, records, the JSON's keys, and the script end to end
in its CPU mode (the CPU twins and the benchmark at a tiny shape)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of ours may linger as a zombie until reaped by init; treat zombies as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_a_part_past_its_time_box_is_killed_with_its_children(tmp_path):
    pids = tmp_path / "pids"
    cmd = ["bash", "-c", f"sleep 60 & echo $$ $! > {pids}; echo started; wait"]
    start = time.monotonic()
    res = gpu_check.run_part(cmd, timeout=2, echo=open(os.devnull, "w"))
    assert res["timed_out"] and res["rc"] is None and "started" in res["tail"]
    assert time.monotonic() - start < 15
    time.sleep(0.5)
    assert not any(_alive(int(p)) for p in pids.read_text().split())  # the shell and its sleep


def test_a_part_with_no_time_left_does_not_start_and_a_finished_one_reports_its_rc():
    assert gpu_check.run_part(["true"], timeout=0)["timed_out"]
    res = gpu_check.run_part([sys.executable, "-c", "print('x'); raise SystemExit(3)"], timeout=30,
                             echo=open(os.devnull, "w"))
    assert (res["rc"], res["timed_out"], res["tail"]) == (3, False, "x\n")


def test_records_prefer_cuda_and_survive_a_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "r.jsonl"
    lines = [
        {"kind": "check", "check": "vq_codes", "device": "cuda", "figures": {"fp32_agreement": 0.99}, "failures": []},
        {"kind": "check", "check": "vq_codes", "device": "cpu", "figures": {"fp32_agreement": 1.0}, "failures": []},
        {"kind": "check", "check": "loss_memory", "device": "cuda", "figures": {"ratio": 0.4}, "failures": ["x > 0.25"]},
        {"kind": "outcome", "nodeid": "t::a[cuda]", "outcome": "passed", "seconds": 1, "message": ""},
        {"kind": "outcome", "nodeid": "t::b[cuda]", "outcome": "failed", "seconds": 1, "message": "boom"},
        {"kind": "outcome", "nodeid": "t::c[cuda]", "outcome": "skipped", "seconds": 0, "message": "needs 2 GPUs"},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"kind": "outc')
    tests, checks = gpu_check.read_records(path)
    assert tests["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert tests["messages"] == {"t::b[cuda]": "boom", "t::c[cuda]": "needs 2 GPUs"}
    assert checks["vq_codes"]["device"] == "cuda"
    head = gpu_check.headline(checks, [{"name": "gpu_training mfu ckpt=on", "ratio": 0.55, "tokens_per_s": 3000.0}], tests)
    assert head["vq_agreement_fp32"] == 0.99 and head["loss_memory_ratio"] == 0.4
    assert head["checks_failed"] == ["loss_memory"] and head["tests_failed"] == 1
    assert head["mfu_ckpt_on"] == 0.55 and head["tokens_per_s_ckpt_on"] == 3000.0
    assert head["mfu_ckpt_off"] is None and set(gpu_check.HEADLINE) <= set(head)


def test_a_timed_out_part_does_not_stop_the_later_ones(tmp_path, monkeypatch):
    later = []
    monkeypatch.setitem(gpu_check.CAPS, "setup", 0.5)  # the tiny checkpoint build is cut off
    monkeypatch.setattr(gpu_check, "run_tests", lambda report, cpu, k: later.append("tests"))
    monkeypatch.setattr(gpu_check, "run_benchmarks", lambda report, cpu: later.append("benchmarks"))
    out = tmp_path / "report.json"
    assert gpu_check.main(["--json", str(out), "--cpu", "--budget-s", "60"]) == 1
    doc = json.loads(out.read_text())
    assert doc["parts"]["setup"]["timed_out"] and later == ["tests", "benchmarks"]
    assert set(doc["headline"]) >= set(gpu_check.HEADLINE) and doc["missing"] == list(gpu_check.HEADLINE)


def test_script_in_cpu_mode_writes_every_key(tmp_path):
    out = tmp_path / "out" / "gpu_check.json"
    env = dict(os.environ, GPU_CHECK_ALLOW_CPU="1", GPU_CHECK_TESTS_K="vq_codes", PYTHON=sys.executable,
               GPU_CHECK_BUDGET_S="300")
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], capture_output=True,
                          text=True, env=env, timeout=420)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["schema"] == gpu_check.SCHEMA and doc["mode"] == "cpu"
    assert list(doc["parts"]) == ["setup", "tests", "bench_ckpt_on", "bench_ckpt_off", "bench_full_ft"]
    assert all(p["rc"] == 0 and not p["timed_out"] for p in doc["parts"].values()), doc["parts"]
    head = doc["headline"]
    assert set(gpu_check.HEADLINE) <= set(head)
    assert head["tests_passed"] == 1 and head["tests_failed"] == 0 and head["checks_failed"] == []
    assert list(doc["tests"]["outcomes"]) == ["tests/gpu/test_inference.py::test_vq_codes_match_cpu[cpu]"]
    assert head["vq_agreement_fp32"] == 1.0
    for key in ("mfu_ckpt_on", "mfu_ckpt_off", "hfu_ckpt_on", "tokens_per_s_ckpt_on", "tokens_per_s_ckpt_off"):
        assert isinstance(head[key], float) and head[key] > 0, key
    # Without CUDA these stay null; every other key the narrowed test run did not reach is null too.
    assert gpu_check.CUDA_ONLY <= set(doc["missing"])
    assert {k for k in gpu_check.HEADLINE if head[k] is not None} == \
        {"vq_agreement_fp32", "mfu_ckpt_on", "mfu_ckpt_off", "hfu_ckpt_on", "hfu_ckpt_off", "tokens_per_s_ckpt_on",
         "tokens_per_s_ckpt_off"}
    assert doc["benchmarks"]["results"]["bench_full_ft"]["trainable"] == doc["benchmarks"]["results"]["bench_full_ft"]["parameters"]
    assert "| figure" in proc.stdout and "mfu_ckpt_on" in proc.stdout  # the printed table


def test_script_refuses_without_cuda_unless_allowed(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("GPU_CHECK_ALLOW_CPU", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "x.json")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "GPU_CHECK_ALLOW_CPU=1" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_benchmark_parts_on_a_gpu_assemble_every_figure(tmp_path, monkeypatch):
    # The GPU path of the benchmark parts with the workers faked: 7B LoRA with checkpointing fits in 32
    # layers, without it only in 16 (so no 32-layer memory figure), then tiny full fine-tuning.
    calls = []

    def fake(report, part, cpu, **kw):
        calls.append((part, kw.get("layers"), kw.get("peft", "lora_all_linear")))
        if part == "bench_ckpt_off" and kw["layers"] > 16:
            return {"oom": True, "layers": kw["layers"], "error": "CUDA out of memory"}
        n = 1000 if part != "bench_full_ft" else 5000
        return {"oom": False, "layers": kw["layers"], "act_ckpt": kw["act_ckpt"], "seq": 4096, "batch": 1,
                "intervals": [1.0, 1.0], "tokens_per_step": 4096, "peak_flops": 800e12,
                "model_flops_per_step": 420e12, "executed_flops_per_step": 300e12, "trainable": n, "parameters": n,
                "weight_bytes": 2 * n, "peak_allocated": 20 * 2**30, "peak_reserved": 21 * 2**30, "device_name": "H200"}

    monkeypatch.setattr(gpu_check, "_bench_measure", fake)
    report = gpu_check.Report(tmp_path / "r.json", 60, "cuda")
    gpu_check.run_benchmarks(report, cpu=False)
    assert calls == [("bench_ckpt_on", 32, "lora_all_linear"), ("bench_ckpt_off", 32, "lora_all_linear"),
                     ("bench_ckpt_off", 16, "lora_all_linear"), ("bench_full_ft", 4, "none")]
    head = json.loads((tmp_path / "r.json").read_text())["headline"]
    assert head["mfu_ckpt_on"] == pytest.approx(420 / 800) and head["tokens_per_s_ckpt_off"] == pytest.approx(4096)
    assert head["peak_memory_7b_lora_ckpt_on_gib"] == pytest.approx(20)
    assert head["peak_memory_7b_lora_ckpt_off_gib"] is None  # only 16 layers fitted
    assert head["peak_memory_tiny_full_ft_gib"] == pytest.approx(20)
