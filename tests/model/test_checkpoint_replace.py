"""Replacing a checkpoint directory survives a kill at every step, and the next write recovers.

A kill is simulated by making the N-th filesystem step of the save raise (a rename, a tree removal
or a shard write), for every N until the save gets through; no cleanup code may run after it, as
after a real SIGKILL.
"""

import os
import shutil

import pytest
import torch

import chameleon_ft.model.checkpoint as ckpt
from chameleon_ft.model.checkpoint import (
    CheckpointError,
    begin_checkpoint_dir,
    iter_tensors,
    recover_checkpoint_dir,
    save_model,
    staging_dirs,
)
from chameleon_ft.model.modeling import ChameleonFTForCausalLM
from tests.model.helpers import randomize_, small_config


class Killed(BaseException):
    """Not an Exception, so no ``except Exception`` in the code under test can swallow it."""


def kill_at(monkeypatch, n: int) -> list[str]:
    """Make the ``n``-th rename / tree removal / shard write raise :class:`Killed`; returns the step log."""
    steps: list[str] = []

    def wrap(name, fn):
        def step(*args, **kwargs):
            steps.append(name)
            if len(steps) == n:
                raise Killed(f"killed at step {n} ({name})")
            return fn(*args, **kwargs)
        return step

    monkeypatch.setattr(os, "replace", wrap("replace", os.replace))
    monkeypatch.setattr(shutil, "rmtree", wrap("rmtree", shutil.rmtree))
    monkeypatch.setattr(ckpt, "save_file", wrap("save_file", ckpt.save_file))
    return steps


def model(seed: int):
    return randomize_(ChameleonFTForCausalLM(small_config()), seed=seed).eval()


def holds(path, m) -> bool:
    """``path`` is a complete checkpoint of ``m``: config plus every tensor, equal."""
    if not (path / "config.json").is_file():
        return False
    got = dict(iter_tensors(path))
    want = m.state_dict()
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def leftovers(out) -> list[str]:
    return [p.name for p in staging_dirs(out) if os.path.lexists(p)]


@pytest.mark.parametrize("sharded", [False, True])
def test_kill_at_every_step_of_a_replace(tmp_path, monkeypatch, sharded):
    old_model, new_model = model(0), model(1)
    kwargs = {"max_shard_bytes": 20_000} if sharded else {}
    states = set()
    for n in range(1, 100):
        work = tmp_path / f"kill{n}"
        out = work / "ckpt"
        save_model(old_model, out, **kwargs)
        with monkeypatch.context() as m:
            steps = kill_at(m, n)
            try:
                save_model(new_model, out, **kwargs)
            except Killed:
                pass
            else:
                break
        # at every instant a complete checkpoint is reachable at a known name
        tmp, new, old = staging_dirs(out)
        if out.exists():
            assert holds(out, old_model) or holds(out, new_model), steps
        else:
            assert holds(new, new_model) and holds(old, old_model), steps
        states.add((out.exists() and holds(out, new_model), new.exists(), old.exists(), tmp.exists()))

        # recovery alone settles on one complete checkpoint and nothing else
        copy = tmp_path / f"copy{n}"
        shutil.copytree(work, copy, symlinks=True)
        recover_checkpoint_dir(copy / "ckpt")
        assert holds(copy / "ckpt", old_model) or holds(copy / "ckpt", new_model)
        assert leftovers(copy / "ckpt") == []

        # and the rerun of the interrupted save gives the new checkpoint and no leftovers
        save_model(new_model, out, **kwargs)
        assert holds(out, new_model) and leftovers(out) == []
    else:
        pytest.fail("the save never completed")
    assert holds(out, new_model) and leftovers(out) == []
    # the interesting states were all visited: only old + staging, old + complete .new, swap half done
    assert (False, False, False, True) in states
    assert (False, True, False, False) in states  # .new complete, old still at out
    assert (False, True, True, False) in states  # out renamed away, .new not yet in


def test_leftover_old_without_out_is_restored(tmp_path):
    # what the previous swap (rename out away, then the new one in) left when killed in between
    out = tmp_path / "ckpt"
    m = model(0)
    save_model(m, out)
    os.replace(out, staging_dirs(out)[2])
    recover_checkpoint_dir(out)
    assert holds(out, m) and leftovers(out) == []


def test_a_directory_that_is_not_a_checkpoint_is_never_replaced(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(CheckpointError, match=r"precious: exists and is not a checkpoint directory"):
        save_model(model(0), out)
    assert (out / "thesis.tex").read_text() == "years of work" and leftovers(out) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert holds(save_model(model(0), empty), model(0))


def test_begin_gives_an_empty_staging_directory(tmp_path):
    out = tmp_path / "ckpt"
    tmp = staging_dirs(out)[0]
    tmp.mkdir()
    (tmp / "half-written.safetensors").write_bytes(b"\0" * 10)
    assert begin_checkpoint_dir(out) == tmp and list(tmp.iterdir()) == []
