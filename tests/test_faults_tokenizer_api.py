"""Bad input at the tokenizer API: pixel values, dtypes, codes, checkpoint files and configs.

Every case gets a ValueError (or FileNotFoundError) whose message says what was expected and, for files,
names the file; never a bare torch/JSON/pickle error and never a silent wrong result.
"""

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from unitok.tokenizer import TokenizerConfig, UniTok
from unitok.tokenizer.checkpoint import save_release_checkpoint
from unitok.tokenizer.preprocess import check_codes, check_pixel_values, load_image

SIZE = 32


@pytest.fixture(scope="module")
def tok():
    torch.manual_seed(0)
    return UniTok(TokenizerConfig.preset("unitok-tiny", image_size=SIZE)).eval()


@pytest.fixture(scope="module")
def img():
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    return tok.save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny")


# ------------------------------------------------------------------------------------------------
# pixel values and dtypes


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_pixel_is_refused(tok, img, value):
    bad = img.clone()
    bad[1, 2, 5, 7] = value
    with pytest.raises(ValueError, match=r"finite pixel values in \[-1,1\], got 1 NaN/Inf"):
        tok.encode(bad)
    with pytest.raises(ValueError, match="NaN/Inf"):
        tok.encode_image(bad)


def test_0_255_pixels_are_refused_with_a_hint(tok, img):
    with pytest.raises(ValueError, match=r"0-255 pixels: use img / 127.5 - 1"):
        tok.encode((img + 1) * 127.5)
    with pytest.raises(ValueError, match=r"got values in \[-3"):
        tok.encode(img * 3)
    with pytest.raises(ValueError, match=r"uint8.*127.5"):
        tok.encode(((img + 1) * 127.5).to(torch.uint8))
    tok.encode(img * 1.2)  # a bicubic overshoot stays accepted


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_converted(tok, img, dtype):
    codes = tok.encode(img)
    converted = tok.encode(img.to(dtype))
    assert converted.shape == codes.shape and converted.dtype == torch.long
    # fp16 and fp64 hold these pixels (nearly) exactly; bf16 rounds them to 8 bits of mantissa
    agreement = (converted == codes).float().mean().item()
    assert agreement > (0.9 if dtype == torch.bfloat16 else 0.99)
    assert tok.encode_image(img.to(dtype)).dtype == torch.float32


def test_a_model_cast_to_bf16_still_encodes_and_decodes(tok, img):
    half = UniTok(tok.config).eval()
    half.load_state_dict(tok.state_dict())
    half = half.to(torch.bfloat16)
    codes = half.encode(img)
    assert (codes == tok.encode(img)).float().mean() > 0.9
    recon = half.decode(codes)
    assert recon.dtype == torch.float32 and recon.shape == img.shape
    assert torch.isfinite(recon).all()


def test_inference_runs_without_autograd_unless_asked(tok, img):
    codes = tok.encode(img)
    assert not tok.decode(codes).requires_grad
    assert not tok.reconstruct(img).requires_grad
    assert not tok.encode_image(img).requires_grad
    assert not tok.encode_text(["a red square"]).requires_grad
    recon = tok.decode(codes, grad=True)
    assert recon.requires_grad
    recon.sum().backward()
    assert tok.decoder_last_layer().grad is not None
    tok.zero_grad(set_to_none=True)
    assert tok.encode_text(["a red square"], grad=True).requires_grad


def test_training_forward_keeps_gradients(tok, img):
    tok.train()
    try:
        out = tok(img, ["a red square", "a blue circle"])
    finally:
        tok.eval()
    assert out.recon.requires_grad and out.text_features.requires_grad
    tok.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------
# checkpoint files


