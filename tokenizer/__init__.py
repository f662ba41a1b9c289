"""UniTok: a unified visual tokenizer (ViTamin encoder, multi-codebook quantizer, ViTamin decoder, CLIP text tower).

    from unitok.tokenizer import UniTok, TokenizerConfig
    tok = UniTok(TokenizerConfig.preset("unitok-tiny"))
    codes_BhwK = tok.encode(img_B3HW)      # img in [-1,1] -> LongTensor [B, H/16, W/16, K] (patch_size 16)
    img_B3HW = tok.decode(codes_BhwK)      # -> [B,3,H,W] in [-1,1]

Shape legend: see ``unitok.tokenizer.quantizer``.
"""

from .config import PRESETS, TokenizerConfig
from .model import LoadReport, UniTok, UniTokOutput
from .quantizer import MultiCodebookQuantizer, QuantizerOutput, ResidualQuantizer

__all__ = [
    "PRESETS",
    "LoadReport",
    "MultiCodebookQuantizer",
    "QuantizerOutput",
    "ResidualQuantizer",
    "TokenizerConfig",
    "UniTok",
    "UniTokOutput",
]
