"""Generation FID: one Fréchet path with rFID, reference folder or statistics, generation + resume, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mllm_helpers import one_thread, tiny_mllm, tiny_unitok  # noqa: F401
from PIL import Image

from unitok.eval.fid import FeatureStats, frechet_distance
from unitok.eval.generation_fid import build_parser, generation_fid, main, read_prompt_list, run
from unitok.eval.inception import InceptionFeatures


def colour_features(img_uint8):
    """A tiny stand-in for the Inception: per-channel mean and standard deviation of the pixels."""
    x = img_uint8.float() / 255.0
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def _folder(path, colours, seed):
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    for i, base in enumerate(colours):
        pixels = np.clip(np.asarray(base) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path / f"{i:03d}.png")
    return path


@pytest.fixture()
def inception():
    return InceptionFeatures(extractor=colour_features)


def test_fid_against_folder_and_stats(tmp_path, inception):
    warm = _folder(tmp_path / "warm", [(200, 80, 40), (220, 100, 60), (180, 60, 30), (240, 120, 90)] * 2, 0)
    cold = _folder(tmp_path / "cold", [(40, 80, 200), (60, 100, 220), (30, 60, 180), (90, 120, 240)] * 2, 1)
    same = generation_fid(inception, warm, warm, 32)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    far = generation_fid(inception, warm, cold, 32)
    # The same number as the rFID path: FeatureStats + frechet_distance on the same features.
    stats = {}
    for name, folder in (("warm", warm), ("cold", cold)):
        feats = FeatureStats()
        for p in sorted(folder.iterdir()):
            img = torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1)[None].float() / 127.5 - 1
            feats.update(inception(img))
        stats[name] = feats
    expected = frechet_distance(stats["warm"].mean, stats["warm"].cov, stats["cold"].mean, stats["cold"].cov)
    assert far["fid"] == pytest.approx(expected, rel=1e-6) and far["fid"] > 0.1
    npz = tmp_path / "cold.npz"
    np.savez(npz, mu=stats["cold"].mean, sigma=stats["cold"].cov)
    assert generation_fid(inception, warm, npz, 32)["fid"] == pytest.approx(expected, rel=1e-6)


def test_prompt_files(tmp_path):
    mjhq = tmp_path / "meta_data.json"
    mjhq.write_text(
        json.dumps({"a1": {"prompt": "a red circle", "category": "people"}, "b2": {"prompt": "a star"}})
    )
    assert read_prompt_list(mjhq) == [("a1", "a red circle"), ("b2", "a star")]
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"prompt": "a red circle"}\n\n{"prompt": ""}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:3"):
        read_prompt_list(lines)
    text = tmp_path / "p.txt"
    text.write_text("a red circle\na blue square\n")
    assert read_prompt_list(text) == [("000000", "a red circle"), ("000001", "a blue square")]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"x": {"caption": "no prompt key"}}))
    with pytest.raises(ValueError, match="'x' has no 'prompt'"):
        read_prompt_list(bad)


def test_generate_then_fid_resumes(tmp_path, inception):
    model_dir = tmp_path / "model"
    tiny_mllm(tiny_unitok()).save_pretrained(model_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green star\n")
    ref = _folder(tmp_path / "ref", [(200, 80, 40), (40, 80, 200), (90, 200, 60)], 2)
    argv = [
        "--out",
        str(tmp_path / "out"),
        "--ref",
        str(ref),
        "--model",
        str(model_dir),
        "--prompts",
        str(prompts),
    ]
    argv += ["--inception", "unused", "--batch-size", "2", "--device", "cpu", "--no-progress"]
    argv += ["--save-stats", str(tmp_path / "gen.npz")]
    report = run(build_parser().parse_args(argv), inception=inception)
    assert report["generation"]["generated"] == 3 and report["images"] == 3 and report["fid"] >= 0
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == [
        f"00000{i}.png" for i in range(3)
    ]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["fid"] == pytest.approx(report["fid"]) and (tmp_path / "out" / "grid.png").is_file()
    with np.load(tmp_path / "gen.npz") as stats:
        assert stats["mu"].shape == (6,) and int(stats["count"]) == 3
    again = run(build_parser().parse_args(argv), inception=inception)
    assert again["generation"]["generated"] == 0 and again["fid"] == pytest.approx(report["fid"])


def test_bad_input_messages(tmp_path, capsys):
    ref = _folder(tmp_path / "ref", [(1, 2, 3), (4, 5, 6)], 0)
    assert main(["--out", str(tmp_path / "o"), "--ref", str(tmp_path / "nope"), "--inception", "x"]) == 2
    assert "reference" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "o"), "--ref", str(ref), "--inception", "x"]) == 2
    assert "no generated images folder" in capsys.readouterr().err
    argv = [
        "--out",
        str(tmp_path / "o"),
        "--ref",
        str(ref),
        "--images",
        str(ref),
        "--inception",
        "missing.pth",
    ]
    assert main(argv) == 2
    assert "missing.pth" in capsys.readouterr().err
