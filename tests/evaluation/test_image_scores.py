"""Content metrics of text-to-image (chameleon_ft.evaluation.image_scores): the ceiling is the scorer on the
VQ reconstructions of the held-out images, drawing is seeded and batched, evaluate reports image_match."""

import json

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from chameleon_ft.config.schema import EvalConfig
from chameleon_ft.data.config import DataConfig
from chameleon_ft.data.formats import digits
from chameleon_ft.data.pipeline import tokenized_split
from chameleon_ft.evaluation.evaluate import evaluate_split
from chameleon_ft.evaluation.image_scorers import ImageScoringError
from chameleon_ft.evaluation.image_scorers.digits import digit_classifier
from chameleon_ft.evaluation.image_scores import ImageScoring, mean_scores
from chameleon_ft.model.assets import CheckpointAssets
from chameleon_ft.model.checkpoint import load_model
from chameleon_ft.vq.image_tokenizer import ImageTokenizer


@pytest.fixture(scope="module")
def setup(tiny_grouped, tmp_path_factory):
    data = DataConfig(format="digits", task="text_to_image", image_size=64, max_samples=6,
                      cache_dir=str(tmp_path_factory.mktemp("cache")))
    assets = CheckpointAssets.open(tiny_grouped)
    rows = tokenized_split(data, assets, "val", progress=False).to_list()
    return data, assets, rows


def test_ceiling_is_the_classifier_on_the_vq_reconstructions_of_the_held_out_images(setup):
    data, assets, rows = setup
    scoring = ImageScoring.build(data, OmegaConf.structured(EvalConfig), assets, seed=0)
    assert [s.name for s in scoring.scorers] == ["digit_classifier"]
    metas = [json.loads(r["meta"]) for r in rows]

    # Reference: the real PNGs of these rows, encoded and decoded by the checkpoint's VQGAN.
    real = [Image.open(digits.digit_image_path(r["index"], 64)) for r in rows]
    vq = ImageTokenizer(assets.vqgan("cpu"), image_size=64)
    expected = vq.decode(vq.encode(real))
    got = scoring.reconstructions(rows)
    assert [np.asarray(g).tolist() for g in got] == [np.asarray(e).tolist() for e in expected]

    labels = np.array([m["label"] for m in metas])
    ceiling = float((digit_classifier(64).predict(expected) == labels).mean())
    assert scoring.ceilings(rows, metas) == {"image_match_ceiling": pytest.approx(ceiling)}
    with pytest.raises(ImageScoringError, match="row 0 has no image"):
        scoring.reconstructions([{"input_ids": rows[0]["prompt_ids"]}])


def test_drawing_is_seeded_batched_and_scored_per_image(setup):
    data, assets, rows = setup
    model = load_model(assets.path).eval()
    scoring = ImageScoring.build(data, OmegaConf.structured(EvalConfig), assets, seed=5)
    prompts = [r["prompt_ids"] for r in rows]
    a = scoring.draw(model, prompts, batch_size=4)
    b = scoring.draw(model, prompts, batch_size=4)
    assert len(a) == len(rows) and all(im.size == (64, 64) for im in a)
    assert [np.asarray(x).tolist() for x in a] == [np.asarray(x).tolist() for x in b]  # seeded
    scoring.seed = 6
    c = scoring.draw(model, prompts, batch_size=4)
    assert [np.asarray(x).tolist() for x in a] != [np.asarray(x).tolist() for x in c]
    metas = [json.loads(r["meta"]) for r in rows]
    per_image = scoring.score(a, metas)
    reads = digit_classifier(64).predict(a)
    assert per_image == {"image_match": [float(x == m["label"]) for x, m in zip(reads, metas)]}
    assert mean_scores(per_image) == {"image_match": pytest.approx(np.mean(per_image["image_match"]))}
    assert mean_scores({"image_match": []}) == {}


def test_evaluate_split_reports_image_match_for_every_row(setup):
    data, assets, rows = setup
    model = load_model(assets.path).eval()
    scoring = ImageScoring.build(data, OmegaConf.structured(EvalConfig), assets, seed=0)
    metrics, preds = evaluate_split(model, assets.tokens, assets.tokenizer, rows, "text_to_image", batch_size=4,
                                    max_samples=5, image_scoring=scoring)
    assert metrics["num_samples"] == 5 and len(preds) == 5
    scores = [p["scores"]["image_match"] for p in preds]
    assert metrics["image_match"] == pytest.approx(np.mean(scores))
    drawn = scoring.draw(model, [r["prompt_ids"] for r in rows[:5]], batch_size=4)
    assert scores == scoring.score(drawn, [p["meta"] for p in preds])["image_match"]
    assert metrics["image_match_ceiling"] == scoring.ceilings(rows[:5], [p["meta"] for p in preds])["image_match_ceiling"]
    assert "image_token_accuracy" in metrics
    plain, _ = evaluate_split(model, assets.tokens, assets.tokenizer, rows, "text_to_image", batch_size=4,
                              max_samples=5)
    assert "image_match" not in plain  # without scorers: the teacher-forced metrics only


def test_eval_image_top_k_and_temperature_reach_the_draws(setup):
    """eval.image_top_k / eval.image_temperature steer validation draws: top-1 is the argmax whatever the
    seed, and equals generate_images' own top-1 draw."""
    from chameleon_ft.generation.generate import generate_images

    data, assets, rows = setup
    model = load_model(assets.path).eval()
    cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), {"image_top_k": 1, "image_temperature": 0.5})
    scoring = ImageScoring.build(data, cfg, assets, seed=5)
    assert (scoring.top_k, scoring.temperature) == (1, 0.5)
    prompts = [r["prompt_ids"] for r in rows[:2]]
    a = scoring.draw(model, prompts, batch_size=2)
    scoring.seed = 6
    b = scoring.draw(model, prompts, batch_size=2)
    assert [np.asarray(x).tolist() for x in a] == [np.asarray(x).tolist() for x in b]
    ref = generate_images(model, assets.tokens, prompts, width=64, height=64, layout=scoring.layout,
                          cfg_scale=scoring.cfg_scale, image_top_k=1, seed=0)
    assert [np.asarray(x).tolist() for x in a] == [np.asarray(x).tolist() for x in scoring.decoder.decode([r["codes"] for r in ref])]
