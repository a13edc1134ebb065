import math

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from chameleon_ft.evaluation.metrics import (
    MetricInputError,
    bleu4,
    caption_metrics,
    caption_tokenize,
    cider_d,
    exact_match,
    normalize_text,
    normalize_vqa_answer,
    vqa_accuracy,
    vqa_soft_accuracy,
)

# --- VQA ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,norm", [
    ("Two", "2"),                    # number words -> digits, lowercase
    ("none", "0"),
    ("The dog", "dog"),              # articles dropped
    ("an apple a day", "apple day"),
    ("Yes.", "yes"),                 # period not before a digit dropped
    ("3.5", "3.5"),                  # period before a digit kept
    ("1,000", "1000"),               # digit,digit comma: all marks deleted, no space
    ("red, white", "red white"),     # mark touching a space: deleted
    ("black/white", "black white"),  # mark between letters: becomes a space
    ("hello-world!", "hello world"),
    ("dont", "don't"),               # contractions table
    ("isnt it", "isn't it"),
    ("  Left\tside \n", "left side"),  # whitespace
    ("somebody'd", "somebodyd"),     # the official table's reversed entry
])
def test_normalize_vqa_answer(raw, norm):
    assert normalize_vqa_answer(raw) == norm


@pytest.mark.parametrize("matches,acc", [
    (0, 0.0),
    (1, (1 * 0 + 9 * (1 / 3)) / 10),               # 0.3
    (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),         # 0.6
    (3, (3 * (2 / 3) + 7 * 1.0) / 10),             # 0.9
    (4, 1.0),
    # Ten identical answers: the official evaluation compares them raw, so "2" does not match "Two".
    (10, 0.0),
])
def test_vqa_soft_accuracy_ten_answers(matches, acc):
    answers = ["Two"] * matches + ["three", "four", "5", "six", "seven", "eight", "nine", "ten", "1", "0"][: 10 - matches]
    assert vqa_soft_accuracy("2", answers) == pytest.approx(acc)


def test_vqa_soft_accuracy_fewer_answers_is_exact_match():
    assert vqa_soft_accuracy("A red car.", ["blue car", "red car"]) == 1.0
    assert vqa_soft_accuracy("red", ["blue car", "red car"]) == 0.0
    with pytest.raises(MetricInputError):
        vqa_soft_accuracy("x", [])


def test_vqa_accuracy_mean_and_alignment():
    preds = ["yes", "two"]
    answers = [["yes"] * 10, ["2", "2", "3", "3", "3", "3", "3", "3", "3", "3"]]
    assert vqa_accuracy(preds, answers) == pytest.approx((1.0 + 0.6) / 2)
    with pytest.raises(MetricInputError, match="2 predictions but 1"):
        vqa_accuracy(preds, answers[:1])


def test_exact_match():
    assert normalize_text("  The Cat, sat!  ") == "the cat sat"
    assert exact_match(["The cat.", "a Dog", "bird"], ["the cat", ["cat", "A dog!"], "fish"]) == pytest.approx(2 / 3)


# --- captions ----------------------------------------------------------------------------------------------

def test_caption_tokenize_rule():
    # coco-caption's tokens: its punctuation list drops "-LRB-" but not the lower-cased "-lrb-" the jar prints.
    assert caption_tokenize("A dog's ball, (red) isn't \"here\"...") == \
        ["a", "dog", "'s", "ball", "-lrb-", "red", "-rrb-", "is", "n't", "here"]
    assert caption_tokenize("A black-and-white photo: 3.5 cats; 1,000 dogs!") == \
        ["a", "black-and-white", "photo", "3.5", "cats", "1,000", "dogs"]
    assert caption_tokenize("They're at 5 o'clock - yes") == ["they", "'re", "at", "5", "o'clock", "yes"]


def test_bleu_exact_match_is_one():
    caps = ["a man riding a horse on the beach", "two dogs play in the snow"]
    assert bleu4(caps, [[c] for c in caps]) == pytest.approx(1.0, abs=1e-6)


def test_bleu_hand_computed_single_image():
    # cand "a man is riding a red horse" (7 tokens); closest ref length is 6 ("a person rides a red horse").
    # clipped matches / candidate n-grams: 1g 7/7, 2g 6/6, 3g 4/5 (not "riding a red"),
    # 4g 2/4 ("a man is riding", "man is riding a"); c=7 > r=6 so no brevity penalty.
    got = bleu4(["A man is riding a red horse."],
                [["A man is riding a horse on the beach", "a person rides a red horse"]])
    assert got == pytest.approx((1 * 1 * (4 / 5) * (2 / 4)) ** 0.25, rel=1e-6)


