"""Zero-shot classification and the reconstruction harness, with the real tiny UniTok and synthetic world."""

import json
import math

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from unitok.data.synth import SynthConfig, generate_world
from unitok.eval import (
    FeatureStats,
    InceptionFeatures,
    evaluate_reconstruction,
    evaluate_zero_shot,
    get_templates,
    read_classnames,
    zero_shot_accuracy,
    zero_shot_classifier,
)
from unitok.eval.tokenizer_eval import build_image_dataset
from unitok.eval.tokenizer_eval import main as eval_main
from unitok.tokenizer import TokenizerConfig, UniTok
from unitok.tokenizer.losses import LPIPS

CLASSES = ["circle", "square", "star"]
TEMPLATES = ["a photo of a {}.", "a {} shape."]


class KnownAnswerModel(torch.nn.Module):
    """encode_text maps each prompt to its class's axis (plus template noise); encode_image reads the
    class out of the image's mean pixel value. The right answer is therefore known for every image."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.prompts = [t.format(c) for c in CLASSES for t in TEMPLATES]

    def tokenize_text(self, texts):
        return torch.tensor([[self.prompts.index(t)] for t in texts])

    def encode_text(self, ids, normalize=True):
        ids = ids[:, 0]
        feats = torch.nn.functional.one_hot(ids // len(TEMPLATES), 4).float() * 3.0
        feats[:, 3] = (ids % len(TEMPLATES)).float()  # template-dependent direction, averaged away
        return torch.nn.functional.normalize(feats, dim=-1)

    def encode_image(self, img, normalize=True):
        label = img.mean(dim=(1, 2, 3)).round().long()
        return torch.nn.functional.normalize(torch.nn.functional.one_hot(label, 4).float() + 0.1, dim=-1)


def test_zero_shot_known_answer():
    model = KnownAnswerModel()
    classifier = zero_shot_classifier(model, CLASSES, TEMPLATES)
    assert classifier.shape == (4, 3)
    torch.testing.assert_close(classifier.norm(dim=0), torch.ones(3))
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 1])
    images = labels.float().view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone()
    loader = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    result = zero_shot_accuracy(model, loader, classifier, topk=(1, 2, 5))
    assert result.pop("images_per_second") > 0
    assert result == {"top1": 1.0, "top2": 1.0, "num_images": 7, "num_classes": 3}
    wrong = [(images, (labels + 1) % 3)]
    assert zero_shot_accuracy(model, wrong, classifier, topk=(1,))["top1"] == 0.0
    assert zero_shot_accuracy(model, loader, classifier, max_images=5)["num_images"] == 5


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return UniTok(TokenizerConfig.preset("unitok-tiny")).eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate_world(out, SynthConfig(num_images=40, size=64, classify_per_class=2, shard_size=8), workers=1)
    return out


def test_zero_shot_classifier_with_tiny_unitok(tiny_model):
    classifier = zero_shot_classifier(tiny_model, CLASSES, "simple")
    assert classifier.shape == (tiny_model.config.embed_dim, 3)
    torch.testing.assert_close(classifier.norm(dim=0), torch.ones(3))
    assert len(get_templates("openai-imagenet")) == 80
    with pytest.raises(ValueError, match="unknown template set"):
        get_templates("nope")


def test_evaluate_zero_shot_on_world_class_folder(tiny_model, world):
    class_dir = world / "classify" / "color" / "val"
    names = read_classnames(class_dir, sorted(p.name for p in class_dir.iterdir()))
    assert names == (world / "classify" / "color" / "classnames.txt").read_text().split()
    result = evaluate_zero_shot(tiny_model, class_dir, templates="synth-color", batch_size=8, max_images=10)
    assert result["num_images"] == 10 and result["num_classes"] == len(names)
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0


class TinyExtractor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)

    def forward(self, x_uint8):
        return torch.relu(self.conv(x_uint8.float() / 255)).mean(dim=(2, 3))


def test_evaluate_reconstruction_library(tiny_model, tmp_path):
    torch.manual_seed(0)
    images = torch.rand(10, 3, 64, 64) * 2 - 1
    loader = [images[:4], (images[4:8], ["captions"] * 4), {"images": images[8:], "skipped": 3}]
    inception = InceptionFeatures(extractor=TinyExtractor())
    result = evaluate_reconstruction(
        tiny_model, loader, inception=inception, grid_path=tmp_path / "grid.png", grid_size=3, progress=False
    )
    assert result["num_images"] == 10 and result["skipped_images"] == 3
    assert result["rfid"] > 0 and math.isfinite(result["rfid"]) and result["rfid_reference"] == "originals"
    assert 0 < result["psnr"] < 40 and -1 <= result["ssim"] < 1 and result["lpips"] is None
    cb = result["codebook"]
    assert cb["num_codes"] == 10 * 4 * 4 and len(cb["usage_percent"]) == tiny_model.config.num_codebooks
    assert Image.open(tmp_path / "grid.png").size[1] > 2 * 64  # two rows: originals and reconstructions

    # rFID against given reference statistics of the same originals is the same number.
    ref = FeatureStats()
    ref.update(inception(images))
    again = evaluate_reconstruction(
        tiny_model, [images], inception=inception, ref_stats=ref, fid_backend="torch", progress=False
    )
    assert again["rfid"] == pytest.approx(result["rfid"], rel=1e-6)
    assert again["rfid_reference"] == "given"
    # Called from a trainer: bf16 autocast works and the model's train mode is restored afterwards.
    tiny_model.train()
    short = evaluate_reconstruction(
        tiny_model, [images], max_images=3, autocast_dtype=torch.bfloat16, progress=False
    )
    assert tiny_model.training and short["num_images"] == 3 and math.isfinite(short["psnr"])
    tiny_model.eval()


def test_cli_on_image_folder_with_corrupt_file(tiny_model, world, tmp_path):
    model_dir = tiny_model.save_pretrained(tmp_path / "model")
    lpips_weights = tmp_path / "lpips_with_vgg.pth"  # the combined-file layout, random trunk
    torch.save(LPIPS(pretrained=False, min_size=16).state_dict(), lpips_weights)
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((world / "images" / "train").glob("*.png"))[:4]:
        (images / "nested").mkdir(exist_ok=True)
        (images / "nested" / path.name).write_bytes(path.read_bytes())
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out" / "report.json"
    status = eval_main(
        [
            "--model",
            str(model_dir),
            "--data",
            str(images),
            "--batch-size",
            "3",
            "--out",
            str(out),
            "--no-progress",
            "--zeroshot",
            str(world / "classify" / "shape" / "val"),
            "--templates",
            "synth-shape",
            "--grid-size",
            "4",
            "--lpips-weights",
            str(lpips_weights),
        ],
        prog="unitok eval-tokenizer",
    )
    assert status == 0
    report = json.loads(out.read_text())
    assert report["num_images"] == 4 and report["skipped_images"] == 1 and report["data_format"] == "images"
    assert report["rfid"] is None  # no Inception weights here: skipped, not crashed
    assert report["lpips"] > 0
    assert report["psnr"] > 0 and report["codebook"]["codebook_size"] == tiny_model.config.codebook_size
    assert report["zero_shot"]["num_classes"] == 8 and 0 <= report["zero_shot"]["top1"] <= 1
    markdown = out.with_suffix(".md").read_text()
    assert "| PSNR (dB) |" in markdown and "| rFID | n/a |" in markdown and "zero-shot top1" in markdown
    assert Image.open(out.with_name("report_grid.png")).size[0] >= 4 * 64


def test_cli_on_shards_with_local_inception_weights(world, tmp_path):
    """rFID through the real torch-fidelity Inception (random weights saved like the FID file) on WebDataset shards."""
    torch.manual_seed(0)
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    inception = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=1008, init_weights=False
    )
    torch.save(inception.state_dict(), weights)
    ref = tmp_path / "ref_stats.npz"
    np.savez(ref, mu=np.zeros(192), sigma=np.eye(192))
    status = eval_main(
        [
            "--preset",
            "unitok-tiny",
            "--data",
            str(world / "shards" / "train-{000000..000001}.tar"),
            "--max-images",
            "2",
            "--inception",
            str(weights),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
            "--grid-size",
            "0",
            "--ref",
            str(ref),
            "--fid-backend",
            "torch",
            "--fid-layer",
            "192",  # the 2048-d pool3 path is the same code; 192-d keeps the CPU test short
        ]
    )
    assert status == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["data_format"] == "shards" and report["num_images"] == 2 and report["skipped_images"] == 0
    assert report["rfid"] is not None and math.isfinite(report["rfid"]) and report["rfid"] >= 0
    assert report["rfid_reference"] == str(ref) and report["lpips"] is None  # no VGG weights: skipped
    assert report["grid"] is None and not (tmp_path / "out" / "recon_grid.png").exists()


def test_data_format_detection(world, tmp_path):
    assert build_image_dataset(str(world), 64)[1] == "image-text"  # captions/val.jsonl
    dataset, fmt = build_image_dataset(str(world / "classify" / "color" / "val"), 64)
    assert fmt == "images" and len(dataset) == 2 * 10 and dataset[0].shape == (3, 64, 64)
    assert build_image_dataset(str(world / "shards" / "val-*.tar"), 64)[1] == "shards"
    assert build_image_dataset(str(world / "shards"), 64)[1] == "shards"  # a folder of tars
    with pytest.raises(ValueError, match="holds no images"):
        build_image_dataset(str(tmp_path), 64)


def test_cli_errors(world, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        eval_main(
            [
                "--preset",
                "unitok-tiny",
                "--data",
                str(world),
                "--inception",
                str(tmp_path / "missing.pth"),
                "--out",
                str(tmp_path),
            ]
        )
    with pytest.raises(SystemExit):
        eval_main(["--preset", "unitok-tiny", "--data", str(world), "--batch-size", "0"])
    with pytest.raises(SystemExit):
        eval_main(["--data", str(world)])  # --model or --preset is required
    assert read_classnames(tmp_path, ["a_b", "c"]) == ["a b", "c"]
