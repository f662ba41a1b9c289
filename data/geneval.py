"""GenEval-style text-to-image prompts over the synthetic world, and scenes that satisfy them.

The metadata lines have exactly GenEval's fields (``evaluation_metadata.jsonl``): ``tag`` (one of
the six GenEval tags), ``include`` (a list of ``{"class", "count"}`` with optional ``"color"`` and
``"position": [relation, index of the include item it is relative to]``), ``exclude`` (counting
prompts only, ``count + 1`` of the same class) and ``prompt`` in GenEval's wording ("a photo of two
circles", "a photo of a heart right of a square"). Classes are the world's shape names, colours are
GenEval's ten colour names.

``render_from_metadata`` draws an image that satisfies a metadata line, which makes an exact
GenEval-style scorer possible with ``unitok.data.detect.detect_objects`` as its detector.
"""

from __future__ import annotations

import itertools

import numpy as np
from PIL import Image

from .language import NUMBER_WORDS, article
from .world import (
    COLOR_NAMES,
    SHAPE_NAMES,
    SHAPES,
    SIZE_NAMES,
    ObjectSpec,
    Scene,
    SceneObject,
    place_objects,
    relations,
    sample_background,
)

GENEVAL_TAGS: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)
# Prompts per tag in GenEval's own file; a tag with fewer distinct prompts in our world gets all of them.
GENEVAL_TAG_COUNTS: dict[str, int] = {
    "single_object": 80,
    "two_object": 99,
    "counting": 80,
    "colors": 94,
    "position": 100,
    "color_attr": 100,
}
GENEVAL_RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
GENEVAL_COUNTS: tuple[int, ...] = (2, 3, 4)
# Shrink threshold used when placing objects for a position prompt (GenEval judges with 0.1).
RELATION_MARGIN_THRESHOLD = 0.15


