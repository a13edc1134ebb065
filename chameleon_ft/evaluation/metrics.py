"""Answer and caption metrics, identical to the code published numbers come from.

- VQAv2 accuracy: the official evaluation (GT-Vision-Lab/VQA ``vqaEval.py``), quirks included;
- BLEU-4 and CIDEr-D: coco-caption end to end: its tokenization (:mod:`chameleon_ft.evaluation.coco_tokenizer`:
  Stanford's PTBTokenizer through Java, or its Java-free emulation) and ``pycocoevalcap``'s ``Bleu``/``Cider``;
- exact match after a simple normalisation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from chameleon_ft.errors import ChameleonFTError
from chameleon_ft.evaluation.coco_tokenizer import (
    PTB_PYTHON,
    CaptionTokenizerError,
    coco_tokenize,
    resolve_caption_tokenizer,
)

__all__ = [
    "VQA_NORMALIZATIONS", "MetricInputError", "bleu4", "caption_metrics", "caption_tokenize", "cider_d",
    "exact_match", "normalize_text", "normalize_vqa_answer", "resolve_caption_tokenizer", "vqa_accuracy",
    "vqa_soft_accuracy",
]

# --- VQAv2 accuracy (the official evaluation, GT-Vision-Lab/VQA vqaEval.py) ------------------------------

# Marks the official script strips or turns into spaces. Not the apostrophe, colon or period (apart below).
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
              "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# A period not followed by a digit goes ("yes." -> "yes", "3.5" stays). The official pattern also carries a
# malformed look-behind, "(?!<=\d)", a look-ahead for the text "<=" + digit, which can never hold before a
# period; and it passes re.UNICODE (32) where re.sub takes its count, so at most 32 periods are removed.
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_PERIOD_STRIP_MAX = 32
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# Apostrophe-less spelling -> canonical contraction, as the VQA evaluation tables them. Only lowercase keys:
# the official table's capitalised keys ("Im", "Ive", ...) can never match lowercased text.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    # The official table maps this one backwards; kept so scores match the official evaluator.
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
VQA_NORMALIZATIONS = ("official", "always")


class MetricInputError(ChameleonFTError, ValueError):
    """Predictions and references do not line up, a reference set is empty, or an option is unknown."""


def _vqa_whitespace(text: str) -> str:
    # Done to every answer and prediction before anything else.
    return text.replace("\n", " ").replace("\t", " ").strip()


def _vqa_punctuation(text: str) -> str:
    # A mark touching a space, or any mark once the text has a digit,digit comma, is deleted; otherwise it
    # becomes a space ("black/white" -> "black white", "1,000" -> "1000", "red, blue" -> "red blue"). The tests
    # look at the original text, the replacements act on the running result.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _VQA_PUNCT:
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_MAX)


def _vqa_digits_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA answer normalisation: newlines/tabs to spaces and strip; punctuation rule; at most 32
    periods not before a digit removed; lowercase; number words to digits; articles dropped; apostrophe-less
    contractions restored (``"Two dogs."`` -> ``"2 dogs"``, ``"dont"`` -> ``"don't"``).

    The official evaluation applies it only to questions whose human answers are not all identical; see
    :func:`vqa_soft_accuracy`.
    """
    return _vqa_digits_articles(_vqa_punctuation(_vqa_whitespace(answer)))


def _check_normalization(normalization: str) -> None:
    if normalization not in VQA_NORMALIZATIONS:
        raise MetricInputError(f"unknown VQA normalization {normalization!r}; choose one of {VQA_NORMALIZATIONS}")


def vqa_soft_accuracy(pred: str, answers: Sequence[str], *, normalization: str = "official") -> float:
    """Accuracy of one prediction against its human answers, as the official VQA evaluation scores it.

    With 10 answers (VQAv2): the mean over the ten leave-one-out subsets of ``min(#matches in the 9 / 3, 1)``.
    ``normalization="official"`` reproduces the official script exactly: both sides lose newlines, tabs and
    outer whitespace; when the ten answers are all identical nothing else is done (``"Yes"`` against ten
    ``"yes"`` scores 0), otherwise both sides go through :func:`normalize_vqa_answer`.
    ``normalization="always"`` normalises both sides in every case; its numbers are NOT comparable with
    published VQAv2 results.

    With any other number of answers the 10-annotator formula does not apply and there is no official
    reference: the score is exact match (1.0 or 0.0) against any answer, both sides always normalised.
    """
    _check_normalization(normalization)
    if not answers:
        raise MetricInputError("vqa_soft_accuracy: no reference answers")
    if len(answers) != 10:
        p = normalize_vqa_answer(pred)
        return float(any(normalize_vqa_answer(a) == p for a in answers))
    gts = [_vqa_whitespace(a) for a in answers]
    res = _vqa_whitespace(pred)
    if normalization == "always" or len(set(gts)) > 1:
        gts = [_vqa_digits_articles(_vqa_punctuation(a)) for a in gts]
        res = _vqa_digits_articles(_vqa_punctuation(res))
    hits = [g == res for g in gts]
    total = sum(hits)
    # Same float operations, in the same order, as the official script: min(1, n/3) per subset, then the mean.
    per_subset = [min(1, float(total - h) / 3) for h in hits]
    return float(sum(per_subset)) / len(per_subset)


