"""Official scoring of VQAv2 / TextVQA, GQA and MME answers, one library function per benchmark.

- :func:`vqa_accuracy`: the VQA evaluation script's rule. The prediction and the 10 human answers have
  tabs/newlines turned into spaces and are stripped; when the humans disagree (more than one distinct
  answer) all of them and the prediction are normalised (punctuation, number words to digits, articles
  dropped, contractions restored: :func:`normalize_answer`). For each human i,
  ``acc_i = min(1, #{j != i : answer_j == prediction} / 3)``; the score is the mean of the 10 ``acc_i``
  (``min(#humans that said it / 3, 1)`` averaged over the 10 choose-9 subsets of annotators).
- :func:`textvqa_accuracy`: TextVQA's evaluator, the same leave-one-out rule but with every answer always
  normalised (as the TextVQA/m4c evaluator does).
- :func:`gqa_accuracy`: GQA's ``eval.py`` is exact string match; predictions first get the conversion every
  LLaVA-style pipeline applies before it (strip, trailing ``.`` removed, lower case).
- :func:`mme_scores`: MME's ``calculation.py``: each answer is read as yes/no/other, accuracy and accuracy+
  (both questions of an image right) per subtask, subtask score = acc + acc+ (0-200), perception = sum of
  the 10 perception subtasks (max 2000), cognition = sum of the 4 cognition ones (max 800).

Where lmms-eval's task code scores differently, docs/EVALUATION.md says how, with examples.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

# The VQA evaluation script's normalisation tables.
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")  # fmt: skip
# The script's period pattern: its "(?!<=\d)" is a (harmless) typo for a look-behind, so every period not
# followed by a digit goes; it passes re.UNICODE (32) where ``sub`` expects the count, so at most 32 go.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_STRIP_COUNT = 32
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")

MME_PERCEPTION: tuple[str, ...] = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION: tuple[str, ...] = (
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "code_reasoning",
)


def process_punctuation(text: str) -> str:
    """The VQA script's punctuation step: listed characters removed (or spaced), periods not before a digit removed."""
    out = text
    glued = _DIGIT_COMMA.search(text) is not None
    for p in _PUNCTUATION:
        if p + " " in text or " " + p in text or glued:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The VQA script's word step: lower case, number words 0-10 to digits, articles dropped, contractions restored."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """Whitespace cleanup, then :func:`process_punctuation` and :func:`process_digit_article`."""
    return process_digit_article(process_punctuation(_clean(text)))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _check_answers(answers: Sequence[str]) -> list[str]:
    if isinstance(answers, str):
        raise ValueError(f"expected a list of human answers, got the string {answers!r}")
    answers = list(answers)
    if not answers:
        raise ValueError("expected at least one human answer (VQAv2 and TextVQA have 10), got none")
    for a in answers:
        if not isinstance(a, str):
            raise ValueError(f"expected human answers as strings, got {type(a).__name__} {a!r}")
    return answers


def _leave_one_out(prediction: str, answers: list[str]) -> float:
    """Mean over i of min(1, matches among the other answers / 3)."""
    matches = sum(a == prediction for a in answers)
    total = 0.0
    for a in answers:
        others = matches - (a == prediction)
        total += min(1.0, others / 3.0)
    return total / len(answers)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy in [0, 1] of one prediction against the question's human answers (10 in VQAv2).

    Raises:
        ValueError: when ``answers`` is empty or not a list of strings.
    """
    answers = [_clean(a) for a in _check_answers(answers)]
    prediction = _clean(prediction)
    if len(set(answers)) > 1:
        answers = [process_digit_article(process_punctuation(a)) for a in answers]
        prediction = process_digit_article(process_punctuation(prediction))
    return _leave_one_out(prediction, answers)


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA accuracy in [0, 1]: the VQA leave-one-out rule with every answer always normalised."""
    answers = [normalize_answer(a) for a in _check_answers(answers)]
    return _leave_one_out(normalize_answer(prediction), answers)


def gqa_accuracy(prediction: str, answer: str) -> float:
    """1.0 when the prediction (stripped, trailing periods removed, lower-cased) equals the gold answer, else 0.0."""
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"expected a non-empty gold answer string, got {answer!r}")
    return float(prediction.strip().rstrip(".").lower() == answer)


def mme_parse_answer(prediction: str) -> str:
    """MME's reading of a free-form answer: "yes", "no" or "other" (stripped, lower case, then the first 4 characters)."""
    text = prediction.strip().lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_scores(rows: Iterable[Mapping]) -> dict:
    """MME scores from per-question rows.

    Args:
        rows: one mapping per question with ``category`` (an MME subtask, e.g. "existence"), ``question_id``
            (the image; MME asks two questions per image), ``prediction`` (the model's text) and ``answer``
            ("Yes"/"No").

    Returns:
        ``{"perception": float, "cognition": float, "total": float, "subtasks": {name: {"acc", "acc_plus",
        "score", "images", "questions"}}}`` with acc and acc+ in percent; subtasks absent from ``rows`` count 0.

    Raises:
        ValueError: for an unknown category, a gold answer other than yes/no, or a missing key.
    """
    known = set(MME_PERCEPTION) | set(MME_COGNITION)
    per_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for n, row in enumerate(rows):
        missing = [k for k in ("category", "question_id", "prediction", "answer") if k not in row]
        if missing:
            raise ValueError(
                f"MME row {n} lacks {missing}; expected category, question_id, prediction, answer"
            )
        category, gold = row["category"], str(row["answer"]).strip().lower()
        if category not in known:
            raise ValueError(f"MME row {n}: unknown category {category!r}; expected one of {sorted(known)}")
        if gold not in ("yes", "no"):
            raise ValueError(f"MME row {n}: gold answer must be Yes or No, got {row['answer']!r}")
        per_image[category][str(row["question_id"])].append(mme_parse_answer(str(row["prediction"])) == gold)
    subtasks = {}
    for category, images in per_image.items():
        flat = [ok for answers in images.values() for ok in answers]
        acc = 100.0 * sum(flat) / len(flat)
        acc_plus = 100.0 * sum(all(answers) for answers in images.values()) / len(images)
        subtasks[category] = {
            "acc": acc,
            "acc_plus": acc_plus,
            "score": acc + acc_plus,
            "images": len(images),
            "questions": len(flat),
        }
    perception = sum(subtasks[c]["score"] for c in MME_PERCEPTION if c in subtasks)
    cognition = sum(subtasks[c]["score"] for c in MME_COGNITION if c in subtasks)
    return {
        "perception": perception,
        "cognition": cognition,
        "total": perception + cognition,
        "subtasks": subtasks,
    }