def _a(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def _all_prompts(tag: str, shapes: tuple[str, ...], colors: tuple[str, ...]) -> list[dict]:
    """Every distinct metadata line of one tag, in a fixed order (the order of shapes/colours/relations)."""
    pairs = list(itertools.combinations(shapes, 2))
    if tag == "single_object":
        return [
            {"tag": tag, "include": [{"class": s, "count": 1}], "prompt": f"a photo of {_a(s)}"}
            for s in shapes
        ]
    if tag == "two_object":
        return [
            {
                "tag": tag,
                "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                "prompt": f"a photo of {_a(a)} and {_a(b)}",
            }
            for a, b in pairs
        ]
    if tag == "counting":
        return [
            {
                "tag": tag,
                "include": [{"class": s, "count": n}],
                "exclude": [{"class": s, "count": n + 1}],
                "prompt": f"a photo of {NUMBER_WORDS[n]} {SHAPES[s].plural}",
            }
            for s in shapes
            for n in GENEVAL_COUNTS
        ]
    if tag == "colors":
        return [
            {
                "tag": tag,
                "include": [{"class": s, "count": 1, "color": c}],
                "prompt": f"a photo of {_a(f'{c} {s}')}",
            }
            for s in shapes
            for c in colors
        ]
    if tag == "position":
        return [
            {
                "tag": tag,
                "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                "prompt": f"a photo of {_a(a)} {rel} {_a(b)}",
            }
            for a, b in itertools.permutations(shapes, 2)
            for rel in GENEVAL_RELATIONS
        ]
    if tag == "color_attr":
        return [
            {
                "tag": tag,
                "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                "prompt": f"a photo of {_a(f'{ca} {a}')} and {_a(f'{cb} {b}')}",
            }
            for a, b in pairs
            for ca, cb in itertools.permutations(colors, 2)
        ]
    raise ValueError(f"unknown GenEval tag {tag!r}; expected one of {', '.join(GENEVAL_TAGS)}")


def make_geneval_prompts(
    seed: int = 0,
    per_tag: dict[str, int] | None = None,
    shapes: tuple[str, ...] = SHAPE_NAMES,
    colors: tuple[str, ...] = COLOR_NAMES,
) -> list[dict]:
    """GenEval metadata lines for the world, grouped by tag in GenEval's tag order.

    Each tag gets ``per_tag[tag]`` distinct lines (default GENEVAL_TAG_COUNTS) drawn without
    replacement with ``seed``, or all distinct lines where the world has fewer. Two-object prompts
    name their classes in random order, as GenEval's do.
    """
    counts = dict(GENEVAL_TAG_COUNTS if per_tag is None else per_tag)
    unknown = set(counts) - set(GENEVAL_TAGS)
    if unknown:
        raise ValueError(
            f"unknown GenEval tags {sorted(unknown)}; expected keys among {', '.join(GENEVAL_TAGS)}"
        )
    rng = np.random.default_rng(seed)
    lines: list[dict] = []
    for tag in GENEVAL_TAGS:
        pool = _all_prompts(tag, shapes, colors)
        take = min(counts.get(tag, 0), len(pool))
        for i in sorted(rng.choice(len(pool), size=take, replace=False).tolist()):
            line = pool[i]
            if tag in ("two_object", "color_attr") and rng.random() < 0.5:
                line = _swap_pair(line)
            lines.append(line)
    return lines


def _swap_pair(line: dict) -> dict:
    first, second = line["include"]
    phrases = line["prompt"].removeprefix("a photo of ").split(" and ")
    return {**line, "include": [second, first], "prompt": f"a photo of {phrases[1]} and {phrases[0]}"}


def validate_metadata(meta: dict) -> None:
    """Raise ValueError unless ``meta`` is a GenEval metadata line over the world's classes and colours."""
    if meta.get("tag") not in GENEVAL_TAGS:
        raise ValueError(f"metadata tag must be one of {', '.join(GENEVAL_TAGS)}, got {meta.get('tag')!r}")
    if not isinstance(meta.get("prompt"), str):
        raise ValueError(f"metadata needs a 'prompt' string, got {meta.get('prompt')!r}")
    include = meta.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError(f"metadata needs a non-empty 'include' list, got {include!r}")
    for item in include + list(meta.get("exclude", [])):
        if item.get("class") not in SHAPE_NAMES:
            raise ValueError(
                f"class {item.get('class')!r} is not a shape of the world ({', '.join(SHAPE_NAMES)})"
            )
        if not isinstance(item.get("count"), int) or item["count"] < 1:
            raise ValueError(f"'count' must be a positive int, got {item.get('count')!r}")
        if "color" in item and item["color"] not in COLOR_NAMES:
            raise ValueError(f"color {item['color']!r} is not one of {', '.join(COLOR_NAMES)}")
    for item in include:
        if "position" in item:
            rel, ref = item["position"]
            if (
                rel not in GENEVAL_RELATIONS
                or not (isinstance(ref, int) and 0 <= ref < len(include))
                or include[ref] is item
            ):
                raise ValueError(
                    f"position must be [relation in {GENEVAL_RELATIONS}, index of another include item], got {item['position']!r}"
                )
    for ex in meta.get("exclude", []):
        for item in include:
            if item["class"] == ex["class"] and item["count"] >= ex["count"]:
                raise ValueError(f"exclude {ex} contradicts include {item}")


def scene_from_metadata(meta: dict, size: int = 64, seed: int = 0) -> Scene:
    """A random scene (drawn with ``seed``) that satisfies a GenEval metadata line.

    It holds exactly ``count`` objects of each included class, in the required colour (a random
    colour shared by the group otherwise), and every object of a group with a ``position`` stands in
    that relation (GenEval's rule, see ``world.relations``) to every object of the referenced group, with a
    margin (``RELATION_MARGIN_THRESHOLD``) so that boxes measured from the pixels agree.
    """
    validate_metadata(meta)
    rng = np.random.default_rng(seed)
    specs: list[ObjectSpec] = []
    group_of: list[int] = []
    for g, item in enumerate(meta["include"]):
        color = item.get("color") or COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
        size_class = SIZE_NAMES[int(rng.integers(len(SIZE_NAMES)))]
        specs += [ObjectSpec(item["class"], color, size_class)] * item["count"]
        group_of += [g] * item["count"]
    constraints = [
        (g, item["position"][0], item["position"][1])
        for g, item in enumerate(meta["include"])
        if "position" in item
    ]

    def satisfied(objects: tuple[SceneObject, ...]) -> bool:
        # A stricter shrink than GenEval's 0.1 keeps every relation clear of its borderline, so a scorer that
        # reads the boxes off the pixels (sub-pixel error) still sees it.
        return all(
            rel in relations(a.box, b.box, threshold=RELATION_MARGIN_THRESHOLD)
            for g, rel, ref in constraints
            for a, ga in zip(objects, group_of)
            for b, gb in zip(objects, group_of)
            if ga == g and gb == ref
        )

    objects = place_objects(rng, specs, size, accept=satisfied if constraints else None, max_restarts=200)
    return Scene(size, objects, sample_background(rng))


def render_from_metadata(meta: dict, size: int = 64, seed: int = 0) -> Image.Image:
    """An RGB image of ``size x size`` pixels that satisfies a GenEval metadata line (see ``scene_from_metadata``)."""
    return scene_from_metadata(meta, size, seed).render()
