"""The scene model of the built-in synthetic world: shapes, colours, sizes, placement and rendering.

A scene is a small image of 1-4 flat coloured shapes on a grey-ish background (solid, linear gradient
or light noise). Everything about it is known: each object's shape, colour, size class and box, and
how the objects stand relative to one another. Rendering is a pure function of the ``Scene`` value,
so the same scene always gives the same pixels.

Coordinates are continuous pixel coordinates of the output image: x grows to the right, y grows
downwards, an ``S``-pixel image spans ``[0, S]`` on both axes and pixel ``(i, j)`` covers
``[j, j+1) x [i, i+1)``. A box is ``(x0, y0, x1, y1)`` in those coordinates.

Anti-aliasing: objects are drawn ``supersample`` times larger with PIL, box-filtered down
(``Image.reduce``), which gives each output pixel its exact area coverage, and composited over the
background. Objects never overlap and keep a gap of a few pixels, so connected components of the
object pixels are the objects.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

Box = tuple[float, float, float, float]
RGB = tuple[int, int, int]

# GenEval's ten colour names (it scores colour by CLIP over exactly these), rendered as colours that
# stay far apart from one another and from the grey backgrounds below.
COLORS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 225, 30),
    "green": (30, 165, 50),
    "blue": (30, 80, 230),
    "purple": (140, 40, 190),
    "pink": (255, 120, 200),
    "brown": (125, 65, 10),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

# Size classes as the width of the object's box, in fractions of the image side.
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.18, 0.24), "large": (0.28, 0.36)}
SIZE_NAMES: tuple[str, ...] = tuple(SIZE_RANGES)
# The largest multiple of SIZE_RANGES that still leaves room for four objects of the large class.
MAX_OBJECT_SCALE = 1.5


def check_object_scale(scale: float) -> None:
    """Raise ValueError unless ``0 < scale <= MAX_OBJECT_SCALE`` (a multiple of the size classes' widths)."""
    if not 0 < scale <= MAX_OBJECT_SCALE:
        raise ValueError(f"object scale must be in (0, {MAX_OBJECT_SCALE}], got {scale}")


# Backgrounds: grey levels and per-channel tints chosen so that every background colour is at least
# 90 RGB units (Euclidean) from every object colour; noise (sigma 4 per channel) is added on top at
# the output resolution. Object colours are at least 90 units apart from one another.
BACKGROUND_KINDS: tuple[str, ...] = ("solid", "gradient", "noise")
_BG_LEVEL = (105, 165)
_BG_TINT = 10
_BG_NOISE_SIGMA = 4.0


def _regular_polygon(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [
        (radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _star(points: int, inner: float) -> list[tuple[float, float]]:
    outer = _regular_polygon(points)
    inner_pts = _regular_polygon(points, inner, phase=-math.pi / 2 + math.pi / points)
    return [p for pair in zip(outer, inner_pts) for p in pair]


def _heart(n: int) -> list[tuple[float, float]]:
    # The classic parametric heart curve, point down (y grows downwards).
    ts = [2 * math.pi * k / n for k in range(n)]
    return [
        (
            16 * math.sin(t) ** 3,
            -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)),
        )
        for t in ts
    ]


def _cross(arm: float) -> list[tuple[float, float]]:
    a = arm
    return [
        (-a, -1),
        (a, -1),
        (a, -a),
        (1, -a),
        (1, a),
        (a, a),
        (a, 1),
        (-a, 1),
        (-a, a),
        (-1, a),
        (-1, -a),
        (-a, -a),
    ]


@dataclass(frozen=True)
class ShapeSpec:
    """One shape class: its outline (and hole), normalised to fill ``[-1, 1] x [-aspect, aspect]``.

    ``outline``/``hole`` are polygon vertices in those normalised units (``hole`` is cut out of the
    outline, for the ring). Derived: ``aspect`` (height/width of the shape's box), ``area`` and
    ``centroid`` (x, y) of the painted region in normalised units. ``inside`` is a point of the
    normalised shape that lies well inside the painted area (the centre of a ring is a hole).
    """

    name: str
    plural: str
    outline: tuple[tuple[float, float], ...]
    hole: tuple[tuple[float, float], ...] = ()
    aspect: float = field(init=False)
    area: float = field(init=False)
    centroid: tuple[float, float] = field(init=False)
    inside: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        xs = [p[0] for p in self.outline]
        ys = [p[1] for p in self.outline]
        cx, cy, half_w = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, (max(xs) - min(xs)) / 2

        def norm(pts: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float], ...]:
            return tuple(((x - cx) / half_w, (y - cy) / half_w) for x, y in pts)

        object.__setattr__(self, "outline", norm(self.outline))
        object.__setattr__(self, "hole", norm(self.hole))
        object.__setattr__(self, "aspect", (max(ys) - min(ys)) / (max(xs) - min(xs)))
        (a_out, cx_out, cy_out), (a_hole, cx_hole, cy_hole) = (
            _area_centroid(self.outline),
            _area_centroid(self.hole),
        )
        area = a_out - a_hole
        object.__setattr__(self, "area", area)
        object.__setattr__(
            self,
            "centroid",
            ((a_out * cx_out - a_hole * cx_hole) / area, (a_out * cy_out - a_hole * cy_hole) / area),
        )


def _area_centroid(pts: tuple[tuple[float, float], ...]) -> tuple[float, float, float]:
    """Area and centroid (x, y) of a simple polygon by the shoelace formula; zeros for no polygon."""
    if not pts:
        return 0.0, 0.0, 0.0
    a = cx = cy = 0.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
        cross = x0 * y1 - x1 * y0
        a += cross
        cx += (x0 + x1) * cross
        cy += (y0 + y1) * cross
    a /= 2
    return abs(a), cx / (6 * a), cy / (6 * a)


def _make_shapes() -> dict[str, ShapeSpec]:
    specs = [
        ShapeSpec("circle", "circles", tuple(_regular_polygon(72))),
        ShapeSpec("square", "squares", ((-1, -1), (1, -1), (1, 1), (-1, 1))),
        ShapeSpec("triangle", "triangles", tuple(_regular_polygon(3)), inside=(0.0, 0.3)),
        ShapeSpec("diamond", "diamonds", ((0, -1.25), (1, 0), (0, 1.25), (-1, 0))),
        ShapeSpec("star", "stars", tuple(_star(5, 0.5))),
        ShapeSpec("cross", "crosses", tuple(_cross(0.36))),
        ShapeSpec(
            "ring", "rings", tuple(_regular_polygon(72)), tuple(_regular_polygon(72, 0.5)), inside=(0.75, 0.0)
        ),
        ShapeSpec("heart", "hearts", tuple(_heart(96))),
    ]
    return {s.name: s for s in specs}


SHAPES: dict[str, ShapeSpec] = _make_shapes()
SHAPE_NAMES: tuple[str, ...] = tuple(SHAPES)


def _check_name(value: str, known: tuple[str, ...], what: str) -> None:
    if value not in known:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(known)}")


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: shape class, colour name, size class and its box in output pixels."""

    shape: str
    color: str
    size: str
    box: Box

    def __post_init__(self) -> None:
        _check_name(self.shape, SHAPE_NAMES, "shape")
        _check_name(self.color, COLOR_NAMES, "color")
        _check_name(self.size, SIZE_NAMES, "size")

    @property
    def center(self) -> tuple[float, float]:
        """Centre of the box, (x, y) in pixels."""
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    def inside_point(self) -> tuple[float, float]:
        """A point (x, y) in pixels that lies well inside the painted shape."""
        x0, y0, x1, y1 = self.box
        u, v = SHAPES[self.shape].inside
        return (x0 + x1) / 2 + u * (x1 - x0) / 2, (y0 + y1) / 2 + v * (x1 - x0) / 2

    def to_dict(self, image_size: int) -> dict:
        """JSON ground truth: shape, color, size, bbox [x0,y0,x1,y1] and center [x,y] in pixels, region."""
        cx, cy = self.center
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "bbox": [round(v, 2) for v in self.box],
            "center": [round(cx, 2), round(cy, 2)],
            "region": region_name(cx, cy, image_size),
        }

    @classmethod
    def from_dict(cls, d: dict) -> SceneObject:
        """Inverse of ``to_dict`` (the box is the rounded one)."""
        return cls(d["shape"], d["color"], d["size"], tuple(float(v) for v in d["bbox"]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Background:
    """Background of a scene: ``kind`` in BACKGROUND_KINDS, one or two RGB colours, gradient angle
    (radians, direction in which the colour goes from ``colors[0]`` to ``colors[1]``) and the seed of
    the per-pixel noise (used only when ``kind == "noise"``)."""

    kind: str
    colors: tuple[RGB, ...]
    angle: float = 0.0
    noise_seed: int = 0

    def to_dict(self) -> dict:
        """JSON form (angle rounded to 1e-4 rad)."""
        d: dict = {"kind": self.kind, "colors": [list(c) for c in self.colors]}
        if self.kind == "gradient":
            d["angle"] = round(self.angle, 4)
        if self.kind == "noise":
            d["noise_seed"] = self.noise_seed
            d["noise_sigma"] = _BG_NOISE_SIGMA
        return d

    def array(self, size: int) -> np.ndarray:
        """The background as float32 [S, S, 3] in 0..255 (noise included)."""
        base = np.asarray(self.colors[0], dtype=np.float32)
        if self.kind == "gradient":
            coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
            t = np.cos(self.angle) * coords[None, :] + np.sin(self.angle) * coords[:, None]
            t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
            end = np.asarray(self.colors[1], dtype=np.float32)
            return base + t[..., None] * (end - base)
        bg = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
        if self.kind == "noise":
            noise = np.random.default_rng(self.noise_seed).normal(0.0, _BG_NOISE_SIGMA, (size, size, 3))
            bg = bg + noise.astype(np.float32)
        return bg


@dataclass(frozen=True)
class Scene:
    """A full scene: output side ``size`` in pixels, the objects and the background."""

    size: int
    objects: tuple[SceneObject, ...]
    background: Background

    def render(self, supersample: int = 4) -> Image.Image:
        """Render to an RGB PIL image of ``size x size`` pixels (see the module docstring)."""
        return Image.fromarray(render_array(self, supersample))

    def to_dict(self) -> dict:
        """JSON ground truth: ``{"size", "objects": [...], "background": {...}}``."""
        return {
            "size": self.size,
            "objects": [o.to_dict(self.size) for o in self.objects],
            "background": self.background.to_dict(),
        }


def shape_polygons(shape: str, box: Box) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Outline and hole (empty unless ring) of ``shape`` stretched to fill ``box``, in box units."""
    spec = SHAPES[shape]
    x0, y0, x1, y1 = box
    cx, cy, sx, sy = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / (2 * spec.aspect)

    def place(pts: tuple[tuple[float, float], ...]) -> list[tuple[float, float]]:
        return [(cx + u * sx, cy + v * sy) for u, v in pts]

    return place(spec.outline), place(spec.hole)


