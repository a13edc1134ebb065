"""Java-free emulation of the tokenizer coco-caption runs: Stanford CoreNLP 3.4.1's ``PTBTokenizer``.

coco-caption (``pycocoevalcap``) writes all captions of one call into a file, one caption a line, and runs
``java edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase`` on it (the jar ships inside
``pycocoevalcap``). This module reproduces that program's output without Java, so caption metrics can be
computed on machines without a JVM with the same tokens.

``PTBTokenizer`` is a JFlex scanner: at each position the rule with the longest match wins (trailing context
``a/b`` counts towards the length but only ``a`` is consumed), ties go to the rule written first, and an
action may push characters back. :class:`_Rule` and :func:`tokenize_document` implement exactly that
discipline; the rules below are the ones the 3.4.1 scanner applies with its default options
(``ptb3Escaping``: ``-LRB-``/``-RRB-``, LaTeX quotes, ``--`` dashes, ``...`` ellipses, currency and
fraction normalisation, ``cannot``/``gonna`` split) and ``tokenizeNLs`` (a newline ends an output line).
Their behaviour was established against the 3.4.1 jar itself; ``tests/evaluation/data/ptb_corpus.json``
holds the captions and the jar's output that every change is checked against.

Known deviations, both outside what captions contain in practice:

- letters and digits first assigned by Unicode after version 6.2 (for example U+A7AB) are word characters
  here but untokenizable, hence dropped, by the jar, whose character tables predate them;
- lower-casing a capital sigma inside a token that mixes Greek with digits, ideographs or joiners: Java picks
  final or medial sigma from its word-boundary rules, approximated here (plain Greek words agree).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

# -- character classes -------------------------------------------------------------------------------------


def _ranges_class(pred: Callable[[int], bool]) -> str:
    """A regex character-class body with every BMP code point satisfying ``pred``."""
    parts, start = [], None
    for cp in range(0x10000 + 1):
        ok = cp < 0x10000 and not 0xD800 <= cp <= 0xDFFF and pred(cp)
        if ok and start is None:
            start = cp
        elif not ok and start is not None:
            end = cp - 1
            parts.append(re.escape(chr(start)) if start == end else f"{re.escape(chr(start))}-{re.escape(chr(end))}")
            start = None
    return "".join(parts)


@lru_cache(maxsize=1)
def _unicode_classes() -> tuple[str, str, str]:
    # JFlex's [:letter:], [:digit:] and [:uppercase:] are Java's Character.isLetter / isDigit / isUpperCase
    # over the BMP (the scanner sees UTF-16 units, so characters outside the BMP never match them).
    letter = _ranges_class(lambda cp: unicodedata.category(chr(cp)) in ("Lu", "Ll", "Lt", "Lm", "Lo"))
    digit = _ranges_class(lambda cp: unicodedata.category(chr(cp)) == "Nd")
    upper = _ranges_class(lambda cp: unicodedata.category(chr(cp)) == "Lu")
    return letter, digit, upper


def _ci(word: str) -> str:
    """Caseless literal (the scanner is %caseless for literal text, never inside character classes)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in word)


def _ci_alt(*words: str) -> str:
    return "(?:" + "|".join(_ci(w) for w in sorted(words, key=len, reverse=True)) + ")"


# -- token normalisations (the scanner's actions) ----------------------------------------------------------

_LEFT_SINGLE = re.compile("[\u0091\u2018\u201b\u2039]")
_RIGHT_SINGLE = re.compile("[\u0092\u2019\u203a]")
_LEFT_DOUBLE = re.compile("[\u0093\u201c\u00ab]")
_RIGHT_DOUBLE = re.compile("[\u0094\u201d\u00bb]")


def _latex_quotes(tok: str, probably_left: bool) -> str:
    if probably_left:
        tok = re.sub("&apos;|'", "`", tok)
        tok = re.sub('"|&quot;', "``", tok)
    else:
        tok = re.sub("&apos;|'", "'", tok)
        tok = re.sub('"|&quot;', "''", tok)
    tok = _LEFT_SINGLE.sub("`", tok)
    tok = _RIGHT_SINGLE.sub("'", tok)
    tok = _LEFT_DOUBLE.sub("``", tok)
    return _RIGHT_DOUBLE.sub("''", tok)


