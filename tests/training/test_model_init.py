"""Activation checkpointing as the training build turns it on (``model.activation_checkpointing=true``)."""

import torch

from benchmarks import gpu_training
from chameleon_ft.training.model_init import enable_activation_checkpointing
from tests.benchmarks.test_gpu_training import TINY_SHAPE


def _loss_grads_and_mlp_calls(checkpointing: bool):
    from chameleon_ft.model.modeling import ChameleonFTForCausalLM

    config = gpu_training.chameleon_config(TINY_SHAPE, max_positions=64)
    config.mask_image_logits, config.dropout = False, 0.0
    torch.manual_seed(0)
    model = ChameleonFTForCausalLM(config).train()
    if checkpointing:
        enable_activation_checkpointing(model)
    calls = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, len(calls)


def test_checkpointing_recomputes_each_layer_and_gives_the_same_loss_and_gradients():
    loss, grads, calls = _loss_grads_and_mlp_calls(False)
    ck_loss, ck_grads, ck_calls = _loss_grads_and_mlp_calls(True)
    assert calls == 1 and ck_calls == 2  # the layer's forward runs again inside backward
    torch.testing.assert_close(ck_loss, loss, rtol=0, atol=0)
    assert grads.keys() == ck_grads.keys()
    for name in grads:
        torch.testing.assert_close(ck_grads[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_older_transformers_get_the_old_method_name():
    # transformers before 5.23 has only gradient_checkpointing_enable (and the project allows >= 5.0).
    class OldModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.called_with = None

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.called_with = gradient_checkpointing_kwargs

    old = OldModel()
    enable_activation_checkpointing(old)
    assert old.called_with == {"use_reentrant": False}
