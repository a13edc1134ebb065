"""Readers: every supported input format -> a ``datasets.Dataset`` of canonical records (:mod:`.sample`).

Entry point: :func:`read_conversations`. Each format is loaded into a *raw* dataset with one row per input
record and its original position ``_row``, then converted with ``Dataset.map``; every error names the
input file, the record index and a reason (:class:`~chameleon_ft.data.errors.BadSampleError`), and the
:class:`~chameleon_ft.data.errors.BadSamplePolicy` raises it or counts and drops the sample.

Formats (``data.name``) and their conventions:

- ``llava``: LLaVA/ShareGPT JSON (a list) or JSON lines. ``conversations`` is a list of
  ``{"from": human|gpt|system (or user|assistant), "value": str}``; ``image`` is a path or a list of paths
  relative to ``image_root``. The number of ``<image>`` markers must equal the number of images; the one
  exception is LLaVA's own convention: a *single* image and *no* marker puts the image at the start of the
  first user turn.
- ``lumina``: Lumina-mGPT JSON: the same shape with ``<|image|>`` markers; images may sit in assistant turns
  (they are then learned). With no marker at all, every image goes to the start of the first user turn;
  otherwise the marker count must equal ``len(image)``.
- ``coco_captions``: a COCO captions annotation file (``images[]``, ``annotations[]`` with ``image_id`` and
  ``caption``) plus the image directory. One sample per entry of ``images[]`` (in file order); the target
  is the image's first caption in the annotation file's order, and all captions are kept in
  ``meta["references"]`` for BLEU/CIDEr.
- ``vqav2``: VQAv2 questions file (``questions[]``) + annotations file (``annotations[]`` with ten
  ``answers``). Images are ``image_template`` (default ``COCO_{split}_{image_id:012d}.jpg``, where
  ``split`` is the questions file's ``data_subtype``, e.g. ``train2014``) under ``image_root``. All ten
  answers go to ``meta["answers"]``; the target is :func:`most_common_answer`.
- ``jsonl``: one JSON object per line: ``{image, caption}`` (captioning), ``{image, question, answer}``
  (vqa, optional ``answers`` list), ``{prompt, image}`` (text_to_image, the image in the assistant turn),
  or ``{conversations, image}`` (chat, as ``llava``). ``data.task`` selects the task; ``auto`` infers it
  per record from the keys. ``data.columns`` renames fields.
- ``hf_dataset``: any local ``datasets`` data: a ``save_to_disk`` directory (Dataset or DatasetDict),
  parquet/json/csv/arrow files, or an image folder (with ``metadata.jsonl``). Fields as for ``jsonl``,
  through ``data.columns``; an ``Image`` column is kept as encoded bytes (or its file path).
- ``digits_*``: the bundled scikit-learn digits (:mod:`.digits`).

JSON and JSON-lines files of the ``llava``/``lumina``/``jsonl`` formats are parsed here rather than by
``load_dataset("json")``: real files mix types between records (``image`` a string in one record and a
list in the next, ``id`` int or str), which Arrow's schema inference rejects for the whole file, and
non-UTF-8 bytes must be reported per record.

Splits: ``train`` reads ``path``, ``val`` ``val_path``, ``test`` ``test_path``. Without a val source and
with ``val_fraction > 0``, a fixed fraction of train is held out (:func:`holdout_indices`) and removed
from train.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
from PIL import Image, UnidentifiedImageError

from chameleon_ft.data.config import canonical_split, check_data_config
from chameleon_ft.data.errors import BadSampleError, BadSamplePolicy, DataConfigError, DataFormatError
from chameleon_ft.data.sample import (
    RECORD_FEATURES, Conversation, ImageRef, Segment, Turn, captioning_conversation,
    text_to_image_conversation, validate_conversation, vqa_conversation,
)

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "model": "assistant", "system": "system"}
DEFAULT_MARKERS = {"llava": "<image>", "hf_dataset": "<image>", "jsonl": "<image>", "lumina": "<|image|>"}
DEFAULT_VQAV2_TEMPLATE = "COCO_{split}_{image_id:012d}.jpg"
FIELDS = ("image", "images", "caption", "references", "question", "answer", "answers", "prompt", "conversations")
_MARK = object()  # an image position inside a message, after splitting on the marker

_OUT_FEATURES = datasets.Features({**RECORD_FEATURES, "_error": datasets.Value("string")})


# --- images ---------------------------------------------------------------------------------------------
def open_image(src: str | bytes | os.PathLike, file: str = "<memory>", index: int = -1) -> Image.Image:
    """Open and fully decode an image (``img.load()``), so truncated or corrupt files fail here.

    Raises :class:`BadSampleError` ``missing_image`` or ``bad_image`` naming ``file`` and ``index``. The
    mode is left as is; conversion to RGB on white is :func:`chameleon_ft.vq.preprocess.to_rgb_on_white`.
    """
    what = "in-memory image" if isinstance(src, (bytes, bytearray)) else str(src)
    try:
        img = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)
        img.load()
    except FileNotFoundError:
        raise BadSampleError(file, index, "missing_image", f"{what} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadSampleError(file, index, "bad_image", f"{what}: {type(e).__name__}: {e}") from None
    return img


def _resolve_image(value: Any, root: str, file: str, index: int) -> ImageRef:
    """A path (relative to ``root``), or a datasets Image dict ``{"bytes", "path"}``, checked to exist."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return ImageRef(data=bytes(value["bytes"]))
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)) and value:
        return ImageRef(data=bytes(value))
    if not isinstance(value, str) or not value.strip():
        raise BadSampleError(file, index, "bad_record", f"image must be a non-empty path, got {value!r}")
    path = os.path.expanduser(value)
    if not os.path.isabs(path):
        path = os.path.join(root, path)
    if not os.path.isfile(path):
        raise BadSampleError(file, index, "missing_image", f"{path} does not exist (image_root={root})")
    return ImageRef(path=path)


