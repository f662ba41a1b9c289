"""``unitok eval-vqa``: evaluate an MLLM checkpoint through lmms-eval's own pipeline, with reports.

``unitok eval-vqa --model DIR --tasks synth_vqa --data WORLD --out DIR`` answers the synthetic world's VQA split
offline; ``--tasks vqav2_val,gqa,textvqa_val,mme`` runs lmms-eval's tasks (their data sets must be reachable or
in the Hugging Face cache). Each run writes into ``--out``:

- ``results.json``: lmms-eval's metrics per task; for ``synth_vqa`` the accuracy overall, per question kind and
  per answer type; for the public tasks the scores recomputed with the official rules
  (:mod:`unitok.eval.vqa`) beside lmms-eval's own; throughput; the paper's figures.
- ``results.md``: the same as tables beside the paper's numbers; ``samples_<task>.jsonl``: every prediction.
- ``lmms_tasks/``: the prepared ``synth_vqa`` task (usable with ``python -m lmms_eval --include_path``);
  ``answers.jsonl``: every batch of answers as it is generated, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from importlib import resources
from pathlib import Path
from typing import Any

from unitok.eval.harness import (
    PAPER,
    check_mllm_dir,
    default_device,
    fmt,
    markdown_table,
    run_cli,
    write_json_atomic,
)
from unitok.eval.lmms_tasks.synth_vqa.utils import answer_type

logger = logging.getLogger(__name__)

SYNTH_TASK = "synth_vqa"
SYNTH_TEMPLATE = "_synth_vqa_template_yaml"
# Official re-scoring and the paper's figure per public task: (paper key, scale to the paper's unit).
PUBLIC_TASKS: dict[str, tuple[str, float]] = {
    "vqav2_val": ("vqav2", 100.0),
    "gqa": ("gqa", 100.0),
    "textvqa_val": ("textvqa", 100.0),
    "mme": ("mme", 1.0),
}


def template_path() -> Path:
    """The packaged ``synth_vqa`` task template."""
    return Path(str(resources.files("unitok.eval") / "lmms_tasks" / SYNTH_TASK / SYNTH_TEMPLATE))


def prepare_synth_vqa(world: str | Path, task_dir: str | Path, split: str = "test") -> dict:
    """Write the ``synth_vqa`` task for a synthetic world into ``task_dir``.

    Reads ``<world>/captions/<split>.jsonl`` (each line: ``id``, ``image`` relative to the world, ``qa`` list of
    ``{kind, question, answer}``) and writes ``synth_vqa_<split>.jsonl`` (one line per question, absolute image
    paths) and ``synth_vqa.yaml`` (includes the packaged template) into ``task_dir``.

    Returns:
        ``{"yaml", "questions", "images", "kinds": {kind: count}}``.

    Raises:
        FileNotFoundError: no captions file, or an image it names is missing (file and line in the message).
        ValueError: a malformed line (file and line in the message) or no questions.
    """
    world, task_dir = Path(world).resolve(), Path(task_dir).resolve()
    source = world / "captions" / f"{split}.jsonl"
    if not source.is_file():
        raise FileNotFoundError(
            f"{source} does not exist; --data must be a synthetic world folder (written by `unitok data synth`)"
        )
    rows, images, kinds = [], 0, {}
    for lineno, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image, qa = world / record["image"], record["qa"]
            items = [(q["kind"], q["question"], q["answer"]) for q in qa]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"{source}:{lineno}: malformed line ({type(err).__name__}: {err}); expected id, image, qa"
            ) from None
        if not image.is_file():
            raise FileNotFoundError(f"{source}:{lineno}: image {image} does not exist")
        images += 1
        for j, (kind, question, answer) in enumerate(items):
            if not str(question).strip() or not str(answer).strip():
                raise ValueError(f"{source}:{lineno}: question {j} has an empty question or answer")
            kinds[kind] = kinds.get(kind, 0) + 1
            rows.append(
                {
                    "question_id": f"{record.get('id', lineno)}_{j}",
                    "image": str(image),
                    "question": question,
                    "answer": answer,
                    "kind": kind,
                    "answer_type": answer_type(answer),
                }
            )
    if not rows:
        raise ValueError(f"{source} holds no questions")
    task_dir.mkdir(parents=True, exist_ok=True)
    data_name = f"{SYNTH_TASK}_{split}.jsonl"
    (task_dir / data_name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = {
        "include": str(template_path()),
        "task": SYNTH_TASK,
        "dataset_kwargs": {"data_files": {"test": data_name}, "cache_dir": str(task_dir / "hf_datasets")},
    }
    yaml_path = task_dir / f"{SYNTH_TASK}.yaml"
    yaml_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")  # JSON is valid YAML
    return {"yaml": str(yaml_path), "questions": len(rows), "images": images, "kinds": kinds}


def register_model() -> None:
    """Make ``unitok`` resolvable by lmms-eval's registry in this process (entry point or not)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    from . import manifest

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)


