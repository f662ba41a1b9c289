"""UniTok on the Hugging Face Hub, offline: a local Hub cache filled by the test stands in for the Hub."""

import shutil
from pathlib import Path

import pytest
import torch

from unitok.tokenizer import TokenizerConfig, UniTok
from unitok.tokenizer.checkpoint import RELEASE_FILENAME, is_hub_id, save_release_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tok():
    torch.manual_seed(0)
    return UniTok(TokenizerConfig.preset("unitok-tiny", image_size=32)).eval()


@pytest.fixture
def offline(monkeypatch):
    """No network: huggingface_hub reads only its cache (what HF_HUB_OFFLINE=1 does)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _fill_cache(cache, repo_id, files):
    """Lay files out as huggingface_hub's cache does: refs/main -> snapshots/<commit>/<file>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for path in files:
        shutil.copy(path, snapshot / path.name)
    return snapshot


def test_loads_our_layout_from_the_hub_cache(tok, tmp_path, offline):
    folder = tok.save_pretrained(tmp_path / "export", model_card=True, repo_id="someone/unitok-tiny")
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["README.md", "config.json", "model.safetensors"]
    cache = tmp_path / "hub"
    _fill_cache(cache, "someone/unitok-tiny", [folder / "config.json", folder / "model.safetensors"])
    loaded = UniTok.from_pretrained("someone/unitok-tiny", cache_dir=cache)
    assert loaded.config == tok.config
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(img), tok.encode(img))
    # the same with an explicit revision and local_files_only
    again = UniTok.from_pretrained(
        "someone/unitok-tiny", cache_dir=cache, revision="main", local_files_only=True
    )
    assert torch.equal(again.encode(img), tok.encode(img))


def test_loads_the_released_pth_layout_from_the_hub_cache(tok, tmp_path, offline):
    pth = save_release_checkpoint(tok, tmp_path / RELEASE_FILENAME)
    cache = tmp_path / "hub"
    _fill_cache(cache, "FoundationVision/unitok_tokenizer", [pth])
    loaded = UniTok.from_pretrained("FoundationVision/unitok_tokenizer", cache_dir=cache)
    for key, value in tok.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_missing_repo_offline_says_why(tmp_path, offline):
    with pytest.raises(ValueError, match=r"'nobody/nothing'.*no UniTok checkpoint.*HF_HUB_OFFLINE"):
        UniTok.from_pretrained("nobody/nothing", cache_dir=tmp_path / "empty")


def test_local_paths_win_over_hub_ids(tok, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tok.save_pretrained(tmp_path / "org" / "name")
    assert not is_hub_id("org/name")  # an existing folder
    assert not is_hub_id("org/typo")  # a missing folder inside an existing one: a mistyped local path
    assert (
        is_hub_id("someone/other") and not is_hub_id("a/b/c") and not is_hub_id("./x") and not is_hub_id("x")
    )
    assert UniTok.from_pretrained("org/name").config == tok.config
    for missing in ("a/b/c", "org/typo"):
        with pytest.raises(FileNotFoundError, match="Hub id"):
            UniTok.from_pretrained(missing)


def test_model_card(tok, tmp_path):
    folder = tok.save_pretrained(tmp_path / "card", model_card=True, repo_id="someone/unitok-tiny")
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: unitok" in card
    assert "UniTok.from_pretrained('someone/unitok-tiny')" in card
    assert "2 x 2 positions x 8 codes" in card and "8 x 256 entries x 4 dims" in card
    assert "2502.20321" in card
    # a card the user wrote is kept
    (folder / "README.md").write_text("mine")
    tok.save_pretrained(folder, model_card=True)
    assert (folder / "README.md").read_text() == "mine"
    plain = tok.save_pretrained(tmp_path / "plain")
    assert not (plain / "README.md").exists()


def test_push_to_hub_uploads_weights_config_and_card(tok, monkeypatch):
    from huggingface_hub import HfApi

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload"] = (
            repo_id,
            sorted(p.name for p in Path(folder_path).iterdir()),
            kwargs,
        )
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert tok.push_to_hub("someone/unitok-tiny", private=True) == "commit-info"
    assert calls["create"] == ("someone/unitok-tiny", {"private": True, "exist_ok": True})
    repo_id, files, kwargs = calls["upload"]
    assert repo_id == "someone/unitok-tiny" and files == ["README.md", "config.json", "model.safetensors"]
    assert kwargs["commit_message"] == "Upload UniTok tokenizer"
