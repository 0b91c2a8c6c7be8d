"""Procedurally generated scenes of coloured shapes, with per-object masks and captions.

    from gem_jax import scenes
    s = scenes.scene(0, seed=0, split="train")       # one Scene, deterministic by (split, seed, index)
    s.image        # uint8 [H, W, 3]
    s.masks        # bool [K, H, W], one per object (disjoint)
    s.objects      # [("red", "circle"), ("blue", "square")]
    s.caption      # "a photo of a red circle and a blue square."
    b = scenes.batch(128, seed=0, split="train", start=0)   # stacked arrays + lists

Each scene has 1-3 objects of distinct colours (jittered around `COLORS`) and any shapes from
`SHAPES`, placed without overlap on a noisy low-saturation gradient background.  Scene `i` of
`(split, seed)` is drawn from `np.random.default_rng([SPLITS[split], seed, i])`, so it is the same
on every machine and in any batch order, and the "train" and "test" splits never share a stream.

This is the data the bundled toy CLIP (`gem_jax/assets/toy_clip`) was trained on, and the
held-out split its localization benchmark (`benchmarks/localization.py`) uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 170, 55),
    "blue": (35, 75, 220),
    "yellow": (240, 215, 35),
    "purple": (145, 55, 195),
    "orange": (245, 135, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
SPLITS = {"train": 0, "test": 1}
DEFAULT_SIZE = 64
_SS = 2  # supersampling per axis for antialiased edges


def prompt(color: str, shape: str) -> str:
    """The name of one object, e.g. "red circle"."""
    return f"{color} {shape}"


CLASS_NAMES: tuple[str, ...] = tuple(prompt(c, s) for c in COLORS for s in SHAPES)


def article(name: str) -> str:
    """ "a red circle", "an orange star"."""
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


def caption(objects: Sequence[tuple[str, str]]) -> str:
    """"a photo of a red circle.", "... a red circle and an orange square.",
    "... a red circle, a blue square and a green star." """
    names = [article(prompt(c, s)) for c, s in objects]
    if not names:
        raise ValueError("a caption needs at least one object")
    body = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"a photo of {body}."


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # uint8 [H, W, 3]
    masks: np.ndarray  # bool [K, H, W]
    objects: tuple  # ((color, shape), ...) in caption order
    caption: str

    def pil(self):
        from PIL import Image
        return Image.fromarray(self.image)


# ----------------------------------------------------------------------------- shapes
def _star_radius(phi, r_out, r_in):
    """Boundary radius of a 5-point star (tip at angle 0) in direction phi, straight edges."""
    seg = 2 * np.pi / 5
    t = np.mod(phi, seg)
    t = np.minimum(t, seg - t)  # symmetric about each tip
    p1 = np.array([r_out, 0.0])
    p2 = np.array([r_in * np.cos(seg / 2), r_in * np.sin(seg / 2)])
    d = p2 - p1
    # rho * u = p1 + s * d  =>  rho = (p1 x d) / (u x d)
    num = p1[0] * d[1] - p1[1] * d[0]
    den = np.cos(t) * d[1] - np.sin(t) * d[0]
    return num / den


def shape_alpha(shape: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Antialiased coverage in [0, 1] of one shape, float32 [size, size]."""
    n = size * _SS
    c = (np.arange(n, dtype=np.float64) + 0.5) / _SS
    yy, xx = np.meshgrid(c, c, indexing="ij")
    dx, dy = xx - cx, yy - cy
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy
    if shape == "circle":
        inside = u * u + v * v <= r * r
    elif shape == "square":
        h = 0.82 * r
        inside = (np.abs(u) <= h) & (np.abs(v) <= h)
    elif shape == "triangle":
        inside = np.ones_like(u, bool)
        for k in range(3):  # equilateral, circumradius r: vertex k at angle a, opposite edge at r/2
            a = np.pi / 2 + 2 * np.pi * k / 3
            inside &= (u * np.cos(a) + v * np.sin(a)) >= -0.5 * r
    elif shape == "star":
        rho = np.sqrt(u * u + v * v)
        inside = rho <= _star_radius(np.arctan2(v, u), r, 0.45 * r)
    elif shape == "cross":
        w = 0.36 * r
        inside = ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(v) <= r) & (np.abs(u) <= w))
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return inside.reshape(size, _SS, size, _SS).mean(axis=(1, 3)).astype(np.float32)


