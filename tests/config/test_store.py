import pytest

from chameleon_ft.config.store import ConfigKeyError, check_overrides, compose, recipe_names
from chameleon_ft.data.errors import DataConfigError
from chameleon_ft.errors import ConfigError


def test_recipes_are_registered_and_apply_their_group_overrides():
    assert {"captioning", "vqa", "text_to_image", "debug"} <= set(recipe_names())
    cfg = compose(["recipe=text_to_image"])
    assert cfg.task == "text_to_image" and cfg.data.format == "digits" and cfg.data.task == "text_to_image"
    assert cfg.model.mask_image_logits is False  # stock masking would make the image loss infinite
    assert compose(["recipe=captioning"]).data.task == "captioning"


def test_monitor_follows_the_task_unless_set():
    assert (compose(["recipe=vqa"]).monitor, compose(["recipe=vqa"]).monitor_mode) == ("val/acc", "max")
    assert compose(["recipe=captioning"]).monitor == "val/exact_match"
    assert (compose(["recipe=text_to_image"]).monitor, compose(["recipe=text_to_image"]).monitor_mode) == (
        "val/loss", "min")
    cfg = compose(["recipe=vqa", "monitor=val/loss"])
    assert (cfg.monitor, cfg.monitor_mode) == ("val/loss", "min")
    with pytest.raises(ConfigError, match="monitor_mode"):
        compose(["recipe=vqa", "monitor_mode=up"])


def test_bad_validation_sampling_fails_at_compose_time():
    assert compose(["recipe=text_to_image", "eval.image_top_k=16"]).eval.image_top_k == 16
    with pytest.raises(ConfigError, match=r"eval.image_top_k=0: must be >= 1"):
        compose(["recipe=text_to_image", "eval.image_top_k=0"])
    with pytest.raises(ConfigError, match=r"eval.image_temperature=0.0: must be > 0"):
        compose(["recipe=text_to_image", "eval.image_temperature=0"])


def test_task_and_data_mismatch_fails_at_compose_time():
    with pytest.raises(DataConfigError, match=r"task=vqa but data.format=coco_captions only makes \['captioning'\]"):
        compose(["recipe=vqa", "data=coco_captions", "data.path=/d/captions.json"])
    with pytest.raises(DataConfigError, match="task='vqa2' is not a task"):
        compose(["recipe=vqa", "task=vqa2"])


def test_user_data_and_real_model_are_one_override_away():
    cfg = compose(["recipe=vqa", "data=llava", "data.path=/d/train.json", "data.image_root=/d/img",
                   "model=lumina_mgpt_7b", "model.path=/ckpt", "peft.r=8", "optim.lr=3e-4"])
    assert (cfg.data.format, cfg.data.path, cfg.data.image_root) == ("llava", "/d/train.json", "/d/img")
    assert (cfg.model.path, cfg.model.z_loss_weight, cfg.peft.r, cfg.optim.lr) == ("/ckpt", 1e-5, 8, 3e-4)


def test_typo_fails_fast_listing_valid_keys():
    with pytest.raises(ConfigKeyError, match=r"'lrr' is not a key of optim; valid keys: .*\blr\b.*warmup_steps"):
        check_overrides(["recipe=vqa", "optim.lrr=1e-3"])
    with pytest.raises(ConfigKeyError, match=r"'pth' is not a key of data; valid keys: .*image_root.*path"):
        compose(["recipe=vqa", "data.pth=x"])
    with pytest.raises(ConfigKeyError, match="valid keys: .*optim.*trainer"):
        compose(["recipe=vqa", "optimizer.lr=1"])
    with pytest.raises(ConfigKeyError, match="'questin' is not a key of data.columns; valid keys: .*question"):
        compose(["recipe=vqa", "data.columns.questin=q"])


def test_typed_columns_take_the_documented_form():
    cfg = compose(["recipe=vqa", "data=hf_dataset", "data.path=/d/ds", "data.columns.question=q",
                   "data.columns.answer=a"])
    assert (cfg.data.columns.question, cfg.data.columns.answer, cfg.data.columns.image) == ("q", "a", None)


def test_wrong_type_and_missing_recipe_fail_at_compose():
    with pytest.raises(ConfigError, match="max_steps.*many|many.*max_steps"):
        compose(["recipe=vqa", "trainer.max_steps=many"])
    with pytest.raises(ConfigError, match="recipe"):
        compose([])


def test_a_recipe_file_of_the_users_own(tmp_path):
    recipe = tmp_path / "my_task.yaml"
    recipe.write_text("# my captions\ndefaults:\n  - override /data: digits\ntask: captioning\noptim:\n  lr: 0.005\n")
    cfg = compose([f"recipe={recipe}"])
    assert (cfg.task, cfg.optim.lr, cfg.monitor) == ("captioning", 0.005, "val/exact_match")
    recipe.write_text("task: captioning\noptim:\n  lrr: 0.005\n")  # a typo inside the user's file
    with pytest.raises(ConfigKeyError, match=r"'lrr' is not a key of optim; valid keys: .*\blr\b"):
        compose([f"recipe={recipe}"])
    with pytest.raises(ConfigError, match="no such file"):
        compose([f"recipe={tmp_path / 'missing.yaml'}"])


def test_config_dir_adds_recipes_and_group_options(tmp_path):
    (tmp_path / "recipe").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text("defaults:\n  - override /data: my_digits\ntask: vqa\n")
    (tmp_path / "data" / "my_digits.yaml").write_text("format: digits\nimage_size: 32\nbatch_size: 4\n")
    cfg = compose(["recipe=mine"], config_dirs=[str(tmp_path)])
    assert (cfg.task, cfg.data.image_size, cfg.data.batch_size) == ("vqa", 32, 4)
    assert compose(["recipe=vqa", "data=my_digits"], config_dirs=[str(tmp_path)]).data.image_size == 32


def test_help_lists_the_options_of_the_users_config_dir(tmp_path):
    from chameleon_ft.__main__ import TRAIN
    from chameleon_ft.config.help import command_help

    (tmp_path / "recipe").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text("# My own digits run.\ntask: vqa\n")
    (tmp_path / "recipe" / "debug.yaml").write_text("# My debug, instead of the shipped one.\ntask: vqa\n")
    (tmp_path / "data" / "my_digits.yaml").write_text("# Small digits.\nformat: digits\n")
    text = command_help(TRAIN, [str(tmp_path)])
    rows = {line.split()[0]: line for line in text.split("Recipes")[1].split("Config groups")[0].splitlines()[1:]
            if line.strip()}
    assert rows["mine"].endswith(f"My own digits run. [{tmp_path}]")
    assert rows["debug"].endswith(f"My debug, instead of the shipped one. [{tmp_path}]")
    assert "vqa" in rows and "[" not in rows["vqa"]
    data_row = next(line for line in text.splitlines() if line.strip().startswith("data:"))
    assert "my_digits" in data_row and "llava" in data_row and "sharegpt" in data_row
    assert "mine" not in command_help(TRAIN)
    with pytest.raises(ConfigError, match="--config-dir .*missing: no such directory"):
        command_help(TRAIN, [str(tmp_path / "missing")])
