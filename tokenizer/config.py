"""Typed configuration of the UniTok tokenizer and the one table of named model sizes.

``TokenizerConfig()`` with no arguments is the released model (``unitok-large``: ViTamin-L, 256 px,
8 sub-codebooks x 4096 entries x 8 dims). ``TokenizerConfig.preset(name)`` returns a named size from
``PRESETS``; the command line offers ``PRESETS`` keys as choices.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

# open_clip's BPE tokenizer (what ``UniTok.tokenize_text`` uses) has exactly this many ids; the
# end-of-text id 49407 must be the largest one because the text tower pools at ``argmax(ids)``.
OPEN_CLIP_VOCAB_SIZE = 49408

QUANTIZER_KINDS = ("mcq", "rq")
PROJECTION_KINDS = ("attn", "linear")
UPSAMPLE_KINDS = ("transposed", "nearest_conv")
PATCH_SIZES = (16, 8)

# Parts whose activations can be recomputed in the backward pass instead of kept (activation
# checkpointing), each switched on separately: the encoder's conv front-end (stem + MbConv stages), the
# encoder's ViT blocks, the decoder's ViT blocks, the decoder's conv upsampler and the CLIP text tower.
CHECKPOINT_PARTS = ("encoder_front", "encoder_blocks", "decoder_blocks", "upsampler", "text")

# Named sets of checkpointed parts for UniTok-Large at 256 px, bf16, 64 images per GPU (the release recipe),
# from ``unitok bench train-step --sections memory`` (BENCHMARKS.md): with nothing recomputed a step keeps
# ~1.24 GiB of activations per image (81 GiB peak at 64 with the gradients) next to ~9 GiB of weights and
# AdamW state and the LPIPS/DINO activations, which fits 141 GB but not 80 GB. Recomputing a part costs one more forward of
# it, so the 80 GB set takes the parts that give back the most memory per recomputed FLOP: the conv
# front-end (0.16 GiB per image for 23 GFLOP) and the upsampler (0.39 GiB for 171 GFLOP), about +7% FLOPs.
# The ViT blocks (0.32 GiB for 175 GFLOP each tower) and the text tower come next ("all").
CHECKPOINT_PRESETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "gpu-141gb": (),
    "gpu-80gb": ("encoder_front", "upsampler"),
    "all": CHECKPOINT_PARTS,
}


@dataclass(frozen=True)
class TokenizerConfig:
    """Every size of a UniTok tokenizer. Defaults are the released UniTok-Large.

    Shapes: an image ``[B,3,image_size,image_size]`` becomes ``L = (image_size/patch_size)**2`` encoder tokens
    of width ``C = width``, projected to ``D = vocab_width`` and quantized into ``K = num_codebooks``
    codes per position, each indexing ``V = vocab_size // K`` entries of ``D // K`` dims (MCQ).
    """

    image_size: int = 256
    # Pixels per code position along a side: 16 (the release: stem, two MbConv stages and the strided conv
    # each halve the image) or 8 (the last conv keeps its stride at 1 and the decoder's first upsampler is a
    # plain 3x3 conv; same parameters). 8 gives small images a 4x finer code grid.
    patch_size: int = 16
    # Encoder: ViTamin conv front-end (stem /2, two MbConv stages /2 each, strided conv /2) + ViT blocks.
    stem_width: int = 160
    stage_widths: tuple[int, int] = (160, 320)
    stage_depths: tuple[int, int] = (2, 4)
    width: int = 1024
    depth: int = 31
    num_heads: int = 16
    mlp_ratio: float = 2.0
    drop_path: float = 0.1
    # Decoder: ``decoder_depth`` ViT blocks of the encoder's width, then x2 conv upsamplers:
    # width -> upsampler_widths[0] (up_conv1, up_conv2) -> upsampler_widths[1] (up_conv3) -> 3 (up_conv4).
    decoder_depth: int = 31
    upsampler_widths: tuple[int, int] = (320, 160)
    upsampler_depths: tuple[int, int] = (4, 2)
    # Quantizer and the projections around it.
    quantizer: str = "mcq"
    num_codebooks: int = 8
    vocab_size: int = 32768
    vocab_width: int = 64
    beta: float = 0.25
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01
    quant_proj: str = "attn"
    proj_heads: int = 16
    # CLIP text tower (open_clip TextTransformer) and the shared embedding width.
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_context_length: int = 77
    text_vocab_size: int = OPEN_CLIP_VOCAB_SIZE
    embed_dim: int = 768
    # Execution choices that leave the weights, the state-dict keys and (up to float rounding) the outputs
    # unchanged. ``grad_checkpointing`` recomputes every part (the release's switch); ``checkpoint_parts``
    # names a subset of ``CHECKPOINT_PARTS`` or one ``CHECKPOINT_PRESETS`` key. ``upsample`` "transposed"
    # runs each nearest-x2 + 3x3 conv of the decoder as the equal stride-2 4x4 transposed conv (2.25x fewer
    # FLOPs); "nearest_conv" runs it literally. ``channels_last`` keeps the conv parts' activations NHWC.
    grad_checkpointing: bool = False
    checkpoint_parts: tuple[str, ...] = ()
    upsample: str = "transposed"
    channels_last: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.checkpoint_parts, str):
            if self.checkpoint_parts not in CHECKPOINT_PRESETS:
                raise ValueError(
                    f"checkpoint_parts must be a tuple of parts {CHECKPOINT_PARTS} or a preset name "
                    f"{sorted(CHECKPOINT_PRESETS)}, got {self.checkpoint_parts!r}"
                )
            object.__setattr__(self, "checkpoint_parts", CHECKPOINT_PRESETS[self.checkpoint_parts])
        for name in (
            "stage_widths",
            "stage_depths",
            "upsampler_widths",
            "upsampler_depths",
            "checkpoint_parts",
        ):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        self._validate()

    def checkpoints(self, part: str) -> bool:
        """Whether the activations of ``part`` (one of ``CHECKPOINT_PARTS``) are recomputed in backward."""
        if part not in CHECKPOINT_PARTS:
            raise ValueError(f"unknown checkpoint part {part!r}; parts are {CHECKPOINT_PARTS}")
        return self.grad_checkpointing or part in self.checkpoint_parts

    def _validate(self) -> None:
        _require_positive_ints(
            self,
            (
                "image_size",
                "stem_width",
                "width",
                "depth",
                "num_heads",
                "decoder_depth",
                "num_codebooks",
                "vocab_size",
                "vocab_width",
                "text_width",
                "text_layers",
                "text_heads",
                "text_context_length",
                "text_vocab_size",
                "embed_dim",
            ),
        )
        for name in ("stage_widths", "stage_depths", "upsampler_widths", "upsampler_depths"):
            value = getattr(self, name)
            if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
                raise ValueError(
                    f"{name} must be two positive ints (a stride-2 block opens each stage), got {value}"
                )
        if self.patch_size not in PATCH_SIZES:
            raise ValueError(f"patch_size must be one of {PATCH_SIZES}, got {self.patch_size!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size must be a multiple of patch_size ({self.patch_size}: the encoder downsamples "
                f"{self.patch_size}x), got {self.image_size}"
            )
        if self.width % self.num_heads:
            raise ValueError(f"width ({self.width}) must be divisible by num_heads ({self.num_heads})")
        if self.text_width % self.text_heads:
            raise ValueError(
                f"text_width ({self.text_width}) must be divisible by text_heads ({self.text_heads})"
            )
        if self.vocab_size % self.num_codebooks:
            raise ValueError(
                f"vocab_size ({self.vocab_size}) must be divisible by num_codebooks ({self.num_codebooks})"
            )
        if self.vocab_width % self.num_codebooks:
            raise ValueError(
                f"vocab_width ({self.vocab_width}) must be divisible by num_codebooks ({self.num_codebooks})"
            )
        if self.quantizer not in QUANTIZER_KINDS:
            raise ValueError(f"quantizer must be one of {QUANTIZER_KINDS}, got {self.quantizer!r}")
        if self.quant_proj not in PROJECTION_KINDS:
            raise ValueError(f"quant_proj must be one of {PROJECTION_KINDS}, got {self.quant_proj!r}")
        if not isinstance(self.proj_heads, int) or self.proj_heads <= 0:
            raise ValueError(f"proj_heads must be a positive int, got {self.proj_heads!r}")
        proj_dim = max(self.width, self.vocab_width)
        if self.quant_proj == "attn" and proj_dim % self.proj_heads:
            raise ValueError(
                f"max(width, vocab_width) = {proj_dim} must be divisible by proj_heads ({self.proj_heads})"
            )
        if self.text_vocab_size != OPEN_CLIP_VOCAB_SIZE:
            raise ValueError(
                f"text_vocab_size must be {OPEN_CLIP_VOCAB_SIZE} (the open_clip BPE tokenizer), "
                f"got {self.text_vocab_size}"
            )
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.beta < 0 or self.entropy_weight < 0:
            raise ValueError(f"beta and entropy_weight must be >= 0, got {self.beta}, {self.entropy_weight}")
        if not self.entropy_temperature > 0:
            raise ValueError(f"entropy_temperature must be > 0, got {self.entropy_temperature}")
        unknown_parts = [part for part in self.checkpoint_parts if part not in CHECKPOINT_PARTS]
        if unknown_parts:
            raise ValueError(
                f"unknown checkpoint_parts {unknown_parts}; choose from {CHECKPOINT_PARTS} or a preset "
                f"name {sorted(CHECKPOINT_PRESETS)}"
            )
        if self.upsample not in UPSAMPLE_KINDS:
            raise ValueError(f"upsample must be one of {UPSAMPLE_KINDS}, got {self.upsample!r}")
        for name in ("grad_checkpointing", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def codebook_size(self) -> int:
        """V: entries per sub-codebook (``vocab_size // num_codebooks``)."""
        return self.vocab_size // self.num_codebooks

    @property
    def code_dim(self) -> int:
        """Width of one sub-code vector (``vocab_width // num_codebooks``)."""
        return self.vocab_width // self.num_codebooks

    @property
    def grid_size(self) -> int:
        """h = w: positions per side of the code grid at ``image_size``."""
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (tuples become lists)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerConfig:
        """Inverse of ``to_dict``; unknown keys raise ValueError, missing keys take the defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TokenizerConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TokenizerConfig:
        """The named size ``name`` from ``PRESETS``, with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown tokenizer preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def _require_positive_ints(config: TokenizerConfig, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


# The one table of named sizes. unitok-large is the release (FoundationVision/unitok_tokenizer);
# unitok-base uses ViTamin-B (its decoder widths from the reference ViTaminDecoder, its text tower that of
# open_clip ViTamin-B so CLIP weights can initialise it); unitok-tiny trains on CPU in minutes at 64 px.
PRESETS: dict[str, dict[str, Any]] = {
    "unitok-large": dict(
        image_size=256,
        stem_width=160,
        stage_widths=(160, 320),
        stage_depths=(2, 4),
        width=1024,
        depth=31,
        num_heads=16,
        mlp_ratio=2.0,
        drop_path=0.1,
        decoder_depth=31,
        upsampler_widths=(320, 160),
        upsampler_depths=(4, 2),
        num_codebooks=8,
        vocab_size=32768,
        vocab_width=64,
        proj_heads=16,
        text_width=768,
        text_layers=12,
        text_heads=12,
        text_context_length=77,
        embed_dim=768,
    ),
    "unitok-base": dict(
        image_size=256,
        stem_width=128,
        stage_widths=(128, 256),
        stage_depths=(2, 4),
        width=768,
        depth=14,
        num_heads=12,
        mlp_ratio=2.0,
        drop_path=0.1,
        decoder_depth=14,
        upsampler_widths=(256, 128),
        upsampler_depths=(4, 2),
        num_codebooks=8,
        vocab_size=32768,
        vocab_width=64,
        proj_heads=12,
        text_width=512,
        text_layers=12,
        text_heads=8,
        text_context_length=77,
        embed_dim=512,
    ),
    "unitok-tiny": dict(
        image_size=64,
        stem_width=16,
        stage_widths=(16, 32),
        stage_depths=(1, 1),
        width=128,
        depth=2,
        num_heads=4,
        mlp_ratio=2.0,
        drop_path=0.0,
        decoder_depth=2,
        upsampler_widths=(32, 16),
        upsampler_depths=(1, 1),
        num_codebooks=8,
        vocab_size=2048,
        vocab_width=32,
        proj_heads=4,
        text_width=64,
        text_layers=2,
        text_heads=4,
        text_context_length=77,
        embed_dim=64,
    ),
}
