"""Packed documents without a dense mask: every attention implementation against unpacked samples."""

import pytest
import torch

from chameleon_ft.data.collator import ConversationCollator, PackedRows, pack_by_length, per_sample_loss
from chameleon_ft.errors import ConfigError
from chameleon_ft.model.attention import (
    ATTN_IMPLEMENTATIONS,
    document_kwargs,
    resolve_attn_implementation,
    takes_documents,
)
from chameleon_ft.model.modeling import ChameleonFTForCausalLM
from tests.data.test_collator import make_samples
from tests.model.helpers import randomize_, small_config

LENGTHS = [7, 12, 5, 9, 3, 1, 16]
# What runs forward on this machine's CPU; flex_attention has no backward on CPU (torch 2.13).
CPU_FORWARD = ["sdpa", "sdpa_documents", "eager", "flex_attention"]
CPU_TRAIN = ["sdpa", "sdpa_documents", "eager"]


def model_with(implementation: str, seed: int = 0, device_type: str = "cpu") -> ChameleonFTForCausalLM:
    """A small random model (weights fixed by ``seed``) running ``implementation`` on ``device_type``."""
    cfg = small_config(mask_image_logits=False)
    cfg._attn_implementation = resolve_attn_implementation(implementation, device_type)
    return randomize_(ChameleonFTForCausalLM(cfg), seed=seed)


def packed_batch(implementation: str, samples, max_length: int = 20):
    cfg = small_config()
    bins = pack_by_length([len(s["input_ids"]) for s in samples], max_length)
    rows = PackedRows(samples, bins)
    collate = ConversationCollator(pad_id=cfg.pad_token_id, max_length=32, flatten=takes_documents(implementation))
    return collate([rows[k] for k in range(len(rows))]), [i for b in bins for i in b]