def coverage_mask(
    shapes_and_boxes: list[tuple[str, Box]], size: int | tuple[int, int], supersample: int = 4
) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of the given shapes, float32 [H, W] (``size`` = S or (W, H))."""
    width, height = (size, size) if isinstance(size, int) else size
    mask = Image.new("L", (width * supersample, height * supersample), 0)
    draw = ImageDraw.Draw(mask)
    for shape, box in shapes_and_boxes:
        outline, hole = shape_polygons(shape, _to_pil_box(box, supersample))
        draw.polygon(outline, fill=255)
        if hole:
            draw.polygon(hole, fill=0)
    return np.asarray(mask.reduce(supersample), dtype=np.float32) / 255.0


def _to_pil_box(box: Box, scale: int) -> Box:
    # PIL fills a pixel whose integer coordinate lies inside the polygon, i.e. it samples pixel (i, j)
    # at (j, i); our pixel (i, j) is centred at (j + 0.5, i + 0.5), hence the half-pixel shift.
    return tuple(v * scale - 0.5 for v in box)  # type: ignore[return-value]


def render_array(scene: Scene, supersample: int = 4) -> np.ndarray:
    """Render ``scene`` to uint8 [S, S, 3]."""
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    big = scene.size * supersample
    mask = Image.new("L", (big, big), 0)
    paint = Image.new("RGB", (big, big), (0, 0, 0))
    draw_mask, draw_paint = ImageDraw.Draw(mask), ImageDraw.Draw(paint)
    for obj in scene.objects:
        outline, hole = shape_polygons(obj.shape, _to_pil_box(obj.box, supersample))
        draw_mask.polygon(outline, fill=255)
        draw_paint.polygon(outline, fill=COLORS[obj.color])
        if hole:
            draw_mask.polygon(hole, fill=0)
            draw_paint.polygon(hole, fill=(0, 0, 0))
    cover = np.asarray(mask.reduce(supersample), dtype=np.float32)[..., None] / 255.0
    # Paint on black, box-filtered, is colour x coverage already (premultiplied alpha).
    premultiplied = np.asarray(paint.reduce(supersample), dtype=np.float32)
    out = scene.background.array(scene.size) * (1.0 - cover) + premultiplied
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8)


def region_name(x: float, y: float, image_size: int) -> str:
    """Name of the 3x3 cell holding point (x, y): "top left", "top", ..., "center", ..., "bottom right"."""
    col = ("left", "", "right")[min(int(3 * x / image_size), 2)]
    row = ("top", "", "bottom")[min(int(3 * y / image_size), 2)]
    return " ".join(p for p in (row, col) if p) or "center"


def relations(box_a: Box, box_b: Box, threshold: float = 0.1) -> set[str]:
    """Spatial relations of A relative to B under GenEval's rule: subset of {"left of", "right of", "above", "below"}.

    The centre offset A - B is shrunk on each axis by ``threshold * (dim_a + dim_b)`` and divided by
    the length of the unshrunk offset; a relation holds where that normalised component passes 0.5.
    """
    ca = np.array([(box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2])
    cb = np.array([(box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2])
    dims = np.array([box_a[2] - box_a[0] + box_b[2] - box_b[0], box_a[3] - box_a[1] + box_b[3] - box_b[1]])
    offset = ca - cb
    shrunk = np.maximum(np.abs(offset) - threshold * dims, 0.0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


def sample_background(rng: np.random.Generator, kind: str | None = None) -> Background:
    """Draw a background: kind uniform over BACKGROUND_KINDS unless given, grey-ish colours."""
    kind = kind if kind is not None else BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    _check_name(kind, BACKGROUND_KINDS, "background kind")

    def grey() -> RGB:
        level = int(rng.integers(_BG_LEVEL[0], _BG_LEVEL[1] + 1))
        tint = rng.integers(-_BG_TINT, _BG_TINT + 1, size=3)
        return tuple(int(level + t) for t in tint)  # type: ignore[return-value]

    if kind == "gradient":
        return Background(kind, (grey(), grey()), angle=float(rng.uniform(0, 2 * math.pi)))
    if kind == "noise":
        return Background(kind, (grey(),), noise_seed=int(rng.integers(2**31)))
    return Background(kind, (grey(),))


@dataclass(frozen=True)
class ObjectSpec:
    """What to place: shape, colour and size class (the box is chosen by ``place_objects``)."""

    shape: str
    color: str
    size: str


def place_objects(
    rng: np.random.Generator,
    specs: list[ObjectSpec],
    image_size: int,
    accept: Callable[[tuple[SceneObject, ...]], bool] | None = None,
    max_restarts: int = 60,
    scale: float = 1.0,
) -> tuple[SceneObject, ...]:
    """Give every spec a box inside the image so that no two boxes come closer than a small gap.

    Widths are drawn from the spec's size class (``SIZE_RANGES``, times ``scale``); boxes keep a margin to
    the image border and a gap of ``max(2, 0.05 * S)`` pixels between each other. ``accept(objects) ->
    bool`` is an extra constraint on a full placement (e.g. a spatial relation). After every 10 failed
    attempts the sizes shrink by 10%, which always lets up to four objects fit (for ``scale`` up to
    ``MAX_OBJECT_SCALE``). Raises RuntimeError when nothing fits.
    """
    check_object_scale(scale)
    gap = max(2.0, 0.05 * image_size)
    margin = max(1.0, 0.03 * image_size)
    shrink = 1.0
    for attempt in range(max_restarts):
        if attempt and attempt % 10 == 0:
            shrink *= 0.9
        placed: list[SceneObject] = []
        for spec in specs:
            lo, hi = SIZE_RANGES[spec.size]
            width = float(rng.uniform(lo, hi)) * image_size * scale * shrink
            height = width * SHAPES[spec.shape].aspect
            box = _free_box(rng, width, height, image_size, margin, gap, [o.box for o in placed])
            if box is None:
                break
            placed.append(SceneObject(spec.shape, spec.color, spec.size, box))
        else:
            if accept is None or accept(tuple(placed)):
                return tuple(placed)
    raise RuntimeError(
        f"could not place {len(specs)} objects in a {image_size}px image after {max_restarts} attempts"
    )


def _free_box(
    rng: np.random.Generator,
    width: float,
    height: float,
    image_size: int,
    margin: float,
    gap: float,
    taken: list[Box],
) -> Box | None:
    if width + 2 * margin > image_size or height + 2 * margin > image_size:
        return None
    for _ in range(30):
        x0 = float(rng.uniform(margin, image_size - margin - width))
        y0 = float(rng.uniform(margin, image_size - margin - height))
        box = (x0, y0, x0 + width, y0 + height)
        if all(_apart(box, other, gap) for other in taken):
            return box
    return None


def _apart(a: Box, b: Box, gap: float) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def sample_groups(rng: np.random.Generator, max_objects: int = 4) -> list[tuple[ObjectSpec, int]]:
    """Draw the content of a scene as groups of identical objects: [(spec, count)], 1..max_objects in all.

    The total is uniform in 1..max_objects, split into 1-3 groups with distinct (shape, colour).
    Objects of a group share a size class.
    """
    total = int(rng.integers(1, max_objects + 1))
    num_groups = int(rng.integers(1, min(total, 3) + 1))
    cuts = (
        sorted(rng.choice(np.arange(1, total), size=num_groups - 1, replace=False).tolist())
        if num_groups > 1
        else []
    )
    counts = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
    groups: list[tuple[ObjectSpec, int]] = []
    used: set[tuple[str, str]] = set()
    for count in counts:
        while True:
            shape = SHAPE_NAMES[int(rng.integers(len(SHAPE_NAMES)))]
            color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
            if (shape, color) not in used:
                break
        used.add((shape, color))
        size = SIZE_NAMES[int(rng.integers(len(SIZE_NAMES)))]
        groups.append((ObjectSpec(shape, color, size), count))
    return groups


def sample_scene(
    rng: np.random.Generator, image_size: int = 64, max_objects: int = 4, object_scale: float = 1.0
) -> tuple[Scene, list[tuple[ObjectSpec, int]]]:
    """Draw a random scene; returns it with the groups it was built from (for the captions).

    ``object_scale`` multiplies the object widths of every size class (see ``place_objects``).
    """
    if image_size < 32:
        raise ValueError(
            f"image_size must be at least 32 pixels to hold recognisable shapes, got {image_size}"
        )
    if not 1 <= max_objects <= 4:
        raise ValueError(f"max_objects must be in 1..4, got {max_objects}")
    groups = sample_groups(rng, max_objects)
    specs = [spec for spec, count in groups for _ in range(count)]
    objects = place_objects(rng, specs, image_size, scale=object_scale)
    return Scene(image_size, objects, sample_background(rng)), groups


def single_object_scene(
    rng: np.random.Generator,
    image_size: int,
    shape: str | None = None,
    color: str | None = None,
    object_scale: float = 1.0,
) -> Scene:
    """A scene with one object; shape and colour drawn uniformly unless given (for classification sets)."""
    shape = shape if shape is not None else SHAPE_NAMES[int(rng.integers(len(SHAPE_NAMES)))]
    color = color if color is not None else COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
    size = SIZE_NAMES[int(rng.integers(len(SIZE_NAMES)))]
    objects = place_objects(rng, [ObjectSpec(shape, color, size)], image_size, scale=object_scale)
    return Scene(image_size, objects, sample_background(rng))
