"""The config store: the typed schemas, the config groups and recipes, composition, and the typo check.

Every command composes its config here, through Hydra, from ``key=value`` overrides: training and
pre-tokenization the experiment config (``conf/config.yaml`` + groups + a recipe), evaluation the same
plus its own keys, generation, merge and the tiny-checkpoint builder their own typed configs.
"""

from __future__ import annotations

import dataclasses
import typing
from importlib import resources
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from chameleon_ft.config.schema import ExperimentConfig
from chameleon_ft.errors import ConfigError

RECIPE_GROUP = "recipe"


class ConfigKeyError(ConfigError):
    """A key names nothing in the schema (a typo on the command line or in a recipe)."""


# ---------------------------------------------------------------------------------------------
# Where the shipped config groups and recipes are
# ---------------------------------------------------------------------------------------------
def package_config_dir() -> Path:
    """The shipped config groups (``conf/``), inside the installed package."""
    return Path(str(resources.files("chameleon_ft") / "conf"))


def package_recipes_dir() -> Path:
    """The shipped recipes (``recipes/``), inside the installed package."""
    return Path(str(resources.files("chameleon_ft") / "recipes"))


def group_names() -> list[str]:
    """Config groups (``model``, ``data``, ``peft``, ...) and ``recipe``."""
    return sorted([p.name for p in package_config_dir().iterdir() if p.is_dir()] + [RECIPE_GROUP])


def group_options(group: str, config_dirs: list[str] | None = None) -> dict[str, str]:
    """Option name -> its one-line description (the first comment line of its YAML) for a shipped group,
    plus the options of the user's config folders (``--config-dir``), which take precedence."""
    folder = package_recipes_dir() if group == RECIPE_GROUP else package_config_dir() / group
    options = {p.stem: _first_comment(p) for p in sorted(folder.glob("*.yaml"))}
    for directory in config_dirs or []:
        if not Path(directory).expanduser().is_dir():
            raise ConfigError(f"--config-dir {directory}: no such directory")
        for p in sorted((Path(directory).expanduser() / group).glob("*.yaml")):
            options[p.stem] = f"{_first_comment(p)} [{directory}]".lstrip()
    return options


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("#") and not line.startswith("# @package"):
            return line.lstrip("#").strip()
        if line and not line.startswith("#"):
            break
    return ""


def recipe_names() -> list[str]:
    """The shipped recipes."""
    return list(group_options(RECIPE_GROUP))


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
def register_configs() -> None:
    """Register every command's schema, and each shipped recipe as an option of group ``recipe``."""
    from chameleon_ft.config.commands import COMMAND_SCHEMAS

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=ExperimentConfig)
    for name, schema in COMMAND_SCHEMAS.items():
        if issubclass(schema, ExperimentConfig) and schema is not ExperimentConfig:
            # The experiment's groups and recipe on this command's schema: config.yaml with its base swapped.
            primary = OmegaConf.load(package_config_dir() / "config.yaml")
            primary.defaults = [f"{name}_schema" if d == "base_config" else d for d in primary.defaults]
            cs.store(name=f"{name}_schema", node=schema)
            cs.store(name=name, node=primary)
        elif schema is not ExperimentConfig:
            cs.store(name=name, node=schema)
    for path in sorted(package_recipes_dir().glob("*.yaml")):
        cs.store(group=RECIPE_GROUP, name=path.stem, node=OmegaConf.load(path), package="_global_")


def register_recipe_file(path: str | Path) -> str:
    """Register a user's recipe file (``recipe=./my_task.yaml``) as a recipe option; returns its option name."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"recipe={path}: no such file")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml errors come in several types
        raise ConfigError(f"recipe={path}: not valid YAML ({e})") from None
    import hashlib

    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    name = f"{path.stem}_{digest}"  # unique per file, and a valid option name
    ConfigStore.instance().store(group=RECIPE_GROUP, name=name, node=node, package="_global_")
    return name


# ---------------------------------------------------------------------------------------------
# The typo check
# ---------------------------------------------------------------------------------------------
def _schema_fields(tp: Any) -> dict[str, Any] | None:
    """Field name -> resolved type of a dataclass, or None for free-form values."""
    if dataclasses.is_dataclass(tp):
        return typing.get_type_hints(tp)
    return None


def check_key(key: str, schema: type) -> None:
    """Raise :class:`ConfigKeyError`, listing the valid keys, when dotted ``key`` is not in ``schema``."""
    node: Any = schema
    parts = key.split(".")
    for depth, part in enumerate(parts):
        fields = _schema_fields(node)
        if fields is None:  # a dict/Any value: free-form below this point
            return
        if part not in fields:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigKeyError(f"unknown config key '{key}': '{part}' is not a key of {where}; "
                                 f"valid keys: {', '.join(sorted(fields))}")
        node = fields[part]


def check_overrides(overrides: list[str], schema: type = ExperimentConfig, groups: list[str] | None = None) -> None:
    """Fail fast, listing the valid keys, when a command-line override names an unknown key.

    Hydra's own message ("Key 'lrr' is not in struct") does not say what the valid keys are.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups = set(group_names() if groups is None else groups)
    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("hydra")])
    for ov in parsed:
        key = ov.key_or_group
        if ov.is_add() or ov.is_force_add() or key.startswith("hydra") or key in groups:
            continue
        check_key(key, schema)


