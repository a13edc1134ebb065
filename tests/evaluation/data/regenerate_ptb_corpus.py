"""Rewrite the expected outputs in ptb_corpus.json from the real Stanford jar (needs `java` on PATH).

    python tests/evaluation/data/regenerate_ptb_corpus.py

The captions are the corpus; the jar's output for them, read as one file like one coco-caption call, is what
the Java-free tokenizer must reproduce.
"""

import json
from pathlib import Path

from chameleon_ft.evaluation.coco_tokenizer import coco_tokenize, ptb_lines

CORPUS = Path(__file__).with_name("ptb_corpus.json")


def main() -> None:
    data = json.loads(CORPUS.read_text(encoding="utf-8"))
    captions = data["captions"]
    data["jar_ptb_lines"] = ptb_lines([captions], tokenizer="ptb-java")[0]
    data["jar_coco"] = coco_tokenize([captions], tokenizer="ptb-java")[0]
    CORPUS.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{len(captions)} captions -> {CORPUS}")


if __name__ == "__main__":
    main()
