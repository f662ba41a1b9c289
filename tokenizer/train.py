"""Train a UniTok tokenizer: ``unitok train-tokenizer --config NAME_OR_FILE [--set key=value ...]``.

One optimiser step (reference section 3.2), per micro-batch of image-text pairs:

    out   = UniTok(img, text_ids, recon_batch_size)            # bf16 autocast on GPU
    nll   = l1 * L1 + l2 * MSE + lpips * LPIPS                  # on the first recon_batch_size images
    loss  = nll + vq * VQ + entropy + clip * CLIP(img_feat, txt_feat, logit_scale)
            [+ warm * gan * adaptive(nll, G) * G,  G = -mean(D(DiffAug(blur(recon))))   once D is active]
    backward(loss)                                           -> clip grads, AdamW, warm-up + cosine LR
    [D step: hinge(D(aug(img)), D(aug(sg(recon)))) + bcr * consistency   -> clip, AdamW]

then ``logit_scale`` is clamped to [0, ln 100]. Several processes: launch with ``torchrun`` (DDP, or
DeepSpeed ZeRO-1/2 with ``--set distributed.engine=deepspeed``). Checkpoints go to
``<out>/checkpoints/step-*`` (``--resume auto`` continues the newest), the final weights to
``<out>/final`` (``UniTok.from_pretrained``). See ``unitok.tokenizer.training.config`` for every key.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from unitok.data.negatives import load_word_swaps
from unitok.tokenizer import UniTok
from unitok.tokenizer.losses import (
    LPIPS,
    ClipLoss,
    DinoDiscConfig,
    DinoDiscriminator,
    ReconstructionLoss,
    adaptive_gan_grads,
    blur_fade_schedule,
    blur_sigma_from_fade,
    discriminator_loss,
    gan_schedule,
    generator_loss,
    hard_negative_loss,
)
from unitok.tokenizer.training import checkpointing, distributed
from unitok.tokenizer.training.checkpoint_state import CheckpointMixin
from unitok.tokenizer.training.config import RunConfig, load_run_config, preset_names
from unitok.tokenizer.training.data import BatchStream, DataPosition, build_stream, prepare_synth_world
from unitok.tokenizer.training.distributed import DeepSpeedEngine, DistInfo, TorchEngine
from unitok.tokenizer.training.ema import ModelEma
from unitok.tokenizer.training.evaluation import EvaluationMixin
from unitok.tokenizer.training.export import export_weights, remove_stale_exports
from unitok.tokenizer.training.monitor import Monitor, RunningMeans, Scalar
from unitok.tokenizer.training.optim import WarmupCosine, build_adamw, build_scheduler

log = logging.getLogger(__name__)

RUN_CONFIG_FILE = "run_config.yaml"
FINAL_FOLDER = "final"
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    """What a call of ``train`` did.

    Attributes:
        output_dir: the run folder.
        step: optimiser steps done so far (over all invocations of this run).
        total_steps: optimiser steps of the whole run.
        final_dir: ``<out>/final`` when the run finished (None when it stopped early at ``stop_at_step``).
        checkpoint: the newest checkpoint folder written or resumed from (None if there is none).
        metrics: the last logged record (see ``monitor`` for the keys; on the main process, read back from
            ``metrics.jsonl`` when this invocation logged nothing, e.g. a finished run called again).
        skipped: corrupt samples skipped so far, all processes together.
    """

    output_dir: Path
    step: int
    total_steps: int
    final_dir: Path | None
    checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: int = 0


class Trainer(CheckpointMixin, EvaluationMixin):
    """Builds everything a run needs from its ``RunConfig`` and runs the loop (``run``)."""

    def __init__(self, config: RunConfig, info: DistInfo):
        self.config = config
        self.info = info
        self.device = info.device
        self.output_dir = Path(config.output_dir)
        self.world_size = info.world_size
        self.total_steps = config.train.num_steps(info.world_size)
        self.global_batch = config.train.global_batch_size(info.world_size)
        self._check_engine_precision()
        self.resumed_from, resume_state, unreadable = checkpointing.load_resumable(
            config.checkpoint.resume, self.output_dir
        )
        if resume_state is not None:
            self._check_config_changes(self.resumed_from, resume_state["config"])
        start_step = 0 if resume_state is None else int(resume_state["step"])
        newer = config.checkpoint.on_newer
        checkpointing.check_lineage(self.output_dir, start_step, newer, act=False, ignore=unreadable)
        distributed.barrier(info)
        if info.is_main:
            checkpointing.set_aside(unreadable)
            checkpointing.check_lineage(self.output_dir, start_step, newer)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / RUN_CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        distributed.barrier(info)
        if self.device.type == "cuda" and config.train.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        # Identical initial weights on every process; per-process randomness (augmentation) afterwards.
        _seed_everything(config.train.seed)
        self.model = self._build_model()
        self.model_config = self.model.config
        self.disc_module = self._build_discriminator()
        _seed_everything(config.train.seed + 1_000_003 * info.rank)

        self.gen = self._build_engine(self.model, config.optim, self._gen_schedule())
        self.disc = (
            None
            if self.disc_module is None
            else self._build_engine(self.disc_module, config.disc, self._disc_schedule())
        )
        self.ema = ModelEma(self.model, config.train.ema_decay) if config.train.ema_decay else None
        self.recon_loss = self._build_recon_loss()
        self.clip_loss = ClipLoss(info.rank, info.world_size) if config.loss.clip > 0 else None
        self.autocast_dtype = _AUTOCAST_DTYPES.get(config.train.precision)

        self.step = 0
        self.skipped_before = 0
        self.position = DataPosition(epoch=0, batch_in_epoch=0)
        self.checkpoint: Path | None = None
        section = config.checkpoint
        self.dcp_saver = (
            checkpointing.DcpSaver(info.is_main, section.keep_last, section.async_save)
            if section.format == "dcp"
            else None
        )
        # Steps skipped in a row for a non-finite gradient: counted on the device, read on the host when
        # ``_check_nonfinite`` runs (every step, or only on logging and checkpoint steps when both engines
        # skip on the device).
        self.nonfinite_run = torch.zeros((), device=self.device)
        self.nonfinite_total = torch.zeros((), device=self.device)
        self.nonfinite_in_a_row = 0
        self._nonfinite_seen = 0
        self._last_grad_norm: Scalar = float("nan")
        if resume_state is not None:
            self._load_checkpoint(self.resumed_from, resume_state)
        del resume_state

        prepare_synth_world(config.data, info)
        self.stream: BatchStream = build_stream(
            config.data,
            image_size=self.model_config.image_size,
            context_length=self.model_config.text_context_length,
            local_batch_size=config.train.local_batch_size,
            grad_accum=config.train.grad_accum,
            seed=config.train.seed,
            info=info,
            position=self.position,
            resumed=self.resumed_from is not None,
            # RunConfig has checked that a positive weight comes with a vocabulary.
            negatives=load_word_swaps(config.data.negative_words)
            if self.clip_loss is not None and config.loss.clip_negatives > 0
            else None,
        )
        self.monitor = Monitor(
            config.logging, self.output_dir, info.is_main, self.total_steps, self.step, config.to_dict()
        )
        self.running = RunningMeans()
        self.last_metrics: dict[str, float] = {}
        self.vis_images: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------
    # construction

    def _check_engine_precision(self) -> None:
        if self.config.distributed.engine == "deepspeed" and self.config.train.precision == "fp16":
            raise ValueError(
                "engine deepspeed trains with train.precision bf16 or fp32 (fp16 needs a loss scaler "
                "inside DeepSpeed, which this trainer does not configure); use bf16"
            )

    def _build_model(self) -> UniTok:
        section = self.config.model
        model_config = section.tokenizer_config()
        if section.init_from:
            model = UniTok.from_pretrained(section.init_from, config=model_config)
            log.info("initialised the tokenizer from %s", section.init_from)
        else:
            model = UniTok(model_config)
        if section.clip_weights:
            model.load_clip_weights(section.clip_weights)
        if self.config.loss.clip == 0:
            # Without the contrastive loss these parts get no gradient; frozen, DDP does not wait for them.
            for part in (model.text_encoder, model.fc_norm, model.projection):
                part.requires_grad_(False)
            model.logit_scale.requires_grad_(False)
        model = model.to(self.device).train()
        if model_config.channels_last:
            # NHWC conv weights to match the NHWC activations (no per-call layout conversion in cuDNN).
            model = model.to(memory_format=torch.channels_last)
        if self.config.train.compile:
            compile_blocks(model)
        return model

    def _disc_active_ever(self) -> bool:
        disc = self.config.disc
        return disc.enabled and disc.weight > 0 and self.disc_start_step() < self.total_steps

    def _build_discriminator(self) -> DinoDiscriminator | None:
        section = self.config.disc
        if not self._disc_active_ever():
            return None
        options = {"image_size": self.model_config.image_size, **section.options}
        disc_config = DinoDiscConfig.preset(section.preset, **options)
        weights = section.dino_weights
        disc = DinoDiscriminator(
            disc_config,
            backbone_path=None if weights in (None, "hub") else weights,
            from_hub=weights == "hub",
        )
        return disc.to(self.device).train()

    def _gen_schedule(self) -> WarmupCosine:
        optim = self.config.optim
        return WarmupCosine(
            self.total_steps,
            round(optim.warmup * self.total_steps),
            optim.start_ratio,
            optim.end_ratio,
            cosine=optim.schedule == "cosine",
        )

    def disc_start_step(self) -> int:
        """First step at which the discriminator is active (``gan_schedule`` > 0; ``total_steps`` if never)."""
        disc = self.config.disc
        active = (
            s
            for s in range(self.total_steps)
            if gan_schedule(s, self.total_steps, disc.start, disc.warmup) > 0
        )
        return next(active, self.total_steps)

    def _disc_schedule(self) -> WarmupCosine:
        # Counts the discriminator's own steps: it steps once per training step from disc_start_step on.
        disc = self.config.disc
        span = max(1, self.total_steps - self.disc_start_step())
        return WarmupCosine(
            span,
            round(disc.warmup * self.total_steps),
            disc.start_ratio,
            disc.end_ratio,
            cosine=disc.schedule == "cosine",
        )

    def _build_engine(
        self, module: torch.nn.Module, section: Any, multiplier: WarmupCosine
    ) -> TorchEngine | DeepSpeedEngine:
        train = self.config.train
        optimizer = build_adamw(
            module, section.lr, section.betas, section.weight_decay, section.eps, fused=train.fused_adamw
        )
        scheduler = build_scheduler(optimizer, multiplier)
        if self.config.distributed.engine == "deepspeed":
            return DeepSpeedEngine(
                module,
                optimizer,
                scheduler,
                self.info,
                section.grad_clip,
                train.local_batch_size,
                train.grad_accum,
                self.config.distributed.zero_stage,
            )
        return TorchEngine(
            module,
            optimizer,
            scheduler,
            self.info,
            section.grad_clip,
            train.grad_accum,
            fp16=train.precision == "fp16" and self.device.type == "cuda",
            find_unused_parameters=self.config.distributed.find_unused_parameters,
            bf16_grad_compression=self.config.distributed.bf16_grad_compression,
        )

    def _build_recon_loss(self) -> ReconstructionLoss:
        loss = self.config.loss
        lpips = None
        if loss.lpips > 0:
            source = loss.lpips_weights
            lpips = LPIPS(
                weights_path=None if source in ("torchvision", "random") else source,
                pretrained=source == "torchvision",
                min_size=loss.lpips_min_size,
                precision=loss.lpips_precision,
                channels_last=loss.lpips_channels_last,
            ).to(self.device)
        return ReconstructionLoss(loss.l1, loss.l2, loss.lpips, lpips=lpips)

    # ------------------------------------------------------------------------------------------
    # one step

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _gan_state(self) -> tuple[float, float]:
        """(warm-up factor of the GAN term, blur sigma of the discriminator inputs) at the current step."""
        if self.disc is None:
            return 0.0, 0.0
        disc = self.config.disc
        warm = gan_schedule(self.step, self.total_steps, disc.start, disc.warmup)
        fade = blur_fade_schedule(self.step, self.total_steps, disc.start, disc.warmup) if disc.blur else 0.0
        return warm, blur_sigma_from_fade(self.model_config.image_size, fade)

    def _generator_micro_step(
        self, img: torch.Tensor, ids: torch.Tensor, warm: float, sigma: float, sync: bool
    ) -> tuple[dict[str, Scalar], torch.Tensor]:
        config = self.config
        recon_bs = config.train.recon_batch_size or img.shape[0]
        with self.gen.sync(sync):
            # Hard negatives come as ids [B, 1+N, T] (caption, negatives): one text-tower pass over all.
            texts = None if self.clip_loss is None else ids.flatten(0, 1) if ids.ndim == 3 else ids
            with self._autocast():
                out = self.gen(img, texts, recon_batch_size=recon_bs)
            adaptive = warm > 0 and config.disc.adaptive
            # With the adaptive GAN weight the reconstruction and GAN losses see a detached copy of the
            # reconstruction, so that LPIPS and the discriminator are back-propagated once each (see
            # adaptive_gan_grads) instead of once for the weight and again for the total.
            recon = out.recon.detach().requires_grad_() if adaptive else out.recon
            rec = self.recon_loss(recon, img[:recon_bs])
            model_terms = config.loss.vq * out.vq_loss + out.entropy_loss
            parts = {
                "l1": rec.l1,
                "l2": rec.l2,
                "lpips": rec.lpips,
                "vq": out.vq_loss,
                "entropy": out.entropy_loss,
            }
            if self.clip_loss is not None:
                image_features, text_features = out.image_features.float(), out.text_features.float()
                if ids.ndim == 3:
                    rows = text_features.unflatten(0, ids.shape[:2])
                    text_features, negatives = rows[:, 0], rows[:, 1:]
                    negative = hard_negative_loss(
                        image_features, text_features, negatives, ids[:, 1:, 0] != 0, out.logit_scale
                    )
                    model_terms = model_terms + config.loss.clip_negatives * negative
                    parts["clip_neg"] = negative
                clip = self.clip_loss(image_features, text_features, out.logit_scale)
                model_terms = model_terms + config.loss.clip * clip
                parts["clip"] = clip
            total = rec.total + model_terms
            if warm > 0:
                # The bare module (not DDP's wrapper) with frozen weights: gradients reach the generator only.
                with _frozen(self.disc_module), self._autocast():
                    g_loss = generator_loss(self.disc_module, recon, sigma, config.disc.aug_prob)
                gan_scale = warm * config.disc.weight
                if adaptive:
                    grads = adaptive_gan_grads(
                        rec.total,
                        g_loss,
                        recon,
                        out.recon,
                        self.model.decoder_last_layer(),
                        *config.disc.adaptive_clamp,
                    )
                    weight = grads.weight
                    recon_grad = grads.nll_grad + gan_scale * weight * grads.g_grad
                    # The reconstruction and GAN terms reach the model through out.recon only.
                    model_terms = model_terms + (out.recon * recon_grad).sum()
                    total = total.detach()
                else:
                    weight = g_loss.new_ones(())
                total = total + gan_scale * weight * g_loss
                parts.update(gan=g_loss, gan_weight=weight)
            self.gen.backward(model_terms if adaptive else total)
        scalars = {k: v.detach() for k, v in parts.items()}
        scalars["loss"] = total.detach()
        scalars["usage"] = out.usage.detach().float().mean()
        scalars["perplexity"] = out.perplexity.detach().float().mean()
        scalars["logit_scale"] = out.logit_scale.detach()
        return scalars, out.recon.detach()

    def _disc_micro_step(
        self, img: torch.Tensor, recon: torch.Tensor, sigma: float, sync: bool
    ) -> dict[str, Scalar]:
        disc = self.config.disc
        with self.disc.sync(sync):
            with self._autocast():
                result = discriminator_loss(
                    self.disc, img[: recon.shape[0]], recon, sigma, disc.bcr, disc.bcr_cutout, disc.aug_prob
                )
            self.disc.backward(result.loss)
        return {
            "disc": result.loss.detach(),
            "disc_hinge": result.hinge.detach(),
            "disc_bcr": result.bcr.detach(),
            "disc_acc_real": result.acc_real,
            "disc_acc_fake": result.acc_fake,
        }

    def train_step(self) -> dict[str, Scalar]:
        """One optimiser step over ``grad_accum`` micro-batches; returns the step's scalars (this process,
        tensors left on the device)."""
        warm, sigma = self._gan_state()
        accum = self.config.train.grad_accum
        step_scalars = RunningMeans()
        lr, disc_lr = self.gen.lr, self.disc.lr if self.disc is not None else 0.0
        for micro in range(accum):
            img, ids = self.stream.next()
            img, ids = img.to(self.device, non_blocking=True), ids.to(self.device, non_blocking=True)
            if self.vis_images is None and self.info.is_main:
                self.vis_images = img[: self.config.logging.num_images].detach().clone()
            last = micro == accum - 1
            scalars, recon = self._generator_micro_step(img, ids, warm, sigma, sync=last)
            if warm > 0:
                scalars.update(self._disc_micro_step(img, recon, sigma, sync=last))
            step_scalars.add(scalars)
        scalars = step_scalars.step_means()
        scalars["grad_norm"] = self.gen.step()
        # A skipped step left the weights as they were: the clamp is a no-op on them (they were clamped
        # after the step that wrote them) and the EMA is told to stay.
        self.model.clamp_logit_scale()
        if self.ema is not None:
            self.ema.update(self.model, skip=self.gen.nonfinite)
        nonfinite = self.gen.nonfinite
        if warm > 0:
            scalars["disc_grad_norm"] = self.disc.step()
            nonfinite = torch.maximum(nonfinite, self.disc.nonfinite)
            scalars["gan_warm"] = warm
            scalars["disc_lr"] = disc_lr
        scalars["lr"] = lr
        self.step += 1
        self.nonfinite_run = (self.nonfinite_run + 1) * nonfinite
        self.nonfinite_total = self.nonfinite_total + nonfinite
        self._last_grad_norm = scalars["grad_norm"]
        if not self._skips_on_device():
            # The engines read the norms on the host already: read the counters only after a bad step.
            engines = [self.gen, self.disc] if warm > 0 else [self.gen]
            if any(engine.host_nonfinite for engine in engines):
                self._check_nonfinite()
            else:
                self.nonfinite_in_a_row = 0
        return scalars

    def _skips_on_device(self) -> bool:
        return self.gen.sync_free and (self.disc is None or self.disc.sync_free)

    # ------------------------------------------------------------------------------------------
    # loop

    def run(self) -> TrainResult:
        """Train until ``total_steps`` (or ``stop_at_step``), checkpointing, logging and evaluating on the way."""
        config = self.config
        stop = min(self.total_steps, config.train.stop_at_step or self.total_steps)
        if self.info.is_main:
            log.info(
                "training %s for %d steps (global batch %d = %d x %d processes x %d accumulation), from step %d",
                config.model.preset,
                self.total_steps,
                self.global_batch,
                config.train.local_batch_size,
                self.world_size,
                config.train.grad_accum,
                self.step,
            )
        try:
            with self.monitor.redirect_logging():
                self._loop(stop)
            if self.checkpoint is None or self.checkpoint.name != checkpointing.step_dir_name(self.step):
                self.save_checkpoint()
        except BaseException:
            # A save in flight holds a good state from before the error: let it finish and commit.
            try:
                self.wait_for_checkpoint()
            except checkpointing.TrainingError as err:
                log.error("%s", err)
            raise
        self.wait_for_checkpoint()
        final_dir = self._export() if self.step >= self.total_steps else None
        if not self.last_metrics and self.info.is_main:
            self.last_metrics = self.monitor.last_record()
        self.monitor.close()
        return TrainResult(
            self.output_dir,
            self.step,
            self.total_steps,
            final_dir,
            self.checkpoint,
            self.last_metrics,
            self._skipped_total(),
        )

    def _loop(self, stop: int) -> None:
        config = self.config
        every_eval = config.eval.every_steps
        last_log_time, last_log_step = time.perf_counter(), self.step
        while self.step < stop:
            scalars = self.train_step()
            if self.dcp_saver is not None:
                self.dcp_saver.poll()
            self.running.add(scalars)
            self.monitor.advance()
            if self.step % config.logging.log_every == 0 or self.step == stop:
                if self._skips_on_device():
                    self._check_nonfinite()
                now = time.perf_counter()
                record = self.running.means(self.info)
                record.update(self._position_scalars())
                record["samples_per_s"] = (
                    (self.step - last_log_step) * self.global_batch / max(now - last_log_time, 1e-9)
                )
                last_log_time, last_log_step = now, self.step
                self.monitor.log(self.step, record)
                self.last_metrics = record
            if config.logging.image_every and self.step % config.logging.image_every == 0:
                self._save_images()
            if every_eval and (self.step % every_eval == 0 or self.step == self.total_steps):
                self.evaluate()
            if self.step % config.checkpoint.every_steps == 0 and self.step != stop:
                self.save_checkpoint()

    def _export(self) -> Path:
        final_dir = self.output_dir / FINAL_FOLDER
        if self.info.is_main:
            use_ema = self.ema is not None and self.config.checkpoint.export_ema
            weights = self.ema.state_dict() if use_ema else self.model.state_dict()
            export_weights(final_dir, self.model_config, weights)
            log.info("exported the final tokenizer%s to %s", " (EMA weights)" if use_ema else "", final_dir)
        distributed.barrier(self.info)
        return final_dir


def compile_blocks(model: UniTok) -> None:
    """``torch.compile`` each transformer block of the encoder and decoder in place (``Module.compile``: the
    module tree and state-dict keys stay). The blocks share one code path, so one graph (with the weights as
    inputs) serves all blocks of a tower; the conv parts, the quantizer and the losses stay eager."""
    for block in (*model.encoder.blocks, *model.decoder.blocks):
        block.compile()


@contextlib.contextmanager
def _frozen(module: torch.nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` of ``module``'s parameters for the graph built inside the block."""
    module.requires_grad_(False)
    try:
        yield
    finally:
        module.requires_grad_(True)