def _image_list(value: Any, file: str, index: int) -> list:
    if value is None:
        return []
    if isinstance(value, (str, dict, bytes)):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if v is not None]
    raise BadSampleError(file, index, "bad_record",
                         f"image must be a path or a list of paths, got {type(value).__name__}")


# --- chat (llava / lumina / chat columns) ----------------------------------------------------------------
def _pieces(content: Any, marker: str, file: str, index: int, turn: int) -> list:
    """A message's content as text pieces and ``_MARK`` image positions."""
    if content is None:
        return []
    if isinstance(content, str):
        out: list = []
        for k, part in enumerate(content.split(marker)):
            if k:
                out.append(_MARK)
            out.append(part)
        return out
    if isinstance(content, list):  # OpenAI/HF style parts: {"type": "text", "text": ...} / {"type": "image"}
        out = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                out += _pieces(part.get("text") or "", marker, file, index, turn)
            elif kind == "image":
                out.append(_MARK)
            else:
                raise BadSampleError(file, index, "bad_record",
                                     f"turn {turn}: content part {part!r} is not text or image")
        return out
    raise BadSampleError(file, index, "bad_record",
                         f"turn {turn}: content must be a string, got {type(content).__name__}")


def _segments(pieces: list, images: list[ImageRef]) -> list[Segment]:
    """Text pieces and image marks -> segments. Whitespace that only separated a marker from the text is
    dropped (an image has its own begin/end tokens); other text is kept verbatim."""
    segs: list[Segment] = []
    for k, p in enumerate(pieces):
        if p is _MARK:
            segs.append(Segment(image=images.pop(0)))
            continue
        if k > 0 and pieces[k - 1] is _MARK:
            p = p.lstrip()
        if k + 1 < len(pieces) and pieces[k + 1] is _MARK:
            p = p.rstrip()
        if p:
            segs.append(Segment.of_text(p))
    return segs


