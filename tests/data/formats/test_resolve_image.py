"""Image paths stay inside the image root unless ``data.allow_outside_root``; broken paths say what is wrong."""

import json
import os

import pytest
from PIL import Image

from chameleon_ft.data.config import DataConfig
from chameleon_ft.data.errors import BadSampleError, BadSamplePolicy
from chameleon_ft.data.formats import resolve_image
from chameleon_ft.data.reading import read_conversations


def png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 200, 30)).save(path)
    return path


@pytest.fixture
def layout(tmp_path):
    """``data/train.jsonl`` with images under ``data/images``; ``secret.png`` beside ``data``."""
    root = tmp_path / "data" / "images"
    png(root / "a.png")
    secret = png(tmp_path / "secret.png")
    records = [{"image": "a.png", "caption": "inside"},
               {"image": "../../secret.png", "caption": "climbs out"},
               {"image": str(secret), "caption": "absolute, outside"},
               {"image": str(root / "a.png"), "caption": "absolute, inside"}]
    path = tmp_path / "data" / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, root, secret


def cfg(path, root, **kw):
    return DataConfig(format="jsonl", task="captioning", path=str(path), image_root=str(root),
                      cache_dir=str(path.parent / "hf_cache"), **kw)


def test_paths_outside_the_image_root_are_refused_naming_the_record(layout):
    path, root, secret = layout
    with pytest.raises(BadSampleError) as info:
        read_conversations(cfg(path, root), "train")
    err = info.value
    assert (err.file, err.record, err.reason) == (str(path), 1, "outside_root")
    assert str(err) == (f"{path}: record 1: outside_root: image '../../secret.png' is {secret}, outside the image "
                        f"root {root}; set data.image_root to a folder that holds it, or data.allow_outside_root=true")
    policy = BadSamplePolicy("skip")
    kept = read_conversations(cfg(path, root, on_bad_sample="skip"), "train", policy)
    assert kept["index"] == [0, 3] and policy.counts == {"outside_root": 2}


def test_allow_outside_root_reads_every_image(layout):
    path, root, secret = layout
    ds = read_conversations(cfg(path, root, allow_outside_root=True), "train")
    paths = [seg["image_path"] for turns in ds["turns"] for t in turns for seg in t["segments"] if seg["image_path"]]
    assert paths == [str(root / "a.png"), str(secret), str(secret), str(root / "a.png")]


def test_a_symlink_inside_the_root_is_the_users_choice(tmp_path):
    png(tmp_path / "elsewhere" / "real.png")
    (tmp_path / "root").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "root" / "linked")
    ref = resolve_image("linked/real.png", str(tmp_path / "root"), "f.json", 0)
    assert ref.path == str(tmp_path / "root" / "linked" / "real.png")


def test_broken_paths_are_told_apart(tmp_path):
    os.symlink(tmp_path / "loop_b", tmp_path / "loop_a")
    os.symlink(tmp_path / "loop_a", tmp_path / "loop_b")
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    (tmp_path / "folder.png").mkdir()
    cases = {"loop_a": ("bad_image", f"{tmp_path / 'loop_a'} is a symlink loop"),
             "dangling.png": ("missing_image", f"{tmp_path / 'dangling.png'} is a symlink to {tmp_path / 'gone.png'}, "
                                               "which does not exist"),
             "folder.png": ("bad_image", f"{tmp_path / 'folder.png'} is not a file"),
             "absent.png": ("missing_image", f"{tmp_path / 'absent.png'} does not exist (image_root={tmp_path})")}
    for name, (reason, detail) in cases.items():
        with pytest.raises(BadSampleError) as info:
            resolve_image(name, str(tmp_path), "f.json", 4)
        assert (info.value.reason, info.value.detail) == (reason, detail), name
