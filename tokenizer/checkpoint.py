"""Checkpoint formats of UniTok: our directory format and the released ``unitok_tokenizer.pth``.

* Ours: a directory with ``config.json`` (``TokenizerConfig.to_dict``) and ``model.safetensors``.
* Released: a pickled dict ``{"args": {...reference Args...}, "trainer": {"unitok": state_dict, ...}}``.
  Our module names equal the release's, so weights load strictly without renaming; only wrapper
  prefixes (DDP ``module.``, ``torch.compile`` ``_orig_mod.``) are stripped by ``strip_wrapper_prefixes``.
* open_clip ViTamin CLIP weights can initialise the encoder and text tower (``clip_to_unitok_state_dict``).

Codes: the release stores codes codebook-major ``[B,K,L]``; this package uses ``[B,h,w,K]``
(``codes_from_release`` / ``codes_to_release`` convert).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from safetensors.torch import load_file, save_file

from .config import PRESETS, TokenizerConfig

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Config fields the weights do not pin down: a config.json without them would load "successfully" with the
# defaults (a 256 px model that was trained at 64 px), so they must be written out.
REQUIRED_CONFIG_KEYS = ("image_size", "quantizer")

# Reference ``--model`` names and the presets with their sizes (the reference decoder supports only these).
RELEASE_MODELS = {"vitamin_large": "unitok-large", "vitamin_base": "unitok-base"}
_ARCH_FIELDS = (
    "stem_width",
    "stage_widths",
    "stage_depths",
    "width",
    "depth",
    "num_heads",
    "mlp_ratio",
    "decoder_depth",
    "upsampler_widths",
    "upsampler_depths",
)
# Reference Args name -> TokenizerConfig field, for the fields that are copied as they are.
_RELEASE_ARGS = {
    "img_size": "image_size",
    "drop_path": "drop_path",
    "vocab_size": "vocab_size",
    "vocab_width": "vocab_width",
    "num_codebooks": "num_codebooks",
    "vq_beta": "beta",
    "le": "entropy_weight",
    "e_temp": "entropy_temperature",
    "quant_proj": "quant_proj",
    "embed_dim": "embed_dim",
    "text_width": "text_width",
    "text_heads": "text_heads",
    "text_layers": "text_layers",
    "text_vocab_size": "text_vocab_size",
    "text_context_length": "text_context_length",
    "grad_ckpt": "grad_checkpointing",
}
# Where we keep our full config inside a release-style ``args`` dict (the reference ignores unknown args).
CONFIG_ARG = "unitok_config"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# --------------------------------------------------------------------------------------------------
# Our directory format


def save_directory(
    directory: str | os.PathLike, config: TokenizerConfig, state_dict: Mapping[str, torch.Tensor]
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory``; each file appears atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in state_dict.items()}
    # Weights first: a config.json next to a half-written weights file would look like a valid checkpoint.
    _atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    payload = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
    _atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(payload))
    return directory


def load_directory(directory: str | os.PathLike) -> tuple[TokenizerConfig, dict[str, torch.Tensor]]:
    """Read a directory written by ``save_directory`` -> (config, state_dict on CPU).

    Raises:
        FileNotFoundError: when ``config.json`` or ``model.safetensors`` is missing.
        ValueError: naming the file, when ``config.json`` is not valid JSON, lacks a field of
            ``REQUIRED_CONFIG_KEYS`` or holds an invalid config, or when the weights file is unreadable.
    """
    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a UniTok checkpoint directory: {name} is missing")
    config = read_config_file(directory / CONFIG_NAME)
    return config, read_safetensors(directory / WEIGHTS_NAME)


def read_config_file(path: str | os.PathLike) -> TokenizerConfig:
    """A ``config.json`` written by ``save_directory`` -> ``TokenizerConfig``; every error names the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(
            f"{path} must hold a JSON object of TokenizerConfig fields, got {type(data).__name__}"
        )
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in data]
    if missing:
        raise ValueError(
            f"{path} lacks {missing}: these fields are not fixed by the weights, so a default would load a "
            f'different model silently; add them (e.g. "image_size": the size the model was trained at)'
        )
    try:
        return TokenizerConfig.from_dict(data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path} holds an invalid tokenizer config: {error}") from error


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file -> state dict on CPU; a truncated or corrupt file raises ValueError naming it."""
    try:
        return load_file(path, device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError) without the path
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {error}"
        ) from error


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------------------------------
# The released pickle format


def read_pickle(path: str | os.PathLike) -> Any:
    """``torch.load`` with ``weights_only=True``: a pickle that needs classes outside torch's safe allow-list is
    refused with a ``ValueError`` that names them (allow-list trusted ones with
    ``torch.serialization.add_safe_globals`` and load again)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): an interrupted download or copy?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not _refused_by_weights_only(error):
            raise ValueError(
                f"{path} is not a readable torch checkpoint (truncated or corrupt?): {error}"
            ) from error
        needed = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(error)))) or ["(not named by torch)"]
        raise ValueError(
            f"{path} cannot be read with torch.load(weights_only=True): its pickle needs classes outside "
            f"the safe allow-list: {', '.join(needed)}. If you trust the file, allow-list them with "
            "torch.serialization.add_safe_globals([...]) and load it again; the released checkpoint needs none."
        ) from error
    except (EOFError, OSError, RuntimeError) as error:
        # torch reports a cut zip archive as RuntimeError or OSError(22) and a cut pickle as EOFError, none
        # naming the file
        raise ValueError(
            f"{path} is not a readable torch checkpoint (truncated or corrupt?): {error}"
        ) from error


