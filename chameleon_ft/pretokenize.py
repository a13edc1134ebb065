"""``python -m chameleon_ft.pretokenize recipe=NAME [overrides]``: build the pre-tokenization cache.

Takes the same config and overrides as training; VQ-encodes every image of the train, val and (when it
exists) test splits once, batched on the GPU when there is one. Resumable after a kill, and idempotent:
a finished cache is reused as long as the data config, tokenizer and VQ weights are unchanged.
"""

from __future__ import annotations


def pretokenize(cfg, splits=("train", "val", "test")) -> dict[str, int]:
    """Tokenize ``splits`` of ``cfg.data`` into the cache; returns the sample count per split built."""
    from chameleon_ft.data.errors import DataConfigError
    from chameleon_ft.data.pipeline import tokenized_split
    from chameleon_ft.training.train import resolve_model_path

    checkpoint = resolve_model_path(cfg.model)
    counts = {}
    for split in splits:
        try:
            counts[split] = len(tokenized_split(cfg.data, checkpoint, split))
        except DataConfigError as e:
            if split == "train":
                raise
            print(f"{split}: skipped ({e})")
    for split, n in counts.items():
        print(f"{split}: {n} samples cached")
    return counts


def main() -> None:
    from chameleon_ft.config.store import run_with_config

    run_with_config(pretokenize)


if __name__ == "__main__":
    main()
