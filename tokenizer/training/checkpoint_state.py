"""Checkpoints of the tokenizer trainer: what one holds, how it is written, and how a run resumes from it.

``CheckpointMixin`` is a part of ``unitok.tokenizer.train.Trainer`` (it reads the trainer's model, engines,
data stream and config); it lives here so that the training step and the run's state stay apart.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from unitok.tokenizer.training import checkpointing, distributed
from unitok.tokenizer.training.config import config_changes
from unitok.tokenizer.training.data import DataPosition
from unitok.tokenizer.training.distributed import TorchEngine
from unitok.tokenizer.training.export import nonfinite_tensors

log = logging.getLogger("unitok.tokenizer.train")


class CheckpointMixin:
    """``save_checkpoint``, ``wait_for_checkpoint`` and the resume path of the tokenizer trainer."""

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` atomically (all processes take part), keep the last ``keep_last``.

        With ``checkpoint.async_save`` the files are still being written when this returns: the folder
        appears once they are complete (``wait_for_checkpoint``, or the first training step after that).
        """
        self._check_nonfinite()
        bad = nonfinite_tensors(self.model.state_dict())
        if self.ema is not None:
            bad += [f"ema.{name}" for name in nonfinite_tensors(self.ema.state_dict())]
        if bad:
            raise checkpointing.TrainingError(
                f"step {self.step}: {len(bad)} weight tensor(s) are not finite ({', '.join(bad[:5])}, ...); "
                "refusing to save them. Lower optim.lr and resume from the last good checkpoint"
            )
        # Before the staging folder is cleared: the previous save may still be writing there.
        self.wait_for_checkpoint()
        started = time.perf_counter()
        root = checkpointing.checkpoint_root(self.output_dir)
        tmp = checkpointing.temporary_dir(root, self.step)
        final = root / checkpointing.step_dir_name(self.step)
        rng_states = distributed.gather_objects(checkpointing.capture_rng_state(), self.info)
        skipped = self._skipped_total()
        if self.info.is_main:
            checkpointing.fresh_dir(tmp)
        distributed.barrier(self.info)
        self.gen.save_sharded(tmp / checkpointing.DEEPSPEED_FOLDER, "generator")
        if self.disc is not None:
            self.disc.save_sharded(tmp / checkpointing.DEEPSPEED_FOLDER, "discriminator")
        distributed.barrier(self.info)
        if self.dcp_saver is not None:
            self.dcp_saver.start(self._trainer_state(rng_states, skipped), tmp, final)
            if self.info.is_main:
                log.info("checkpoint %s: training blocked %.2f s", final.name, time.perf_counter() - started)
        elif self.info.is_main:
            checkpointing.atomic_save(
                self._trainer_state(rng_states, skipped), tmp / checkpointing.TRAINER_FILE
            )
            checkpointing.commit(tmp, final)
            checkpointing.prune(root, self.config.checkpoint.keep_last, current=final)
            log.info("saved checkpoint %s", final)
        if self.dcp_saver is None:
            distributed.barrier(self.info)
        self.checkpoint = final
        return final

    def wait_for_checkpoint(self) -> None:
        """Block until an asynchronous checkpoint save in flight is written and renamed into place."""
        if self.dcp_saver is not None:
            self.dcp_saver.wait()

    def _trainer_state(self, rng_states: list[dict[str, torch.Tensor]], skipped: int) -> dict[str, Any]:
        """Everything a checkpoint holds (the tensors are the live ones: save or copy them at once)."""
        position = self.stream.position()
        return {
            "format_version": 1,
            "step": self.step,
            "total_steps": self.total_steps,
            "world_size": self.world_size,
            "data": {
                "epoch": position.epoch,
                "batch_in_epoch": position.batch_in_epoch,
                "samples_seen": self.step * self.global_batch,
                "skipped": skipped,
            },
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            # The quantizer's usage-EMA warm-up counter is a Python int outside the state dict.
            "quantizer_usage_updates": self.model.quantizer.num_usage_updates,
            "ema": None if self.ema is None else self.ema.state_dict(),
            "disc": None if self.disc_module is None else self.disc_module.state_dict(),
            "gen_engine": self.gen.state_dict(),
            "disc_engine": None if self.disc is None else self.disc.state_dict(),
            "rng": rng_states,
        }

    def _check_config_changes(self, path: Path, saved: dict[str, Any]) -> None:
        """Refuse a resume whose config changes the training, unless ``checkpoint.allow_config_change``."""
        relevant, free = config_changes(saved, self.config.to_dict())
        for line in free:
            log.info("resuming %s with a changed setting: %s", path, line)
        if not relevant:
            return
        listing = "; ".join(relevant)
        if not self.config.checkpoint.allow_config_change:
            raise checkpointing.TrainingError(
                f"the config differs from the one checkpoint {path} was trained with: {listing}. Resume "
                "with the same settings, or pass --allow-config-change to apply the new values"
            )
        optim = [line for line in relevant if line.startswith(("optim.", "disc."))]
        if optim and self.config.distributed.engine == "deepspeed":
            raise checkpointing.TrainingError(
                f"engine deepspeed restores the optimiser and schedule from its own files, so changes to them "
                f"cannot apply on resume: {'; '.join(optim)}"
            )
        if self.info.is_main:
            log.warning("resuming %s with changed settings, which apply from now on: %s", path, listing)

    def _apply_optim_config(self) -> None:
        """Make the torch engines' restored optimiser and schedule follow this run's config (they come back
        from the checkpoint with the values they were saved with; DeepSpeed keeps its own)."""
        pairs = [(self.gen, self.config.optim, self._gen_schedule())]
        if self.disc is not None:
            pairs.append((self.disc, self.config.disc, self._disc_schedule()))
        for engine, section, multiplier in pairs:
            if not isinstance(engine, TorchEngine):
                continue
            scheduler = engine.scheduler
            scheduler.lr_lambdas = [multiplier] * len(engine.optimizer.param_groups)
            scheduler.base_lrs = [section.lr] * len(engine.optimizer.param_groups)
            for group in engine.optimizer.param_groups:
                group["initial_lr"] = section.lr
                group["lr"] = section.lr * multiplier(scheduler.last_epoch)
                group["betas"], group["eps"] = tuple(section.betas), section.eps
                if group["weight_decay"] > 0:
                    group["weight_decay"] = section.weight_decay
            if hasattr(engine, "grad_clip"):
                engine.grad_clip = section.grad_clip

    def _load_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        if state["total_steps"] != self.total_steps:
            raise ValueError(
                f"checkpoint {path} belongs to a run of {state['total_steps']} steps, this config has "
                f"{self.total_steps}; resume with the same run length and batch"
            )
        self.model.load_state_dict(state["model"])
        self.model.quantizer.num_usage_updates = state["quantizer_usage_updates"]
        self.gen.load_state_dict(state["gen_engine"])
        self.gen.load_sharded(path / checkpointing.DEEPSPEED_FOLDER, "generator")
        if self.disc is not None:
            if state["disc"] is None:
                raise ValueError(f"checkpoint {path} has no discriminator but this config trains one")
            self.disc_module.load_state_dict(state["disc"])
            self.disc.load_state_dict(state["disc_engine"])
            self.disc.load_sharded(path / checkpointing.DEEPSPEED_FOLDER, "discriminator")
        self._apply_optim_config()
        if self.ema is not None:
            if state["ema"] is not None:
                self.ema.load_state_dict(state["ema"])
            else:
                log.warning("checkpoint %s has no EMA weights; the EMA starts from the current weights", path)
        self.step = state["step"]
        self.position = DataPosition(state["data"]["epoch"], state["data"]["batch_in_epoch"])
        self.skipped_before = state["data"]["skipped"]
        if len(state["rng"]) == self.world_size:
            checkpointing.restore_rng_state(state["rng"][self.info.rank])
        else:
            log.warning(
                "checkpoint %s was written by %d processes, this run has %d: random streams start afresh",
                path,
                len(state["rng"]),
                self.world_size,
            )
        self.checkpoint = path
        if self.info.is_main:
            log.info("resumed from %s at step %d", path, self.step)
