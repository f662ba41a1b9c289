"""Document, prompt and scoring functions of the ``synth_vqa`` lmms-eval task.

A prediction is right when it equals the answer after the VQA answer normalisation
(:func:`unitok.eval.vqa.normalize_answer`: punctuation, articles, number words). Accuracies are reported overall,
per question kind of the world (color, shape, count, position, existence) and per VQAv2 answer type (yes/no,
number, other); a breakdown with no question is NaN.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image

from unitok.eval.vqa import normalize_answer

KINDS = ("color", "shape", "count", "position", "existence")
ANSWER_TYPES = {"yes_no": "yes/no", "number": "number", "other": "other"}
METRICS = ("overall", *KINDS, *ANSWER_TYPES)


def answer_type(answer: str) -> str:
    """VQAv2's answer type of a gold answer: "yes/no", "number" or "other"."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "number" if answer.isdigit() else "other"


def synth_doc_to_visual(doc: dict) -> list[Image.Image]:
    """The question's image as RGB."""
    path = Path(doc["image"])
    if not path.is_file():
        raise FileNotFoundError(f"image {path} of question {doc.get('question_id')} does not exist")
    with Image.open(path) as image:
        return [image.convert("RGB")]


def synth_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question with the task's pre/post prompt (the world's short-answer instruction by default)."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def synth_process_results(doc: dict, results: list[str]) -> dict:
    """One question's verdict, handed to every metric's aggregation."""
    score = float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))
    verdict = {"kind": doc["kind"], "answer_type": doc["answer_type"], "score": score}
    return dict.fromkeys(METRICS, verdict)


def _mean(results: list[dict], keep) -> float:
    scores = [r["score"] for r in results if keep(r)]
    return sum(scores) / len(scores) if scores else math.nan


def aggregate_overall(results: list[dict]) -> float:
    """Accuracy over all questions."""
    return _mean(results, lambda r: True)


def aggregate_color(results: list[dict]) -> float:
    """Accuracy over colour questions."""
    return _mean(results, lambda r: r["kind"] == "color")


def aggregate_shape(results: list[dict]) -> float:
    """Accuracy over shape questions."""
    return _mean(results, lambda r: r["kind"] == "shape")


def aggregate_count(results: list[dict]) -> float:
    """Accuracy over counting questions."""
    return _mean(results, lambda r: r["kind"] == "count")


def aggregate_position(results: list[dict]) -> float:
    """Accuracy over position questions (where is X / is X left of Y)."""
    return _mean(results, lambda r: r["kind"] == "position")


def aggregate_existence(results: list[dict]) -> float:
    """Accuracy over existence questions (is there a red circle)."""
    return _mean(results, lambda r: r["kind"] == "existence")


def aggregate_yes_no(results: list[dict]) -> float:
    """Accuracy over questions answered yes or no."""
    return _mean(results, lambda r: r["answer_type"] == "yes/no")


def aggregate_number(results: list[dict]) -> float:
    """Accuracy over questions answered with a number."""
    return _mean(results, lambda r: r["answer_type"] == "number")


def aggregate_other(results: list[dict]) -> float:
    """Accuracy over the remaining questions (colours, shapes, directions)."""
    return _mean(results, lambda r: r["answer_type"] == "other")
