"""The unified multimodal LLM: a causal LLM that reads and writes UniTok codes.

Shape legend: B batch, T sequence length, N visual positions (flattened over the batch), K sub-codebooks,
V entries per sub-codebook, D UniTok latent width, H LLM hidden size, h/w code grid.

- Input: each visual position's K codes -> frozen UniTok code vectors, concatenated [D] -> projector -> [H].
- Output: text positions -> the LLM's LM head; visual positions -> the depth head, conditioned on the LLM's
  final hidden state at the position before.
- ``loss = text CE + code_loss_weight * code CE`` (each a mean over its targets; both reported).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from unitok.mllm.config import MLLMConfig
from unitok.mllm.depth_head import DepthHead
from unitok.mllm.generation import GeneratedImages, answer, generate_images
from unitok.mllm.projector import VisualProjector
from unitok.mllm.sequence import IGNORE_INDEX, MLLMBatch, SequenceBuilder
from unitok.mllm.text_tokenizer import add_image_tokens, load_text_tokenizer

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LLM_DIR, ADAPTER_DIR, TEXT_TOKENIZER_DIR, UNITOK_DIR = "llm", "adapter", "text_tokenizer", "unitok"
# UniTok downsamples images by 16 (contract: h = H / 16).
UNITOK_DOWNSAMPLE = 16


@dataclass
class MLLMOutput:
    """Training forward result: ``loss`` (to backpropagate), its parts, and how many targets each part had."""

    loss: torch.Tensor
    text_loss: torch.Tensor
    code_loss: torch.Tensor
    num_text_targets: int
    num_code_targets: int


def _resolve(path: str, base_dir: Path | None) -> str:
    """A path relative to a checkpoint directory if it exists there, else the path / hub id unchanged."""
    if base_dir is not None and (base_dir / path).exists():
        return str(base_dir / path)
    return path


def _dtype_kwargs(dtype: str) -> dict[str, torch.dtype]:
    name = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return {name: getattr(torch, dtype)}


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


class UniTokMLLM(nn.Module):
    """A causal LLM + frozen UniTok + visual projector + depth head.

    Args:
        config: the MLLM config.
        llm: a ``transformers`` causal LM (or a ``peft`` model around one, e.g. when loading an adapter).
        text_tokenizer: its tokenizer; the ``<boi>``/``<eoi>``/``<image>`` tokens are added if missing and the
            LLM's embeddings are resized to match.
        unitok: the UniTok (used: ``config.num_codebooks/codebook_size/vocab_width/image_size``,
            ``quantizer.codes_to_vectors``, ``encode``, ``decode``, ``save_pretrained``); it is frozen and kept
            in eval mode.

    Use :meth:`from_config` to build everything from a config and :meth:`from_pretrained` to load a checkpoint.
    """

    def __init__(
        self,
        config: MLLMConfig,
        llm: nn.Module,
        text_tokenizer: PreTrainedTokenizerBase,
        unitok: nn.Module,
    ) -> None:
        super().__init__()
        self.config = config
        self.text_tokenizer = text_tokenizer
        special = add_image_tokens(text_tokenizer, config.boi_token, config.eoi_token, config.image_token)
        rows = _embedding(llm).num_embeddings
        if rows != len(text_tokenizer):
            if _is_peft(llm):
                raise ValueError(
                    f"the wrapped LLM has {rows} token rows but the tokenizer has "
                    f"{len(text_tokenizer)} tokens; resize the base model before adding the adapter"
                )
            llm.resize_token_embeddings(len(text_tokenizer))
        self.unitok = unitok.requires_grad_(False).eval()
        tok_cfg = unitok.config
        self.num_codebooks, self.codebook_size = tok_cfg.num_codebooks, tok_cfg.codebook_size
        hidden = _embedding(llm).embedding_dim
        self.projector = VisualProjector(tok_cfg.vocab_width, hidden, config.projector_hidden)
        self.depth_head = DepthHead(
            hidden,
            self.num_codebooks,
            self.codebook_size,
            width=config.depth_width,
            layers=config.depth_layers,
            heads=config.depth_heads,
            mlp_ratio=config.depth_mlp_ratio,
        )
        self.builder = SequenceBuilder(
            text_tokenizer, config, special, self.num_codebooks, self.codebook_size
        )
        self.llm = self._wrap_lora(llm) if config.use_lora and not _is_peft(llm) else llm
        self._cache_kwarg = _cache_kwarg(self.llm.get_decoder())

    # ------------------------------------------------------------------ building and loading

    @classmethod
    def from_config(
        cls,
        config: MLLMConfig,
        unitok: nn.Module | None = None,
        text_tokenizer: PreTrainedTokenizerBase | None = None,
        base_dir: str | Path | None = None,
    ) -> UniTokMLLM:
        """Build the model of ``config`` (pretrained LLM or random-init inline one; random-init projector/head).

        ``unitok`` / ``text_tokenizer`` override what the config names; relative paths resolve against
        ``base_dir`` first.
        """
        base = None if base_dir is None else Path(base_dir)
        if text_tokenizer is None:
            name = config.text_tokenizer if config.text_tokenizer is not None else config.llm
            text_tokenizer = load_text_tokenizer(_resolve(name, base))
        add_image_tokens(text_tokenizer, config.boi_token, config.eoi_token, config.image_token)
        llm = load_llm(config, text_tokenizer, base)
        return cls(config, llm, text_tokenizer, load_unitok(config, base) if unitok is None else unitok)

    def _lora_config(self, llm: nn.Module) -> Any:
        from peft import LoraConfig

        cfg = self.config
        trainable_tokens = None
        if cfg.lora_train_new_tokens:
            ids = self.builder.ids
            rows = sorted({ids.boi, ids.eoi, ids.image})
            names = {module: name for name, module in llm.named_modules()}
            inp, outp = llm.get_input_embeddings(), llm.get_output_embeddings()
            trainable_tokens = {names[inp]: rows}
            if outp is not None and outp.weight is not inp.weight:
                trainable_tokens[names[outp]] = rows
        return LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
            trainable_token_indices=trainable_tokens,
            task_type="CAUSAL_LM",
        )

    def _wrap_lora(self, llm: nn.Module) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(llm, self._lora_config(llm))

    @classmethod
    def from_pretrained(cls, path: str | Path, unitok: nn.Module | None = None) -> UniTokMLLM:
        """Load a directory written by :meth:`save_pretrained` (weights loaded strictly)."""
        path = Path(path)
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

    def save_pretrained(self, path: str | Path) -> None:
        """Write the checkpoint directory atomically (a temporary directory renamed into place).

        Layout: ``config.json``; ``model.safetensors`` (projector + depth head); ``text_tokenizer/``;
        ``llm/`` (the full LLM; with LoRA only a base that cannot be fetched again: an inline random-init one
        or one loaded from inside a checkpoint); ``adapter/`` (LoRA adapter, incl. the rows of the new
        tokens); ``unitok/`` when the UniTok was a random-init preset or came from inside a checkpoint
        (otherwise ``config.unitok`` keeps referencing its checkpoint). Relative paths in ``config.json``
        resolve against the checkpoint directory first.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            config = self.config.to_dict()
            if self.config.use_lora:
                self.llm.save_pretrained(str(tmp / ADAPTER_DIR))
                if isinstance(self.config.llm, dict) or self.config.llm == LLM_DIR:
                    # A random-init base, or one that lives inside the checkpoint it was loaded from.
                    self._save_base_llm(tmp / LLM_DIR)
                    config["llm"] = LLM_DIR
                else:
                    config["llm"] = self.llm_source
            else:
                self.llm.save_pretrained(str(tmp / LLM_DIR))
                config["llm"] = LLM_DIR
            self.text_tokenizer.save_pretrained(str(tmp / TEXT_TOKENIZER_DIR))
            config["text_tokenizer"] = TEXT_TOKENIZER_DIR
            if self.config.unitok_preset is not None or self.config.unitok == UNITOK_DIR:
                # A random-init UniTok, or one that lives inside the checkpoint it was loaded from.
                self.unitok.save_pretrained(str(tmp / UNITOK_DIR))
                config.update(unitok=UNITOK_DIR, unitok_preset=None)
            tensors = {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
            tensors.update({f"depth_head.{k}": v for k, v in self.depth_head.state_dict().items()})
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME))
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            _replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _save_base_llm(self, path: Path) -> None:
        base_config = self.llm.get_base_model().config
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(base_config)
        fresh.load_state_dict(base_llm_state_dict(self.llm), strict=True, assign=True)
        fresh.save_pretrained(str(path))

    @property
    def llm_source(self) -> str:
        """Where the base LLM came from (path or hub id; a LoRA checkpoint references it)."""
        base = self.llm.get_base_model() if _is_peft(self.llm) else self.llm
        return str(getattr(base.config, "_name_or_path", "") or self.config.llm)

    # ------------------------------------------------------------------ pieces used by training and generation

    @property
    def device(self) -> torch.device:
        """Device of the trainable modules."""
        return self.projector.fc1.weight.device

    def train(self, mode: bool = True) -> UniTokMLLM:
        """Switch train/eval mode; the UniTok always stays in eval mode."""
        super().train(mode)
        self.unitok.eval()
        return self

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs that require gradients (LLM or its adapter, projector, depth head)."""
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the LLM's layer activations in the backward pass (non-reentrant checkpointing)."""
        self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def grid(self, image_size: int | None = None) -> tuple[int, int]:
        """(h, w) of the code grid of a square image of ``image_size`` pixels (default: the UniTok's)."""
        size = self.unitok.config.image_size if image_size is None else image_size
        if size < UNITOK_DOWNSAMPLE or size % UNITOK_DOWNSAMPLE:
            raise ValueError(f"image_size must be a positive multiple of {UNITOK_DOWNSAMPLE}, got {size}")
        return size // UNITOK_DOWNSAMPLE, size // UNITOK_DOWNSAMPLE

    def code_vectors(self, codes_NK: torch.Tensor) -> torch.Tensor:
        """The frozen UniTok code vectors of N positions (any N, also 0): codes [N,K] -> vectors [N,D] (fp32).

        Uses the UniTok's quantizer directly: ``UniTok.codes_to_vectors`` takes square grids only, while training
        batches and generation steps hold arbitrary numbers of positions.
        """
        if codes_NK.shape[0] == 0:
            return torch.zeros(0, self.unitok.config.vocab_width, device=codes_NK.device)
        with torch.no_grad():
            return self.unitok.quantizer.codes_to_vectors(codes_NK)

    def embed_codes(self, codes_NK: torch.Tensor) -> torch.Tensor:
        """LLM input embeddings [N,H] of N visual positions given their codes [N,K]."""
        vecs = self.code_vectors(codes_NK)
        return self.projector(vecs.to(self.projector.fc1.weight.dtype))

    def embed(self, input_ids: torch.Tensor, visual_mask: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Input embeddings [B,T,H]: token embeddings, replaced at ``visual_mask`` by the projected codes [B,T,K]."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        visual = self.embed_codes(codes[visual_mask])
        return embeds.masked_scatter(visual_mask[..., None], visual.to(embeds.dtype))

    def new_cache(self) -> DynamicCache:
        """An empty KV cache for :meth:`decode_hidden`."""
        return DynamicCache()

    def decode_hidden(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        """The LLM's final (normed) hidden states [B,T,H] of ``embeds`` [B,T,H].

        ``attention_mask`` [B, cached + T] marks real tokens; with a ``cache`` the new keys/values are appended
        to it in place.
        """
        kwargs = {self._cache_kwarg: cache, "use_cache": cache is not None}
        out = self.llm.get_decoder()(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        return out.last_hidden_state

    def forward(self, batch: MLLMBatch) -> MLLMOutput:
        """Training loss of a padded mixed batch (text-only, image->text and text->image sequences)."""
        embeds = self.embed(batch.input_ids, batch.visual_mask, batch.codes)
        positions = (batch.attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
        hidden = self.decode_hidden(embeds, batch.attention_mask, positions)[:, :-1]
        # Position t predicts what sits at t+1: a text token (LM head) or a visual position's codes (depth head).
        text_targets = batch.labels[:, 1:]
        text_sel = text_targets != IGNORE_INDEX
        text_logits = self.llm.get_output_embeddings()(hidden[text_sel])
        text_loss = _mean_cross_entropy(text_logits, text_targets[text_sel])
        code_sel = batch.code_mask[:, 1:]
        code_targets = batch.codes[:, 1:][code_sel]
        code_logits = self.depth_head(hidden[code_sel], code_targets)
        code_loss = _mean_cross_entropy(code_logits.flatten(0, 1), code_targets.flatten())
        return MLLMOutput(
            loss=text_loss + self.config.code_loss_weight * code_loss,
            text_loss=text_loss.detach(),
            code_loss=code_loss.detach(),
            num_text_targets=int(text_sel.sum()),
            num_code_targets=int(code_sel.sum()),
        )

    # ------------------------------------------------------------------ user-facing inference

    def to_codes(self, item: Any) -> torch.Tensor:
        """One image (PIL, or tensor [3,H,W] in [-1,1]) or code grid [h,w,K] -> validated code grid [h,w,K]."""
        if isinstance(item, torch.Tensor) and not item.dtype.is_floating_point:
            self.builder.check_codes(item)
            return item.to(self.device)
        if isinstance(item, torch.Tensor):
            if item.ndim != 3 or item.shape[0] != 3:
                raise ValueError(
                    f"expected an image [3,H,W] in [-1,1] or codes [h,w,K], got {list(item.shape)}"
                )
            img = item
        else:
            from unitok.tokenizer.preprocess import load_image

            img = load_image(item, size=self.unitok.config.image_size)
        with torch.no_grad():
            return self.unitok.encode(img[None].to(self.device))[0]

    def decode_codes(self, codes_BhwK: torch.Tensor) -> list[Any]:
        """PIL images of code grids [B,h,w,K] (UniTok decoder)."""
        from unitok.tokenizer.preprocess import to_pil

        self.builder.check_codes(codes_BhwK, batched=True)
        with torch.no_grad():
            return to_pil(self.unitok.decode(codes_BhwK).float().cpu())

    def generate_images(
        self,
        prompts: str | Sequence[str],
        cfg_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        image_size: int | None = None,
        decode: bool = True,
        use_cache: bool = True,
    ) -> GeneratedImages:
        """Text -> image codes [B,h,w,K] and decoded PIL images; see :func:`unitok.mllm.generation.generate_images`."""
        return generate_images(
            self,
            prompts,
            cfg_scale,
            temperature,
            top_k,
            top_p,
            seed,
            image_size,
            decode=decode,
            use_cache=use_cache,
        )

    def answer(
        self,
        images_or_codes: Any,
        questions: str | Sequence[str],
        max_new_tokens: int = 64,
        stream: bool = False,
        temperature: float = 0.0,
        top_p: float = 1.0,
        use_cache: bool = True,
    ) -> list[str] | Iterator[str]:
        """Image(s) + question(s) -> answers; see :func:`unitok.mllm.generation.answer`."""
        return answer(self, images_or_codes, questions, max_new_tokens, stream, temperature, top_p, use_cache)


def _embedding(llm: nn.Module) -> nn.Embedding:
    """The LLM's input embedding table (also when peft wraps it to train some of its rows)."""
    return next(m for m in llm.get_input_embeddings().modules() if isinstance(m, nn.Embedding))


def _is_peft(llm: nn.Module) -> bool:
    return hasattr(llm, "peft_config")


def _cache_kwarg(decoder: nn.Module) -> str:
    # transformers 5 renamed ``past_key_values`` to ``cache``.
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _resolve_llm(config: MLLMConfig, path: Path) -> str | dict[str, Any]:
    return config.llm if isinstance(config.llm, dict) else _resolve(config.llm, path)


def _mean_cross_entropy(logits_NC: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """Mean CE in float32; 0 (still attached to the graph, so every parameter gets a gradient) without targets."""
    if targets_N.numel() == 0:
        return logits_NC.sum() * 0.0
    return F.cross_entropy(logits_NC.float(), targets_N)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing an existing ``dst`` only once ``src`` is complete."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