def chat_conversation(messages: Any, images: list, *, marker: str, root: str, file: str, index: int,
                      unmarked: str = "single", task: str = "chat", meta: dict | None = None) -> Conversation:
    """Build a conversation from ``[{"from"|"role": ..., "value"|"content": ...}]`` and image paths.

    ``unmarked`` says where images go when the text has no marker: ``"single"`` (LLaVA: only one image
    allowed, at the start of the first user turn) or ``"all"`` (Lumina: all of them there).
    """
    if not isinstance(messages, list):
        raise BadSampleError(file, index, "missing_field" if messages is None else "bad_record",
                             "conversations must be a list of turns")
    if not messages:
        raise BadSampleError(file, index, "empty_conversation", "conversations is empty")
    roles, contents = [], []
    for t, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadSampleError(file, index, "bad_record", f"turn {t} is not an object")
        raw_role = m.get("from", m.get("role"))
        role = ROLE_ALIASES.get(str(raw_role).strip().lower()) if raw_role is not None else None
        if role is None:
            raise BadSampleError(file, index, "unknown_role",
                                 f"turn {t} has role {raw_role!r}; expected one of {sorted(ROLE_ALIASES)}")
        roles.append(role)
        contents.append(_pieces(m.get("value", m.get("content")), marker, file, index, t))
    refs = [_resolve_image(v, root, file, index) for v in _image_list(images, file, index)]
    n_marks = sum(p is _MARK for c in contents for p in c)
    if n_marks == 0 and refs and (unmarked == "all" or len(refs) == 1):
        first = roles.index("user") if "user" in roles else 0
        contents[first] = [_MARK] * len(refs) + contents[first]
    elif n_marks != len(refs):
        raise BadSampleError(file, index, "placeholder_count",
                             f"{n_marks} {marker} markers but {len(refs)} images")
    turns = [Turn(r, _segments(c, refs)) for r, c in zip(roles, contents, strict=True)]
    return Conversation(turns, task, dict(meta or {}), file, index)


# --- single-image tasks from fields (jsonl / hf_dataset) -------------------------------------------------
def _text_field(rec: dict, key: str, file: str, index: int, required: bool = True) -> str | None:
    v = rec.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        if required:
            raise BadSampleError(file, index, "missing_field", f"field {key!r} is missing or empty")
        return None
    if not isinstance(v, str):
        raise BadSampleError(file, index, "bad_record", f"field {key!r} must be a string, got {type(v).__name__}")
    return v


def infer_task(rec: dict) -> str | None:
    """The task a flat record describes by its keys (canonical field names), or None."""
    if rec.get("conversations") is not None:
        return "chat"
    if rec.get("question") is not None:
        return "vqa"
    if rec.get("caption") is not None:
        return "captioning"
    if rec.get("prompt") is not None:
        return "text_to_image"
    return None


def fields_conversation(rec: dict, opts: dict, file: str, index: int) -> Conversation:
    """A flat record with canonical field names (after ``data.columns``) -> conversation of its task."""
    task = opts["task"] if opts["task"] != "auto" else infer_task(rec)
    if task is None:
        raise BadSampleError(file, index, "missing_field",
                             f"cannot tell the task: none of conversations/question/caption/prompt in {sorted(rec)}")
    root = opts["image_root"]
    if task == "chat":
        imgs = rec.get("images") if rec.get("images") is not None else rec.get("image")
        return chat_conversation(rec.get("conversations"), imgs, marker=opts["marker"], root=root, file=file,
                                 index=index, unmarked=opts["unmarked"])
    if rec.get("image") is None:
        raise BadSampleError(file, index, "text_only", f"task {task} needs an image; the record has none")
    image = _resolve_image(rec["image"], root, file, index)
    meta = {k: rec[k] for k in ("id",) if isinstance(rec.get(k), (str, int))}
    if task == "captioning":
        caption = _text_field(rec, "caption", file, index)
        refs = rec.get("references")
        if isinstance(refs, list) and all(isinstance(r, str) for r in refs) and refs:
            meta["references"] = refs
        return captioning_conversation(image, caption, prompt=opts["prompt_template"], meta=meta, source=file,
                                       index=index)
    if task == "vqa":
        question = _text_field(rec, "question", file, index)
        answers = rec.get("answers")
        if isinstance(answers, list):  # plain strings, or VQAv2-style {"answer": ...}
            answers = [a.get("answer") if isinstance(a, dict) else a for a in answers]
        else:
            answers = None
        answer = _text_field(rec, "answer", file, index, required=not answers)
        if answer is None:
            answer = most_common_answer(answers)
        meta["answers"] = answers or [answer]
        return vqa_conversation(image, question, answer, template=opts["prompt_template"], meta=meta,
                                source=file, index=index)
    if task == "text_to_image":
        prompt = _text_field(rec, "prompt", file, index)
        size = opts["image_size"]
        return text_to_image_conversation(prompt, image, width=size, height=size, template=opts["prompt_template"],
                                          meta=meta, source=file, index=index)
    raise DataConfigError(f"task {task!r} is not supported for flat records")


