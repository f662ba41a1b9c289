"""UniTok checkpoints: the release key set, our directory format, the released .pth format, CLIP init."""

import argparse
import dataclasses
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from unitok.tokenizer import TokenizerConfig, UniTok
from unitok.tokenizer.checkpoint import (
    clip_to_unitok_state_dict,
    codes_from_release,
    codes_to_release,
    config_from_release_args,
    release_args_from_config,
    save_release_checkpoint,
    strip_wrapper_prefixes,
    to_release_checkpoint,
)
from unitok.tokenizer.encoder import ViTaminEncoder

# key<TAB>shape<TAB>dtype of every tensor of the released checkpoint (dumped from the reference implementation).
RELEASE_KEYS = Path(__file__).with_name("tokenizer_release_keys.tsv")
# A subset of the reference ``Args`` as stored in ``ckpt["args"]`` (defaults of utils/config.py).
REFERENCE_ARGS = {
    "model": "vitamin_large",
    "img_size": 256,
    "num_query": 0,
    "patch_size": 16,
    "drop_path": 0.1,
    "embed_dim": 768,
    "quant_proj": "attn",
    "vocab_size": 32768,
    "vocab_width": 64,
    "num_codebooks": 8,
    "vq_beta": 0.25,
    "vocab_norm": True,
    "e_temp": 0.01,
    "le": 0.0,
    "text_width": 768,
    "text_heads": 12,
    "text_layers": 12,
    "text_vocab_size": 49408,
    "text_context_length": 77,
    "grad_ckpt": True,
    "lr": 5e-4,
    "local_bs": 64,
    "lpips_path": "external/lpips_with_vgg.pth",
}


def release_key_table() -> dict[str, tuple[tuple[int, ...], str]]:
    """The key table of the released checkpoint: ``{key: (shape, dtype)}``."""
    table = {}
    for line in RELEASE_KEYS.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, dtype = line.split("\t")
            table[key] = (tuple(int(n) for n in shape.strip("()").split(",") if n.strip()), dtype)
    return table


def tiny_model(seed: int = 0, **overrides) -> UniTok:
    torch.manual_seed(seed)
    return UniTok(TokenizerConfig.preset("unitok-tiny", **overrides)).eval()


def images(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


@torch.no_grad()
def assert_same_outputs(a: UniTok, b: UniTok) -> None:
    img = images()
    codes = a.encode(img)
    assert torch.equal(codes, b.encode(img))
    assert torch.equal(a.decode(codes), b.decode(codes))
    assert torch.equal(a.encode_image(img), b.encode_image(img))
    assert torch.equal(a.encode_text(["a cat"]), b.encode_text(["a cat"]))


# --------------------------------------------------------------------------------------------------
# the release architecture, built on the meta device


def test_unitok_large_has_exactly_the_release_keys_and_shapes():
    table = release_key_table()
    assert len(table) == 1335
    with torch.device("meta"):
        model = UniTok(TokenizerConfig.preset("unitok-large"))
    ours = {key: (tuple(t.shape), str(t.dtype)) for key, t in model.state_dict().items()}
    assert sorted(set(ours) - set(table)) == []
    assert sorted(set(table) - set(ours)) == []
    assert {k: v for k, v in ours.items() if table[k] != v} == {}


def test_unitok_large_parameter_counts_match_the_reference():
    with torch.device("meta"):
        model = UniTok(TokenizerConfig())
    millions = {
        name: sum(p.numel() for p in child.parameters()) / 1e6 for name, child in model.named_children()
    }
    expected = {
        "encoder": 332.33,
        "quant_proj": 3.25,
        "quantizer": 0.26,
        "post_quant_proj": 7.62,
        "decoder": 352.40,
        "text_encoder": 123.65,
    }
    for name, value in expected.items():
        assert abs(millions[name] - value) < 0.01, (name, millions[name])
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 820.30) < 0.01


@pytest.mark.parametrize(
    ("preset", "timm_name"), [("unitok-large", "vitamin_large_256"), ("unitok-base", "vitamin_base_224")]
)
def test_encoder_equals_timm_vitamin(preset, timm_name):
    """The encoder built from timm's ViTamin parts is timm's registered ViTamin (plus the zero pos_embed)."""
    with torch.device("meta"):
        ours = ViTaminEncoder(TokenizerConfig.preset(preset))
        theirs = timm.create_model(
            timm_name,
            patch_size=1,
            num_classes=0,
            global_pool="",
            fc_norm=False,
            class_token=False,
            pos_embed="none",
            img_size=256,
        )
    ours_sd = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs_sd = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours_sd.pop("pos_embed") == (1, 1, ours.embed_dim)
    assert ours_sd == theirs_sd


