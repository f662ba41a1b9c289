"""Zero-shot classification with UniTok's CLIP branch, on the quantized image features.

The classifier is open_clip's: per class, the text embeddings of all prompt templates are
L2-normalised, averaged and re-normalised. The prompts default to open_clip's 80 OpenAI ImageNet templates,
as in the paper; a class folder of the built-in synthetic world gets that world's own prompts instead
(``"auto"``, see :func:`default_templates`). Images go through ``model.encode_image`` (which reads the
quantized tokens in UniTok) and are scored with ``logits = 100 * cosine``, as in the paper's
ImageNet evaluation.

Shape legend: B batch, E CLIP embedding width, N classes.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .context import autocast, eval_mode

logger = logging.getLogger(__name__)

# Short prompts for the synthetic world's class folders (shape names, colour names).
SIMPLE_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {} shape.",
    "a {} object.",
    "an image of a {}.",
    "a picture of a {} thing.",
)
AUTO = "auto"
TEMPLATE_SETS = (AUTO, "simple", "openai-imagenet", "synth-shape", "synth-color")
LOGIT_SCALE = 100.0

Template = str | Callable[[str], str]


def get_templates(name: str) -> Sequence[Template]:
    """Prompt templates by name (``"auto"`` needs a class folder: see :func:`default_templates`).

    ``"simple"``: 5 short generic prompts; ``"openai-imagenet"``: open_clip's 80 ImageNet prompts (the
    paper's); ``"synth-shape"`` / ``"synth-color"``: the synthetic world's own prompts for its
    ``classify/shape`` and ``classify/color`` folders (``unitok.data.synth.ZERO_SHOT_TEMPLATES``).
    """
    if name == "simple":
        return SIMPLE_TEMPLATES
    if name == "openai-imagenet":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return OPENAI_IMAGENET_TEMPLATES
    if name in ("synth-shape", "synth-color"):
        from unitok.data.synth import ZERO_SHOT_TEMPLATES

        return ZERO_SHOT_TEMPLATES[name.removeprefix("synth-")]
    raise ValueError(f"unknown template set {name!r}; expected one of {TEMPLATE_SETS}")


def default_templates(class_dir: str | Path) -> str:
    """The template set ``"auto"`` stands for: ``"synth-shape"`` / ``"synth-color"`` for a class folder of
    the built-in synthetic world (``<world>/classify/{shape,color}/...`` next to the world's
    ``metadata.json``), else ``"openai-imagenet"`` (the paper's 80 prompts)."""
    from unitok.data.synth import WORLD_NAME

    class_dir = Path(class_dir).resolve()
    for folder in (class_dir, *class_dir.parents):
        if folder.parent.name == "classify" and folder.name in ("shape", "color"):
            metadata = folder.parent.parent / "metadata.json"
            try:
                is_world = json.loads(metadata.read_text(encoding="utf-8")).get("name") == WORLD_NAME
            except (OSError, ValueError, AttributeError):
                is_world = False
            if is_world:
                return f"synth-{folder.name}"
    return "openai-imagenet"


def imagenet_classnames() -> list[str]:
    """The 1000 ImageNet class names open_clip ships (the ones the paper's zero-shot numbers use)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def _model_device(model) -> torch.device:
    params = getattr(model, "parameters", None)
    first = next(params(), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def zero_shot_classifier(
    model,
    classnames: Sequence[str],
    templates: Sequence[Template] | str = "openai-imagenet",
    classes_per_batch: int = 10,
) -> torch.Tensor:
    """Text classifier weights [E, N]: mean of the normalised prompt embeddings per class, renormalised.

    Args:
        model: anything with ``tokenize_text(list[str]) -> LongTensor`` and
            ``encode_text(tokens, normalize=True) -> [B,E]`` (a UniTok).
        classnames: N class names, inserted into each template.
        templates: template strings with ``{}`` or callables, or a template set name (see :func:`get_templates`).
        classes_per_batch: classes whose prompts are encoded in one text forward.
    """
    from open_clip import build_zero_shot_classifier

    if isinstance(templates, str):
        if templates == AUTO:
            raise ValueError(
                'templates="auto" needs a class folder: use evaluate_zero_shot or default_templates'
            )
        templates = get_templates(templates)
    if not classnames or not templates:
        raise ValueError(
            f"need at least one class name and one template, got {len(classnames)} and {len(templates)}"
        )
    with eval_mode(model):
        return build_zero_shot_classifier(
            model,
            tokenizer=model.tokenize_text,
            classnames=list(classnames),
            templates=list(templates),
            num_classes_per_batch=classes_per_batch,
            device=_model_device(model),
        )


@torch.no_grad()
def zero_shot_accuracy(
    model,
    loader: Iterable,
    classifier_EN: torch.Tensor,
    topk: Sequence[int] = (1, 5),
    max_images: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict:
    """Top-k accuracy of ``argmax(100 * encode_image(img) @ classifier)`` over a labelled loader.

    Args:
        model: anything with ``encode_image(img_B3HW, normalize=True) -> [B,E]``.
        loader: yields ``(img_B3HW in [-1,1], labels_B)`` batches.
        classifier_EN: [E, N] from :func:`zero_shot_classifier`.
        topk: the k to report; those above N are left out (trivially 1.0).
        max_images: stop after this many images.
        autocast_dtype: e.g. ``torch.bfloat16`` to run the image tower under autocast.
        progress: show a tqdm bar.

    Returns:
        ``{"top1": fraction, "top5": fraction, ..., "num_images": n, "num_classes": N, "images_per_second": r}``.
    """
    num_classes = classifier_EN.shape[1]
    ks = [k for k in topk if k <= num_classes]
    if len(ks) < len(topk):
        logger.info("zero-shot: only %d classes, reporting top-k for k in %s", num_classes, ks)
    device = classifier_EN.device
    correct = dict.fromkeys(ks, 0)
    seen = 0
    start = time.perf_counter()
    with eval_mode(model):
        for img_B3HW, labels_B in tqdm(loader, desc="zero-shot", disable=not progress, leave=False):
            if max_images is not None and seen >= max_images:
                break
            if max_images is not None:
                img_B3HW, labels_B = img_B3HW[: max_images - seen], labels_B[: max_images - seen]
            img_B3HW, labels_B = img_B3HW.to(device), torch.as_tensor(labels_B).to(device)
            with autocast(device, autocast_dtype):
                feats_BE = model.encode_image(img_B3HW, normalize=True)
            logits_BN = LOGIT_SCALE * feats_BE.float() @ classifier_EN.float()
            if ks:
                ranked_Bk = logits_BN.topk(max(ks), dim=1).indices
                hits_Bk = ranked_Bk == labels_B[:, None]
                for k in ks:
                    correct[k] += int(hits_Bk[:, :k].any(dim=1).sum())
            seen += labels_B.shape[0]
    if seen == 0:
        raise ValueError("zero_shot_accuracy got no images from the loader")
    seconds = time.perf_counter() - start
    result = {f"top{k}": correct[k] / seen for k in ks}
    result.update(num_images=seen, num_classes=num_classes, images_per_second=seen / seconds)
    return result


def read_classnames(class_dir: str | Path, folder_names: Sequence[str]) -> list[str]:
    """Readable class names for the sorted sub-folders of an ImageNet-style class folder.

    In order of preference: a ``classnames.txt`` in ``class_dir`` or its parent with one line per
    class (label order, as the synthetic world writes it); open_clip's ImageNet names when the folders
    are the 1000 ImageNet synsets (``n01440764`` ...); else the folder names with ``_`` as spaces.
    """
    class_dir = Path(class_dir)
    for candidate in (class_dir / "classnames.txt", class_dir.parent / "classnames.txt"):
        if candidate.is_file():
            names = [
                line.strip() for line in candidate.read_text(encoding="utf-8").splitlines() if line.strip()
            ]
            if len(names) == len(folder_names):
                return names
            logger.warning(
                "%s has %d names for %d class folders; ignoring it", candidate, len(names), len(folder_names)
            )
    if len(folder_names) == 1000 and all(re.fullmatch(r"n\d{8}", name) for name in folder_names):
        return imagenet_classnames()
    return [name.replace("_", " ") for name in folder_names]


def evenly_spaced_subset(dataset, max_images: int | None):
    """The whole map-style dataset, or ``max_images`` items spread evenly over it (class folders are sorted by class)."""
    if max_images is None or max_images >= len(dataset):
        return dataset
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    indices = torch.linspace(0, len(dataset) - 1, max_images).round().long().unique().tolist()
    return Subset(dataset, indices)


def evaluate_zero_shot(
    model,
    class_dir: str | Path,
    templates: Sequence[Template] | str = AUTO,
    classnames: Sequence[str] | None = None,
    batch_size: int = 64,
    image_size: int | None = None,
    max_images: int | None = None,
    num_workers: int = 0,
    topk: Sequence[int] = (1, 5),
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict:
    """Zero-shot accuracy on an ImageNet-style folder ``class_dir/{class}/*.png`` (e.g. ``classify/shape/val``).

    Images are resized (short side, bicubic) and centre-cropped to ``image_size`` (default: the
    model's). ``classnames`` default to :func:`read_classnames`. ``max_images`` picks images evenly
    over the classes. ``templates="auto"`` is the paper's 80 ImageNet prompts except on a synthetic-world
    folder (:func:`default_templates`).

    Returns:
        :func:`zero_shot_accuracy`'s dict plus ``class_dir``, ``templates`` (the set's name, or "custom"),
        ``num_templates`` and
        ``skipped_images`` (unreadable files, counted in this process; None with workers).
    """
    from unitok.data import ClassFolder, eval_transform

    image_size = image_size or model.config.image_size
    if templates == AUTO:
        templates = default_templates(class_dir)
    prompts = get_templates(templates) if isinstance(templates, str) else templates
    dataset = ClassFolder(class_dir, transform=eval_transform(image_size))
    names = list(classnames) if classnames is not None else read_classnames(class_dir, dataset.classes)
    if len(names) != len(dataset.classes):
        raise ValueError(
            f"got {len(names)} class names for the {len(dataset.classes)} class folders of {class_dir}"
        )
    loader = DataLoader(
        evenly_spaced_subset(dataset, max_images), batch_size=batch_size, num_workers=num_workers
    )
    classifier_EN = zero_shot_classifier(model, names, prompts)
    result = zero_shot_accuracy(
        model, loader, classifier_EN, topk=topk, autocast_dtype=autocast_dtype, progress=progress
    )
    result.update(
        class_dir=str(class_dir),
        templates=templates if isinstance(templates, str) else "custom",
        num_templates=len(prompts),
        skipped_images=dataset.skipped.total if num_workers == 0 else None,
    )
    logger.info(
        "zero-shot on %s with %d %s prompts: %s",
        class_dir,
        len(prompts),
        result["templates"],
        {k: v for k, v in result.items() if k.startswith("top")},
    )
    return result
