"""Host-side costs around a CPU training step of the quick start's tokenizer (``unitok-tiny-synth``).

Printed by ``unitok bench train-step --sections host`` (see that module's docstring): the cost of seeding one
sample's private random stream, with ``torch.manual_seed`` against the CPU generator only, and one AdamW step over
every parameter with the per-tensor, ``foreach`` and fused kernels, each compared with the per-tensor update.
"""

from __future__ import annotations

import copy
import time

import torch

from unitok.tokenizer import UniTok


def _best_ms(fn, repeats: int, rounds: int = 3) -> float:
    """Best of ``rounds`` mean milliseconds per call over ``repeats`` calls (one warm-up call first)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats * 1e3)
    return best


def measure_host(seed_repeats: int = 500, step_repeats: int = 20) -> dict:
    """Per-sample seeding and AdamW step costs on the CPU for the quick start's tokenizer (see the docstring).

    ``seed_repeats`` / ``step_repeats``: calls per timing round (fewer for a quick check of the comparison).
    """
    from unitok.tokenizer.training.config import load_run_config
    from unitok.tokenizer.training.data import _seeded_call
    from unitok.tokenizer.training.optim import param_groups

    config = load_run_config("unitok-tiny-synth")
    model_config = config.model.tokenizer_config()

    def seed_global() -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            torch.rand(3)

    seeding = {
        "torch.manual_seed": _best_ms(seed_global, seed_repeats),
        "CPU generator only": _best_ms(lambda: _seeded_call(1234, torch.rand, 3), seed_repeats),
    }
    torch.manual_seed(0)
    base = UniTok(model_config)
    grads = [torch.randn_like(param) for param in base.parameters()]
    kernels = {
        "per-tensor (torch's CPU default)": {"foreach": False},
        "foreach": {"foreach": True},
        "fused": {"fused": True},
    }
    steps, models = {}, {}
    optim = config.optim
    for name, kwargs in kernels.items():
        model = copy.deepcopy(base)
        for param, grad in zip(model.parameters(), grads):
            param.grad = grad.clone()
        opt = torch.optim.AdamW(
            param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas, eps=optim.eps, **kwargs
        )
        steps[name] = _best_ms(opt.step, step_repeats)
        models[name] = model
    reference = dict(models["per-tensor (torch's CPU default)"].named_parameters())
    same = {
        name: max(float((p - reference[k]).detach().abs().max()) for k, p in model.named_parameters())
        for name, model in models.items()
    }
    return {
        "tensors": sum(1 for _ in base.parameters()),
        "parameters": sum(p.numel() for p in base.parameters()),
        "seeding_us": {k: v * 1e3 for k, v in seeding.items()},
        "adamw_ms": steps,
        "max_diff": same,
    }
