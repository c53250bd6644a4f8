"""Benchmark metrics: VQA accuracy (VQAv2, TextVQA), GQA exact match, POPE yes/no metrics (pure Python).

VQA accuracy (Antol et al. 2015; Goyal et al. 2017): a prediction scores ``min(1, #humans who gave it / 3)``,
averaged over the 10 leave-one-annotator-out subsets of the 10 human answers (10 choose 9); with fewer than 10
references (a converted third-party set) :func:`vqa_few` scores ``min(1, matches / min(3, n))``. Normalisation
follows the two reference evaluators exactly, because reported numbers depend on them:

- :func:`normalize_answer` is the EvalAI answer processor that LLaVA-style pipelines apply to every generated
  answer (and that the TextVQA evaluator applies to the human answers too): lower-case; drop ``,`` and ``?``;
  split ``'s``; newlines / tabs to spaces; punctuation (``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``) removed
  where it touches a space or when the text holds a digit-comma-digit, else replaced by a space; periods not
  followed by a digit removed; number words ``none``/``zero`` .. ``ten`` to digits; articles ``a an the``
  dropped; apostrophe-less contractions restored (``dont`` -> ``don't``).
- :func:`vqav2_accuracy` is the official VQAv2 evaluator (``vqaEval.py``) on top of that: the prediction gets
  the official punctuation pass (its list adds ``:`` and ``'`` and lacks ``{ } - !``) and the number / article /
  contraction pass; the human answers are left as stored (they were normalised by the dataset authors) except
  for the punctuation pass **when the annotators disagree** -- the reference code's rule, kept as is.
- :func:`textvqa_accuracy` is the TextVQA evaluator (M4C / LLaVA): prediction and human answers both through
  :func:`normalize_answer`, then the same leave-one-out average.

GQA (Hudson & Manning 2019) is exact match; as in LLaVA's GQA conversion the prediction is lower-cased and
stripped of whitespace and trailing periods (:func:`gqa_normalize`).

POPE (Li et al. 2023): the answer counts as "no" if its first sentence contains the word ``no``, ``No`` or
``not`` and as "yes" otherwise (LLaVA's ``eval_pope`` rule); "yes" is the positive class: accuracy, precision,
recall, F1 and the yes-ratio (the fraction of "yes" predictions, 0.5 for an unbiased model on balanced data).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "normalize_answer",
    "vqa_leave_one_out",
    "vqa_few",
    "vqav2_accuracy",
    "textvqa_accuracy",
    "exact_any",
    "contains_any",
    "yes_no_unclear",
    "gqa_normalize",
    "exact_match",
    "pope_yes_no",
    "pope_metrics",
    "first_word",
]

# ---- normalisation tables (the reference evaluators' data) -----------------------------------------------------
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = frozenset({"a", "an", "the"})

# apostrophe-less form -> with apostrophes (the EvalAI processor's table; the official vqaEval.py table is the same
# up to typographic apostrophes in some values, which can never match a prediction after its punctuation pass).
_CONTRACTION_PAIRS = """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd
howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've
it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've
mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't
ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's
shouldve:should've shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd
somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's
someoned:someone'd someoned've:someone'd've someone'dve:someone'd've someonell:someone'll someones:someone's
somethingd:something'd somethingd've:something'd've something'dve:something'd've somethingll:something'll
thats:that's thered:there'd thered've:there'd've there'dve:there'd've therere:there're theres:there's
theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas
wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're
whats:what's whatve:what've whens:when's whered:where'd wheres:where's whereve:where've whod:who'd
whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're whys:why's
wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all
yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd
youd've:you'd've you'dve:you'd've youll:you'll youre:you're youve:you've
"""
_CONTRACTIONS = dict(pair.split(":", 1) for pair in _CONTRACTION_PAIRS.split())

_EVALAI_PUNCT = tuple(';/[]"{}()=+\\_-><@`,?!')
_OFFICIAL_PUNCT = tuple(";:/'[]\"()=+\\_><@`,?")
# a period not followed by a digit ("3.5" keeps its period); the references write the lookbehind as the
# lookahead "(?!<=\d)", which never fires at a '.', so this is the pattern they actually apply
_PERIOD = re.compile(r"\.(?!\d)")
_EVALAI_COMMA = re.compile(r"(?<=\d),+(?=\d)")
_OFFICIAL_COMMA = re.compile(r"\d,\d")
# the references pass re.UNICODE (= 32) as the *count* argument of sub(): at most 32 periods are removed
_PERIOD_COUNT = 32


def _punctuation(text: str, marks: tuple[str, ...], comma: re.Pattern) -> str:
    """Each mark is deleted if it touches a space anywhere in ``text`` or ``text`` has a digit-comma-digit,
    otherwise replaced by a space; then stray periods are deleted."""
    out = text
    delete_all = comma.search(text) is not None
    for p in marks:
        out = out.replace(p, "" if delete_all or (p + " " in text or " " + p in text) else " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """The EvalAI answer processor (see the module docstring): ``"Two dogs."`` -> ``"2 dogs"``,
    ``"The cat's toy"`` -> ``"cat 's toy"``, ``"dont know"`` -> ``"don't know"``."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text, _EVALAI_PUNCT, _EVALAI_COMMA))


