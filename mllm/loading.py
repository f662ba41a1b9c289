"""Where the unified MLLM's parts come from and go to: checkpoint folders or Hub ids, the frozen UniTok, the
LLM (pretrained or random-init from an inline Llama config), and the checkpoint folder written on save (atomically)
or uploaded to the Hub."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase

from unitok.mllm.config import MLLMConfig
from unitok.mllm.text_tokenizer import load_text_tokenizer

# The checkpoint folder of a UniTokMLLM.
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LLM_DIR, ADAPTER_DIR, TEXT_TOKENIZER_DIR, UNITOK_DIR = "llm", "adapter", "text_tokenizer", "unitok"


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


def save_checkpoint(model: Any, path: str | Path) -> None:
    """Write ``model``'s (a ``UniTokMLLM``) checkpoint directory atomically (a temporary directory renamed into place).

    Layout: ``config.json``; ``model.safetensors`` (projector + depth head); ``text_tokenizer/``;
    ``llm/`` (the full LLM; with LoRA only a base that cannot be fetched again: an inline random-init one
    or one loaded from inside a checkpoint); ``adapter/`` (LoRA adapter, incl. the rows of the new
    tokens); ``unitok/`` (always: the checkpoint is self-contained). Relative paths in ``config.json``
    resolve against the checkpoint directory first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        config = model.config.to_dict()
        if model.config.use_lora:
            model.llm.save_pretrained(str(tmp / ADAPTER_DIR))
            if isinstance(model.config.llm, dict) or model.config.llm == LLM_DIR:
                # A random-init base, or one that lives inside the checkpoint it was loaded from.
                _save_base_llm(model.llm, tmp / LLM_DIR)
                config["llm"] = LLM_DIR
            else:
                config["llm"] = model.llm_source
        else:
            model.llm.save_pretrained(str(tmp / LLM_DIR))
            config["llm"] = LLM_DIR
        model.text_tokenizer.save_pretrained(str(tmp / TEXT_TOKENIZER_DIR))
        config["text_tokenizer"] = TEXT_TOKENIZER_DIR
        # The UniTok always travels inside the checkpoint: a checkpoint never depends on the current
        # directory or on a file next to it.
        model.unitok.save_pretrained(str(tmp / UNITOK_DIR))
        config.update(unitok=UNITOK_DIR, unitok_preset=None)
        tensors = {f"projector.{k}": v for k, v in model.projector.state_dict().items()}
        tensors.update({f"depth_head.{k}": v for k, v in model.depth_head.state_dict().items()})
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def push_checkpoint(
    model: Any,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload UniTok MLLM",
    release_layout: bool = False,
) -> str:
    """Save ``model``'s checkpoint (ours, or the released layout with ``release_layout``) and upload it to the Hub.

    Returns the URL of the commit. Uses ``huggingface_hub.HfApi`` (its login / ``HF_TOKEN`` unless ``token``).
    """
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoint"
        if release_layout:
            model.export_release(folder)
        else:
            save_checkpoint(model, folder)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return str(getattr(info, "commit_url", info))


def _save_base_llm(peft_llm: nn.Module, path: Path) -> None:
    """The base model under a LoRA ``peft_llm``, without the adapter, as a plain ``save_pretrained`` folder."""
    base_config = peft_llm.get_base_model().config
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(base_config)
    fresh.load_state_dict(base_llm_state_dict(peft_llm), strict=True, assign=True)
    fresh.save_pretrained(str(path))


def load_checkpoint(cls: type, path: Path, unitok: nn.Module | str | Path | None = None) -> Any:
    """A ``cls`` (``UniTokMLLM``) from a local checkpoint folder of :func:`save_checkpoint`'s layout, strictly.

    ``unitok`` (a UniTok, or the path of one) replaces the one inside the checkpoint.
    """
    if isinstance(unitok, (str, Path)):
        from unitok.tokenizer import UniTok

        unitok = UniTok.from_pretrained(unitok)
    if not (path / CONFIG_NAME).is_file():
        raise ValueError(
            f"{path} is not an MLLM checkpoint: no {CONFIG_NAME} (expected save_pretrained output)"
        )
    config = MLLMConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()))
    text_tokenizer = load_text_tokenizer(path / TEXT_TOKENIZER_DIR)
    unitok = load_unitok(config, path) if unitok is None else unitok
    if (path / ADAPTER_DIR).is_dir():
        from peft import PeftModel

        base = load_llm(config.replace(llm=_resolve_llm(config, path)), text_tokenizer)
        if base.get_input_embeddings().num_embeddings != len(text_tokenizer):
            base.resize_token_embeddings(len(text_tokenizer))
        llm = PeftModel.from_pretrained(base, str(path / ADAPTER_DIR), is_trainable=True)
    else:
        llm = AutoModelForCausalLM.from_pretrained(
            str(path / LLM_DIR), trust_remote_code=False, **_dtype_kwargs(config.llm_dtype)
        )
    model = cls(config, llm, text_tokenizer, unitok)
    state = load_file(str(path / WEIGHTS_NAME))
    for name, module in (("projector", model.projector), ("depth_head", model.depth_head)):
        prefix = f"{name}."
        module.load_state_dict(
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True
        )
    unexpected = [k for k in state if not k.startswith(("projector.", "depth_head."))]
    if unexpected:
        raise ValueError(f"unexpected tensors in {path / WEIGHTS_NAME}: {unexpected[:5]}")
    return model
