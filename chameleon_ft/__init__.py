"""chameleon-ft: fine-tuning toolkit for Chameleon (grouped-qk-norm / Lumina-mGPT variant)."""

__version__ = "0.1.0"
