"""Faults of the MLLM library: offline presets, image inputs, bf16, self-contained checkpoints, silent acceptance of
bad values, Hub loading and upload."""

import json
import shutil

import huggingface_hub
import pytest
import torch
from mllm_helpers import (  # noqa: F401 (autouse fixture)
    CORPUS,
    build_tiny_tokenizer,
    one_thread,
    random_codes,
    tiny_mllm,
    tiny_unitok,
)

from unitok.mllm import MLLMConfig, UniTokMLLM


@pytest.fixture(scope="module")
def unitok():
    return tiny_unitok()


@pytest.fixture(scope="module")
def model(unitok):
    return tiny_mllm(unitok).eval()


def test_tiny_preset_builds_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = UniTokMLLM.from_config(MLLMConfig.preset("tiny"))
    assert (
        model.text_tokenizer("a red circle", add_special_tokens=False).input_ids[0] != model.builder.ids.pad
    )
    assert model.text_tokenizer.unk_token_id not in model.text_tokenizer("red square").input_ids


def test_answer_takes_a_list_of_batched_image_tensors(model):
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    assert model.answer([img], "what colour ?", max_new_tokens=3) == model.answer(
        img[0], "what colour ?", max_new_tokens=3
    )


def test_bf16_cast_keeps_unitok_working(unitok):
    model = tiny_mllm(unitok).eval().to(torch.bfloat16)
    assert model.llm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.unitok.parameters())
    img = torch.rand(3, 64, 64) * 2 - 1
    assert isinstance(model.answer(img, "what colour ?", max_new_tokens=2)[0], str)
    out = model.generate_images("a red circle", image_size=32, seed=0)
    assert out.images[0].size == (32, 32)


def test_checkpoint_is_self_contained(unitok, tmp_path, monkeypatch):
    unitok.save_pretrained(tmp_path / "work" / "my_unitok")
    monkeypatch.chdir(tmp_path / "work")
    config = MLLMConfig.preset("tiny", unitok="my_unitok", unitok_preset=None)
    model = UniTokMLLM.from_config(config, text_tokenizer=build_tiny_tokenizer(CORPUS))
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["unitok"] == "unitok"
    shutil.rmtree(tmp_path / "work" / "my_unitok")
    monkeypatch.chdir(tmp_path)
    loaded = UniTokMLLM.from_pretrained(tmp_path / "ckpt")
    assert all(
        torch.equal(a, b) for a, b in zip(unitok.state_dict().values(), loaded.unitok.state_dict().values())
    )


@pytest.mark.parametrize(
    "pixels",
    [
        torch.full((3, 64, 64), float("nan")),
        torch.full((3, 64, 64), float("inf")),
        torch.randint(0, 256, (3, 64, 64)).float(),
    ],
)
def test_bad_pixels_are_refused(model, pixels):
    with pytest.raises(ValueError, match=r"pixel|NaN"):
        model.answer(pixels, "what colour ?", max_new_tokens=2)
    with pytest.raises(ValueError, match=r"pixel|NaN"):
        model.chat([{"role": "user", "content": "what colour ?"}], pixels, max_new_tokens=2)


def count_llm_calls(model, monkeypatch):
    calls = []
    original = model.decode_hidden
    monkeypatch.setattr(model, "decode_hidden", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_image_larger_than_the_context_is_refused_up_front(model, monkeypatch):
    calls = count_llm_calls(model, monkeypatch)
    context = model.llm.config.max_position_embeddings
    side = 16 * (int(context**0.5) + 1)
    with pytest.raises(ValueError, match="context"):
        model.generate_images("a red circle", image_size=side, decode=False)
    assert calls == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cfg_scale": float("nan")},
        {"cfg_scale": -1.0},
        {"cfg_scale": float("inf")},
        {"temperature": float("nan")},
        {"temperature": -0.5},
        {"top_k": 2.5},
        {"top_k": -1},
        {"top_p": float("nan")},
        {"top_p": 1.5},
        {"seed": 1.5},
        {"image_size": 32.0},
    ],
)
def test_bad_sampling_values_are_refused_before_any_work(model, monkeypatch, kwargs):
    calls = count_llm_calls(model, monkeypatch)
    with pytest.raises(ValueError):
        model.generate_images("a red circle", decode=False, **kwargs)
    assert calls == []


@pytest.mark.parametrize("kwargs", [{"temperature": float("nan")}, {"top_p": 0.0}, {"max_new_tokens": 0}])
def test_bad_text_options_are_refused(model, kwargs):
    with pytest.raises(ValueError):
        model.chat([{"role": "user", "content": "what colour ?"}], **kwargs)
    with pytest.raises(ValueError):
        model.answer(random_codes(model, 4, 4), "what colour ?", **kwargs)


def fill_hub_cache(cache, repo_id, folder):
    """The local Hugging Face cache layout of one snapshot of ``repo_id`` holding ``folder``'s files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(folder, repo / "snapshots" / revision)


def test_from_pretrained_accepts_a_hub_id_from_the_cache(unitok, tmp_path, monkeypatch):
    model = tiny_mllm(unitok).eval()
    model.save_pretrained(tmp_path / "ckpt")
    fill_hub_cache(tmp_path / "cache", "someone/tiny-unitok-mllm", tmp_path / "ckpt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = UniTokMLLM.from_pretrained("someone/tiny-unitok-mllm", cache_dir=tmp_path / "cache")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match="Hub"):
        UniTokMLLM.from_pretrained("someone/not-there", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="neither"):
        UniTokMLLM.from_pretrained(tmp_path / "no" / "such" / "dir")
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="neither"):  # a mistyped local path, not a Hub id
        UniTokMLLM.from_pretrained("runs/missing")


def test_push_to_hub_uploads_a_loadable_checkpoint(model, monkeypatch):
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploaded["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message):
            uploaded["model"] = UniTokMLLM.from_pretrained(folder_path)
            return "https://hub.example/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert model.push_to_hub("someone/tiny", private=True) == "https://hub.example/commit/1"
    assert uploaded["repo"] == ("someone/tiny", True, True)
    before, after = model.state_dict(), uploaded["model"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
