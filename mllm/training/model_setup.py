"""Preparing a :class:`~unitok.mllm.UniTokMLLM` for a training engine, and exporting it back.

- :class:`CodebookLookup` replaces the frozen UniTok inside the model while it trains: training reads
  codes, so only the codebook is needed, and a copy held outside the module tree never enters the
  DeepSpeed engine (it is neither partitioned by ZeRO-3 nor cast to bf16).
- :func:`apply_stage` sets what trains: ``alignment`` (projector, depth head and the rows of the new
  special tokens; the LLM frozen), ``full`` (everything but UniTok), ``lora`` (the adapter, projector, depth
  head and new token rows, through peft).
- :func:`export` writes a ``save_pretrained`` checkpoint from a full state dict (what a ZeRO-3 engine
  gathers onto rank 0), on a skeleton built on the meta device, so no second copy of the weights is made.
- :func:`distinct_tensors` drops the second names of tied weights (an LLM whose output layer is its input
  embedding), which a safetensors file cannot hold twice.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unitok.mllm.model import UniTokMLLM

logger = logging.getLogger(__name__)


class _Lookup:
    """Codes -> vectors with a quantizer held outside any module tree (moved to the codes' device on use)."""

    def __init__(self, quantizer: nn.Module) -> None:
        self.quantizer = quantizer

    def codes_to_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., K]`` -> float32 vectors ``[..., D]``."""
        if self.quantizer.codebook.device != codes.device:
            self.quantizer = self.quantizer.to(codes.device)
        return self.quantizer.codes_to_vectors(codes)


class CodebookLookup(nn.Module):
    """Stands in for the frozen UniTok of a training model: ``config`` and ``quantizer.codes_to_vectors`` only.

    It has no parameters or buffers, so the engine neither partitions, casts nor saves it; the codebook stays
    float32 on the device of the codes it looks up.
    """

    def __init__(self, unitok: nn.Module) -> None:
        super().__init__()
        self.config = unitok.config
        self._lookup = _Lookup(copy.deepcopy(unitok.quantizer).float().requires_grad_(False).eval())

    @property
    def quantizer(self) -> _Lookup:
        """The codes -> vectors lookup (same call as ``UniTok.quantizer.codes_to_vectors``)."""
        return self._lookup


def detach_unitok(model: UniTokMLLM) -> nn.Module:
    """Swap the model's UniTok for a :class:`CodebookLookup`; returns the UniTok (kept for export)."""
    unitok = model.unitok
    model.unitok = CodebookLookup(unitok)
    return unitok


def new_token_rows(model: UniTokMLLM) -> list[int]:
    """Token ids added for the MLLM (``<boi>``, ``<eoi>``, ``<image>``)."""
    ids = model.builder.ids
    return sorted({ids.boi, ids.eoi, ids.image})


def _row_mask_hook(rows: list[int], num_rows: int) -> Any:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(num_rows, 1, dtype=grad.dtype, device=grad.device)
        mask[rows] = 1
        return grad * mask

    return hook


def apply_stage(model: UniTokMLLM, stage: str) -> list[str]:
    """Set ``requires_grad`` for a training stage; returns the names of parameters whose gradients are masked
    to some rows (they must get no weight decay, so that the other rows stay exactly as they are).

    ``alignment``: LLM frozen but for the rows of the new tokens in the input embedding and output head;
    ``full``: LLM, projector and depth head; ``lora``: needs ``config.lora_r > 0`` (peft decides what trains
    inside the LLM: adapter weights and the new token rows).
    """
    if stage == "lora" and not model.config.use_lora:
        raise ValueError("stage 'lora' needs model.config.lora_r > 0 (e.g. --set model.config.lora_r=128)")
    if stage != "lora" and model.config.use_lora:
        raise ValueError(
            f"stage {stage!r} trains without LoRA; set model.config.lora_r=0 or use stage 'lora'"
        )
    for module in (model.projector, model.depth_head):
        module.requires_grad_(True)
    if stage == "full":
        model.llm.requires_grad_(True)
        return []
    if stage == "lora":
        return []
    if stage != "alignment":
        raise ValueError(f"stage must be one of alignment, full, lora; got {stage!r}")
    model.llm.requires_grad_(False)
    rows = new_token_rows(model)
    masked = []
    names = {id(p): n for n, p in model.named_parameters()}
    tables = {model.llm.get_input_embeddings().weight, model.llm.get_output_embeddings().weight}
    for weight in tables:
        weight.requires_grad_(True)
        weight.register_hook(_row_mask_hook(rows, weight.shape[0]))
        masked.append(names[id(weight)])
    return sorted(masked)


def _skeleton(model: UniTokMLLM) -> UniTokMLLM:
    """An empty (meta-device) copy of the training ``model``'s architecture (its UniTok a ``CodebookLookup``)."""
    llm = model.llm.get_base_model() if hasattr(model.llm, "peft_config") else model.llm
    with torch.device("meta"):
        # The class itself, not from_config: under ZeRO-3 from_config would partition the skeleton (a collective
        # call, made here by rank 0 alone).
        base = type(llm)(copy.deepcopy(llm.config))
        return UniTokMLLM(model.config, base, model.text_tokenizer, model.unitok)


def distinct_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` without the entries that view the same memory as an earlier entry (tied weights keep the
    first name, e.g. ``llm.model.embed_tokens.weight`` of an LLM with ``tie_word_embeddings``).

    Loading the result with ``strict=False`` into a model with the same ties restores every weight: the missing
    names are exactly the dropped ones.
    """
    seen: set[tuple] = set()
    out = {}
    for name, tensor in state_dict.items():
        if tensor.numel() > 0 and tensor.device.type != "meta":
            storage = tensor.untyped_storage().data_ptr()
            where = (storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
            if where in seen:
                continue
            seen.add(where)
        out[name] = tensor
    return out


def export(
    model: UniTokMLLM, unitok: nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path
) -> None:
    """Write ``save_pretrained(path)`` of ``model`` with the weights of ``state_dict`` and the real ``unitok``.

    ``state_dict`` is the training model's full state (keys as ``model.state_dict()``, loaded strictly).
    """
    skeleton = _skeleton(model)
    skeleton.load_state_dict(state_dict, strict=True, assign=True)
    skeleton.unitok = unitok
    skeleton.save_pretrained(path)
    logger.info("exported the MLLM to %s", path)
