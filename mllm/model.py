"""The unified multimodal LLM: a causal LLM that reads and writes UniTok codes.

Shape legend: B batch, T sequence length, N visual positions (flattened over the batch), K sub-codebooks,
V entries per sub-codebook, D UniTok latent width, H LLM hidden size, h/w code grid.

- Input: each visual position's K codes -> frozen UniTok code vectors, concatenated [D] -> projector -> [H]
  (``projector="mlp"``: per position; ``"causal_attn"``: the released merger, causal over an image's positions).
- Output: text positions -> the LLM's LM head; visual positions -> the depth head (``depth_head="transformer"``
  or the released ``"llama"`` head), conditioned on the LLM's final hidden state at the position before.
- ``loss``: text CE and code CE (+ optional z-loss) combined as ``MLLMConfig.loss_weighting`` says; all reported.

The released UniTok MLLM (a Hugging Face folder, ``model_type: mini_gemini``) loads with :meth:`from_pretrained`
and is written back by :meth:`UniTokMLLM.export_release` (see :mod:`unitok.mllm.release`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    DynamicCache,
    PreTrainedTokenizerBase,
)

from unitok.mllm.chat import answer, chat, chat_stream
from unitok.mllm.config import MLLMConfig
from unitok.mllm.depth_head import DepthHead, LlamaDepthHead
from unitok.mllm.generation import GeneratedImages, generate_images
from unitok.mllm.images import check_pixels, expand_to_square
from unitok.mllm.loading import (
    _resolve,
    load_checkpoint,
    load_llm,
    load_unitok,
    push_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from unitok.mllm.projector import MergerCache, WindowCache, build_projector
from unitok.mllm.sequence import IGNORE_INDEX, MLLMBatch, SequenceBuilder
from unitok.mllm.text_tokenizer import add_image_tokens, load_text_tokenizer
from unitok.tokenizer.quantizer import unchecked_code_vectors

logger = logging.getLogger(__name__)


@dataclass
class MLLMOutput:
    """Training forward result: ``loss`` (to backpropagate), its parts, and how many targets each part had."""

    loss: torch.Tensor
    text_loss: torch.Tensor
    code_loss: torch.Tensor
    num_text_targets: int
    num_code_targets: int
    z_loss: torch.Tensor | None = None
    """``mean(max_logit^2)`` over the sub-code logits (reported always; weighted in only with ``z_loss_weight``)."""


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
        special = add_image_tokens(
            text_tokenizer, config.boi_token, config.eoi_token, config.image_token, config.extend_vocab
        )
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
        self.projector = build_projector(config, unitok, hidden)
        if config.depth_head == "llama":
            llm_config = (llm.get_base_model() if _is_peft(llm) else llm).config
            self.depth_head = LlamaDepthHead(
                llm_config, self.num_codebooks, self.codebook_size, layers=config.depth_layers
            )
        else:
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
        add_image_tokens(
            text_tokenizer, config.boi_token, config.eoi_token, config.image_token, config.extend_vocab
        )
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
    def from_pretrained(
        cls,
        path: str | Path,
        unitok: nn.Module | str | Path | None = None,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        **release_kwargs: Any,
    ) -> UniTokMLLM:
        """Load a checkpoint directory or Hugging Face Hub id, strictly.

        Two layouts are recognised: ours (written by :meth:`save_pretrained`) and the released UniTok MLLM's
        Hugging Face folder (``model_type: mini_gemini``; see :func:`unitok.mllm.release.load_release`, which also
        takes ``release_kwargs``). A ``path`` that is not a local directory is fetched from the Hub with
        ``huggingface_hub.snapshot_download`` (``revision``, ``cache_dir``; ``HF_HUB_OFFLINE=1`` uses the cache
        only). ``unitok`` (a UniTok, or the path of one) replaces the one the checkpoint names; the released
        folder holds no UniTok, so it needs one for images (default: ``unitok_tokenizer.pth`` inside the folder).
        """
        path = resolve_checkpoint(path, revision=revision, cache_dir=cache_dir)
        from unitok.mllm.release import is_release_folder, load_release

        if is_release_folder(path):
            return load_release(cls, path, unitok=unitok, **release_kwargs)
        if release_kwargs:
            raise ValueError(f"options {sorted(release_kwargs)} apply to the released layout only")
        return load_checkpoint(cls, path, unitok)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the checkpoint directory atomically; see :func:`unitok.mllm.loading.save_checkpoint`."""
        save_checkpoint(self, path)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload UniTok MLLM",
        release_layout: bool = False,
    ) -> str:
        """Save and upload to the Hub, returning the commit URL; see :func:`unitok.mllm.loading.push_checkpoint`."""
        return push_checkpoint(
            self,
            repo_id,
            private=private,
            token=token,
            commit_message=commit_message,
            release_layout=release_layout,
        )

    def export_release(
        self, path: str | Path, max_shard_size: int | str = "5GB", dtype: str | None = None
    ) -> None:
        """Write the released Hugging Face layout; see :func:`unitok.mllm.release.export_release`."""
        from unitok.mllm.release import export_release

        export_release(self, path, max_shard_size=max_shard_size, dtype=dtype)

    @property
    def llm_source(self) -> str:
        """Where the base LLM came from (path or hub id; a LoRA checkpoint references it)."""
        base = self.llm.get_base_model() if _is_peft(self.llm) else self.llm
        return str(getattr(base.config, "_name_or_path", "") or self.config.llm)

    # ------------------------------------------------------------------ pieces used by training and generation

    @property
    def device(self) -> torch.device:
        """Device of the trainable modules."""
        return next(self.projector.parameters()).device

    @property
    def projector_dtype(self) -> torch.dtype:
        """Dtype the projector computes in."""
        return next(p for p in self.projector.parameters() if p.is_floating_point()).dtype

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> UniTokMLLM:
        """``.to()`` / ``.cuda()`` / ``.bfloat16()``: the UniTok follows device moves but stays in its dtype.

        UniTok encodes and decodes in float32 (its quantizer needs it), so casting the whole MLLM to bf16 casts
        the LLM, projector and depth head only.
        """
        unitok = self._modules["unitok"]
        self._modules["unitok"] = None
        try:
            super()._apply(fn, recurse)
        finally:
            self._modules["unitok"] = unitok

        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(device=out.device)

        unitok._apply(keep_dtype, recurse)
        return self

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

    @property
    def context_length(self) -> int | None:
        """The LLM's maximum number of positions (``max_position_embeddings``), if its config says."""
        return getattr(self.llm.config, "max_position_embeddings", None)

    def grid(self, image_size: int | None = None) -> tuple[int, int]:
        """(h, w) of the code grid of a square image of ``image_size`` pixels (default: the UniTok's)."""
        size = self.unitok.config.image_size if image_size is None else image_size
        patch = self.unitok.config.patch_size
        if isinstance(size, bool) or not isinstance(size, int):
            raise ValueError(f"image_size must be an int (pixels), got {size!r}")
        if size < patch or size % patch:
            raise ValueError(
                f"image_size must be a positive multiple of the UniTok's patch size {patch}, got {size}"
            )
        return size // patch, size // patch

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
        """LLM input embeddings [N,H] of N visual positions given their codes [N,K], each position on its own.

        For the causal attention and window mergers this embeds every position as a one-position image; use
        :meth:`embed_image` / :meth:`embed_next` for images.
        """
        if self.config.projector == "causal_attn":
            return self.projector(codes_NK[:, None])[:, 0]
        vecs = self.code_vectors(codes_NK)
        if self.config.projector == "window":
            return self.projector(vecs[:, None])[:, 0]
        return self.projector(vecs.to(self.projector_dtype))

    def embed_image(self, codes_BLK: torch.Tensor, checked: bool = True) -> torch.Tensor:
        """LLM input embeddings [B,L,H] of whole images (or image prefixes) given their codes [B,L,K].

        ``checked=False`` skips the code range check (a host sync) where the codes are known to be valid.
        """
        if self.config.projector == "causal_attn":
            vecs = None if checked else unchecked_code_vectors(self._quantizer(), codes_BLK)
            return self.projector(codes_BLK) if vecs is None else self.projector.project(vecs)
        vecs = self._image_vectors(codes_BLK, checked)
        return self.projector(vecs.to(self.projector_dtype) if self.config.projector == "mlp" else vecs)

    def _image_vectors(self, codes_BLK: torch.Tensor, checked: bool) -> torch.Tensor:
        """UniTok code vectors [B,L,D] of codes [B,L,K] (the MLP and window projectors' input); ``checked=False``
        skips the range check where the lookup allows it."""
        vecs = None if checked else unchecked_code_vectors(self._quantizer(), codes_BLK)
        if vecs is None:
            vecs = self.code_vectors(codes_BLK.flatten(0, 1)).unflatten(0, codes_BLK.shape[:2])
        return vecs

    def _quantizer(self) -> nn.Module:
        """The quantizer whose codebooks the projector reads (the merger's own copy, or the UniTok's)."""
        return self.projector.quantizer if self.config.projector == "causal_attn" else self.unitok.quantizer

    def new_image_state(self) -> MergerCache | WindowCache | None:
        """State of an image being generated position by position: the causal merger's KV cache, the window
        projector's code vectors so far, None for the per-position MLP."""
        if self.config.projector == "window":
            return WindowCache()
        return MergerCache() if self.config.projector == "causal_attn" else None

    def embed_next(
        self,
        codes_BTK: torch.Tensor,
        state: MergerCache | WindowCache | None,
        reference_merger_cache: bool = False,
        checked: bool = True,
    ) -> torch.Tensor:
        """Embeddings [B,T,H] of the next T positions of the images in ``state`` (see :meth:`new_image_state`).

        ``reference_merger_cache=True`` reproduces the reference implementation's cached generation, where the
        causal merger sees only the new positions (a sequence of length T) instead of the whole image so far; it
        only exists to reproduce that code's published samples.
        """
        if state is None or reference_merger_cache:
            return self.embed_image(codes_BTK, checked=checked)
        if self.config.projector == "window":
            return self.projector.project_step(self._image_vectors(codes_BTK, checked), state)
        if checked:
            return self.projector.step(codes_BTK, state)
        return self.projector.project_step(unchecked_code_vectors(self.projector.quantizer, codes_BTK), state)

    def embed(self, input_ids: torch.Tensor, visual_mask: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Input embeddings [B,T,H]: token embeddings, replaced at ``visual_mask`` by the projected codes [B,T,K].

        Each run of consecutive visual positions in a row is one image (the causal and window mergers read within it).
        """
        embeds = self.llm.get_input_embeddings()(input_ids)
        if self.config.projector == "mlp":
            visual = self.embed_codes(codes[visual_mask])
            return embeds.masked_scatter(visual_mask[..., None], visual.to(embeds.dtype))
        runs = _visual_runs(visual_mask)
        if not runs:
            # Keep the merger in the graph (every parameter gets a gradient, as distributed training needs).
            return embeds + 0.0 * self.embed_image(codes[:1, :1]).sum().to(embeds.dtype)
        by_length: dict[int, list[tuple[int, int]]] = {}
        for row, start, end in runs:
            by_length.setdefault(end - start, []).append((row, start))
        rows, cols, values = [], [], []
        for length, items in by_length.items():
            offsets = torch.arange(length, device=codes.device)
            row_idx = torch.tensor([r for r, _ in items], device=codes.device)[:, None].expand(-1, length)
            col_idx = torch.tensor([c for _, c in items], device=codes.device)[:, None] + offsets
            out = self.embed_image(codes[row_idx, col_idx])
            rows.append(row_idx.flatten())
            cols.append(col_idx.flatten())
            values.append(out.flatten(0, 1).to(embeds.dtype))
        return embeds.index_put((torch.cat(rows), torch.cat(cols)), torch.cat(values))

    def new_cache(self) -> DynamicCache:
        """An empty KV cache for :meth:`decode_hidden`."""
        return DynamicCache()

    def decode_hidden(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        sync_free: bool = False,
    ) -> torch.Tensor:
        """The LLM's final (normed) hidden states [B,T,H] of ``embeds`` [B,T,H].

        ``attention_mask`` [B, cached + T] marks real tokens; with a ``cache`` the new keys/values are appended
        to it in place. ``sync_free`` hands a one-token step its 4-D mask ready-made, so that ``transformers``
        does not read the padding mask back to the host to decide whether it needs one (SDPA and eager).
        """
        impl = getattr(self.llm.config, "_attn_implementation", None)
        if sync_free and embeds.shape[1] == 1 and attention_mask.ndim == 2 and impl in ("sdpa", "eager"):
            allowed = attention_mask[:, None, None, :].bool()
            if impl == "eager":
                zero = torch.zeros((), dtype=embeds.dtype, device=embeds.device)
                allowed = zero.masked_fill(~allowed, torch.finfo(embeds.dtype).min)
            attention_mask = allowed
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
        code_logits = self.depth_head(hidden[code_sel], code_targets).flatten(0, 1).float()
        code_ce = _mean_cross_entropy(code_logits, code_targets.flatten())
        z_loss = _z_loss(code_logits)
        code_loss = code_ce + self.config.z_loss_weight * z_loss if self.config.z_loss_weight else code_ce
        n_text, n_code = int(text_sel.sum()), int(code_targets.numel())
        weight = self.config.code_loss_weight
        if self.config.loss_weighting == "token_count" and n_text + n_code > 0:
            loss = (n_text * text_loss + weight * n_code * code_loss) / (n_text + n_code)
        else:
            loss = text_loss + weight * code_loss
        return MLLMOutput(
            loss=loss,
            text_loss=text_loss.detach(),
            code_loss=code_ce.detach(),
            num_text_targets=n_text,
            num_code_targets=int(code_sel.sum()),
            z_loss=z_loss.detach(),
        )

    # ------------------------------------------------------------------ user-facing inference

    def to_codes(self, item: Any) -> torch.Tensor:
        """One image or code grid -> validated code grid [h,w,K].

        ``item``: a PIL image or image path (made square as ``config.image_resize`` says, resized to the UniTok's
        size), an image tensor [3,H,W] or [1,3,H,W] with values in [-1,1], or an integer code grid [h,w,K]
        (or [1,h,w,K]).
        """
        if isinstance(item, torch.Tensor) and not item.dtype.is_floating_point:
            if item.ndim == 4 and item.shape[0] == 1:
                item = item[0]
            self.builder.check_codes(item)
            self.check_grid(*item.shape[:2])
            return item.to(self.device)
        if isinstance(item, torch.Tensor):
            img = check_pixels(item)
        else:
            img = self.load_image(item)
        with torch.no_grad():
            param = next(self.unitok.parameters())
            codes = self.unitok.encode(img[None].to(device=param.device, dtype=param.dtype))[0]
        self.check_grid(*codes.shape[:2])
        return codes.to(self.device)

    def check_grid(self, h: int, w: int) -> None:
        """Raise ValueError when this model cannot read an h x w code grid (the window projector reads grids
        of the UniTok's own width only; the other projectors read any)."""
        if self.config.projector == "window" and w != self.projector.grid_width:
            raise ValueError(
                f"the window projector reads code grids {self.projector.grid_width} positions wide (the UniTok's "
                f"image size), got a {h}x{w} grid"
            )

    def load_image(self, item: Any) -> torch.Tensor:
        """A PIL image, path or uint8 array -> [3,S,S] in [-1,1] at the UniTok's size ``S``.

        ``config.image_resize == "pad"`` pads to a square first (the released model's ``expand2square`` with the
        background (122, 116, 104)) and resizes it bilinearly, as the release's evaluation does; ``"crop"``
        resizes the short side (bicubic) and centre-crops.
        """
        from unitok.tokenizer.preprocess import load_image

        size = self.unitok.config.image_size
        if self.config.image_resize == "pad":
            import numpy as np
            from PIL import Image

            # The release: torchvision Resize((S, S)) on the padded PIL image (bilinear), ToTensor, Normalize(0.5, 0.5).
            square = expand_to_square(item).resize((size, size), Image.Resampling.BILINEAR)
            pixels = torch.from_numpy(np.asarray(square, dtype=np.uint8).copy()).permute(2, 0, 1)
            return (pixels.float() / 255.0 - 0.5) / 0.5
        return load_image(item, size=size)

    def decode_codes(self, codes_BhwK: torch.Tensor) -> list[Any]:
        """PIL images of code grids [B,h,w,K] (UniTok decoder)."""
        from unitok.tokenizer.preprocess import to_pil

        self.builder.check_codes(codes_BhwK, batched=True)
        param = next(self.unitok.parameters())
        with torch.no_grad():
            return to_pil(self.unitok.decode(codes_BhwK.to(param.device)).float().cpu())

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
        progress: Callable[[int, int], None] | None = None,
        reference_merger_cache: bool = False,
        fast: bool = False,
        compile: bool | str = False,
    ) -> GeneratedImages:
        """Text -> image codes [B,h,w,K] and decoded PIL images; see :func:`unitok.mllm.generation.generate_images`.

        ``progress(done, total)`` is called after each generated position. ``reference_merger_cache`` reproduces
        the reference code's cached generation with the causal merger (see :meth:`embed_next`). ``fast`` runs the
        loop without host syncs per position (exponential-race sampling: same distribution, other draws for a
        seed; greedy is identical); ``compile`` also compiles its position step with ``torch.compile``.
        """
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
            progress=progress,
            reference_merger_cache=reference_merger_cache,
            fast=fast,
            compile=compile,
        )

    def chat(
        self,
        messages: Sequence[dict[str, str]],
        images: Any = None,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        streamer: Any = None,
    ) -> str:
        """The assistant's next answer in a conversation.

        Args:
            messages: ``{"role": "user"|"assistant", "content": str}`` dicts, alternating, ending with a user turn.
            images: None, one image, or a list of images: PIL images, paths, tensors [3,H,W] / [1,3,H,W] in
                [-1,1], or code grids [h,w,K]. Each goes where a user turn has ``<image>`` (in order); with no
                ``<image>`` anywhere they go before the first user turn's text.
            max_new_tokens: answer length limit in tokens.
            temperature, top_p: sampling (temperature 0 = greedy).
            streamer: a ``transformers`` streamer (e.g. ``TextIteratorStreamer``) that receives the new tokens.

        Returns:
            the answer text (special tokens removed, stripped).
        """
        return chat(
            self,
            messages,
            images,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            streamer=streamer,
        )

    def chat_stream(
        self,
        messages: Sequence[dict[str, str]],
        images: Any = None,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        streamer: Any = None,
    ) -> Iterator[str]:
        """Like :meth:`chat`, yielding the answer text piece by piece as it is generated."""
        return chat_stream(
            self,
            messages,
            images,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            streamer=streamer,
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
        stop: Sequence[str] = (),
    ) -> list[str] | Iterator[str]:
        """Image(s) + question(s) -> answers (one-turn :meth:`chat`, batched); see :func:`unitok.mllm.chat.answer`."""
        return answer(
            self, images_or_codes, questions, max_new_tokens, stream, temperature, top_p, use_cache, stop
        )


