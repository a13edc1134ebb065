"""A diverged run stops with a clear error and writes nothing non-finite; skipped and frozen steps are reported."""

import csv
import logging
import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from chameleon_ft.errors import RunError
from chameleon_ft.training.checkpointing import PARTIAL_SUFFIX
from chameleon_ft.training.train import train
from tests.conftest import run_module
from tests.training.helpers import loader_factory, make_cfg, small_checkpoint

HEALTH_LOG = "chameleon_ft.training.health"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return small_checkpoint(tmp_path_factory.mktemp("ck") / "small")


def trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


class PoisonGradients(Callback):
    """Sets one trainable gradient to NaN (or every gradient to 0) at the given optimizer steps."""

    def __init__(self, steps, value=float("nan"), every=False):
        self.steps, self.value, self.every = set(steps), value, every

    def on_after_backward(self, trainer, module):
        if trainer.global_step not in self.steps:
            return
        grads = [p.grad for p in module.parameters() if p.requires_grad and p.grad is not None]
        for g in grads if self.every else grads[:1]:
            g.fill_(self.value)


class Snapshots(Callback):
    """Trainable weights and AdamW moments before each optimizer step (keyed by that step)."""

    def __init__(self):
        self.weights, self.moments = {}, {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        step = trainer.global_step
        self.weights[step] = trainable(module)
        state = trainer.optimizers[0].state
        self.moments[step] = [state[p]["exp_avg"].clone() for p in module.parameters() if p in state]

    def on_train_end(self, trainer, module):
        self.weights[trainer.global_step] = trainable(module)


def csv_rows(run_dir):
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_cli_diverged_run_stops_with_one_line_error_and_writes_nothing(tmp_path):
    res = run_module("chameleon_ft", ["recipe=debug", "optim.lr=1e30", "trainer.max_steps=6", "optim.warmup_steps=0"],
                     cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    # lr=1e30: step 0 is finite, its update breaks the weights, step 1's loss is NaN
    assert last.startswith("error: training diverged at step 1: train/loss=nan"), last
    for part in ("Last good checkpoint: none", "optim.lr (now 1e+30)", "trainer.precision (now 32-true)",
                 "trainer.skip_nonfinite_steps"):
        assert part in last, part
    written = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert not [n for n in written if ".ckpt" in n or n.startswith("adapter") or n == "metrics.json"], written
    assert "adapter written" not in res.stdout


def test_nonfinite_gradient_stops_naming_step_and_last_good_checkpoint(ckpt, tmp_path):
    cfg = make_cfg(ckpt, **{"trainer.max_steps": 6, "checkpoint.every_n_steps": 2})
    with pytest.raises(RunError) as info:
        train(cfg, tmp_path, loader_factory=loader_factory(), callbacks=[PoisonGradients([3])])
    msg = str(info.value)
    assert msg.startswith("training diverged at step 3: train/loss=")
    assert "train/grad_norm=nan" in msg
    assert f"Last good checkpoint: {tmp_path / 'checkpoints' / 'step-00000002.ckpt'}." in msg
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002.ckpt"]
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "metrics.json").exists()


def test_skipped_steps_leave_weights_and_moments_untouched_and_are_counted(ckpt, tmp_path, caplog):
    snaps = Snapshots()
    cfg = make_cfg(ckpt, **{"trainer.max_steps": 5, "trainer.skip_nonfinite_steps": 1})
    with caplog.at_level(logging.WARNING, logger=HEALTH_LOG):
        train(cfg, tmp_path, loader_factory=loader_factory(), callbacks=[PoisonGradients([2]), snaps])
    for name, w in snaps.weights[2].items():  # step 2 was skipped: exactly as before it
        assert torch.equal(snaps.weights[3][name], w), name
    for a, b in zip(snaps.moments[2], snaps.moments[3], strict=True):
        assert torch.equal(a, b)
    for name, w in snaps.weights[3].items():  # the steps around it did train
        assert not torch.equal(snaps.weights[4][name], w), name
    skipped = {int(r["step"]): float(r["train/skipped_steps"]) for r in csv_rows(tmp_path) if r.get("train/skipped_steps")}
    assert skipped == {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0}
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    warned = [r.getMessage() for r in caplog.records if r.name == HEALTH_LOG]
    assert len(warned) == 1 and warned[0].startswith("step 2: train/loss=") and "skipped (1 of" in warned[0]


def test_more_bad_steps_than_allowed_stop_the_run(ckpt, tmp_path):
    cfg = make_cfg(ckpt, **{"trainer.max_steps": 6, "trainer.skip_nonfinite_steps": 1})
    with pytest.raises(RunError, match=r"diverged at step 3 after skipping 1 such step\(s\)"):
        train(cfg, tmp_path, loader_factory=loader_factory(), callbacks=[PoisonGradients([1, 3])])


def test_nonfinite_weights_are_never_checkpointed(ckpt, tmp_path):
    class BreakWeights(Callback):
        def on_train_batch_end(self, trainer, module, *args):
            if trainer.global_step == 4:  # after the step-2 checkpoint, before the step-4 one
                name, p = next((n, p) for n, p in module.named_parameters() if p.requires_grad)
                self.name = name
                with torch.no_grad():
                    p.view(-1)[0] = math.inf

    breaker = BreakWeights()
    cfg = make_cfg(ckpt, **{"trainer.max_steps": 6, "checkpoint.every_n_steps": 2})
    with pytest.raises(RunError) as info:
        train(cfg, tmp_path, loader_factory=loader_factory(), callbacks=[breaker])
    msg = str(info.value)
    assert msg.startswith(f"refusing to write checkpoint {tmp_path / 'checkpoints' / 'step-00000004.ckpt'}: "
                          f"trainable tensor {breaker.name} has 0 NaN, 1 inf of ")
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000002.ckpt"] and not any(n.endswith(PARTIAL_SUFFIX) for n in names)
    assert not (tmp_path / "adapter").exists()


def test_frozen_gradients_get_one_loud_warning(ckpt, tmp_path, caplog):
    cfg = make_cfg(ckpt, **{"trainer.max_steps": 6, "trainer.zero_grad_warn_steps": 3})
    with caplog.at_level(logging.WARNING, logger=HEALTH_LOG):
        train(cfg, tmp_path, loader_factory=loader_factory(), callbacks=[PoisonGradients(range(1, 6), 0.0, every=True)])
    warned = [r.getMessage() for r in caplog.records if r.name == HEALTH_LOG]
    assert len(warned) == 1, warned
    assert warned[0].startswith("TRAINING IS FROZEN: every trainable gradient has been exactly 0 for 3 optimizer "
                                "steps in a row (steps 1-3)")
    grad_norms = [float(r["train/grad_norm"]) for r in csv_rows(tmp_path) if r.get("train/grad_norm")]
    assert grad_norms[0] > 0 and grad_norms[1:] == [0.0] * 5


def test_healthy_run_warns_about_nothing(ckpt, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        train(make_cfg(ckpt, **{"trainer.max_steps": 4}), tmp_path, loader_factory=loader_factory())
    assert not [r for r in caplog.records if r.name in (HEALTH_LOG, "chameleon_ft.training.train")]


def test_max_steps_zero_warns_that_the_adapter_is_untrained(ckpt, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="chameleon_ft.training.train"):
        train(make_cfg(ckpt, **{"trainer.max_steps": 0}), tmp_path, loader_factory=loader_factory())
    warned = [r.getMessage() for r in caplog.records if r.name == "chameleon_ft.training.train"]
    assert warned == ["NO OPTIMIZER STEP RAN (trainer.max_steps=0): the exported adapter is untrained, identical "
                      "to the base model"]