def _no_soft_hyphens(tok: str) -> str:
    out = tok.replace("\u00ad", "")
    return out if out else "-"


def _currency(tok: str) -> str:
    tok = tok.replace("\u00a2", "cents").replace("\u00a3", "#")
    return re.sub("[\u0080\u00a4\u20a0\u20ac]", "$", tok)


_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}


def _parens(tok: str) -> str:
    return tok.replace("(", "-LRB-").replace(")", "-RRB-")


# -- the rules ---------------------------------------------------------------------------------------------

NEWLINE_TOKEN = "*NL*"


@dataclass(frozen=True)
class _Rule:
    name: str
    # One pattern per top-level alternative (a regex alternation stops at the first alternative that matches,
    # the scanner takes the longest); group "ctx" is the trailing context when there is one.
    patterns: tuple[re.Pattern, ...]
    action: Callable[[str], tuple[str | None, int]]   # matched text -> (token or None to skip, chars pushed back)


def _keep(text: str) -> tuple[str, int]:
    return text, 0


def _skip(text: str) -> tuple[None, int]:
    return None, 0


def _caseless_first_upper(*words: str) -> str:
    """Words whose first letter is case sensitive (written as a one-letter class in the scanner)."""
    return "(?:" + "|".join(w[0] + _ci(w[1:]) for w in sorted(words, key=len, reverse=True)) + ")"


