"""``--help`` of every command: generated from the schemas, the config groups and the recipes themselves."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from chameleon_ft.config.schema import ExperimentConfig

# The keys people set most, shown with their types and defaults in the training command's help.
COMMON_KEYS = ("model.path", "data.path", "data.val_path", "data.image_root", "data.val_fraction", "data.max_length",
               "data.batch_size", "peft.method", "peft.r", "peft.alpha", "optim.lr", "optim.warmup_steps",
               "trainer.max_steps", "trainer.devices", "trainer.precision", "trainer.accumulate_grad_batches",
               "checkpoint.every_n_steps", "resume", "resume_allow", "seed", "task", "monitor")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(args[0]) + " | null" if len(args) == 1 else "any"
    if tp is typing.Any:
        return "any"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(tp, "__name__", str(tp))


def _field_rows(schema: type, prefix: str = "") -> dict[str, tuple[str, Any]]:
    """Dotted key -> (type name, default) of every leaf field of a dataclass schema."""
    rows = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            rows.update(_field_rows(tp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        rows[key] = (_type_name(tp), default)
    return rows


def _table(rows: dict[str, tuple[str, Any]], keys) -> list[str]:
    width = max(len(k) for k in keys)
    return [f"  {k:<{width}}  {rows[k][0]:<14} default: {rows[k][1]!r}" for k in keys]


def command_help(command, config_dirs: list[str] | None = None) -> str:
    """The help text of ``command`` (a :class:`chameleon_ft.cli.Command`), with the options of the user's
    config folders (``--config-dir``) listed beside the shipped ones."""
    from chameleon_ft.config.commands import COMMAND_SCHEMAS
    from chameleon_ft.config.store import RECIPE_GROUP, group_names, group_options

    schema = COMMAND_SCHEMAS[command.config_name]
    usage = f"usage: {command.prog} [key=value ...]"
    if command.module:
        usage += f"   (the same: python -m {command.module} [key=value ...])"
    lines = [usage, "", command.summary, ""]
    rows = _field_rows(schema)
    if issubclass(schema, ExperimentConfig):
        lines.append("Recipes (recipe=NAME, or recipe=path/to/your_recipe.yaml):")
        opts = group_options(RECIPE_GROUP, config_dirs)
        width = max(len(n) for n in opts)
        lines += [f"  {n:<{width}}  {d}" for n, d in opts.items()]
        lines += ["", "Config groups (group=option; add your own with --config-dir DIR holding DIR/<group>/*.yaml):"]
        for g in group_names():
            if g != RECIPE_GROUP:
                lines.append(f"  {g}: {', '.join(group_options(g, config_dirs))}")
        own = [k for k in rows if k not in _field_rows(ExperimentConfig)]
        lines += ["", "Most used keys (every key: --cfg job prints the composed config):"]
        lines += _table(rows, [k for k in (*own, *COMMON_KEYS) if k in rows])
        if command.hydra_app:
            lines += ["", "Sweeps: -m key=a,b ... runs one job per combination (Hydra multirun); "
                          "hydra.run.dir=DIR sets the run directory."]
    else:
        doc = (schema.__doc__ or "").strip()
        if doc:
            lines += [doc, ""]
        lines.append("Keys:")
        lines += _table(rows, list(rows))
    lines += ["", "--version prints the version; errors print one line (HYDRA_FULL_ERROR=1 for a traceback)."]
    return "\n".join(lines)
