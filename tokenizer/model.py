"""UniTok: one visual tokenizer for generation (discrete codes -> pixels) and understanding (CLIP features).

::

    img_B3HW --encoder--> feats_BLC --quant_proj--> z_BLD --quantizer--> codes_BLK, vecs_BLD
    vecs_BLD --post_quant_proj--> tokens_BLC --decoder--> recon_B3HW
                                  tokens_BLC --mean, fc_norm, projection, L2--> image_features_BE
    texts --open_clip tokenizer--> ids_BT --text_encoder, L2--> text_features_BE

``quant_proj``, the quantizer and ``post_quant_proj`` run in fp32 with autocast off; the encoder and the
decoder run under whatever autocast the caller set (bf16 in training). Shape legend: see ``quantizer.py``.

The inference methods (``encode``, ``decode``, ``reconstruct``, ``encode_image``, ``encode_text``) run without
autograd unless called with ``grad=True``; ``encode`` checks pixel values (finite, within [-1,1]) and takes
images of any floating dtype and device, converting them to the model's.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .checkpoint import (
    MODEL_CARD_NAME,
    clip_to_unitok_state_dict,
    config_from_release_args,
    download_checkpoint,
    is_hub_id,
    load_directory,
    read_release_checkpoint,
    read_state_dict,
    render_model_card,
    save_directory,
)
from .config import TokenizerConfig
from .decoder import ViTaminDecoder
from .encoder import ViTaminEncoder
from .preprocess import check_codes, check_images, check_pixel_values
from .projection import build_projection
from .quantizer import MultiCodebookQuantizer, ResidualQuantizer
from .text import build_text_tower, check_text_ids, tokenize

logger = logging.getLogger(__name__)

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100)

TextInput = Sequence[str] | torch.Tensor


@dataclass
class UniTokOutput:
    """Result of the training forward ``UniTok(img_B3HW, texts)``.

    Attributes:
        recon: ``[B',3,H,W]`` reconstruction, NOT clamped (B' = ``recon_batch_size`` or B).
        codes: ``[B,h,w,K]`` int64 codes.
        vq_loss: scalar VQ loss (commitment + codebook terms).
        entropy_loss: scalar entropy regulariser, already weighted by ``config.entropy_weight``.
        usage: ``[K]`` percentage of each sub-codebook's entries used in this batch.
        perplexity: ``[K]`` code perplexity of each sub-codebook in this batch.
        image_features: ``[B,E]`` L2-normalised CLIP image embedding of the quantized tokens.
        text_features: ``[B,E]`` L2-normalised CLIP text embedding, or None without texts.
        logit_scale: scalar ``exp(logit_scale)`` clamped to [1, 100].
    """

    recon: torch.Tensor
    codes: torch.Tensor
    vq_loss: torch.Tensor
    entropy_loss: torch.Tensor
    usage: torch.Tensor
    perplexity: torch.Tensor
    image_features: torch.Tensor
    text_features: torch.Tensor | None
    logit_scale: torch.Tensor


class LoadReport(NamedTuple):
    """Keys that a non-strict load (``load_clip_weights``) left untouched or could not place."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def build_quantizer(config: TokenizerConfig) -> MultiCodebookQuantizer | ResidualQuantizer:
    """The quantizer named by ``config.quantizer`` ("mcq" or "rq") with the config's sizes."""
    kind = {"mcq": MultiCodebookQuantizer, "rq": ResidualQuantizer}[config.quantizer]
    return kind(
        num_codebooks=config.num_codebooks,
        codebook_size=config.codebook_size,
        code_dim=config.code_dim,
        beta=config.beta,
        entropy_weight=config.entropy_weight,
        entropy_temperature=config.entropy_temperature,
    )


