"""The embedded synthetic dataset: captioned scenes of coloured shapes.

Each scene is one or two flat-coloured shapes (circle, square, upright triangle) on a plain grey
background, generated deterministically from `(seed, index)`. Captions are produced from the scene
("a red circle", "a blue square to the left of a green triangle"), so any image can be checked
against its caption by `diffusion.data.oracle`. Everything here is plain NumPy: no network, no
TensorFlow. Geometry is kept in resolution-free units (fractions of the image side) so the same
scene renders at 32, 64 or any other size; rendering is 4x supersampled for antialiased edges.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

# Palette: well-separated hues (about 55-75 degrees apart), strong chroma, named as people would.
PALETTE: dict[str, tuple[int, int, int]] = {
  'red': (220, 30, 30),
  'yellow': (235, 215, 20),
  'green': (30, 185, 45),
  'cyan': (20, 205, 205),
  'blue': (40, 60, 230),
  'magenta': (200, 40, 200),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ('circle', 'square', 'triangle')
BACKGROUND: tuple[int, int, int] = (200, 200, 200)

# Shape geometry in units of the half-extent r (the shape's bounding box is 2r x 2r at most).
SQUARE_HALF_SIDE = 0.85  # Square half side / r, so a square does not look bigger than a circle.
# Area of each shape divided by r**2, and its centroid's vertical offset from the box centre / r.
SHAPE_AREA_FACTOR: dict[str, float] = {
  'circle': float(np.pi),
  'square': (2 * SQUARE_HALF_SIDE) ** 2,
  'triangle': 2.0,
}
SHAPE_CENTROID_DY: dict[str, float] = {'circle': 0.0, 'square': 0.0, 'triangle': 1.0 / 3.0}

# Shapes the base dataset never draws: new concepts a fine-tuning run teaches a trained model (make demo-lora). They
# change no base scene, caption or vocabulary word: SHAPES and its random draws are untouched.
CONCEPT_SHAPES: tuple[str, ...] = ('cross',)
ALL_SHAPES: tuple[str, ...] = SHAPES + CONCEPT_SHAPES
CROSS_ARM = 0.36  # Half width of a cross's (plus sign's) arms / r; its arms reach the 2r x 2r box.
SHAPE_AREA_FACTOR['cross'] = 8 * CROSS_ARM - 4 * CROSS_ARM**2
SHAPE_CENTROID_DY['cross'] = 0.0

# Relation phrases; the first object of the caption is on that side of the second.
LEFT_OF = 'to the left of'
RIGHT_OF = 'to the right of'
SUPERSAMPLE = 4

# Sampling ranges (fractions of the image side).
_SINGLE_RADIUS = (0.14, 0.32)
_PAIR_RADIUS = (0.11, 0.20)
_MARGIN = 0.03
_PAIR_GAP = 0.06


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One shape: colour/shape names, box centre and half-extent as fractions of the image side."""

  colour: str
  shape: str
  cx: float
  cy: float
  r: float


@dataclasses.dataclass(frozen=True)
class Scene:
  """Objects (left to right) and the caption that describes them."""

  objects: tuple[SceneObject, ...]
  caption: str


def vocabulary() -> tuple[str, ...]:
  """All words a caption can contain, sorted; enough to build a tokenizer without the data."""
  words = {'a'} | set(COLOURS) | set(SHAPES)
  words |= set(LEFT_OF.split()) | set(RIGHT_OF.split())
  return tuple(sorted(words))


def object_phrase(colour: str, shape: str) -> str:
  """'a red circle'."""
  return f'a {colour} {shape}'


def make_caption(objects: Sequence[SceneObject], rng: np.random.Generator) -> str:
  """Caption for a scene; for two objects the phrasing (left of / right of) is drawn from rng."""
  if len(objects) == 1:
    return object_phrase(objects[0].colour, objects[0].shape)
  left, right = sorted(objects, key=lambda o: o.cx)
  left_phrase = object_phrase(left.colour, left.shape)
  right_phrase = object_phrase(right.colour, right.shape)
  if rng.random() < 0.5:
    return f'{left_phrase} {LEFT_OF} {right_phrase}'
  return f'{right_phrase} {RIGHT_OF} {left_phrase}'


def _sample_single(rng: np.random.Generator, shapes: Sequence[str] = SHAPES) -> tuple[SceneObject, ...]:
  r = rng.uniform(*_SINGLE_RADIUS)
  lo, hi = r + _MARGIN, 1.0 - r - _MARGIN
  return (
    SceneObject(
      colour=COLOURS[rng.integers(len(COLOURS))],
      shape=shapes[rng.integers(len(shapes))],
      cx=rng.uniform(lo, hi),
      cy=rng.uniform(lo, hi),
      r=r,
    ),
  )


def _sample_pair(rng: np.random.Generator) -> tuple[SceneObject, ...]:
  """Two objects with distinct colours, horizontally separated by at least a gap."""
  r1, r2 = rng.uniform(*_PAIR_RADIUS, size=2)
  # Horizontal room left for the gap beyond the minimum layout; split it at random.
  slack = 1.0 - 2 * _MARGIN - 2 * r1 - 2 * r2 - _PAIR_GAP
  a, b, c = rng.dirichlet((1.0, 1.0, 1.0)) * slack
  cx1 = _MARGIN + a + r1
  cx2 = cx1 + r1 + _PAIR_GAP + b + r2
  cy1 = rng.uniform(r1 + _MARGIN, 1.0 - r1 - _MARGIN)
  cy2 = rng.uniform(r2 + _MARGIN, 1.0 - r2 - _MARGIN)
  del c  # Right margin slack.
  colours = rng.choice(len(COLOURS), size=2, replace=False)
  shapes = rng.integers(len(SHAPES), size=2)
  return (
    SceneObject(COLOURS[colours[0]], SHAPES[shapes[0]], cx1, cy1, r1),
    SceneObject(COLOURS[colours[1]], SHAPES[shapes[1]], cx2, cy2, r2),
  )