def explain_composition_error(e: Exception, schema: type) -> ConfigError:
    """A Hydra/OmegaConf composition error as one clear :class:`ConfigError` (valid keys listed for a typo
    inside a recipe or config file)."""
    from omegaconf.errors import ConfigAttributeError
    from omegaconf.errors import ConfigKeyError as OCKeyError

    cause, seen = e, []
    while cause is not None and cause not in seen:  # the OmegaConf error under Hydra's wrapper, if any
        seen.append(cause)
        if getattr(cause, "full_key", None):
            break
        cause = cause.__cause__ or cause.__context__
    cause = cause or e
    full_key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigAttributeError, OCKeyError)) and full_key:
        try:
            check_key(str(full_key), schema)
        except ConfigKeyError as typo:
            return ConfigKeyError(f"{typo} (in a recipe or config file)")
    detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    where = str(e).strip().splitlines()[0] if cause is not e else ""
    return ConfigError(f"{where}: {detail}" if where and where != detail else detail)


# ---------------------------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------------------------
def compose(overrides: list[str] | None = None, config_name: str = "config", *,
            config_dirs: list[str] | None = None) -> DictConfig:
    """Compose a command's config exactly as its command line does (also for tests and notebooks).

    The experiment config (``config``, and ``evaluate`` built on it) is checked and its derived values are
    filled in (:func:`chameleon_ft.config.resolve.resolve_experiment`).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    from chameleon_ft.config.commands import COMMAND_SCHEMAS

    schema = COMMAND_SCHEMAS.get(config_name, ExperimentConfig)
    overrides = prepare_overrides(list(overrides or []), config_dirs)
    check_overrides(overrides, schema)
    register_configs()
    # Commands with a flat schema compose it alone: the experiment's groups (model/, data/...) would
    # otherwise turn their plain keys such as model=PATH into group choices.
    flat = not issubclass(schema, ExperimentConfig)
    try:
        with (initialize(version_base="1.3", config_path=None) if flat else
              initialize_config_dir(config_dir=str(package_config_dir()), version_base="1.3")):
            cfg = hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=False)
    except ConfigCompositionException as e:
        raise explain_composition_error(e, schema) from e
    if issubclass(schema, ExperimentConfig):
        from chameleon_ft.config.resolve import resolve_experiment

        cfg = resolve_experiment(cfg)
    return cfg


def prepare_overrides(overrides: list[str], config_dirs: list[str] | None = None) -> list[str]:
    """Command-line overrides with user recipe files registered (``recipe=./my_task.yaml``) and the options of
    user config folders (``--config-dir``) registered beside the shipped ones."""
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key == RECIPE_GROUP and value.endswith((".yaml", ".yml")):
            register_configs()
            o = f"{RECIPE_GROUP}={register_recipe_file(value)}"
        out.append(o)
    for d in config_dirs or []:
        register_config_dir(d)
    return out


def register_config_dir(directory: str | Path) -> None:
    """Register a user's config folder (``--config-dir``): every ``<group>/<option>.yaml`` in it becomes an
    option of that group, beside (or instead of) the shipped ones. Recipes are global diffs whether or not
    the file says ``# @package _global_``."""
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"--config-dir {directory}: no such directory")
    register_configs()
    cs = ConfigStore.instance()
    for group_dir in sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "hydra"):
        for path in sorted(group_dir.glob("*.yaml")):
            try:
                node = OmegaConf.load(path)
            except Exception as e:  # yaml errors come in several types
                raise ConfigError(f"{path}: not valid YAML ({e})") from None
            package = "_global_" if group_dir.name == RECIPE_GROUP else None
            cs.store(group=group_dir.name, name=path.stem, node=node, package=package)
