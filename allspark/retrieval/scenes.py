"""Generated aerial-like scenes with captions and two-level labels taken from their content (demo data).

A scene is a background of bare land with one to three objects, each in one of five places (north,
south, east, west, centre). Objects are the third-level labels; each belongs to one second-level class:

=================  ==========================================
second level       third level
=================  ==========================================
water              river, lake
built-up           residential buildings, industrial buildings
vegetation         forest, farmland
transport          road, parking lot
=================  ==========================================

Captions are written from the objects and places drawn for the image (several phrasings per image), so
a caption describes its image exactly and images sharing objects share labels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SECOND_LEVEL", "THIRD_LEVEL", "PARENT", "PLACES", "Scene", "make_scene", "make_scenes"]

PARENT = {
    "river": "water", "lake": "water",
    "residential buildings": "built-up", "industrial buildings": "built-up",
    "forest": "vegetation", "farmland": "vegetation",
    "road": "transport", "parking lot": "transport",
}
THIRD_LEVEL = tuple(PARENT)
SECOND_LEVEL = ("water", "built-up", "vegetation", "transport")
PLACES = ("north", "south", "east", "west", "centre")
# (row slice, col slice) of each place as fractions of the image side
_BOXES = {"north": (0.0, 0.45, 0.1, 0.9), "south": (0.55, 1.0, 0.1, 0.9), "west": (0.1, 0.9, 0.0, 0.45),
          "east": (0.1, 0.9, 0.55, 1.0), "centre": (0.28, 0.72, 0.28, 0.72)}
_TEMPLATES_ONE = ("{a} in the {pa} of the image.", "an aerial view with {a} in the {pa}.",
                  "the {pa} part of the scene shows {a}.")
_TEMPLATES_MANY = ("{a} in the {pa}, {rest}.", "an aerial view of {a} in the {pa} with {rest}.",
                   "there is {a} in the {pa} and {rest}.")


@dataclass
class Scene:
    image: np.ndarray  # uint8 [H, W, 3]
    objects: list[tuple[str, str]]  # (third-level label, place)
    captions: list[str]

    @property
    def third(self) -> list[str]:
        return sorted({o for o, _ in self.objects})

    @property
    def second(self) -> list[str]:
        return sorted({PARENT[o] for o, _ in self.objects})


def _paint(img: np.ndarray, obj: str, box: tuple[float, float, float, float], rng: np.random.Generator) -> None:
    size = img.shape[0]
    r0, r1, c0, c1 = (int(round(v * size)) for v in box)
    yy, xx = np.mgrid[r0:r1, c0:c1]
    h, w = r1 - r0, c1 - c0
    region = img[r0:r1, c0:c1]
    if obj == "river":
        horizontal = w >= h
        t = (xx - c0) / max(w, 1) if horizontal else (yy - r0) / max(h, 1)
        centre = 0.5 + 0.2 * np.sin(2 * np.pi * (t * rng.uniform(0.8, 1.5) + rng.uniform()))
        u = (yy - r0) / max(h, 1) if horizontal else (xx - c0) / max(w, 1)
        region[np.abs(u - centre) < rng.uniform(0.12, 0.2)] = (0.12, 0.25, 0.55)
    elif obj == "lake":
        cy, cx = r0 + h / 2, c0 + w / 2
        ry, rx = h * rng.uniform(0.3, 0.45), w * rng.uniform(0.3, 0.45)
        region[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = (0.08, 0.2, 0.42)
    elif obj == "residential buildings":
        step = max(3, size // 12)
        for y in range(r0 + 1, r1 - step + 1, step):
            for x in range(c0 + 1, c1 - step + 1, step):
                region[y - r0:y - r0 + step - 1, x - c0:x - c0 + step - 1] = (0.7, rng.uniform(0.3, 0.4), 0.3)
    elif obj == "industrial buildings":
        for _ in range(2):
            y, x = rng.integers(0, max(h // 2, 1)), rng.integers(0, max(w // 2, 1))
            g = rng.uniform(0.7, 0.85)
            region[y:y + h // 2, x:x + w // 2] = (g, g, g * 1.05)
    elif obj == "forest":
        region[:] = (0.1, 0.3, 0.1)
        for _ in range(12):
            cy, cx, r = rng.uniform(r0, r1), rng.uniform(c0, c1), rng.uniform(0.04, 0.08) * size
            region[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (0.12, rng.uniform(0.4, 0.5), 0.12)
    elif obj == "farmland":
        period = rng.integers(3, 6)
        band = ((xx if rng.uniform() < 0.5 else yy) // period) % 2
        palette = np.array([[0.75, 0.7, 0.3], [0.45, 0.65, 0.25]])
        region[:] = palette[band]
    elif obj == "road":
        width = max(2, size // 20)
        if w >= h:
            mid = (r0 + r1) // 2 - r0
            region[mid - width // 2:mid + width // 2 + 1] = (0.3, 0.3, 0.3)
        else:
            mid = (c0 + c1) // 2 - c0
            region[:, mid - width // 2:mid + width // 2 + 1] = (0.3, 0.3, 0.3)
    elif obj == "parking lot":
        region[h // 6:h - h // 6, w // 6:w - w // 6] = (0.45, 0.45, 0.48)
        for y in range(h // 6 + 2, h - h // 6 - 1, 4):
            for x in range(w // 6 + 1, w - w // 6 - 1, 3):
                region[y, x] = rng.choice([(0.9, 0.1, 0.1), (0.9, 0.9, 0.9), (0.1, 0.2, 0.8)])
    else:
        raise ValueError(f"unknown scene object {obj!r}; expected one of {THIRD_LEVEL}")


def _captions(objects: list[tuple[str, str]], rng: np.random.Generator, n: int) -> list[str]:
    out = []
    for k in range(n):
        order = list(objects) if k == 0 else [objects[i] for i in rng.permutation(len(objects))]
        (a, pa), rest = order[0], order[1:]
        if not rest:
            text = _TEMPLATES_ONE[k % len(_TEMPLATES_ONE)].format(a=a, pa=pa)
        else:
            text = _TEMPLATES_MANY[k % len(_TEMPLATES_MANY)].format(
                a=a, pa=pa, rest=" and ".join(f"{o} in the {p}" for o, p in rest))
        out.append(text[0].upper() + text[1:])
    return out


def make_scene(rng: np.random.Generator, size: int = 64, captions_per_image: int = 3) -> Scene:
    """One scene: 1-3 distinct objects in distinct places, noise and brightness jitter."""
    k = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    objs = [THIRD_LEVEL[i] for i in rng.choice(len(THIRD_LEVEL), size=k, replace=False)]
    places = [PLACES[i] for i in rng.choice(len(PLACES), size=k, replace=False)]
    img = np.empty((size, size, 3), np.float32)
    img[:] = (0.55, 0.5, 0.38)
    for obj, place in zip(objs, places):
        _paint(img, obj, _BOXES[place], rng)
    img = img * rng.uniform(0.85, 1.15) + rng.normal(0, 0.03, img.shape)
    arr = np.clip(img * 255, 0, 255).astype(np.uint8)
    objects = list(zip(objs, places))
    return Scene(arr, objects, _captions(objects, rng, captions_per_image))


def make_scenes(n: int, seed: int = 0, size: int = 64, captions_per_image: int = 3) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [make_scene(rng, size, captions_per_image) for _ in range(n)]