@pytest.mark.parametrize("implementation", CPU_FORWARD)
def test_packed_logits_and_per_sample_loss_equal_unpacked(implementation):
    model = model_with(implementation).eval()
    reference = model_with("sdpa").eval()  # same weights; every sample alone, padded, plain SDPA
    samples = make_samples(LENGTHS, model.config.vocab_size)
    batch, order = packed_batch(implementation, samples)
    documents = takes_documents(implementation)
    assert ("attention_mask" not in batch) == documents
    if documents:
        assert batch["input_ids"].shape == (1, sum(LENGTHS))  # one row, no padding
    unpacked = ConversationCollator(pad_id=model.config.pad_token_id, max_length=32)
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "sample_index"}, return_logits=True)
        got = per_sample_loss(out.loss_sums.token_ce, out.loss_sums.token_index, batch["sample_index"])
        T = batch["input_ids"].shape[1]
        for k, i in enumerate(order):
            single = unpacked([samples[i]])
            ref = reference(single["input_ids"], attention_mask=single["attention_mask"], labels=single["labels"],
                            return_logits=True)
            if LENGTHS[i] > 1:  # a one-token sample has no target
                torch.testing.assert_close(got[k], ref.loss, rtol=1e-5, atol=1e-5)
            r, pos = divmod(int((batch["sample_index"].reshape(-1) == k).nonzero()[0]), T)
            n = LENGTHS[i]
            torch.testing.assert_close(out.logits[r, pos : pos + n], ref.logits[0, :n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("implementation", [i for i in CPU_TRAIN if i != "sdpa"])
def test_packed_gradients_equal_the_dense_mask(implementation):
    samples = make_samples(LENGTHS, small_config().vocab_size, seed=3)
    grads = {}
    for impl in ("sdpa", implementation):
        model = model_with(impl).train()
        batch, _ = packed_batch(impl, samples)
        out = model(**{k: v for k, v in batch.items() if k != "sample_index"})
        out.loss_sums.loss_sum.backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        grads[impl]["<loss_sum>"] = out.loss_sums.loss_sum.detach()[None]
    assert grads["sdpa"].keys() == grads[implementation].keys()
    for name, g in grads["sdpa"].items():
        # Gradients reach ~8: float noise of the reordered sums.
        torch.testing.assert_close(grads[implementation][name], g, rtol=1e-4, atol=1e-5, msg=name)


def _dense_mask_bytes(T: int, doc: int) -> int:
    samples = make_samples([doc] * (T // doc), 50)
    batch = ConversationCollator(pad_id=0, max_length=T, pad_to_multiple_of=0)([samples])
    assert batch["attention_mask"].shape == (1, 1, T, T)
    return batch["attention_mask"].nbytes


def _documents_bytes(T: int, doc: int) -> int:
    samples = make_samples([doc] * (T // doc), 50)
    batch = ConversationCollator(pad_id=0, max_length=T, flatten=True)([samples])
    assert "attention_mask" not in batch and batch["position_ids"].shape == (1, T)
    described = document_kwargs(batch["position_ids"])  # what sdpa_documents / flash-attn read
    assert described["cu_seq_lens_q"].tolist() == list(range(0, T + 1, doc))
    return batch["position_ids"].nbytes + sum(t.nbytes for t in described.values() if isinstance(t, torch.Tensor))


def _block_mask_bytes(T: int, doc: int) -> int:
    """Bytes of the FlexAttention BlockMask transformers builds for a documents row (its block tables)."""
    from torch.nn.attention.flex_attention import BlockMask
    from transformers.masking_utils import create_causal_mask

    cfg = small_config()
    cfg._attn_implementation = "flex_attention"
    samples = make_samples([doc] * (T // doc), 50)
    batch = ConversationCollator(pad_id=0, max_length=T, flatten=True)([samples])
    mask = create_causal_mask(cfg, torch.zeros(1, T, 1), None, None, position_ids=batch["position_ids"])
    assert isinstance(mask, BlockMask)
    return sum(t.nbytes for t in mask.as_tuple() if isinstance(t, torch.Tensor))


def test_document_layout_memory_grows_linearly_the_dense_mask_quadratically():
    sizes = [1024, 2048, 4096, 8192]
    dense = [_dense_mask_bytes(T, 256) for T in sizes]
    docs = [_documents_bytes(T, 256) for T in sizes]
    assert dense[2] == 4096 * 4096  # 16 MiB per sample at T = 4096
    for k in range(1, len(sizes)):
        assert dense[k] == 4 * dense[k - 1]
        assert docs[k] <= 2.02 * docs[k - 1]  # O(T): position ids + one boundary per document
    assert docs[2] * 400 < dense[2]


def test_flex_block_mask_is_a_small_fraction_of_the_dense_mask():
    # The BlockMask keeps (T/128)^2 int32 block-table entries per table; at T = 4096 that is ~1/1000 of
    # the dense boolean mask, and it is never materialised densely.
    T = 4096
    block = _block_mask_bytes(T, 256)
    assert block * 500 < _dense_mask_bytes(T, 256)


def test_resolve_attn_implementation():
    assert resolve_attn_implementation("auto", "cpu") == "sdpa_documents"
    for name in ATTN_IMPLEMENTATIONS:
        if name not in ("auto", "flash_attention_2"):
            assert resolve_attn_implementation(name, "cpu") == name
    with pytest.raises(ConfigError, match="unknown; use one of"):
        resolve_attn_implementation("flash", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a CUDA device and the flash-attn package"):
            resolve_attn_implementation("flash_attention_2", "cpu")


def test_rows_of_packed_samples_without_a_mask_are_refused_not_mixed():
    # Several rows whose position ids restart, without a mask: refusing beats attending across samples.
    model = model_with("sdpa_documents").eval()
    samples = make_samples([5, 6, 4, 7], model.config.vocab_size)
    batch = ConversationCollator(pad_id=0, max_length=16)([samples[:2], samples[2:]])
    with pytest.raises(ValueError, match=r"packed documents must be one row \[1, N\]"):
        model(batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"])


def test_flex_attention_is_refused_for_training_on_cpu_before_loading(tmp_path):
    from omegaconf import OmegaConf

    from chameleon_ft.config.schema import ModelConfig, PeftConfig
    from chameleon_ft.training.model_init import build_train_model

    model_cfg = OmegaConf.structured(ModelConfig(attn_implementation="flex_attention"))
    with pytest.raises(ConfigError, match="flex_attention cannot train on CPU"):
        build_train_model(model_cfg, OmegaConf.structured(PeftConfig()), tmp_path / "not_read", device="cpu",
                          base_dtype=torch.float32, seed=0)
