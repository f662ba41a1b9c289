"""Configuration of the unified multimodal LLM (saved as ``config.json`` inside every checkpoint).

One table, ``MLLM_PRESETS``, names the model sizes: ``llama2-7b`` (the paper's setting with the per-position
projector), ``unitok-mllm-7b`` (the released UniTok MLLM: causal attention merger, Llama-layer depth head,
vicuna_v1 prompts, Llama vocabulary not extended) and ``tiny`` (random-init CPU tests and the quick start).
One more table, ``SAMPLING_PRESETS``, names the released models' sampling settings.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

LLM_DTYPES = ("float32", "bfloat16", "float16")
LOSS_WEIGHTINGS = ("mean", "token_count")
PROJECTORS = ("mlp", "causal_attn", "window")
DEPTH_HEADS = ("transformer", "llama")
CONVERSATIONS = ("unitok", "vicuna_v1")
IMAGE_RESIZES = ("crop", "pad")
# The built-in word-level text tokenizer (no download): ``text_tokenizer="builtin:tiny"``.
BUILTIN_TINY_TOKENIZER = "builtin:tiny"


@dataclass
class MLLMConfig:
    """Everything needed to rebuild a :class:`~unitok.mllm.model.UniTokMLLM`.

    Attributes:
        llm: Hugging Face path or hub id of a causal LM, or an inline dict of ``transformers.LlamaConfig``
            fields for tiny random-init models (``vocab_size`` and the special token ids are then taken from
            the text tokenizer). A relative path inside a saved checkpoint resolves against that checkpoint.
        unitok: path of a UniTok checkpoint (directory or released ``.pth``); relative paths resolve like ``llm``.
        unitok_preset: a ``TokenizerConfig`` preset name giving a random-init UniTok instead (tests, quick start).
            Exactly one of ``unitok`` / ``unitok_preset`` is set.
        text_tokenizer: path or hub id of the text tokenizer; ``None`` means "the same as ``llm``" (needs a str ``llm``).
        llm_dtype: dtype the pretrained LLM weights are loaded in.
        projector_hidden: hidden width H of the projector MLP (LayerNorm, Linear D->H, GELU, Linear H->hidden);
            ``None`` means the LLM hidden size.
        depth_layers, depth_heads, depth_width, depth_mlp_ratio: size of the depth head, a small causal transformer
            over the K sub-codes of one visual position.
        boi_token, eoi_token, image_token: special tokens added to the text tokenizer. ``<image>`` is the placeholder
            a prompt uses for an input image; ``<boi>``/``<eoi>`` bracket the visual positions.
        system_prompt: text put before the first turn of every sequence.
        prompt_template: how one user turn is written; must contain ``{prompt}``. The answer (text, or
            ``<boi>`` + codes + ``<eoi>``) follows it directly.
        uncond_prompt: the user text of the unconditional prompt used for classifier-free guidance.
        code_loss_weight: lambda on the code loss (see ``loss_weighting``).
        loss_weighting: how the text and code losses combine. ``"mean"``: ``text CE + lambda * code loss``, each a
            mean over its own targets. ``"token_count"`` (the released model's training): the two means weighted by
            their target counts, ``(n_text * text CE + lambda * n_code * code loss) / (n_text + n_code)``, where
            ``n_code`` counts every sub-code (K per visual position) and ``n_text`` the supervised text tokens.
        z_loss_weight: weight of the z-loss on the depth head's logits, ``mean over sub-codes of max_logit^2``,
            added to the code loss (the released model trains with 5e-5; 0 = off).
        projector: the visual input merger. ``"mlp"``: a per-position MLP on the K concatenated code vectors.
            ``"causal_attn"``: the released merger, the MLLM's own copy of the K codebooks, an attention projection
            (UniTok's ``post_quant_proj`` layout, causal over the positions of one image, with its own KV cache
            when generating) to ``projector_attn_width``, then LayerNorm -> Linear -> GELU -> Linear.
            ``"window"``: the same MLP over a causal window of the code grid, the position and its earlier
            neighbours (``projector_window`` rows above, as many columns to each side; see
            :class:`~unitok.mllm.projector.WindowProjector`), so that each visual token carries the local 2-D layout.
        projector_attn_width, projector_attn_heads: width and heads of the ``causal_attn`` attention projection.
        projector_window: reach of the ``window`` projector in code positions (1: a masked 3x3 neighbourhood).
        depth_head: ``"transformer"``: a small transformer of its own width (``depth_*``). ``"llama"``: the released
            head, ``depth_layers`` Llama decoder layers built from the LLM's own config, an RMSNorm, one output layer
            (with bias) shared by all K sub-codes, and K-1 code embeddings of the LLM width.
        conversation: prompt layout. ``"unitok"``: ``system_prompt`` + ``prompt_template`` turns, each image bracketed
            by ``<boi>``/``<eoi>``. ``"vicuna_v1"``: the released model's ``"<system> USER: <image>\n<q> ASSISTANT:"``
            with answers closed by ``</s>``, images with no markers around them, and text-to-image prompts without a
            template (``[bos] prompt + t2i_suffix <boi>``; the unconditional row is ``uncond_prompt + <boi>``).
        t2i_suffix: text appended to every text-to-image prompt (the release: " Generate an image based on this
            description.").
        extend_vocab: add ``<boi>``/``<eoi>``/``<image>`` to the text vocabulary (and resize the LLM). ``False``: the
            released layout, where boi/eoi are existing tokens (Llama's byte tokens ``<0x00>``/``<0x01>``) and
            ``<image>`` is only a placeholder in prompt text.
        image_resize: how an input image becomes square: ``"crop"`` (short side resized, centre crop) or ``"pad"``
            (the release: padded to a square with grey, LLaVA's ``expand2square``, then resized).
        cfg_dropout: fraction of text->image training samples whose prompt is replaced by ``uncond_prompt``.
        max_length: longest training sequence in tokens (visual positions included).
        lora_r: LoRA rank; 0 trains the LLM fully. With LoRA the projector, the depth head and the rows of the
            new special tokens (input embedding and output head, when ``lora_train_new_tokens``) stay trainable.
        lora_alpha, lora_dropout, lora_target_modules: passed to ``peft.LoraConfig``.
    """

    llm: str | dict[str, Any]
    unitok: str | None = None
    unitok_preset: str | None = None
    text_tokenizer: str | None = None
    llm_dtype: str = "float32"
    projector_hidden: int | None = None
    depth_layers: int = 3
    depth_heads: int = 16
    depth_width: int = 1024
    depth_mlp_ratio: float = 4.0
    boi_token: str = "<boi>"
    eoi_token: str = "<eoi>"
    image_token: str = "<image>"
    system_prompt: str = ""
    prompt_template: str = "USER: {prompt} ASSISTANT:"
    uncond_prompt: str = ""
    code_loss_weight: float = 1.0
    loss_weighting: str = "mean"
    z_loss_weight: float = 0.0
    projector: str = "mlp"
    projector_attn_width: int = 1024
    projector_attn_heads: int = 16
    projector_window: int = 1
    depth_head: str = "transformer"
    conversation: str = "unitok"
    t2i_suffix: str = ""
    extend_vocab: bool = True
    image_resize: str = "crop"
    cfg_dropout: float = 0.1
    max_length: int = 2048
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: str | list[str] = "all-linear"
    lora_train_new_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.llm, str):
            if not self.llm:
                raise ValueError(
                    "llm must be a Hugging Face path / hub id or a dict of LlamaConfig fields, got ''"
                )
        elif not isinstance(self.llm, dict) or "hidden_size" not in self.llm:
            raise ValueError(
                f"an inline llm must be a dict of LlamaConfig fields with 'hidden_size', got {self.llm!r}"
            )
        elif self.text_tokenizer is None:
            raise ValueError(
                "an inline llm config needs text_tokenizer (a tokenizer path), since there is no llm path"
            )
        if (self.unitok is None) == (self.unitok_preset is None):
            raise ValueError(
                f"set exactly one of unitok (checkpoint path) and unitok_preset (preset name), "
                f"got unitok={self.unitok!r}, unitok_preset={self.unitok_preset!r}"
            )
        if self.llm_dtype not in LLM_DTYPES:
            raise ValueError(f"llm_dtype must be one of {LLM_DTYPES}, got {self.llm_dtype!r}")
        for name in ("depth_layers", "depth_heads", "depth_width", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.depth_width % self.depth_heads:
            raise ValueError(
                f"depth_width ({self.depth_width}) must be a multiple of depth_heads ({self.depth_heads})"
            )
        if self.projector_hidden is not None and self.projector_hidden < 1:
            raise ValueError(f"projector_hidden must be >= 1 or None, got {self.projector_hidden}")
        if self.depth_mlp_ratio <= 0:
            raise ValueError(f"depth_mlp_ratio must be > 0, got {self.depth_mlp_ratio}")
        tokens = (self.boi_token, self.eoi_token, self.image_token)
        if not all(tokens) or len(set(tokens)) != 3:
            raise ValueError(f"boi/eoi/image tokens must be three distinct non-empty strings, got {tokens}")
        if self.prompt_template.count("{prompt}") != 1:
            raise ValueError(f"prompt_template must contain '{{prompt}}' once, got {self.prompt_template!r}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        if self.code_loss_weight < 0:
            raise ValueError(f"code_loss_weight must be >= 0, got {self.code_loss_weight}")
        choices = (
            ("loss_weighting", LOSS_WEIGHTINGS),
            ("projector", PROJECTORS),
            ("depth_head", DEPTH_HEADS),
            ("conversation", CONVERSATIONS),
            ("image_resize", IMAGE_RESIZES),
        )
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.extend_vocab and self.conversation != "vicuna_v1":
            raise ValueError(
                "extend_vocab=False (no <image> token) needs conversation='vicuna_v1', whose prompts place images "
                f"by the placeholder text; got conversation={self.conversation!r}"
            )
        if not (math.isfinite(self.z_loss_weight) and self.z_loss_weight >= 0):
            raise ValueError(f"z_loss_weight must be a finite number >= 0, got {self.z_loss_weight}")
        if not math.isfinite(self.code_loss_weight):
            raise ValueError(f"code_loss_weight must be finite, got {self.code_loss_weight}")
        if (
            isinstance(self.projector_window, bool)
            or not isinstance(self.projector_window, int)
            or self.projector_window < 1
        ):
            raise ValueError(f"projector_window must be an integer >= 1, got {self.projector_window!r}")
        if self.projector_attn_width < 1 or self.projector_attn_heads < 1:
            raise ValueError(
                f"projector_attn_width and projector_attn_heads must be >= 1, got "
                f"{self.projector_attn_width}, {self.projector_attn_heads}"
            )
        if self.projector_attn_width % self.projector_attn_heads:
            raise ValueError(
                f"projector_attn_width ({self.projector_attn_width}) must be a multiple of "
                f"projector_attn_heads ({self.projector_attn_heads})"
            )
        if self.lora_r < 0 or self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(
                f"expected lora_r >= 0, lora_alpha > 0, 0 <= lora_dropout < 1, got "
                f"{self.lora_r}, {self.lora_alpha}, {self.lora_dropout}"
            )

    @property
    def use_lora(self) -> bool:
        """Whether the LLM is trained through a LoRA adapter."""
        return self.lora_r > 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy of the fields."""
        return copy.deepcopy(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MLLMConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MLLMConfig fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**copy.deepcopy(d))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MLLMConfig:
        """The named preset of ``MLLM_PRESETS`` with ``overrides`` applied."""
        if name not in MLLM_PRESETS:
            raise ValueError(f"unknown MLLM preset {name!r}; expected one of {sorted(MLLM_PRESETS)}")
        return cls.from_dict({**copy.deepcopy(MLLM_PRESETS[name]), **overrides})

    def replace(self, **changes: Any) -> MLLMConfig:
        """A validated copy with some fields changed."""
        return MLLMConfig.from_dict({**self.to_dict(), **changes})


# Llama-2-7B: hidden 4096, 32 layers, 32 heads, FFN 11008, vocab 32000. The depth head works at width 1024
# behind a 4096 -> 1024 input projection: 4 layers, ~0.12B parameters (vs ~0.74B for the reference head
# of three full-width Llama layers); see BENCHMARKS.md for the exact counts.
LLAMA2_7B: dict[str, Any] = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

MLLM_PRESETS: dict[str, dict[str, Any]] = {
    "llama2-7b": {
        "llm": "meta-llama/Llama-2-7b-hf",
        "unitok": "unitok_tokenizer.pth",
        "llm_dtype": "bfloat16",
        "depth_layers": 4,
        "depth_heads": 16,
        "depth_width": 1024,
        "lora_r": 0,
    },
    # The released UniTok MLLM (Llama-2-7B inside): weights from its Hugging Face folder with
    # ``UniTokMLLM.from_pretrained(folder, unitok=...)``; this preset names the architecture and the prompt formats.
    "unitok-mllm-7b": {
        "llm": {**LLAMA2_7B},
        "unitok": "unitok_tokenizer.pth",
        "text_tokenizer": "meta-llama/Llama-2-7b-hf",
        "llm_dtype": "bfloat16",
        "projector": "causal_attn",
        "projector_attn_width": 1024,
        "projector_attn_heads": 16,
        "depth_head": "llama",
        "depth_layers": 3,
        "boi_token": "<0x00>",
        "eoi_token": "<0x01>",
        "extend_vocab": False,
        "conversation": "vicuna_v1",
        "system_prompt": VICUNA_SYSTEM,
        "prompt_template": "USER: {prompt} ASSISTANT:",
        "t2i_suffix": " Generate an image based on this description.",
        "uncond_prompt": "<unconditional>",
        "image_resize": "pad",
        "loss_weighting": "token_count",
        "z_loss_weight": 5e-5,
        "cfg_dropout": 0.1,
        "max_length": 2048,
        "lora_r": 0,
    },
    "tiny": {
        "llm": {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "intermediate_size": 176,
            "max_position_embeddings": 2048,
        },
        "unitok_preset": "unitok-tiny",
        "text_tokenizer": BUILTIN_TINY_TOKENIZER,
        "depth_layers": 2,
        "depth_heads": 4,
        "depth_width": 64,
        "max_length": 1024,
        "lora_r": 0,
    },
}


# Sampling settings of the released model's scripts, by name: ``model.generate_images(p, **SAMPLING_PRESETS[name])``.
SAMPLING_PRESETS: dict[str, dict[str, float | int]] = {
    # The text-to-image script's argument defaults.
    "release-default": {"cfg_scale": 5.0, "temperature": 0.9, "top_k": 2048, "top_p": 0.96},
    # The released GenAI-Bench / MJHQ generation scripts.
    "release-genai": {"cfg_scale": 7.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0},
    # Understanding (VQA) is greedy.
    "release-vqa": {"temperature": 0.0, "top_p": 1.0},
}