# --------------------------------------------------------------------------------------------------
# our directory format


def test_save_pretrained_round_trip_is_exact(tmp_path):
    model = tiny_model()
    with torch.no_grad():  # make the EMA usage buffers non-trivial
        model.train()(images())
    model.eval()
    out_dir = model.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "model.safetensors"]
    loaded = UniTok.from_pretrained(out_dir)
    assert loaded.config == model.config and not loaded.training
    loaded_sd = loaded.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded_sd[key]), key
    assert_same_outputs(model, loaded)
    # overwriting an existing checkpoint works and leaves no temporary files
    other = tiny_model(seed=1)
    other.save_pretrained(out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "model.safetensors"]
    reloaded = UniTok.from_pretrained(out_dir)
    assert torch.equal(reloaded.decoder.up_conv1.conv.weight, other.decoder.up_conv1.conv.weight)
    assert not torch.equal(reloaded.decoder.up_conv1.conv.weight, model.decoder.up_conv1.conv.weight)
    override = dataclasses.replace(model.config, grad_checkpointing=True)
    assert UniTok.from_pretrained(out_dir, config=override).config.grad_checkpointing


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        UniTok.from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        UniTok.from_pretrained(tmp_path / "empty")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a released UniTok checkpoint"):
        UniTok.from_pretrained(tmp_path / "other.pth")


# --------------------------------------------------------------------------------------------------
# the released .pth format


def test_release_checkpoint_round_trip(tmp_path):
    model = tiny_model()
    path = save_release_checkpoint(model, tmp_path / "unitok_tokenizer.pth")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"args", "trainer"} and set(raw["trainer"]["unitok"]) == set(model.state_dict())
    assert raw["args"]["vocab_size"] == 2048 and raw["args"]["model"] == "unitok_custom"
    loaded = UniTok.from_pretrained(path)
    assert loaded.config == model.config
    assert_same_outputs(model, loaded)


def test_hand_written_release_checkpoint_loads_strictly(tmp_path):
    """A release-style file as the reference trainer writes it: reference args, DDP-prefixed keys, extra entries."""
    model = tiny_model()
    args = {**REFERENCE_ARGS, "img_size": 64}
    state = {"module." + key: value for key, value in model.state_dict().items()}
    ckpt = {
        "args": args,
        "epoch": 1,
        "iter": 10,
        "trainer": {"config": {"l1": 0.2}, "unitok": state, "disc": {}},
    }
    torch.save(ckpt, tmp_path / "ckpt-last.pth")
    loaded = UniTok.from_pretrained(tmp_path / "ckpt-last.pth", config=model.config)
    assert_same_outputs(model, loaded)
    # one tensor missing -> the strict load refuses
    del state["module.decoder.norm.weight"]
    torch.save(ckpt, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match=r"decoder\.norm\.weight"):
        UniTok.from_pretrained(tmp_path / "broken.pth", config=model.config)


def test_pickles_needing_unsafe_classes_are_refused_until_allow_listed(tmp_path):
    model = tiny_model()
    ckpt = to_release_checkpoint(model)
    ckpt["args"] = argparse.Namespace(**ckpt["args"])  # not on torch's weights_only allow-list
    torch.save(ckpt, tmp_path / "namespace.pth")
    with pytest.raises(ValueError, match=r"Namespace.*add_safe_globals"):
        UniTok.from_pretrained(tmp_path / "namespace.pth")
    # A user who trusts the file allow-lists the class; the load stays weights_only=True.
    with torch.serialization.safe_globals([argparse.Namespace]):
        loaded = UniTok.from_pretrained(tmp_path / "namespace.pth")
    assert_same_outputs(model, loaded)