def most_common_answer(answers: list[str], preferred: str | None = None) -> str:
    """The most frequent answer. Ties: ``preferred`` (VQAv2's ``multiple_choice_answer``) if it is among
    the tied answers, else the tied answer that appears first in ``answers``. Answers are compared as
    given, after stripping surrounding whitespace."""
    answers = [a.strip() for a in answers if isinstance(a, str) and a.strip()]
    if not answers:
        raise ValueError("no answers")
    counts = Counter(answers)
    top = max(counts.values())
    tied = [a for a in dict.fromkeys(answers) if counts[a] == top]
    if preferred is not None and preferred.strip() in tied:
        return preferred.strip()
    return tied[0]


# --- raw loading ------------------------------------------------------------------------------------------
def _utf8_clean(obj: Any) -> bool:
    """True when every string in ``obj`` encodes to UTF-8 (lone surrogates mark undecodable bytes)."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _stamp(path: str) -> str:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataFormatError(f"{path}: file not found") from None
    return f"{st.st_size}-{st.st_mtime_ns}"


def _is_json_array(path: str) -> bool:
    """Whether ``path`` is one JSON document (a list, or a pretty-printed object) rather than JSON lines:
    ``.jsonl``/``.ndjson`` are lines; otherwise a file is lines when its first line parses on its own."""
    if path.endswith((".jsonl", ".ndjson")):
        return False
    with open(path, "rb") as f:
        first = f.readline().removeprefix(b"\xef\xbb\xbf").strip()
        while not first:
            line = f.readline()
            if not line:
                return False
            first = line.strip()
    if first.startswith(b"["):
        return True
    try:
        json.loads(first.decode("utf-8", errors="replace"))
        return False
    except json.JSONDecodeError:
        return True


def _bad(file: str, index: int, reason: str, detail: str) -> str:
    return json.dumps(BadSampleError(file, index, reason, detail).to_dict())


def _gen_json_records(path: str, stamp: str):
    """Rows ``{"_row", "raw" (the record as JSON), "_error"}`` from a JSON array or JSON-lines file."""
    del stamp  # only part of the cache fingerprint
    if _is_json_array(path):
        text = Path(path).read_bytes().decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(data, list):
            raise DataFormatError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        for i, rec in enumerate(data):
            if not _utf8_clean(rec):
                err = _bad(path, i, "non_utf8", "text contains bytes that are not UTF-8")
                yield {"_row": i, "raw": "", "_error": err}
            else:
                yield {"_row": i, "raw": json.dumps(rec, ensure_ascii=False), "_error": ""}
        return
    i = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")
            if not line.strip():
                continue
            err = ""
            try:
                rec = json.loads(line.decode("utf-8"))
                if not _utf8_clean(rec):
                    err = _bad(path, i, "non_utf8", f"line {lineno}: a \\u escape is not valid UTF-8 text")
            except UnicodeDecodeError as e:
                err = _bad(path, i, "non_utf8", f"line {lineno}: byte {e.start} is not UTF-8")
            except json.JSONDecodeError as e:
                err = _bad(path, i, "bad_json", f"line {lineno}: {e.msg} (column {e.colno})")
            yield {"_row": i, "raw": "" if err else json.dumps(rec, ensure_ascii=False), "_error": err}
            i += 1


def _load_json(path: str) -> Any:
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8").lstrip("\ufeff"))
    except FileNotFoundError:
        raise DataFormatError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not UTF-8 (byte offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}: not valid JSON: {e}") from None


def _gen_coco(path: str, stamp: str):
    del stamp
    data = _load_json(path)
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)):
        raise DataFormatError(f"{path}: expected a COCO captions file with 'images' and 'annotations' lists")
    caps: dict[Any, list[str]] = {}
    for a in data["annotations"]:
        if isinstance(a, dict) and isinstance(a.get("caption"), str):
            caps.setdefault(a.get("image_id"), []).append(a["caption"].strip())
    for i, im in enumerate(data["images"]):
        im = im if isinstance(im, dict) else {}
        yield {"_row": i, "image_id": str(im.get("id")), "file_name": im.get("file_name") or "",
               "captions": caps.get(im.get("id"), [])}


def _gen_vqav2(questions: str, annotations: str, q_stamp: str, a_stamp: str):
    del q_stamp, a_stamp
    q = _load_json(questions)
    a = _load_json(annotations)
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


_VQAV2_RAW = datasets.Features({
    "_row": datasets.Value("int64"), "question_id": datasets.Value("string"), "image_id": datasets.Value("int64"),
    "question": datasets.Value("string"), "answers": datasets.List(datasets.Value("string")),
    "split": datasets.Value("string"), "multiple_choice_answer": datasets.Value("string"),
    "answer_type": datasets.Value("string"), "question_type": datasets.Value("string"),
})
_COCO_RAW = datasets.Features({"_row": datasets.Value("int64"), "image_id": datasets.Value("string"),
                               "file_name": datasets.Value("string"),
                               "captions": datasets.List(datasets.Value("string"))})
_JSON_RAW = datasets.Features({"_row": datasets.Value("int64"), "raw": datasets.Value("string"),
                               "_error": datasets.Value("string")})


def _from_generator(gen, gen_kwargs: dict, features: datasets.Features, cache_dir: str | None) -> datasets.Dataset:
    """``Dataset.from_generator``, re-raising our own errors instead of datasets' generic wrapper."""
    try:
        return datasets.Dataset.from_generator(gen, gen_kwargs=gen_kwargs, features=features, cache_dir=cache_dir)
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, (DataFormatError, BadSampleError)):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def _hf_load(path: str, split: str, cache_dir: str | None, single_ok: bool):
    """A local datasets source -> its Dataset for ``split``, or None when it has no such split.

    A source with a single split (a plain Dataset, one data file) counts as ``split`` only if ``single_ok``.
    """
    p = Path(path)
    if p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
        ds = datasets.load_from_disk(str(p))
    elif p.is_dir():
        ds = datasets.load_dataset("imagefolder", data_dir=str(p), cache_dir=cache_dir)
    else:
        ext = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}
        builder = ext.get(p.suffix.lower())
        if builder is None:
            raise DataConfigError(f"{path}: an hf_dataset path must be a save_to_disk or image directory, or "
                                  f"{sorted(ext)} file(s)")
        if not glob.glob(path):
            raise DataFormatError(f"{path}: file not found")
        ds = datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir)
    if isinstance(ds, datasets.DatasetDict):
        names = {"train": ("train",), "val": ("validation", "val", "valid", "dev"), "test": ("test",)}[split]
        for n in names:
            if n in ds:
                return ds[n]
        return next(iter(ds.values())) if single_ok and len(ds) == 1 else None
    return ds if single_ok else None


