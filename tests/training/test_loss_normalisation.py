"""Gradient = d(token-mean loss of the whole optimizer step), whatever the micro-batching."""

import lightning as L
import pytest
import torch

from chameleon_ft.data.collator import ConversationCollator
from chameleon_ft.model.tokens import ChameleonTokens
from chameleon_ft.training.model_init import build_train_model
from chameleon_ft.training.module import ChameleonLitModule
from tests.training.helpers import GlobalBatchSampler, make_cfg, small_checkpoint, token_samples


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return small_checkpoint(tmp_path_factory.mktemp("ck") / "small")


class GradRecorder(ChameleonLitModule):
    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)  # normalises (and would clip)
        self.grads = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.requires_grad}


def _run(ckpt, samples, micro_batch, accumulate, method):
    cfg = make_cfg(ckpt, **{"peft.method": method, "optim.grad_clip": 0.0, "optim.weight_decay": 0.0})
    tokens = ChameleonTokens.from_checkpoint(ckpt)
    loader = torch.utils.data.DataLoader(
        samples, batch_sampler=GlobalBatchSampler(len(samples), micro_batch, seed=0),
        collate_fn=ConversationCollator(pad_id=tokens.pad, max_length=64))
    module = GradRecorder(cfg, ckpt)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, accumulate_grad_batches=accumulate, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader)
    return module.grads, cfg


@pytest.mark.parametrize("method", ["lora", "none"])
def test_one_batch_of_8_equals_two_accumulated_batches_of_4(ckpt, method):
    samples = token_samples(ckpt, 8, seed=5)
    g8, cfg = _run(ckpt, samples, 8, 1, method)
    g4, _ = _run(ckpt, samples, 4, 2, method)
    # The two halves hold different numbers of target tokens, so a mean of per-batch means would differ.
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0)).tolist()
    n = [sum(sum(1 for y in samples[i]["labels"][1:] if y != -100) for i in order[h * 4:(h + 1) * 4]) for h in (0, 1)]
    assert n[0] != n[1]

    # Independent reference: plain autograd of the token-mean loss over all 8 sequences.
    ref_model = build_train_model(cfg.model, cfg.peft, ckpt, device=torch.device("cpu"), base_dtype=torch.float32, seed=0)
    tokens = ChameleonTokens.from_checkpoint(ckpt)
    batch = ConversationCollator(pad_id=tokens.pad, max_length=64)(samples)
    out = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], labels=batch["labels"])
    out.loss.backward()
    ref = {"model." + n: p.grad for n, p in ref_model.named_parameters() if p.requires_grad}
    assert g8.keys() == g4.keys() == ref.keys()
    for k in ref:
        scale = ref[k].abs().max().item() + 1e-12
        torch.testing.assert_close(g8[k], ref[k], rtol=1e-4, atol=1e-6 * scale, msg=f"1x8 {k}")
        torch.testing.assert_close(g4[k], ref[k], rtol=1e-4, atol=1e-6 * scale, msg=f"2x4 {k}")
    assert any(v.abs().sum() > 0 for v in ref.values())
