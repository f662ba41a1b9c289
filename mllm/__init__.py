"""unitok.mllm: the unified multimodal LLM (UniTok codes in and out of a causal LLM).

Usage (``batch`` from :class:`MLLMCollator`)::

>>> model = UniTokMLLM.from_config(MLLMConfig.preset("llama2-7b"))
>>> out = model(batch)  # out.loss, out.text_loss, out.code_loss
>>> gen = model.generate_images(["a red circle"], cfg_scale=3.0, seed=0)  # gen.codes [B,h,w,K], gen.images
>>> model.answer(image, "What colour is the shape?")  # -> ["red"]
>>> model.chat([{"role": "user", "content": "What colour is the shape?"}], image)  # -> "red"

The released UniTok MLLM (its Hugging Face folder) loads with
``UniTokMLLM.from_pretrained(folder, unitok="unitok_tokenizer.pth")``; ``MLLMConfig.preset("unitok-mllm-7b")``
describes it and ``SAMPLING_PRESETS`` holds its sampling settings.
"""

from .config import MLLM_PRESETS, SAMPLING_PRESETS, MLLMConfig
from .depth_head import DepthHead, LlamaDepthHead
from .generation import GeneratedImages, sample_logits
from .model import MLLMOutput, UniTokMLLM
from .projector import CausalAttnMerger, MergerCache, VisualProjector
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
    "SAMPLING_PRESETS",
    "CausalAttnMerger",
    "DepthHead",
    "GeneratedImages",
    "GenerationSample",
    "LlamaDepthHead",
    "MLLMBatch",
    "MLLMCollator",
    "MLLMConfig",
    "MLLMOutput",
    "MergerCache",
    "SequenceBuilder",
    "TextSample",
    "TokenSequence",
    "UnderstandingSample",
    "UniTokMLLM",
    "VisualProjector",
    "build_tiny_tokenizer",
    "sample_logits",
]
