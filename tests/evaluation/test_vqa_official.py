"""VQAv2 accuracy against the rules of the official evaluation (GT-Vision-Lab/VQA vqaEval.py).

Expected scores are computed by hand. With 10 human answers of which m equal the (processed) prediction, the
official score is the mean over the ten leave-one-out subsets of min(1, matches / 3):
    m=0 -> 0,  m=1 -> (9 * 1/3) / 10 = 0.3,  m=2 -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6,
    m=3 -> (3 * 2/3 + 7 * 1) / 10 = 0.9,  m>=4 -> 1.
"""

import random
import re

import pytest

from chameleon_ft.evaluation.metrics import (
    MetricInputError,
    normalize_vqa_answer,
    vqa_accuracy,
    vqa_soft_accuracy,
)


def split(hit: str, m: int, other: str = "zzz") -> list[str]:
    """Ten answers: ``m`` copies of ``hit``, the rest ``other``."""
    return [hit] * m + [other] * (10 - m)


CASES = [
    # -- all ten answers identical: only newlines/tabs -> spaces and strip, nothing else ------------------------
    ("yes", ["yes"] * 10, 1.0),                       # identical strings
    ("Yes", ["yes"] * 10, 0.0),                       # no lowercasing when unanimous
    ("yes.", ["yes"] * 10, 0.0),                      # no period strip when unanimous
    (" yes\n", ["yes"] * 10, 1.0),                    # newline -> space, then strip
    ("yes\t", ["yes"] * 10, 1.0),                     # tab -> space, then strip
    ("two", ["2"] * 10, 0.0),                         # no number words when unanimous
    ("the dog", ["dog"] * 10, 0.0),                   # no article removal when unanimous
    ("dog", [" dog "] * 10, 1.0),                     # the answers are stripped too
    ("dog", ["dog"] * 9 + ["dog\t"], 1.0),            # unanimity is judged after the strip
    ("Dog", ["dog"] * 10, 0.0),                       # case matters when unanimous
    ("dont", ["don't"] * 10, 0.0),                    # no contraction table when unanimous
    # -- one differing answer switches normalisation on for every answer and the prediction -------------------
    ("Dog", ["dog"] * 9 + ["Dog"], 1.0),              # all become "dog": m=10
    ("dont", ["don't"] * 9 + ["dont"], 1.0),          # "dont" -> "don't" everywhere: m=10
    ("yes", ["yes"] * 4 + ["Yes"] * 6, 1.0),          # lowercase: m=10
    ("no", ["yes"] * 9 + ["no"], 0.3),                # m=1
    # -- number words, articles, case -------------------------------------------------------------------------
    ("Two", split("2", 3, "3"), 0.9),                 # two -> 2, m=3
    ("2", split("two", 2, "3"), 0.6),                 # answers mapped too, m=2
    ("none", split("0", 1, "1"), 0.3),                # none -> 0, m=1
    ("zero", split("none", 1, "no"), 0.3),            # zero and none both -> 0, m=1
    ("Ten", split("10", 4, "9"), 1.0),                # ten -> 10, m=4
    ("eleven", split("11", 4, "9"), 0.0),             # only zero..ten are mapped
    ("TWO", split("2", 1, "3"), 0.3),                 # lowercased first, then mapped, m=1
    ("a dog", split("dog", 4, "cat"), 1.0),           # article dropped, m=4
    ("The Dog.", split("dog", 2, "cat"), 0.6),        # period, case, article, m=2
    ("an apple", split("apple", 3, "pear"), 0.9),     # m=3
    ("the", split("the", 2, "a"), 1.0),               # every answer becomes "", m=10
    # -- punctuation --------------------------------------------------------------------------------------------
    ("yes!", split("yes", 5, "no"), 1.0),             # "!" between word and end -> space, m=5
    ("black/white", split("black white", 3, "gray"), 0.9),    # no space next to "/": becomes a space
    ("black / white", split("black white", 3, "gray"), 0.9),  # space next to "/": deleted, spaces collapse
    ("1,000", split("1000", 2, "100"), 0.6),          # digit,digit comma: marks deleted, no space
    ("red,blue", split("red blue", 4, "red"), 1.0),   # comma between letters -> space
    ("red, blue", split("red blue", 1, "red"), 0.3),  # ", " -> comma deleted
    ("black/white 1,2", split("blackwhite 12", 2), 0.6),  # digit,digit anywhere: "/" deleted too
    ("(a) dog", split("dog", 3, "cat"), 0.9),         # ")" next to space deleted, "(" -> space, "a" dropped
    ("hello-world", split("hello world", 2, "hi"), 0.6),      # "-" -> space
    ("hello - world", split("hello world", 1, "hi"), 0.3),    # " - " -> deleted
    ("@home", split("home", 2, "work"), 0.6),         # "@" -> space
    ("50%", split("50", 4, "40"), 0.0),               # "%" is not in the list: stays
    ("$5", split("5", 4, "4"), 0.0),                  # "$" is not in the list: stays
    ("it's 10:30", split("it's 10:30", 2, "10"), 0.6),    # apostrophe and colon are not in the list
    # -- periods --------------------------------------------------------------------------------------------------
    ("3.5", split("3.5", 2, "3"), 0.6),               # period before a digit stays
    ("3.", split("3", 3, "4"), 0.9),                  # period not before a digit goes
    (".5", split("5", 4, "6"), 0.0),                  # ".5" keeps its period: no match
    ("yes...", split("yes", 4, "no"), 1.0),           # every period of "..." goes
    ("yes" + "." * 32, split("yes.", 3, "no"), 0.9),  # 32 periods: all removed; "yes." -> "yes"; m=3
    ("yes" + "." * 33, split("yes.", 3, "no"), 0.0),  # 33 periods: one survives the 32-period cap
    # -- contractions table ---------------------------------------------------------------------------------------
    ("dont", split("don't", 3, "no"), 0.9),           # dont -> don't
    ("isnt", split("isn't", 2, "is"), 0.6),           # isnt -> isn't
    ("don't", split("dont", 4, "do"), 1.0),           # answers mapped; the prediction keeps its apostrophe
    ("o'clock", split("oclock", 3, "noon"), 0.9),     # oclock -> o'clock
    ("Im", split("i'm", 4, "me"), 0.0),               # the table's "Im" key is capitalised: never matches
    ("I'm", split("i'm", 3, "me"), 0.9),              # plain lowercase
    ("somebody'd", split("somebodyd", 2, "x"), 0.6),  # the table's reversed entry: somebody'd -> somebodyd
    # -- whitespace inside ---------------------------------------------------------------------------------------
    ("red\ncar", split("red car", 3, "car"), 0.9),    # newline -> space
    ("red   car", split("red car", 1, "car"), 0.3),   # split() collapses runs of spaces
]