def _hf_prepare(ds: datasets.Dataset) -> datasets.Dataset:
    """Keep images as bytes/paths (no decoding) and number the rows."""
    for name, feat in ds.features.items():
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feat, (datasets.List, datasets.Sequence, datasets.LargeList)) and isinstance(
                getattr(feat, "feature", None), datasets.Image):
            ds = ds.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return ds.add_column("_row", list(range(len(ds))))


# --- conversion -------------------------------------------------------------------------------------------
def _convert_one(row: dict, opts: dict) -> Conversation:
    kind, file, index = opts["kind"], opts["file"], int(row["_row"])
    if row.get("_error"):
        raise BadSampleError.from_dict(json.loads(row["_error"]))
    if kind in ("llava", "lumina", "jsonl"):
        rec = json.loads(row["raw"])
        if not isinstance(rec, dict):
            raise BadSampleError(file, index, "bad_record", f"record is a {type(rec).__name__}, not an object")
        if kind == "jsonl":
            rec = {f: rec.get(opts["columns"].get(f, f)) for f in FIELDS} | {"id": rec.get("id")}
            return fields_conversation(rec, opts, file, index)
        cols = opts["columns"]
        images = rec.get(cols.get("image", "image"))
        if images is None:
            images = rec.get(cols.get("images", "images"))
        meta = {"id": rec["id"]} if isinstance(rec.get("id"), (str, int)) else {}
        return chat_conversation(rec.get(cols.get("conversations", "conversations")), images, marker=opts["marker"],
                                 root=opts["image_root"], file=file, index=index, unmarked=opts["unmarked"],
                                 meta=meta)
    if kind == "hf_dataset":
        rec = {f: row.get(opts["columns"].get(f, f)) for f in FIELDS}
        return fields_conversation(rec, opts, file, index)
    if kind == "coco_captions":
        if not row["file_name"]:
            raise BadSampleError(file, index, "missing_field", "image entry has no file_name")
        if not row["captions"]:
            raise BadSampleError(file, index, "missing_field", f"image id {row['image_id']} has no caption")
        image = _resolve_image(row["file_name"], opts["image_root"], file, index)
        meta = {"references": list(row["captions"]), "image_id": row["image_id"]}
        return captioning_conversation(image, row["captions"][0], prompt=opts["prompt_template"], meta=meta,
                                       source=file, index=index)
    if kind == "vqav2":
        if row["question"] is None or row["image_id"] is None:
            raise BadSampleError(file, index, "missing_field", "question entry lacks question or image_id")
        if not row["answers"] or not any(a.strip() for a in row["answers"]):
            raise BadSampleError(file, index, "missing_field",
                                 f"no answers for question_id {row['question_id']} in {opts['annotations']}")
        try:
            name = opts["image_template"].format(split=row["split"], image_id=row["image_id"])
        except (KeyError, IndexError, ValueError) as e:
            raise DataConfigError(f"data.image_template={opts['image_template']!r} is invalid: {e}") from None
        image = _resolve_image(name, opts["image_root"], file, index)
        answer = most_common_answer(row["answers"], row["multiple_choice_answer"])
        meta = {"answers": list(row["answers"]), "question_id": row["question_id"], "image_id": row["image_id"],
                "multiple_choice_answer": row["multiple_choice_answer"], "answer_type": row["answer_type"],
                "question_type": row["question_type"]}
        return vqa_conversation(image, row["question"], answer, template=opts["prompt_template"], meta=meta,
                                source=file, index=index)
    raise DataConfigError(f"unknown data format {kind!r}")


