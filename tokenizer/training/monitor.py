"""What the trainer shows while it runs: a tqdm bar, log lines, ``metrics.jsonl``, TensorBoard, wandb,
and PNG grids of originals over reconstructions. Only the main process writes anything.

``metrics.jsonl`` has one JSON object per logged step: ``step``, ``epoch``, ``samples`` (seen so far over
all processes), ``lr``, ``disc_lr``, every loss part (``loss``, ``l1``, ``l2``, ``lpips``, ``vq``,
``entropy``, ``clip``, and once the discriminator runs ``gan``, ``gan_weight``, ``gan_warm``, ``disc``,
``disc_hinge``, ``disc_bcr``, ``disc_acc_real``, ``disc_acc_fake``), ``usage`` and ``perplexity``
(per-batch codebook figures averaged over sub-codebooks), ``grad_norm``, ``logit_scale``,
``skipped`` (corrupt samples skipped so far, all processes) and ``samples_per_s``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torchvision.utils import make_grid, save_image

from .config import LoggingSection
from .distributed import DistInfo, all_reduce_sum

log = logging.getLogger(__name__)

Scalar = float | torch.Tensor

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
TENSORBOARD_FOLDER = "tensorboard"
IMAGES_FOLDER = "images"
# Shown on the progress bar, in this order, when present.
_BAR_KEYS = ("loss", "l1", "l2", "clip", "gan", "disc", "lr", "usage")


def _format(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4f}"


class Monitor:
    """Progress bar, log lines, ``metrics.jsonl``, TensorBoard and optional wandb for one run.

    Args:
        section: the run's logging section.
        output_dir: the run folder (``metrics.jsonl``, ``tensorboard/`` and ``images/`` go there).
        enabled: True on the main process only.
        total_steps, start_step: the bar's length and start (after a resume).
        run_config: the resolved run config (recorded by wandb).
    """

    def __init__(
        self,
        section: LoggingSection,
        output_dir: Path,
        enabled: bool,
        total_steps: int,
        start_step: int,
        run_config: dict[str, Any],
    ):
        self.section = section
        self.output_dir = output_dir
        self.enabled = enabled
        self.bar = None
        self.writer = None
        self.wandb_run = None
        self.metrics_path = output_dir / METRICS_FILE
        if not enabled:
            return
        for name in (METRICS_FILE, EVAL_FILE):
            _drop_records_after(output_dir / name, start_step)
        if section.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if section.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / TENSORBOARD_FOLDER))
        if section.wandb:
            self.wandb_run = _start_wandb(section, output_dir, run_config)

    def advance(self) -> None:
        """Advance the bar by one optimiser step."""
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Write one record (bar figures, log line, ``metrics.jsonl``, TensorBoard, wandb) for ``step``."""
        if not self.enabled:
            return
        record = {"step": step, **scalars}
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        message = " | ".join(f"{k} {_format(v)}" for k, v in scalars.items())
        if self.bar is not None:
            self.bar.set_postfix({k: _format(scalars[k]) for k in _BAR_KEYS if k in scalars}, refresh=False)
            self.bar.write(f"step {step} | {message}")
        else:
            log.info("step %d | %s", step, message)
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(f"train/{key}", value, step)
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def redirect_logging(self) -> contextlib.AbstractContextManager:
        """While the bar shows, console log lines go through ``tqdm.write`` (above the bar, never on its line)."""
        if self.bar is None:
            return contextlib.nullcontext()
        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm(tqdm_class=type(self.bar))

    def log_eval(self, step: int, results: dict[str, float | None]) -> None:
        """Write one held-out evaluation (``eval.jsonl``, a log line, TensorBoard ``eval/*``, wandb)."""
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in results.items() if v is not None}
        with (self.output_dir / EVAL_FILE).open("a") as handle:
            handle.write(json.dumps({"step": step, **scalars}) + "\n")
        log.info("eval at step %d | %s", step, " | ".join(f"{k} {_format(v)}" for k, v in scalars.items()))
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(f"eval/{key}", value, step)
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({f"eval/{k}": v for k, v in scalars.items()}, step=step)

    def last_record(self) -> dict[str, float]:
        """The newest record of ``metrics.jsonl`` (from this or an earlier invocation), without ``step``."""
        if not self.metrics_path.is_file():
            return {}
        lines = self.metrics_path.read_text().splitlines()
        record = json.loads(lines[-1]) if lines else {}
        record.pop("step", None)
        return record

    def images(self, step: int, originals_B3HW: torch.Tensor, recons_B3HW: torch.Tensor) -> Path | None:
        """Save a PNG grid (top row originals, bottom row reconstructions, values in [-1,1]); returns its path."""
        if not self.enabled:
            return None
        folder = self.output_dir / IMAGES_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{step:08d}.png"
        pixels = torch.cat([originals_B3HW, recons_B3HW]).detach().float().cpu().clamp(-1, 1) * 0.5 + 0.5
        grid = make_grid(pixels, nrow=originals_B3HW.shape[0], padding=2)
        save_image(grid, path)
        if self.writer is not None:
            self.writer.add_image("train/reconstructions", grid, step)
        return path

    def close(self) -> None:
        """Close the bar, TensorBoard writer and wandb run."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _drop_records_after(path: Path, step: int) -> None:
    """Forget the records of steps after ``step`` in a JSON-lines log (a continuation that this run
    replaces), so that every step appears once; rewritten atomically."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if _record_step(line) <= step]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)
    log.info("dropped %d records after step %d from %s", len(lines) - len(kept), step, path)


def _record_step(line: str) -> float:
    """The step of one ``metrics.jsonl`` line (a damaged line counts as after every step)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def _start_wandb(section: LoggingSection, output_dir: Path, run_config: dict[str, Any]) -> Any:
    try:
        import wandb
    except ImportError:
        log.warning("logging.wandb is on but wandb is not installed (pip install wandb); logging without it")
        return None
    return wandb.init(
        project=section.wandb_project,
        name=section.wandb_run_name,
        dir=str(output_dir),
        config=run_config,
        resume="allow",
    )


class RunningMeans:
    """Sums of scalars (python floats or 0-dim tensors left on the device, so a step costs no host sync)
    since the last reset; ``means`` averages them over additions and processes in one transfer."""

    def __init__(self) -> None:
        self.sums: dict[str, Scalar] = {}
        self.counts: dict[str, int] = {}

    def add(self, scalars: dict[str, Scalar]) -> None:
        for key, value in scalars.items():
            value = value.detach().double() if isinstance(value, torch.Tensor) else value
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def step_means(self) -> dict[str, Scalar]:
        """Per-key means of this process only (still on the device)."""
        return {key: self.sums[key] / self.counts[key] for key in self.sums}

    def means(self, info: DistInfo) -> dict[str, float]:
        """Means over additions and processes (a collective: every process must call it); resets the sums."""
        keys = sorted(self.sums)
        sums = [torch.as_tensor(self.sums[k], dtype=torch.float64, device=info.device) for k in keys]
        counts = torch.tensor([self.counts[k] for k in keys], dtype=torch.float64, device=info.device)
        packed = all_reduce_sum(torch.cat([torch.stack(sums), counts]), info).tolist()
        self.sums, self.counts = {}, {}
        return {k: packed[i] / packed[len(keys) + i] for i, k in enumerate(keys)}
