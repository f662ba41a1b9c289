"""Installs the five project folders as sub-packages of ``unitok`` (see DESIGN.md, "Layout").

``unitok/`` holds only the top-level package (``__version__``, ``py.typed``). The distribution is named
``unitok-tokenizer`` because ``unitok`` on the package index is an unrelated project; the import name stays
``unitok``. Floors are the oldest versions whose APIs the code uses (``python -m unitok.scripts.check_floors``
installs them and imports everything).
"""

import re
from pathlib import Path

from setuptools import find_namespace_packages, setup

HERE = Path(__file__).parent
FOLDERS = ("tokenizer", "mllm", "data", "eval", "scripts")
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "unitok" / "__init__.py").read_text(), re.M)[1]


def _packages():
    names = ["unitok"]
    for folder in FOLDERS:
        names.append(f"unitok.{folder}")
        subs = find_namespace_packages(str(HERE / folder), exclude=["*__pycache__*"])
        names.extend(f"unitok.{folder}.{sub}" for sub in subs)
    return names


CORE = [
    "torch>=2.4",
    "torchvision>=0.19",
    "numpy>=1.24",
    "pillow>=10.1",  # Image.Resampling, ImageFont.load_default(size=...)
    "einops>=0.7",
    "safetensors>=0.4.3",  # as transformers 5.2 needs
    "timm>=1.0.21",  # timm.layers.calculate_drop_path_rates
    "open-clip-torch>=2.24",
    "transformers>=5.2",  # transformers.trainer_utils.rotate_checkpoints in the MLLM trainer
    "peft>=0.15",  # LoraConfig(trainable_token_indices=...)
    "huggingface_hub>=1.3",  # as transformers 5.2 needs (0.25 for huggingface_hub.errors otherwise)
    "sentencepiece",  # Llama-2's tokenizer model
    "accelerate>=1.1",  # transformers.Trainer (the MLLM trainer) requires it
    "pyarrow>=12",  # the MLLM code store (Arrow shards)
    "lpips>=0.1.4",
    "webdataset>=0.2.86",
    "braceexpand",
    "tokenizers>=0.22",  # as transformers 5.2 needs
    "torch-fidelity>=0.3",  # metric_fid.fid_statistics_to_metric and the FID Inception
    "scipy",  # scipy.ndimage in the synthetic world's GenEval scorer
    "pyyaml",
    "tqdm",
    "tensorboard",  # torch.utils.tensorboard in the trainers
]
EXTRAS = {
    "deepspeed": ["deepspeed>=0.14"],
    "eval": ["lmms-eval>=0.3", "filelock<4"],
    "demo": ["gradio>=6"],
    "wandb": ["wandb"],
    "dev": ["pytest>=8", "pytest-timeout", "hypothesis", "ruff", "selenium>=4.20"],
}
# What `make quickstart` installs: its VQA stage runs the real lmms-eval pipeline.
EXTRAS["quickstart"] = list(EXTRAS["eval"])
# What `make test` installs: the suite exercises DeepSpeed, the lmms-eval plugin and the demo app.
EXTRAS["test"] = sorted({dep for name in ("dev", "deepspeed", "eval", "demo") for dep in EXTRAS[name]})
EXTRAS["all"] = sorted({dep for deps in EXTRAS.values() for dep in deps})

setup(
    name="unitok-tokenizer",
    version=VERSION,
    description="UniTok: a unified visual tokenizer for generation and understanding, and the MLLM built on it",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir={"unitok": "unitok", **{f"unitok.{folder}": folder for folder in FOLDERS}},
    packages=_packages(),
    package_data={
        "unitok": ["py.typed"],
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
