"""CLIP contrastive loss: hand-computed 2 x 2 case and the 2-process gloo path against one full-batch process."""

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unitok.tokenizer.losses import ClipLoss


def _log_softmax_at(logits, index):
    return logits[index] - math.log(sum(math.exp(v) for v in logits))


def test_two_by_two_by_hand():
    scale = 2.0
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    # s I T^T = 2 [[0.6, 1.0], [0.8, 0.0]]; s T I^T is its transpose
    per_image = [[1.2, 2.0], [1.6, 0.0]]
    per_text = [[1.2, 1.6], [2.0, 0.0]]
    ce_image = -(_log_softmax_at(per_image[0], 0) + _log_softmax_at(per_image[1], 1)) / 2
    ce_text = -(_log_softmax_at(per_text[0], 0) + _log_softmax_at(per_text[1], 1)) / 2
    loss = ClipLoss()(image, text, torch.tensor(scale))
    assert loss.item() == pytest.approx((ce_image + ce_text) / 2, rel=1e-6)
    # matched orthonormal pairs: log(1 + e^-s) in both directions
    assert ClipLoss()(image, image, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1.0)), rel=1e-6)


def test_validation():
    with pytest.raises(ValueError, match="rank"):
        ClipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="process group"):
        ClipLoss(rank=0, world_size=2)(torch.zeros(2, 4), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match=r"\[B,E\]"):
        ClipLoss()(torch.zeros(2, 4), torch.zeros(3, 4), 1.0)


WORLD, LOCAL_BATCH, WIDTH = 2, 3, 8


def _full_batch():
    generator = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(
        torch.randn(WORLD * LOCAL_BATCH, WIDTH, generator=generator), dim=-1
    )
    text = torch.nn.functional.normalize(torch.randn(WORLD * LOCAL_BATCH, WIDTH, generator=generator), dim=-1)
    return image, text


def _rank_worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        image, text = _full_batch()
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        image, text = image[rows].clone().requires_grad_(True), text[rows].clone().requires_grad_(True)
        scale = torch.tensor(5.0, requires_grad=True)
        loss = ClipLoss(rank=rank, world_size=WORLD)(image, text, scale)
        loss.backward()
        torch.save(
            {"loss": loss.detach(), "image": image.grad, "text": text.grad, "scale": scale.grad},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
def test_gathered_loss_matches_full_batch(tmp_path):
    mp.spawn(_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    image, text = _full_batch()
    image.requires_grad_(True)
    text.requires_grad_(True)
    scale = torch.tensor(5.0, requires_grad=True)
    full = ClipLoss()(image, text, scale)
    full.backward()

    # the mean of the local losses is the full-batch loss
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(full.item(), rel=1e-5)
    # all_gather's backward sums every rank's loss: local feature gradients are WORLD x the full-batch ones,
    # which DDP's averaging of parameter gradients turns back into the full-batch gradient
    for rank, result in enumerate(ranks):
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        assert torch.allclose(result["image"], WORLD * image.grad[rows], atol=1e-6)
        assert torch.allclose(result["text"], WORLD * text.grad[rows], atol=1e-6)
    assert torch.stack([r["scale"] for r in ranks]).mean().item() == pytest.approx(
        scale.grad.item(), rel=1e-5
    )