def _refused_by_weights_only(error: pickle.UnpicklingError) -> bool:
    """Whether torch's weights-only unpickler refused a class (rather than the pickle being corrupt)."""
    return "weights only" in str(error).lower() or "weights_only" in str(error)


def read_release_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A released-format ``.pth`` -> (``args`` dict, the UniTok state dict ``trainer.unitok``)."""
    ckpt = read_pickle(path)
    if not (
        isinstance(ckpt, Mapping) and isinstance(ckpt.get("trainer"), Mapping) and "unitok" in ckpt["trainer"]
    ):
        found = sorted(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise ValueError(
            f"{path} is not a released UniTok checkpoint: expected a dict with 'args' and "
            f"'trainer'['unitok'], found {found}"
        )
    args = ckpt.get("args") or {}
    if not isinstance(args, Mapping):
        args = vars(args)
    return dict(args), strip_wrapper_prefixes(ckpt["trainer"]["unitok"])


def config_from_release_args(args: Mapping[str, Any]) -> TokenizerConfig:
    """Reference ``Args`` (``ckpt["args"]``) -> ``TokenizerConfig``; absent args take the reference defaults.

    A full config stored under ``args["unitok_config"]`` (written by ``to_release_checkpoint``) wins.
    """
    if CONFIG_ARG in args:
        return TokenizerConfig.from_dict(dict(args[CONFIG_ARG]))
    model = args.get("model", "vitamin_large")
    if model not in RELEASE_MODELS:
        raise ValueError(f"unsupported release model {model!r}; expected one of {sorted(RELEASE_MODELS)}")
    if int(args.get("num_query", 0)) != 0:
        raise ValueError(
            f"release checkpoints with register tokens (num_query={args['num_query']}) are not "
            f"supported: the code grid would not be h x w"
        )
    fields = {name: PRESETS[RELEASE_MODELS[model]][name] for name in _ARCH_FIELDS}
    fields.update({ours: args[theirs] for theirs, ours in _RELEASE_ARGS.items() if theirs in args})
    width, vocab_width = fields["width"], fields.get("vocab_width", TokenizerConfig.vocab_width)
    # The reference builds both projections with embed_dim // vocab_width heads.
    fields["proj_heads"] = max(1, width // vocab_width)
    return TokenizerConfig(**fields)


def release_args_from_config(config: TokenizerConfig) -> dict[str, Any]:
    """``TokenizerConfig`` -> reference-style ``args`` (plus our full config under ``unitok_config``)."""
    arch = {name: getattr(config, name) for name in _ARCH_FIELDS}
    model = next(
        (
            name
            for name, preset in RELEASE_MODELS.items()
            if all(PRESETS[preset][key] == value for key, value in arch.items())
        ),
        "unitok_custom",
    )
    args = {theirs: getattr(config, ours) for theirs, ours in _RELEASE_ARGS.items()}
    args.update({"model": model, "num_query": 0, CONFIG_ARG: config.to_dict()})
    return args


def to_release_checkpoint(model: torch.nn.Module) -> dict[str, Any]:
    """A UniTok model -> the released layout ``{"args": ..., "trainer": {"unitok": state_dict}}``."""
    state_dict = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    return {"args": release_args_from_config(model.config), "trainer": {"unitok": state_dict}}


def save_release_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write ``to_release_checkpoint(model)`` with ``torch.save`` (atomically); readable with weights_only=True."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = to_release_checkpoint(model)
    _atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
    return path


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove a ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix carried by every key."""
    state_dict = dict(state_dict)
    for prefix in _WRAPPER_PREFIXES:
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict


