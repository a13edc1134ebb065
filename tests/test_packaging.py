"""The wheel: it carries every config group and recipe, and installed (not editable) its commands run from
an empty directory with nothing of the checkout importable."""

import configparser
import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Built artefacts and environments of a checkout: never part of what a build sees in CI.
NOT_SOURCE = (".venv", ".cache", ".git", "build", "dist", "*.egg-info", "__pycache__", "outputs", "multirun",
              "lightning_logs", "*.whl")
CONSOLE_SCRIPTS = {"chameleon-ft": "chameleon_ft.__main__:main",
                   "chameleon-ft-pretokenize": "chameleon_ft.pretokenize:main",
                   "chameleon-ft-evaluate": "chameleon_ft.evaluate:main",
                   "chameleon-ft-generate": "chameleon_ft.generate:main",
                   "chameleon-ft-merge": "chameleon_ft.merge:main"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a clean copy of the checkout (no stale build/ folder can add files to it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (whl,) = (tmp / "dist").glob("chameleon_ft-*.whl")
    return whl


def _shipped_yaml() -> dict[str, bytes]:
    """Wheel path -> content of every YAML under the repo's top-level conf/ and recipes/ (the reference)."""
    files = {f"chameleon_ft/conf/{p.relative_to(REPO / 'conf').as_posix()}": p.read_bytes()
             for p in (REPO / "conf").rglob("*.yaml")}
    files.update({f"chameleon_ft/recipes/{p.name}": p.read_bytes() for p in (REPO / "recipes").glob("*.yaml")})
    return files


def test_wheel_carries_every_config_group_and_recipe(wheel):
    shipped = _shipped_yaml()
    assert "chameleon_ft/conf/config.yaml" in shipped and "chameleon_ft/recipes/debug.yaml" in shipped
    with zipfile.ZipFile(wheel) as z:
        in_wheel = {n: z.read(n) for n in z.namelist() if n.endswith(".yaml")}
        entry_points = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))).decode()
        modes = {i.filename: i.external_attr >> 28 for i in z.infolist()}
    assert sorted(in_wheel) == sorted(shipped)
    assert all(in_wheel[n] == shipped[n] for n in shipped)  # real files with the same content, not links
    assert all(modes[n] != 0xA for n in shipped)  # 0xA: a symlink entry
    scripts = configparser.ConfigParser()
    scripts.read_file(io.StringIO(entry_points))
    assert dict(scripts["console_scripts"]) == CONSOLE_SCRIPTS


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed (not editable) into its own folder: the package and its console scripts."""
    target = tmp_path_factory.mktemp("site")
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                          str(wheel)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return target


def _run(args, installed, cwd):
    # The installed copy first on the path (the checkout is not on it: cwd is an empty directory).
    env = dict(os.environ, PYTHONPATH=str(installed))
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_installed_commands_run_from_an_empty_directory(installed, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    where = _run([sys.executable, "-c", "import chameleon_ft; print(chameleon_ft.__file__)"], installed, empty)
    assert where.stdout.strip() == str(installed / "chameleon_ft" / "__init__.py")
    script = _run([str(installed / "bin" / "chameleon-ft"), "--help"], installed, empty)
    module = _run([sys.executable, "-m", "chameleon_ft", "--help"], installed, empty)
    assert script.returncode == module.returncode == 0, script.stderr[-2000:] + module.stderr[-2000:]
    assert script.stdout == module.stdout
    recipes = {p.stem for p in (REPO / "recipes").glob("*.yaml")}
    listed = {line.split()[0] for line in script.stdout.split("Recipes")[1].split("Config groups")[0].splitlines()[1:]
              if line.strip()}
    assert listed == recipes
    # The experiment config composes from the installed configs alone.
    job = _run([sys.executable, "-m", "chameleon_ft", "recipe=vqa", "optim.lr=0.0031", "--cfg", "job"], installed,
               empty)
    assert job.returncode == 0, job.stderr[-2000:]
    assert "lr: 0.0031" in job.stdout and "task: vqa" in job.stdout
    assert list(empty.iterdir()) == []


# Runs each target's --help in one interpreter (one torch import): console scripts as files, modules as -m does.
HELP_OF_EACH = """
import runpy, sys
for kind, target in zip(sys.argv[1::2], sys.argv[2::2]):
    print("=== " + target, flush=True)
    sys.argv = [target, "--help"]
    try:
        runpy.run_path(target, run_name="__main__") if kind == "script" else runpy.run_module(
            target, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        assert e.code in (None, 0), (target, e.code)
"""


def test_installed_sub_commands_as_console_scripts_and_modules(installed, tmp_path):
    names = ("pretokenize", "evaluate", "generate", "merge")
    targets = [("script", str(installed / "bin" / f"chameleon-ft-{n}")) for n in names]
    targets += [("module", f"chameleon_ft.{n}") for n in names] + [("module", "chameleon_ft.export")]
    res = _run([sys.executable, "-c", HELP_OF_EACH, *[x for t in targets for x in t]], installed, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    helps = dict(part.split("\n", 1) for part in res.stdout.split("=== ")[1:])
    assert len(helps) == len(targets)
    for n in names:
        script, module = helps[str(installed / "bin" / f"chameleon-ft-{n}")], helps[f"chameleon_ft.{n}"]
        assert script == module
        assert script.startswith(f"usage: chameleon-ft-{n} [key=value ...]   (the same: python -m chameleon_ft.{n} ")
    assert helps["chameleon_ft.export"] == helps["chameleon_ft.merge"]
    assert "Recipes" in helps["chameleon_ft.evaluate"] and "adapter" in helps["chameleon_ft.evaluate"]
