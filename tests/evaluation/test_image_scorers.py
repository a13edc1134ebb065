"""Image scorers: the digit classifier (against a fresh scikit-learn fit) and CLIPScore (against CLIP's own
forward pass), with a tiny randomly initialised CLIP written to disk."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from chameleon_ft.data.formats import digits
from chameleon_ft.errors import ConfigError
from chameleon_ft.evaluation.image_scorers import (
    IMAGE_SCORERS, ImageScoringError, ScorerOptions, build_image_scorers, image_scorer_names,
)
from chameleon_ft.evaluation.image_scorers import digits as digit_scorer

SKL = load_digits()  # the independent reference: scans and labels straight from scikit-learn


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHAMELEON_FT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def rendered(split: str, size: int = 64) -> tuple[list[Image.Image], np.ndarray]:
    idx = digits.split_indices(split)
    return [digits.render_digit(SKL.images[i], size) for i in idx], SKL.target[idx]


def test_digit_classifier_is_a_logistic_regression_on_train_images_only(cache):
    train_imgs, train_labels = rendered("train")
    val_imgs, val_labels = rendered("val")
    # Reference: an independent scikit-learn fit on the train split's 8x8 area-averaged ink.
    feats = lambda ims: np.stack([1 - np.asarray(im.convert("L").resize((8, 8), Image.Resampling.BOX), float).ravel() / 255
                                  for im in ims])
    scaler = StandardScaler().fit(feats(train_imgs))
    ref = LogisticRegression(C=0.1, max_iter=2000).fit(scaler.transform(feats(train_imgs)), train_labels)
    expected = ref.predict(scaler.transform(feats(val_imgs)))

    clf = digit_scorer.digit_classifier(64)
    assert (clf.predict(val_imgs) == expected).all()
    assert (clf.predict(val_imgs) == val_labels).mean() >= 0.95  # it reads real held-out digits


def test_digit_classifier_is_cached_per_image_size(cache, monkeypatch):
    first = digit_scorer.digit_classifier(32)
    files = list((cache / "digit-classifier").glob("*.npz"))
    assert len(files) == 1 and "32px" in files[0].name

    def no_refit(*a, **k):
        raise AssertionError("refitted although cached")

    monkeypatch.setattr(digit_scorer.DigitClassifier, "fit", no_refit)
    again = digit_scorer.digit_classifier(32)
    assert np.array_equal(again.coef, first.coef) and np.array_equal(again.mean, first.mean)
    with pytest.raises(AssertionError, match="refitted"):
        digit_scorer.digit_classifier(16)  # another size is another classifier


def test_image_match_scores_each_image_against_its_label(cache):
    imgs, labels = rendered("val")
    scorer = build_image_scorers(["digit_classifier"], ScorerOptions(image_size=64))[0]
    right = scorer.score(imgs, [{"label": int(y)} for y in labels])["image_match"]
    wrong = scorer.score(imgs, [{"label": int(y + 1) % 10} for y in labels])["image_match"]
    assert len(right) == len(imgs) and set(right) <= {0.0, 1.0}
    assert np.mean(right) >= 0.95 and np.mean(wrong) <= 0.05
    with pytest.raises(ImageScoringError, match=r"digit_classifier: sample 1 has no 'label'.*\['prompt'\]"):
        scorer.score(imgs[:2], [{"label": 1}, {"prompt": "Draw the digit 1"}])


def test_scorers_are_chosen_by_the_data_format_and_clip_model():
    from chameleon_ft.data.formats import get_format

    assert get_format("digits").image_scorer == "digit_classifier"
    assert get_format("jsonl").image_scorer is None
    assert image_scorer_names(get_format("digits").image_scorer, None) == ["digit_classifier"]
    assert image_scorer_names(get_format("jsonl").image_scorer, "/clip") == ["clip"]
    assert image_scorer_names("digit_classifier", "/clip") == ["digit_classifier", "clip"]
    assert {"clip", "digit_classifier"} <= set(IMAGE_SCORERS.names())
    with pytest.raises(ConfigError, match=r"image_scorer='nope' is not a registered image scorer; choose one of \[.*'clip'"):
        build_image_scorers(["nope"], ScorerOptions(image_size=64))


# --- CLIP ---------------------------------------------------------------------------------------------------
def write_tiny_clip(out) -> None:
    """A randomly initialised CLIP with tiny sizes, its processor and a byte-level tokenizer (no merges)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizerFast

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tokenizer = CLIPTokenizerFast(vocab=vocab, merges=[])
    eos = vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=48, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(4)  # a seed whose similarities straddle zero: the score's clamp at 0 shows
    CLIPModel(config).save_pretrained(out)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "tiny-clip"
    write_tiny_clip(out)
    return out


def test_clip_score_is_clips_own_image_text_similarity(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    imgs, labels = rendered("val")
    imgs, labels = imgs[:5] + [Image.new("RGB", (64, 64), "white")], list(labels[:5]) + [0]
    prompts = [f"Draw the digit {y}" for y in labels]
    prompts[2] = "Draw the digit 3, " + "very carefully " * 20  # longer than the text model: truncated
    scorer = build_image_scorers(["clip"], ScorerOptions(image_size=64, clip_model=str(tiny_clip)))[0]
    got = scorer.score(imgs, [{"prompt": p} for p in prompts])["clip_score"]

    # Reference: CLIP's full forward pass (logits = scale * cosine), one pair at a time.
    model, proc = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    expected = []
    with torch.no_grad():
        for im, p in zip(imgs, prompts):
            inputs = proc(text=[p], images=[im], return_tensors="pt", truncation=True, max_length=48)
            cos = model(**inputs).logits_per_image[0, 0] / model.logit_scale.exp()
            expected.append(max(100 * float(cos), 0.0))
    assert got == pytest.approx(expected, abs=1e-4)
    assert min(got) == 0.0 and len({round(g, 4) for g in got if g > 0}) >= 2  # clamped at 0; pairs differ


def test_clip_scorer_errors_name_the_directory_and_the_sample(tiny_clip, tmp_path):
    with pytest.raises(ConfigError, match=f"eval.clip_model={tmp_path}: not a local CLIP directory"):
        build_image_scorers(["clip"], ScorerOptions(image_size=64, clip_model=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ConfigError, match="cannot load a CLIPModel"):
        build_image_scorers(["clip"], ScorerOptions(image_size=64, clip_model=str(tmp_path)))
    with pytest.raises(ConfigError, match="needs eval.clip_model"):
        build_image_scorers(["clip"], ScorerOptions(image_size=64))
    scorer = build_image_scorers(["clip"], ScorerOptions(image_size=64, clip_model=str(tiny_clip)))[0]
    with pytest.raises(ImageScoringError, match="clip: sample 0 has no 'prompt'"):
        scorer.score([Image.new("RGB", (64, 64))], [{"label": 3}])
