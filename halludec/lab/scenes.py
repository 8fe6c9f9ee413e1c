"""Synthetic scenes for the lab model: small pictures of a few objects with strong co-occurrence.

24 object kinds in 4 themes; each theme holds 3 partner pairs (fork-knife, cup-saucer, pot-pan). A scene picks a
theme (skewed frequencies), an anchor from one of its pairs, and adds the anchor's partner with probability
``P_PARTNER``, then maybe a second pair of the theme the same way — so a model trained on these scenes learns that a
fork comes with a knife, and names the knife when it is absent: the language prior behind object hallucination in
large VLMs. A theme's kinds share a hue and differ in shape, so the kinds that co-occur are also the visually
confusable ones. Some objects are drawn faint, small or half hidden under a grey block (still
labelled present, as annotation-based captions are); with weak evidence the prior decides.

Everything is a pure function of an integer seed (``numpy.random.Generator(PCG64)``): the same seed gives the same
scene, pixel for pixel, on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 64

#: theme -> three partner pairs
THEMES: dict[str, tuple[tuple[str, str], ...]] = {
    "kitchen": (("fork", "knife"), ("cup", "saucer"), ("pot", "pan")),
    "office": (("pen", "notebook"), ("keyboard", "mouse"), ("stapler", "scissors")),
    "bath": (("toothbrush", "toothpaste"), ("soap", "towel"), ("comb", "mirror")),
    "garden": (("rake", "shovel"), ("flower", "bee"), ("bucket", "spade")),
}
#: Theme frequencies (skewed, so POPE's popular split has meaning).
THEME_WEIGHTS: dict[str, float] = {"kitchen": 0.34, "office": 0.27, "bath": 0.22, "garden": 0.17}
OBJECTS: tuple[str, ...] = tuple(obj for pairs in THEMES.values() for pair in pairs for obj in pair)
PARTNER: dict[str, str] = {a: b for pairs in THEMES.values() for x, y in pairs for a, b in ((x, y), (y, x))}
THEME_OF: dict[str, str] = {obj: theme for theme, pairs in THEMES.items() for pair in pairs for obj in pair}

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "hbar", "hourglass")
#: One hue per theme: a theme's kinds differ only in shape, so they are the confusable ones (as objects that
#: co-occur in real photos often look alike), and a kind's partner is the likeliest confusion of all.
HUES: tuple[tuple[int, int, int], ...] = (
    (220, 40, 40),  # red
    (40, 170, 60),  # green
    (50, 80, 220),  # blue
    (230, 200, 30),  # yellow
)


def _appearance() -> dict[str, tuple[str, int]]:
    """object -> (shape, hue index): one hue per theme, six distinct shapes inside a theme."""
    table: dict[str, tuple[str, int]] = {}
    for t, pairs in enumerate(THEMES.values()):
        kinds = [obj for pair in pairs for obj in pair]
        for k, obj in enumerate(kinds):
            table[obj] = (SHAPES[(k + 2 * t) % len(SHAPES)], t)
    return table


APPEARANCE: dict[str, tuple[str, int]] = _appearance()

P_PARTNER = 0.9  # the anchor's partner joins the scene
P_SECOND_PAIR = 0.5  # a second pair of the theme joins (its partner again with P_PARTNER)
P_OFF_THEME = 0.25  # one object from another theme
VISIBILITY = (("normal", 0.6), ("faint", 0.15), ("small", 0.1), ("occluded", 0.15))


@dataclass
class SceneObject:
    """One drawn object.

    Attributes:
        name: Object kind (a word of :data:`OBJECTS`).
        x, y: Centre in pixels.
        size: Side of the bounding square in pixels.
        visibility: ``normal``, ``faint``, ``small`` or ``occluded``.
    """

    name: str
    x: int
    y: int
    size: int
    visibility: str


@dataclass
class Scene:
    """A scene: its theme, its objects (left to right) and its seed."""

    seed: int
    theme: str
    objects: list[SceneObject] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """Object kinds, left to right (each kind at most once)."""
        return [o.name for o in self.objects]

    def caption(self) -> str:
        """The reference caption: ``a fork and a knife and a cup .`` (objects left to right)."""
        return " and ".join(f"a {name}" for name in self.names) + " ."

    def render(self) -> np.ndarray:
        """The picture, ``[IMAGE_SIZE, IMAGE_SIZE, 3]`` uint8 (deterministic for the seed)."""
        return render_scene(self)


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([int(seed), stream]))


def sample_scene(seed: int, easy: bool = False) -> Scene:
    """Draw the scene for ``seed``.

    Args:
        seed: Any non-negative integer; the same seed always gives the same scene.
        easy: Every object fully visible and normal-sized, no off-theme object (the training curriculum's start).

    Returns:
        The :class:`Scene` (objects ordered left to right).
    """
    rng = _rng(seed, 0)
    themes = list(THEME_WEIGHTS)
    theme = themes[rng.choice(len(themes), p=np.array([THEME_WEIGHTS[t] for t in themes]))]
    pairs = list(THEMES[theme])
    order = rng.permutation(len(pairs))  # the anchor's pair first, maybe a second pair; never all three
    names: list[str] = []
    for k, pair in enumerate(pairs[int(i)] for i in order[:2]):
        if k == 1 and rng.random() >= P_SECOND_PAIR:
            break
        anchor = pair[int(rng.integers(2))]
        names.append(anchor)
        if rng.random() < P_PARTNER:
            names.append(PARTNER[anchor])
    if not easy and rng.random() < P_OFF_THEME:
        others = [o for o in OBJECTS if THEME_OF[o] != theme]
        names.append(others[int(rng.integers(len(others)))])
    objects = _place(names, rng, easy)
    objects.sort(key=lambda o: (o.x, o.y))
    return Scene(seed=seed, theme=theme, objects=objects)


def _place(names: list[str], rng: np.random.Generator, easy: bool) -> list[SceneObject]:
    """Non-overlapping positions (best effort: up to 50 tries per object, then the object is dropped)."""
    placed: list[SceneObject] = []
    vis_names = [v for v, _ in VISIBILITY]
    vis_p = np.array([p for _, p in VISIBILITY])
    for name in names:
        visibility = "normal" if easy else vis_names[rng.choice(len(vis_names), p=vis_p)]
        size = int(rng.integers(7, 10)) if visibility == "small" else int(rng.integers(12, 17))
        for _ in range(50):
            x = int(rng.integers(size // 2 + 1, IMAGE_SIZE - size // 2 - 1))
            y = int(rng.integers(size // 2 + 1, IMAGE_SIZE - size // 2 - 1))
            if all(abs(x - o.x) > (size + o.size) // 2 + 1 or abs(y - o.y) > (size + o.size) // 2 + 1 for o in placed):
                placed.append(SceneObject(name, x, y, size, visibility))
                break
    return placed


def _shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean ``[size, size]`` mask of a shape."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2.0
    u, v = (xx - c) / (size / 2.0), (yy - c) / (size / 2.0)  # in [-1, 1]
    r = np.sqrt(u**2 + v**2)
    if shape == "circle":
        return r <= 0.95
    if shape == "square":
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if shape == "triangle":
        return (v >= -0.9) & (v <= 0.9) & (np.abs(u) <= (v + 0.9) / 1.8 * 0.95)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 0.95
    if shape == "cross":
        return ((np.abs(u) <= 0.3) | (np.abs(v) <= 0.3)) & (np.abs(u) <= 0.95) & (np.abs(v) <= 0.95)
    if shape == "ring":
        return (r <= 0.95) & (r >= 0.55)
    if shape == "hbar":
        return (np.abs(u) <= 0.95) & (np.abs(v) <= 0.4)
    if shape == "hourglass":
        return (np.abs(u) <= np.abs(v) * 0.95 + 0.05) & (np.abs(v) <= 0.9)
    raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")


def render_scene(scene: Scene) -> np.ndarray:
    """Draw a scene: grey background, clutter, the objects, occluders and pixel noise.

    Args:
        scene: The scene (its seed also drives the rendering noise).

    Returns:
        ``[IMAGE_SIZE, IMAGE_SIZE, 3]`` uint8 array.
    """
    rng = _rng(scene.seed, 1)
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), rng.uniform(0.35, 0.65), dtype=np.float32)
    for _ in range(int(rng.integers(1, 5))):  # clutter: thin bars and dots in dull greys
        tone = rng.uniform(0.2, 0.8)
        x0, y0 = int(rng.integers(0, IMAGE_SIZE - 4)), int(rng.integers(0, IMAGE_SIZE - 4))
        if rng.random() < 0.5:
            length = int(rng.integers(6, 20))
            if rng.random() < 0.5:
                img[y0 : y0 + 1, x0 : x0 + length] = tone
            else:
                img[y0 : y0 + length, x0 : x0 + 1] = tone
        else:
            img[y0 : y0 + 2, x0 : x0 + 2] = tone
    for obj in scene.objects:
        shape, hue = APPEARANCE[obj.name]
        mask = _shape_mask(shape, obj.size)
        colour = np.array(HUES[hue], dtype=np.float32) / 255.0
        alpha = rng.uniform(0.25, 0.4) if obj.visibility == "faint" else 1.0
        y0, x0 = obj.y - obj.size // 2, obj.x - obj.size // 2
        patch = img[y0 : y0 + obj.size, x0 : x0 + obj.size]  # [s, s, 3] view
        patch[mask] = (1 - alpha) * patch[mask] + alpha * colour
        if obj.visibility == "occluded":  # a grey block over 70-100 % of the object, from one side
            cover = round(obj.size * rng.uniform(0.7, 1.0))
            grey = rng.uniform(0.3, 0.7)
            side = int(rng.integers(4))
            if side == 0:
                patch[:cover, :] = grey
            elif side == 1:
                patch[-cover:, :] = grey
            elif side == 2:
                patch[:, :cover] = grey
            else:
                patch[:, -cover:] = grey
    img += rng.normal(0.0, 0.04, size=img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
