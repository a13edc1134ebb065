"""A run on an empty cache (the tiny checkpoint and the data built inside it) trains exactly like the same
command on a warm cache."""

import torch
from safetensors.torch import load_file

from tests.conftest import run_module

COMMAND = ["recipe=debug", "trainer.max_steps=2", "trainer.val_check_interval=2", "data.max_samples=16",
           "eval.max_samples=2"]


def test_cold_and_warm_cache_runs_give_identical_adapters(tmp_path):
    cache = tmp_path / "fresh_cache"
    env = {"CHAMELEON_FT_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    cold = run_module("chameleon_ft", [*COMMAND, f"hydra.run.dir={tmp_path / 'cold'}"], cwd=tmp_path, env=env,
                      timeout=1800)
    assert cold.returncode == 0, cold.stderr[-3000:]
    assert [p.name for p in cache.glob("tiny-*") if p.is_dir()] == [p.name for p in cache.glob("tiny-*-grouped")]
    assert list(cache.glob("tiny-*-grouped"))  # the tiny checkpoint was built by this run
    warm = run_module("chameleon_ft", [*COMMAND, f"hydra.run.dir={tmp_path / 'warm'}"], cwd=tmp_path, env=env)
    assert warm.returncode == 0, warm.stderr[-3000:]
    a = load_file(tmp_path / "cold" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "warm" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(bool(t.abs().sum()) for n, t in a.items() if "lora_B" in n)  # trained, not the zero init
