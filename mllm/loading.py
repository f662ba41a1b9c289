"""Where the unified MLLM's parts come from and go to: checkpoint folders or Hub ids, the frozen UniTok, the
LLM (pretrained or random-init from an inline Llama config), and folder replacement on save."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase

from unitok.mllm.config import MLLMConfig


def _resolve(path: str, base_dir: Path | None) -> str:
    """A path relative to a checkpoint directory if it exists there, else the path / hub id unchanged."""
    if base_dir is not None and (base_dir / path).exists():
        return str(base_dir / path)
    return path


def _dtype_kwargs(dtype: str) -> dict[str, torch.dtype]:
    name = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return {name: getattr(torch, dtype)}


def resolve_checkpoint(
    path: str | Path, revision: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """A local checkpoint directory: ``path`` itself if it is one, else the Hub snapshot of the repo id ``path``.

    ``huggingface_hub.snapshot_download`` honours ``HF_HUB_OFFLINE`` (then only the local cache is used).
    """
    local = Path(path)
    if local.is_dir():
        return local
    text = str(path)
    parts = text.split("/")
    # A path whose first part is a local folder is a mistyped local path, not a Hub id.
    if (
        local.exists()
        or len(parts) != 2
        or not all(parts)
        or text.startswith((".", "~", "/"))
        or Path(parts[0]).is_dir()
    ):
        raise ValueError(f"{text} is neither a checkpoint directory nor a Hugging Face Hub id ('owner/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = snapshot_download(
            repo_id=text, revision=revision, cache_dir=None if cache_dir is None else str(cache_dir)
        )
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError) as err:
        raise ValueError(
            f"{text} is not a local checkpoint directory and could not be fetched from the Hugging Face Hub "
            f"({type(err).__name__}: {err})"
        ) from err
    return Path(folder)


def load_unitok(config: MLLMConfig, base_dir: Path | None = None) -> nn.Module:
    """The UniTok named by ``config`` (a checkpoint, or a random-init preset)."""
    from unitok.tokenizer import TokenizerConfig, UniTok

    if config.unitok_preset is not None:
        return UniTok(TokenizerConfig.preset(config.unitok_preset))
    return UniTok.from_pretrained(_resolve(config.unitok, base_dir))


def load_llm(
    config: MLLMConfig, tokenizer: PreTrainedTokenizerBase, base_dir: Path | None = None
) -> PreTrainedModel:
    """The causal LLM of ``config``: pretrained (path / hub id) or random-init from an inline LlamaConfig dict.

    An inline config takes its vocabulary size and bos/eos/pad ids from ``tokenizer``.
    """
    if isinstance(config.llm, dict):
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        llm_config = LlamaConfig(
            **{**config.llm, **ids, "pad_token_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer)}
        )
        return AutoModelForCausalLM.from_config(llm_config, **_dtype_kwargs(config.llm_dtype))
    path = _resolve(config.llm, base_dir)
    return AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=False, **_dtype_kwargs(config.llm_dtype)
    )


def base_llm_state_dict(peft_llm: nn.Module) -> dict[str, torch.Tensor]:
    """The base-model weights of a peft-wrapped LLM under their original names (adapter tensors dropped)."""
    out = {}
    for key, value in peft_llm.get_base_model().state_dict().items():
        if "lora_" in key or "trainable_tokens_" in key:
            continue
        out[key.replace(".token_adapter.base_layer.", ".").replace(".base_layer.", ".")] = value
    return out


def _resolve_llm(config: MLLMConfig, path: Path) -> str | dict[str, Any]:
    return config.llm if isinstance(config.llm, dict) else _resolve(config.llm, path)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing an existing ``dst`` only once ``src`` is complete."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