def sample_scene(rng: np.random.Generator, max_objects: int = 1) -> Scene:
  """Draws a scene with 1..max_objects objects (each count equally likely) and its caption."""
  if max_objects not in (1, 2):
    raise ValueError(f'max_objects must be 1 or 2, got {max_objects}')
  num = 1 if max_objects == 1 else int(rng.integers(1, 3))
  objects = _sample_single(rng) if num == 1 else _sample_pair(rng)
  return Scene(objects=objects, caption=make_caption(objects, rng))


def scene_for_index(seed: int | Sequence[int], index: int, max_objects: int = 1) -> Scene:
  """The scene of example `index` of the stream `seed`; independent of any other example."""
  seed = [seed] if isinstance(seed, (int, np.integer)) else list(seed)
  return sample_scene(np.random.default_rng([*seed, index]), max_objects)


def concept_scene_for_index(shape: str, seed: int | Sequence[int], index: int) -> Scene:
  """Example `index` of the stream `seed` of a concept shape's own generator: one object of that shape (a colour of
  the palette, position and size drawn as for the base's single objects), captioned 'a <colour> <shape>'."""
  if shape not in CONCEPT_SHAPES:
    raise ValueError(f'unknown concept shape {shape!r}; known: {CONCEPT_SHAPES}')
  seed = [seed] if isinstance(seed, (int, np.integer)) else list(seed)
  objects = _sample_single(np.random.default_rng([*seed, index]), (shape,))
  return Scene(objects=objects, caption=object_phrase(objects[0].colour, shape))


def shape_coverage(
  shape: str, cx: float, cy: float, r: float, height: int, width: int, supersample: int = SUPERSAMPLE
) -> np.ndarray:
  """Fraction of each pixel covered by a shape, float32 (height, width).

  Coordinates are in pixels: pixel (i, j) spans [j, j+1) x [i, i+1). (cx, cy) is the centre of the
  shape's 2r x 2r bounding box; a triangle points up. Only the box window is evaluated.
  """
  out = np.zeros((height, width), np.float32)
  x0, x1 = max(int(np.floor(cx - r)) - 1, 0), min(int(np.ceil(cx + r)) + 1, width)
  y0, y1 = max(int(np.floor(cy - r)) - 1, 0), min(int(np.ceil(cy + r)) + 1, height)
  if x1 <= x0 or y1 <= y0:
    return out
  sub = (np.arange(supersample) + 0.5) / supersample
  xs = (np.arange(x0, x1)[:, None] + sub[None, :]).reshape(-1)[None, :] - cx
  ys = (np.arange(y0, y1)[:, None] + sub[None, :]).reshape(-1)[:, None] - cy
  if shape == 'circle':
    inside = xs**2 + ys**2 <= r**2
  elif shape == 'square':
    h = SQUARE_HALF_SIDE * r
    inside = (np.abs(xs) <= h) & (np.abs(ys) <= h)
  elif shape == 'triangle':
    inside = (ys <= r) & (np.abs(xs) <= (ys + r) / 2.0)
  elif shape == 'cross':
    a = CROSS_ARM * r
    inside = ((np.abs(xs) <= r) & (np.abs(ys) <= a)) | ((np.abs(xs) <= a) & (np.abs(ys) <= r))
  else:
    raise ValueError(f'unknown shape {shape!r}; known: {ALL_SHAPES}')
  h, w = y1 - y0, x1 - x0
  cov = inside.reshape(h, supersample, w, supersample).mean(axis=(1, 3))
  out[y0:y1, x0:x1] = cov
  return out


def render_scene(scene: Scene, resolution: int, background: tuple[int, int, int] = BACKGROUND) -> np.ndarray:
  """Antialiased uint8 image (resolution, resolution, 3) of a scene."""
  img = np.empty((resolution, resolution, 3), np.float32)
  img[...] = np.asarray(background, np.float32)
  for obj in scene.objects:
    alpha = shape_coverage(
      obj.shape, obj.cx * resolution, obj.cy * resolution, obj.r * resolution, resolution, resolution
    )[..., None]
    img = img * (1.0 - alpha) + np.asarray(PALETTE[obj.colour], np.float32) * alpha
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


def generate(
  num_examples: int, resolution: int, max_objects: int = 1, seed: int | Sequence[int] = 0, start: int = 0
) -> Iterator[tuple[int, np.ndarray, Scene]]:
  """Yields (index, uint8 image, scene) for indices start .. start+num_examples-1."""
  for index in range(start, start + num_examples):
    scene = scene_for_index(seed, index, max_objects)
    yield index, render_scene(scene, resolution), scene


def generate_arrays(
  num_examples: int, resolution: int, max_objects: int = 1, seed: int | Sequence[int] = 0
) -> tuple[np.ndarray, list[str]]:
  """Images uint8 (N, R, R, 3) and captions; a convenient held-out set for tests and checks."""
  images, captions = [], []
  for _, image, scene in generate(num_examples, resolution, max_objects, seed):
    images.append(image)
    captions.append(scene.caption)
  return np.stack(images), captions
