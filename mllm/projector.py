"""Visual input of the MLLM: the K code vectors of one position -> one LLM input embedding.

Shape legend: B batch, L positions, D UniTok latent width (K sub-codes concatenated), H LLM hidden size.

The projector works per position on purpose: an input merger that attends across positions sees the
whole image prefix in training but only the newest position under a KV cache.
"""

from __future__ import annotations

import torch
from torch import nn


class VisualProjector(nn.Module):
    """LayerNorm(D) -> Linear(D, P) -> GELU -> Linear(P, H), applied to every position independently.

    Args:
        code_width: D, the width of one position's concatenated UniTok code vectors.
        llm_hidden: H, the LLM's input embedding width.
        hidden: P, the MLP's inner width (the LLM hidden size when ``None``).
    """

    def __init__(self, code_width: int, llm_hidden: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = llm_hidden if hidden is None else hidden
        self.norm = nn.LayerNorm(code_width)
        self.fc1 = nn.Linear(code_width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, llm_hidden)

    def forward(self, vecs_D: torch.Tensor) -> torch.Tensor:
        """Map code vectors ``[..., D]`` to LLM input embeddings ``[..., H]`` (any leading shape)."""
        return self.fc2(self.act(self.fc1(self.norm(vecs_D))))