def test_truncated_and_empty_pth_name_the_file(tok, tmp_path):
    path = save_release_checkpoint(tok, tmp_path / "unitok_tokenizer.pth")
    data = path.read_bytes()
    for name, payload in {
        "cut.pth": data[: len(data) // 2],
        "cut_early.pth": data[:100],
        "empty.pth": b"",
    }.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(ValueError, match=rf"{name}.*(truncated|empty)"):
            UniTok.from_pretrained(tmp_path / name)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth"):
        UniTok.from_pretrained(tmp_path / "nowhere.pth")


def _copy_dir(saved, dst):
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        (dst / name).write_bytes((saved / name).read_bytes())
    return dst


def test_bad_config_json_names_the_file(saved, tmp_path):
    cases = {
        "syntax": "{not json",
        "list": "[1, 2]",
        "no_size": json.dumps(
            {k: v for k, v in json.loads((saved / "config.json").read_text()).items() if k != "image_size"}
        ),
        "bad_value": json.dumps({**json.loads((saved / "config.json").read_text()), "image_size": 63}),
        "unknown_key": json.dumps({**json.loads((saved / "config.json").read_text()), "colour": 1}),
    }
    expected = {
        "syntax": "not valid JSON",
        "list": "JSON object",
        "no_size": r"lacks \['image_size'\]",
        "bad_value": r"multiple of patch_size \(16",
        "unknown_key": "unknown TokenizerConfig keys",
    }
    for name, text in cases.items():
        directory = _copy_dir(saved, tmp_path / name)
        (directory / "config.json").write_text(text)
        with pytest.raises(ValueError, match=rf"{name}/config.json.*{expected[name]}"):
            UniTok.from_pretrained(directory)


def test_truncated_safetensors_names_the_file(saved, tmp_path):
    directory = _copy_dir(saved, tmp_path / "cut")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cut/model.safetensors is not a readable safetensors file"):
        UniTok.from_pretrained(directory)


def test_a_complete_directory_still_loads_exactly(tok, saved, img):
    loaded = UniTok.from_pretrained(saved)
    assert loaded.config == tok.config
    assert torch.equal(loaded.encode(img), tok.encode(img))


# ------------------------------------------------------------------------------------------------
# properties: image loading, pixel and code validation

_SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_SETTINGS
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    channels=st.sampled_from([None, 1, 3, 4]),
    size=st.sampled_from([16, 32]),
    seed=st.integers(0, 2**16),
)
def test_load_image_gives_the_model_input_for_any_uint8_array(height, width, channels, size, seed):
    shape = (height, width) if channels is None else (height, width, channels)
    array = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    out = load_image(array, size=size)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    check_pixel_values(out[None])


@_SETTINGS
@given(
    mode=st.sampled_from(["L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK"]),
    side=st.integers(1, 24),
)
def test_load_image_accepts_every_pil_mode(mode, side):
    image = Image.new(mode, (side, side + 3))
    out = load_image(image, size=16)
    assert out.shape == (3, 16, 16) and torch.isfinite(out).all()


@_SETTINGS
@given(
    dtype=st.sampled_from([np.float32, np.int16, np.uint16, np.bool_]),
    shape=st.sampled_from([(4, 4), (4, 4, 2), (4, 4, 3), (2, 4, 4, 3)]),
)
def test_load_image_refuses_other_arrays_clearly(dtype, shape):
    array = np.zeros(shape, dtype=dtype)
    with pytest.raises(ValueError, match="expected a uint8 array"):
        load_image(array, size=16)


@_SETTINGS
@given(
    values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=12),
)
def test_pixel_check_accepts_exactly_finite_values_near_the_range(values):
    img = torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)
    ok = all(np.isfinite(v) and -1.25 <= v <= 1.25 for v in values)
    if ok:
        check_pixel_values(img)
    else:
        with pytest.raises(ValueError, match=r"expected (finite )?pixel values in \[-1,1\]"):
            check_pixel_values(img)


@_SETTINGS
@given(
    low=st.integers(-5, 300),
    high=st.integers(-5, 300),
    k=st.sampled_from([4, 8]),
    side=st.sampled_from([(2, 2), (2, 3)]),
    dtype=st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.float32, torch.bool]),
)
def test_code_check_accepts_exactly_valid_codes(low, high, k, side, dtype):
    codebook_size, num_codebooks = 256, 8
    low, high = min(low, high), max(low, high)
    codes = torch.linspace(low, high, side[0] * side[1] * k).round().view(1, *side, k)
    if dtype == torch.uint8:
        codes = codes.clamp(0, 255)
    codes = codes.to(dtype)
    valid = (
        k == num_codebooks
        and side[0] == side[1]
        and not codes.is_floating_point()
        and codes.dtype != torch.bool
        and int(codes.min()) >= 0
        and int(codes.max()) < codebook_size
    )
    if valid:
        check_codes(codes, num_codebooks, codebook_size)
    else:
        with pytest.raises(ValueError, match=r"expected|codes out of range"):
            check_codes(codes, num_codebooks, codebook_size)