def _clean(value: Any) -> Any:
    """lmms-eval metric values -> JSON (NaN -> None, numpy scalars -> float)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


def task_metrics(results: dict, task: str) -> dict:
    """A task's metrics from ``simple_evaluate``'s results, keys without lmms-eval's ``,none`` filter suffix."""
    raw = results.get("results", {}).get(task, {})
    out = {}
    for key, value in raw.items():
        name, _, filt = key.partition(",")
        if key == "alias" or name.endswith("_stderr") or filt not in ("", "none"):
            continue
        out[name] = _clean(value)
    return out


def _prediction(sample: dict) -> str:
    resps = sample.get("filtered_resps") or sample.get("resps") or [""]
    first = resps[0]
    while isinstance(first, list | tuple):
        first = first[0] if first else ""
    return str(first)


def official_scores(task: str, samples: list[dict]) -> dict | None:
    """The official score of a public task from lmms-eval's logged samples (``None`` for other tasks).

    VQAv2 accuracy, TextVQA accuracy and GQA exact match in percent; MME perception/cognition totals.
    """
    from unitok.eval import vqa

    if task not in PUBLIC_TASKS or not samples:
        return None
    if task == "mme":
        rows = [
            {
                "category": s["doc"]["category"],
                "question_id": s["doc"]["question_id"],
                "prediction": _prediction(s),
                "answer": s["doc"]["answer"],
            }
            for s in samples
        ]
        return vqa.mme_scores(rows)
    scores = []
    for s in samples:
        doc, pred = s["doc"], _prediction(s)
        if task == "vqav2_val":
            scores.append(vqa.vqa_accuracy(pred, [a["answer"] for a in doc["answers"]]))
        elif task == "textvqa_val":
            scores.append(vqa.textvqa_accuracy(pred, doc["answers"]))
        else:
            scores.append(vqa.gqa_accuracy(pred, doc["answer"]))
    return {"accuracy": 100.0 * sum(scores) / len(scores), "questions": len(scores)}


def format_markdown(report: dict) -> str:
    """``results.md``: per task, our figures beside the paper's."""
    lines = [f"# VQA evaluation: {report['model']}", ""]
    synth = report["tasks"].get(SYNTH_TASK)
    if synth is not None:
        rows = [(k, fmt(None if synth.get(k) is None else 100 * synth[k], ".1f")) for k in _SYNTH_ROWS]
        lines += [
            f"## synth_vqa ({report['questions'].get(SYNTH_TASK, '?')} questions, accuracy %)",
            "",
            markdown_table(["questions", "accuracy %"], rows),
        ]
    public = [t for t in report["tasks"] if t in PUBLIC_TASKS]
    if public:
        rows = []
        for task in public:
            key, _ = PUBLIC_TASKS[task]
            official = (report.get("official") or {}).get(task) or {}
            ours = official.get("perception") if task == "mme" else official.get("accuracy")
            rows.append((task, fmt(ours, ".1f"), fmt(PAPER[key], ".1f")))
        lines += [
            "## public benchmarks (official scoring)",
            "",
            markdown_table(["task", "ours", "paper (UniTok, Llama-2-7B)"], rows),
            "MME: perception total (max 2000).",
            "",
        ]
    t = report["throughput"]
    lines.append(
        f"{t['questions']} questions in {t['seconds']:.1f} s ({fmt(t['questions_per_second'], '.2f')} questions/s), "
        f"device {report['device']}, batch size {report['batch_size']}"
    )
    return "\n".join(lines) + "\n"


