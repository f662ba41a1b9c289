"""What watches a tokenizer run: held-out PSNR/SSIM (+ rFID) and zero-shot accuracy, reconstruction images,
the data-position scalars logged beside the losses, and the check on steps skipped for a non-finite gradient.

``EvaluationMixin`` is a part of ``unitok.tokenizer.train.Trainer`` (it reads the trainer's model, data stream,
monitor and config); it lives here so that the training step and what watches it stay apart.
"""

from __future__ import annotations

import logging

import torch

from unitok.tokenizer.training import checkpointing, distributed

log = logging.getLogger("unitok.tokenizer.train")


class EvaluationMixin:
    """``evaluate``, the scalars and images the tokenizer trainer logs, and its non-finite-step check."""

    @torch.no_grad()
    def evaluate(self) -> dict[str, float | None]:
        """Held-out PSNR/SSIM (+ rFID) and zero-shot accuracy of the current weights (``eval`` section), on
        the main process; the others wait. Returns the results (empty on the other processes)."""
        results: dict[str, float | None] = {}
        if self.info.is_main:
            # The loaders draw seeds from the global generator: keep training's random stream untouched.
            with torch.random.fork_rng(devices=[]):
                results = self._evaluate_main()
            self.monitor.log_eval(self.step, results)
        distributed.barrier(self.info)
        return results

    def _evaluate_main(self) -> dict[str, float | None]:
        from unitok.eval.tokenizer_eval import (
            build_image_dataset,
            evaluate_reconstruction,
            load_inception,
            make_loader,
        )
        from unitok.eval.zero_shot import evaluate_zero_shot

        section = self.config.eval
        size = self.model_config.image_size
        inception = load_inception(section.inception) if section.rfid else None
        if inception is not None:
            inception = inception.to(self.device)
        dataset, _ = build_image_dataset(section.data or self.config.data.path, size, split=section.split)
        loader = make_loader(dataset, section.batch_size, 0, section.max_images)
        recon = evaluate_reconstruction(
            self.model,
            loader,
            inception=inception,
            max_images=section.max_images,
            autocast_dtype=self.autocast_dtype,
            progress=False,
        )
        results = {
            "psnr": recon["psnr"],
            "ssim": recon["ssim"],
            "rfid": recon["rfid"],
            "usage_percent": recon["codebook"]["usage_percent_mean"],
            "images": recon["num_images"],
        }
        if section.zero_shot:
            zero_shot = evaluate_zero_shot(
                self.model,
                section.zero_shot,
                templates=section.templates,
                batch_size=section.batch_size,
                max_images=section.max_images,
                autocast_dtype=self.autocast_dtype,
            )
            results["zero_shot_top1"] = zero_shot["top1"]
        return results

    def _skipped_total(self) -> int:
        local = torch.tensor([self.stream.skipped()], dtype=torch.float64)
        return self.skipped_before + int(distributed.all_reduce_sum(local, self.info).item())

    def _position_scalars(self) -> dict[str, float]:
        position = self.stream.position()
        usage_ema = float(self.model.quantizer.usage_stats()["usage"].float().mean())
        return {
            "usage_ema": usage_ema,
            "epoch": position.epoch,
            "samples": self.step * self.global_batch,
            "skipped": self._skipped_total(),
        }

    @torch.no_grad()
    def _save_images(self) -> None:
        if not self.info.is_main or self.vis_images is None:
            return
        self.model.eval()
        with self._autocast():
            recon = self.model.reconstruct(self.vis_images)
        self.model.train()
        self.monitor.images(self.step, self.vis_images, recon)

    def _check_nonfinite(self) -> None:
        """Read the count of steps skipped in a row for a non-finite gradient (one host read); warn about new
        ones and stop after ``max_nonfinite_steps`` in a row (or at once where the engine cannot skip)."""
        in_a_row, total = (int(n) for n in torch.stack([self.nonfinite_run, self.nonfinite_total]).tolist())
        new, self._nonfinite_seen = total - self._nonfinite_seen, total
        self.nonfinite_in_a_row = in_a_row
        if not new:
            return
        limit = self.config.train.max_nonfinite_steps
        can_skip = self.gen.can_skip_steps and (self.disc is None or self.disc.can_skip_steps)
        if in_a_row == 0:
            # A run of skipped steps that ended between two reads (engines that skip on the device).
            if self.info.is_main:
                log.warning(
                    "%d step(s) before step %d had a non-finite gradient norm; the update was skipped",
                    new,
                    self.step,
                )
            return
        if self.info.is_main:
            log.warning(
                "step %d: gradient norm %s is not finite; %s (%d in a row, limit %d)",
                self.step,
                float(self._last_grad_norm),
                "the update was skipped" if can_skip else "the engine applied it",
                self.nonfinite_in_a_row,
                limit,
            )
        if self.nonfinite_in_a_row >= limit or not can_skip:
            good = checkpointing.list_checkpoints(checkpointing.checkpoint_root(self.output_dir))
            raise checkpointing.TrainingError(
                f"training diverged: the loss or gradient was not finite for {self.nonfinite_in_a_row} "
                f"step(s) in a row up to step {self.step} (optim.lr={self.config.optim.lr}); nothing was "
                f"saved from these steps. Lower optim.lr or raise optim.warmup and resume from the last good "
                f"checkpoint ({good[-1] if good else 'none yet'})"
            )
