"""The grouped-qk-norm Chameleon, built from transformers' Chameleon classes.

Differences from stock ``ChameleonForConditionalGeneration``:
- q/k LayerNorm affine is ``[model_parallel_size, head_dim]`` (:class:`GroupedQKNorm`);
- image-token logit masking is a config switch (``mask_image_logits``), off for text-to-image;
- residual dropout after attention and MLP (``config.dropout``; Lumina-mGPT uses 0.05);
- the loss is fused with the LM head and chunked (:func:`fused_lm_loss`), with z-loss;
- no VQ model inside: image tokenization lives in :mod:`chameleon_ft.vq` and runs before training.
State-dict keys equal stock ones, so PEFT adapters trained here load onto stock transformers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers import ChameleonConfig
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.chameleon.modeling_chameleon import (
    ChameleonDecoderLayer,
    ChameleonForConditionalGeneration,
    ChameleonImageVocabularyMapping,
    ChameleonModel,
    ChameleonPreTrainedModel,
    ChameleonRMSNorm,
    ChameleonRotaryEmbedding,
)

from chameleon_ft.model.attention import attention_kwargs
from chameleon_ft.model.loss import LossSums, fused_lm_loss
from chameleon_ft.model.qk_norm import GroupedQKNorm

# Extra config keys (Lumina-mGPT's config carries the same names) and their defaults.
FT_CONFIG_DEFAULTS = {"mask_image_logits": True, "z_loss_weight": 0.0, "dropout": 0.0, "loss_chunk_size": 1024}


def ft_option(config: ChameleonConfig, key: str):
    """Read one of the fine-tuning options from ``config`` with its default."""
    value = getattr(config, key, None)
    return FT_CONFIG_DEFAULTS[key] if value is None else value


@contextlib.contextmanager
def image_logits_unmasked(model):
    """Temporarily turn off the image-token logit masking (to generate or score image tokens)."""
    old = getattr(model.config, "mask_image_logits", None)
    model.config.mask_image_logits = False
    try:
        yield model
    finally:
        model.config.mask_image_logits = old


def output_weight(head: nn.Module) -> torch.Tensor:
    """The matrix ``head`` (the LM head) multiplies by, adapters included.

    The fused loss multiplies by the weight itself instead of calling the module. PEFT's trainable-token
    layer applies its replacement rows only inside ``forward``, so its ``weight`` is the base one; ask it
    for the merged weight instead.
    """
    merged = getattr(head, "get_merged_weights", None)
    if callable(merged) and not getattr(head, "merged", False) and not getattr(head, "disable_adapters", False):
        return merged(head.active_adapters)
    return head.weight


class ChameleonFTDecoderLayer(ChameleonDecoderLayer):
    """Chameleon decoder layer with grouped q/k norm and residual dropout.

    ``config.swin_norm`` selects 34B's order (norm after attention/MLP) over 7B's pre-norm.
    """

    def __init__(self, config: ChameleonConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        attn = self.self_attn
        groups = config.model_parallel_size or 1
        attn.q_norm = GroupedQKNorm(attn.num_heads, groups, attn.head_dim)
        attn.k_norm = GroupedQKNorm(attn.num_key_value_heads, groups, attn.head_dim)
        self.swin_norm = bool(config.swin_norm)
        self.resid_dropout = nn.Dropout(float(ft_option(config, "dropout")))

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                use_cache=False, position_embeddings=None, **kwargs):
        # transformers >= 5.24 names the KV cache ``cache`` (``past_key_values`` is deprecated there).
        kwargs.pop("output_attentions", None)
        residual = hidden_states
        if not self.swin_norm:
            hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        if self.swin_norm:
            hidden_states = self.input_layernorm(hidden_states)
        hidden_states = residual + self.resid_dropout(hidden_states)

        residual = hidden_states
        if self.swin_norm:
            hidden_states = self.post_attention_layernorm(self.mlp(hidden_states))
        else:
            hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states = residual + self.resid_dropout(hidden_states)
        return (hidden_states,)


class ChameleonFTModel(ChameleonModel):
    """Chameleon decoder stack with :class:`ChameleonFTDecoderLayer` and no VQ model."""

    _no_split_modules = ["ChameleonFTDecoderLayer"]

    def __init__(self, config: ChameleonConfig):
        # Build the modules directly (not via ChameleonModel.__init__) so stock layers and the VQ
        # model are never allocated: at 7B that would be a second full copy of the decoder.
        ChameleonPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.vocabulary_mapping = ChameleonImageVocabularyMapping(config.vocabulary_map or {})
        self.layers = nn.ModuleList(
            [ChameleonFTDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = ChameleonRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = ChameleonRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


@dataclass
class ChameleonFTOutput(CausalLMOutputWithPast):
    """``loss`` is the mean over this batch's target tokens; the sums allow global normalisation."""

    loss_sums: LossSums | None = None