@pytest.mark.parametrize("pred,answers,expected", CASES)
def test_official_vqa_rules(pred, answers, expected):
    assert len(answers) == 10
    assert vqa_soft_accuracy(pred, answers) == pytest.approx(expected, abs=1e-12)


def test_at_least_forty_hand_computed_cases():
    assert len(CASES) >= 40


def test_always_normalising_variant_differs_only_on_unanimous_answers():
    # The variant normalises unanimous answers too (not comparable with published numbers).
    assert vqa_soft_accuracy("Yes", ["yes"] * 10, normalization="always") == 1.0
    assert vqa_soft_accuracy("two", ["2"] * 10, normalization="always") == 1.0
    assert vqa_soft_accuracy("the dog.", ["Dog"] * 10, normalization="always") == 1.0
    assert vqa_soft_accuracy("Two", split("2", 3, "3"), normalization="always") == pytest.approx(0.9)
    assert vqa_accuracy(["Yes", "no"], [["yes"] * 10, ["no"] * 10], normalization="always") == 1.0
    assert vqa_accuracy(["Yes", "no"], [["yes"] * 10, ["no"] * 10]) == 0.5
    with pytest.raises(MetricInputError, match="unknown VQA normalization 'sometimes'"):
        vqa_soft_accuracy("x", ["x"] * 10, normalization="sometimes")
    with pytest.raises(MetricInputError, match="unknown VQA normalization"):
        vqa_accuracy(["x"], [["x"] * 10], normalization="")


