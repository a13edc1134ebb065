"""train(): run artefacts, validation metrics against an independent computation, exports that reload."""

import json
import math

import pytest
import torch
import yaml
from peft import PeftModel

from chameleon_ft.data.collator import ConversationCollator
from chameleon_ft.model.checkpoint import load_model
from chameleon_ft.model.tokens import ChameleonTokens
from chameleon_ft.training.train import train
from tests.training.helpers import loader_factory, make_cfg, small_checkpoint, token_samples


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return small_checkpoint(tmp_path_factory.mktemp("ck") / "small")


def _val_loss(model, ckpt, zw):
    """Token-mean CE + z-loss over the validation samples, one sequence at a time."""
    tokens = ChameleonTokens.from_checkpoint(ckpt)
    collate = ConversationCollator(pad_id=tokens.pad, max_length=64)
    ce = z = n = 0.0
    with torch.no_grad():
        for s in token_samples(ckpt, 8, seed=2):
            b = collate([s])
            sums = model(input_ids=b["input_ids"], labels=b["labels"]).loss_sums
            ce, z, n = ce + float(sums.ce_sum), z + float(sums.z_sum), n + int(sums.n_tokens)
    return (ce + zw * z) / n, math.exp(ce / n)


def test_lora_run_artefacts_and_metrics(ckpt, tmp_path):
    calls = []

    def evaluator(module):
        calls.append(module.trainer.global_step)
        return {"val/answer_accuracy": 0.25}

    cfg = make_cfg(ckpt, **{"trainer.max_steps": 4})
    metrics = train(cfg, tmp_path, loader_factory=loader_factory(), evaluators=[evaluator])
    assert set(metrics) == {"val/loss", "val/z_loss", "val/ppl", "val/answer_accuracy"}
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
    assert calls and calls[-1] == 4
    saved_cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved_cfg["model"]["path"] == str(ckpt)

    # The exported PEFT adapter on a freshly loaded base reproduces the logged validation loss.
    base = load_model(ckpt, mask_image_logits=False, z_loss_weight=1e-4, loss_chunk_size=16)
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    loss, ppl = _val_loss(model, ckpt, 1e-4)
    assert metrics["val/loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(ppl, rel=1e-5)
    untrained, _ = _val_loss(load_model(ckpt, mask_image_logits=False, z_loss_weight=1e-4), ckpt, 1e-4)
    assert abs(untrained - loss) > 1e-3  # the adapter is not a no-op

    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    for key in ("train/loss", "train/z_loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss"):
        assert key in header, key


def test_full_finetune_exports_a_loadable_model(ckpt, tmp_path):
    cfg = make_cfg(ckpt, **{"peft.method": "none", "trainer.max_steps": 2, "optim.lr": 1e-3})
    metrics = train(cfg, tmp_path, loader_factory=loader_factory())
    model = load_model(tmp_path / "model", mask_image_logits=False, z_loss_weight=1e-4).eval()
    loss, _ = _val_loss(model, ckpt, 1e-4)
    assert metrics["val/loss"] == pytest.approx(loss, rel=1e-5)
    assert not (tmp_path / "adapter").exists()


def test_export_adapter_each_checkpoint(ckpt, tmp_path):
    from lightning.pytorch.callbacks import Callback
    from safetensors.torch import load_file

    seen = {}

    class Peek(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            f = tmp_path / "adapter" / "adapter_model.safetensors"
            if f.exists():
                seen.setdefault(trainer.global_step, load_file(f))

    cfg = make_cfg(ckpt, **{"trainer.max_steps": 4, "checkpoint.every_n_steps": 2, "checkpoint.export_adapter_each": True})
    train(cfg, tmp_path, loader_factory=loader_factory(), callbacks=[Peek()])
    # Checkpoint callbacks run after ours: the step-2 export is first visible at the next batch end.
    assert sorted(seen) == [3, 4]
    final = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    key = next(k for k in final if "lora_B" in k)
    assert seen[3][key].abs().sum() > 0 and not torch.equal(seen[3][key], final[key])
