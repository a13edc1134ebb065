"""``chameleon-ft-pretokenize recipe=NAME [key=value ...]`` (or ``python -m chameleon_ft.pretokenize``): build
the pre-tokenization cache.

Takes the same config and overrides as training; VQ-encodes every image of the train, val and (when it
exists) test splits once, batched on the GPU when there is one. Resumable after a kill, and idempotent:
a finished cache is reused as long as the data config, tokenizer and VQ weights are unchanged.
"""

from __future__ import annotations

from chameleon_ft.cli import Command
from chameleon_ft.cli import main as run_command


def pretokenize(cfg, splits=("train", "val", "test")) -> dict[str, int]:
    """Tokenize ``splits`` of ``cfg.data`` into the cache; returns the sample count per split built."""
    from chameleon_ft.data.errors import DataConfigError
    from chameleon_ft.data.pipeline import cache_summary, tokenized_split
    from chameleon_ft.tiny import resolve_checkpoint

    assets = resolve_checkpoint(cfg.model.path, cfg.model.tiny_layout)
    counts = {}
    for split in splits:
        try:
            counts[split] = len(tokenized_split(cfg.data, assets, split))
        except DataConfigError as e:
            if split == "train":
                raise
            print(f"{split}: skipped ({e})")
    for split, n in counts.items():
        quality = cache_summary(cfg.data, assets, split).get("vq_reconstruction")
        psnr = f"; VQ reconstruction {quality['psnr']:.1f} dB PSNR" if quality else ""
        print(f"{split}: {n} samples cached{psnr}")
    return counts


PRETOKENIZE = Command(prog="chameleon-ft-pretokenize", module="chameleon_ft.pretokenize", config_name="config",
                      run=pretokenize,
                      summary="VQ-encode and tokenize a recipe's data once, into the pre-tokenization cache.")


def main() -> None:
    run_command(PRETOKENIZE)


if __name__ == "__main__":
    main()