def _convert_row(row: dict, opts: dict) -> dict:
    """datasets.map function: a raw row -> a canonical record plus ``_error`` (JSON of a BadSampleError)."""
    try:
        conv = validate_conversation(_convert_one(row, opts))
        if opts["task"] not in ("auto", conv.task):
            raise DataConfigError(f"data.task={opts['task']!r} but {opts['kind']} yields {conv.task!r} samples")
        return conv.to_record() | {"_error": ""}
    except BadSampleError as err:
        if not opts["skip"]:
            raise
        return {"turns": [], "task": "", "meta_json": "", "source": opts["file"], "index": int(row["_row"]),
                "_error": json.dumps(err.to_dict())}


def convert_raw(raw: datasets.Dataset, opts: dict, policy: BadSamplePolicy, num_proc: int = 0) -> datasets.Dataset:
    """Map a raw dataset (with ``_row``) to canonical records, applying ``policy`` to bad samples.

    Recomputed every time (``load_from_cache_file=False``): whether an image exists is checked anew.
    """
    opts = {**opts, "skip": policy.skip}
    out = raw.map(_convert_row, fn_kwargs={"opts": opts}, remove_columns=raw.column_names, features=_OUT_FEATURES,
                  num_proc=num_proc or None, load_from_cache_file=False, desc=f"reading {opts['file']}")
    errors = out["_error"]
    bad = [i for i, e in enumerate(errors) if e]
    for i in bad:
        policy.handle(BadSampleError.from_dict(json.loads(errors[i])))
    if bad:
        bad_set = set(bad)
        out = out.select([i for i in range(len(out)) if i not in bad_set])
    return out.remove_columns("_error")