def _official_prediction(text: str) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text, _OFFICIAL_PUNCT, _OFFICIAL_COMMA))


def vqa_leave_one_out(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the ``len(answers)`` leave-one-out subsets of ``min(1, matches in the subset / 3)``.

    Exact string comparison (normalise first). With 10 answers this is the 10-choose-9 average; an answer
    given by >= 4 humans scores 1, by 3 humans 0.9, by 2 humans 0.6, by 1 human 0.3.
    """
    if not answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    hits = sum(a == prediction for a in answers)
    # leaving out a matching answer leaves hits - 1 matches, leaving out any other leaves hits
    total = hits * min(1.0, (hits - 1) / 3) + (len(answers) - hits) * min(1.0, hits / 3)
    return total / len(answers)


#: the number of human answers per question the VQA evaluators are written for
VQA_ANSWERS = 10


def vqa_few(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy with fewer than 10 references: ``min(1, matches / min(3, n))``.

    The leave-one-out average assumes 10 answers (with one reference every subset is empty and everything
    scores 0). With ``n < 10`` vtc applies the definition the average smooths, "full credit when 3 humans gave
    the answer", with the threshold capped at ``n``: one reference is exact match, two give 0.5 per match.
    """
    if not answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    hits = sum(a == prediction for a in answers)
    return min(1.0, hits / min(3, len(answers)))


def _vqa(prediction: str, answers: Sequence[str]) -> float:
    return vqa_leave_one_out(prediction, answers) if len(answers) >= VQA_ANSWERS else vqa_few(prediction, answers)


def vqav2_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQAv2 accuracy in [0, 1] of one generated answer against the human answers (10; with fewer,
    :func:`vqa_few`)."""
    pred = _official_prediction(normalize_answer(prediction))
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(gts)) > 1:
        gts = [_punctuation(a, _OFFICIAL_PUNCT, _OFFICIAL_COMMA) for a in gts]
    return _vqa(pred, gts)


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA accuracy in [0, 1]: prediction and human answers through :func:`normalize_answer` (10 answers;
    with fewer, :func:`vqa_few`)."""
    return _vqa(normalize_answer(prediction), [normalize_answer(a) for a in answers])


def exact_any(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the prediction equals any reference after :func:`normalize_answer` (``--metric exact``)."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def contains_any(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if a reference appears in the prediction as whole words after :func:`normalize_answer`
    (``--metric contains``: "the car is red" contains "red", not "re")."""
    pred = f" {normalize_answer(prediction)} "
    return float(any(f" {normalize_answer(a)} " in pred for a in answers if normalize_answer(a)))


def gqa_normalize(text: str) -> str:
    """Lower-case, collapse whitespace, drop trailing periods (``"Left."`` -> ``"left"``)."""
    return " ".join(text.lower().split()).rstrip(".").strip()


def exact_match(prediction: str, answer: str, normalize=gqa_normalize) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize(prediction) == normalize(answer))


def pope_yes_no(text: str) -> str:
    """'yes' / 'no' from a free-form answer: 'no' iff the first sentence has the word no / No / not."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def yes_no_unclear(text: str) -> bool:
    """True when the first sentence has none of the words yes / no / not (any case): :func:`pope_yes_no` counts
    such an answer as "yes" (the published rule), so many of them inflate the yes-ratio and recall."""
    first = text.split(".")[0] if "." in text else text
    words = {w.lower() for w in re.findall(r"[A-Za-z]+", first)}
    return not words & {"yes", "no", "not"}


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float | int]:
    """POPE metrics of yes/no ``predictions`` (already mapped with :func:`pope_yes_no`) against ``labels``.

    Returns accuracy, precision, recall, f1, yes_ratio (fractions in [0, 1]; 0 where undefined) and the counts
    tp, fp, tn, fn, n.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    pred = [p == "yes" for p in predictions]
    gold = [str(g).strip().lower() == "yes" for g in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    fn = sum(not p and g for p, g in zip(pred, gold))
    n = len(pred)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n if n else 0.0, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n}


def first_word(text: str) -> str:
    """First word, lower-cased ('' if empty): the answer of the one-word synthetic task."""
    words = text.strip().split()
    return words[0].lower() if words else ""
