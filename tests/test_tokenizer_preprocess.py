"""Image conversion for UniTok: loading, colour modes, resize + centre crop, to_pil, boundary checks."""

import numpy as np
import pytest
import torch
from PIL import Image

from unitok.tokenizer.preprocess import check_codes, check_images, load_image, to_pil

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def pixel(rgb) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1


def three_bands(width: int = 64, height: int = 32) -> Image.Image:
    """Red left quarter, green middle half, blue right quarter."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 4] = RED
    array[:, width // 4 : 3 * width // 4] = GREEN
    array[:, 3 * width // 4 :] = BLUE
    return Image.fromarray(array)


def test_load_image_from_path_pil_and_array(tmp_path):
    image = three_bands()
    image.save(tmp_path / "bands.png")
    for source in (tmp_path / "bands.png", str(tmp_path / "bands.png"), image, np.asarray(image)):
        img = load_image(source, size=32)
        assert img.shape == (3, 32, 32) and img.dtype == torch.float32
        # short side already 32: the centre crop keeps exactly the green half
        assert torch.equal(img, pixel(GREEN)[:, None, None].expand(3, 32, 32))


def test_short_side_resize_and_centre_crop():
    img = load_image(three_bands(width=128, height=64), size=32)  # 64 -> 32 short side, 128 -> 64 long side
    assert img.shape == (3, 32, 32)
    torch.testing.assert_close(
        img[:, :, 8:24], pixel(GREEN)[:, None, None].expand(3, 32, 16), atol=0.02, rtol=0
    )
    tall = load_image(Image.new("RGB", (40, 100), RED), size=16)
    assert tall.shape == (3, 16, 16)
    assert float(tall.min()) >= -1 and float(tall.max()) <= 1


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA", "I;16", "1"])
def test_colour_modes_become_rgb(mode):
    image = Image.new("RGB", (20, 20), (200, 120, 40)).convert(mode)
    img = load_image(image, size=16)
    assert img.shape == (3, 16, 16) and img.dtype == torch.float32
    assert float(img.min()) >= -1 and float(img.max()) <= 1


def test_grayscale_is_replicated_and_alpha_goes_over_white():
    gray = load_image(np.full((16, 16), 100, dtype=np.uint8), size=16)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    torch.testing.assert_close(gray[:, 0, 0], pixel((100, 100, 100)))
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., :3] = BLUE
    rgba[:, 8:, 3] = 255  # left half fully transparent
    img = load_image(rgba, size=16)
    torch.testing.assert_close(img[:, 0, 0], pixel(WHITE))
    torch.testing.assert_close(img[:, 0, 15], pixel(BLUE))
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([*RED, *GREEN] + [0] * 762)
    palette.info["transparency"] = 0
    torch.testing.assert_close(load_image(palette, size=16)[:, 3, 3], pixel(WHITE))


def test_to_pil_inverts_load_image():
    img = load_image(three_bands(), size=32)
    pil = to_pil(img)
    assert len(pil) == 1 and pil[0].mode == "RGB" and pil[0].size == (32, 32)
    assert torch.equal(load_image(pil[0], size=32), img)
    batch = torch.rand(2, 3, 16, 16) * 4 - 2  # out of range -> clamped
    pil = to_pil(batch)
    assert len(pil) == 2
    torch.testing.assert_close(load_image(pil[1], size=16), batch[1].clamp(-1, 1), atol=1 / 127.5, rtol=0)
    with pytest.raises(ValueError, match="expected images"):
        to_pil(torch.zeros(1, 1, 16, 16))


def test_load_image_bad_inputs():
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((16, 16, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        load_image(np.zeros((16, 16, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="path, a PIL image or a numpy array"):
        load_image(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="size"):
        load_image(Image.new("RGB", (16, 16)), size=0)


def test_check_images_and_codes():
    check_images(torch.zeros(2, 3, 32, 48))
    with pytest.raises(
        ValueError,
        match=r"^expected images of shape \[B,3,H,W\] with H and W multiples of 16, got \[2,3,250,250\]$",
    ):
        check_images(torch.zeros(2, 3, 250, 250))
    with pytest.raises(ValueError, match="square"):
        check_images(torch.zeros(2, 3, 32, 48), square=True)
    with pytest.raises(ValueError, match="tensor"):
        check_images(np.zeros((2, 3, 32, 32)))
    check_codes(torch.zeros(1, 2, 2, 8, dtype=torch.long), num_codebooks=8, codebook_size=16)
    with pytest.raises(
        ValueError, match=r"codes out of range: expected values in \[0, 16\), got min 16, max 16"
    ):
        check_codes(torch.full((1, 2, 2, 8), 16), num_codebooks=8, codebook_size=16)
    with pytest.raises(ValueError, match="K = 8"):
        check_codes(torch.zeros(1, 2, 2, 7, dtype=torch.long), num_codebooks=8, codebook_size=16)
