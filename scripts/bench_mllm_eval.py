"""Benchmark the MLLM evaluation harnesses: VQA questions/s and GenEval images/s (``unitok bench mllm-eval``).

    unitok bench mllm-eval [--questions 32] [--prompts 8] [--threads 1]

On the random-init ``tiny`` preset (``unitok-tiny``, 64 px, 4x4 code grid, K=8) and a small synthetic world
written to a temporary folder, in one run:

- VQA: :meth:`UniTokMLLM.answer` on the world's test questions at batch sizes 1 and 8 (greedy, 16 new tokens;
  a random model rarely stops early, so every answer runs the full 16 tokens), and the whole ``unitok eval-vqa
  --tasks synth_vqa`` pipeline through lmms-eval at batch size 8 (task loading included);
- GenEval: :func:`unitok.eval.geneval.write_geneval_folder` (4 images per prompt, PNG writing included) at 1 and
  4 prompts per batch, and the exact synthetic scorer's images/s.

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch


def _tiny_model():
    from unitok.mllm import MLLMConfig, UniTokMLLM
    from unitok.mllm.text_tokenizer import build_tiny_tokenizer

    torch.manual_seed(0)
    corpus = [
        "USER: ASSISTANT: what color shape how many is there the a red blue green circle square left right yes no",
        "answer the question using a single word or phrase . ? 1 2 3 4",
    ]
    return UniTokMLLM.from_config(
        MLLMConfig.preset("tiny"), text_tokenizer=build_tiny_tokenizer(corpus)
    ).eval()


class Clock:
    """Wall time and this process's CPU time of a block (with one thread the CPU time is what an idle machine's
    wall time would be; on a shared machine the wall time also counts waiting for a core)."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def rate(self, n: int, unit: str) -> str:
        """``n`` items per second of wall time and of CPU time."""
        return f"{n / self.wall:.2f} {unit}/s wall, {n / self.cpu:.2f} {unit}/s CPU"


def bench_answer(model, world: Path, questions: int) -> list[tuple[str, str]]:
    """Questions/s of ``answer`` at batch sizes 1 and 8."""
    from PIL import Image

    items = []
    for line in (world / "captions" / "test.jsonl").read_text().splitlines():
        record = json.loads(line)
        image = Image.open(world / record["image"]).convert("RGB")
        suffix = "\nAnswer the question using a single word or phrase."
        items += [(image, qa["question"] + suffix) for qa in record["qa"]]
    items = (items * (questions // max(len(items), 1) + 1))[:questions]
    model.answer([items[0][0]], [items[0][1]], max_new_tokens=16)  # warm-up
    rows = []
    for bs in (1, 8):
        with Clock() as clock:
            for s in range(0, len(items), bs):
                chunk = items[s : s + bs]
                model.answer([i for i, _ in chunk], [q for _, q in chunk], max_new_tokens=16)
        rows.append((f"VQA `answer`, batch {bs}", clock.rate(len(items), "questions")))
    return rows


def bench_eval_vqa(model_dir: Path, world: Path, out: Path) -> tuple[str, str]:
    """Questions/s of the whole ``eval-vqa`` run (lmms-eval pipeline, model and task loading included)."""
    from unitok.eval.lmms.evaluate import build_parser, run

    argv = ["--model", str(model_dir), "--tasks", "synth_vqa", "--data", str(world), "--out", str(out)]
    argv += ["--batch-size", "8", "--device", "cpu", "--max-new-tokens", "16", "--no-cache"]
    with Clock() as clock:
        report = run(build_parser().parse_args(argv))
    n = report["throughput"]["questions"]
    name = f"VQA `unitok eval-vqa --tasks synth_vqa`, batch 8, end to end ({n} questions, loading included)"
    return name, clock.rate(n, "questions")


def bench_geneval(model, world: Path, prompts: int, out: Path) -> list[tuple[str, str]]:
    """GenEval folder writing images/s at 1 and 4 prompts per batch, and the synthetic scorer's images/s."""
    from unitok.eval.geneval import SamplingSettings, read_prompts, score_folder, write_geneval_folder

    lines = read_prompts(world / "geneval" / "evaluation_metadata.jsonl", synthetic=True)[:prompts]
    rows = []
    for bs in (1, 4):
        with Clock() as clock:
            info = write_geneval_folder(
                model, lines, out / f"bs{bs}", SamplingSettings(batch_size=bs), progress=False
            )
        rows.append(
            (f"GenEval folder, {bs} prompt(s) x 4 images per batch", clock.rate(info["images"], "images"))
        )
    with Clock() as clock:
        score = score_folder(out / "bs4", progress=False)
    rows.append(("GenEval exact synthetic scorer", clock.rate(score["images"], "images")))
    return rows


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``unitok bench mllm-eval``."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=int, default=32, help="VQA questions per batch-size setting")
    p.add_argument("--prompts", type=int, default=8, help="GenEval prompts per batch-size setting")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from unitok.data.synth import SynthConfig, generate_world

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        world = tmp / "world"
        generate_world(world, SynthConfig(num_images=100, test_fraction=0.1, classify_per_class=0), workers=1)
        model = _tiny_model()
        model.save_pretrained(tmp / "model")
        rows = bench_answer(model, world, args.questions)
        rows.append(bench_eval_vqa(tmp / "model", world, tmp / "vqa"))
        rows += bench_geneval(model, world, args.prompts, tmp / "geneval")
    load = os.getloadavg()[0]
    print(
        f"tiny preset (unitok-tiny, 64 px), CPU, {args.threads} thread(s), torch {torch.__version__}, "
        f"load average {load:.1f} on {os.cpu_count()} cores\n"
    )
    print("| harness | throughput |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
