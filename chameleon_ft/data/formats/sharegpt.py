"""LLaMA-Factory's ShareGPT JSON: ``messages`` of ``role``/``content`` turns with ``<image>`` markers and ``images``.

Reads LLaMA-Factory's multimodal files (its ``data/mllm_demo.json``) with ``data=sharegpt data.path=FILE`` and
no mapping: the messages are the ``messages`` list (else ``conversations``); roles and contents are read
from ``role``/``content`` (else ``from``/``value``); ``user``/``human``, ``assistant``/``gpt`` and ``system``
are the role names. ``images`` (a path or a list) resolve against the file's directory (``data.image_root``
overrides), and there must be exactly one ``<image>`` marker per image, as in LLaMA-Factory.

Its ``dataset_info.json`` can be read as it is: ``data.dataset_info=FILE data.dataset_name=NAME`` takes the
entry's ``file_name`` (relative to that file), ``columns`` (``messages``, ``images``, ``system``) and ``tags``
(see :class:`~chameleon_ft.data.config.ShareGPTTagsConfig`); images then resolve against the
``dataset_info.json`` directory, LLaMA-Factory's default ``media_dir``.

LLaMA-Factory's rules kept: a first ``system`` turn is the system prompt (else the ``system`` column, when
mapped); then user and assistant turns alternate, starting with the user and ending with the assistant
(``turn_order`` otherwise). Deviations: such a record is a bad sample under ``data.on_bad_sample`` (reported,
or skipped and counted) where LLaMA-Factory logs and skips it; tool turns (``function_call``,
``observation``) are refused (``unknown_role``), Chameleon has no tool-call template; an image path that does
not exist under the image root is ``missing_image`` (LLaMA-Factory falls back to the working directory);
hub entries (``hf_hub_url``, ...), ranking data and the ``tools``/``videos``/``audios`` columns are refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from chameleon_ft.data.conversation import MarkerRules
from chameleon_ft.data.errors import BadSampleError, DataConfigError
from chameleon_ft.data.formats import (
    RowContext,
    SplitInputs,
    image_root,
    register_format,
    resolve_images,
)
from chameleon_ft.data.formats.llava import ConversationFormat
from chameleon_ft.data.jsonfile import load_json, record_from_row

TAG_NAMES = ("role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag", "observation_tag", "function_tag")
# LLaMA-Factory's defaults: every tag an entry (or data.tags) leaves unset.
LLAMA_FACTORY_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                      "system_tag": "system", "observation_tag": "observation", "function_tag": "function_call"}
# No tags given: both spellings LLaMA-Factory ships (its ShareGPT and its OpenAI-style files).
AUTO_TAGS = {"role_tag": ("role", "from"), "content_tag": ("content", "value"), "user_tag": ("user", "human"),
             "assistant_tag": ("assistant", "gpt"), "system_tag": ("system",),
             "observation_tag": ("observation", "tool"), "function_tag": ("function_call", "function")}
# dataset_info.json columns -> our canonical fields; the other columns it documents are refused.
ENTRY_COLUMNS = {"messages": "conversations", "images": "images", "system": "system"}
ENTRY_KEYS = ("file_name", "formatting", "columns", "tags", "ranking", "split", "file_sha1")


@dataclass(frozen=True)
class RoleTags:
    """Accepted message keys and role values, each a tuple of spellings (plain values: crosses processes)."""

    role: tuple[str, ...]
    content: tuple[str, ...]
    user: tuple[str, ...]
    assistant: tuple[str, ...]
    system: tuple[str, ...]
    tool: tuple[str, ...]

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> RoleTags:
        """No tags: :data:`AUTO_TAGS`; some: LLaMA-Factory's rule, unset ones take :data:`LLAMA_FACTORY_TAGS`."""
        if tags:
            full = {k: (tags.get(k) or LLAMA_FACTORY_TAGS[k],) for k in TAG_NAMES}
        else:
            full = AUTO_TAGS
        return cls(full["role_tag"], full["content_tag"], full["user_tag"], full["assistant_tag"],
                   full["system_tag"], full["observation_tag"] + full["function_tag"])


@dataclass(frozen=True)
class DatasetInfoEntry:
    """One entry of a LLaMA-Factory ``dataset_info.json``, as this format reads it."""

    info_path: str
    file: str  # file_name, resolved against the dataset_info.json directory
    base_dir: str  # the dataset_info.json directory (LLaMA-Factory's dataset_dir and default media_dir)
    columns: dict[str, str] = field(default_factory=dict)  # canonical field -> column
    tags: dict[str, str] = field(default_factory=dict)


