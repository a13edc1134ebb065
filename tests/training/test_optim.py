import math

import pytest
from omegaconf import OmegaConf

from chameleon_ft.adapter import attach_adapters as apply_peft
from chameleon_ft.errors import ConfigError
from chameleon_ft.model.modeling import ChameleonFTForCausalLM
from chameleon_ft.training.optim import build_optimizer
from tests.model.helpers import small_config


def _optim_cfg(**kw):
    base = dict(lr=1e-3, weight_decay=0.1, betas=[0.9, 0.95], eps=1e-8, no_decay_lora_b=False,
                scheduler="cosine", warmup_steps=3, min_lr_ratio=0.1, grad_clip=1.0)
    base.update(kw)
    return OmegaConf.create(base)


def _peft_cfg(method="lora"):
    return OmegaConf.create(dict(method=method, r=4, alpha=8, dropout=0.0, target_modules="all_linear",
                                 modules_to_save=[], train_image_rows=False))


def _groups_by_name(model, optimizer):
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}


def test_full_finetune_norms_and_biases_not_decayed():
    model = apply_peft(ChameleonFTForCausalLM(small_config()), _peft_cfg("none"))
    opt = build_optimizer(model, _optim_cfg(), total_steps=10)["optimizer"]
    wd = _groups_by_name(model, opt)
    assert len(wd) == sum(1 for p in model.parameters() if p.requires_grad)
    for name, p in model.named_parameters():
        no_decay = name.endswith(".bias") or "norm" in name
        assert wd[name] == (0.0 if no_decay else 0.1), name
    assert wd["model.layers.0.self_attn.q_norm.bias"] == 0.0
    assert wd["model.layers.0.input_layernorm.weight"] == 0.0
    assert wd["model.layers.0.mlp.down_proj.weight"] == 0.1
    assert wd["lm_head.weight"] == 0.1


@pytest.mark.parametrize("no_decay_b", [False, True])
def test_lora_b_decay_switch(no_decay_b):
    model = apply_peft(ChameleonFTForCausalLM(small_config()), _peft_cfg("lora"))
    opt = build_optimizer(model, _optim_cfg(no_decay_lora_b=no_decay_b), total_steps=10)["optimizer"]
    wd = _groups_by_name(model, opt)
    assert wd and all(".lora_" in n for n in wd)  # only adapters are optimised
    for name, decay in wd.items():
        if ".lora_B." in name:
            assert decay == (0.0 if no_decay_b else 0.1)
        else:
            assert decay == 0.1


def _reference_lr(step, lr, warmup, total, kind, min_ratio):
    """Linear warmup from 0 (transformers' convention), then constant or cosine down to min_ratio at total."""
    if step < warmup:
        return lr * step / warmup
    if kind == "constant":
        return lr
    t = (step - warmup) / (total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * t)) / 2)


@pytest.mark.parametrize("kind", ["cosine", "constant"])
def test_schedule_follows_formula(kind):
    model = apply_peft(ChameleonFTForCausalLM(small_config()), _peft_cfg("lora"))
    conf = build_optimizer(model, _optim_cfg(scheduler=kind), total_steps=20)
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    seen = {}
    for step in range(21):
        seen[step] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    for step in (0, 1, 2, 3, 7, 11, 19, 20):
        assert seen[step] == pytest.approx(_reference_lr(step, 1e-3, 3, 20, kind, 0.1), rel=1e-9), step
    if kind == "cosine":
        assert seen[20] == pytest.approx(1e-4)  # floor at min_lr_ratio
        assert seen[3] == pytest.approx(1e-3)  # end of warmup reaches the peak


def test_unknown_scheduler_refused():
    model = apply_peft(ChameleonFTForCausalLM(small_config()), _peft_cfg("lora"))
    with pytest.raises(ConfigError, match="linear"):
        build_optimizer(model, _optim_cfg(scheduler="linear"), total_steps=5)
