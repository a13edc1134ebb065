"""An adapter with a NaN or infinity is never written, and merge and evaluation refuse one, naming the tensor."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from chameleon_ft.adapter import export_adapter, read_adapter
from chameleon_ft.errors import CheckpointError
from chameleon_ft.model.checkpoint import load_model
from tests.conftest import run_module
from tests.export.helpers import lora_model, write_small_checkpoint

POISONED = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, tiny_grouped):
    """The tiny checkpoint and an exported adapter on it with one NaN and two infinities in ``POISONED``
    (otherwise a working adapter: without the check, merge and evaluation would run on it)."""
    root = tmp_path_factory.mktemp("nonfinite")
    base = tiny_grouped
    adapter = export_adapter(lora_model(load_model(base)), root / "adapter", base)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    assert POISONED in tensors
    bad = tensors[POISONED].clone()
    bad.view(-1)[:3] = torch.tensor([math.nan, math.inf, -math.inf])
    tensors[POISONED] = bad
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return base, adapter


def test_export_refuses_nonfinite_weights_and_writes_nothing(tmp_path):
    base = write_small_checkpoint(tmp_path / "base", layout="expanded")
    model = lora_model(load_model(base))
    name, p = next((n, p) for n, p in model.named_parameters() if "lora_A" in n)
    with torch.no_grad():
        p.view(-1)[5] = math.nan
    with pytest.raises(CheckpointError, match=r"refusing to write the adapter .*: tensor \S+lora_A\.weight has "
                                              r"1 NaN, 0 inf of \d+ values"):
        export_adapter(model, tmp_path / "adapter", base)
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_read_adapter_names_the_nonfinite_tensor(poisoned):
    _, adapter = poisoned
    with pytest.raises(CheckpointError) as info:
        read_adapter(adapter)
    assert str(info.value).startswith(f"{adapter / 'adapter_model.safetensors'}: tensor {POISONED} has "
                                      "1 NaN, 2 inf of ")


def test_merge_command_refuses_a_nonfinite_adapter(poisoned, tmp_path):
    base, adapter = poisoned
    res = run_module("chameleon_ft.merge", [f"base={base}", f"adapter={adapter}", f"out={tmp_path / 'merged'}"],
                     cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"tensor {POISONED} has 1 NaN, 2 inf" in lines[0]
    assert not (tmp_path / "merged").exists()


def test_evaluate_command_refuses_a_nonfinite_adapter(poisoned, tmp_path):
    _, adapter = poisoned
    res = run_module("chameleon_ft.evaluate", ["recipe=debug", f"adapter={adapter}"], cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"tensor {POISONED} has 1 NaN, 2 inf" in last, last
    assert not list(tmp_path.glob("eval-*.json"))