def read_dataset_info(info_path: str, name: str) -> DatasetInfoEntry:
    """Entry ``name`` of LLaMA-Factory's ``dataset_info.json`` at ``info_path``; what this format cannot honour
    is a :class:`DataConfigError` naming the file, the entry and the key."""
    info_path = os.path.expanduser(str(info_path))
    info = load_json(info_path)
    where = f"{info_path}: entry {name!r}"
    if not isinstance(info, dict):
        raise DataConfigError(f"{info_path}: expected an object of named data sets, got {type(info).__name__}")
    if name not in info:
        raise DataConfigError(f"{info_path}: no entry {name!r}; entries: {', '.join(sorted(info)) or 'none'}")
    entry = info[name]
    if not isinstance(entry, dict):
        raise DataConfigError(f"{where}: expected an object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise DataConfigError(f"{where}: {unknown[0]!r} is not supported (a local file_name with sharegpt "
                              "formatting is; download hub data sets and cap samples with data.max_samples)")
    if "file_name" not in entry:
        raise DataConfigError(f"{where}: no file_name")
    if entry.get("formatting", "alpaca") != "sharegpt":
        raise DataConfigError(f"{where}: formatting {entry.get('formatting', 'alpaca')!r} is not supported; "
                              "chameleon-ft reads sharegpt entries")
    if entry.get("ranking", False):
        raise DataConfigError(f"{where}: ranking (preference) data is not supported")
    if entry.get("split", "train") != "train":
        raise DataConfigError(f"{where}: split {entry['split']!r}: a local file has only the train split")
    columns, tags = entry.get("columns") or {}, entry.get("tags") or {}
    for key in sorted(set(columns) - set(ENTRY_COLUMNS)):
        raise DataConfigError(f"{where}: column {key!r} is not supported (supported: {', '.join(ENTRY_COLUMNS)})")
    for key in sorted(set(tags) - set(TAG_NAMES)):
        raise DataConfigError(f"{where}: unknown tag {key!r} (tags: {', '.join(TAG_NAMES)})")
    base_dir = os.path.dirname(os.path.abspath(info_path))
    file = os.path.join(base_dir, os.path.expanduser(str(entry["file_name"])))
    if os.path.isdir(file):
        raise DataConfigError(f"{where}: file_name {entry['file_name']!r} is a directory; give one JSON/JSONL file")
    return DatasetInfoEntry(info_path, file, base_dir, {ENTRY_COLUMNS[k]: str(v) for k, v in columns.items()},
                            {k: str(v) for k, v in tags.items()})


def dataset_info_entry(cfg) -> DatasetInfoEntry | None:
    """The ``data.dataset_info`` entry ``data.dataset_name`` (None when not set)."""
    if cfg.dataset_info is None:
        return None
    return read_dataset_info(cfg.dataset_info, str(cfg.dataset_name))


class _DataWithPath:
    """``cfg`` with ``path`` taken from a dataset_info entry (the rest read through)."""

    def __init__(self, cfg, path: str):
        self._cfg, self.path = cfg, path

    def __getattr__(self, key: str) -> Any:
        return getattr(self._cfg, key)


def _set_tags(tags) -> dict[str, str]:
    items = tags.items() if hasattr(tags, "items") else vars(tags).items()
    return {str(k): str(v) for k, v in items if v is not None}


def _messages_key(rec: dict, columns: dict[str, str]) -> str:
    if "conversations" in columns:
        return columns["conversations"]
    return "messages" if "messages" in rec or "conversations" not in rec else "conversations"


def _first_key(message: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in message), None)


