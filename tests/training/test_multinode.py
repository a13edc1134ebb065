"""Multi-node rehearsal on one machine: two torchrun "nodes" (one process each, c10d rendezvous on
127.0.0.1) train packed documents with FSDP2 over gloo, checkpoint every rank's shard, resume, and export
once."""

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from chameleon_ft.model.checkpoint import load_config

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_nodes(run_dir: Path, cwd: Path, *overrides: str, timeout: int = 900) -> list[subprocess.CompletedProcess]:
    """``torchrun --nnodes=2 --nproc-per-node=1 ... -m chameleon_ft ...`` as two node processes."""
    port = free_port()
    args = [TORCHRUN, "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-id=rehearsal-{port}", "-m", "chameleon_ft", "recipe=debug", "strategy=fsdp",
            "trainer.accelerator=cpu", "trainer.num_nodes=2", f"hydra.run.dir={run_dir}",
            "trainer.enable_progress_bar=false", "data.max_samples=16", "data.eval_batch_size=2", "eval.max_samples=2",
            # Packed rows of about 2 samples, one row per rank and step, in the documents layout (no T x T mask).
            "data.packing=true", "data.max_length=128", "data.batch_size=1", "model.attn_implementation=sdpa_documents",
            f"data.cache_dir={cwd / 'data_cache'}", *overrides]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    nodes = [subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        outs = [node.communicate(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    done = [subprocess.CompletedProcess(args, node.returncode, out, err) for node, (out, err) in zip(nodes, outs)]
    for d in done:
        assert d.returncode == 0, d.stdout[-2000:] + d.stderr[-4000:]
    return done


def written_by(nodes: list[subprocess.CompletedProcess], line: str) -> list[int]:
    return [i for i, node in enumerate(nodes) if line in node.stdout]


@pytest.mark.timeout(1800)
def test_two_nodes_train_checkpoint_resume_and_export(tiny_grouped, tmp_path):
    run = tmp_path / "run"
    first = run_two_nodes(run, tmp_path, "trainer.max_steps=2", "checkpoint.every_n_steps=2",
                          "trainer.val_check_interval=2")
    # Exactly one node process wrote the adapter and the metrics (global rank 0, whichever node it is).
    assert len(written_by(first, "adapter written to")) == 1
    assert len(written_by(first, "metrics written to")) == 1
    ckpt = run / "checkpoints" / "step-00000002.ckpt"
    assert ckpt.is_dir()
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(ckpt)).read_metadata()
    shard_files = sorted({info.relative_path for info in meta.storage_data.values()})
    assert shard_files == ["__0_0.distcp", "__1_0.distcp"]  # every rank's shard
    lora = [k for k in meta.state_dict_metadata if k.startswith("state_dict.") and "lora_B" in k]
    assert lora and all(len(meta.state_dict_metadata[k].chunks) == 2 for k in lora)  # split over the 2 ranks
    assert all(".lora_" in k for k in meta.state_dict_metadata if k.startswith("state_dict."))

    second = run_two_nodes(run, tmp_path, "trainer.max_steps=4", "checkpoint.every_n_steps=2",
                           "trainer.val_check_interval=2", "resume=auto")
    assert len(written_by(second, "adapter written to")) == 1
    assert (run / "checkpoints" / "step-00000004.ckpt" / "__1_0.distcp").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val/loss"] is not None
    # Generated-answer metrics are computed once over both nodes' answers (each rank decodes its share).
    assert isinstance(metrics["val/acc"], float)
    with open(run / "csv" / "metrics.csv") as f:  # the resumed run's log (the first run's is metrics.part1.csv)
        steps = sorted({int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")})
    assert steps == [2, 3]
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    hidden = load_config(tiny_grouped).hidden_size
    b = next(v for k, v in adapter.items() if k.endswith("q_proj.lora_B.weight"))
    assert b.shape[0] == hidden  # full tensors, not one rank's half
