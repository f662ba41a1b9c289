"""The ``unitok`` command line.

Each subcommand lives in its own module and exposes ``main(argv) -> int | None``; this file only
dispatches, importing the module on use so that ``unitok --help`` stays fast and a missing optional
dependency of one subcommand never breaks the others. ``unitok data synth`` and similar two-word
commands are groups of this table.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module path, one-line help). Grouped names use a space: "data synth".
COMMANDS: dict[str, tuple[str, str]] = {
    "data synth": (
        "unitok.data.synth",
        "write the built-in synthetic world (images, captions, VQA, GenEval prompts)",
    ),
    "quickstart": (
        "unitok.scripts.quickstart",
        "generate synthetic data, train and evaluate the tiny model, write a report",
    ),
    "train-tokenizer": ("unitok.tokenizer.train", "train a UniTok tokenizer from a run config"),
    "export": (
        "unitok.tokenizer.training.export",
        "export a trainer checkpoint (checkpoints/step-N or a run folder) as a tokenizer folder",
    ),
    "eval-tokenizer": (
        "unitok.eval.tokenizer_eval",
        "rFID, PSNR/SSIM/LPIPS, codebook usage and zero-shot accuracy",
    ),
    "eval-vqa": (
        "unitok.eval.lmms.evaluate",
        "VQA through lmms-eval (offline synth_vqa, or vqav2_val/gqa/textvqa_val/mme) with official scoring",
    ),
    "eval-geneval": (
        "unitok.eval.geneval",
        "GenEval image folder (4 per prompt, resumable) and the exact synthetic-world scorer",
    ),
    "eval-gen-fid": (
        "unitok.eval.generation_fid",
        "generation FID (MJHQ-30K style) against reference images or statistics",
    ),
    "ablations": (
        "unitok.scripts.ablations",
        "the paper's tokenizer findings in miniature (MCQ vs RQ, codebooks, ...)",
    ),
    "extract-codes": (
        "unitok.data.extract",
        "pre-tokenise images into a sharded, resumable code store for MLLM training",
    ),
    "train-mllm": ("unitok.mllm.train", "train the MLLM (transformers Trainer, DeepSpeed ZeRO-2/3)"),
    "bench data": ("unitok.scripts.bench_data", "synthetic-world generation and reader throughput"),
    "bench quantizer": (
        "unitok.scripts.bench_quantizer",
        "batched multi-codebook quantizer vs a per-codebook loop",
    ),
    "bench tokenizer": (
        "unitok.scripts.bench_tokenizer",
        "encode/decode throughput, memory, parameter counts",
    ),
    "bench train-step": (
        "unitok.scripts.bench_train_step",
        "tokenizer training step: host syncs, ATen ops, GFLOP, activation memory (CPU)",
    ),
    "bench gpu-tokenizer": (
        "unitok.scripts.gpu_check_tokenizer",
        "UniTok-L training-step img/s at bf16 on a GPU",
    ),
    "bench eval": ("unitok.scripts.bench_eval", "tokenizer evaluation throughput"),
    "bench checkpoint": (
        "unitok.scripts.bench_checkpoint",
        "trainer checkpoint save: training blocked vs committed, torch vs dcp vs dcp async",
    ),
    "bench extract": (
        "unitok.scripts.bench_extract",
        "code extraction images/s, store bytes per image, padding with and without length grouping",
    ),
    "bench mllm-eval": (
        "unitok.scripts.bench_mllm_eval",
        "MLLM evaluation throughput: VQA questions/s and GenEval images/s",
    ),
    "bench mllm-generation": (
        "unitok.scripts.bench_mllm_generation",
        "image generation loops: eager, static KV cache, compiled position step, full recompute",
    ),
    "bench mllm-release": (
        "unitok.scripts.bench_mllm_release",
        "released MLLM architecture: 7B parameter counts and FLOPs per image position",
    ),
    "demo": (
        "unitok.scripts.demo.app",
        "web app: chat about an image, text to image, tokenizer reconstruction",
    ),
    "chat": ("unitok.scripts.chat", "chat with the MLLM about an image in the terminal"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: unitok COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `unitok COMMAND --help` for the options of one command."]
    return "\n".join(lines)


def _resolve(argv: list[str]) -> tuple[str, list[str]] | None:
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in COMMANDS:
            return name, argv[words:]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        from unitok import DISTRIBUTION_NAME, __version__

        print(f"unitok {__version__} ({DISTRIBUTION_NAME})")
        return 0
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    found = _resolve(argv)
    if found is None:
        group = [name for name in COMMANDS if name.split()[0] == argv[0]]
        if group:
            asked = len(argv) > 1 and argv[1] in ("-h", "--help", "help")
            width = max(len(name) for name in group)
            usage = [f"usage: unitok {argv[0]} COMMAND [ARGS...]", "", "commands:"]
            usage += [f"  {name.ljust(width)}  {COMMANDS[name][1]}" for name in group]
            print("\n".join(usage), file=sys.stdout if asked else sys.stderr)
            return 0 if asked else 2
        print(f"unitok: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    name, rest = found
    module = importlib.import_module(COMMANDS[name][0])
    try:
        result = module.main(rest, prog=f"unitok {name}")
    except Exception as err:
        if not _is_user_error(err):
            raise
        print(f"unitok {name}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


def _is_user_error(err: Exception) -> bool:
    """Errors that describe bad input (a value, a path, a file's content, a run that cannot go on) and
    whose message says what to do: printed as one line. Anything else keeps its traceback."""
    if isinstance(
        err,
        ValueError
        | FileNotFoundError
        | FileExistsError
        | NotADirectoryError
        | IsADirectoryError
        | PermissionError,
    ):
        return True
    # Imported here: only a command that already imported the trainer can raise it.
    trainer = sys.modules.get("unitok.tokenizer.training.checkpointing")
    return trainer is not None and isinstance(err, trainer.TrainingError)


if __name__ == "__main__":
    sys.exit(main())