# --- splits -----------------------------------------------------------------------------------------------
def holdout_indices(n: int, fraction: float, seed: int) -> list[int]:
    """Sorted positions (of ``n``) held out for validation: the ``round(n * fraction)`` (at least 1) with the
    smallest ``blake2b(f"{seed}:{i}")``. Independent of library versions and platform."""
    k = max(1, round(n * fraction))
    keys = sorted(range(n), key=lambda i: hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest())
    return sorted(keys[:k])


def _split_source(cfg, split: str) -> tuple[str | None, bool]:
    """(path of the split's source, whether it is the train source with a holdout applied)."""
    path = {"train": cfg.path, "val": cfg.val_path, "test": cfg.test_path}[split]
    if split == "train":
        return path, cfg.val_path is None and float(cfg.val_fraction) > 0
    if path is None and split == "val" and float(cfg.val_fraction) > 0:
        return cfg.path, True
    return path, False


def _root(cfg, split: str, base_dir: str) -> str:
    """The split's image root, else ``cfg.image_root``, else ``base_dir`` (the annotation file's directory)."""
    root = {"train": cfg.image_root, "val": cfg.val_image_root, "test": cfg.test_image_root}[split]
    root = root or cfg.image_root
    return os.path.abspath(os.path.expanduser(root)) if root else base_dir


