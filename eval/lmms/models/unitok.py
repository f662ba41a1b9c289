"""The ``unitok`` lmms-eval model: a UniTok MLLM checkpoint answering lmms-eval's requests.

``python -m lmms_eval --model unitok --model_args pretrained=DIR[,batch_size=8,dtype=bfloat16] --tasks ...``;
under ``accelerate launch --num_processes N -m lmms_eval ...`` (or ``torchrun``) every process loads the model on
its own GPU and lmms-eval gives each rank its share of the requests (data parallel).

- ``generate_until``: requests are grouped by their generation settings and answered in batches of
  ``batch_size`` through :meth:`UniTokMLLM.answer` (``max_new_tokens``, greedy unless ``do_sample`` /
  ``temperature > 0``, ``top_p``); each answer stops being generated once it holds one of the request's
  ``until`` strings and is cut at the first of them.
- ``loglikelihood``: the log-probability of the continuation's tokens after the same prompt the model answers
  from (the MLLM's prompt template with the image expanded into its code positions), and whether greedy
  decoding would have produced exactly those tokens; batched with right padding.

The prompt is the request's context with ``<image>\\n`` in front when the document has an image and the context
has no ``<image>`` placeholder; documents with more than one image are refused (the MLLM reads one per turn).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm

from unitok.eval.harness import default_device, load_mllm
from unitok.mllm import TokenSequence
from unitok.mllm.sequence import pad_sequences

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128


class UniTokLMMS(lmms):
    """lmms-eval model over :class:`unitok.mllm.UniTokMLLM`.

    Args:
        pretrained: MLLM checkpoint folder (``save_pretrained`` output).
        device: torch device; default ``cuda`` (the local rank's GPU under a launcher) when available, else cpu.
        batch_size: requests per forward.
        dtype: cast the model (``float32``, ``bfloat16``, ``float16``); default: as saved.
        max_new_tokens: answer length when a task does not set one.
        model: an already loaded MLLM instead of ``pretrained`` (for programmatic use).
        max_batch_size: accepted for lmms-eval's command line; batches are exactly ``batch_size``.
        answer_log: a JSON-lines file that every finished batch of generated answers is appended to (one file per
            rank under a multi-process launch); answers already in it are reused, so an interrupted evaluation
            resumes where it stopped. Entries are keyed by the checkpoint (path and weights file time), task,
            document, prompt and generation settings.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        dtype: str | None = None,
        max_new_tokens: int | str = DEFAULT_MAX_NEW_TOKENS,
        model: Any = None,
        max_batch_size: int | None = None,
        answer_log: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            logger.warning("unitok lmms-eval model: ignoring unknown model_args %s", sorted(kwargs))
        # torchrun and accelerate launch both set these; lmms-eval shards the requests by them (and builds its own
        # Accelerator for the gathers).
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        if world_size > 1:
            self._rank, self._world_size = int(os.environ.get("RANK", 0)), world_size
            if device is None and torch.cuda.is_available():
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        device = device or default_device()
        if model is None:
            if pretrained is None:
                raise ValueError(
                    "the unitok lmms-eval model needs model_args pretrained=<MLLM checkpoint folder>"
                )
            model = load_mllm(pretrained, device, dtype)
        self.model = model.to(device).eval()
        self._fingerprint = _checkpoint_fingerprint(pretrained)
        self._log_path = None
        self._logged: dict[str, str] = {}
        if answer_log is not None:
            self._log_path = Path(answer_log if self._world_size == 1 else f"{answer_log}.rank{self._rank}")
            self._logged = read_answer_log(self._log_path)
            if self._logged:
                logger.info("reusing %d answers from %s", len(self._logged), self._log_path)
        self._device = torch.device(device)
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        if self.batch_size_per_gpu < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}"
            )

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return self._device

    @property
    def batch_size(self) -> int:
        """Requests per forward pass."""
        return self.batch_size_per_gpu

    # ------------------------------------------------------------------ request decoding

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _visual(self, doc_to_visual: Any, task: str, split: str, doc_id: int) -> Any:
        """The document's single image (PIL), or None for a text-only document."""
        if doc_to_visual is None:
            return None
        visuals = doc_to_visual(self._doc(task, split, doc_id))
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) > 1:
            raise ValueError(
                f"{task}/{split} document {doc_id} has {len(visuals)} images; the UniTok MLLM reads one image per turn"
            )
        return visuals[0] if visuals else None

    def _prompt(self, context: str, image: Any) -> str:
        placeholder = self.model.config.image_token
        if image is not None and placeholder not in context:
            return f"{placeholder}\n{context}"
        return context

    # ------------------------------------------------------------------ generate_until

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers of generation requests, batched per generation setting, cut at the ``until`` strings."""
        results: list[str | None] = [None] * len(requests)
        keys = [self._key(r) for r in requests]
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            if keys[i] in self._logged:
                results[i] = self._logged[keys[i]]
            else:
                groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
        todo = sum(len(g) for g in groups.values())
        bar = tqdm(total=todo, desc="unitok generate", disable=self.rank != 0)
        for indices in groups.values():
            settings = generation_settings(requests[indices[0]].args[1], self.max_new_tokens)
            until = settings.pop("until")
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                images, prompts = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    image = self._visual(doc_to_visual, task, split, doc_id)
                    images.append(image)
                    prompts.append(self._prompt(context, image))
                answers = self.model.answer(images, prompts, stop=until, **settings)
                for i, text in zip(chunk, answers):
                    results[i] = cut_at_stop(text, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], results[i])
                self._log({keys[i]: results[i] for i in chunk})
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def _key(self, request: Instance) -> str:
        context, gen_kwargs, _, doc_id, task, split = request.args
        payload = [self._fingerprint, task, split, doc_id, context, gen_kwargs]
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def _log(self, answers: dict[str, str]) -> None:
        self._logged.update(answers)
        if self._log_path is None:
            return
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._log_path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps({"key": k, "answer": v}) + "\n" for k, v in answers.items())
            f.flush()
            os.fsync(f.fileno())

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        """Not supported: the tasks this model is evaluated on are single-round."""
        raise NotImplementedError("the unitok lmms-eval model answers single-round requests only")

    # ------------------------------------------------------------------ loglikelihood

    def _continuation_sequence(self, request: Instance) -> tuple[TokenSequence, int]:
        context, target, doc_to_visual, doc_id, task, split = request.args
        continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
        if isinstance(continuation, list):
            continuation = continuation[0]
        image = self._visual(doc_to_visual, task, split, doc_id)
        codes = [] if image is None else [self.model.to_codes(image).cpu()]
        prompt = self.model.builder.understanding_prompt(self._prompt(context, image), codes)
        ids = self.model.text_tokenizer(str(continuation), add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(
                f"{task}/{split} document {doc_id}: the continuation {continuation!r} has no tokens"
            )
        return append_text(prompt, ids), len(ids)

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(log P(continuation | prompt), continuation is the greedy decode)`` per request."""
        out: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), desc="unitok loglikelihood", disable=self.rank != 0)
        for start in range(0, len(requests), self.batch_size):
            chunk = [self._continuation_sequence(r) for r in requests[start : start + self.batch_size]]
            out += continuation_logprobs(self.model, [s for s, _ in chunk], [n for _, n in chunk])
            bar.update(len(chunk))
        bar.close()
        return out


