"""Typed config schema. YAML files in ``conf/`` and ``recipes/`` only choose and override these.

Every group is a dataclass registered with Hydra's ConfigStore, so a mistyped key or a wrong type fails
while the config is composed -- before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from chameleon_ft.data.config import DataConfig
from chameleon_ft.model.attention import DEFAULT_ATTN_IMPLEMENTATION


@dataclass
class ModelConfig:
    """Which base checkpoint, and the fine-tuning options of the model."""

    # Local Hugging Face-format directory. None: the embedded tiny checkpoint (built on first use).
    path: Optional[str] = None
    tiny_layout: str = "grouped"  # layout of the embedded tiny checkpoint: grouped | expanded
    dtype: str = "auto"  # auto: bf16 frozen base on GPU, fp32 on CPU | float32 | bfloat16
    mask_image_logits: bool = True  # stock Chameleon behaviour; must be False to learn image tokens
    z_loss_weight: float = 0.0
    dropout: float = 0.0
    loss_chunk_size: int = 1024
    # auto | sdpa | sdpa_documents | flash_attention_2 | flex_attention | eager (chameleon_ft.model.attention).
    # With data.packing, every implementation but sdpa takes packed samples without a T x T mask.
    attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION
    activation_checkpointing: bool = False
    # Lumina-mGPT zeroed the image-token rows of lm_head before training (released weights can't draw).
    zero_image_lm_head: bool = False


@dataclass
class PeftConfig:
    """LoRA (PEFT) or full fine-tuning; optional Anole-style training of image-token rows."""

    method: str = "lora"  # lora | none (full fine-tuning)
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Preset (attention | all_linear) or an explicit list of module names.
    target_modules: Any = "attention"
    modules_to_save: list[str] = field(default_factory=list)
    # Train only the image-token rows of lm_head and embed_tokens (beside or instead of LoRA).
    train_image_rows: bool = False


@dataclass
class OptimConfig:
    """AdamW, warmup then cosine/constant, clipping."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    # Norms and biases never decay; LoRA-B optionally too.
    no_decay_lora_b: bool = False
    scheduler: str = "cosine"  # cosine | constant
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class TrainerConfig:
    """Lightning ``Trainer`` arguments (``trainer.max_steps=N``, ``trainer.devices=N``, ...)."""

    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    precision: Optional[str] = None  # None: bf16-true base on GPU, 32-true on CPU
    max_steps: int = 200
    max_epochs: Optional[int] = None
    accumulate_grad_batches: int = 1
    val_check_interval: Optional[Any] = None
    check_val_every_n_epoch: Optional[int] = None
    limit_val_batches: Optional[Any] = None
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    num_sanity_val_steps: int = 0
    deterministic: bool = False
    # A NaN/inf loss or gradient norm stops the run; up to this many such steps are skipped instead.
    skip_nonfinite_steps: int = 0
    # Warn (once) when every trainable gradient is exactly 0 for this many optimizer steps in a row; 0: never.
    zero_grad_warn_steps: int = 3


@dataclass
class StrategyConfig:
    """auto | single | ddp | fsdp (FSDP2 through Lightning's ModelParallelStrategy)."""

    name: str = "auto"
    data_parallel_size: Any = "auto"
    process_group_backend: Optional[str] = None  # None: nccl on GPU, gloo on CPU


@dataclass
class CheckpointConfig:
    every_n_steps: int = 100
    keep_last: int = 2
    export_adapter_each: bool = False  # also export adapter/ at every checkpoint


@dataclass
class LoggerConfig:
    tensorboard: bool = True
    csv: bool = True
    wandb: bool = False
    wandb_project: str = "chameleon-ft"


@dataclass
class EvalConfig:
    """Generation-based validation metrics (VQA accuracy, captioning BLEU/CIDEr, image content, image samples)."""

    max_new_tokens: int = 8
    max_samples: Optional[int] = None
    image_samples: int = 4  # text-to-image: decoded sample grid size per validation
    cfg_scale: float = 3.0
    # text-to-image validation draws: top-k over the image codes and temperature (as generate's image_top_k
    # and image_temperature). Lumina-mGPT's 2000 keeps every code of a small codebook.
    image_top_k: int = 2000
    image_temperature: float = 1.0
    # official: exactly GT-Vision-Lab's vqaEval.py (comparable with published numbers); always: normalise
    # every answer and prediction (not comparable).
    vqa_normalization: str = "official"
    # Caption tokenization before BLEU/CIDEr: auto (coco-caption's own PTB tokenizer when java is on PATH,
    # else our Java-free equal) | ptb-java | ptb-python.
    caption_tokenizer: str = "auto"
    # text-to-image: a local CLIP directory (transformers CLIPModel + CLIPProcessor); adds val/clip_score.
    clip_model: Optional[str] = None


@dataclass
class ExperimentConfig:
    """The whole run: a model, a data set, an adapter, an optimiser, a trainer."""

    task: str = "vqa"  # a registered task (chameleon_ft.tasks): captioning | vqa | text_to_image | chat | ...
    seed: int = 0
    resume: str = "none"  # none | auto | <checkpoint path>
    # Keys (or groups) a resume may change although they define the run, e.g. [optim.lr, data]; every
    # resume and what it changed is recorded in <run dir>/resumes.jsonl.
    resume_allow: list[str] = field(default_factory=list)
    # The metric the run returns to sweepers and reports as its best; None: the task's own (e.g. val/acc).
    monitor: Optional[str] = None
    monitor_mode: Optional[str] = None  # max | min; None: the task's
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