def read_conversations(cfg, split: str = "train", policy: BadSamplePolicy | None = None) -> datasets.Dataset:
    """The ``split`` (``train``/``val``/``test``; ``validation`` accepted) of ``cfg`` (a :class:`DataConfig`
    or its DictConfig) as a ``datasets.Dataset`` of canonical records (:data:`RECORD_FEATURES`).

    Bad samples go through ``policy`` (default: a new one from ``cfg.on_bad_sample``); skipped ones are
    counted there and logged. Raises :class:`DataConfigError` for a configuration problem,
    :class:`DataFormatError` for an unusable file, :class:`BadSampleError` under ``raise``.
    """
    check_data_config(cfg)
    split = canonical_split(split)
    policy = policy or BadSamplePolicy(cfg.on_bad_sample)
    kind = cfg.name
    if kind.startswith("digits_"):
        from chameleon_ft.data.digits import digits_dataset

        ds = digits_dataset(kind.removeprefix("digits_"), split, image_size=int(cfg.image_size),
                            prompt_template=cfg.prompt_template)
        return ds.select(range(min(len(ds), int(cfg.max_samples)))) if cfg.max_samples else ds

    path, holdout = _split_source(cfg, split)
    if path is None and kind == "hf_dataset" and split != "train":
        path = cfg.path  # a DatasetDict / image folder may hold the split itself
    if path is None:
        hint = " or data.val_fraction" if split == "val" else ""
        raise DataConfigError(f"data.name={kind}: no source for split {split!r}; set data.{split}_path{hint}"
                              if split != "train" else f"data.name={kind}: set data.path")
    path = os.path.expanduser(str(path))
    columns = dict(cfg.columns or {})
    unknown = set(columns) - set(FIELDS)
    if unknown:
        raise DataConfigError(f"data.columns has unknown fields {sorted(unknown)}; known: {FIELDS}")
    opts = {"kind": kind, "file": path, "columns": columns, "task": cfg.task,
            "marker": cfg.image_marker or DEFAULT_MARKERS.get(kind, "<image>"),
            "unmarked": "all" if kind == "lumina" else "single", "prompt_template": cfg.prompt_template,
            "image_size": int(cfg.image_size), "annotations": None, "image_template": None}
    cache_dir = cfg.cache_dir
    if kind in ("llava", "lumina", "jsonl"):
        raw = _from_generator(_gen_json_records, {"path": path, "stamp": _stamp(path)}, _JSON_RAW, cache_dir)
        opts["image_root"] = _root(cfg, split, os.path.dirname(os.path.abspath(path)))
    elif kind == "coco_captions":
        raw = _from_generator(_gen_coco, {"path": path, "stamp": _stamp(path)}, _COCO_RAW, cache_dir)
        opts["image_root"] = _root(cfg, split, os.path.dirname(os.path.abspath(path)))
    elif kind == "vqav2":
        ann = {"train": cfg.annotations_path, "val": cfg.val_annotations_path,
               "test": cfg.test_annotations_path}[split if not holdout else "train"]
        if ann is None:
            raise DataConfigError(f"data.name=vqav2: set the answers file for split {split!r} "
                                  f"(data.{'' if split == 'train' or holdout else split + '_'}annotations_path)")
        ann = os.path.expanduser(str(ann))
        raw = _from_generator(_gen_vqav2, {"questions": path, "annotations": ann, "q_stamp": _stamp(path),
                                           "a_stamp": _stamp(ann)}, _VQAV2_RAW, cache_dir)
        opts.update(image_root=_root(cfg, split, os.path.dirname(os.path.abspath(path))), annotations=ann,
                    image_template=cfg.image_template or DEFAULT_VQAV2_TEMPLATE)
    elif kind == "hf_dataset":
        own = split != "train" and path != os.path.expanduser(str(cfg.path))  # a source just for this split
        ds = _hf_load(path, split, cache_dir, single_ok=own or split == "train")
        if split == "val" and not own:  # the dataset's own validation split wins over a holdout
            holdout = ds is None and float(cfg.val_fraction) > 0
            if holdout:
                ds = _hf_load(path, "train", cache_dir, single_ok=True)
        elif split == "train" and holdout:
            holdout = _hf_load(path, "val", cache_dir, single_ok=False) is None
        if ds is None:
            raise DataConfigError(f"{path}: has no {split!r} split; set data.{split}_path"
                                  + (" or data.val_fraction" if split == "val" else ""))
        raw = _hf_prepare(ds)
        opts["image_root"] = _root(cfg, split, path if Path(path).is_dir() else os.path.dirname(os.path.abspath(path)))
    else:  # check_data_config already rejects unknown names
        raise DataConfigError(f"unknown data.name {kind!r}")

    if holdout:
        held = holdout_indices(len(raw), float(cfg.val_fraction), int(cfg.seed))
        if split == "val":
            raw = raw.select(held)
        else:
            held_set = set(held)
            raw = raw.select([i for i in range(len(raw)) if i not in held_set])
    if cfg.max_samples:
        raw = raw.select(range(min(len(raw), int(cfg.max_samples))))
    out = convert_raw(raw, opts, policy, num_proc=int(cfg.num_workers))
    policy.log_summary(f"{kind} {split} ({path})")
    return out


def conversations(ds: datasets.Dataset):
    """Iterate a dataset of canonical records as :class:`Conversation` objects."""
    for rec in ds:
        yield Conversation.from_record(rec)
