"""Text about scenes of the synthetic world: captions and VQA-style question/answer pairs.

Everything said is true of the scene by construction (checked against the ground truth in the
tests). Answers follow VQAv2 conventions: one lower-case word, ``yes``/``no``, or a digit.
Spelling is American ("color", "center"), as in VQAv2 and GenEval.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from .world import COLOR_NAMES, SHAPE_NAMES, SHAPES, ObjectSpec, Scene, SceneObject, relations

NUMBER_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
QA_KINDS: tuple[str, ...] = ("color", "count", "existence", "position", "shape")
RELATION_PHRASES: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
_REGION_PHRASES: dict[str, str] = {
    "center": "in the center",
    "top": "at the top",
    "bottom": "at the bottom",
    "left": "on the left",
    "right": "on the right",
}
# Share of the captions of scenes whose groups differ in shape that leave the colours out.
COLORLESS_CAPTION_P = 0.4
_CAPTION_PREFIXES: tuple[str, ...] = ("", "a photo of ", "an image of ", "a picture of ", "a rendering of ")
T = TypeVar("T")
_BACKGROUND_PHRASES: dict[str, str] = {
    "solid": "on a plain gray background",
    "gradient": "on a gray gradient background",
    "noise": "on a grainy gray background",
}


def article(word: str) -> str:
    """'a' or 'an' for the next word."""
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(count: int, shape: str, color: str | None = None, size: str | None = None) -> str:
    """'a red circle', 'two small blue squares', 'an orange heart'."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    words = [w for w in (size, color) if w]
    noun = SHAPES[shape].name if count == 1 else SHAPES[shape].plural
    head = " ".join([*words, noun])
    return f"{article(head)} {head}" if count == 1 else f"{NUMBER_WORDS[count]} {head}"


def region_phrase(region: str) -> str:
    """Prepositional phrase for a 3x3 region name: 'in the top left corner', 'on the left', 'in the center'."""
    return _REGION_PHRASES.get(region, f"in the {region} corner")


def _group_objects(scene: Scene, spec: ObjectSpec) -> list[SceneObject]:
    return [o for o in scene.objects if (o.shape, o.color) == (spec.shape, spec.color)]


def common_relation(a: list[SceneObject], b: list[SceneObject]) -> list[str]:
    """Relations (GenEval rule) that hold from every object of ``a`` to every object of ``b``, sorted."""
    shared: set[str] | None = None
    for oa in a:
        for ob in b:
            found = relations(oa.box, ob.box)
            shared = found if shared is None else shared & found
    return sorted(shared or ())


def caption(scene: Scene, groups: list[tuple[ObjectSpec, int]], rng: np.random.Generator) -> str:
    """One caption of a scene built from ``groups`` (as returned by ``world.sample_groups``).

    One object: 'a red circle in the top left corner'. Two groups in a clear spatial relation: 'two red
    circles to the left of a blue square'. Otherwise the groups are listed. The size class is said
    half of the time, a prefix ('a photo of ...') and the background now and then. When the groups have
    different shapes, the colours go unsaid in a share ``COLORLESS_CAPTION_P`` of the captions ('a star
    above two circles'), as people often describe a scene: such captions can only be matched to their
    image by its shapes, which the contrastive loss would otherwise never need.
    """
    order = [int(i) for i in rng.permutation(len(groups))]
    with_size = bool(rng.random() < 0.5)
    shapes_distinct = len({spec.shape for spec, _ in groups}) == len(groups)
    with_color = not (shapes_distinct and rng.random() < COLORLESS_CAPTION_P)
    phrases = [
        noun_phrase(
            groups[i][1],
            groups[i][0].shape,
            groups[i][0].color if with_color else None,
            groups[i][0].size if with_size else None,
        )
        for i in order
    ]
    if len(groups) == 1 and groups[0][1] == 1:
        region = scene.objects[0].to_dict(scene.size)["region"]
        text = f"{phrases[0]} {region_phrase(region)}"
    elif len(groups) == 2:
        rels = common_relation(
            _group_objects(scene, groups[order[0]][0]), _group_objects(scene, groups[order[1]][0])
        )
        if rels:
            rel = rels[int(rng.integers(len(rels)))]
            text = f"{phrases[0]} {RELATION_PHRASES[rel]} {phrases[1]}"
        else:
            text = f"{phrases[0]} and {phrases[1]}"
    else:
        text = ", ".join(phrases[:-1]) + f" and {phrases[-1]}" if len(phrases) > 1 else phrases[0]
    prefix = _CAPTION_PREFIXES[int(rng.integers(len(_CAPTION_PREFIXES)))]
    if rng.random() < 0.3:
        text = f"{text} {_BACKGROUND_PHRASES[scene.background.kind]}"
    return prefix + text


