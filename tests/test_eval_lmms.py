"""The lmms-eval plugin (generate_until, loglikelihood, registration) and ``unitok eval-vqa`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lmms_eval.api.instance import Instance
from mllm_helpers import one_thread, tiny_mllm, tiny_unitok  # noqa: F401
from PIL import Image

from unitok.data.synth import SynthConfig, generate_world
from unitok.eval import vqa
from unitok.eval.lmms.evaluate import main, official_scores, prepare_synth_vqa
from unitok.eval.lmms.models.unitok import UniTokLMMS, cut_at_stop, generation_settings
from unitok.mllm import UniTokMLLM

GREEDY = {"max_new_tokens": 4, "temperature": 0, "do_sample": False}


@pytest.fixture(scope="module")
def model():
    return tiny_mllm(tiny_unitok(), seed=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("world")
    config = SynthConfig(
        num_images=20, test_fraction=0.2, classify_per_class=0, geneval_per_tag={"single_object": 1}
    )
    generate_world(path, config, workers=1)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model) -> Path:
    path = tmp_path_factory.mktemp("mllm") / "model"
    model.save_pretrained(path)
    return path


def _lm(model, batch_size=1) -> UniTokLMMS:
    lm = UniTokLMMS(model=model, device="cpu", batch_size=batch_size)
    colours = ["red", "blue", "green", "white"]
    lm.task_dict = {"t": {"test": [{"color": c} for c in colours]}}
    return lm


def _visual(doc):
    return [
        Image.new("RGB", (64, 64), {"red": (220, 30, 30), "blue": (30, 80, 230)}.get(doc["color"], (0, 0, 0)))
    ]


def _gen(context: str, doc_id: int, gen=GREEDY) -> Instance:
    meta = {"task": "t", "doc_id": doc_id, "repeats": 1}
    return Instance(
        "generate_until", (context, dict(gen), _visual, doc_id, "t", "test"), idx=0, metadata=meta
    )


def _ll(context: str, continuation: str, doc_id: int) -> Instance:
    meta = {"task": "t", "doc_id": doc_id, "repeats": 1}
    return Instance(
        "loglikelihood", (context, continuation, _visual, doc_id, "t", "test"), idx=0, metadata=meta
    )


def test_generation_settings_and_stops():
    assert generation_settings({"until": "\n", "max_new_tokens": 5}, 128) == {
        "max_new_tokens": 5,
        "temperature": 0.0,
        "top_p": 1.0,
        "until": ["\n"],
    }
    assert generation_settings({"temperature": 0.7, "do_sample": False}, 9)["temperature"] == 0.0
    assert generation_settings({}, 9)["max_new_tokens"] == 9
    with pytest.raises(ValueError, match="until"):
        generation_settings({"until": [1]}, 9)
    assert cut_at_stop("red\nblue ASSISTANT: x", ["ASSISTANT:", "\n"]) == "red"
    assert cut_at_stop("red", []) == "red"


def test_generate_until_batched_honours_limits(model):
    contexts = ["what colour is the shape ?", "how many shapes are there ?", "what colour is the shape ?"]
    single = _lm(model, 1).generate_until([_gen(c, i) for i, c in enumerate(contexts)])
    batched = _lm(model, 3).generate_until([_gen(c, i) for i, c in enumerate(contexts)])
    assert single == batched
    assert all(len(a.split()) <= GREEDY["max_new_tokens"] for a in single)
    short = _lm(model, 3).generate_until(
        [_gen(c, i, {**GREEDY, "max_new_tokens": 1}) for i, c in enumerate(contexts)]
    )
    assert all(len(a.split()) <= 1 for a in short)
    words = single[0].split()
    assert len(words) >= 2, single
    cut = _lm(model).generate_until([_gen(contexts[0], 0, {**GREEDY, "until": [" " + words[1]]})])
    assert cut == [words[0]]


def test_loglikelihood_matches_training_loss_and_greedy(model):
    lm = _lm(model, batch_size=2)
    question = "what colour is the shape ?"
    # The training forward of (question, answer) scores answer tokens + </s>: the same as the continuation "answer </s>".
    answer = "red circle"
    image = _visual({"color": "red"})[0]
    codes = model.to_codes(image).cpu()
    batch = model.builder.understanding([(f"{model.config.image_token}\n{question}", answer)], [codes])
    from unitok.mllm.sequence import pad_sequences

    out = model(pad_sequences([batch], model.builder.ids.pad))
    eos = model.text_tokenizer.convert_ids_to_tokens(model.builder.ids.eos)
    ((logprob, _),) = lm.loglikelihood([_ll(question, f"{answer} {eos}", 0)])
    assert logprob == pytest.approx(-float(out.text_loss) * out.num_text_targets, rel=1e-4)
    # Batched with padding = one at a time.
    requests = [_ll(question, c, i) for i, c in enumerate(["red", "blue square", "two three one"])]
    batched = lm.loglikelihood(requests)
    single = _lm(model, 1).loglikelihood(requests)
    assert [g for _, g in batched] == [g for _, g in single]
    assert [lp for lp, _ in batched] == pytest.approx([lp for lp, _ in single], abs=1e-4)
    assert all(lp < 0 for lp, _ in batched)
    # The greedy answer is greedy.
    first = lm.generate_until([_gen(question, 0, {**GREEDY, "max_new_tokens": 1})])[0]
    assert first
    ((_, greedy),) = lm.loglikelihood([_ll(question, first, 0)])
    assert greedy


def test_registration_paths():
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from unitok.eval.lmms import manifest
    from unitok.eval.lmms.models import AVAILABLE_MODELS

    registry = ModelRegistryV2()
    registry.register_manifest(manifest())
    assert registry.get_model_class("unitok") is UniTokLMMS
    # LMMS_EVAL_PLUGINS=unitok.eval.lmms resolves <plugin>.models.<name>.<class>.
    import importlib

    ((name, cls),) = AVAILABLE_MODELS.items()
    assert getattr(importlib.import_module(f"unitok.eval.lmms.models.{name}"), cls) is UniTokLMMS
    setup = (Path(__file__).parents[1] / "setup.py").read_text()
    assert '"lmms_eval.models": ["unitok = unitok.eval.lmms:manifest"]' in setup


def test_scoring_tables_and_documented_differences():
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor
    from lmms_eval.tasks.mme.utils import parse_pred_ans

    p = EvalAIAnswerProcessor
    assert vqa._CONTRACTIONS == p.CONTRACTIONS
    assert vqa._NUMBER_WORDS == p.NUMBER_MAP
    assert set(vqa._ARTICLES) == set(p.ARTICLES) and list(vqa._PUNCTUATION) == p.PUNCTUATIONS
    processor = p()
    for text in ["Two dogs!", "1,000.5 m.", "the man's hat (left)", "it isnt"]:
        assert vqa.normalize_answer(text) == processor.process_digit_article(
            processor.process_punctuation(text)
        )
    # Differences docs/EVALUATION.md lists: official vs lmms-eval.
    assert vqa.vqa_accuracy("two", ["2"] * 10) == 0.0
    assert parse_pred_ans("Y") == "yes" and vqa.mme_parse_answer("Y") == "other"


def test_official_scores_from_logged_samples():
    vqav2 = [{"doc": {"answers": [{"answer": "2"}] * 5 + [{"answer": "two"}] * 5}, "filtered_resps": ["2"]}]
    assert official_scores("vqav2_val", vqav2) == {"accuracy": 100.0, "questions": 1}
    gqa = [
        {"doc": {"answer": "yes"}, "filtered_resps": ["Yes."]},
        {"doc": {"answer": "no"}, "resps": [["yes"]]},
    ]
    assert official_scores("gqa", gqa)["accuracy"] == 50.0
    mme = [
        {"doc": {"category": "count", "question_id": "a.jpg", "answer": a}, "filtered_resps": [p]}
        for a, p in [("Yes", "yes"), ("No", "yes")]
    ]
    assert official_scores("mme", mme)["perception"] == 50.0
    assert official_scores("synth_vqa", mme) is None


def test_eval_vqa_synth_end_to_end(world, model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = ["--model", str(model_dir), "--tasks", "synth_vqa", "--data", str(world), "--out", str(out)]
    argv += ["--batch-size", "4", "--device", "cpu", "--max-new-tokens", "4"]
    assert main(argv) == 0
    report = json.loads((out / "results.json").read_text())
    captions = [json.loads(line) for line in (world / "captions" / "test.jsonl").read_text().splitlines()]
    n_questions = sum(len(c["qa"]) for c in captions)
    assert report["questions"]["synth_vqa"] == n_questions == report["synth_data"]["questions"]
    metrics = report["tasks"]["synth_vqa"]
    for key in ("overall", "color", "shape", "count", "position", "existence", "yes_no", "number", "other"):
        assert key in metrics and (metrics[key] is None or 0.0 <= metrics[key] <= 1.0)
    samples = [json.loads(line) for line in (out / "samples_synth_vqa.jsonl").read_text().splitlines()]
    assert len(samples) == n_questions
    # The reported overall accuracy is the normalised exact match of the logged predictions.
    right = sum(vqa.normalize_answer(s["prediction"]) == vqa.normalize_answer(s["target"]) for s in samples)
    assert metrics["overall"] == pytest.approx(right / n_questions)
    kinds = {qa["kind"] for c in captions for qa in c["qa"]}
    assert {s["kind"] for s in samples} == kinds and all(Path(s["image"]).is_file() for s in samples)
    assert report["throughput"]["questions_per_second"] > 0
    assert "synth_vqa" in (out / "results.md").read_text()
    # Interrupted after three answers (and a torn line): the rerun asks only the rest, with the same result.
    log = out / "answers.jsonl"
    assert len(log.read_text().splitlines()) == n_questions
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines()[:3]) + '{"key": "x", "ans')
    asked = []
    answer = UniTokMLLM.answer

    def counting(self, images, questions, **kwargs):
        asked.extend(questions)
        return answer(self, images, questions, **kwargs)

    monkeypatch.setattr(UniTokMLLM, "answer", counting)
    assert main(argv) == 0
    assert len(asked) == n_questions - 3
    assert json.loads((out / "results.json").read_text())["tasks"] == report["tasks"]


def test_eval_vqa_bad_inputs(world, model_dir, tmp_path, capsys):
    assert main(["--model", str(model_dir), "--tasks", "synth_vqa", "--out", str(tmp_path / "o")]) == 2
    assert "--data" in capsys.readouterr().err
    broken = tmp_path / "world"
    (broken / "captions").mkdir(parents=True)
    lines = (world / "captions" / "test.jsonl").read_text().splitlines()
    (broken / "captions" / "test.jsonl").write_text(lines[0] + "\n")
    with pytest.raises(FileNotFoundError, match=r"test.jsonl:1: image .* does not exist"):
        prepare_synth_vqa(broken, tmp_path / "tasks")
    (broken / "captions" / "test.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match=r"test\.jsonl:1: malformed"):
        prepare_synth_vqa(broken, tmp_path / "tasks")
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    argv = ["--model", str(empty), "--tasks", "synth_vqa", "--data", str(world), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "model.safetensors" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.distributed
def test_lmms_eval_data_parallel_two_processes(world, model_dir, tmp_path):
    """``torchrun -m lmms_eval --model unitok``: two ranks split the questions and lmms-eval gathers every answer."""
    import os
    import socket
    import subprocess
    import sys

    prepared = prepare_synth_vqa(world, tmp_path / "tasks")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "answers.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cmd += ["-m", "lmms_eval", "--model", "unitok", "--tasks", "synth_vqa", "--batch_size", "4"]
    cmd += ["--model_args", f"pretrained={model_dir},max_new_tokens=2,answer_log={log}"]
    cmd += [
        "--include_path",
        str(tmp_path / "tasks"),
        "--output_path",
        str(tmp_path / "out"),
        "--log_samples",
    ]
    env = {**os.environ, "LMMS_EVAL_PLUGINS": "unitok.eval.lmms", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # Each rank answered its share (lmms-eval pads the shorter share with a repeat so the ranks stay in step).
    per_rank = [
        {json.loads(line)["key"] for line in Path(f"{log}.rank{r}").read_text().splitlines()} for r in (0, 1)
    ]
    assert all(per_rank) and not per_rank[0] & per_rank[1]
    assert len(per_rank[0] | per_rank[1]) == prepared["questions"]
    (samples,) = (tmp_path / "out").rglob("*samples_synth_vqa.jsonl")
    assert len(samples.read_text().splitlines()) == prepared["questions"]
