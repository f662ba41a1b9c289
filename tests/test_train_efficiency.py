"""Training-step efficiency changes of the tokenizer trainer, each checked against the path it replaces:
the adaptive GAN weight with one backward pass through LPIPS and the discriminator, and the non-finite
step skipped on the device by the fused AdamW (no host read per step).

Models are unitok-tiny at 32 px with a random LPIPS trunk and the tiny discriminator, on the CPU.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tokenizer_runs import make_world, run_overrides
from torch.utils._python_dispatch import TorchDispatchMode

from unitok.tokenizer import TokenizerConfig, UniTok
from unitok.tokenizer.losses import (
    LPIPS,
    DinoDiscConfig,
    DinoDiscriminator,
    ReconstructionLoss,
    adaptive_gan_grads,
    adaptive_gan_weight,
    generator_loss,
)
from unitok.tokenizer.training.distributed import DistInfo, TorchEngine
from unitok.tokenizer.training.ema import ModelEma
from unitok.tokenizer.training.optim import build_adamw, build_scheduler


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), owns_group=False)


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory) -> Path:
    """One random trunk saved as a combined file: loading it builds the trunk on the meta device (fast)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lpips") / "lpips.pth"
    torch.save(LPIPS(pretrained=False, min_size=16).state_dict(), path)
    return path


def _gan_parts(lpips_file: Path, checkpoint_parts: str = "none"):
    torch.manual_seed(0)
    model = UniTok(TokenizerConfig.preset("unitok-tiny", image_size=32, checkpoint_parts=checkpoint_parts))
    lpips = LPIPS(weights_path=lpips_file, min_size=16)
    disc = DinoDiscriminator(DinoDiscConfig.preset("tiny")).requires_grad_(False)
    recon_loss = ReconstructionLoss(0.2, 1.0, 1.0, lpips=lpips)
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    return model.train(), disc, recon_loss, img


def _generator_grads(model, disc, recon_loss, img, one_pass: bool, gan_scale: float = 0.3):
    """(adaptive weight, total loss, gradient of every parameter) of the generator loss with the GAN term."""
    model = copy.deepcopy(model)
    torch.manual_seed(1)
    out = model(img)
    recon = out.recon.detach().requires_grad_() if one_pass else out.recon
    rec = recon_loss(recon, img)
    g_loss = generator_loss(disc, recon, blur_sigma=0.5)
    model_terms = out.vq_loss + out.entropy_loss
    if one_pass:
        grads = adaptive_gan_grads(rec.total, g_loss, recon, out.recon, model.decoder_last_layer())
        weight = grads.weight
        (model_terms + (out.recon * (grads.nll_grad + gan_scale * weight * grads.g_grad)).sum()).backward()
    else:
        weight = adaptive_gan_weight(rec.total, g_loss, model.decoder_last_layer())
        (rec.total + model_terms + gan_scale * weight * g_loss).backward()
    total = rec.total.detach() + model_terms.detach() + gan_scale * weight * g_loss.detach()
    return weight, total, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpoint_parts", ["none", "all"])
