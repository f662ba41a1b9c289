"""Vector quantizers of the UniTok latent: the multi-codebook quantizer (MCQ) and a residual baseline (RQ).

Shape legend (written once here, used in tensor names throughout ``unitok.tokenizer``):

    B  batch                       L  positions (tokens)          h, w  token grid (L = h * w)
    H, W  image height, width      C  channels                    E  CLIP embedding width
    D  latent width (= K * d)      K  sub-codebooks (MCQ) / levels (RQ)
    V  entries per sub-codebook    d  code width of one sub-codebook (= D // K)
    N  all leading dimensions of an input flattened together (e.g. N = B * L)

Both quantizers take ``z [..., D]`` with any leading dimensions and return codes ``[..., K]`` (int64, values in
``[0, V)``). All sub-codebooks live in ONE parameter ``codebook [K, V, width]`` and are searched by one batched
matmul; the state dict still uses the per-codebook key names of the released checkpoint
(``codebooks.{i}.codebook.weight`` [V, width] and ``codebooks.{i}.vocab_usage`` [V]), so
``quantizer.codebooks.N.*`` of ``unitok_tokenizer.pth`` loads strictly.

Numerics are fp32 with autocast disabled, as in the release.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import pack, rearrange, repeat, unpack
from torch import nn

__all__ = [
    "MultiCodebookQuantizer",
    "QuantizerOutput",
    "ResidualQuantizer",
    "codebook_perplexity",
    "codebook_usage_percent",
    "nearest_codes",
]

# The similarity tile [K, rows, V] is sized to stay in cache between the matmul that writes it and the argmax
# that reads it; this, not the batching alone, is what makes the CPU search fast (see BENCHMARKS.md). 2 MiB was
# the fastest of 0.5-8 MiB at release shapes on one thread. Accelerators prefer few large kernels, so they get a
# tile that covers release shapes at once.
_CPU_TILE_BYTES = 2 * 2**20
_ACCEL_TILE_BYTES = 1024 * 2**20

# Block sizes tried (largest first) by the blocked argmax; amax over fewer than ~32 entries vectorises poorly.
_ARGMAX_BLOCKS = (128, 64, 32)

_LOG_EPS = 1e-7  # release: codebook entropy uses log(p + 1e-7)
_EMA_WARM_CALLS = 100  # release: EMA momentum 0.9 for the first 100 calls, then 0.99
_EMA_MOMENTUM_WARM = 0.9
_EMA_MOMENTUM = 0.99


@dataclass
class QuantizerOutput:
    """What a quantizer's forward returns.

    Attributes:
        quantized: ``[..., D]`` straight-through output; in value exactly ``codes_to_vectors(codes)``, while the
            gradient passes straight through to the (normalised) input. Same dtype as the input ``z``.
        codes: ``[..., K]`` int64 code indices, values in ``[0, V)``.
        loss: scalar VQ loss ``beta * ||z - sg(q)||^2 + ||sg(z) - q||^2`` (mean squared error per element,
            averaged over sub-codebooks), ``z`` being the normalised input.
        entropy_loss: scalar, ALREADY multiplied by ``entropy_weight`` (0 when the weight is 0), so the total
            quantizer loss is ``loss + entropy_loss``.
        usage: ``[K]`` per-batch percentage of entries used, ``100 * mean_v(p_v > 0.01 / V)``.
        perplexity: ``[K]`` per-batch code perplexity ``exp(H(p))`` (natural log), between 1 and V.
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor
    entropy_loss: torch.Tensor
    usage: torch.Tensor
    perplexity: torch.Tensor