def vqa_accuracy(preds: Sequence[str], answers_list: Sequence[Sequence[str]], *,
                 normalization: str = "official") -> float:
    """Mean :func:`vqa_soft_accuracy` over questions (the official overall accuracy, as a fraction, unrounded)."""
    _check_normalization(normalization)
    _check_aligned(preds, answers_list, "vqa_accuracy")
    scores = [vqa_soft_accuracy(p, a, normalization=normalization) for p, a in zip(preds, answers_list)]
    return float(sum(scores)) / len(scores)


# --- exact match -------------------------------------------------------------------------------------------

_NON_WORD = re.compile(r"[^\w\s]|_")


def normalize_text(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed."""
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def exact_match(preds: Sequence[str], refs: Sequence[str | Sequence[str]]) -> float:
    """Fraction of predictions equal to their reference (or to any of a list of references) after
    :func:`normalize_text`."""
    _check_aligned(preds, refs, "exact_match")
    hits = 0
    for p, r in zip(preds, refs):
        options = [r] if isinstance(r, str) else list(r)
        hits += normalize_text(p) in {normalize_text(o) for o in options}
    return hits / len(preds)


# --- captioning: BLEU-4 and CIDEr-D ------------------------------------------------------------------------


def caption_tokenize(text: str) -> list[str]:
    """coco-caption's tokens for one caption on its own (Stanford PTB tokens, lower-cased, coco-caption's
    punctuation removed), computed Java-free: ``"Mr. Smith can't go (now)."`` ->
    ``["mr.", "smith", "ca", "n't", "go", "-lrb-", "now", "-rrb-"]``. Scoring uses :func:`coco_tokenize` on
    whole documents instead, which is what coco-caption does."""
    line = coco_tokenize([[text]], tokenizer=PTB_PYTHON)[0][0]
    return line.split(" ") if line else []


def _coco_inputs(preds: Sequence[str], refs: Sequence[Sequence[str]], tokenizer: str, what: str):
    _check_aligned(preds, refs, what)
    for i, (p, rs) in enumerate(zip(preds, refs)):
        if isinstance(rs, str) or not rs:
            raise MetricInputError(f"{what}: item {i} needs a non-empty list of reference captions")
        if not isinstance(p, str) or not all(isinstance(r, str) for r in rs):
            raise MetricInputError(f"{what}: item {i}: predictions and references must be strings, got "
                                   f"{p!r} and {list(rs)!r}")
    # Like coco-caption: all references tokenized as one document, all candidates as another.
    flat_refs = [r for rs in refs for r in rs]
    try:
        tok_refs, tok_preds = coco_tokenize([flat_refs, list(preds)], tokenizer=tokenizer)
    except CaptionTokenizerError as e:
        raise MetricInputError(f"{what}: {e}") from e
    gts, res, k = {}, {}, 0
    for i, rs in enumerate(refs):
        gts[i] = tok_refs[k: k + len(rs)]
        k += len(rs)
        res[i] = [tok_preds[i]]
    if not any(r for rs in gts.values() for r in rs):
        raise MetricInputError(f"{what}: every reference caption is empty after tokenisation")
    return res, gts


def _bleu4(gts: dict, res: dict) -> float:
    from pycocoevalcap.bleu.bleu import Bleu

    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return float(scores[3])


def _cider(gts: dict, res: dict) -> float:
    from pycocoevalcap.cider.cider import Cider

    score, _ = Cider().compute_score(gts, res)
    return float(score)


def bleu4(preds: Sequence[str], refs: Sequence[Sequence[str]], *, tokenizer: str = "auto") -> float:
    """Corpus BLEU-4, coco-caption style: clipped n-gram counts summed over images, brevity penalty with the
    reference length closest to each candidate, geometric mean of the 1..4-gram precisions."""
    res, gts = _coco_inputs(preds, refs, tokenizer, "bleu4")
    return _bleu4(gts, res)


def cider_d(preds: Sequence[str], refs: Sequence[Sequence[str]], *, tokenizer: str = "auto") -> float:
    """CIDEr-D (coco-caption's ``Cider``): tf-idf n-gram vectors (n = 1..4, document frequencies over the
    reference sets of these images), candidate counts clipped by each reference, Gaussian length penalty
    (sigma 6), mean over references, x10, averaged over images. With one image every idf is 0, so it is 0."""
    res, gts = _coco_inputs(preds, refs, tokenizer, "cider_d")
    return _cider(gts, res)


def caption_metrics(preds: Sequence[str], refs: Sequence[Sequence[str]], *,
                    tokenizer: str = "auto") -> dict[str, float]:
    """``{"bleu4": ..., "cider": ...}`` for candidate captions ``preds[i]`` against references ``refs[i]``,
    identical to coco-caption's ``COCOEvalCap`` (its tokenization, then its scorers). The captions are
    tokenized once, in one JVM when Java is used; ``tokenizer`` as in :func:`resolve_caption_tokenizer`, which
    also tells which backend a value stands for (record it next to the scores)."""
    res, gts = _coco_inputs(preds, refs, tokenizer, "caption_metrics")
    return {"bleu4": _bleu4(gts, res), "cider": _cider(gts, res)}


def _check_aligned(preds: Sequence, refs: Sequence, what: str) -> None:
    if len(preds) != len(refs):
        raise MetricInputError(f"{what}: {len(preds)} predictions but {len(refs)} reference entries")
    if not preds:
        raise MetricInputError(f"{what}: no predictions to score")
