"""Packaging: version, distribution name, licence and citation files, dependency floors and the core set."""

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import yaml
from packaging.version import Version

import unitok
from unitok.scripts import cli
from unitok.scripts.check_floors import CHECKED, read_floors

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("tokenizer", "mllm", "data", "eval", "scripts")
# APIs the code uses and the first release that has them.
NEEDED = {
    "timm": "1.0.21",  # timm.layers.calculate_drop_path_rates
    "peft": "0.15",  # LoraConfig(trainable_token_indices=...)
    "huggingface-hub": "1.3",  # required by transformers 5.2
    "safetensors": "0.4.3",  # required by transformers 5.2
    "transformers": "5.2",  # trainer_utils.rotate_checkpoints
    "torch-fidelity": "0.3",  # metric_fid.fid_statistics_to_metric
    "open-clip-torch": "2.24",  # build_zero_shot_classifier
}
# Core dependencies used without an import of their own name.
INDIRECT = {
    "pillow": "PIL",
    "pyyaml": "yaml",
    "open-clip-torch": "open_clip",
    "torch-fidelity": "torch_fidelity",
    "huggingface-hub": "huggingface_hub",
    "sentencepiece": None,  # loaded by transformers for Llama-2's tokenizer model
    "tensorboard": None,  # behind torch.utils.tensorboard
    "accelerate": None,  # required by transformers.Trainer
}


def _core_names():
    text = (ROOT / "setup.py").read_text()
    block = re.search(r"^CORE = \[(.*?)^\]", text, re.M | re.S)[1]
    return [
        re.match(r"[A-Za-z0-9_.-]+", item)[0].lower().replace("_", "-")
        for item in re.findall(r'"([^"]+)"', block)
    ]


def test_version_and_distribution_name():
    assert re.fullmatch(r"\d+\.\d+\.\d+", unitok.__version__)
    assert unitok.DISTRIBUTION_NAME != "unitok"  # taken on the package index by another project
    assert importlib.metadata.version(unitok.DISTRIBUTION_NAME) == unitok.__version__
    assert (Path(unitok.__file__).parent / "py.typed").is_file()


def test_unitok_version_command(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"unitok {unitok.__version__} ({unitok.DISTRIBUTION_NAME})"
    out = subprocess.run(
        [sys.executable, "-m", "unitok.scripts.cli", "-V"], capture_output=True, text=True, check=True
    )
    assert unitok.__version__ in out.stdout


def test_licence_citation_and_changelog():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["version"] == unitok.__version__
    paper = citation["preferred-citation"]
    assert "UniTok" in paper["title"] and "2502.20321" in paper["url"]
    assert len(paper["authors"]) == 8
    assert f"## {unitok.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_floors_cover_the_apis_the_code_uses():
    floors = read_floors(ROOT / "setup.py")
    for name, needed in NEEDED.items():
        assert name in floors, f"setup.py has no floor for {name}"
        assert Version(floors[name]) >= Version(needed), f"{name}>={floors[name]} is below {needed}"
    assert set(CHECKED) <= set(floors)


def test_every_core_dependency_is_used():
    sources = "\n".join(p.read_text() for folder in LIBRARY for p in (ROOT / folder).rglob("*.py"))
    unused = []
    for name in _core_names():
        module = INDIRECT.get(name, name.replace("-", "_"))
        if module is not None and not re.search(rf"^\s*(from|import) {re.escape(module)}\b", sources, re.M):
            unused.append(name)
    assert not unused, f"core dependencies never imported: {unused}"
    assert "datasets" not in _core_names()


def test_ablations_defaults_match_the_readme_and_stay_out_of_docs():
    from unitok.scripts.ablations import build_parser

    args = build_parser().parse_args([])
    readme = (ROOT / "README.md").read_text()
    assert f"unitok data synth --out {args.world} " in readme
    assert args.doc is None and args.json is None  # written under --out unless asked
    assert not args.out.startswith("docs")