def _set_cpu_threads(config: RunConfig, info: DistInfo) -> None:
    if info.device.type != "cpu":
        return
    threads = config.train.cpu_threads
    if threads is None:
        if "OMP_NUM_THREADS" in os.environ:
            return
        threads = max(1, (os.cpu_count() or 1) // info.world_size - config.data.num_workers)
    torch.set_num_threads(threads)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(config: RunConfig) -> TrainResult:
    """Run (or continue) one training run described by ``config``; returns what it did.

    Call it in every process of a ``torchrun`` launch, or in a single process without a launcher.
    """
    info = distributed.setup(config.distributed, config.train.device)
    threads = torch.get_num_threads()
    lock = None
    try:
        if info.is_main:
            lock = checkpointing.RunLock(config.output_dir).acquire()
            remove_stale_exports(Path(config.output_dir) / FINAL_FOLDER)
        _set_cpu_threads(config, info)
        return Trainer(config, info).run()
    finally:
        if lock is not None:
            lock.release()
        torch.set_num_threads(threads)
        distributed.teardown(info)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line of ``unitok train-tokenizer``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a UniTok tokenizer from a run config (YAML/JSON file or preset name).",
        epilog=f"presets: {', '.join(preset_names())}. Several processes: torchrun --nproc_per_node N -m "
        "unitok.tokenizer.train --config ...",
    )
    parser.add_argument("--config", required=True, help="preset name or path of a YAML/JSON run config")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=1e-3 (repeatable; values parsed as YAML)",
    )
    parser.add_argument("--out", help="output folder (overrides output_dir)")
    parser.add_argument(
        "--resume", help="'auto' (newest checkpoint of the output folder, if any) or a checkpoint path"
    )
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even though the config changes the training (learning rate, batch, ...); the new values apply",
    )
    parser.add_argument(
        "--on-newer",
        choices=("refuse", "branch", "overwrite"),
        help="what to do with checkpoints newer than the start step in the output folder: refuse (default), "
        "branch (move them aside) or overwrite (delete them)",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved run config as YAML and exit"
    )
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``unitok train-tokenizer``; returns 0 on success."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"output_dir={json.dumps(args.out)}")
    if args.resume:
        overrides.append(f"checkpoint.resume={json.dumps(args.resume)}")
    if args.allow_config_change:
        overrides.append("checkpoint.allow_config_change=true")
    if args.on_newer:
        overrides.append(f"checkpoint.on_newer={args.on_newer}")
    try:
        config = load_run_config(args.config, overrides)
    except ValueError as err:
        parser.error(str(err))
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = train(config)
    if distributed.is_main_process():
        summary = {
            "step": result.step,
            "total_steps": result.total_steps,
            "final": str(result.final_dir or ""),
            "checkpoint": str(result.checkpoint or ""),
            "skipped": result.skipped,
        }
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