# Document fields copied into samples_<task>.jsonl beside each prediction.
_SAMPLE_DOC_KEYS = ("question_id", "question", "kind", "answer_type", "image", "category")
_SYNTH_ROWS = ("overall", "color", "shape", "count", "position", "existence", "yes_no", "number", "other")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``unitok eval-vqa``."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Evaluate an MLLM checkpoint on VQA tasks through lmms-eval (offline synth_vqa on the synthetic "
        "world, or lmms-eval's vqav2_val/gqa/textvqa_val/mme). Writes results.json and results.md.",
    )
    p.add_argument("--model", required=True, help="MLLM checkpoint folder (save_pretrained)")
    p.add_argument(
        "--tasks", default=SYNTH_TASK, help="comma-separated lmms-eval tasks (default %(default)s)"
    )
    p.add_argument("--data", help="synthetic world folder for synth_vqa (`unitok data synth --out ...`)")
    p.add_argument("--split", default="test", help="world split for synth_vqa (default %(default)s)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="at most this many questions per task")
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast the model")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length for tasks that set none")
    p.add_argument(
        "--no-cache", action="store_true", help="neither reuse nor record answers in <out>/answers.jsonl"
    )
    p.add_argument(
        "--prepare-only", action="store_true", help="only write <out>/lmms_tasks (for python -m lmms_eval)"
    )
    return p


def run(args: argparse.Namespace) -> dict:
    """Prepare the tasks, run lmms-eval, write the reports; returns the report."""
    out = Path(args.out)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks names no task")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise ValueError("--batch-size and --limit must be >= 1")
    task_dir = out / "lmms_tasks"
    prepared = None
    if SYNTH_TASK in tasks:
        if args.data is None:
            raise ValueError("synth_vqa needs --data WORLD (a folder written by `unitok data synth`)")
        prepared = prepare_synth_vqa(args.data, task_dir, args.split)
        logger.info("synth_vqa: %d questions on %d images", prepared["questions"], prepared["images"])
    if args.prepare_only:
        return {"prepared": prepared, "include_path": str(task_dir)}
    check_mllm_dir(args.model)

    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    register_model()
    public_only = [t for t in tasks if t != SYNTH_TASK]
    manager = TaskManager(
        "WARNING", include_path=str(task_dir) if prepared else None, include_defaults=bool(public_only)
    )
    model_args = f"pretrained={Path(args.model).resolve()},max_new_tokens={args.max_new_tokens}"
    if not args.no_cache:
        model_args += f",answer_log={(out / 'answers.jsonl').resolve()}"
    if args.dtype:
        model_args += f",dtype={args.dtype}"
    start = time.perf_counter()
    results = simple_evaluate(
        model="unitok",
        model_args=model_args,
        tasks=tasks,
        batch_size=args.batch_size,
        device=args.device,
        limit=args.limit,
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=0,
        verbosity="WARNING",
    )
    seconds = time.perf_counter() - start
    if results is None:  # not rank 0 under a multi-process launch
        return {}
    samples = results.get("samples", {})
    questions = {task: len(samples.get(task, [])) for task in tasks}
    report = {
        "model": str(args.model),
        "tasks": {task: task_metrics(results, task) for task in tasks},
        "official": {task: _clean(official_scores(task, samples.get(task, []))) for task in public_only},
        "questions": questions,
        "throughput": {
            "questions": sum(questions.values()),
            "seconds": seconds,
            "questions_per_second": sum(questions.values()) / seconds if seconds > 0 else None,
        },
        "device": str(args.device),
        "batch_size": args.batch_size,
        "paper": {PUBLIC_TASKS[t][0]: PAPER[PUBLIC_TASKS[t][0]] for t in PUBLIC_TASKS},
        "synth_data": prepared,
    }
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        with open(out / f"samples_{task}.jsonl", "w", encoding="utf-8") as f:
            for s in samples.get(task, []):
                row = {"doc_id": s.get("doc_id"), "target": s.get("target"), "prediction": _prediction(s)}
                doc = s.get("doc") or {}
                row.update({k: doc[k] for k in _SAMPLE_DOC_KEYS if isinstance(doc.get(k), str | int | float)})
                f.write(json.dumps(_clean(row)) + "\n")
    write_json_atomic(out / "results.json", report)
    (out / "results.md").write_text(format_markdown(report), encoding="utf-8")
    return report


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``unitok eval-vqa``; returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    report = run_cli(run, args)
    if report is None:
        return 2
    if "tasks" in report:
        print(format_markdown(report))
    elif "include_path" in report:
        print(f"prepared lmms-eval tasks in {report['include_path']}")
    return 0
