"""The released UniTok MLLM's Hugging Face folder: strict loading into :class:`UniTokMLLM` and export back.

The folder holds ``config.json`` (a ``LlamaConfig`` with ``model_type: "mini_gemini"``), the weights as sharded
safetensors (``model.safetensors.index.json``) or pickled shards (``pytorch_model*.bin``, read with
``weights_only=True``), and the Llama-2 tokenizer files. Key names map one to one:

| released key prefix          | here                | module                                         |
|------------------------------|---------------------|------------------------------------------------|
| ``model.multi_embedder.``    | ``projector.``      | :class:`~unitok.mllm.projector.CausalAttnMerger` |
| ``ar_head.``                 | ``depth_head.``     | :class:`~unitok.mllm.depth_head.LlamaDepthHead`  |
| anything else (``model.*``, ``lm_head.*``) | ``llm.`` + key | ``LlamaForCausalLM``                   |

The folder holds no UniTok (only the merger's own copy of its codebooks); images need one
(``from_pretrained(folder, unitok=...)``, default ``unitok_tokenizer.pth`` inside the folder).

Loading builds the model on the meta device and assigns the checkpoint's tensors in place (cast to
``llm_dtype`` one tensor at a time), so the 7B weights are never held twice.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from unitok.mllm.config import MLLMConfig

if TYPE_CHECKING:
    from unitok.mllm.model import UniTokMLLM

logger = logging.getLogger(__name__)

RELEASE_MODEL_TYPE = "mini_gemini"
RELEASE_ARCHITECTURE = "MiniGeminiLlamaForCausalLM"
PREFIXES = (("model.multi_embedder.", "projector."), ("ar_head.", "depth_head."))
SAFE_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
SAFE_SINGLE, BIN_SINGLE = "model.safetensors", "pytorch_model.bin"
# Fields of the released config.json that are not LlamaConfig fields and are written back on export.
_NOT_LLAMA = ("model_type", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype")


def is_release_folder(path: str | Path) -> bool:
    """Whether ``path`` is a released UniTok MLLM folder (``config.json`` with ``model_type: mini_gemini``)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == RELEASE_MODEL_TYPE
    except (json.JSONDecodeError, AttributeError):
        return False


def release_to_ours(key: str) -> str:
    """A released key name -> the :class:`UniTokMLLM` state-dict key."""
    for theirs, ours in PREFIXES:
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return "llm." + key


def ours_to_release(key: str) -> str | None:
    """A :class:`UniTokMLLM` state-dict key -> the released key (``None`` for the UniTok, which is not in it)."""
    for theirs, ours in PREFIXES:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    if key.startswith("llm."):
        return key[len("llm.") :]
    return None


def weight_files(path: Path) -> list[Path]:
    """The weight files of a Hugging Face folder, in index order (safetensors preferred)."""
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{index}: not a weight index (expected a 'weight_map' object): {err}"
                ) from err
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise ValueError(f"{index} names shard(s) that are not in {path}: {missing[:3]}")
            return [path / f for f in files]
    for single in (SAFE_SINGLE, BIN_SINGLE):
        if (path / single).is_file():
            return [path / single]
    shards = sorted(path.glob("pytorch_model-*.bin")) or sorted(path.glob("model-*.safetensors"))
    if shards:
        return shards
    raise ValueError(
        f"no weights in {path}: expected {SAFE_INDEX}, {BIN_INDEX}, {SAFE_SINGLE}, {BIN_SINGLE} or shards"
    )


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    """One weight file: safetensors, or a pickled state dict read with ``weights_only=True`` (memory-mapped)."""
    if file.suffix == ".safetensors":
        return load_file(str(file))
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # any unpickling failure means a bad file
        raise ValueError(f"{file}: not a weights-only state dict ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file}: expected a dict of tensors")
    return state


def llama_config_dict(release_config: dict[str, Any]) -> dict[str, Any]:
    """The ``LlamaConfig`` fields of a released ``config.json`` (other model fields dropped)."""
    from transformers import LlamaConfig

    # rope_theta / rope_scaling: the release's transformers spelling, still accepted by LlamaConfig.
    known = set(LlamaConfig().to_dict()) | {"rope_theta", "rope_scaling"}
    return {k: v for k, v in release_config.items() if k in known and k not in _NOT_LLAMA}


