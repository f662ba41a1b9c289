"""unitok.mllm: the unified multimodal LLM (UniTok codes in and out of a causal LLM).

Usage (``batch`` from :class:`MLLMCollator`)::

>>> model = UniTokMLLM.from_config(MLLMConfig.preset("llama2-7b"))
>>> out = model(batch)  # out.loss, out.text_loss, out.code_loss
>>> gen = model.generate_images(["a red circle"], cfg_scale=3.0, seed=0)  # gen.codes [B,h,w,K], gen.images
>>> model.answer(image, "What colour is the shape?")  # -> ["red"]
"""

from .config import MLLM_PRESETS, MLLMConfig
from .depth_head import DepthHead
from .generation import GeneratedImages, sample_logits
from .model import MLLMOutput, UniTokMLLM
from .projector import VisualProjector
from .sequence import (
    GenerationSample,
    MLLMBatch,
    MLLMCollator,
    SequenceBuilder,
    TextSample,
    TokenSequence,
    UnderstandingSample,
)
from .text_tokenizer import build_tiny_tokenizer

__all__ = [
    "MLLM_PRESETS",
    "DepthHead",
    "GeneratedImages",
    "GenerationSample",
    "MLLMBatch",
    "MLLMCollator",
    "MLLMConfig",
    "MLLMOutput",
    "SequenceBuilder",
    "TextSample",
    "TokenSequence",
    "UnderstandingSample",
    "UniTokMLLM",
    "VisualProjector",
    "build_tiny_tokenizer",
    "sample_logits",
]
