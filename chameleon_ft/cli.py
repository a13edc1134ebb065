"""One command-line harness for every entry point: ``key=value`` overrides composed into the command's
typed config, the same typo check, ``--help``, ``--version``, ``--config-dir``, and the same error handler.

A :class:`~chameleon_ft.errors.ChameleonFTError` (a problem with the user's config, data or files) is
printed as one line, ``error: <message>``, and the command exits with status 2; ``HYDRA_FULL_ERROR=1``
shows the whole traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from chameleon_ft.errors import ChameleonFTError, ConfigError

EXIT_USER_ERROR = 2


@dataclass(frozen=True)
class Command:
    """An entry point: its program name, the config it composes, and the function that runs it."""

    prog: str  # the command as users type it (a console script)
    config_name: str
    run: Callable[[Any], Any]
    summary: str
    # Training runs through hydra.main: multirun sweeps, run directories, launchers, --cfg/--info.
    hydra_app: bool = False
    module: str = ""  # the same command as ``python -m <module>``


def _full_errors() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def fail(err: BaseException) -> None:
    """Print a user error as one line and exit 2, or the error's own ``exit_code`` (re-raise it with
    ``HYDRA_FULL_ERROR=1``)."""
    if _full_errors():
        raise err
    print(f"error: {err}", file=sys.stderr)
    sys.exit(getattr(err, "exit_code", EXIT_USER_ERROR))


EXIT_INTERRUPTED = 130


# Hydra flags followed by a value (--cfg job, --info searchpath, ...).
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--info", "-i", "--config-name", "-cn", "--config-path", "-cp",
                "--experimental-rerun"}


def _split_argv(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(overrides, user config dirs, other flags with their values) of a command line."""
    overrides, dirs, flags = [], [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--config-dir", "-cd"):
            dirs.append(argv[i + 1] if i + 1 < len(argv) else "")
            i += 1
        elif a.startswith("--config-dir="):
            dirs.append(a.split("=", 1)[1])
        elif a.startswith("-"):
            flags.append(a)
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if a in _VALUE_FLAGS and nxt is not None and "=" not in nxt and not nxt.startswith("-"):
                flags.append(nxt)
                i += 1
        else:
            overrides.append(a)
        i += 1
    return overrides, dirs, flags


def main(command: Command, argv: Sequence[str] | None = None) -> Any:
    """Run ``command`` with ``argv`` (default: ``sys.argv[1:]``); returns what its function returns."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--version" in argv:
        from chameleon_ft import __version__

        print(f"chameleon-ft {__version__}")
        return None
    if "--help" in argv or "-h" in argv:
        from chameleon_ft.config.help import command_help

        try:
            print(command_help(command, _split_argv(argv)[1]), flush=True)
        except ChameleonFTError as e:
            fail(e)
        except BrokenPipeError:  # `chameleon-ft --help | head`: the reader left; not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return None
    overrides, config_dirs, flags = _split_argv(argv)
    if command.hydra_app:
        return _run_hydra_app(command, flags, overrides, config_dirs)
    from chameleon_ft.config.store import compose

    try:
        cfg = compose(overrides, command.config_name, config_dirs=config_dirs)
        return command.run(cfg)
    except ChameleonFTError as e:
        fail(e)


def _run_hydra_app(command: Command, flags: list[str], overrides: list[str], config_dirs: list[str]) -> Any:
    """Training: Hydra's own app (sweeps, run directories, ``--cfg``), after our checks."""
    import hydra

    from chameleon_ft.config.commands import COMMAND_SCHEMAS
    from chameleon_ft.config.resolve import resolve_experiment
    from chameleon_ft.config.store import (
        RECIPE_GROUP,
        check_overrides,
        package_config_dir,
        prepare_overrides,
        recipe_names,
        register_configs,
    )

    schema = COMMAND_SCHEMAS[command.config_name]
    try:
        prepared = prepare_overrides(overrides, config_dirs)
        asks_config = any(a in ("--cfg", "-c", "--info", "-i", "--hydra-help") for a in flags)
        if not asks_config and not any(o.startswith(f"{RECIPE_GROUP}=") for o in prepared):
            raise ConfigError(f"choose a recipe: recipe=NAME with NAME one of {', '.join(recipe_names())} "
                              "(or recipe=path/to/your_recipe.yaml); see --help")
        check_overrides(prepared, schema)
        if not asks_config and "-m" not in flags and "--multirun" not in flags:
            from chameleon_ft.config.store import compose

            compose(overrides, command.config_name, config_dirs=config_dirs)  # typos in files, task/data mismatch
    except ChameleonFTError as e:
        fail(e)
    register_configs()

    def task(cfg):
        try:
            return command.run(resolve_experiment(cfg))
        except ChameleonFTError as e:
            fail(e)
        except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, without a checkpoint of this step
            if _full_errors():
                raise
            print("error: interrupted", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)

    # Hydra reads sys.argv itself: hand it our prepared overrides and flags (user config folders are
    # registered in the config store already).
    sys.argv = [sys.argv[0], *flags, *prepared]
    return hydra.main(config_path=str(package_config_dir()), config_name=command.config_name,
                      version_base="1.3")(task)()