# ----------------------------------------------------------------------------- scenes
def _background(rng, size: int) -> np.ndarray:
    """A noisy linear gradient between two low-saturation colours, float32 [H, W, 3] in 0..255."""
    def dull():
        g = rng.uniform(55, 200)
        return g + rng.uniform(-18, 18, 3)
    c0, c1 = dull(), dull()
    theta = rng.uniform(0, 2 * np.pi)
    c = (np.arange(size) + 0.5) / size - 0.5
    yy, xx = np.meshgrid(c, c, indexing="ij")
    t = np.clip(0.5 + (np.cos(theta) * xx + np.sin(theta) * yy), 0, 1)[..., None]
    img = c0 * (1 - t) + c1 * t
    return img + rng.normal(0, rng.uniform(3, 10), img.shape)


def make_scene(rng: np.random.Generator, size: int = DEFAULT_SIZE, n_objects: int | None = None,
               max_tries: int = 100) -> Scene:
    """One scene from a numpy Generator (see `scene` for the seeded version)."""
    k = int(rng.integers(1, 4)) if n_objects is None else int(n_objects)
    if not 1 <= k <= len(COLORS):
        raise ValueError(f"n_objects must be in [1, {len(COLORS)}], got {k}")
    img = _background(rng, size)
    colors = [list(COLORS)[i] for i in rng.choice(len(COLORS), k, replace=False)]
    shapes = [SHAPES[i] for i in rng.integers(0, len(SHAPES), k)]
    placed: list[tuple[float, float, float]] = []
    for _ in range(k):
        shrink = 1.0  # objects get smaller while a crowded scene has no room for them
        for attempt in range(max_tries):
            if attempt and attempt % 20 == 0:
                shrink *= 0.85
            r = rng.uniform(0.12, 0.19) * size * shrink
            cx, cy = rng.uniform(r + 1, size - r - 1, 2)
            if all((cx - x) ** 2 + (cy - y) ** 2 >= (r + rr + 2) ** 2 for x, y, rr in placed):
                placed.append((cx, cy, r))
                break
    k = len(placed)  # an object that finds no room even shrunk is dropped (rare in practice)
    colors, shapes = colors[:k], shapes[:k]
    masks = np.zeros((k, size, size), bool)
    for i, ((cx, cy, r), col, shp) in enumerate(zip(placed, colors, shapes)):
        a = shape_alpha(shp, size, cx, cy, r, rng.uniform(0, 2 * np.pi))
        rgb = np.asarray(COLORS[col], np.float64) + rng.uniform(-22, 22, 3)
        fill = rgb + rng.normal(0, 4, (size, size, 3))
        img = img * (1 - a[..., None]) + fill * a[..., None]
        masks[i] = a >= 0.5
    objects = tuple(zip(colors, shapes))
    return Scene(np.clip(np.rint(img), 0, 255).astype(np.uint8), masks, objects, caption(objects))


def scene(index: int, seed: int = 0, split: str = "train", size: int = DEFAULT_SIZE) -> Scene:
    """Scene `index` of the (split, seed) stream; the same everywhere, whatever else is drawn."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    if index < 0 or seed < 0:
        raise ValueError("index and seed must be >= 0")
    return make_scene(np.random.default_rng([SPLITS[split], int(seed), int(index)]), size)


def scenes(n: int, seed: int = 0, split: str = "train", start: int = 0,
           size: int = DEFAULT_SIZE) -> list[Scene]:
    """Scenes start .. start+n-1 of the (split, seed) stream."""
    return [scene(i, seed, split, size) for i in range(start, start + n)]


def batch(n: int, seed: int = 0, split: str = "train", start: int = 0,
          size: int = DEFAULT_SIZE) -> dict:
    """Scenes stacked for training: images uint8 [n, H, W, 3], captions, objects, masks (a list of
    [K_i, H, W] arrays) and `groups` int [n]: equal ids mean identical object sets (positives of
    each other for a contrastive loss)."""
    ss = scenes(n, seed, split, start, size)
    keys: dict[frozenset, int] = {}
    groups = np.array([keys.setdefault(frozenset(s.objects), len(keys)) for s in ss], np.int32)
    return dict(images=np.stack([s.image for s in ss]), captions=[s.caption for s in ss],
                objects=[s.objects for s in ss], masks=[s.masks for s in ss], groups=groups)