# --------------------------------------------------------------------------------------------------
# open_clip ViTamin CLIP weights


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file or a (weights-only) torch pickle, unwrapping ``{"state_dict": ...}``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    ckpt = read_pickle(path)
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("state_dict"), Mapping):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path} does not hold a state dict, found {type(ckpt).__name__}")
    return strip_wrapper_prefixes(ckpt)


def clip_to_unitok_state_dict(clip_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip ViTamin CLIP keys -> UniTok keys: ``visual.trunk.*`` -> ``encoder.*``, ``text.*`` -> ``text_encoder.*``.

    Keys containing ``head`` or ``pos_embed`` (the CLIP pooling head and position embedding UniTok has
    not) and everything else (``logit_scale``, ``visual.head.*`` ...) are dropped.
    """
    mapped = {}
    for key, value in strip_wrapper_prefixes(clip_state_dict).items():
        if key.startswith("visual.trunk.") and "head" not in key and "pos_embed" not in key:
            mapped["encoder." + key[len("visual.trunk.") :]] = value
        elif key.startswith("text."):
            mapped["text_encoder." + key[len("text.") :]] = value
    return mapped


# --------------------------------------------------------------------------------------------------
# Code layouts


def codes_from_release(codes_BKL: torch.Tensor) -> torch.Tensor:
    """Release codes ``[B,K,L]`` (or ``[B,K,h,w]``) -> ``[B,h,w,K]`` (square grid, L = h*h)."""
    if codes_BKL.ndim == 4:
        return rearrange(codes_BKL, "b k h w -> b h w k")
    if codes_BKL.ndim != 3:
        raise ValueError(f"expected release codes [B,K,L] or [B,K,h,w], got {list(codes_BKL.shape)}")
    side = round(codes_BKL.shape[-1] ** 0.5)
    if side * side != codes_BKL.shape[-1]:
        raise ValueError(f"expected a square number of positions L, got {codes_BKL.shape[-1]}")
    return rearrange(codes_BKL, "b k (h w) -> b h w k", h=side)


def codes_to_release(codes_BhwK: torch.Tensor) -> torch.Tensor:
    """Codes ``[B,h,w,K]`` -> the release layout ``[B,K,L]`` (codebook-major, raster positions)."""
    if codes_BhwK.ndim != 4:
        raise ValueError(f"expected codes [B,h,w,K], got {list(codes_BhwK.shape)}")
    return rearrange(codes_BhwK, "b h w k -> b k (h w)")


# --------------------------------------------------------------------------------------------------
# The Hugging Face Hub

# The released tokenizer's file name in its Hub repository (FoundationVision/unitok_tokenizer).
RELEASE_FILENAME = "unitok_tokenizer.pth"
MODEL_CARD_NAME = "README.md"
HUB_LIBRARY_NAME = "unitok"
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def is_hub_id(text: str | os.PathLike) -> bool:
    """Whether ``text`` reads as a Hub repository id ``owner/name`` rather than a local path.

    An existing path, or one whose ``owner`` part is an existing local folder (``runs/typo``), is local: a
    mistyped path must fail at once, not after the Hub client's network retries.
    """
    return isinstance(text, str) and bool(_HUB_ID.fullmatch(text)) and not Path(text).parent.exists()


def download_checkpoint(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> Path:
    """Fetch a UniTok checkpoint from the Hub (or the local Hub cache) -> a local directory or ``.pth`` file.

    Our layout (``config.json`` + ``model.safetensors``, as ``push_to_hub`` writes it) is tried first, then
    the released ``unitok_tokenizer.pth`` (read later with ``weights_only=True``). ``HF_HUB_OFFLINE=1`` or
    ``local_files_only=True`` use the cache only.

    Raises:
        ValueError: when the repository, the revision or both layouts' files cannot be had, saying why.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    def fetch(filename: str) -> Path:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                cache_dir=None if cache_dir is None else str(cache_dir),
                token=token,
                force_download=force_download,
                local_files_only=local_files_only,
                library_name=HUB_LIBRARY_NAME,
            )
        )

    tried = []
    for layout in ((CONFIG_NAME, WEIGHTS_NAME), (RELEASE_FILENAME,)):
        try:
            paths = [fetch(name) for name in layout]
        except EntryNotFoundError as error:
            tried.append(f"{' + '.join(layout)}: {type(error).__name__}")
            continue
        except (RepositoryNotFoundError, RevisionNotFoundError) as error:
            raise ValueError(f"cannot fetch {repo_id!r} from the Hugging Face Hub: {error}") from error
        logger.info("UniTok checkpoint %s resolved to %s", repo_id, paths[0].parent)
        return paths[0].parent if len(layout) == 2 else paths[0]
    raise ValueError(
        f"{repo_id!r} (revision {revision or 'main'}) gave no UniTok checkpoint: {'; '.join(tried)}. "
        "Offline (HF_HUB_OFFLINE=1 or local_files_only=True) only files already in the Hub cache are found."
    )


