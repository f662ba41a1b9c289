"""``MLLMTrainer``: transformers' ``Trainer`` for :class:`~unitok.mllm.UniTokMLLM` batches.

What it adds to ``Trainer`` (whose DeepSpeed, accumulation, LR-schedule, logging and resume logic it keeps):

- the loss: ``model(MLLMBatch)`` (a per-micro-batch mean, as the Trainer expects; the Trainer divides it by
  the accumulation steps and DeepSpeed/DDP average it over ranks), with ``text_loss`` and ``code_loss``
  logged beside ``loss``;
- the mixture sampler instead of the Trainer's random sampler (one global order, sharded by the launcher);
- atomic checkpoints: a ``checkpoint-N`` folder is assembled under ``OUT/.staging`` by every rank and
  renamed into place by rank 0 once complete, so ``--resume auto`` never meets a half-written one;
- exports: each checkpoint holds ``mllm/`` (``UniTokMLLM.save_pretrained``, written on rank 0 from the
  full state dict the engine gathers, also under ZeRO-3), and ``export_final`` writes ``OUT/final``;
- no weight decay on parameters whose gradients are masked to some rows (the alignment stage's token rows).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn
from transformers import Trainer
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import rotate_checkpoints

from unitok.mllm.sequence import MLLMBatch

from .model_setup import distinct_tensors, export

logger = logging.getLogger(__name__)

STAGING = ".staging"
EXPORT_FOLDER = "mllm"
TRAINING_WEIGHTS = "model.safetensors"


class _TensorBoard(TensorBoardCallback):
    """TensorBoard logging without the model-config text (``MLLMConfig`` is a dataclass, not a PretrainedConfig)."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        kwargs.pop("model", None)
        super().on_train_begin(args, state, control, **kwargs)


class MLLMTrainer(Trainer):
    """``Trainer`` for the MLLM (see the module docstring).

    Extra args:
        sampler: the mixture sampler (a global order of dataset keys).
        unitok: the frozen UniTok taken out of the model (put into exports).
        masked_parameters: names of parameters trained on some rows only (no weight decay).
    """

    def __init__(
        self,
        *args: Any,
        sampler: torch.utils.data.Sampler,
        unitok: nn.Module,
        masked_parameters: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.pop_callback(TensorBoardCallback) is not None:
            self.add_callback(_TensorBoard())
        self.mixture_sampler = sampler
        self.unitok = unitok
        self.masked_parameters = set(masked_parameters or [])
        self._staging: str | None = None
        self._parts = torch.zeros(3, dtype=torch.float64)

    # ------------------------------------------------------------------ data and loss

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler:
        return self.mixture_sampler

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """``model(MLLMBatch(**inputs)).loss``; the text and code parts are kept for the next log line."""
        out = model(MLLMBatch(**inputs))
        if model.training:
            self._parts += torch.tensor(
                [float(out.text_loss), float(out.code_loss), 1.0], dtype=torch.float64
            )
        return (out.loss, out) if return_outputs else out.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean ``text_loss`` / ``code_loss`` over ranks and micro-batches since the last log line."""
        if "loss" in logs:
            parts = self._parts.to(self.args.device)
            if self.args.world_size > 1:
                parts = self.accelerator.reduce(parts, reduction="sum")
            if parts[2] > 0:
                logs["text_loss"] = round(float(parts[0] / parts[2]), 6)
                logs["code_loss"] = round(float(parts[1] / parts[2]), 6)
            self._parts.zero_()
        super().log(logs, start_time)

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """The Trainer's choice (no decay on biases and norms), minus the row-masked parameters."""
        return [n for n in super().get_decay_parameter_names(model) if n not in self.masked_parameters]

    # ------------------------------------------------------------------ checkpoints and exports

    def _get_output_dir(self, trial: Any) -> str:
        return self._staging if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """The Trainer's checkpoint, assembled in ``OUT/.staging`` and renamed into place when complete."""
        root = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        staging = root / STAGING
        if self.args.should_save and (staging / name).exists():
            shutil.rmtree(staging / name)
        self.accelerator.wait_for_everyone()
        self._staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            target = root / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / name, target)
            rotate_checkpoints(
                output_dir=str(root), save_total_limit=self.args.save_total_limit, use_mtime=False
            )
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Rank 0 writes the training weights (what a resume without DeepSpeed loads) and ``mllm/`` (the export)."""
        if not self.args.should_save:
            return
        out = Path(output_dir or self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = self.model.state_dict() if state_dict is None else state_dict
        if not self.is_deepspeed_enabled:
            tensors = {k: v.detach().contiguous().cpu() for k, v in distinct_tensors(state).items()}
            safetensors.torch.save_file(tensors, str(out / TRAINING_WEIGHTS), metadata={"format": "pt"})
        export(self.model, self.unitok, state, out / EXPORT_FOLDER)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """A resumed checkpoint must restore every weight: only the second names of tied weights may be missing."""
        state = self.model.state_dict()
        tied = set(state) - set(distinct_tensors(state))
        missing = [k for k in load_result.missing_keys if k not in tied]
        if missing or load_result.unexpected_keys:
            raise ValueError(
                f"the checkpoint's weights do not match the model: missing {missing}, "
                f"unexpected {list(load_result.unexpected_keys)}"
            )

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's full weights on rank 0 (gathered from ZeRO-3 partitions; a collective call)."""
        if self.is_deepspeed_enabled:
            return self.accelerator.get_state_dict(self.deepspeed)
        return self.model.state_dict()

    def export_final(self, path: str | Path) -> None:
        """Write ``UniTokMLLM.save_pretrained(path)`` of the trained model (called on every rank)."""
        state = self.full_state_dict()
        if self.args.should_save:
            export(self.model, self.unitok, state, path)
        self.accelerator.wait_for_everyone()

    @torch.no_grad()
    def probe_loss(self, batch: dict[str, torch.Tensor]) -> float:
        """Loss of the training engine on ``batch`` in eval mode (every rank must call it with the same batch)."""
        engine = self.model_wrapped
        engine.eval()
        out = engine(MLLMBatch(**batch).to(self.args.device))
        engine.train()
        return float(out.loss)
