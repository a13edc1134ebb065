import json
import math

import pytest
import torch
from datasets import Dataset

from chameleon_ft.errors import ChameleonFTError
from chameleon_ft.evaluation.evaluate import (
    EvaluationError,
    evaluate_predictions,
    evaluate_split,
    teacher_forced_metrics,
)
from chameleon_ft.generation.generate import generate_text
from chameleon_ft.model.checkpoint import load_model, load_tokenizer
from chameleon_ft.model.tokens import ChameleonTokens
from tests.export.helpers import write_small_checkpoint


def user_prompt(T, tok, text):
    """The Lumina-mGPT chat template of one user turn, written out: <s> text <reserved08706>."""
    return [T.bos, *tok.encode(text, add_special_tokens=False), T.eot]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ckpt = write_small_checkpoint(tmp_path_factory.mktemp("ev") / "ckpt", layout="grouped", seed=31)
    return load_model(ckpt), ChameleonTokens.from_checkpoint(ckpt), load_tokenizer(ckpt)


def test_vqa_metrics_from_meta_answers():
    metas = [json.dumps({"answers": ["2"] * 10}), {"answers": ["dog"] * 7 + ["cat"] * 3}, {"answers": ["red"]}]
    m = evaluate_predictions("vqa", ["Two", "cat", "blue"], metas)
    # Ten identical answers: the official evaluation normalises nothing, so "Two" does not match "2": 0.
    # "cat" matches 3 of 10: leaving out a "dog" keeps 3 matches (1.0), leaving out a "cat" keeps 2 (2/3);
    # averaged over the ten subsets. "blue" has one reference, no match: 0.
    cat = (7 * 1.0 + 3 * (2 / 3)) / 10
    assert m["acc"] == pytest.approx((0.0 + cat + 0.0) / 3)
    assert m["exact_match"] == pytest.approx(1 / 3)  # only "cat" is literally among its answers


def test_captioning_metrics_and_target_fallback():
    refs = [["a dog runs on the grass"], ["two cats sleep on a red sofa"], ["a man rides a blue bike"]]
    m = evaluate_predictions("captioning", [r[0] for r in refs], [{"references": r} for r in refs])
    assert m["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert m["cider"] > 1.0
    m2 = evaluate_predictions("captioning", [r[0] for r in refs], [{}, {}, {}], targets=[r[0] for r in refs])
    assert m2 == m


def test_prediction_errors_are_clear():
    with pytest.raises(EvaluationError, match="must align"):
        evaluate_predictions("vqa", ["a"], [{}, {}])
    with pytest.raises(EvaluationError, match="no generation metrics"):
        evaluate_predictions("text_to_image", ["a"], [{}])
    with pytest.raises(EvaluationError, match="not JSON"):
        evaluate_predictions("vqa", ["a"], ["{oops"])
    with pytest.raises(EvaluationError, match="no 'answers' and no target"):
        evaluate_predictions("vqa", ["a"], [{}])


def image_sample(T, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(T.num_codes, (2, 2), generator=gen)
    prompt = [T.bos, T.vocab["t1"], T.vocab["t2"], T.eot]
    image = [T.boi, T.size_token(32), T.size_token(32)]
    for r in range(2):
        image += [int(T.code_to_id[c]) for c in codes[r]] + [T.row_end]
    image += [T.eoi, T.eot]
    return {"input_ids": prompt + image, "labels": [-100] * len(prompt) + image}


def test_teacher_forced_image_metrics_match_a_direct_computation(setup):
    model, T, _ = setup
    samples = [image_sample(T, 1), image_sample(T, 2), image_sample(T, 3)]
    model.config.mask_image_logits = False  # a text-to-image model: image logits are not masked
    ce_all, ce_img, hits = [], [], []
    image_ids = T.image_token_ids
    try:
        for s in samples:  # one at a time, no padding, plain logits
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([s["input_ids"]])).logits[0]
            for t in range(1, len(s["labels"])):
                y = s["labels"][t]
                if y == -100:
                    continue
                ce = float(torch.nn.functional.cross_entropy(logits[t - 1][None], torch.tensor([y])))
                ce_all.append(ce)
                if y in set(image_ids.tolist()):
                    ce_img.append(ce)
                    hits.append(int(image_ids[logits[t - 1, image_ids].argmax()]) == y)
        got = teacher_forced_metrics(model, T, samples, batch_size=2)
    finally:
        model.config.mask_image_logits = True
    assert len(ce_img) == 3 * 4
    assert got["loss"] == pytest.approx(sum(ce_all) / len(ce_all), rel=1e-5)
    assert got["image_perplexity"] == pytest.approx(math.exp(sum(ce_img) / len(ce_img)), rel=1e-5)
    assert got["image_token_accuracy"] == pytest.approx(sum(hits) / len(hits))


def test_evaluate_split_generates_answers_and_scores_them(setup):
    model, T, tok = setup
    prompts = [user_prompt(T, tok, t) for t in ("t1 t2", "t3", "t4 t5 t6")]
    answers = generate_text(model, T, tok, prompts, max_new_tokens=3)
    # First sample's reference is what the model says (accuracy 1), the others are wrong.
    targets = [answers[0]["text"], "t39 t39", "t38"]
    rows = []
    for p, t in zip(prompts, targets):
        ans = tok.encode(t, add_special_tokens=False) + [T.eot]
        rows.append({"input_ids": p + ans, "labels": [-100] * len(p) + ans, "prompt_ids": p, "target": t,
                     "meta": json.dumps({"task": "vqa", "answers": [t]})})
    metrics, preds = evaluate_split(model, T, tok, Dataset.from_list(rows), "vqa", batch_size=2, max_new_tokens=3)
    assert [p["prediction"] for p in preds] == [a["text"] for a in answers]
    assert metrics["num_samples"] == 3
    assert metrics["acc"] == pytest.approx(1 / 3)
    assert "image_token_accuracy" not in metrics and metrics["loss"] > 0


def test_teacher_forced_loss_equals_the_models_own_loss_with_masking_on(setup):
    model, T, _ = setup
    assert model.config.mask_image_logits
    words = [T.vocab[f"t{i}"] for i in range(1, 9)]
    samples = []
    for k in range(3):
        prompt = [T.bos, *words[k : k + 3], T.eot]
        answer = [*words[k + 3 : k + 5], T.eot]
        samples.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    got = teacher_forced_metrics(model, T, samples, batch_size=3)
    with torch.no_grad():
        sums = [model(input_ids=torch.tensor([s["input_ids"]]), labels=torch.tensor([s["labels"]])).loss_sums
                for s in samples]
    expected = sum(float(x.ce_sum) for x in sums) / sum(int(x.n_tokens) for x in sums)
    assert got["loss"] == pytest.approx(expected, rel=1e-5)  # what validation reports as val/loss


def test_metric_options_reach_the_task_scorers():
    metas = [{"answers": ["yes"] * 10}]
    # Ten identical answers: the official evaluation compares raw strings; "always" normalises both sides.
    assert evaluate_predictions("vqa", ["Yes."], metas)["acc"] == 0.0
    assert evaluate_predictions("vqa", ["Yes."], metas, vqa_normalization="always")["acc"] == 1.0
    refs = [{"references": ["a dog runs"]}]
    assert evaluate_predictions("captioning", ["a dog runs"], refs, caption_tokenizer="ptb-python")["cider"] >= 0
    with pytest.raises(ChameleonFTError, match="nonsense"):  # the option reaches the caption scorer
        evaluate_predictions("captioning", ["a dog runs"], refs, caption_tokenizer="nonsense")
