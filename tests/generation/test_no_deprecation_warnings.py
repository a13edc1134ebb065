"""Generation uses transformers' current cache API: no deprecation warning from our code, in process or in a
default run of the command (transformers 5.24 renamed ``past_key_values`` to ``cache``)."""

import logging
import warnings

import pytest
import torch

from chameleon_ft.generation.generate import generate_images, generate_text
from chameleon_ft.model.checkpoint import load_model, load_tokenizer
from chameleon_ft.model.tokens import ChameleonTokens
from tests.conftest import run_module
from tests.export.helpers import write_small_checkpoint


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_log():
    """Messages of transformers' own logger (it does not propagate), its once-only warnings re-armed."""
    logging.Logger.warning_once.cache_clear()  # transformers' warning_once is an lru_cache on Logger
    handler = _Collect()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def test_generation_raises_no_deprecation_warning(tmp_path, transformers_log):
    ckpt = write_small_checkpoint(tmp_path / "ckpt", layout="grouped", seed=3)
    model, T, tok = load_model(ckpt).eval(), ChameleonTokens.from_checkpoint(ckpt), load_tokenizer(ckpt)
    prompts = [[T.bos, *tok.encode("t1 t2", add_special_tokens=False), T.eot]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        generate_text(model, T, tok, prompts, max_new_tokens=4)
        for sampler in ("hf", "plain", "sjd"):
            generate_images(model, T, prompts, width=32, height=32, image_top_k=4, sampler=sampler)
        with torch.no_grad():  # a plain forward returning its cache
            out = model(input_ids=torch.tensor(prompts), use_cache=True)
        assert out.cache is not None
    assert not [m for m in transformers_log if "deprecated" in m], transformers_log


@pytest.mark.parametrize("mode", ["text", "image"])
def test_a_default_run_prints_no_deprecation_warning(tmp_path, mode):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "Draw the digit 7"}\n')
    res = run_module("chameleon_ft.generate", [f"mode={mode}", f"input={inp}", f"output={tmp_path / 'out'}",
                                               "max_new_tokens=4", "width=32", "height=32"], cwd=tmp_path,
                     env={"PYTHONWARNINGS": "error::FutureWarning,error::DeprecationWarning:chameleon_ft"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "deprecated" not in res.stderr.lower(), res.stderr[-3000:]