@lru_cache(maxsize=1)
def _rules() -> tuple[_Rule, ...]:
    letter_cls, digit_cls, upper_cls = _unicode_classes()
    L = f"[{letter_cls}]"
    D = f"[{digit_cls}\u07c0-\u07c9]"
    LD = f"[{letter_cls}{digit_cls}]"

    space = "[ \t\u00a0\u2000-\u200a\u3000]"
    newline = "(?:\r\n|[\r\n\u2028\u2029\u000b\u000c\u0085])"
    spacenl = f"(?:{space}|{newline})"
    insentp = "[,;:\u3001]"
    # SGML-like tags: attribute values must be quoted, closing tags have none, a tag never spans lines.
    name = "[A-Za-z][A-Za-z0-9_:.-]*"
    quoted = "(?:'[^'\r\n]*'|\"[^\"\r\n]*\")"
    sgml = f"<(?:[!?][A-Za-z-][^>\r\n]*|{name}(?:[ ]+(?:{name}[ ]*=[ ]*{quoted}|{name}))*[ ]*/?|/{name}[ ]*)>"
    splet = f"&[aeiouAEIOU]{_ci_alt('acute', 'grave', 'uml')};"
    # Combining marks and other characters the scanner accepts inside words besides [:letter:].
    word_extra = ("\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f\u0370-\u037d\u0384"
                  "\u0385\u03cf\u03f6\u03fc-\u03ff\u0483-\u0487\u04cf\u04f6-\u04ff\u0510-\u0525\u055a-\u055f"
                  "\u0591-\u05bd\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7\u0615-\u061a\u063b-\u063f\u064b-\u065e"
                  "\u0670\u06d6-\u06ef\u06fa-\u06ff\u070f\u0711\u0730-\u074f\u0750-\u077f\u07a6-\u07b1"
                  "\u07ca-\u07f5\u07fa\u0900-\u0903\u093c\u093e-\u094e\u0951-\u0955\u0962-\u0963\u0981-\u0983"
                  "\u09bc-\u09c4\u09c7\u09c8\u09cb-\u09cd\u09d7\u09e2\u09e3\u0a01-\u0a03\u0a3c\u0a3e-\u0a4f"
                  "\u0a81-\u0a83\u0abc-\u0acf\u0b82\u0bbe-\u0bc2\u0bc6-\u0bc8\u0bca-\u0bcd\u0c01-\u0c03"
                  "\u0c3e-\u0c56\u0d3e-\u0d44\u0d46-\u0d48\u0e30-\u0e3a\u0e47-\u0e4e\u0eb1-\u0ebc\u0ec8-\u0ecd")
    wletter = f"(?:[{letter_cls}{word_extra}]|{splet})"
    # A word may hold digits after its first letter and inner . ! ? between letters: "x.y2", "yahoo!x".
    word = f"{wletter}(?:{wletter}|{D})*(?:[.!?]{wletter}(?:{wletter}|{D})*)*"
    apos = "(?:['\u0092\u2019]|" + _ci("&apos;") + ")"
    aposetc = f"(?:{apos}|[`\u0091\u2018\u201b])"
    redaux = f"{apos}(?:{_ci_alt('re', 've', 'll')}|[msdMSD])"
    sword = "[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*"
    sredaux = f"[nN]{aposetc}[tT]"
    num = f"(?:{D}*(?:[.:,\u00ad\u066b\u066c]{D}+)+|{D}+)"
    acro_special = (_ci_alt("Canada", "Sino", "Korean", "EU", "Japan", "non") + "-" + _ci("U.S") + "|"
                    + _ci("U.S.-") + "(?:" + _ci("U.S.S.R") + "|" + _ci("U.K") + ")")
    # The longer special forms come first: a regex alternation stops at the first alternative that matches.
    acro = f"(?:{acro_special}|[A-Za-z](?:\\.[A-Za-z])*)"          # a single letter counts too
    acro2 = f"(?:{acro_special}|[A-Za-z](?:\\.[A-Za-z])+)"         # at least two letters
    hyphen = "[-_\u058a\u2010\u2011]"
    thing_part = f"(?:[dDoOlL]{aposetc}{LD})?{LD}+"

    abmonth = ["Jan", "Feb", "Mar", "Apr", "Jun", "Jul", "Aug", "Sep", "Sept", "Oct", "Nov", "Dec"]
    abdays = ["Mon", "Tue", "Tues", "Wed", "Thu", "Thurs", "Fri"]
    abstate = ["Ala", "Ariz", "Calif", "Colo", "Conn", "Ct", "Dak", "Fla", "Ga", "Ind", "Kan", "Kans", "Ky",
               "Md", "Mich", "Minn", "Mo", "Mont", "Neb", "Nev", "Okla", "Penn", "Tenn", "Va", "Vt", "Wis", "Wisc",
               "Wyo"]
    abstate_cased = _caseless_first_upper("Az", "Ark", "Del", "Ill", "La", "Mass", "Miss", "Ore", "Pa", "Tex",
                                          "Wash")
    # Pp?t[ye]s?: the scanner's [ye] class is case sensitive, so "PTY." is no abbreviation.
    abcomp = ["Inc", "Co", "Cos", "Corp", "Ltd", "Plc", "Rt", "Bancorp", "Bhd", "Assn", "Univ", "Intl", "Sys"]
    pty = "[pP](?:[pP])?[tT][ye][sS]?"
    abnum = ["tel", "est", "ext", "sq"]
    abptit = ["Jr", "Sr", "Bros", "Ed.D", "Ph.D", "Blvd", "Rd", "Esq"]
    abbrev1 = ("(?:" + _ci_alt(*abmonth, *abdays, *abstate, *abcomp, *abnum, *abptit, "etc", "al", "seq", "Bldg")
               + f"|{abstate_cased}|{pty})\\.")
    abtitle = ["Mr", "Mrs", "Ms", "Dr", "Drs", "Prof", "Profs", "Sen", "Sens", "Rep", "Reps", "Atty", "Attys",
               "Lt", "Col", "Gen", "Messrs", "Gov", "Govs", "Adm", "Rev", "Maj", "Sgt", "Cpl", "Pvt", "Capt", "St",
               "Ste", "Ave", "Pres", "Lieut", "Rt", "Hon", "Brig", "Cmdr", "Comdr", "Pfc", "Spc", "Supt", "Supts",
               "Det", "Mt", "Ft", "Adj", "Adv", "Asst", "Assoc", "Ens", "Insp", "Mlle", "Mme", "Msgr", "Sfc"]
    abbrev4 = ("(?:" + _ci_alt(*abtitle, "vs", "Alex", "Wm", "Jos", "Cie", "a.k.a", "cf", "TREAS", "Ph", "Invt",
                               "Elec", "Natl", "Dept")
               + f"|M{_ci('iss')}|[mM][ft][gG]|{acro})")
    abbrev3 = _ci_alt("ca", "fig", "figs", "prop", "no", "nos", "art", "bldg", "pp", "op") + "\\."
    # After "U.S." these words (first letter upper case) start a new sentence, so the period is read twice.
    acronym_next = (_caseless_first_upper(
        "About", "According", "Additionally", "After", "An", "A", "As", "At", "But", "Earlier", "He", "Her", "Here",
        "However", "If", "In", "It", "Last", "Many", "More", "Now", "Once", "One", "Other", "Our", "She", "Since",
        "So", "Some", "Such", "That", "The", "Then", "There", "These", "They", "This", "We", "When", "While", "What",
        "Yet", "You") + "|M" + _ci("r.") + "|M" + _ci("s."))
    phone = ("(?:\\([0-9]{2,3}\\)[ \u00a0]?|(?:\\+\\+?)?(?:[0-9]{2,4}[- \u00a0])?[0-9]{2,4}[- \u00a0])"
             "[0-9]{3,4}[- \u00a0]?[0-9]{3,5}"
             "|(?:(?:\\+\\+?)?[0-9]{2,4}\\.)?[0-9]{2,4}\\.[0-9]{3,4}\\.[0-9]{3,5}")
    url_tail = "(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?"
    quote_chars = "[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091\u0092\u0093\u0094\u201e\u201f\u2039\u203a\u00ab\u00bb]"
    misc_symbol = ("[+%&~^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00b3\u00b4-\u00ba\u00d7\u00f7"
                   "\u0387\u05be\u05c0\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b"
                   "\u061e\u066a\u066d\u0703-\u070d\u07f6\u07f7\u07f8\u0964\u0965\u0e4f\u1fbd\u2016\u2017"
                   "\u2020-\u2023\u2030-\u2038\u203b\u203e-\u2042\u2044\u207a-\u207f\u208a-\u208e\u2100-\u214f"
                   "\u2190-\u21ff\u2200-\u2bff\u3012\u30fb\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]")
    asian_eye = "[-^x=~<>']"

    def pushback(n: int) -> Callable[[str], tuple[str, int]]:
        return lambda text: (text[:-n], n)

    def quotes(left: bool) -> Callable[[str], tuple[str, int]]:
        return lambda text: (_latex_quotes(text, left), 0)

    def const(tok: str) -> Callable[[str], tuple[str, int]]:
        return lambda text: (tok, 0)

    def period_twice(text: str) -> tuple[str, int]:
        # Sentence-final abbreviation: the token keeps its period and the period is read again.
        return text, 1

    def acronym(text: str) -> tuple[str, int]:
        # "I. The" is a letter and a sentence end; "U.S. The" keeps "U.S." and reads the period again.
        return (text[0], 1) if len(text) == 2 else (text, 1)

    def amp(text: str) -> tuple[str, int]:
        return re.sub("(?i:&amp;)", "&", text), 0

    def soft(text: str) -> tuple[str, int]:
        return _no_soft_hyphens(text), 0

    def nbsp(text: str) -> tuple[str, int]:
        return text.replace(" ", "\u00a0"), 0

    rules: list[_Rule] = []

    def rule(name: str, body: str | list[str], action, ctx: str | None = None) -> None:
        alts = [body] if isinstance(body, str) else body
        pats = tuple(re.compile(f"(?:{b})" if ctx is None else f"(?:{b})(?P<ctx>{ctx})") for b in alts)
        rules.append(_Rule(name, pats, action))

    rule("prog_lang", ["[cC]\\+\\+", "[cCfF]#"], _keep)
    rule("assimilation3", [_ci("cannot"), "'" + _ci("twas")], pushback(3))
    rule("assimilation2", ["'" + _ci("tis"), _ci_alt("gonna", "gotta", "lemme", "gimme", "wanna")], pushback(2))
    rule("sgml", sgml, nbsp)
    rule("sp_mdash", ["&" + _ci_alt("MD", "mdash", "ndash") + ";", "[\u0096\u0097\u2013\u2014\u2015]"], const("--"))
    rule("sp_amp", _ci("&amp;"), amp)
    rule("sp_punc", "&(?:" + _ci_alt("HT", "TL", "UR", "LR", "QC", "QL", "QR", "odq", "cdq") + "|#[0-9]+);", _keep)
    rule("word_redaux", word, soft, ctx=redaux)
    rule("sword_sredaux", sword, soft, ctx=sredaux)
    rule("word", word, soft)
    rule("apoword", [f"{apos}[nN]{apos}?", f"[lLdDjJ]{apos}", _ci("Dunkin") + apos, _ci("somethin") + apos,
                     _ci("ol") + apos, apos + _ci("em"), f"[A-HJ-XZn]{aposetc}{L}{{2}}{L}*", f"{apos}[2-9]0[sS]",
                     apos + _ci("till"), apos + _ci("til"), f"{L}{L}*?[aeiouyAEIOUY]{aposetc}[aeiouA-Z]{L}*",
                     apos + _ci("cause"), _ci("cont'd") + "\\.?", "'" + _ci("twas"), _ci("nor'easter"),
                     _ci("c'mon"), _ci("e'er"), _ci("s'mores"), _ci("ev'ry"), _ci("li'l"), _ci("nat'l"),
                     f"[oO]{aposetc}[oO]"], _keep)
    rule("apoword2", f"[yY]{apos}", _keep, ctx=L)
    rule("full_url", "[hH][tT][tT][pP][sS]?://[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},-]", _keep)
    # ",-_" is a range in the scanner's class: it excludes digits and capitals after the first character too.
    rule("likely_url", [_ci("www") + "\\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\\.)+[a-zA-Z]{2,4}" + url_tail,
                        "(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\\.)+" + _ci_alt("com", "net", "org", "edu") + url_tail],
         _keep)
    rule("email", "(?:<|" + _ci("&lt;") + ")?[a-zA-Z0-9][^ \t\n\f\r\"<>|(){}\u00a0]*@"
                  "(?:[^ \t\n\f\r\"<>|(){}.\u00a0]+\\.)*[^ \t\n\f\r\"<>|(){}.\u00a0]+(?:>|" + _ci("&gt;") + ")?",
         _keep)
    rule("twitter", ["@[a-zA-Z_][a-zA-Z_0-9]*", f"#{wletter}+"], _keep)
    rule("redaux_ctx", redaux, quotes(False), ctx="[^A-Za-z]")
    rule("sredaux", sredaux, quotes(False))
    rule("date", f"{D}{{1,2}}[-/]{D}{{1,2}}[-/]{D}{{2,4}}", _keep)
    rule("number", f"[-+]?{num}", soft)
    rule("subsupnum", "[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)",
         _keep)
    rule("fraction", f"(?:{D}{{1,4}}[- \u00a0])?{D}{{1,4}}(?:\\\\?/|\u2044){D}{{1,4}}", nbsp)
    rule("fraction_char", "[\u00bc\u00bd\u00be\u2153-\u215e]", lambda t: (_FRACTIONS.get(t, t), 0))
    rule("treebank_special", ["-" + _ci_alt("RRB", "LRB", "RCB", "LCB", "RSB", "LSB") + "-", _ci("C.D.s"),
                              _ci("pro-"), _ci("anti-"), "[sS](?:&|" + _ci("&amp;") + ")" + _ci("P-500"),
                              "[sS](?:&|" + _ci("&amp;") + ")" + _ci("Ls"), _ci("Cap") + apos + "[nN]",
                              "[cC]" + apos + _ci("est")], amp)
    rule("slashed", "[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", _keep)
    rule("dollar", ["[A-Z]*\\$", "#"], _keep)
    rule("currency", "[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]",
         lambda t: (_currency(t), 0))
    rule("acronym", f"{acro}\\.", acronym, ctx=f"{spacenl}+(?:{acronym_next}|{sgml}){spacenl}")
    rule("abbrev_before_number", abbrev3, _keep, ctx=f"{spacenl}?{D}")
    rule("company_abbrev", "(?:[pP][tT][eyEY]|[cC][oO])\\.", _keep, ctx=f"{space}{_ci_alt('ltd', 'lim')}")
    rule("abbrev_sentence_end", abbrev1, period_twice, ctx=f"{spacenl}(?:{spacenl}|[{upper_cls}]|{sgml})")
    rule("abbrev_mid_sentence", abbrev1, _keep, ctx="(?s:..)")
    rule("abbrev_at_end", abbrev1, period_twice)
    rule("abbrev_title", f"{abbrev4}\\.", _keep)
    rule("abbrev_no_period", abbrev4, _keep, ctx=space)
    rule("acro_no_period", acro, _keep, ctx=spacenl)
    rule("year_abbrev", f"{apos}[0-9][0-9]", _keep, ctx=spacenl)
    file_ext = _ci_alt("bat", "bmp", "c", "class", "cgi", "cpp", "dll", "doc", "docx", "exe", "gif", "gz", "h", "htm",
                       "html", "jar", "java", "jpeg", "jpg", "mov", "mp3", "pdf", "php", "pl", "png", "ppt", "ps",
                       "py", "sql", "tar", "txt", "wav", "x", "xml", "zip")
    name_char = f"(?:{wletter}|{D})"
    rule("file_name", f"{name_char}+(?:\\.{name_char}+)*\\.{file_ext}", _keep, ctx=f"{spacenl}|[.?!,]")
    rule("word_dot", f"(?:{word})\\.", soft, ctx=insentp)
    rule("phone", phone, lambda t: (_parens(t.replace(" ", "\u00a0")), 0))
    rule("dblquote_left", ['"', _ci("&quot;")], quotes(True), ctx="[A-Za-z0-9$]")
    rule("dblquote", ['"', _ci("&quot;")], quotes(False))
    rule("delete", "\u007f", _skip)
    rule("less_than", ["<", _ci("&lt;")], const("<"))
    rule("greater_than", [">", _ci("&gt;")], const(">"))
    rule("smiley", "[<>]?[:;=][-o*']?[()DPdpO\\\\{@|\\[\\]]", lambda t: (_parens(t), 0), ctx="[^A-Za-z0-9]")
    rule("asian_smiley", [f"{asian_eye}_{asian_eye}", f"\\({asian_eye}[_.]?{asian_eye}\\)",
                          "\\([\\^x=~<>']-[\\^x=~<>'`]\\)"], lambda t: (_parens(t), 0))
    rule("lcb", "\\{", const("-LCB-"))
    rule("rcb", "\\}", const("-RCB-"))
    rule("lsb", "\\[", const("-LSB-"))
    rule("rsb", "\\]", const("-RSB-"))
    rule("lrb", "\\(", const("-LRB-"))
    rule("rrb", "\\)", const("-RRB-"))
    rule("hyphens", "-+", lambda t: ("--" if 3 <= len(t) <= 4 else t, 0))
    rule("ellipsis", ["\\.{3,5}", "(?:\\.[ \u00a0]){2,4}\\.", "[\u0085\u2026]"], const("..."))
    rule("footnote_marks", ["@+", "#+", "_+"], _keep)
    rule("asterisks", ["\\*+", "(?:\\\\\\*){1,3}"], _keep)
    rule("in_sentence_punct", insentp, _keep)
    rule("bangs", "[?!]+", _keep)
    rule("period", "[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]", _keep)
    rule("equals", "=", _keep)
    rule("slash", "/", _keep)
    hthing = f"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:{acro2}\\.|[A-Za-z0-9\u00ad]+))+"
    rule("hyphenated_dot", f"{hthing}\\.", soft, ctx=insentp)
    rule("hyphenated", hthing, soft)
    thing = f"{thing_part}(?:{hyphen}{thing_part})*"
    rule("thing_dot", f"{thing}\\.", _keep, ctx=insentp)
    rule("thing", thing, _keep)
    thinga = "[A-Z]+(?:(?:[+&]|" + _ci("&amp;") + ")[A-Z]+)+"
    rule("ampersand_name_dot", f"{thinga}\\.", amp, ctx=insentp)
    rule("ampersand_name", thinga, amp)
    rule("quote_left", "'", quotes(True), ctx="[A-Za-z][^ \t\n\r\u00a0]")
    rule("redaux", redaux, quotes(False))
    rule("quotes", [apos, "''", f"{quote_chars}{{1,2}}"], quotes(False))
    rule("fake_duck_feet", ["<<", ">>"], _keep)
    rule("misc_symbol", misc_symbol, _keep)
    rule("space", ["\u0000", f"{space}+", "[\u200b\u200e\u200f\ufeff]"], _skip)
    rule("newline", newline, const(NEWLINE_TOKEN))
    rule("nbsp_entity", _ci("&nbsp;"), _skip)
    rule("untokenizable", "(?s:.)", _skip)
    return tuple(rules)