def test_float_arithmetic_is_the_official_order():
    # m=2 with the matches at positions 1 and 4: per-subset accuracies in answer order, summed left to right,
    # divided by 10 -- the exact float the official script produces.
    answers = ["x", "2", "x", "x", "2", "x", "x", "x", "x", "x"]
    official = (2 / 3 + 1 / 3 + 2 / 3 + 2 / 3 + 1 / 3 + 2 / 3 + 2 / 3 + 2 / 3 + 2 / 3 + 2 / 3) / 10
    assert vqa_soft_accuracy("two", answers) == official
    # The overall accuracy is the plain mean of the per-question floats, unrounded.
    per_q = [official, 1.0, 0.0]
    got = vqa_accuracy(["two", "yes", "no"], [answers, ["yes"] * 10, ["yes"] * 10])
    assert got == (per_q[0] + per_q[1] + per_q[2]) / 3


@pytest.mark.parametrize("raw,norm", [
    ("a" + "." * 40, "a" + "." * 8),      # 40 periods: the first 32 go, 8 stay (and "a........" is no article)
    ("." * 32 + "x", "x"),
    ("." * 33 + "x", ".x"),
    ("1.5.", "1.5"),                      # the period before a digit stays, the final one goes
    ("x.y", "xy"),
])
def test_period_strip_stops_after_32(raw, norm):
    assert normalize_vqa_answer(raw) == norm


# -- an independent re-statement of the official script, from its published semantics ------------------------

_OFF_PUNCT = [';', r"/", '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
              '?', '!']
_OFF_NUM = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5',
            'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
_OFF_CONTR = {"dont": "don't", "isnt": "isn't", "oclock": "o'clock", "somebody'd": "somebodyd", "Im": "I'm",
              "wont": "won't", "thats": "that's"}


def _official_process(text):
    out = text
    for p in _OFF_PUNCT:
        if (p + ' ' in text or ' ' + p in text) or re.search(r"(\d)(,)(\d)", text) is not None:
            out = out.replace(p, '')
        else:
            out = out.replace(p, ' ')
    out = re.sub(r"(?!<=\d)(\.)(?!\d)", "", out, count=32)
    words = [_OFF_NUM.get(w, w) for w in out.lower().split()]
    words = [w for w in words if w not in ('a', 'an', 'the')]
    return ' '.join(_OFF_CONTR.get(w, w) for w in words)


def _official_score(pred, answers):
    gts = [{"answer_id": i + 1, "answer": a.replace('\n', ' ').replace('\t', ' ').strip()}
           for i, a in enumerate(answers)]
    res = pred.replace('\n', ' ').replace('\t', ' ').strip()
    if len(set(g["answer"] for g in gts)) > 1:
        for g in gts:
            g["answer"] = _official_process(g["answer"])
        res = _official_process(res)
    accs = []
    for g in gts:
        others = [o for o in gts if o != g]
        accs.append(min(1, float(len([o for o in others if o["answer"] == res])) / 3))
    return float(sum(accs)) / len(accs)


def test_matches_a_restatement_of_the_official_script_on_random_answer_sets():
    vocab = ["yes", "Yes", "yes.", "no", "2", "two", "Two", "the dog", "dog", "a dog.", "dont", "don't",
             "1,000", "1000", "black/white", "black white", "3.5", "3.", "3", "isnt", " dog ", "dog\n", "Im",
             "oclock", "o'clock", "red, blue", "red blue", "(a) cat", "cat", "none", "0", "." * 34 + "x"]
    rng = random.Random(7)
    for _ in range(2000):
        pool = rng.sample(vocab, rng.randint(1, 3))
        answers = [rng.choice(pool) for _ in range(10)]
        pred = rng.choice(vocab)
        assert vqa_soft_accuracy(pred, answers) == _official_score(pred, answers), (pred, answers)