def _checkpoint_fingerprint(pretrained: str | None) -> str:
    """Path and weights time of a checkpoint folder (answers of another checkpoint are never reused)."""
    if pretrained is None:
        return "in-memory"
    path = Path(pretrained).resolve()
    weights = path / "model.safetensors"
    return f"{path}:{weights.stat().st_mtime_ns if weights.exists() else 0}"


def read_answer_log(path: Path) -> dict[str, str]:
    """``{key: answer}`` of an answer log; a torn last line (killed while writing) is skipped."""
    if not path.is_file():
        return {}
    out = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
            out[row["key"]] = row["answer"]
        except (json.JSONDecodeError, KeyError, TypeError):
            logger.warning("%s:%d: skipping an unreadable answer log line", path, lineno)
    return out


def generation_settings(gen_kwargs: dict, default_max_new_tokens: int) -> dict:
    """lmms-eval generation kwargs -> ``UniTokMLLM.answer`` kwargs plus ``until`` (list of stop strings)."""
    gen = dict(gen_kwargs or {})
    until = gen.get("until") or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, list) or not all(isinstance(s, str) for s in until):
        raise ValueError(f"'until' must be a string or a list of strings, got {until!r}")
    if int(gen.get("num_beams") or 1) > 1:
        logger.warning("num_beams=%s is not supported; decoding greedily / by sampling", gen["num_beams"])
    temperature = float(gen.get("temperature") or 0.0)
    sample = bool(gen.get("do_sample", temperature > 0)) and temperature > 0
    return {
        "max_new_tokens": int(gen.get("max_new_tokens") or default_max_new_tokens),
        "temperature": temperature if sample else 0.0,
        "top_p": float(gen.get("top_p") or 1.0),
        "until": [s for s in until if s],
    }


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    end = min((i for s in until if (i := text.find(s)) >= 0), default=len(text))
    return text[:end]


def append_text(seq: TokenSequence, ids: list[int]) -> TokenSequence:
    """``seq`` followed by unsupervised text tokens ``ids``."""
    n, k = len(ids), seq.codes.shape[1]
    return TokenSequence(
        input_ids=torch.cat([seq.input_ids, torch.tensor(ids, dtype=torch.long)]),
        labels=torch.cat([seq.labels, torch.full((n,), -100, dtype=torch.long)]),
        visual_mask=torch.cat([seq.visual_mask, torch.zeros(n, dtype=torch.bool)]),
        code_mask=torch.cat([seq.code_mask, torch.zeros(n, dtype=torch.bool)]),
        codes=torch.cat([seq.codes, torch.zeros(n, k, dtype=torch.long)]),
    )


@torch.no_grad()
def continuation_logprobs(
    model: Any, seqs: list[TokenSequence], lengths: list[int]
) -> list[tuple[float, bool]]:
    """Log-probability of the last ``lengths[i]`` tokens of each sequence given what precedes them, and greediness."""
    batch = pad_sequences(seqs, model.builder.ids.pad, side="right").to(model.device)
    embeds = model.embed(batch.input_ids, batch.visual_mask, batch.codes)
    logits = model.llm(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits.float()
    out = []
    for row, (seq, n) in enumerate(zip(seqs, lengths)):
        end = len(seq)
        # Position t predicts token t+1: the continuation's tokens are predicted at end-n-1 .. end-2.
        step_logits = logits[row, end - n - 1 : end - 1]
        targets = batch.input_ids[row, end - n : end]
        logprob = F.log_softmax(step_logits, dim=-1).gather(-1, targets[:, None]).sum()
        out.append((float(logprob), bool((step_logits.argmax(dim=-1) == targets).all())))
    return out