def test_one_pass_adaptive_weight_gives_the_two_pass_weight_and_gradients(lpips_file, checkpoint_parts):
    parts = _gan_parts(lpips_file, checkpoint_parts)
    weight, total, grads = _generator_grads(*parts, one_pass=True)
    ref_weight, ref_total, ref_grads = _generator_grads(*parts, one_pass=False)
    assert 0.015 < float(ref_weight) < 1e4  # not clamped: the ratio itself is compared
    torch.testing.assert_close(weight, ref_weight, rtol=1e-5, atol=0)
    torch.testing.assert_close(total, ref_total, rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys() and "decoder.up_conv4.conv2.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_one_pass_adaptive_weight_runs_each_loss_backward_once(lpips_file):
    model, disc, recon_loss, img = _gan_parts(lpips_file)
    calls = {"lpips": 0, "disc": 0}
    for key, module in (("lpips", recon_loss.lpips.net), ("disc", disc)):
        module.register_full_backward_hook(lambda *_, _key=key: calls.__setitem__(_key, calls[_key] + 1))
    _generator_grads(model, disc, recon_loss, img, one_pass=False)
    assert calls == {"lpips": 2, "disc": 2}
    calls.update(lpips=0, disc=0)
    _generator_grads(model, disc, recon_loss, img, one_pass=True)
    assert calls == {"lpips": 1, "disc": 1}


def test_one_pass_adaptive_weight_rejects_losses_not_taken_on_the_leaf(lpips_file):
    model, disc, recon_loss, img = _gan_parts(lpips_file)
    out = model(img)
    leaf = out.recon.detach().requires_grad_()
    g_loss = generator_loss(disc, leaf)
    with pytest.raises(ValueError, match="nll_loss does not depend on output_leaf"):
        adaptive_gan_grads(
            recon_loss(out.recon, img).total, g_loss, leaf, out.recon, model.decoder_last_layer()
        )
    with pytest.raises(ValueError, match="detach"):
        adaptive_gan_grads(g_loss, g_loss, out.recon, out.recon, model.decoder_last_layer())


# ----------------------------------------------------------------------------------------------------------
# non-finite steps skipped on the device


class _ScalarReads(TorchDispatchMode):
    """Counts ``_local_scalar_dense`` (``.item()``, ``bool(t)``, ``.tolist()`` of a scalar): host reads."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_local_scalar_dense":
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _engine(fused: bool, seed: int = 0) -> tuple[torch.nn.Module, TorchEngine]:
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    optimizer = build_adamw(module, 1e-2, (0.9, 0.95), 0.1, 1e-6, fused=fused)
    scheduler = build_scheduler(optimizer, lambda step: 1.0)
    return module, TorchEngine(module, optimizer, scheduler, CPU, grad_clip=1.0)


def _step(module, engine, poison: bool) -> tuple[torch.Tensor, int]:
    loss = module(torch.linspace(-1, 1, 12).view(3, 4)).square().sum()
    if poison:
        loss = loss * float("nan")
    engine.backward(loss)
    with _ScalarReads() as reads:
        norm = engine.step()
    return norm, reads.reads


@pytest.mark.parametrize("fused", [False, True])
def test_a_non_finite_step_changes_no_weight_and_no_optimiser_state(fused):
    module, engine = _engine(fused)
    assert engine.sync_free is fused
    _step(module, engine, poison=False)
    weights = copy.deepcopy(module.state_dict())
    state = copy.deepcopy(engine.optimizer.state_dict()["state"])
    norm, _ = _step(module, engine, poison=True)
    assert not torch.isfinite(norm) and float(engine.nonfinite) == 1.0
    for name, value in module.state_dict().items():
        assert torch.equal(value, weights[name]), name
    for index, entry in engine.optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, state[index][key]), (index, key)
    assert engine.scheduler.last_epoch == 2  # the schedule moves on, as before
    _step(module, engine, poison=False)
    assert float(engine.nonfinite) == 0.0
    assert int(engine.optimizer.state_dict()["state"][0]["step"]) == 2


def test_the_fused_engine_decides_without_a_host_read_and_follows_the_default_kernel():
    fused_module, fused = _engine(fused=True)
    plain_module, plain = _engine(fused=False)
    for poison in (False, True, False, False):
        _, fused_reads = _step(fused_module, fused, poison)
        _, plain_reads = _step(plain_module, plain, poison)
        assert fused_reads == 0 and plain_reads >= 1
    for name, value in fused_module.state_dict().items():
        torch.testing.assert_close(value, plain_module.state_dict()[name], rtol=1e-5, atol=1e-7)


def test_ema_stays_where_a_step_was_skipped():
    module, _ = _engine(fused=False)
    ema = ModelEma(module, 0.9)
    before = copy.deepcopy(ema.state_dict())
    with torch.no_grad():
        for param in module.parameters():
            param.add_(1.0)
    ema.update(module, skip=torch.ones(()))
    assert all(torch.equal(value, before[name]) for name, value in ema.state_dict().items())
    reference = ModelEma(module, 0.9)
    reference.load_state_dict(before)
    reference.update(module)
    ema.update(module, skip=torch.zeros(()))
    assert all(torch.equal(value, reference.state_dict()[name]) for name, value in ema.state_dict().items())


def _run_overrides(out: Path, world: Path, *extra: str) -> list[str]:
    return run_overrides(out, world, "checkpoint.resume=null", *extra, batch=4)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory, num_images=16)


def test_a_diverging_run_with_device_side_skips_stops_at_a_logging_step(world, tmp_path, caplog):
    from unitok.tokenizer.train import train
    from unitok.tokenizer.training import checkpointing
    from unitok.tokenizer.training.config import load_run_config

    out = tmp_path / "run"
    config = load_run_config(
        "unitok-tiny-synth",
        _run_overrides(
            out,
            world,
            "train.fused_adamw=true",
            "optim.lr=1e8",
            "optim.warmup=0",
            "train.max_nonfinite_steps=2",
            "train.total_steps=8",
            "logging.log_every=4",
            "checkpoint.every_steps=100",
        ),
    )
    with pytest.raises(
        checkpointing.TrainingError, match=r"not finite for [2-4] step\(s\) in a row up to step 4"
    ):
        train(config)
    assert "update was skipped" in caplog.text
    assert not (out / "final").exists() and not checkpointing.list_checkpoints(out / "checkpoints")


# ----------------------------------------------------------------------------------------------------------
# train.compile


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_loss_and_gradients_in_one_graph_without_breaks():
    from unitok.tokenizer.train import compile_blocks

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    eager = UniTok(TokenizerConfig.preset("unitok-tiny", image_size=32)).train()
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    losses = []
    for model in (eager, compiled):
        torch.manual_seed(1)
        out = model(img)
        loss = out.recon.square().mean() + out.vq_loss + out.image_features.square().mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    for (name, param), compiled_param in zip(eager.named_parameters(), compiled.parameters()):
        if param.grad is not None:
            torch.testing.assert_close(compiled_param.grad, param.grad, rtol=1e-4, atol=1e-6, msg=name)
    stats = torch._dynamo.utils.counters
    assert not stats["graph_break"] and stats["stats"]["unique_graphs"] == 1
    assert stats["stats"]["calls_captured"] > 0


def test_the_trainer_compiles_the_transformer_blocks_only_when_asked(world, tmp_path):
    from unitok.tokenizer.train import Trainer
    from unitok.tokenizer.training.config import load_run_config

    for flag in (False, True):
        config = load_run_config(
            "unitok-tiny-synth",
            _run_overrides(
                tmp_path / str(flag), world, "train.total_steps=2", f"train.compile={str(flag).lower()}"
            ),
        )
        trainer = Trainer(config, CPU)
        trainer.monitor.close()
        model = trainer.model
        blocks = [*model.encoder.blocks, *model.decoder.blocks]
        assert all((block._compiled_call_impl is not None) is flag for block in blocks)
        assert model.quantizer._compiled_call_impl is None


# ----------------------------------------------------------------------------------------------------------
# LPIPS precision and memory format


def _lpips_pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    img = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
    rec = (img + 0.3 * torch.randn(img.shape, generator=generator)).clamp(-1, 1)
    return rec.requires_grad_(), img


def test_lpips_channels_last_gives_the_same_distance_and_gradient(lpips_file):
    plain = LPIPS(weights_path=lpips_file, min_size=16)
    nhwc = LPIPS(weights_path=lpips_file, min_size=16, channels_last=True)
    assert nhwc.net.slice1[0].weight.is_contiguous(memory_format=torch.channels_last)
    results = []
    for metric in (plain, nhwc):
        rec, img = _lpips_pair()
        distance = metric(rec, img)
        distance.backward()
        results.append((distance.detach(), rec.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-4 * results[0][1].abs().max())


def test_lpips_bf16_trunk_is_close_to_float32_with_finite_gradients_and_float32_output(lpips_file):
    full = LPIPS(weights_path=lpips_file, min_size=16)
    half = LPIPS(weights_path=lpips_file, min_size=16, precision="bf16")
    rec, img = _lpips_pair()
    reference = full(rec, img)
    for autocast in (False, True):
        rec, img = _lpips_pair()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            distance = half(rec, img)
        distance.backward()
        assert distance.dtype == torch.float32 and torch.isfinite(rec.grad).all()
        torch.testing.assert_close(distance.detach(), reference.detach(), rtol=3e-2, atol=0)
        assert not torch.equal(distance.detach(), reference.detach())  # the trunk did run in bf16
    # the float32 trunk ignores the caller's autocast, as before
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(full(*_lpips_pair()), reference, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="precision"):
        LPIPS(weights_path=lpips_file, precision="fp16")


# ----------------------------------------------------------------------------------------------------------
# rFID statistics on the features' device


def test_feature_statistics_stay_on_the_device_of_the_features():
    from unitok.eval.fid import FeatureStats

    stats = FeatureStats()
    stats.update(torch.empty(5, 8, device="meta"))  # shapes only: where the sums live is what is checked
    stats.update(torch.empty(3, 8, device="meta", dtype=torch.bfloat16))
    assert stats._mean.device.type == "meta" and stats._m2.device.type == "meta"
    assert stats._m2.dtype == torch.float64 and stats.count == 8


def test_a_config_saved_before_the_new_options_existed_resumes_without_changes():
    from unitok.tokenizer.training.config import config_changes, load_run_config

    # The release preset leaves all three options at their defaults (the quick start's sets fused_adamw).
    new = load_run_config("unitok-large-datacomp").to_dict()
    saved = copy.deepcopy(new)
    for section, key in (("train", "fused_adamw"), ("train", "compile"), ("loss", "lpips_precision")):
        del saved[section][key]
    assert config_changes(saved, new) == ([], [])
    new["train"]["fused_adamw"], new["train"]["compile"] = True, True
    relevant, free = config_changes(saved, new)
    assert relevant == ["train.fused_adamw: None -> True"] and free == ["train.compile: False -> True"]


# ----------------------------------------------------------------------------------------------------------
# data: JPEG draft decoding, shared-memory warning


def _jpeg_bytes(size: tuple[int, int]) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_jpeg_draft_decodes_at_a_reduced_scale_that_keeps_the_requested_size():
    from unitok.data.datasets import _open_image

    data = _jpeg_bytes((640, 400))
    assert _open_image(data).size == (640, 400)
    assert _open_image(data, jpeg_draft=96).size == (160, 100)  # 1/4: both sides still >= 96
    assert _open_image(data, jpeg_draft=200).size == (320, 200)  # 1/2
    assert _open_image(data, jpeg_draft=401).size == (640, 400)  # no smaller scale is large enough


def test_jpeg_draft_reaches_the_training_reader(world, tmp_path, monkeypatch):
    import unitok.data.datasets as datasets
    from unitok.tokenizer.training.config import load_run_config
    from unitok.tokenizer.training.data import DataPosition, build_stream

    drafts = []
    original = datasets._open_image
    monkeypatch.setattr(
        datasets, "_open_image", lambda source, draft=None: drafts.append(draft) or original(source, draft)
    )
    for flag in (False, True):
        config = load_run_config(
            "unitok-tiny-synth",
            _run_overrides(tmp_path, world, "train.total_steps=2", f"data.jpeg_draft={str(flag).lower()}"),
        )
        stream = build_stream(
            config.data,
            image_size=32,
            context_length=8,
            local_batch_size=4,
            grad_accum=1,
            seed=0,
            info=CPU,
            position=DataPosition(0, 0),
            resumed=False,
        )
        images, _ = stream.next()
        assert images.shape == (4, 3, 32, 32)
    assert set(drafts[:4]) == {None} and set(drafts[-4:]) == {64}


def test_small_shared_memory_is_warned_about(tmp_path, monkeypatch, caplog):
    import shutil

    from unitok.tokenizer.training.data import check_shared_memory

    needed = 8 * 4 * 64 * 3 * 256 * 256
    assert check_shared_memory(0, 64, 256, shm=str(tmp_path)) is None
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**30, 0, 2**26))
    assert check_shared_memory(8, 64, 256, shm=str(tmp_path)) == needed
    assert "64 MiB free" in caplog.text and "data.num_workers" in caplog.text
    caplog.clear()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**40, 0, 2 * needed))
    check_shared_memory(8, 64, 256, shm=str(tmp_path))
    assert not caplog.text


# ----------------------------------------------------------------------------------------------------------
# the trainer with both changes


def test_the_trainers_generator_step_equals_the_two_pass_objective(world, tmp_path):
    from unitok.tokenizer.train import Trainer, _frozen
    from unitok.tokenizer.training.config import load_run_config

    gan = (
        "disc.enabled=true",
        "disc.preset=tiny",
        "disc.start=0.0",
        "disc.warmup=0.5",
        "disc.dino_weights=null",
    )
    lpips = ("loss.lpips=1.0", "loss.lpips_weights=random", "loss.lpips_min_size=16")
    config = load_run_config(
        "unitok-tiny-synth",
        _run_overrides(tmp_path, world, "train.total_steps=4", "train.precision=fp32", *gan, *lpips),
    )
    trainer = Trainer(config, CPU)
    trainer.monitor.close()
    trainer.step = 1
    warm, sigma = trainer._gan_state()
    assert 0 < warm < 1
    img, ids = trainer.stream.next()
    model, state = trainer.model, copy.deepcopy(trainer.model.state_dict())
    torch.manual_seed(3)
    scalars, _ = trainer._generator_micro_step(img, ids, warm, sigma, sync=True)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)

    # The objective as the trainer computed it before: the weight from two autograd.grad calls, then
    # backward of the total through LPIPS and the discriminator again.
    torch.manual_seed(3)
    loss = config.loss
    out = model(img, ids)
    rec = trainer.recon_loss(out.recon, img)
    total = rec.total + loss.vq * out.vq_loss + out.entropy_loss
    total = total + loss.clip * trainer.clip_loss(out.image_features, out.text_features, out.logit_scale)
    with _frozen(trainer.disc_module):
        g_loss = generator_loss(trainer.disc_module, out.recon, sigma, config.disc.aug_prob)
    weight = adaptive_gan_weight(rec.total, g_loss, model.decoder_last_layer(), *config.disc.adaptive_clamp)
    total = total + warm * config.disc.weight * weight * g_loss
    total.backward()

    torch.testing.assert_close(scalars["gan_weight"], weight, rtol=1e-5, atol=0)
    torch.testing.assert_close(scalars["loss"], total.detach(), rtol=1e-6, atol=0)
    assert grads.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_a_run_with_device_side_skips_resumes_identically(world, tmp_path):
    from unitok.tokenizer.train import train
    from unitok.tokenizer.training import checkpointing
    from unitok.tokenizer.training.config import load_run_config

    def run(out: Path, *extra: str):
        common = (
            "train.fused_adamw=true",
            "train.total_steps=3",
            "train.ema_decay=0.9",
            "checkpoint.every_steps=1",
        )
        return train(load_run_config("unitok-tiny-synth", _run_overrides(out, world, *common, *extra)))

    full = run(tmp_path / "full")
    run(tmp_path / "resumed", "train.stop_at_step=1")
    resumed = run(tmp_path / "resumed", "checkpoint.resume=auto")
    a, b = (checkpointing.load_trainer_state(r.checkpoint) for r in (full, resumed))
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][key], b[part][key]) for key in a[part]), part
    states_a, states_b = (s["gen_engine"]["optimizer"]["state"] for s in (a, b))
    assert all(torch.equal(states_a[i][k], states_b[i][k]) for i in states_a for k in states_a[i])
    assert int(states_b[0]["step"]) == 3


def test_a_channels_last_model_trains_with_nhwc_weights_and_the_same_step(world, tmp_path):
    from unitok.tokenizer.train import Trainer
    from unitok.tokenizer.training.config import load_run_config

    results = []
    for flag in (False, True):
        extra = (
            "train.total_steps=2",
            "train.precision=fp32",
            f"model.overrides.channels_last={str(flag).lower()}",
        )
        trainer = Trainer(
            load_run_config("unitok-tiny-synth", _run_overrides(tmp_path / str(flag), world, *extra)), CPU
        )
        trainer.monitor.close()
        stem = trainer.model.encoder.patch_embed.backbone.stem.conv1.weight
        assert stem.is_contiguous(memory_format=torch.channels_last) is flag
        torch.manual_seed(0)
        scalars = trainer.train_step()
        results.append((scalars["loss"], scalars["grad_norm"]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=0)  # the whole gradient's norm


def test_cpu_adamw_is_the_foreach_update_and_equals_the_per_tensor_one():
    from unitok.scripts.bench_host_costs import measure_host
    from unitok.tokenizer.training.optim import build_adamw

    module = torch.nn.Linear(4, 3)
    assert build_adamw(module, 1e-3, (0.9, 0.95), 0.02, 1e-6).defaults["foreach"] is True
    host = measure_host(seed_repeats=2, step_repeats=2)
    assert host["max_diff"]["foreach"] == 0.0 and host["max_diff"]["fused"] < 1e-5
    assert set(host["seeding_us"]) == {"torch.manual_seed", "CPU generator only"}


def test_a_seeded_sample_draws_the_same_numbers_and_leaves_the_global_stream_alone():
    from unitok.tokenizer.training.data import _seeded_call

    before = torch.random.get_rng_state()
    first = _seeded_call(7, torch.rand, 3)
    assert torch.equal(first, _seeded_call(7, torch.rand, 3))
    torch.manual_seed(7)
    assert torch.equal(first, torch.rand(3))
    torch.random.set_rng_state(before)
    _seeded_call(8, torch.rand, 3)
    assert torch.equal(torch.random.get_rng_state(), before)