def direction_word(obj: SceneObject, image_size: int) -> str | None:
    """Single-word position of an object in the image ('left', 'right', 'top', 'bottom', 'center').

    None when the answer would be ambiguous (near a diagonal or at the edge of the center).
    """
    cx, cy = obj.center
    dx, dy = cx / image_size - 0.5, cy / image_size - 0.5
    if max(abs(dx), abs(dy)) < 0.1:
        return "center"
    if max(abs(dx), abs(dy)) < 0.2 or abs(abs(dx) - abs(dy)) < 0.1:
        return None
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _group_by(objs: list, attribute: str) -> dict[str, list]:
    """Objects grouped by the value of ``attribute`` ("shape" or "color"), values sorted."""
    values = sorted({getattr(o, attribute) for o in objs})
    return {v: [o for o in objs if getattr(o, attribute) == v] for v in values}


def _pick_uniform(groups: dict[str, list], attribute: str, rng) -> tuple[str, list] | None:
    """A random group whose objects all share one ``attribute`` value, as ``(key, objects)``; None if none is."""
    uniform = [key for key, group in groups.items() if len({getattr(o, attribute) for o in group}) == 1]
    if not uniform:
        return None
    key = _pick(rng, uniform)
    return key, groups[key]


def questions(scene: Scene, rng: np.random.Generator) -> list[dict[str, str]]:
    """Question/answer pairs about a scene: at most one per kind of QA_KINDS that has a clear answer.

    Each item is ``{"kind", "question", "answer"}``. Existence questions are yes/no with equal odds;
    colour/position/shape questions refer only to objects the question identifies uniquely.
    """
    objs = list(scene.objects)
    out: list[dict[str, str]] = []
    # colour: of a shape whose objects all share one colour
    by_shape = _group_by(objs, "shape")
    picked = _pick_uniform(by_shape, "color", rng)
    if picked is not None:
        shape, group = picked
        q = (
            f"What color is the {shape}?"
            if len(group) == 1
            else f"What color are the {SHAPES[shape].plural}?"
        )
        out.append({"kind": "color", "question": q, "answer": group[0].color})
    # count: of a shape, a colour, or all objects
    choice = int(rng.integers(3))
    if choice == 0:
        shape = _pick(rng, SHAPE_NAMES if rng.random() < 0.2 else sorted(by_shape))
        q, n = f"How many {SHAPES[shape].plural} are there?", len(by_shape.get(shape, []))
    elif choice == 1:
        color = _pick(rng, sorted({o.color for o in objs}))
        q, n = f"How many {color} objects are there?", sum(o.color == color for o in objs)
    else:
        q, n = "How many objects are in the image?", len(objs)
    out.append({"kind": "count", "question": q, "answer": str(n)})
    # existence: yes about a present (colour, shape), no about an absent one
    present = sorted({(o.color, o.shape) for o in objs})
    if rng.random() < 0.5:
        color, shape = _pick(rng, present)
        answer = "yes"
    else:
        while True:
            color, shape = _pick(rng, COLOR_NAMES), _pick(rng, SHAPE_NAMES)
            if (color, shape) not in present:
                break
        answer = "no"
    out.append(
        {
            "kind": "existence",
            "question": f"Is there {noun_phrase(1, shape, color)} in the image?",
            "answer": answer,
        }
    )
    # position: where a unique object is, or whether a relation holds between two unique objects
    unique = [o for o in objs if sum((p.color, p.shape) == (o.color, o.shape) for p in objs) == 1]
    position = _position_question(scene, unique, rng)
    if position is not None:
        out.append(position)
    # shape: of a colour whose objects all share one shape
    picked = _pick_uniform(_group_by(objs, "color"), "shape", rng)
    if picked is not None:
        color, group = picked
        q = (
            f"What shape is the {color} object?"
            if len(group) == 1
            else f"What shape are the {color} objects?"
        )
        out.append({"kind": "shape", "question": q, "answer": group[0].shape})
    return out


_OPPOSITE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _position_question(
    scene: Scene, unique: list[SceneObject], rng: np.random.Generator
) -> dict[str, str] | None:
    pairs = [(a, b, sorted(relations(a.box, b.box))) for a in unique for b in unique if a is not b]
    pairs = [p for p in pairs if p[2]]
    if pairs and rng.random() < 0.5:
        # Yes: a relation that holds; no: its opposite (never a borderline case).
        a, b, held = _pick(rng, pairs)
        rel = _pick(rng, held)
        answer = "yes" if rng.random() < 0.5 else "no"
        asked = rel if answer == "yes" else _OPPOSITE[rel]
        q = f"Is the {a.color} {a.shape} {RELATION_PHRASES[asked]} the {b.color} {b.shape}?"
        return {"kind": "position", "question": q, "answer": answer}
    candidates = [(o, w) for o in unique if (w := direction_word(o, scene.size)) is not None]
    if not candidates:
        return None
    obj, word = _pick(rng, candidates)
    return {"kind": "position", "question": f"Where is the {obj.color} {obj.shape}?", "answer": word}


def _pick(rng: np.random.Generator, items: Sequence[T]) -> T:
    return items[int(rng.integers(len(items)))]
