"""lmms-eval integration: the ``unitok`` model for ``python -m lmms_eval --model unitok``.

Registered two ways (neither imports lmms-eval until it is used):

- the ``lmms_eval.models`` entry point of the installed package (``setup.py``), which lmms-eval 0.7 reads: it
  calls :func:`manifest`;
- the older plugin variable ``LMMS_EVAL_PLUGINS=unitok.eval.lmms``, which imports
  :mod:`unitok.eval.lmms.models` and reads its ``AVAILABLE_MODELS``.

The model class is :class:`unitok.eval.lmms.models.unitok.UniTokLMMS`.
"""

from __future__ import annotations

from typing import Any

MODEL_NAME = "unitok"
CLASS_PATH = "unitok.eval.lmms.models.unitok.UniTokLMMS"


def manifest() -> Any:
    """The lmms-eval ``ModelManifest`` of the ``unitok`` model (entry-point payload)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)
