"""Installs the five project folders as the ``unitok`` namespace (see DESIGN.md, "Layout")."""

from pathlib import Path

from setuptools import find_namespace_packages, setup

HERE = Path(__file__).parent
FOLDERS = ("tokenizer", "mllm", "data", "eval", "scripts")


def _packages():
    names = []
    for folder in FOLDERS:
        names.append(f"unitok.{folder}")
        subs = find_namespace_packages(str(HERE / folder), exclude=["*__pycache__*"])
        names.extend(f"unitok.{folder}.{sub}" for sub in subs)
    return names


CORE = [
    "torch>=2.4",
    "torchvision>=0.19",
    "numpy",
    "pillow",
    "einops>=0.7",
    "safetensors>=0.4",
    "timm>=1.0.8",
    "open-clip-torch>=2.24",
    "transformers>=4.43",
    "peft>=0.11",
    "sentencepiece",
    "datasets",
    "lpips>=0.1.4",
    "webdataset>=0.2.86",
    "braceexpand",
    "tokenizers",
    "torch-fidelity>=0.4",
    "scipy",
    "pyyaml",
    "tqdm",
    "tensorboard",
]
EXTRAS = {
    "deepspeed": ["deepspeed>=0.14"],
    "eval": ["lmms-eval>=0.3", "filelock<4"],
    "demo": ["gradio>=6"],
    "wandb": ["wandb"],
    "dev": ["pytest>=8", "pytest-timeout", "hypothesis", "ruff", "selenium>=4.20"],
}
EXTRAS["all"] = sorted({dep for name, deps in EXTRAS.items() if name != "wandb" for dep in deps})

setup(
    name="unitok",
    version="0.1.0",
    description="UniTok: a unified visual tokenizer for generation and understanding, and the MLLM built on it",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir={f"unitok.{folder}": folder for folder in FOLDERS},
    packages=_packages(),
    package_data={
        "unitok.scripts.configs": ["*.yaml", "*.json"],
        "unitok.scripts.configs.mllm": ["*.yaml"],
        "unitok.scripts.configs.deepspeed": ["*.json"],
        "unitok.eval": ["geneval_prompts/*", "lmms_tasks/*/*"],
    },
    include_package_data=True,
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": ["unitok=unitok.scripts.cli:main"],
        "lmms_eval.models": ["unitok = unitok.eval.lmms:manifest"],
    },
)
