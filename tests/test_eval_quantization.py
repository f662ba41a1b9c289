"""unitok.eval.quantization: the quantization error on hand-computed cases and on a real tiny UniTok."""

from __future__ import annotations

import pytest
import torch

from unitok.eval.quantization import latent_quantization_error, normalized_latent, quantization_error
from unitok.tokenizer import MultiCodebookQuantizer, ResidualQuantizer, TokenizerConfig, UniTok


def _set_codebook(quantizer, rows_KVw) -> None:
    with torch.no_grad():
        quantizer.codebook.copy_(torch.tensor(rows_KVw))


def test_normalized_latent_unit_chunks():
    z = torch.tensor([[3.0, 4.0, 0.0, -2.0]])
    assert torch.allclose(normalized_latent(z, 2), torch.tensor([[0.6, 0.8, 0.0, -1.0]]))
    with pytest.raises(ValueError, match="divisible by num_codebooks=3"):
        normalized_latent(z, 3)


def test_mcq_error_hand_case():
    # K=2 sub-codebooks of V=2 unit entries in d=2. z = (3,4 | 0,-2) normalises to (0.6,0.8 | 0,-1).
    # Chunk 1: cosines 0.6 and 0.8 -> entry (0,1), error 0.6^2 + 0.2^2 = 0.40.
    # Chunk 2: cosines 0 and -1 -> entry (1,0), error 1 + 1 = 2. Mean over 4 elements: 2.4 / 4 = 0.6.
    quantizer = MultiCodebookQuantizer(num_codebooks=2, codebook_size=2, code_dim=2)
    _set_codebook(quantizer, [[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
    squared, energy, elements = latent_quantization_error(quantizer, torch.tensor([[3.0, 4.0, 0.0, -2.0]]))
    assert elements == 4
    assert squared / elements == pytest.approx(0.6)
    assert energy == pytest.approx(2.0)  # two unit chunks


def test_rq_error_hand_case():
    # Normalised z = (0.6, 0.8, 0, -1). Level 0 picks a = (0.5, 0.5, 0, -0.5) (distance 0.35 vs 2 for the
    # zero row), residual (0.1, 0.3, 0, -0.5); level 1 picks (0, 0, 0, -0.5) (0.10 vs 0.25), residual
    # (0.1, 0.3, 0, 0): squared error 0.1, mean over 4 elements 0.025.
    quantizer = ResidualQuantizer(num_codebooks=2, codebook_size=2, code_dim=2)
    _set_codebook(
        quantizer,
        [
            [[0.5, 0.5, 0.0, -0.5], [0.0, 0.0, 0.0, 0.0]],
            [[0.0, 0.0, 0.0, -0.5], [0.1, 0.3, 0.0, 0.0]],
        ],
    )
    squared, _, elements = latent_quantization_error(quantizer, torch.tensor([[3.0, 4.0, 0.0, -2.0]]))
    assert squared / elements == pytest.approx(0.025)


@pytest.mark.parametrize("kind", ["mcq", "rq"])
def test_quantization_error_of_a_tiny_unitok(kind):
    torch.manual_seed(0)
    config = TokenizerConfig.preset("unitok-tiny", image_size=32, quantizer=kind, vocab_size=64)
    model = UniTok(config).train()
    img_B3HW = torch.rand(5, 3, 32, 32) * 2 - 1
    loader = [(img_B3HW[:3], ["a"] * 3), (img_B3HW[3:], ["b"] * 2)]
    result = quantization_error(model, loader, max_images=4)
    assert model.training  # train mode restored
    assert result["num_images"] == 4 and result["num_vectors"] == 4 * 4
    with torch.no_grad():
        z_BLD = model.quant_proj(model.encoder(img_B3HW[:4]).float())
        target = normalized_latent(z_BLD, config.num_codebooks)
        expected = (
            (model.quantizer.codes_to_vectors(model.quantizer.quantize(z_BLD)) - target).square().mean()
        )
        if kind == "mcq":
            # The MCQ's VQ loss is (1 + beta) times exactly this error on the batch it quantizes.
            vq_loss = model.eval().quantizer(z_BLD).loss
            assert float(vq_loss) / (1 + config.beta) == pytest.approx(float(expected), rel=1e-5)
    assert result["mse"] == pytest.approx(float(expected), rel=1e-5)
    assert result["relative_mse"] == pytest.approx(float(expected) / float(target.square().mean()), rel=1e-5)
    assert result["mse"] > 0


def test_quantization_error_rejects_an_empty_loader():
    model = UniTok(TokenizerConfig.preset("unitok-tiny", image_size=32))
    with pytest.raises(ValueError, match="no images"):
        quantization_error(model, [])
