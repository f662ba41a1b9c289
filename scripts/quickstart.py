"""The quick start: the whole UniTok pipeline on the built-in synthetic world, on a CPU.

Stages (each writes under ``--out`` and is reused when the quick start runs again; ``--stage NAME``
reruns one of them, and a stage whose inputs changed since it ran, an earlier stage's output or its own
``--mllm`` / ``--sampling`` / ``--vqa-limit`` / ``--max-prompts`` settings, runs again by itself; tokenizer
settings that change a finished tokenizer's training stop with what to do):

1. ``world``: the synthetic world (images, captions, questions, class folders, GenEval prompts);
2. ``tokenizer``: trains ``unitok-tiny`` with the ``unitok-tiny-synth`` run config (an interrupted run
   resumes) and evaluates it on the held-out test split: PSNR/SSIM, per-sub-codebook usage, zero-shot
   shape and colour classification from text prompts alone, a reconstruction grid;
3. ``codes``: the UniTok codes of the world's train and test images;
4. ``mllm``: trains a small unified MLLM from scratch on the codes (questions -> answers, captions ->
   image codes);
5. ``vqa``: answers the held-out test questions, accuracy per question type;
6. ``generation``: text-to-image on the world's GenEval prompts, scored by the synthetic GenEval scorer;
7. ``report``: ``REPORT.md`` and ``report.json`` (targets reached or not, stage times, grids, examples,
   the demo command).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, fields
from pathlib import Path

from unitok.scripts.quickstart_report import grid_rows, save_generation_grid, save_qa_examples, write_report

logger = logging.getLogger("unitok.quickstart")

RUN_CONFIG = "unitok-tiny-synth"
# The quick start's world (fields of unitok.data.synth.SynthConfig): every shape and colour, 1-3 objects,
# 64 px, objects 1.3x the default widths (so outlines cover more of the image); 7200 train / 400 val / 400
# test scenes and 40 single-object scenes per class and split.
WORLD: dict = {
    "num_images": 8000,
    "size": 64,
    "seed": 0,
    "max_objects": 3,
    "object_scale": 1.3,
    "classify_per_class": 40,
}
STAGES: tuple[str, ...] = ("world", "tokenizer", "codes", "mllm", "vqa", "generation", "report")
# Folders (under --out) that a stage's command writes and resumes from; ``--stage NAME`` clears its folder.
# (The tokenizer stage resumes or re-evaluates its run; remove ``tokenizer/`` to train it again.)
STAGE_OUTPUTS: dict[str, str] = {"codes": "codes", "mllm": "mllm", "vqa": "vqa", "generation": "generation"}
# The stages whose output the later ones read: for the tokenizer and the MLLM, the result field naming the folder.
PRODUCTS: dict[str, str | None] = {"world": None, "tokenizer": "final_dir", "codes": None, "mllm": "dir"}
# What each stage reads from the earlier ones. A stage whose inputs changed since it ran (the world, the tokenizer's
# weights, the codes or the MLLM's weights differ from what its record saw) runs again instead of being reused.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "tokenizer": ("world",),
    "codes": ("world", "tokenizer"),
    "mllm": ("codes",),
    "vqa": ("world", "mllm"),
    "generation": ("world", "mllm"),
}


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quickstart", help="folder for data, models and report")
    parser.add_argument("--config", default=RUN_CONFIG, help="tokenizer run config (preset name or file)")
    parser.add_argument(
        "--stage",
        action="append",
        choices=STAGES,
        default=[],
        help="rerun this stage even when its output exists (repeatable); the others are reused",
    )
    parser.add_argument(
        "--num-images", type=int, default=None, help=f"synthetic images (default {WORLD['num_images']})"
    )
    parser.add_argument(
        "--world",
        dest="world_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="synthetic-world override (fields of unitok.data.synth.SynthConfig, e.g. size=32)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="tokenizer training steps (default: the config's)"
    )
    parser.add_argument(
        "--eval-images", type=int, default=400, help="held-out images for the reconstruction metrics"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="tokenizer run-config override",
    )
    parser.add_argument(
        "--mllm",
        dest="mllm_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="MLLM recipe override (fields of MLLMRecipe, e.g. steps=300) ",
    )
    parser.add_argument(
        "--sampling",
        dest="sampling_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="text-to-image sampling override (fields of SamplingRecipe, e.g. images_per_prompt=1)",
    )
    parser.add_argument(
        "--vqa-limit", type=int, default=None, help="answer only this many held-out questions (default: all)"
    )
    parser.add_argument(
        "--max-prompts",
        type=int,
        default=None,
        help="score only this many GenEval prompts (spread over tags)",
    )
    parser.add_argument(
        "--engine",
        choices=("commands", "library"),
        default=None,
        help="MLLM stages through the unitok commands (default when installed) or direct library calls",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _parse_fields(cls, items: list[str]) -> dict:
    """``KEY=VALUE`` strings -> field values of the dataclass ``cls``, converted to the fields' types (YAML reads
    ``5e-3`` as a string)."""
    import yaml

    from unitok.tokenizer.training.config import convert_fields

    known = {f.name for f in fields(cls)}
    raw = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"expected KEY=VALUE with KEY one of {sorted(known)}, got {item!r}")
        raw[key] = yaml.safe_load(value)
    try:
        return convert_fields(cls, raw)
    except ValueError as err:
        raise SystemExit(f"{cls.__name__} {err}") from None


class Pipeline:
    """Runs the stages in order, reusing each one's record ``stages/NAME.json`` unless asked to rerun it."""

    def __init__(self, args: argparse.Namespace) -> None:
        from unitok.scripts.quickstart_mllm import MLLMRecipe, SamplingRecipe
        from unitok.tokenizer.training.config import load_run_config

        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        from unitok.data.synth import SynthConfig

        # The world stage writes the world before the tokenizer stage reads it (no data.synth needed).
        overrides = [f"output_dir={self.out / 'tokenizer'}", f"data.path={self.out / 'world'}"]
        world = {**WORLD, **_parse_fields(SynthConfig, args.world_overrides)}
        if args.num_images is not None:
            world["num_images"] = args.num_images
        self.synth = SynthConfig(**world)
        if args.steps is not None:
            overrides.append(f"train.total_steps={args.steps}")
        self.config = load_run_config(args.config, overrides + args.overrides)
        self.mllm_recipe = MLLMRecipe(**_parse_fields(MLLMRecipe, args.mllm_overrides))
        self.sampling = SamplingRecipe(**_parse_fields(SamplingRecipe, args.sampling_overrides))
        self.rerun = set(args.stage)
        # Digest of each PRODUCTS stage's output, taken once when that stage is reused or has run.
        self.products: dict[str, str | None] = {}
        self.records: dict[str, dict] = {}
        self.progress = not args.no_progress
        from unitok.scripts.quickstart_mllm import commands_available

        self.engine = args.engine or ("commands" if commands_available() else "library")
        logger.info("MLLM stages through %s", self.engine)

    # paths
    @property
    def world(self) -> Path:
        return Path(self.config.data.path)

    @property
    def tokenizer_dir(self) -> Path:
        return Path(self.config.output_dir) / "final"

    @property
    def codes_dir(self) -> Path:
        return self.out / "codes"

    def _record_path(self, name: str) -> Path:
        return self.out / "stages" / f"{name}.json"

    def run(self) -> Path:
        metadata = self.world / "metadata.json"
        if metadata.is_file() and "world" not in self.rerun:
            _check_world(self.world, json.loads(metadata.read_text()), self.synth)
        for name in STAGES:
            path = self._record_path(name)
            rerun = name in self.rerun
            inputs = {dep: self.products.get(dep) for dep in STAGE_INPUTS.get(name, ())}
            settings = self._settings(name)
            if settings is not None:
                inputs["settings"] = settings
            if name != "report" and path.is_file() and not rerun:
                record = json.loads(path.read_text())
                changed = [
                    dep for dep, seen in record.get("inputs", inputs).items() if inputs.get(dep) != seen
                ]
                if name in PRODUCTS:
                    self.products[name] = self._fingerprint(name, record)
                    if self.products[name] != record.get("product", self.products[name]):
                        changed.insert(0, f"its own output under {self.out}")
                if not changed:
                    self.records[name] = record
                    logger.info("stage %s: reusing %s (%.0f s when it ran)", name, path, record["seconds"])
                    continue
                logger.info(
                    "stage %s: running again, its input changed since it ran: %s", name, ", ".join(changed)
                )
                rerun = True
            if rerun and name in STAGE_OUTPUTS:
                # The commands resume what they find; a rerun starts that stage afresh.
                shutil.rmtree(self.out / STAGE_OUTPUTS[name], ignore_errors=True)
            logger.info("stage %s: running", name)
            started = time.perf_counter()
            result = getattr(self, f"stage_{name}")()
            record = {
                "stage": name,
                "seconds": time.perf_counter() - started,
                "inputs": inputs,
                "result": result,
            }
            if name in PRODUCTS:
                record["product"] = self.products[name] = self._fingerprint(name, record)
            self.records[name] = record
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=2))
            tmp.replace(path)
            logger.info("stage %s: done in %.1f s", name, record["seconds"])
        return self.out / "REPORT.md"

    def _settings(self, name: str) -> dict | None:
        """The command-line settings stage ``name`` ran with; when they change, the stage runs again. (The
        tokenizer stage then resumes its run, which refuses settings that change the training: remove
        ``tokenizer/`` to train it again.)"""
        if name == "tokenizer":
            return {"config": self.config.to_dict(), "eval_images": self.args.eval_images}
        if name == "mllm":
            return {"recipe": asdict(self.mllm_recipe), "engine": self.engine}
        if name == "vqa":
            return {"limit": self.args.vqa_limit, "engine": self.engine}
        if name == "generation":
            return {
                "sampling": asdict(self.sampling),
                "max_prompts": self.args.max_prompts,
                "engine": self.engine,
            }
        return None

    def _fingerprint(self, name: str, record: dict) -> str | None:
        """Digest of what stage ``name`` produced for the later stages (None when it is not there); the
        tokenizer's and the MLLM's folders are read from the stage's ``record``."""
        if name == "world":
            return _digest(self.world, [self.world / "metadata.json"])
        if name == "codes":
            return _digest(self.codes_dir)
        folder = record["result"].get(PRODUCTS[name])
        return _digest(Path(folder)) if folder else None

    # ------------------------------------------------------------------ stages

    def stage_world(self) -> dict:
        from unitok.data.synth import generate_world

        synth = self.synth
        if not (self.world / "metadata.json").exists() or "world" in self.rerun:
            logger.info(
                "writing the synthetic world (%d images at %d px) to %s",
                synth.num_images,
                synth.size,
                self.world,
            )
            generate_world(self.world, synth, overwrite=True) if "world" in self.rerun else generate_world(
                self.world, synth
            )
        meta = json.loads((self.world / "metadata.json").read_text())
        return {"path": str(self.world), "config": meta.get("config"), "splits": meta.get("splits")}

    def stage_tokenizer(self) -> dict:
        from unitok.tokenizer.train import train
        from unitok.tokenizer.training.checkpointing import TrainingError

        if "tokenizer" in self.rerun and self.tokenizer_dir.exists():
            logger.info("rerunning the tokenizer stage: evaluating the finished run again")
        try:
            result = train(self.config)
        except TrainingError as err:
            if not (self.tokenizer_dir.parent / "checkpoints").is_dir():
                raise
            raise StageInputError(
                f"{err}. To train the quick start's tokenizer again with these settings, remove "
                f"{self.tokenizer_dir.parent} (the later stages then run again too), or pass a new --out"
            ) from err
        if result.final_dir is None:
            raise RuntimeError(
                f"training stopped at step {result.step} of {result.total_steps}; rerun to resume"
            )
        evaluation = _evaluate_tokenizer(Path(result.final_dir), self.world, self.out, self.args.eval_images)
        recon = evaluation["reconstruction"]
        usage = [float(u) for u in recon["codebook"]["usage_percent"]]
        losses = {
            k: round(float(result.metrics[k]), 4)
            for k in ("loss", "l1", "l2", "vq", "clip")
            if k in result.metrics
        }
        return {
            "run_dir": str(result.output_dir),
            "final_dir": str(result.final_dir),
            "steps": result.step,
            "batch": self.config.train.local_batch_size,
            "samples": int(result.metrics.get("samples", 0)),
            "losses": losses,
            "skipped": result.skipped,
            "psnr": recon["psnr"],
            "ssim": recon["ssim"],
            "usage": usage,
            "usage_min": min(usage),
            "perplexity": [float(p) for p in recon["codebook"]["perplexity"]],
            "images": recon["num_images"],
            "zero_shot_shape": 100 * evaluation["zero_shot"]["shape"]["top1"],
            "zero_shot_color": 100 * evaluation["zero_shot"]["color"]["top1"],
            "grid": "reconstructions.png",
        }

    def stage_codes(self) -> dict:
        from unitok.scripts import quickstart_mllm as qm

        if self.engine == "commands":
            return qm.extract_codes_command(self.tokenizer_dir, self.world, self.codes_dir, self.progress)
        return qm.extract_codes(self.tokenizer_dir, self.world, self.codes_dir)

    def stage_mllm(self) -> dict:
        from unitok.scripts import quickstart_mllm as qm

        if self.engine == "commands":
            return qm.train_mllm_command(self.codes_dir, self.out / "mllm", self.mllm_recipe, self.progress)
        return qm.train_mllm(
            self.tokenizer_dir, self.world, self.codes_dir, self.out / "mllm", self.mllm_recipe, self.progress
        )

    @property
    def mllm_dir(self) -> Path:
        """The trained MLLM (from the mllm stage's record)."""
        return Path(self.records["mllm"]["result"]["dir"])

    def stage_vqa(self) -> dict:
        from unitok.scripts import quickstart_mllm as qm

        if self.engine == "commands":
            result = qm.eval_vqa_command(
                self.mllm_dir, self.world, self.out / "vqa", limit=self.args.vqa_limit
            )
        else:
            result = qm.eval_vqa_library(self.mllm_dir, self.world, self.codes_dir, limit=self.args.vqa_limit)
        save_qa_examples(self.out, self.world, result["examples"])
        result["example_images"] = "qa_examples"
        return result

    def stage_generation(self) -> dict:
        from unitok.scripts import quickstart_mllm as qm

        if self.engine == "commands":
            result = qm.eval_geneval_command(
                self.mllm_dir, self.world, self.out / "generation", self.sampling, self.args.max_prompts
            )
            metas, images = result.pop("metas"), result.pop("images")
        else:
            from unitok.mllm import UniTokMLLM

            metas = qm.geneval_prompts(self.world)
            if self.args.max_prompts is not None:
                metas = qm._spread(metas, self.args.max_prompts)
            model = UniTokMLLM.from_pretrained(self.mllm_dir).eval()
            images = qm.generate_for_prompts(model, [m["prompt"] for m in metas], self.sampling)
            result = {
                **qm.score_geneval_library(metas, images),
                "sampling": asdict(self.sampling),
                "via": "library",
            }
        save_generation_grid(self.out / "generated.png", *grid_rows(metas, images))
        result["grid"] = "generated.png"
        return result

    def stage_report(self) -> dict:
        return {"report": str(write_report(self.out, self.records, STAGES))}