@torch.no_grad()
def nearest_codes(
    x_KNd: torch.Tensor, w_KVd: torch.Tensor, bias_KV: torch.Tensor | None = None
) -> torch.Tensor:
    """Index of the highest score ``x . w (+ bias)`` per sub-codebook, for all K at once.

    Args:
        x_KNd: ``[K, N, d]`` queries.
        w_KVd: ``[K, V, d]`` codebook rows.
        bias_KV: optional ``[K, V]`` added to every score (``-||w||^2 / 2`` turns the argmax into an L2 argmin).

    Returns:
        ``[K, N]`` int64 indices (the first maximum on ties, as ``torch.argmax``).
    """
    num_codebooks, num_vectors, _ = x_KNd.shape
    vocab = w_KVd.shape[1]
    budget = _CPU_TILE_BYTES if x_KNd.device.type == "cpu" else _ACCEL_TILE_BYTES
    rows = max(1, min(num_vectors, budget // (num_codebooks * vocab * x_KNd.element_size())))
    x_KNd = x_KNd.contiguous()
    w_KdV = w_KVd.transpose(1, 2)
    codes_KN = torch.empty(num_codebooks, num_vectors, dtype=torch.long, device=x_KNd.device)
    # One buffer reused by every tile: a fresh multi-MiB allocation per tile costs page faults on CPU.
    buffer = x_KNd.new_empty(num_codebooks * rows * vocab)
    for start in range(0, num_vectors, rows):
        stop = min(start + rows, num_vectors)
        tile_KnV = buffer[: num_codebooks * (stop - start) * vocab].view(num_codebooks, stop - start, vocab)
        torch.bmm(x_KNd[:, start:stop], w_KdV, out=tile_KnV)
        if bias_KV is not None:
            tile_KnV.add_(bias_KV[:, None, :])
        codes_KN[:, start:stop] = _first_argmax(tile_KnV)
    return codes_KN


def _first_argmax(scores_KnV: torch.Tensor) -> torch.Tensor:
    """``argmax`` over the last dim (first maximum on ties), in three cheap passes instead of one slow one.

    Torch's CPU ``argmax`` over the last dim is about 10x slower than ``amax`` (no vectorised index tracking),
    and it dominated the quantizer. So: (1) ``amax`` per block of ``block`` entries, (2) ``argmax`` over the
    block maxima (1/block of the data) picks the first block that holds the overall maximum, (3) ``argmax``
    inside that block. The result equals ``scores_KnV.argmax(-1)`` exactly, ties included.
    """
    vocab = scores_KnV.shape[-1]
    block = next((size for size in _ARGMAX_BLOCKS if vocab % size == 0 and vocab > size), None)
    if block is None:
        return scores_KnV.argmax(dim=-1)
    blocks_KnGb = rearrange(scores_KnV, "k n (g b) -> k n g b", b=block)
    best_block_Kn = blocks_KnGb.amax(dim=-1).argmax(dim=-1)
    index = repeat(best_block_Kn, "k n -> k n 1 b", b=block)
    inside_Kn = blocks_KnGb.gather(2, index).squeeze(2).argmax(dim=-1)
    return best_block_Kn * block + inside_Kn


def codebook_usage_percent(probs_KV: torch.Tensor) -> torch.Tensor:
    """``[K, V]`` code distribution -> ``[K]`` percentage of entries with probability above ``0.01 / V``."""
    threshold = 0.01 / probs_KV.shape[-1]
    return (probs_KV > threshold).float().mean(dim=-1) * 100.0


def codebook_perplexity(probs_KV: torch.Tensor) -> torch.Tensor:
    """``[K, V]`` code distribution -> ``[K]`` perplexity ``exp(-sum_v p log p)`` (1 = one code, V = uniform)."""
    return torch.special.entr(probs_KV).sum(dim=-1).exp()


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


def _entropy_loss(logits_KNV: torch.Tensor) -> torch.Tensor:
    """Release entropy regulariser, averaged over K: mean per-sample entropy minus entropy of the batch mean."""
    probs_KNV = logits_KNV.softmax(dim=-1)
    per_sample = -(probs_KNV * logits_KNV.log_softmax(dim=-1)).sum(dim=-1).mean(dim=-1)
    mean_probs_KV = probs_KNV.mean(dim=1)
    codebook = -(mean_probs_KV * torch.log(mean_probs_KV + _LOG_EPS)).sum(dim=-1)
    return (per_sample - codebook).mean()


class _StackedCodebookQuantizer(nn.Module):
    """Shared machinery: the stacked ``[K, V, width]`` codebook, release key mapping, validation, usage stats."""

    def __init__(
        self,
        num_codebooks: int,
        codebook_size: int,
        code_dim: int,
        row_width: int,
        beta: float,
        entropy_weight: float,
        entropy_temperature: float,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_codebooks", num_codebooks),
            ("codebook_size", codebook_size),
            ("code_dim", code_dim),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"expected {name} to be a positive int, got {value!r}")
        if entropy_weight < 0:
            raise ValueError(f"expected entropy_weight >= 0, got {entropy_weight}")
        if entropy_temperature <= 0:
            raise ValueError(f"expected entropy_temperature > 0, got {entropy_temperature}")
        self.num_codebooks = num_codebooks
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.latent_dim = num_codebooks * code_dim
        self.beta = float(beta)
        self.entropy_weight = float(entropy_weight)
        self.entropy_temperature = float(entropy_temperature)
        self.codebook = nn.Parameter(torch.empty(num_codebooks, codebook_size, row_width))
        self.register_buffer("ema_usage", torch.zeros(num_codebooks, codebook_size))
        self.register_buffer(
            "_offsets", torch.arange(num_codebooks, dtype=torch.long) * codebook_size, persistent=False
        )
        # A Python counter like the release's: not saved, so a reloaded model restarts its EMA warm-up.
        self.num_usage_updates = 0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Release init: uniform(-b, b) with ``b = code_dim ** -0.5 / 36``; EMA usage cleared."""
        bound = self.code_dim**-0.5 / 36
        with torch.no_grad():
            self.codebook.uniform_(-bound, bound)
            self.ema_usage.zero_()
        self.num_usage_updates = 0

    def extra_repr(self) -> str:
        return (
            f"num_codebooks={self.num_codebooks}, codebook_size={self.codebook_size}, code_dim={self.code_dim}, "
            f"beta={self.beta:g}, entropy_weight={self.entropy_weight:g}"
        )

    # ---- state dict: stacked tensors <-> release per-codebook keys ----

    def _release_keys(self, prefix: str, index: int) -> tuple[str, str]:
        return f"{prefix}codebooks.{index}.vocab_usage", f"{prefix}codebooks.{index}.codebook.weight"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for index in range(self.num_codebooks):
            usage_key, weight_key = self._release_keys(prefix, index)
            usage, weight = self.ema_usage[index], self.codebook[index]
            destination[usage_key] = usage if keep_vars else usage.detach()
            destination[weight_key] = weight if keep_vars else weight.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        for hook in self._load_state_dict_pre_hooks.values():
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        targets = {}
        for index in range(self.num_codebooks):
            usage_key, weight_key = self._release_keys(prefix, index)
            targets[usage_key] = (self.ema_usage, index)
            targets[weight_key] = (self.codebook, index)
        loaded: dict[str, torch.Tensor] = {}
        for key, (stacked, _) in targets.items():
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            if not isinstance(value, torch.Tensor):
                error_msgs.append(
                    f'While copying the parameter named "{key}", expected torch.Tensor, got {type(value)}'
                )
            elif value.shape != stacked.shape[1:]:
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from checkpoint, "
                    f"the shape in current model is {tuple(stacked.shape[1:])}."
                )
            else:
                loaded[key] = value
        if strict:
            unexpected_keys.extend(key for key in state_dict if key.startswith(prefix) and key not in targets)
        if local_metadata.get("assign_to_params_buffers", False):
            self._assign_loaded(loaded, targets, error_msgs)
            return
        with torch.no_grad():
            for key, value in loaded.items():
                stacked, index = targets[key]
                stacked[index].copy_(value)

    def _assign_loaded(self, loaded, targets, error_msgs) -> None:
        """``load_state_dict(..., assign=True)``: replace whole stacked tensors (e.g. models built on ``meta``)."""
        for name in ("codebook", "ema_usage"):
            current = getattr(self, name)
            keys = [key for key, (stacked, _) in targets.items() if stacked is current]
            if not all(key in loaded for key in keys):
                error_msgs.append(
                    f"assign=True needs every sub-codebook of {name!r}; some are missing or invalid"
                )
                continue
            new = torch.stack([loaded[key] for key in keys]).to(current.dtype)
            if isinstance(current, nn.Parameter):
                setattr(self, name, nn.Parameter(new, requires_grad=current.requires_grad))
            else:
                setattr(self, name, new)

    # ---- validation at the boundary ----

    def _flatten_latent(self, z: torch.Tensor) -> tuple[torch.Tensor, list]:
        if not isinstance(z, torch.Tensor) or not torch.is_floating_point(z):
            raise ValueError(
                f"expected a floating-point tensor z of shape [..., {self.latent_dim}], got {_describe(z)}"
            )
        if z.ndim == 0 or z.shape[-1] != self.latent_dim:
            raise ValueError(
                f"expected z of shape [..., {self.latent_dim}] (K={self.num_codebooks} x code_dim={self.code_dim}), "
                f"got {list(z.shape)}"
            )
        if z.numel() == 0:
            raise ValueError(f"expected at least one latent vector, got z of shape {list(z.shape)}")
        z_ND, packed_shape = pack([z], "* d")
        return z_ND, packed_shape

    def _flatten_codes(self, codes: torch.Tensor) -> tuple[torch.Tensor, list]:
        if (
            not isinstance(codes, torch.Tensor)
            or torch.is_floating_point(codes)
            or torch.is_complex(codes)
            or codes.dtype == torch.bool
        ):
            raise ValueError(
                f"expected an integer tensor of codes [..., {self.num_codebooks}], got {_describe(codes)}"
            )
        if codes.ndim == 0 or codes.shape[-1] != self.num_codebooks:
            raise ValueError(
                f"expected codes of shape [..., {self.num_codebooks}] (one per sub-codebook), got {list(codes.shape)}"
            )
        if codes.numel() == 0:
            raise ValueError(f"expected at least one code vector, got codes of shape {list(codes.shape)}")
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= self.codebook_size:
            raise ValueError(
                f"expected code values in [0, {self.codebook_size}), got values in [{low}, {high}]"
            )
        codes_NK, packed_shape = pack([codes.long()], "* k")
        return codes_NK, packed_shape

    # ---- usage statistics ----

    def _count_codes(self, codes_KN: torch.Tensor) -> torch.Tensor:
        """``[K, N]`` codes -> ``[K, V]`` int64 counts, equal to a ``bincount`` per sub-codebook.

        One integer scatter-add on the codes' device; ``bincount`` would read its maximum back to the host to
        size its output, a device sync in every training step.
        """
        flat = (codes_KN + self._offsets[:, None]).flatten()
        counts = flat.new_zeros(self.num_codebooks * self.codebook_size)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        return counts.view(self.num_codebooks, self.codebook_size)

    @torch.no_grad()
    def _record_usage(self, codes_KN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-batch usage % and perplexity ``[K]``; in training also all-reduce counts and update the EMA."""
        counts_KV = self._count_codes(codes_KN).float()
        if self.training and dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts_KV)
        probs_KV = counts_KV / counts_KV.sum(dim=-1, keepdim=True)
        if self.training:
            if self.num_usage_updates == 0:
                self.ema_usage.copy_(probs_KV)
            else:
                momentum = _EMA_MOMENTUM_WARM if self.num_usage_updates < _EMA_WARM_CALLS else _EMA_MOMENTUM
                self.ema_usage.mul_(momentum).add_(probs_KV, alpha=1.0 - momentum)
            self.num_usage_updates += 1
        return codebook_usage_percent(probs_KV), codebook_perplexity(probs_KV)

    @torch.no_grad()
    def usage_stats(self) -> dict:
        """Statistics of the EMA code distribution ``ema_usage [K, V]`` (updated by training-mode forwards).

        Returns:
            ``{"usage": [K] % of entries with EMA probability > 0.01 / V, "perplexity": [K] exp(H(ema)),
            "num_updates": int}``; before any training forward, usage is 0 and perplexity 1.
        """
        return {
            "usage": codebook_usage_percent(self.ema_usage),
            "perplexity": codebook_perplexity(self.ema_usage),
            "num_updates": self.num_usage_updates,
        }

    # ---- public API ----

    def _lookup(self, codes_KN: torch.Tensor, rows_KVw: torch.Tensor) -> torch.Tensor:
        """``[K, N]`` codes -> ``[K, N, width]`` rows, one gather for all sub-codebooks."""
        return F.embedding(codes_KN + self._offsets[:, None], rearrange(rows_KVw, "k v w -> (k v) w"))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z [..., D]`` (training forward: losses, straight-through output, usage statistics)."""
        z_ND, packed_shape = self._flatten_latent(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            quantized_ND, codes_KN, loss, entropy_loss = self._forward_fp32(z_ND.float())
        usage, perplexity = self._record_usage(codes_KN)
        quantized = unpack(quantized_ND.to(z.dtype), packed_shape, "* d")[0]
        codes = unpack(rearrange(codes_KN, "k n -> n k"), packed_shape, "* k")[0]
        return QuantizerOutput(quantized, codes, loss, entropy_loss, usage, perplexity)

    @torch.no_grad()
    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """``z [..., D]`` -> codes ``[..., K]`` (int64); no gradients, no statistics."""
        z_ND, packed_shape = self._flatten_latent(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            codes_KN = self._codes_fp32(z_ND.float())
        return unpack(rearrange(codes_KN, "k n -> n k"), packed_shape, "* k")[0]

    def codes_to_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., K]`` -> quantized vectors ``[..., D]`` (fp32), equal in value to ``forward(z).quantized``."""
        codes_NK, packed_shape = self._flatten_codes(codes)
        with torch.autocast(device_type=codes.device.type, enabled=False):
            vectors_ND = self._vectors_fp32(rearrange(codes_NK, "n k -> k n"))
        return unpack(vectors_ND, packed_shape, "* d")[0]

    def _forward_fp32(self, z_ND: torch.Tensor):
        raise NotImplementedError

    def _codes_fp32(self, z_ND: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _vectors_fp32(self, codes_KN: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _normalized_chunks(z_ND: torch.Tensor, num_codebooks: int) -> torch.Tensor:
    """``[N, K*d]`` -> ``[K, N, d]`` with every d-dim chunk L2-normalised (chunk i = channels i*d .. i*d+d-1)."""
    return F.normalize(rearrange(z_ND, "n (k d) -> k n d", k=num_codebooks), dim=-1)


def _straight_through(q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Value exactly ``q`` (``z - sg(z)`` is exactly 0), gradient to ``z`` the identity, none to ``q``.

    Same gradients as the release's ``z + sg(q - z)``, whose value differs from ``q`` by rounding; this form keeps
    the forward output bit-identical to ``codes_to_vectors``.
    """
    return q.detach() + (z - z.detach())


class MultiCodebookQuantizer(_StackedCodebookQuantizer):
    """UniTok's multi-codebook quantizer (release ``VectorQuantizerM``), all K sub-codebooks batched.

    ``z [..., K*d]`` is split into K chunks of d channels; each chunk is L2-normalised and matched by cosine
    similarity (argmax of dot products) against its own L2-normalised codebook of V entries. The output is the
    concatenation of the K chosen unit vectors, so ``||quantized[..., i*d:(i+1)*d]|| = 1``.

    Args:
        num_codebooks: K.
        codebook_size: V, entries per sub-codebook (release: 4096 = 32768 / 8).
        code_dim: d, channels per sub-codebook (release: 8 = 64 / 8).
        beta: commitment weight (release 0.25); the codebook term has weight 1.
        entropy_weight: weight of the entropy regulariser (release default 0 = off, and then not computed).
        entropy_temperature: softmax temperature over negative squared distances (release 0.01).

    Parameters/buffers: ``codebook [K, V, d]`` (raw rows, normalised on use), ``ema_usage [K, V]``; saved as
    ``codebooks.{i}.codebook.weight [V, d]`` and ``codebooks.{i}.vocab_usage [V]``.

    Usage tracking (every forward; ``quantize`` and ``codes_to_vectors`` keep none): codes are counted per
    sub-codebook with one scatter-add on the device (no host sync); in training mode, when ``torch.distributed`` is initialised, the counts are
    summed over ranks (all-reduce); normalised to ``p [K, V]``; ``usage = 100 * mean_v(p > 0.01 / V)`` and
    ``perplexity = exp(-sum_v p ln p)``. Training-mode forwards also update ``ema_usage``: the first call copies
    ``p``, calls 2-100 use ``ema = 0.9 ema + 0.1 p``, later calls ``0.99 ema + 0.01 p``. The call counter
    ``num_usage_updates`` is a Python int, not saved, so (as in the release) the first training call after
    loading overwrites the loaded EMA. Unlike the release, eval-mode forwards leave the EMA alone.
    """

    def __init__(
        self,
        num_codebooks: int = 8,
        codebook_size: int = 4096,
        code_dim: int = 8,
        beta: float = 0.25,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
    ) -> None:
        super().__init__(
            num_codebooks, codebook_size, code_dim, code_dim, beta, entropy_weight, entropy_temperature
        )

    def _normalized_codebook(self) -> torch.Tensor:
        return F.normalize(self.codebook.float(), dim=-1)

    def _codes_fp32(self, z_ND: torch.Tensor) -> torch.Tensor:
        return nearest_codes(_normalized_chunks(z_ND, self.num_codebooks), self._normalized_codebook())

    def _vectors_fp32(self, codes_KN: torch.Tensor) -> torch.Tensor:
        return rearrange(self._lookup(codes_KN, self._normalized_codebook()), "k n d -> n (k d)")

    def _forward_fp32(self, z_ND: torch.Tensor):
        z_KNd = _normalized_chunks(z_ND, self.num_codebooks)
        codebook_KVd = self._normalized_codebook()
        codes_KN = nearest_codes(z_KNd.detach(), codebook_KVd.detach())
        q_KNd = self._lookup(codes_KN, codebook_KVd)
        # Every chunk has N*d elements, so the element mean equals the release's mean over sub-codebooks.
        loss = self.beta * F.mse_loss(z_KNd, q_KNd.detach()) + F.mse_loss(q_KNd, z_KNd.detach())
        if self.entropy_weight > 0:
            sq_dist_KNV = torch.baddbmm(
                z_KNd.square().sum(-1, keepdim=True) + codebook_KVd.square().sum(-1)[:, None, :],
                z_KNd,
                codebook_KVd.transpose(1, 2),
                alpha=-2.0,
            )
            entropy_loss = self.entropy_weight * _entropy_loss(-sq_dist_KNV / self.entropy_temperature)
        else:
            entropy_loss = z_ND.new_zeros(())
        quantized_ND = rearrange(_straight_through(q_KNd, z_KNd), "k n d -> n (k d)")
        return quantized_ND, codes_KN, loss, entropy_loss


class ResidualQuantizer(_StackedCodebookQuantizer):
    """Residual VQ baseline with the MCQ's interface: K levels, each a codebook of V rows of the full width D.

    Choice (for a fair MCQ-vs-RQ comparison): the input is normalised exactly as the MCQ normalises it (each of
    the K chunks of ``code_dim`` channels to unit L2 norm), so both quantizers approximate the same vectors.
    Residuals are not unit vectors, so levels search by L2 distance against raw (un-normalised) rows:
    ``r_0 = z``, ``c_k = argmin_v ||r_k - W_k[v]||``, ``r_{k+1} = r_k - W_k[c_k]``; the output is
    ``sum_k W_k[c_k]``.

    Loss, averaged over levels (RQ-VAE style): ``||sg(r_k) - W_k[c_k]||^2 + beta * ||z - sg(sum_{j<=k} W_j[c_j])||^2``.
    Entropy (if enabled): the MCQ formula on each level's negative squared distances to its residual.

    Args: as :class:`MultiCodebookQuantizer`; ``code_dim`` is the width of one input chunk, ``D = K * code_dim``.
    Parameters/buffers: ``codebook [K, V, D]``, ``ema_usage [K, V]``, saved with the same per-level key names
    ``codebooks.{i}.codebook.weight [V, D]`` / ``codebooks.{i}.vocab_usage [V]``.
    """

    def __init__(
        self,
        num_codebooks: int = 8,
        codebook_size: int = 4096,
        code_dim: int = 8,
        beta: float = 0.25,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
    ) -> None:
        super().__init__(
            num_codebooks,
            codebook_size,
            code_dim,
            num_codebooks * code_dim,
            beta,
            entropy_weight,
            entropy_temperature,
        )

    def _normalized_input(self, z_ND: torch.Tensor) -> torch.Tensor:
        return rearrange(_normalized_chunks(z_ND, self.num_codebooks), "k n d -> n (k d)")

    def _search(self, z_ND: torch.Tensor, codebook_KVD: torch.Tensor):
        """Level-by-level search; returns codes ``[K, N]`` and the residuals ``r_k`` (with grad to ``z``)."""
        half_sq_norm_KV = codebook_KVD.detach().square().sum(-1) * 0.5
        residual_ND = z_ND
        residuals, codes = [], []
        for level in range(self.num_codebooks):
            residuals.append(residual_ND)
            codes_1N = nearest_codes(
                residual_ND.detach()[None],
                codebook_KVD[level : level + 1].detach(),
                -half_sq_norm_KV[level : level + 1],
            )
            codes.append(codes_1N[0])
            residual_ND = residual_ND - F.embedding(codes_1N[0], codebook_KVD[level]).detach()
        return torch.stack(codes), residuals

    def _codes_fp32(self, z_ND: torch.Tensor) -> torch.Tensor:
        return self._search(self._normalized_input(z_ND), self.codebook.float())[0]

    def _vectors_fp32(self, codes_KN: torch.Tensor) -> torch.Tensor:
        return self._lookup(codes_KN, self.codebook.float()).sum(dim=0)

    def _forward_fp32(self, z_ND: torch.Tensor):
        z_ND = self._normalized_input(z_ND)
        codebook_KVD = self.codebook.float()
        codes_KN, residuals = self._search(z_ND, codebook_KVD)
        q_KND = self._lookup(codes_KN, codebook_KVD)
        residual_KND = torch.stack(residuals)
        partial_KND = q_KND.detach().cumsum(dim=0)
        loss = F.mse_loss(q_KND, residual_KND.detach()) + self.beta * F.mse_loss(
            z_ND.expand_as(partial_KND), partial_KND
        )
        if self.entropy_weight > 0:
            sq_dist_KNV = torch.baddbmm(
                residual_KND.square().sum(-1, keepdim=True) + codebook_KVD.square().sum(-1)[:, None, :],
                residual_KND,
                codebook_KVD.transpose(1, 2),
                alpha=-2.0,
            )
            entropy_loss = self.entropy_weight * _entropy_loss(-sq_dist_KNV / self.entropy_temperature)
        else:
            entropy_loss = z_ND.new_zeros(())
        quantized_ND = _straight_through(q_KND.sum(dim=0), z_ND)
        return quantized_ND, codes_KN, loss, entropy_loss


def unchecked_code_vectors(quantizer: nn.Module, codes: torch.Tensor) -> torch.Tensor | None:
    """Code vectors ``[..., D]`` of a :class:`MultiCodebookQuantizer` without validating ``codes`` (no host sync).

    Equal to ``quantizer.codes_to_vectors(codes)``: the same L2-normalised rows, gathered. ``None`` for other
    quantizers (the caller falls back to the checked path).
    """
    if not isinstance(quantizer, MultiCodebookQuantizer):
        return None
    table = F.normalize(quantizer.codebook.float(), dim=-1)  # [K,V,d]
    k = torch.arange(table.shape[0], device=codes.device)
    return table[k, codes].flatten(-2)