def init_reference_weights(module: nn.Module) -> None:
    """Re-initialise ``module`` as the release does for its decoder and projections.

    Linear/Embedding weights N(0, 0.02) (truncated at +-2), conv weights xavier-normal with gain 0.5,
    all biases 0, LayerNorm/GroupNorm weights 1.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=0.02)
        elif isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d):
            nn.init.xavier_normal_(m.weight, gain=0.5)
        elif isinstance(m, nn.LayerNorm | nn.GroupNorm) and m.weight is not None:
            nn.init.ones_(m.weight)
        if getattr(m, "bias", None) is not None and isinstance(m.bias, torch.Tensor):
            nn.init.zeros_(m.bias)


class UniTok(nn.Module):
    """The UniTok tokenizer. Build with ``UniTok(TokenizerConfig.preset("unitok-tiny"))``.

    Images are float ``[B,3,H,W]`` in [-1,1] with H = W a multiple of p = ``config.patch_size`` (16 in the
    release); the code grid is h = w = H/p.
    Submodule names equal those of the released checkpoint, so ``state_dict`` keys match it.
    """

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        if not isinstance(config, TokenizerConfig):
            raise ValueError(f"expected a TokenizerConfig, got {type(config).__name__}")
        self.config = config
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.encoder = ViTaminEncoder(config)
        self.quant_proj = build_projection(
            config.quant_proj, config.width, config.vocab_width, config.proj_heads
        )
        self.quantizer = build_quantizer(config)
        self.post_quant_proj = build_projection(
            config.quant_proj, config.vocab_width, config.width, config.proj_heads
        )
        self.decoder = ViTaminDecoder(config)
        self.text_encoder = build_text_tower(config)
        self.fc_norm = nn.LayerNorm(config.width, eps=1e-6)
        self.projection = nn.Linear(config.width, config.embed_dim)
        # The encoder keeps timm's init and the text tower open_clip's; the quantizer initialises itself.
        for module in (self.decoder, self.quant_proj, self.post_quant_proj):
            init_reference_weights(module)

    # ---------------------------------------------------------------------------------------------
    # internal steps shared by the public methods

    def _check_images(self, img_B3HW: torch.Tensor) -> tuple[int, int]:
        patch = self.config.patch_size
        check_images(img_B3HW, square=True, multiple=patch)
        return img_B3HW.shape[2] // patch, img_B3HW.shape[3] // patch

    def _prepare_images(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Checked images on the model's device in its parameter dtype (fp16/bf16/fp64 inputs are converted)."""
        self._check_images(img_B3HW)
        check_pixel_values(img_B3HW)
        return img_B3HW.to(device=self.logit_scale.device, dtype=self.logit_scale.dtype)

    def _maybe_checkpoint(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def _latents(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Encoder then ``quant_proj`` with autocast off -> ``z_BLD`` (not yet quantized)."""
        feats_BLC = self.encoder(img_B3HW).to(self.logit_scale.dtype)
        with torch.autocast(device_type=feats_BLC.device.type, enabled=False):
            return self._maybe_checkpoint(self.quant_proj, feats_BLC)

    def _post_quant(self, vecs_BLD: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=vecs_BLD.device.type, enabled=False):
            return self._maybe_checkpoint(self.post_quant_proj, vecs_BLD.to(self.logit_scale.dtype))

    def _clip_image_features(self, tokens_BLC: torch.Tensor, normalize: bool) -> torch.Tensor:
        features_BE = self.projection(self.fc_norm(tokens_BLC.mean(dim=1)))
        return F.normalize(features_BE, dim=-1) if normalize else features_BE

    def _text_ids(self, texts: TextInput) -> torch.Tensor:
        device = self.logit_scale.device
        if isinstance(texts, torch.Tensor):
            cfg = self.config
            # Checked where the ids will live: on an accelerator the range check is a device-side assert, no sync.
            ids = texts.to(device=device)
            check_text_ids(ids, cfg.text_context_length, cfg.text_vocab_size)
            return ids.to(dtype=torch.long)
        return self.tokenize_text(texts).to(device)

    # ---------------------------------------------------------------------------------------------
    # public API

    @torch.no_grad()
    def encode(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Images ``[B,3,H,W]`` in [-1,1] -> codes ``LongTensor [B,h,w,K]``, h = H/p (no gradient: codes are discrete).

        Raises:
            ValueError: on a wrong shape, a non-float dtype, NaN/Inf pixels or values far outside [-1,1]
                (e.g. 0-255 pixels), each message saying what was expected.
        """
        img_B3HW = self._prepare_images(img_B3HW)
        h, w = (n // self.config.patch_size for n in img_B3HW.shape[2:])
        z_BLD = self._latents(img_B3HW)
        codes_BLK = self.quantizer.quantize(z_BLD)
        return rearrange(codes_BLK, "b (h w) k -> b h w k", h=h, w=w)

    def codes_to_vectors(self, codes_BhwK: torch.Tensor) -> torch.Tensor:
        """Codes ``[B,h,w,K]`` -> the quantized latent vectors ``[B,h,w,D]`` (fp32).

        Any leading shape works (``[..., K] -> [..., D]``, e.g. one position at a time while generating);
        codes must be integers in ``[0, V)``.
        """
        return self.quantizer.codes_to_vectors(codes_BhwK)

    def decode(self, codes_BhwK: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
        """Codes ``[B,h,w,K]`` -> images ``[B,3,16h,16w]`` (fp32) clamped to [-1,1]; autograd only with ``grad=True``."""
        check_codes(codes_BhwK, self.config.num_codebooks, self.config.codebook_size)
        with torch.set_grad_enabled(grad):
            vecs_BhwD = self.quantizer.codes_to_vectors(codes_BhwK.to(self.logit_scale.device))
            h, w = vecs_BhwD.shape[1:3]
            tokens_BLC = self._post_quant(rearrange(vecs_BhwD, "b h w d -> b (h w) d"))
            return self.decoder(tokens_BLC, (h, w)).float().clamp(-1, 1)

    def reconstruct(self, img_B3HW: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
        """``decode(encode(img))``: images ``[B,3,H,W]`` -> reconstructions ``[B,3,H,W]`` in [-1,1]."""
        return self.decode(self.encode(img_B3HW), grad=grad)

    def encode_image(
        self, img_B3HW: torch.Tensor, normalize: bool = True, *, grad: bool = False
    ) -> torch.Tensor:
        """CLIP image embedding ``[B,E]`` of the quantized tokens (the discrete path, as for zero-shot)."""
        codes_BhwK = self.encode(img_B3HW)
        with torch.set_grad_enabled(grad):
            vecs_BLD = rearrange(self.quantizer.codes_to_vectors(codes_BhwK), "b h w d -> b (h w) d")
            return self._clip_image_features(self._post_quant(vecs_BLD), normalize)

    def encode_text(self, texts: TextInput, normalize: bool = True, *, grad: bool = False) -> torch.Tensor:
        """CLIP text embedding ``[B,E]`` of a list of strings or of open_clip ids ``LongTensor [B,T]``."""
        with torch.set_grad_enabled(grad):
            return self._text_features(texts, normalize)

    def _text_features(self, texts: TextInput, normalize: bool) -> torch.Tensor:
        features_BE = self.text_encoder(self._text_ids(texts))
        return F.normalize(features_BE, dim=-1) if normalize else features_BE

    def tokenize_text(self, texts: Sequence[str]) -> torch.Tensor:
        """open_clip BPE ids ``LongTensor [B, text_context_length]`` (on CPU)."""
        return tokenize(texts, self.config.text_context_length)

    def forward(
        self,
        img_B3HW: torch.Tensor,
        texts: TextInput | None = None,
        *,
        recon_batch_size: int | None = None,
    ) -> UniTokOutput:
        """Training forward: reconstruction (straight-through), VQ losses, codes and CLIP features.

        ``recon_batch_size`` decodes only the first that many images (the release's ``vae_bs``) while the
        CLIP branch sees the whole batch.
        """
        h, w = self._check_images(img_B3HW)
        batch = img_B3HW.shape[0]
        num_recon = batch if recon_batch_size is None else recon_batch_size
        if not 0 < num_recon <= batch:
            raise ValueError(f"recon_batch_size must be in [1, {batch}], got {recon_batch_size}")
        quant = self.quantizer(self._latents(img_B3HW))
        tokens_BLC = self._post_quant(quant.quantized)
        recon = self.decoder(tokens_BLC[:num_recon], (h, w)).float()
        return UniTokOutput(
            recon=recon,
            codes=rearrange(quant.codes, "b (h w) k -> b h w k", h=h, w=w),
            vq_loss=quant.loss,
            entropy_loss=quant.entropy_loss,
            usage=quant.usage,
            perplexity=quant.perplexity,
            image_features=self._clip_image_features(tokens_BLC, normalize=True),
            text_features=None if texts is None else self._text_features(texts, normalize=True),
            logit_scale=self.logit_scale.clamp(0, LOGIT_SCALE_MAX).exp(),
        )

    def decoder_last_layer(self) -> nn.Parameter:
        """``decoder.up_conv4.conv2.weight``: the last layer for the adaptive GAN weight."""
        return self.decoder.last_layer()

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Clamp the raw ``logit_scale`` parameter to [0, ln 100] in place (the release does this every step)."""
        self.logit_scale.clamp_(0, LOGIT_SCALE_MAX)

    # ---------------------------------------------------------------------------------------------
    # weights

    def save_pretrained(
        self, directory: str | os.PathLike, *, model_card: bool = False, repo_id: str | None = None
    ) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``directory`` (each file replaced atomically).

        With ``model_card=True`` (as ``push_to_hub`` does) a ``README.md`` model card is written too (Hub
        metadata, sizes, usage, citation; ``repo_id`` names the model in it), unless the folder has one.
        """
        directory = save_directory(directory, self.config, self.state_dict())
        card = directory / MODEL_CARD_NAME
        if model_card and not card.exists():
            num_parameters = sum(p.numel() for p in self.parameters())
            card.write_text(render_model_card(self.config, repo_id, num_parameters), encoding="utf-8")
        return directory

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload UniTok tokenizer",
        create_pr: bool = False,
    ) -> Any:
        """Upload ``save_pretrained`` output (config, weights, model card) to the Hub repository ``repo_id``.

        The repository is created if needed. Returns huggingface_hub's ``CommitInfo``.
        """
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, model_card=True, repo_id=repo_id)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message,
                revision=revision,
                create_pr=create_pr,
            )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        config: TokenizerConfig | None = None,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
    ) -> UniTok:
        """Load our directory format, a released-format ``.pth`` or a Hub repository ``"owner/name"``, strictly.

        ``config`` overrides the architecture read from the checkpoint. Pickles are read with
        ``weights_only=True`` only (a file that needs other classes is refused, naming them).
        A ``path`` that is not a local file or folder but reads as ``owner/name`` is fetched from the Hugging
        Face Hub (our layout, or the released ``unitok_tokenizer.pth``) with ``revision``, ``cache_dir``,
        ``token``, ``force_download`` and ``local_files_only``; ``HF_HUB_OFFLINE=1`` uses the local cache only.
        """
        if is_hub_id(path):
            path = download_checkpoint(
                str(path),
                revision=revision,
                cache_dir=cache_dir,
                token=token,
                force_download=force_download,
                local_files_only=local_files_only,
            )
        path = Path(path)
        if path.is_dir():
            stored_config, state_dict = load_directory(path)
        elif path.is_file():
            args, state_dict = read_release_checkpoint(path)
            stored_config = config or config_from_release_args(args)
        else:
            raise FileNotFoundError(
                f"no UniTok checkpoint at {path} (expected a save_pretrained folder, a .pth file or a Hub id owner/name)"
            )
        model = cls(config or stored_config)
        model.load_state_dict(state_dict, strict=True)
        return model.eval()

    def load_clip_weights(self, path: str | os.PathLike) -> LoadReport:
        """Initialise encoder and text tower from an open_clip ViTamin CLIP checkpoint (non-strict).

        ``visual.trunk.*`` -> ``encoder.*`` (skipping head/pos_embed keys), ``text.*`` -> ``text_encoder.*``.
        Shapes must match. Returns (and logs) the UniTok keys of those two parts left untouched and the
        checkpoint keys that had no place.
        """
        mapped = clip_to_unitok_state_dict(read_state_dict(path))
        result = self.load_state_dict(mapped, strict=False)
        parts = ("encoder.", "text_encoder.")
        # encoder.pos_embed is a frozen zero by design, never loaded from CLIP.
        missing = sorted(
            key for key in result.missing_keys if key.startswith(parts) and key != "encoder.pos_embed"
        )
        unexpected = sorted(result.unexpected_keys)
        logger.info(
            "loaded %d CLIP tensors from %s; %d missing: %s; %d unexpected: %s",
            len(mapped) - len(unexpected),
            path,
            len(missing),
            missing,
            len(unexpected),
            unexpected,
        )
        return LoadReport(missing, unexpected)