# ---------------------------------------------------------------------------------------------- helpers


def _digest(root: Path, files: list[Path] | None = None) -> str | None:
    """SHA-256 over the paths (relative to ``root``) and contents of ``files``, by default every file under the
    folder ``root``; None when one of them is missing or there is none."""
    if files is None:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    if not files or not all(f.is_file() for f in files):
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class StageInputError(ValueError):
    """What is under --out cannot serve the stage as asked; the message says what to do."""


class WorldMismatchError(StageInputError):
    """The world under --out is not the one the quick start asks for."""


def _check_world(world: Path, meta: dict, synth) -> None:
    """Raise WorldMismatchError when the world on disk is not the one asked for (another format or config).

    Every later stage was trained or measured on that world, so it is neither reused silently nor replaced
    under them: the message says which fields differ and how to start over.
    """
    from dataclasses import asdict

    from unitok.data.synth import FORMAT_VERSION

    expected = {"format_version": FORMAT_VERSION, **asdict(synth)}
    found = {"format_version": meta.get("format_version"), **(meta.get("config") or {})}
    differ = sorted(k for k in expected if found.get(k) != expected[k])
    if differ:
        detail = ", ".join(f"{k}: {found.get(k)!r} on disk, {expected[k]!r} asked for" for k in differ)
        raise WorldMismatchError(
            f"{world} holds another synthetic world than this quick start asks for ({detail}); the models "
            f"under {world.parent} were trained on it. Pass a new --out, or remove {world.parent} to start over."
        )


def _evaluate_tokenizer(final_dir: Path, world: Path, report_dir: Path, eval_images: int) -> dict:
    from unitok.eval import evaluate_reconstruction, evaluate_zero_shot
    from unitok.eval.tokenizer_eval import build_image_dataset, make_loader
    from unitok.tokenizer import UniTok

    model = UniTok.from_pretrained(final_dir).eval()
    size = model.config.image_size
    dataset, _ = build_image_dataset(str(world), size, data_format="image-text", split="test")
    loader = make_loader(dataset, batch_size=64, num_workers=0, max_images=eval_images)
    recon = evaluate_reconstruction(model, loader, grid_path=report_dir / "reconstructions.png", grid_size=8)
    zero_shot = {
        attribute: evaluate_zero_shot(
            model, world / "classify" / attribute / "test", templates=f"synth-{attribute}"
        )
        for attribute in ("shape", "color")
    }
    return {"reconstruction": recon, "zero_shot": zero_shot}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        report = Pipeline(args).run()
    except StageInputError as err:
        logger.error("%s", err)
        return 2
    print(report.read_text())
    print(f"report written to {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