class ChameleonFTForCausalLM(ChameleonForConditionalGeneration):
    """Grouped-qk-norm Chameleon LM with fused chunked loss, z-loss and optional logit masking."""

    _no_split_modules = ["ChameleonFTDecoderLayer"]

    def __init__(self, config: ChameleonConfig):
        ChameleonPreTrainedModel.__init__(self, config)
        self.model = ChameleonFTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, GroupedQKNorm):
            with torch.no_grad():
                module.weight.fill_(1.0)
                module.bias.zero_()

    @property
    def image_token_ids(self) -> torch.Tensor:
        return torch.tensor(self.model.vocabulary_mapping.image_tokens, dtype=torch.long)

    def _masked_ids(self, device) -> torch.Tensor | None:
        if not ft_option(self.config, "mask_image_logits"):
            return None
        ids = getattr(self, "_masked_ids_cache", None)
        if ids is None or ids.device != device:
            ids = self.image_token_ids.to(device)
            self._masked_ids_cache = ids
        return ids

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool | None = None,
        **kwargs,
    ) -> ChameleonFTOutput:
        """Causal-LM forward. With ``labels``, logits are only computed if ``return_logits``.

        ``cache`` is the KV cache (transformers' current name; a caller's ``past_key_values`` reaches the stock
        model's own deprecation shim through ``kwargs``).

        A ``[1, N]`` row of packed documents (position ids restarting at each, no ``attention_mask``)
        gets its document boundaries in the form the attention implementation reads
        (:mod:`chameleon_ft.model.attention`).
        """
        kwargs.pop("pixel_values", None)
        if labels is not None and use_cache is None:
            use_cache = False  # training never reads a KV cache; building one costs memory and hides packing
        kv_cache = cache if cache is not None else kwargs.get("past_key_values")
        kwargs.update(attention_kwargs(self.config._attn_implementation, position_ids, attention_mask, kv_cache,
                                       kwargs))
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs[0]
        masked = self._masked_ids(hidden.device)
        loss, sums = None, None
        if labels is not None:
            sums = fused_lm_loss(
                hidden,
                output_weight(self.lm_head),
                labels,
                z_loss_weight=float(ft_option(self.config, "z_loss_weight")),
                chunk_size=int(ft_option(self.config, "loss_chunk_size")),
                masked_ids=masked,
            )
            loss = sums.loss_sum / sums.n_tokens.clamp(min=1)
        logits = None
        if labels is None or return_logits:
            if isinstance(logits_to_keep, int) and logits_to_keep > 0:
                hidden = hidden[:, -logits_to_keep:]
            elif isinstance(logits_to_keep, torch.Tensor):
                hidden = hidden[:, logits_to_keep]
            logits = self.lm_head(hidden)
            if masked is not None:
                logits[:, :, masked] = torch.finfo(logits.dtype).min
        return ChameleonFTOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            loss_sums=sums,
        )
