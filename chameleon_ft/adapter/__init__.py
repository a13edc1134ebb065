"""What trains beside (or instead of) the frozen base, and how it is saved, merged and loaded again.

- LoRA on the decoder's linear layers (PEFT ``LoraConfig``);
- Anole-style training of the image-token rows of ``lm_head`` and ``embed_tokens`` (PEFT's trainable
  tokens: a ``[n_image_tokens, hidden]`` delta per matrix instead of unfreezing 65,536 x 4,096 of each);
- full fine-tuning (everything trains; nothing here applies).

Training attaches adapters with :func:`attach_adapters`; export writes a stock PEFT directory with the
run's data settings beside it (:func:`export_adapter`, :class:`SampleSettings`); the merge reads the
weights as base-weight updates (:func:`read_adapter`, :func:`weight_updates`); evaluation and generation
load an adapter onto a model with :func:`load_adapter`. One module, one home for each of these.
"""

from chameleon_ft.adapter.attach import (
    TARGET_PRESETS,
    attach_adapters,
    base_model,
    base_weight_name,
    clean_name,
    reset_token_deltas_,
    resolve_target_modules,
    zero_image_lm_head_,
)
from chameleon_ft.adapter.files import (
    SETTINGS_FILE,
    AdapterFiles,
    SampleSettings,
    export_adapter,
    load_adapter,
    read_adapter,
    weight_updates,
)

__all__ = [
    "SETTINGS_FILE", "TARGET_PRESETS", "AdapterFiles", "SampleSettings", "attach_adapters", "base_model",
    "base_weight_name", "clean_name", "export_adapter", "load_adapter", "read_adapter", "reset_token_deltas_",
    "resolve_target_modules", "weight_updates", "zero_image_lm_head_",
]
