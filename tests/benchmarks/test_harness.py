"""Smoke test of the benchmark harness at tiny sizes: output format and the agreement checks, no timings."""

import datetime
import json

import pytest

from benchmarks import BENCHMARKS, checkpoint_load, loss_memory
from benchmarks.__main__ import build_report, format_table, main
from benchmarks.common import FIGURE_KEYS, figure, goal_met

TINY_SPEC = {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 2, "vocab": 256, "num_codes": 16,
             "groups": 1, "dtype": "float32", "shard_bytes": 100_000}


def test_loss_memory_tiny_agrees_with_plain_cross_entropy():
    figs = loss_memory.figures([("float32", 1)], vocab=512, hidden=32, seq=64, chunk_size=16)
    assert len(figs) == 1
    f = figs[0]
    assert set(FIGURE_KEYS) <= set(f) and f["unit"] == "GiB" and f["goal"] == loss_memory.GOAL
    assert f["ratio"] == pytest.approx(f["samples"]["ratios"][0])
    # Same loss and hidden-state gradient as F.cross_entropy on float32 logits.
    assert f["check"]["loss_abs_diff"] < 1e-5
    assert 0 < f["check"]["grad_max_abs"] and f["check"]["grad_max_abs_diff"] <= 1e-4 * f["check"]["grad_max_abs"]
    assert f["check"]["loss"] == pytest.approx(6.24, abs=0.5)  # ~ln(512) for near-uniform logits


def test_checkpoint_load_tiny_both_methods_load_correct_weights(tmp_path):
    path = tmp_path / "ckpt"
    figs = checkpoint_load.figures(1, spec=TINY_SPEC, path=path)
    assert len(list(path.glob("*.safetensors"))) > 1  # sharded like a real checkpoint
    assert [f["name"] for f in figs] == ["checkpoint_load ours/weights", "checkpoint_load naive/weights",
                                        "checkpoint_load ours/naive"]
    weight_bytes = figs[0]["samples"]["weight_bytes"]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert weight_bytes == index["metadata"]["total_size"]
    for f in figs:
        assert set(FIGURE_KEYS) <= set(f) and f["unit"] == "GiB"
    assert figs[0]["ratio"] == pytest.approx(figs[0]["ours"] / figs[0]["baseline"])
    # The cached checkpoint is reused: a second build leaves the files untouched.
    mtimes = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    checkpoint_load.build_checkpoint(path, TINY_SPEC)
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == mtimes


def test_vocabulary_matches_7b_layout():
    vocab = checkpoint_load.chameleon_vocab(65_536, 8192)
    assert len(vocab) == 65_536 and sorted(vocab.values()) == list(range(65_536))
    assert (vocab["<s>"], vocab["<eoss>"], vocab["<racm3:break>"]) == (0, 8196, 8197)
    assert (vocab["<reserved08706>"], vocab["<image>"], vocab["<reserved08799>"]) == (8710, 8711, 8803)


def test_table_goal_and_report():
    figs = [figure("a", 1.0, 4.0, goal="<= 0.25", unit="GiB", notes="x"),
            figure("b", 3.0, 2.0, goal=">= 2", unit="s"), figure("c", 1.0, 2.0)]
    assert [goal_met(f) for f in figs] == [True, False, None]
    lines = format_table(figs).splitlines()
    assert len(lines) == 2 + len(figs)
    assert lines[0].split("|")[1].strip() == "figure" and set(lines[1]) <= {"|", "-"}
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert cells[:7] == ["a", "1", "4", "GiB", "0.25", "<= 0.25", "yes"]
    assert [c.strip() for c in lines[3].split("|")[1:-1]][6] == "NO"
    report = build_report(figs, [{"benchmark": "gpu_mfu", "reason": "no CUDA"}], quick=True, seconds=1.0,
                          started=datetime.datetime.now(datetime.timezone.utc), argv=["--quick"])
    again = json.loads(json.dumps(report))
    assert again["command"] == "python -m benchmarks --quick" and again["figures"][0]["ratio"] == 0.25