def aligned_messages(messages: Any, tags: RoleTags, system_prompt: Any, file: str, index: int) -> list[dict]:
    """ShareGPT messages as ``{"role": system|user|assistant, "content"}`` turns, under LLaMA-Factory's rules
    (see the module docstring); a record that breaks them is a :class:`BadSampleError`."""
    if not isinstance(messages, list):
        raise BadSampleError(file, index, "bad_record", f"messages must be a list, got {type(messages).__name__}")
    turns: list[dict] = []
    for t, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadSampleError(file, index, "bad_record", f"turn {t} is not an object")
        role_key, content_key = _first_key(m, tags.role), _first_key(m, tags.content)
        if role_key is None or content_key is None:
            raise BadSampleError(file, index, "missing_field", f"turn {t} has keys {sorted(m)}; expected a role "
                                 f"({'/'.join(tags.role)}) and a content ({'/'.join(tags.content)}); "
                                 "set data.tags.role_tag / data.tags.content_tag")
        role, content = m[role_key], m[content_key]
        if t == 0 and role in tags.system:
            turns.append({"role": "system", "content": content})
            continue
        if role in tags.tool:
            raise BadSampleError(file, index, "unknown_role", f"turn {t} is a tool turn ({role!r}); chameleon-ft "
                                 "trains user/assistant conversations only")
        position = t - (1 if turns and turns[0]["role"] == "system" else 0)
        expected, names = ("user", tags.user) if position % 2 == 0 else ("assistant", tags.assistant)
        if role not in names:
            reason = "turn_order" if role in (*tags.user, *tags.assistant, *tags.system) else "unknown_role"
            raise BadSampleError(file, index, reason, f"turn {t} has role {role!r} where a {expected} turn "
                                 f"({'/'.join(names)}) belongs: user and assistant alternate, after an optional "
                                 "first system turn")
        turns.append({"role": expected, "content": content})
    body = turns[1:] if turns and turns[0]["role"] == "system" else turns
    if not body:
        raise BadSampleError(file, index, "empty_conversation", "messages has no user or assistant turn")
    if len(body) % 2:
        raise BadSampleError(file, index, "turn_order", "the last turn is a user turn: ShareGPT conversations end "
                             "with the assistant")
    if turns[0]["role"] != "system" and isinstance(system_prompt, str) and system_prompt.strip():
        turns.insert(0, {"role": "system", "content": system_prompt})
    return turns


@register_format
class ShareGPTFormat(ConversationFormat):
    name = "sharegpt"
    description = "LLaMA-Factory ShareGPT/OpenAI JSON: messages with role/content, <image> markers, images"
    rules = MarkerRules("<image>", unmarked="none")
    own_keys = ("dataset_info", "dataset_name", "tags")

    def check_config(self, cfg) -> None:
        if (cfg.dataset_info is None) != (cfg.dataset_name is None):
            raise DataConfigError("data.dataset_info and data.dataset_name go together: the dataset_info.json file "
                                  "and the name of its entry")

    def split_inputs(self, cfg, split: str) -> SplitInputs:
        entry = dataset_info_entry(cfg)
        if entry is None:
            if cfg.path is None and split == "train":
                raise DataConfigError("data.format=sharegpt: set data.path, or data.dataset_info and "
                                      "data.dataset_name (LLaMA-Factory's dataset_info.json)")
            return super().split_inputs(cfg, split)
        inputs = super().split_inputs(_DataWithPath(cfg, cfg.path or entry.file), split)
        # The entry's columns and tags shape every record: the cache stamps dataset_info.json too.
        return SplitInputs({**inputs.files, "dataset_info": entry.info_path}, inputs.holdout)

    def context(self, cfg, split: str, inputs: SplitInputs) -> RowContext:
        ctx = super().context(cfg, split, inputs)
        entry = dataset_info_entry(cfg)
        columns, tags, root = dict(ctx.columns), _set_tags(cfg.tags), ctx.image_root
        if entry is not None:
            columns, tags = {**entry.columns, **columns}, {**entry.tags, **tags}
            if inputs.files.get("path") == entry.file:
                root = image_root(cfg, split, entry.base_dir)
        return RowContext(format=ctx.format, task=ctx.task, file=ctx.file, image_root=root, columns=columns,
                          prompt_template=ctx.prompt_template, image_size=ctx.image_size, rules=ctx.rules,
                          extra={"tags": RoleTags.from_tags(tags)})

    def fields(self, row: dict, ctx: RowContext) -> dict:
        index = int(row["_row"])
        rec = record_from_row(row, ctx.file)
        key = _messages_key(rec, ctx.columns)
        if rec.get(key) is None:
            raise BadSampleError(ctx.file, index, "missing_field", f"no {key!r} messages; the record has "
                                 f"{sorted(rec)} (map the column with data.columns.conversations=<name>)")
        system_prompt = rec.get(ctx.columns["system"]) if "system" in ctx.columns else None
        turns = aligned_messages(rec[key], ctx.extra["tags"], system_prompt, ctx.file, index)
        images = rec.get(ctx.columns.get("images") or ctx.columns.get("image") or "images")
        fields = {"conversations": turns, "images": resolve_images(images, ctx.image_root, ctx.file, index),
                  "_keys": sorted(rec)}
        if isinstance(rec.get("id"), (str, int)):
            fields["id"] = rec["id"]
        return fields