def render_model_card(
    config: TokenizerConfig, repo_id: str | None = None, num_parameters: int | None = None
) -> str:
    """The ``README.md`` model card ``save_pretrained`` writes: Hub metadata, the sizes, how to load, citation."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        library_name=HUB_LIBRARY_NAME,
        tags=["unitok", "image-tokenizer", "vector-quantization", "clip", "multi-codebook-quantization"],
        pipeline_tag="image-feature-extraction",
    )
    name = repo_id or "this folder"
    load_from = repr(repo_id) if repo_id else '"path/to/this/folder"'
    grid = config.grid_size
    rows = [
        ("image size", f"{config.image_size} px (inputs in [-1,1], mean/std 0.5)"),
        ("code grid", f"{grid} x {grid} positions x {config.num_codebooks} codes ({config.quantizer})"),
        (
            "sub-codebooks",
            f"{config.num_codebooks} x {config.codebook_size} entries x {config.code_dim} dims",
        ),
        ("encoder / decoder", f"width {config.width}, {config.depth} / {config.decoder_depth} ViT blocks"),
        (
            "CLIP text tower",
            f"width {config.text_width}, {config.text_layers} layers; embedding {config.embed_dim}",
        ),
    ]
    if num_parameters is not None:
        rows.append(("parameters", f"{num_parameters / 1e6:.1f} M"))
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return f"""---
{data.to_yaml()}
---

# UniTok tokenizer: {name}

A UniTok visual tokenizer (arXiv 2502.20321): one discrete tokenizer for image generation (codes to pixels)
and understanding (CLIP features of the quantized tokens). Weights in `model.safetensors`, the full
`TokenizerConfig` in `config.json`.

| | |
|---|---|
{table}

## Use

```python
from unitok.tokenizer import UniTok
from unitok.tokenizer.preprocess import load_image

tok = UniTok.from_pretrained({load_from})
img = load_image("cat.jpg", size={config.image_size})[None]  # [1,3,H,W] in [-1,1]
codes = tok.encode(img)  # LongTensor [1,{grid},{grid},{config.num_codebooks}]
recon = tok.decode(codes)  # [1,3,H,W] in [-1,1]
```

## Citation

```bibtex
@inproceedings{{ma2025unitok,
  title     = {{UniTok: A Unified Tokenizer for Visual Generation and Understanding}},
  author    = {{Ma, Chuofan and Jiang, Yi and Wu, Junfeng and Yang, Jihan and Yu, Xin and Yuan, Zehuan and Peng, Bingyue and Qi, Xiaojuan}},
  booktitle = {{Advances in Neural Information Processing Systems}},
  year      = {{2025}},
  eprint    = {{2502.20321}},
  archivePrefix = {{arXiv}}
}}
```
"""
