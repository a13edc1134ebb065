"""VQAv2: a questions file (``questions[]``) plus an annotations file (``annotations[]`` with ten ``answers``).

Images are ``data.image_template`` (default ``COCO_{split}_{image_id:012d}.jpg``, where ``split`` is the
questions file's ``data_subtype``, e.g. ``train2014``) under the image root. All ten answers are kept for
the soft accuracy; the target is the most common one (:func:`chameleon_ft.tasks.vqa.most_common_answer`).
"""

from __future__ import annotations

from dataclasses import replace

import datasets

from chameleon_ft.data.errors import BadSampleError, DataConfigError, DataFormatError
from chameleon_ft.data.formats import (
    Format,
    RowContext,
    SplitInputs,
    _expand,
    dataset_from_generator,
    register_format,
)
from chameleon_ft.data.jsonfile import file_stamp, load_json

DEFAULT_IMAGE_TEMPLATE = "COCO_{split}_{image_id:012d}.jpg"
ANNOTATION_KEYS = {"train": "annotations_path", "val": "val_annotations_path", "test": "test_annotations_path"}
_RAW = datasets.Features({
    "_row": datasets.Value("int64"), "question_id": datasets.Value("string"), "image_id": datasets.Value("int64"),
    "question": datasets.Value("string"), "answers": datasets.List(datasets.Value("string")),
    "split": datasets.Value("string"), "multiple_choice_answer": datasets.Value("string"),
    "answer_type": datasets.Value("string"), "question_type": datasets.Value("string"),
})


def vqav2_rows(questions: str, annotations: str, q_stamp: str, a_stamp: str):
    """Raw rows: one per question, joined with its annotation."""
    del q_stamp, a_stamp
    q = load_json(questions)
    a = load_json(annotations)
    if not isinstance(q, dict) or not isinstance(q.get("questions"), list):
        raise DataFormatError(f"{questions}: expected a VQAv2 questions file with a 'questions' list")
    if not isinstance(a, dict) or not isinstance(a.get("annotations"), list):
        raise DataFormatError(f"{annotations}: expected a VQAv2 annotations file with an 'annotations' list")
    by_qid = {x.get("question_id"): x for x in a["annotations"] if isinstance(x, dict)}
    subtype = q.get("data_subtype") or a.get("data_subtype") or ""
    for i, item in enumerate(q["questions"]):
        item = item if isinstance(item, dict) else {}
        ann = by_qid.get(item.get("question_id"))
        answers = None
        if ann is not None and isinstance(ann.get("answers"), list):
            answers = [str(x.get("answer", "")) if isinstance(x, dict) else str(x) for x in ann["answers"]]
        yield {"_row": i, "question_id": str(item.get("question_id")), "image_id": item.get("image_id"),
               "question": item.get("question") if isinstance(item.get("question"), str) else None,
               "answers": answers, "split": subtype,
               "multiple_choice_answer": (ann or {}).get("multiple_choice_answer"),
               "answer_type": (ann or {}).get("answer_type"), "question_type": (ann or {}).get("question_type")}


@register_format
class VQAv2Format(Format):
    name = "vqav2"
    description = "VQAv2: data.path = questions JSON, data.annotations_path = annotations JSON, data.image_root"
    tasks = ("vqa",)

    def split_inputs(self, cfg, split: str) -> SplitInputs:
        base = super().split_inputs(cfg, split)
        key = ANNOTATION_KEYS["train" if base.holdout else split]
        ann = getattr(cfg, key)
        if ann is None:
            raise DataConfigError(f"data.format=vqav2: set the answers file for split {split!r} (data.{key})")
        return SplitInputs({"path": base.files["path"], "annotations": _expand(ann)}, base.holdout)

    def raw(self, cfg, split: str, inputs: SplitInputs, task: str):
        q, a = inputs.files["path"], inputs.files["annotations"]
        return dataset_from_generator(vqav2_rows, {"questions": q, "annotations": a, "q_stamp": file_stamp(q),
                                                   "a_stamp": file_stamp(a)}, _RAW, cfg.cache_dir)

    def context(self, cfg, split: str, inputs: SplitInputs) -> RowContext:
        ctx = super().context(cfg, split, inputs)
        extra = {"annotations": inputs.files["annotations"],
                 "image_template": cfg.image_template or DEFAULT_IMAGE_TEMPLATE}
        return replace(ctx, extra=extra)

    def fields(self, row: dict, ctx: RowContext) -> dict:
        file, index = ctx.file, int(row["_row"])
        if row["question"] is None or row["image_id"] is None:
            raise BadSampleError(file, index, "missing_field", "question entry lacks question or image_id")
        if not row["answers"] or not any(a.strip() for a in row["answers"]):
            raise BadSampleError(file, index, "missing_field",
                                 f"no answers for question_id {row['question_id']} in {ctx.extra['annotations']}")
        template = ctx.extra["image_template"]
        try:
            name = template.format(split=row["split"], image_id=row["image_id"])
        except (KeyError, IndexError, ValueError) as e:
            raise DataConfigError(f"data.image_template={template!r} is invalid: {e}") from None
        return {"image": ctx.resolve_image(name, index), "question": row["question"],
                "answers": list(row["answers"]), "multiple_choice_answer": row["multiple_choice_answer"],
                "_meta": {"question_id": row["question_id"], "image_id": row["image_id"],
                          "multiple_choice_answer": row["multiple_choice_answer"], "answer_type": row["answer_type"],
                          "question_type": row["question_type"]}}
