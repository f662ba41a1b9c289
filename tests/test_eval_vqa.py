"""Official VQAv2 / TextVQA / GQA / MME scoring, on hand-computed cases."""

from __future__ import annotations

import math

import pytest

from unitok.eval.vqa import (
    MME_COGNITION,
    MME_PERCEPTION,
    gqa_accuracy,
    mme_parse_answer,
    mme_scores,
    normalize_answer,
    process_punctuation,
    textvqa_accuracy,
    vqa_accuracy,
)


def test_vqa_accuracy_leave_one_out_counts():
    # n humans said it: each of the n matching annotators sees n-1 others, the other 10-n see n.
    for n in range(11):
        answers = ["cat"] * n + [f"dog{i}" for i in range(10 - n)]
        expected = (n * min(1, (n - 1) / 3) + (10 - n) * min(1, n / 3)) / 10 if n else 0.0
        assert vqa_accuracy("cat", answers) == pytest.approx(expected)
    assert vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("cat", ["cat"] * 2 + ["dog"] * 8) == pytest.approx(0.6)


def test_vqa_normalisation_when_humans_disagree():
    answers = ["2"] * 5 + ["two dogs"] * 5
    assert vqa_accuracy("Two.", answers) == 1.0  # "two." -> "2"
    assert vqa_accuracy("the 2", answers) == 1.0  # article dropped
    assert vqa_accuracy("dont know", ["don't know"] * 4 + ["no"] * 6) == 1.0  # contraction restored
    assert normalize_answer("A Man's\that!") == "man's hat"
    assert normalize_answer("1,000 people") == "1000 people"  # digit comma glues: punctuation removed
    assert process_punctuation("left/right") == "left right"  # no adjacent space: replaced by a space
    assert normalize_answer("3.5 m.") == "3.5 m"  # a period before a digit stays


def test_vqa_no_normalisation_when_humans_agree():
    # The official script only normalises when the answers differ; lmms-eval always does (docs/EVALUATION.md).
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy(" 2\n", ["2"] * 10) == 1.0  # whitespace cleanup always happens
    assert textvqa_accuracy("two", ["2"] * 10) == 1.0


def test_vqa_bad_answers_raise():
    with pytest.raises(ValueError, match="at least one human answer"):
        vqa_accuracy("cat", [])
    with pytest.raises(ValueError, match="list of human answers"):
        vqa_accuracy("cat", "cat")
    with pytest.raises(ValueError, match="as strings"):
        textvqa_accuracy("cat", ["cat", None])


def test_gqa_exact_match():
    assert gqa_accuracy(" Yes.", "yes") == 1.0
    assert gqa_accuracy("tshirt", "t-shirt") == 0.0  # lmms-eval strips punctuation from both: 1.0 there
    assert gqa_accuracy("the table", "table") == 0.0
    with pytest.raises(ValueError, match="gold answer"):
        gqa_accuracy("x", "")


def test_mme_parse():
    assert [mme_parse_answer(t) for t in ("Yes", "no.", "Yes, it is", "Nope", "Y", "maybe")] == [
        "yes",
        "no",
        "yes",
        "no",
        "other",  # lmms-eval reads a lone "y" as yes
        "other",
    ]


def test_mme_scores_by_hand():
    rows = []
    # existence: image a both right, image b one right -> acc 75, acc+ 50 -> 125
    rows += [
        {"category": "existence", "question_id": "a", "prediction": "Yes", "answer": "Yes"},
        {"category": "existence", "question_id": "a", "prediction": "No", "answer": "No"},
        {"category": "existence", "question_id": "b", "prediction": "Yes", "answer": "Yes"},
        {"category": "existence", "question_id": "b", "prediction": "Yes", "answer": "No"},
    ]
    # code_reasoning: one image, both wrong -> 0
    rows += [
        {"category": "code_reasoning", "question_id": "c", "prediction": "other", "answer": "Yes"},
        {"category": "code_reasoning", "question_id": "c", "prediction": "yes", "answer": "No"},
    ]
    scores = mme_scores(rows)
    assert scores["subtasks"]["existence"] == {
        "acc": 75.0,
        "acc_plus": 50.0,
        "score": 125.0,
        "images": 2,
        "questions": 4,
    }
    assert scores["perception"] == 125.0 and scores["cognition"] == 0.0 and scores["total"] == 125.0
    perfect = [
        {"category": c, "question_id": f"{c}{i}", "prediction": a, "answer": a}
        for c in MME_PERCEPTION + MME_COGNITION
        for i in range(2)
        for a in ("Yes", "No")
    ]
    full = mme_scores(perfect)
    assert math.isclose(full["perception"], 2000.0) and math.isclose(full["cognition"], 800.0)


def test_mme_bad_rows_raise():
    with pytest.raises(ValueError, match="unknown category"):
        mme_scores([{"category": "cats", "question_id": 1, "prediction": "yes", "answer": "Yes"}])
    with pytest.raises(ValueError, match="Yes or No"):
        mme_scores([{"category": "count", "question_id": 1, "prediction": "yes", "answer": "3"}])
    with pytest.raises(ValueError, match="lacks"):
        mme_scores([{"category": "count"}])