def _longest(rules: tuple[_Rule, ...], text: str, pos: int) -> tuple[_Rule, str]:
    best, best_total, best_body = None, -1, ""
    for r in rules:
        for p in r.patterns:
            m = p.match(text, pos)
            if m is None:
                continue
            total = m.end() - pos
            if total > best_total:
                ctx = m.start("ctx") if "ctx" in p.groupindex else m.end()
                best, best_total, best_body = r, total, text[pos:ctx]
    return best, best_body


_NON_BMP = re.compile("[\U00010000-\U0010ffff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _utf16_units(text: str) -> str:
    """``text`` with every character outside the BMP written as its UTF-16 surrogate pair, as Java sees it."""
    if not _NON_BMP.search(text):
        return text
    return "".join(
        ch if ord(ch) < 0x10000 else chr(0xD7C0 + (ord(ch) >> 10)) + chr(0xDC00 + (ord(ch) & 0x3FF)) for ch in text)


def _from_utf16_units(token: str) -> str:
    if not _SURROGATE.search(token):
        return token
    joined = token.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    return _SURROGATE.sub("?", joined)   # Java's UTF-8 writer prints an unpaired surrogate as "?"


def tokenize_document(text: str) -> list[list[str]]:
    """PTB tokens of ``text``, one list per line (the jar's ``-preserveLines``), not yet lower-cased."""
    rules = _rules()
    text = _utf16_units(text)
    lines: list[list[str]] = [[]]
    pos, n = 0, len(text)
    while pos < n:
        rule, body = _longest(rules, text, pos)
        token, pushed = rule.action(body)
        pos += len(body) - pushed
        if token == NEWLINE_TOKEN:
            lines.append([])
        elif token is not None:
            lines[-1].append(_from_utf16_units(token))
    return lines


_LINE_BREAK = re.compile("[\r\n\u000b\u000c\u2028\u2029]")


def ptb_tokenize_lines(lines: list[str]) -> list[list[str]]:
    """``PTBTokenizer -preserveLines -lowerCase`` on ``lines`` written as one file (joined by newlines): the
    lower-cased tokens of each line. A line may not hold a line break of its own."""
    for i, line in enumerate(lines):
        if _LINE_BREAK.search(line):
            raise ValueError(f"line {i} holds a line break, which would split it in two: {line[:60]!r}")
    doc = tokenize_document("\n".join(lines))
    if len(doc) != len(lines):   # cannot happen: no rule consumes a newline
        raise RuntimeError(f"PTB emulation returned {len(doc)} lines for {len(lines)}")
    return [[_java_lower(t) for t in toks] for toks in doc]


def _cased(ch: str) -> bool:
    return unicodedata.category(ch) in ("Lu", "Ll", "Lt") or ch.isupper() or ch.islower()


def _in_word(ch: str) -> bool:
    # Characters Java's word BreakIterator keeps inside one word (letters, digits, marks, joiners).
    return ch.isalnum() or unicodedata.category(ch) in ("Mn", "Mc", "Me", "Pd", "Pc") or ch in ".'\"\u00ad\u2027"


def _java_lower(token: str) -> str:
    """Java's ``toLowerCase(Locale.ENGLISH)``: ``str.lower()`` except for the final-sigma rule, where Java looks
    for cased letters anywhere in the surrounding word, not only next to the sigma."""
    lowered = token.lower()
    if "\u03a3" not in token or len(lowered) != len(token):
        return lowered
    out = list(lowered)
    for i, ch in enumerate(token):
        if ch != "\u03a3":
            continue
        before = after = False
        j = i - 1
        while j >= 0 and _in_word(token[j]) and not before:
            before = _cased(token[j])
            j -= 1
        j = i + 1
        while j < len(token) and _in_word(token[j]) and not after:
            after = _cased(token[j])
            j += 1
        out[i] = "\u03c2" if before and not after else "\u03c3"
    return "".join(out)