def _infer_sizes(keys: set[str], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Architecture numbers readable from the released weights."""
    layers = {int(m.group(1)) for k in keys if (m := re.match(r"ar_head\.layers\.(\d+)\.", k))}
    codebooks = {
        int(m.group(1))
        for k in keys
        if (m := re.match(r"model\.multi_embedder\.quantizer\.codebooks\.(\d+)\.", k))
    }
    if not layers or not codebooks:
        raise ValueError(
            "the weights lack the released depth head (ar_head.layers.*) or merger codebooks "
            "(model.multi_embedder.quantizer.codebooks.*): not a released UniTok MLLM"
        )
    proj = shapes.get("model.multi_embedder.attn_projection.attn.proj.weight")
    fc1 = shapes.get("model.multi_embedder.mm_projector.1.weight")
    codebook = shapes.get("model.multi_embedder.quantizer.codebooks.0.codebook.weight")
    if proj is None or fc1 is None or codebook is None:
        raise ValueError("the weights lack the released merger's attn_projection / mm_projector / codebooks")
    return {
        "depth_layers": max(layers) + 1,
        "num_codebooks": max(codebooks) + 1,
        "codebook_size": codebook[0],
        "code_dim": codebook[1],
        "projector_attn_width": proj[0],
        "projector_hidden": fc1[0],
    }


def _load_unitok(unitok: Any, path: Path) -> nn.Module:
    from unitok.tokenizer import UniTok

    if isinstance(unitok, nn.Module):
        return unitok
    if unitok is None:
        candidates = [path / "unitok", path / "unitok_tokenizer.pth"]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise ValueError(
                f"the released MLLM folder {path} holds no UniTok: pass unitok= (a UniTok, or the path of "
                "unitok_tokenizer.pth / a UniTok directory)"
            )
        unitok = found
    return UniTok.from_pretrained(unitok)


def load_release(
    cls: type[UniTokMLLM],
    path: str | Path,
    unitok: Any = None,
    text_tokenizer: Any = None,
    llm_dtype: str | None = None,
    projector_attn_heads: int = 16,
    **config_overrides: Any,
) -> UniTokMLLM:
    """Load a released UniTok MLLM folder strictly (every tensor used, every parameter filled, shapes equal).

    Args:
        cls: :class:`UniTokMLLM`.
        path: the folder.
        unitok: a UniTok or its path (see the module docstring).
        text_tokenizer: a tokenizer or its path (default: the folder's own tokenizer files).
        llm_dtype: dtype of the loaded model (default the ``unitok-mllm-7b`` preset's, bfloat16).
        projector_attn_heads: heads of the merger's attention (not readable from shapes; the release: 16).
        config_overrides: other :class:`MLLMConfig` fields (e.g. ``max_length``).

    Returns:
        the model in eval mode, with ``config`` = the ``unitok-mllm-7b`` preset adjusted to the folder's sizes.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    from unitok.mllm.loading import _dtype_kwargs
    from unitok.mllm.text_tokenizer import load_text_tokenizer

    path = Path(path)
    release_config = json.loads((path / "config.json").read_text())
    files = weight_files(path)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        for key, value in read_weights(file).items():
            if key in state:
                raise ValueError(f"tensor {key!r} appears in more than one shard of {path}")
            state[key] = value
    sizes = _infer_sizes(set(state), {k: tuple(v.shape) for k, v in state.items()})
    unitok = _load_unitok(unitok, path)
    tok_cfg = unitok.config
    want = (sizes["num_codebooks"], sizes["codebook_size"], sizes["num_codebooks"] * sizes["code_dim"])
    have = (tok_cfg.num_codebooks, tok_cfg.codebook_size, tok_cfg.vocab_width)
    if want != have:
        raise ValueError(
            f"the UniTok (K, V, D) = {have} does not match the released merger's codebooks {want}"
        )
    if text_tokenizer is None:
        try:
            text_tokenizer = load_text_tokenizer(path)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"no text tokenizer in {path} ({err}); pass text_tokenizer= (the Llama-2 tokenizer, e.g. "
                "'meta-llama/Llama-2-7b-hf')"
            ) from err
    elif isinstance(text_tokenizer, (str, os.PathLike)):
        text_tokenizer = load_text_tokenizer(text_tokenizer)
    llm_fields = llama_config_dict(release_config)
    overrides = {
        "llm": {
            k: v
            for k, v in llm_fields.items()
            if k not in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")
        },
        "unitok": "unitok",
        "text_tokenizer": str(path),
        "depth_layers": sizes["depth_layers"],
        "projector_attn_width": sizes["projector_attn_width"],
        "projector_attn_heads": projector_attn_heads,
        "projector_hidden": sizes["projector_hidden"],
        **({} if llm_dtype is None else {"llm_dtype": llm_dtype}),
        **config_overrides,
    }
    config = MLLMConfig.preset("unitok-mllm-7b", **overrides)
    llama = LlamaConfig(**llm_fields)
    if llama.vocab_size != len(text_tokenizer):
        raise ValueError(
            f"the released LLM has {llama.vocab_size} token rows but the text tokenizer has {len(text_tokenizer)}"
            " tokens (the released vocabulary is not extended)"
        )
    dtype = getattr(torch, config.llm_dtype)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(llama, **_dtype_kwargs(config.llm_dtype))
        model = cls(config, llm, text_tokenizer, unitok)
    ours = {release_to_ours(k): v for k, v in state.items()}
    state.clear()
    expected = {k for k in model.state_dict() if not k.startswith("unitok.")}
    missing = sorted(expected - set(ours))
    unexpected = sorted(set(ours) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the released architecture: missing {_short(missing, ours_to_release)}, "
            f"unexpected {_short(unexpected, ours_to_release)}"
        )
    reference = model.state_dict()
    for key in list(ours):
        if tuple(ours[key].shape) != tuple(reference[key].shape):
            raise ValueError(
                f"size mismatch for {ours_to_release(key)}: checkpoint {tuple(ours[key].shape)}, "
                f"model {tuple(reference[key].shape)}"
            )
        if ours[key].is_floating_point() and ours[key].dtype != dtype:
            ours[key] = ours[key].to(dtype)
    for prefix, module in (
        ("llm.", model.llm),
        ("projector.", model.projector),
        ("depth_head.", model.depth_head),
    ):
        part = {k[len(prefix) :]: ours.pop(k) for k in [k for k in ours if k.startswith(prefix)]}
        module.load_state_dict(part, strict=True, assign=True)
    _materialize_buffers(model)
    model.release_config = {k: v for k, v in release_config.items() if k not in llm_fields}
    logger.info("loaded the released UniTok MLLM from %s (%d weight file(s))", path, len(files))
    return model.eval()


def _short(keys: list[str], rename) -> str:
    names = [rename(k) or k for k in keys]
    return f"{names[:5]}{' ...' if len(names) > 5 else ''} ({len(names)})"


def _materialize_buffers(model: nn.Module) -> None:
    """Rebuild the non-persistent buffers left on the meta device (RoPE frequencies, quantizer offsets)."""
    from unitok.tokenizer.quantizer import MultiCodebookQuantizer

    for name, module in list(model.named_modules()):
        metas = [b for b in module._buffers.values() if b is not None and b.is_meta]
        if not metas:
            continue
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, type(module)(config=module.config))
        elif isinstance(module, MultiCodebookQuantizer):
            module._offsets = torch.arange(module.num_codebooks, dtype=torch.long) * module.codebook_size
        else:
            raise ValueError(
                f"cannot rebuild the buffers of {name} ({type(module).__name__}) after a meta load"
            )
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"tensors not loaded from the checkpoint: {left[:5]}")