def _embedding(llm: nn.Module) -> nn.Embedding:
    """The LLM's input embedding table (also when peft wraps it to train some of its rows)."""
    return next(m for m in llm.get_input_embeddings().modules() if isinstance(m, nn.Embedding))


def _is_peft(llm: nn.Module) -> bool:
    return hasattr(llm, "peft_config")


def _cache_kwarg(decoder: nn.Module) -> str:
    # transformers 5 renamed ``past_key_values`` to ``cache``.
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _visual_runs(visual_mask: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every run of consecutive True values in ``visual_mask`` [B,T]."""
    mask = visual_mask.to(torch.int8)
    edges = torch.diff(
        mask, dim=1, prepend=mask.new_zeros(mask.shape[0], 1), append=mask.new_zeros(mask.shape[0], 1)
    )
    starts = (edges == 1).nonzero().tolist()
    ends = (edges == -1).nonzero().tolist()
    return [(row, start, end) for (row, start), (_, end) in zip(starts, ends)]


def _z_loss(logits_NC: torch.Tensor) -> torch.Tensor:
    """``mean(max_logit^2)`` over rows (0, still in the graph, without rows)."""
    if logits_NC.shape[0] == 0:
        return logits_NC.sum() * 0.0
    return logits_NC.max(dim=-1).values.pow(2).mean()


def _mean_cross_entropy(logits_NC: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """Mean CE in float32; 0 (still attached to the graph, so every parameter gets a gradient) without targets."""
    if targets_N.numel() == 0:
        return logits_NC.sum() * 0.0
    return F.cross_entropy(logits_NC.float(), targets_N)
