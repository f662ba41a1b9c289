"""GPU check of the released UniTok MLLM: answer a question about an image and generate an image, at bf16.

    python -m unitok.scripts.gpu_check_mllm --mllm FoundationVision/unitok_mllm --unitok unitok_tokenizer.pth \\
        [--image photo.jpg] [--question "What is in the image?"] [--prompt "a red apple on a table"] \\
        [--sampling release-default] [--out gpu_check_mllm]

``--mllm`` is the released Hugging Face folder (or Hub id; ``HF_HUB_OFFLINE=1`` uses the local cache only) and
``--unitok`` the released ``unitok_tokenizer.pth``. Loads the model at bf16 on ``--device`` (default cuda), asks
``--question`` about ``--image`` (default: a drawn red circle on grey) with greedy decoding in the vicuna_v1
format, then generates one image for ``--prompt`` with the named sampling preset (``SAMPLING_PRESETS``),
checking on the way that the cached generation of the first positions equals the uncached one. Writes
``answer.txt``, ``generated.png`` and ``report.json`` (times, peak memory) under ``--out`` and prints them.

``--tiny`` builds a random tiny model of the same architecture instead (no weights needed), to check the script
itself on any machine; ``--random PRESET`` (``unitok-mllm-7b`` or ``llama2-7b``) builds that preset at full size
with random weights directly on ``--device`` (Llama-2-7B shapes, random UniTok-L, no meta tensors, no downloads).

``--bench-generation`` also measures image generation (codes + bf16-autocast decoding) in seconds per image for
the eager loop, the sync-free static-cache loop (``fast=True``) and its compiled position step (``compile=True``:
inductor, CUDA graphs), ``--gen-batch`` prompts at a time, after a warm-up run each (the compile is timed
separately), plus host syncs per position of each loop (``torch.cuda.set_sync_debug_mode``). On a GPU:

    python -m unitok.scripts.gpu_check_mllm --random unitok-mllm-7b --bench-generation --gen-batch 1 4
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def _tiny_model():
    from unitok.mllm import MLLMConfig, UniTokMLLM, build_tiny_tokenizer
    from unitok.mllm.text_tokenizer import builtin_corpus
    from unitok.tokenizer import TokenizerConfig, UniTok

    torch.manual_seed(0)
    tok = build_tiny_tokenizer(builtin_corpus())
    tok.add_tokens(["<0x00>", "<0x01>"], special_tokens=True)
    llm = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    config = MLLMConfig.preset(
        "unitok-mllm-7b",
        llm=llm,
        unitok=None,
        unitok_preset="unitok-tiny",
        text_tokenizer="builtin:tiny",
        projector_attn_width=128,
        projector_attn_heads=4,
        depth_layers=2,
    )
    return UniTokMLLM.from_config(
        config, unitok=UniTok(TokenizerConfig.preset("unitok-tiny")), text_tokenizer=tok
    )


def _random_model(preset: str, device: torch.device, dtype: str):
    """A full-size preset with random weights, allocated on ``device`` as it is built."""
    from unitok.mllm import MLLMConfig, UniTokMLLM, build_tiny_tokenizer
    from unitok.mllm.config import LLAMA2_7B
    from unitok.mllm.text_tokenizer import builtin_corpus
    from unitok.tokenizer import TokenizerConfig, UniTok

    torch.manual_seed(0)
    tok = build_tiny_tokenizer(builtin_corpus())
    tok.add_tokens(["<0x00>", "<0x01>"], special_tokens=True)
    config = MLLMConfig.preset(
        preset,
        llm={**LLAMA2_7B},
        unitok=None,
        unitok_preset="unitok-large",
        text_tokenizer="builtin:tiny",
        llm_dtype=dtype,
    )
    with torch.device(device):
        unitok = UniTok(TokenizerConfig.preset("unitok-large"))
        return UniTokMLLM.from_config(config, unitok=unitok, text_tokenizer=tok)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _syncs_per_position(model, prompts: list[str], sampling: dict, mode: dict) -> float | None:
    """Host syncs between the first and the last generated position, per position (CUDA only)."""
    import warnings

    if model.device.type != "cuda":
        return None
    grid = model.grid()
    total = grid[0] * grid[1]
    marks: dict[int, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def progress(done: int, _: int) -> None:
            if done == 1:
                torch.cuda.set_sync_debug_mode("warn")
                marks[1] = len(caught)
            elif done == total:
                torch.cuda.set_sync_debug_mode("default")
                marks[total] = len(caught)

        try:
            model.generate_images(prompts, seed=0, decode=False, progress=progress, **sampling, **mode)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return (marks[total] - marks[1]) / (total - 1)


def bench_generation(
    model, prompt: str, batches: list[int], sampling: dict, backend: str = "inductor"
) -> dict:
    """Seconds per image (codes + decoding) of the eager, fast and compiled loops; see the module docstring."""
    device = model.device
    modes = {"eager": {}, "fast": {"fast": True}, "compiled": {"compile": backend}}
    report: dict = {"sampling": sampling, "positions": model.grid()[0] * model.grid()[1]}
    for batch in batches:
        prompts = [prompt] * batch
        codes = {}
        for name, mode in modes.items():
            _sync(device)
            start = time.perf_counter()
            model.generate_images(prompts, seed=0, **sampling, **mode)  # warm-up (compiles)
            _sync(device)
            report[f"b{batch}_{name}_warmup_s"] = round(time.perf_counter() - start, 2)
            start = time.perf_counter()
            result = model.generate_images(prompts, seed=0, **sampling, **mode)
            _sync(device)
            seconds = time.perf_counter() - start
            codes[name] = result.codes
            report[f"b{batch}_{name}_s_per_image"] = round(seconds / batch, 3)
            report[f"b{batch}_{name}_positions_per_s"] = round(batch * report["positions"] / seconds, 1)
            report[f"b{batch}_{name}_syncs_per_position"] = _syncs_per_position(
                model, prompts, sampling, mode
            )
            logger.info("batch %d %s: %.3f s/image", batch, name, seconds / batch)
        # Same seed and noise: fast and compiled draw alike up to rounding (bf16 kernels fuse differently).
        report[f"b{batch}_compiled_codes_equal_fast"] = float(
            (codes["compiled"] == codes["fast"]).float().mean()
        )
        for name in ("fast", "compiled"):
            speedup = report[f"b{batch}_eager_s_per_image"] / report[f"b{batch}_{name}_s_per_image"]
            report[f"b{batch}_{name}_speedup_vs_eager"] = round(speedup, 2)
    return report


def _default_image():
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (320, 256), (128, 128, 128))
    ImageDraw.Draw(image).ellipse((100, 60, 220, 180), fill=(220, 30, 30))
    return image


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mllm", help="released MLLM folder or Hub id")
    parser.add_argument("--unitok", help="released unitok_tokenizer.pth (or a UniTok folder)")
    parser.add_argument(
        "--tiny", action="store_true", help="random tiny model of the architecture (no weights)"
    )
    parser.add_argument(
        "--random",
        choices=["unitok-mllm-7b", "llama2-7b"],
        help="this preset at full size with random weights, built on the device (no weights needed)",
    )
    parser.add_argument(
        "--bench-generation", action="store_true", help="time eager vs fast vs compiled image generation"
    )
    parser.add_argument("--gen-batch", type=int, nargs="+", default=[1], help="prompts per generation batch")
    parser.add_argument(
        "--compile",
        default="inductor",
        metavar="BACKEND",
        help="torch.compile backend of the compiled loop (inductor: CUDA graphs on CUDA; aot_eager to check the "
        "script quickly on a CPU)",
    )
    parser.add_argument("--image", help="image to ask about (default: a drawn red circle)")
    parser.add_argument("--question", default="What is the colour of the circle?")
    parser.add_argument("--prompt", default="a red apple on a wooden table")
    parser.add_argument("--sampling", default="release-default", help="a SAMPLING_PRESETS name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", default="gpu_check_mllm")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from unitok.mllm import SAMPLING_PRESETS, UniTokMLLM
    from unitok.mllm.generation import generate_image_codes

    if args.sampling not in SAMPLING_PRESETS:
        parser.error(f"--sampling must be one of {sorted(SAMPLING_PRESETS)}")
    if not (args.tiny or args.random) and not (args.mllm and args.unitok):
        parser.error("give --mllm and --unitok (the released weights), --tiny or --random PRESET")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda but no CUDA device is available (use --tiny --device cpu to check the script)"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": str(device), "dtype": args.dtype, "sampling": args.sampling}

    start = time.perf_counter()
    if args.tiny:
        model = _tiny_model()
    elif args.random:
        model = _random_model(args.random, device, args.dtype)
        report["random"] = args.random
    else:
        model = UniTokMLLM.from_pretrained(args.mllm, unitok=args.unitok, llm_dtype=args.dtype)
    model = model.to(device=device, dtype=getattr(torch, args.dtype)).eval()
    report["load_s"] = round(time.perf_counter() - start, 2)

    image = args.image if args.image else _default_image()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    reply = model.chat([{"role": "user", "content": args.question}], image, max_new_tokens=64)
    report["answer_s"] = round(time.perf_counter() - start, 2)
    report["question"], report["answer"] = args.question, reply
    (out / "answer.txt").write_text(reply + "\n")

    # Cached vs uncached on the first positions (greedy, guided): the merger's cache must not change the codes.
    kwargs = dict(
        grid=(2, 2), cfg_scale=SAMPLING_PRESETS[args.sampling].get("cfg_scale", 1.0), temperature=0.0
    )
    cached = generate_image_codes(model, [args.prompt], **kwargs)
    uncached = generate_image_codes(model, [args.prompt], use_cache=False, depth_cache=False, **kwargs)
    report["cached_equals_uncached_2x2"] = bool(torch.equal(cached, uncached))

    done = []
    start = time.perf_counter()
    result = model.generate_images(
        args.prompt, seed=args.seed, progress=lambda i, n: done.append(i), **SAMPLING_PRESETS[args.sampling]
    )
    seconds = time.perf_counter() - start
    report["generate_s"] = round(seconds, 2)
    report["positions_per_s"] = round(len(done) / seconds, 1)
    result.images[0].save(out / "generated.png")
    if device.type == "cuda":
        report["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if args.bench_generation:
        report["generation"] = bench_generation(
            model, args.prompt, args.gen_batch, SAMPLING_PRESETS[args.sampling], args.compile
        )
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if report["cached_equals_uncached_2x2"] else 1


if __name__ == "__main__":
    sys.exit(main())
