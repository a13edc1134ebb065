"""The task registry: what a fine-tuning task is, in one place.

A :class:`Task` says which fields a flat record needs, whether a sample must carry an image, which
tokens are learned by default, which metric a run reports and optimises, the default prompt template,
how a sample and a generation prompt are built from canonical fields, and how generated outputs are
scored. Everything else (readers, tokenization, validation metrics, evaluation, generation, config
checks) asks the registry instead of branching on task names.

Adding a task is one module in this package that calls :func:`register_task` (modules are discovered
automatically) plus one recipe YAML.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from chameleon_ft.data.conversation import MarkerRules, chat_conversation
from chameleon_ft.data.errors import BadSampleError, DataConfigError
from chameleon_ft.data.sample import Conversation, ImageRef, Segment, Turn
from chameleon_ft.data.template import LABEL_MASKS
from chameleon_ft.registry import Registry


@dataclass(frozen=True)
class SampleContext:
    """Where a record came from (named in errors) and the data settings that shape its sample."""

    file: str = ""
    index: int = -1
    prompt_template: str | None = None  # data.prompt_template; None: the task's default
    image_size: int = 512  # the side a text-to-image prompt announces
    rules: MarkerRules = field(default_factory=MarkerRules)


Builder = Callable[[dict, SampleContext], Conversation]
PromptBuilder = Callable[[dict, SampleContext], list[Turn]]
# (predictions, references per sample, **metric options such as vqa_normalization) -> metrics
Scorer = Callable[..., dict[str, float]]


@dataclass(frozen=True)
class Task:
    """One fine-tuning task. See the module docstring."""

    name: str
    description: str
    key_field: str  # the flat-record field that identifies this task (data.task=auto)
    fields: tuple[str, ...]  # canonical flat-record fields it reads
    needs_image: bool  # a sample without an image is a bad sample (reason text_only)
    label_mask: str  # default data.label_mask: assistant | image | all
    monitor: str  # the metric a run returns to sweepers and names as its best
    monitor_mode: str  # max | min
    output: str  # what generation produces: text | image | interleaved (text, then an image, in one answer)
    conversation: Builder  # canonical fields -> a training sample
    prompt: PromptBuilder  # canonical fields -> the turns a generated answer follows
    prompt_template: str | None = None  # default data.prompt_template
    template_keys: tuple[str, ...] = ()  # placeholders a template must contain
    prompt_field: str | None = None  # the field a generation request's "prompt" fills
    reference_key: str | None = None  # the sample meta key holding the references (None: the target text)
    score: Scorer | None = None  # generated texts vs. each sample's references -> metrics

    def template(self, override: str | None) -> str | None:
        """``override`` (data.prompt_template) or the default, checked to hold every required placeholder."""
        template = self.prompt_template if override is None else override
        for key in self.template_keys:
            if template is None or "{" + key + "}" not in template:
                raise DataConfigError(f"data.prompt_template for {self.name} must contain {{{key}}}: {template!r}")
        return template


TASKS: Registry[Task] = Registry("task", "task", DataConfigError)
TASK_OUTPUTS = ("text", "image", "interleaved")


def register_task(task: Task) -> Task:
    """Add ``task`` to the registry (names are unique)."""
    if task.label_mask not in LABEL_MASKS or task.monitor_mode not in ("max", "min") \
            or task.output not in TASK_OUTPUTS:
        raise ValueError(f"task {task.name!r}: bad label_mask, monitor_mode or output")
    return TASKS.register(task.name, task)


def task_names() -> list[str]:
    """Names of every registered task, sorted."""
    return TASKS.names()


def get_task(name: str) -> Task:
    """The registered task ``name``; raises :class:`DataConfigError` listing the valid names."""
    return TASKS.get(name)


def infer_task(fields: dict) -> str | None:
    """The task a flat record describes by which key field it has (None if none; an error if several)."""
    found = [t.name for t in TASKS.values() if fields.get(t.key_field) is not None]
    if len(found) > 1:
        keys = ", ".join(TASKS.get(n).key_field for n in found)
        raise DataConfigError(f"a record has the key fields of several tasks ({keys}); set data.task")
    return found[0] if found else None


# --- helpers for task modules -----------------------------------------------------------------------------
def text_field(fields: dict, key: str, ctx: SampleContext, required: bool = True) -> str | None:
    """A string field of a flat record; a missing one is a ``missing_field`` bad sample naming the keys present."""
    v = fields.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        if required:
            present = fields.get("_keys") or sorted(k for k, x in fields.items() if x is not None and not k.startswith("_"))
            raise BadSampleError(ctx.file, ctx.index, "missing_field",
                                 f"field {key!r} is missing or empty; the record has {present} "
                                 f"(map a column with data.columns.{key}=<name>)")
        return None
    if not isinstance(v, str):
        raise BadSampleError(ctx.file, ctx.index, "bad_record",
                             f"field {key!r} must be a string, got {type(v).__name__}")
    return v


def single_image(fields: dict, task: str, ctx: SampleContext, required: bool = True) -> ImageRef | None:
    """The one image of a single-image task (a ``text_only`` bad sample when it is required and absent)."""
    img = fields.get("image")
    if img is None and fields.get("images"):
        img = fields["images"][0]
    if img is None and required:
        raise BadSampleError(ctx.file, ctx.index, "text_only", f"task {task} needs an image; the record has none")
    return img


def record_meta(fields: dict) -> dict:
    """Bookkeeping a record carries into the sample's meta (its ``id`` and anything under ``_meta``)."""
    meta = dict(fields.get("_meta") or {})
    if isinstance(fields.get("id"), (str, int)):
        meta.setdefault("id", fields["id"])
    return meta


def build_sample(task: Task, fields: dict, ctx: SampleContext) -> Conversation:
    """A training sample of ``task`` from canonical ``fields``.

    Records of conversation formats (a ``conversations`` field with ``images``) become conversations
    as they are, tagged with the task; flat records go through the task's own builder.
    """
    if fields.get("conversations") is not None and task.key_field != "conversations":
        return chat_sample(fields, ctx, task.name)
    return task.conversation(fields, ctx)


def chat_sample(fields: dict, ctx: SampleContext, task: str = "chat") -> Conversation:
    """A conversation record (``conversations`` messages and resolved ``images``) as a sample."""
    return chat_conversation(fields.get("conversations"), list(fields.get("images") or []), ctx.rules,
                             file=ctx.file, index=ctx.index, task=task, meta=record_meta(fields))


def user_turn(*segments: Segment | ImageRef | str | None) -> Turn:
    """A user turn from images and texts (None entries are left out)."""
    segs = []
    for s in segments:
        if isinstance(s, ImageRef):
            segs.append(Segment(image=s))
        elif isinstance(s, str):
            segs.append(Segment.of_text(s))
        elif s is not None:
            segs.append(s)
    return Turn("user", segs)


Registry.discover(__name__, __path__)