def export_release(
    model: UniTokMLLM, path: str | Path, max_shard_size: int | str = "5GB", dtype: str | None = None
) -> None:
    """Write ``model`` in the released folder layout (atomically: a temporary folder renamed into place).

    Needs the released architecture (``projector="causal_attn"``, ``depth_head="llama"``, no LoRA adapter, no
    extended vocabulary). Writes ``config.json`` (``model_type: mini_gemini``), sharded safetensors with
    ``model.safetensors.index.json`` (``max_shard_size``), and the text tokenizer. ``dtype`` (e.g. ``"bfloat16"``,
    the release's) casts the floating tensors; default: as they are.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    from unitok.mllm.loading import _replace_dir

    cfg = model.config
    if cfg.projector != "causal_attn" or cfg.depth_head != "llama" or cfg.use_lora or cfg.extend_vocab:
        raise ValueError(
            "export_release needs the released architecture (projector='causal_attn', depth_head='llama', "
            f"extend_vocab=False, no LoRA), got projector={cfg.projector!r}, depth_head={cfg.depth_head!r}, "
            f"extend_vocab={cfg.extend_vocab}, lora_r={cfg.lora_r}"
        )
    cast = None if dtype is None else getattr(torch, dtype)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        name = ours_to_release(key)
        if name is None:
            continue
        value = value.detach()
        if cast is not None and value.is_floating_point():
            value = value.to(cast)
        tensors[name] = value.contiguous().cpu()
    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for filename, names in split.filename_to_tensors.items():
            save_file({n: tensors[n] for n in names}, str(tmp / filename), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}}
            index["weight_map"] = split.tensor_to_filename
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        llm_config = model.llm.config.to_dict()
        config = {k: v for k, v in llm_config.items() if k not in _NOT_LLAMA}
        config.update(getattr(model, "release_config", {}) or {})
        stored = dtype or str(next(iter(tensors.values())).dtype).removeprefix("torch.")
        config.update(model_type=RELEASE_MODEL_TYPE, architectures=[RELEASE_ARCHITECTURE], torch_dtype=stored)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        model.text_tokenizer.save_pretrained(str(tmp))
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
