"""Small random checkpoints and LoRA-wrapped models for export / generation tests."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from chameleon_ft.model.checkpoint import save_state_dict
from chameleon_ft.model.modeling import ChameleonFTForCausalLM
from tests.model.helpers import randomize_, small_config

# Training's anchored regex form of target_modules; the export must turn it into plain names.
TRAINING_TARGETS = r"(?:.*\.)?layers\.\d+\.(?:[^.]+\.)*(?:o_proj|q_proj|up_proj|v_proj)"


def small_config_with_unk():
    """``small_config`` plus an ``<unk>`` token, so a word-level tokenizer can encode any text."""
    cfg = small_config()
    vocab = dict(cfg.vocabulary_map)
    vocab["<unk>"] = len(vocab)
    cfg.vocabulary_map = vocab
    cfg.vocab_size = len(vocab)
    return cfg


def write_word_tokenizer(out_dir: Path, vocab: dict[str, int]) -> None:
    """A whitespace word-level ``tokenizer.json`` over ``vocab`` (unknown words -> ``<unk>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens([n for n in vocab if n.startswith("<")])
    tok.save(str(out_dir / "tokenizer.json"))


def write_small_checkpoint(out_dir: Path, layout: str = "expanded", seed: int = 0) -> Path:
    """A random small Chameleon (2 q/k-norm groups of 2 heads, distinct groups) saved in ``layout``,
    with a word-level tokenizer over its vocabulary (``t0`` .. ``t39`` are the text words)."""
    cfg = small_config_with_unk()
    model = randomize_(ChameleonFTForCausalLM(cfg), seed=seed)
    out = save_state_dict(model.state_dict(), cfg, out_dir, layout=layout)
    write_word_tokenizer(out, cfg.vocabulary_map)
    return out


def randomize_lora_(model, seed: int = 1, scale: float = 0.05):
    """LoRA B starts at zero (adapter = no-op); make every LoRA weight random so the adapter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


def lora_model(base: ChameleonFTForCausalLM, r: int = 4, alpha: int = 8, seed: int = 1, **kw):
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TRAINING_TARGETS,
                     task_type="CAUSAL_LM", **kw)
    return randomize_lora_(get_peft_model(base, cfg), seed=seed).eval()


def lora_with_image_rows(base: ChameleonFTForCausalLM, seed: int = 2, r: int = 4, alpha: int = 8):
    """LoRA plus trainable image-token rows of ``lm_head`` and ``embed_tokens``, every adapter weight random."""
    ids = base.image_token_ids.tolist()
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TRAINING_TARGETS, task_type="CAUSAL_LM",
                     trainable_token_indices={"embed_tokens": ids, "lm_head": ids})
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if ".lora_" in n or "trainable_tokens_delta" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def random_ids(config, batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    """Random ids over the whole vocabulary (image tokens included, so image-token rows show)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(config.vocab_size, (batch, length), generator=gen)
