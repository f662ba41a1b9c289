"""Check that the dependency floors in ``setup.py`` are real: install them and import the whole package.

``python -m unitok.scripts.check_floors`` (or ``make check-floors``) reads the ``>=`` floors of the pure-Python
dependencies from ``setup.py``, installs exactly those versions (``pip install --no-deps --target``) into a
scratch folder that shadows the environment's copies, and runs, in a fresh interpreter, an import of every
``unitok`` module plus probes of the APIs whose age set a floor. torch, torchvision and numpy stay the
environment's (their wheels are too large to install per check). Exit status 0 when everything imports.
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

# Dependencies installed at their floor for the check (pure Python or small wheels).
CHECKED = (
    "timm",
    "open-clip-torch",
    "transformers",
    "tokenizers",
    "peft",
    "huggingface-hub",
    "safetensors",
    "einops",
    "lpips",
    "webdataset",
    "torch-fidelity",
)
# Not dependencies of ours, but present in the test environment (lmms-eval brings datasets) and imported by
# transformers.Trainer when present; a copy that needs a newer huggingface_hub than the floor would fail there,
# so the check installs one from the floors' time, as a floor install would resolve it.
COMPANIONS = ("datasets==3.0.0",)
# The APIs whose first release sets a floor, as statements run under the floor versions.
PROBES = (
    "from timm.layers import calculate_drop_path_rates",
    "from transformers.trainer_utils import rotate_checkpoints",
    "import inspect, peft; assert 'trainable_token_indices' in inspect.signature(peft.LoraConfig).parameters",
    "from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError",
    "from huggingface_hub import HfApi, ModelCardData, hf_hub_download, snapshot_download",
    "from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric",
    "from open_clip import build_zero_shot_classifier",
    "from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES",
    "from webdataset.gopen import gopen, gopen_schemes",
)
PACKAGES = ("unitok.tokenizer", "unitok.data", "unitok.eval", "unitok.mllm", "unitok.scripts")
_REQUIREMENT = re.compile(r"^([A-Za-z0-9_.-]+)\s*>=\s*([0-9][A-Za-z0-9.]*)")


def read_floors(setup_py: str | os.PathLike) -> dict[str, str]:
    """``name -> floor`` of every ``name>=version`` requirement in ``setup.py``'s ``CORE`` list and ``EXTRAS``."""
    tree = ast.parse(Path(setup_py).read_text(encoding="utf-8"))
    floors = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id in ("CORE", "EXTRAS") for t in node.targets
        ):
            for constant in ast.walk(node.value):
                if isinstance(constant, ast.Constant) and isinstance(constant.value, str):
                    match = _REQUIREMENT.match(constant.value)
                    if match:
                        floors[match[1].lower().replace("_", "-")] = match[2]
    return floors


def probe_script() -> str:
    """The program run under the floor versions: every module of the package, then the API probes."""
    return "\n".join(
        [
            "import importlib, pkgutil, sys, traceback",
            "failed = []",
            f"for name in {PACKAGES!r}:",
            "    package = importlib.import_module(name)",
            "    for info in pkgutil.walk_packages(package.__path__, name + '.'):",
            "        if info.name.endswith('__main__'):",
            "            continue",
            "        try:",
            "            importlib.import_module(info.name)",
            "        except Exception as error:",
            "            failed.append(f'{info.name}: {type(error).__name__}: {error}')",
            f"for probe in {PROBES!r}:",
            "    try:",
            "        exec(probe, {})",
            "    except Exception as error:",
            "        failed.append(f'{probe}: {type(error).__name__}: {error}')",
            "print('\\n'.join(failed) or 'every module and API probe imports at the floors')",
            "sys.exit(1 if failed else 0)",
        ]
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Install the floors of ``CHECKED`` into a scratch folder and import everything with them; 0 on success."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--setup", default=str(Path(__file__).resolve().parents[1] / "setup.py"))
    parser.add_argument("--keep", help="install into this folder and keep it (default: a temporary folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not Path(args.setup).is_file():
        parser.error(f"no setup.py at {args.setup} (run from a source checkout or pass --setup)")
    floors = read_floors(args.setup)
    missing = [name for name in CHECKED if name not in floors]
    if missing:
        parser.error(f"setup.py gives no >= floor for {missing}")
    pins = [f"{name}=={floors[name]}" for name in CHECKED] + list(COMPANIONS)
    with tempfile.TemporaryDirectory(prefix="unitok-floors-") as scratch:
        target = Path(args.keep or scratch)
        logger.info("installing %s into %s", " ".join(pins), target)
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), *pins]
        subprocess.run(pip, check=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]))
        result = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", probe_script()], env=env, cwd=tempfile.gettempdir()
        )
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
