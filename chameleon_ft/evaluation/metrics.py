"""Answer and caption metrics: VQAv2 accuracy, exact match, BLEU-4 and CIDEr-D (coco-caption definitions).

BLEU and CIDEr-D are scored by ``pycocoevalcap``'s pure-Python ``Bleu``/``Cider`` classes (the reference
coco-caption code); only its Java PTB tokenizer is replaced, by :func:`caption_tokenize`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from chameleon_ft.errors import ChameleonFTError

# --- VQAv2 answer normalisation (rules of the official vqaEval.py) ------------------------------------------

# Punctuation the official script strips or turns into spaces. Note: no apostrophe, no period (handled apart).
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
              "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# A period not followed by a digit is dropped ("3.5" survives, "yes." -> "yes"). The official pattern also
# carries a malformed look-behind that never fires, so this is its effective behaviour.
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
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


class MetricInputError(ChameleonFTError, ValueError):
    """Predictions and references do not line up, or a reference set is empty."""


def _vqa_punctuation(text: str) -> str:
    # Official rule: a mark touching a space, or any text with a digit,digit comma, is deleted; otherwise
    # it becomes a space ("black/white" -> "black white", "1,000" -> "1000", "red, blue" -> "red blue").
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _VQA_PUNCT:
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def normalize_vqa_answer(answer: str) -> str:
    """VQAv2 normalisation: whitespace, punctuation, lowercase, number words -> digits, no articles,
    contractions restored (e.g. ``"Two dogs."`` -> ``"2 dogs"``, ``"dont"`` -> ``"don't"``)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    text = _vqa_punctuation(text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_soft_accuracy(pred: str, answers: Sequence[str]) -> float:
    """Accuracy of one prediction against the human answers, both normalised with :func:`normalize_vqa_answer`.

    With 10 answers (VQAv2): the mean over the ten leave-one-out subsets of ``min(#matches in the 9 / 3, 1)``.
    With any other count the 10-annotator formula does not apply, so this is exact match against any answer
    (1.0 or 0.0). Unlike the official script, which skips normalisation when all ten answers agree, both
    sides are always normalised (so "Two" matches ten "2"s).
    """
    if not answers:
        raise MetricInputError("vqa_soft_accuracy: no reference answers")
    p = normalize_vqa_answer(pred)
    hits = [normalize_vqa_answer(a) == p for a in answers]
    if len(answers) != 10:
        return float(any(hits))
    total = sum(hits)
    return sum(min((total - h) / 3.0, 1.0) for h in hits) / 10.0


def vqa_accuracy(preds: Sequence[str], answers_list: Sequence[Sequence[str]]) -> float:
    """Mean :func:`vqa_soft_accuracy` over questions."""
    _check_aligned(preds, answers_list, "vqa_accuracy")
    return sum(vqa_soft_accuracy(p, a) for p, a in zip(preds, answers_list)) / len(preds)


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

# coco-caption drops these PTB tokens after tokenising; brackets and quotes are dropped too (PTB turns them into
# -LRB-, ``, ... which that list removes).
_CAPTION_DROP = frozenset(".?!,:;-'`\"()[]{}")
_CAPTION_TOKEN = re.compile(
    r"n't(?![^\W_])"                                          # clitic split off below: "do n't"
    r"|'(?:s|re|ve|ll|d|m)(?![^\W_])"                         # clitics: "dog 's", "they 're"
    r"|[^\W_]+(?:(?:-|'|(?<=\d)[.,](?=\d))[^\W_]+)*"          # words, hyphenated words, o'clock, 3.5, 1,000
    r"|\S"                                                    # any other single symbol
)


def caption_tokenize(text: str) -> list[str]:
    """Java-free stand-in for coco-caption's PTB tokenisation + punctuation removal.

    Rule: lowercase; split the clitics ``n't 's 're 've 'll 'd 'm`` off their word (PTB style); tokens are
    words (letters/digits, joined by inner hyphens or apostrophes, or by ``.``/``,`` between digits) or single
    symbols; then drop the tokens ``. ? ! , : ; - ' ` "`` and brackets. Same output as coco-caption on plain
    captions; exotic PTB cases (abbreviations with periods, ``--``) may differ.
    """
    text = text.lower().replace("\n", " ")
    text = re.sub(r"([^\W_])n't(?![^\W_])", r"\1 n't", text)
    text = re.sub(r"([^\W_])'(s|re|ve|ll|d|m)(?![^\W_])", r"\1 '\2", text)
    return [t for t in _CAPTION_TOKEN.findall(text) if t not in _CAPTION_DROP]


def _coco_inputs(preds: Sequence[str], refs: Sequence[Sequence[str]]):
    _check_aligned(preds, refs, "caption_metrics")
    res, gts = {}, {}
    for i, (p, rs) in enumerate(zip(preds, refs)):
        if isinstance(rs, str) or not rs:
            raise MetricInputError(f"caption_metrics: item {i} needs a non-empty list of reference captions")
        res[i] = [" ".join(caption_tokenize(p))]
        gts[i] = [" ".join(caption_tokenize(r)) for r in rs]
    if not any(r for rs in gts.values() for r in rs):
        raise MetricInputError("caption_metrics: every reference caption is empty after tokenisation")
    return res, gts


def bleu4(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4, coco-caption style: clipped n-gram counts summed over images, brevity penalty with the
    reference length closest to each candidate, geometric mean of the 1..4-gram precisions."""
    from pycocoevalcap.bleu.bleu import Bleu

    res, gts = _coco_inputs(preds, refs)
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return float(scores[3])


def cider_d(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """CIDEr-D (coco-caption's ``Cider``): tf-idf n-gram vectors (n = 1..4, document frequencies over the
    reference sets of these images), candidate counts clipped by each reference, Gaussian length penalty
    (sigma 6), mean over references, x10, averaged over images. With one image every idf is 0, so it is 0."""
    from pycocoevalcap.cider.cider import Cider

    res, gts = _coco_inputs(preds, refs)
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def caption_metrics(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, float]:
    """``{"bleu4": ..., "cider": ...}`` for candidate captions ``preds[i]`` against references ``refs[i]``."""
    return {"bleu4": bleu4(preds, refs), "cider": cider_d(preds, refs)}


def _check_aligned(preds: Sequence, refs: Sequence, what: str) -> None:
    if len(preds) != len(refs):
        raise MetricInputError(f"{what}: {len(preds)} predictions but {len(refs)} reference entries")
    if not preds:
        raise MetricInputError(f"{what}: no predictions to score")