def test_bleu_hand_computed_brevity_penalty_and_corpus_sums():
    # cand "a man is riding a" (5) vs ref of 7 tokens: all precisions 1, BP = exp(1 - 7/5).
    assert bleu4(["a man is riding a"], [["a man is riding a horse today"]]) == \
        pytest.approx(math.exp(1 - 7 / 5), rel=1e-6)
    # Corpus level sums counts over images before the precisions and the brevity penalty:
    # correct [7+5, 6+4, 4+3, 2+2], guesses [7+5, 6+4, 5+3, 4+2], c = 12, r = 6 + 7 = 13.
    got = bleu4(["a man is riding a red horse", "a man is riding a"],
                [["a man is riding a horse on the beach", "a person rides a red horse"],
                 ["a man is riding a horse today"]])
    want = (1 * 1 * (7 / 8) * (4 / 6)) ** 0.25 * math.exp(1 - 13 / 12)
    assert got == pytest.approx(want, rel=1e-6)


def test_cider_hand_computed():
    # Two images, one reference each. idf = log(2) - log(df): "a" is in both reference sets (idf 0), every
    # other reference n-gram in one (idf log 2). Image 1 cand == ref: cosine 1 for n = 1, 2, 3; no 4-grams
    # (0); no length gap -> mean 3/4, x10 = 7.5.
    # Image 2 cand "a cat" vs "a cat sleeps": n=1 vectors {cat: l} vs {cat: l, sleeps: l} -> 1/sqrt2, n=2 the
    # same, n=3,4 -> 0; the length gap of 1 gives exp(-1 / (2 * 6^2)) -> (2/sqrt2)/4 * 10 * exp(-1/72).
    img1 = 7.5
    img2 = (2 / math.sqrt(2)) / 4 * 10 * math.exp(-1 / 72)
    got = cider_d(["A dog runs.", "a cat"], [["a dog runs"], ["a cat sleeps"]])
    assert got == pytest.approx((img1 + img2) / 2, rel=1e-6)


def test_cider_clips_repeated_candidate_words():
    # "dog dog" vs "a dog runs": unclipped the 1-gram cosine would be 2l*l / (2l * sqrt2 l) = 1/sqrt2;
    # CIDEr-D clips the candidate's tf-idf to the reference's, giving l*l / (2l * sqrt2 l) = 1/(2 sqrt2).
    # "dog dog" as a 2-gram is absent from the reference -> 0; length gap 1.
    img1 = (1 / (2 * math.sqrt(2))) / 4 * 10 * math.exp(-1 / 72)
    img2 = (2 / math.sqrt(2)) / 4 * 10 * math.exp(-1 / 72)
    got = cider_d(["dog dog", "a cat"], [["a dog runs"], ["a cat sleeps"]])
    assert got == pytest.approx((img1 + img2) / 2, rel=1e-6)


def test_wrapper_matches_coco_scorers_on_pretokenised_text():
    preds = ["A man, riding a horse!", "Two dogs play in the snow.", "a plate of food on a table",
             "a red bus parked"]
    refs = [["a man rides a horse on a beach", "A person riding a brown horse.", "man on horse"],
            ["two dogs playing in snow", "Dogs running in the snow.", "two puppies in the snow"],
            ["a plate with food", "food on a plate on a wooden table"],
            ["a red double decker bus", "a bus parked on the street", "the red bus is parked"]]
    # The same captions tokenised by hand, as coco-caption's PTB step would leave them.
    res = {0: ["a man riding a horse"], 1: ["two dogs play in the snow"], 2: ["a plate of food on a table"],
           3: ["a red bus parked"]}
    gts = {0: ["a man rides a horse on a beach", "a person riding a brown horse", "man on horse"],
           1: ["two dogs playing in snow", "dogs running in the snow", "two puppies in the snow"],
           2: ["a plate with food", "food on a plate on a wooden table"],
           3: ["a red double decker bus", "a bus parked on the street", "the red bus is parked"]}
    want_bleu = Bleu(4).compute_score(gts, res, verbose=0)[0][3]
    want_cider = Cider().compute_score(gts, res)[0]
    got = caption_metrics(preds, refs)
    assert set(got) == {"bleu4", "cider"}
    assert got["bleu4"] == pytest.approx(want_bleu, rel=1e-9)
    assert got["cider"] == pytest.approx(want_cider, rel=1e-9)
    assert 0 < got["bleu4"] < 1 and got["cider"] > 0


def test_caption_metrics_bad_input():
    with pytest.raises(MetricInputError, match="1 predictions but 2"):
        caption_metrics(["a"], [["a"], ["b"]])
    with pytest.raises(MetricInputError, match="item 0"):
        caption_metrics(["a"], [[]])
    with pytest.raises(MetricInputError, match="item 0"):
        caption_metrics(["a"], ["a cat"])
    with pytest.raises(MetricInputError, match="item 1: predictions and references must be strings"):
        caption_metrics(["a", "b"], [["a"], ["b", None]], tokenizer="ptb-python")