def test_config_from_release_args():
    assert config_from_release_args(REFERENCE_ARGS) == TokenizerConfig(grad_checkpointing=True)
    assert config_from_release_args({}) == TokenizerConfig()  # the reference defaults are the release
    base = config_from_release_args({**REFERENCE_ARGS, "model": "vitamin_base", "embed_dim": 512})
    assert (base.width, base.depth, base.upsampler_widths, base.proj_heads, base.embed_dim) == (
        768,
        14,
        (256, 128),
        12,
        512,
    )
    linear = config_from_release_args(
        {**REFERENCE_ARGS, "quant_proj": "linear", "num_codebooks": 4, "vocab_size": 16384}
    )
    assert (linear.quant_proj, linear.num_codebooks, linear.codebook_size) == ("linear", 4, 4096)
    with pytest.raises(ValueError, match="register tokens"):
        config_from_release_args({**REFERENCE_ARGS, "num_query": 4})
    with pytest.raises(ValueError, match="unsupported release model"):
        config_from_release_args({**REFERENCE_ARGS, "model": "vitamin_small"})
    args = release_args_from_config(TokenizerConfig())
    assert args["model"] == "vitamin_large" and args["vq_beta"] == 0.25 and args["img_size"] == 256
    assert (
        config_from_release_args({k: v for k, v in args.items() if k != "unitok_config"}) == TokenizerConfig()
    )


def test_strip_wrapper_prefixes_and_code_layouts():
    tensor = torch.zeros(1)
    assert strip_wrapper_prefixes({"module._orig_mod.a": tensor}) == {"a": tensor}
    assert strip_wrapper_prefixes({"module.a": tensor, "b": tensor}).keys() == {"module.a", "b"}
    codes_BhwK = torch.randint(0, 4096, (2, 16, 16, 8))
    codes_BKL = codes_to_release(codes_BhwK)
    assert codes_BKL.shape == (2, 8, 256)
    assert torch.equal(codes_BKL[1, 3, 16 * 5 + 7], codes_BhwK[1, 5, 7, 3])  # raster order, codebook-major
    assert torch.equal(codes_from_release(codes_BKL), codes_BhwK)
    assert torch.equal(codes_from_release(codes_BKL.view(2, 8, 16, 16)), codes_BhwK)
    with pytest.raises(ValueError, match="square number"):
        codes_from_release(torch.zeros(1, 8, 10, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# open_clip ViTamin CLIP init


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_load_clip_weights(tmp_path, suffix):
    source = tiny_model(seed=3)
    clip_sd = {
        f"visual.trunk.{k}": v
        for k, v in source.encoder.state_dict().items()
        if k != "pos_embed" and not k.startswith("norm.")
    }
    width = source.config.width
    clip_sd.update(
        {
            "visual.trunk.pos_embed": torch.zeros(1, 16, width),
            "visual.trunk.fc_norm.weight": torch.ones(width),
            "visual.trunk.fc_norm.bias": torch.zeros(width),
            "visual.head.proj.weight": torch.zeros(64, width),
            "logit_scale": torch.tensor(4.6),
        }
    )
    clip_sd.update({f"text.{k}": v for k, v in source.text_encoder.state_dict().items()})
    path = tmp_path / f"open_clip_model{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in clip_sd.items()}, path)
    else:
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in clip_sd.items()}}, path)

    target = tiny_model(seed=4)
    decoder_before = target.decoder.norm.weight.clone()
    report = target.load_clip_weights(path)
    assert report.missing_keys == ["encoder.norm.bias", "encoder.norm.weight"]
    assert report.unexpected_keys == ["encoder.fc_norm.bias", "encoder.fc_norm.weight"]
    target_sd = target.state_dict()
    for key, value in source.state_dict().items():
        if key.startswith(("encoder.blocks", "encoder.patch_embed", "text_encoder.")):
            assert torch.equal(target_sd[key], value), key
    assert torch.equal(target.decoder.norm.weight, decoder_before)
    assert "encoder.pos_embed" not in clip_to_unitok_state_dict(clip_sd)


def test_text_tower_is_the_reference_open_clip_tower():
    """Same keys and outputs as ``open_clip.model._build_text_tower``, which the reference calls."""
    from open_clip.model import _build_text_tower

    model = tiny_model()
    ours = model.text_encoder
    cfg = model.config
    text_cfg = {"width": 64, "heads": 4, "layers": 2, "vocab_size": 49408, "context_length": 77}
    reference = _build_text_tower(cfg.embed_dim, text_cfg).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    ids = model.tokenize_text(["a red square", "two blue circles"])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids), rtol=0, atol=0)
