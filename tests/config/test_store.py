import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from chameleon_ft.config.store import ConfigKeyError, check_overrides, compose, recipe_names


def test_recipes_are_registered_and_apply_their_group_overrides():
    assert {"captioning", "vqa", "text_to_image", "debug"} <= set(recipe_names())
    cfg = compose(["recipe=text_to_image"])
    assert cfg.task == "text_to_image" and cfg.data.name == "digits_t2i"
    assert cfg.model.mask_image_logits is False  # stock masking would make the image loss infinite
    assert compose(["recipe=captioning"]).data.name == "digits_captioning"


def test_user_data_and_real_model_are_one_override_away():
    cfg = compose(["recipe=vqa", "data=llava", "data.path=/d/train.json", "data.image_root=/d/img",
                   "model=lumina_mgpt_7b", "model.path=/ckpt", "peft.r=8", "optim.lr=3e-4"])
    assert (cfg.data.name, cfg.data.path, cfg.data.image_root) == ("llava", "/d/train.json", "/d/img")
    assert (cfg.model.path, cfg.model.z_loss_weight, cfg.peft.r, cfg.optim.lr) == ("/ckpt", 1e-5, 8, 3e-4)


def test_typo_fails_fast_listing_valid_keys():
    with pytest.raises(ConfigKeyError, match=r"'lrr' is not a key of optim; valid keys: .*\blr\b.*warmup_steps"):
        check_overrides(["recipe=vqa", "optim.lrr=1e-3"])
    with pytest.raises(ConfigKeyError, match=r"'pth' is not a key of data; valid keys: .*image_root.*path"):
        compose(["recipe=vqa", "data.pth=x"])
    with pytest.raises(ConfigKeyError, match="valid keys: .*optim.*trainer"):
        compose(["recipe=vqa", "optimizer.lr=1"])


def test_wrong_type_and_missing_recipe_fail_at_compose():
    with pytest.raises(ConfigCompositionException, match="max_steps") as e:
        compose(["recipe=vqa", "trainer.max_steps=many"])
    assert isinstance(e.value.__cause__, ValidationError)
    with pytest.raises(ConfigCompositionException, match=r"(?s)recipe.*captioning.*text_to_image.*vqa"):
        compose([])