def test_cli_rejects_unknown_benchmark_and_lists(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--only", "loss_memory,nope"])
    assert e.value.code == 2
    assert main(["--list"]) == 0
    assert capsys.readouterr().out.split() == list(BENCHMARKS)


def test_a_worker_started_by_a_large_process_measures_only_its_own_peak():
    # Linux carries ru_maxrss across execve: a child of a large process would inherit the parent's size as
    # its "peak". The meter must see only what the child itself used (here 64 MiB inside the block).
    import subprocess
    import sys
    from pathlib import Path

    ballast = bytearray(512 * 2**20)  # resident in this (parent) process
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])
    code = ("from benchmarks.common import PeakMeter\n"
            "with PeakMeter() as m:\n    b = bytearray(64 * 2**20); b[::4096] = b'x' * len(b[::4096])\n"
            "print(m.delta)")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    delta = int(out.stdout.strip().splitlines()[-1])
    assert 60 * 2**20 <= delta < 160 * 2**20
    del ballast


def test_packed_attention_modes_train_the_same_rows(tiny_grouped):
    from benchmarks.packed_attention import document_lengths, measure

    lengths = document_lengths(4096, seed=3)
    assert sum(lengths) == 4096 and min(lengths[:-1]) >= 16 and len(lengths) > 3
    dense = measure("dense", str(tiny_grouped), "cpu", steps=2, warmup=0, threads=1, seq=2048)
    docs = measure("sdpa_documents", str(tiny_grouped), "cpu", steps=2, warmup=0, threads=1, seq=2048)
    assert dense["mask_bytes"] == 2048 * 2048 and docs["mask_bytes"] == 0
    assert docs["loss0"] == pytest.approx(dense["loss0"], rel=1e-5)
    assert dense["documents_per_row"] == docs["documents_per_row"] and min(dense["documents_per_row"]) > 1


def test_training_throughput_synthetic_samples_are_long_tailed_with_an_image_each(tiny_grouped):
    from benchmarks.training_throughput import MAX_LENGTH, synthetic_samples, target_tokens
    from chameleon_ft.data.image_layout import ids_to_image, image_spans
    from chameleon_ft.model.assets import CheckpointAssets

    assets = CheckpointAssets.open(tiny_grouped)
    samples = synthetic_samples(str(tiny_grouped), 200)
    lengths = sorted(len(s["input_ids"]) for s in samples)
    assert lengths[-1] <= MAX_LENGTH and lengths[-1] > 3 * lengths[len(lengths) // 2]  # a long tail
    for s in samples:
        (start, end), = image_spans(s["input_ids"], assets.tokens)
        codes, _ = ids_to_image(s["input_ids"][start:end], assets.tokens, assets.image_layout())
        assert codes.shape == (assets.vq_resolution // 16,) * 2
        assert all(t == -100 for t in s["labels"][:end])  # the image and question are never targets
    assert target_tokens(samples) == sum(sum(t != -100 for t in s["labels"]) for s in samples) > 0


def test_a_worker_result_is_read_after_output_that_ends_mid_line(monkeypatch, capsys):
    import sys
    import types

    from benchmarks import _worker
    from benchmarks.common import RESULT_PREFIX

    def measure_with_a_bar():
        sys.stdout.write("\rtraining 45/45 [00:03]")  # how a progress bar leaves stdout: no newline
        return {"figure": 1.5}

    monkeypatch.setitem(sys.modules, "benchmarks.bar_fake", types.SimpleNamespace(measure=measure_with_a_bar))
    monkeypatch.setattr(sys, "argv", ["_worker", json.dumps({"module": "bar_fake", "function": "measure",
                                                             "kwargs": {}})])
    _worker.main()
    results = [line for line in capsys.readouterr().out.splitlines() if line.startswith(RESULT_PREFIX)]
    assert [json.loads(line[len(RESULT_PREFIX):]) for line in results] == [{"figure": 1.5}]
