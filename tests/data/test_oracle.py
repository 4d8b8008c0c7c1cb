"""Tests of the caption oracle: held-out, blurred, shuffled and hand-drawn images."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from diffusion.data import oracle, shapes


@pytest.fixture(scope='module')
def held_out_single():
  return shapes.generate_arrays(150, 32, 1, seed=(99, 0))


@pytest.fixture(scope='module')
def held_out_pairs():
  return shapes.generate_arrays(150, 32, 2, seed=(99, 1))


def test_self_check_single_objects(held_out_single):
  images, captions = held_out_single
  result = oracle.oracle_self_check(images, captions, seed=0)
  assert result['real'] >= 0.98
  assert result['blurred'] >= 0.98
  assert result['shuffled'] < 0.15  # Chance is 1/18.


def test_self_check_two_objects(held_out_pairs):
  images, captions = held_out_pairs
  result = oracle.oracle_self_check(images, captions, seed=0)
  assert result['real'] >= 0.98
  assert result['blurred'] >= 0.98
  assert result['shuffled'] < 0.15


def test_self_check_at_64px():
  result = oracle.self_check_on_shapes(num_images=60, resolution=64, max_objects=2, seed=5)
  assert result['real'] >= 0.98 and result['blurred'] >= 0.98 and result['shuffled'] < 0.2


def test_detect_objects_reports_geometry(held_out_pairs):
  images, _ = held_out_pairs
  for index in range(20):
    scene = shapes.scene_for_index((99, 1), index, 2)
    found = oracle.detect_objects(images[index])
    assert len(found) == len(scene.objects)
    for obj in scene.objects:
      match = [f for f in found if f['colour'] == obj.colour]
      assert len(match) == 1 and match[0]['shape'] == obj.shape
      assert abs(match[0]['x'] - obj.cx) < 0.05
      assert isinstance(match[0]['area'], int)


def test_float_images_are_read_like_uint8(held_out_single):
  images, captions = held_out_single
  as_float = images[:20].astype(np.float32) / 127.5 - 1.0
  assert oracle.caption_accuracy(as_float, captions[:20]) == oracle.caption_accuracy(images[:20], captions[:20]) == 1.0


def _draw(shape: str, rgb, box, size=32, background=(255, 255, 255)) -> np.ndarray:
  """A shape drawn with PIL (not our renderer), 4x supersampled for smooth edges."""
  s = 4
  im = Image.new('RGB', (size * s, size * s), background)
  d = ImageDraw.Draw(im)
  x0, y0, x1, y1 = [v * s for v in box]
  if shape == 'circle':
    d.ellipse((x0, y0, x1, y1), fill=rgb)
  elif shape == 'square':
    d.rectangle((x0, y0, x1, y1), fill=rgb)
  else:
    d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=rgb)
  return np.asarray(im.resize((size, size), Image.LANCZOS))


@pytest.mark.parametrize('shape', shapes.SHAPES)
@pytest.mark.parametrize(
  'colour,rgb',
  [
    ('red', (255, 0, 0)),
    ('yellow', (250, 240, 0)),
    ('green', (0, 160, 0)),
    ('cyan', (0, 230, 255)),
    ('blue', (0, 0, 255)),
    ('magenta', (255, 0, 255)),
  ],
)
def test_hand_drawn_shapes(shape, colour, rgb):
  image = _draw(shape, rgb, (9, 7, 23, 21))
  found = oracle.detect_objects(image)
  assert [(o['colour'], o['shape']) for o in found] == [(colour, shape)]
  assert oracle.caption_matches(image, f'a {colour} {shape}')
  other = 'circle' if shape != 'circle' else 'square'
  assert not oracle.caption_matches(image, f'a {colour} {other}')


def test_hand_drawn_pair_relation_and_specks():
  left = _draw('triangle', (0, 0, 255), (2, 10, 13, 21))
  right = _draw('circle', (255, 0, 0), (18, 8, 30, 20))
  image = np.minimum(left, right)  # White background: the darker pixel is the shape.
  image[2, 2] = (0, 200, 0)  # A one-pixel speck must be ignored.
  assert oracle.caption_matches(image, 'a blue triangle to the left of a red circle')
  assert oracle.caption_matches(image, 'a red circle to the right of a blue triangle')
  assert not oracle.caption_matches(image, 'a blue triangle to the right of a red circle')
  assert not oracle.caption_matches(image, 'a blue square to the left of a red circle')
  # Single-object captions need one dominant object: two similar-sized ones do not count.
  assert not oracle.caption_matches(image, 'a blue triangle')


def test_blank_image_matches_nothing():
  blank = np.full((32, 32, 3), 128, np.uint8)
  assert oracle.detect_objects(blank) == []
  assert not oracle.caption_matches(blank, 'a red circle')


def test_parse_caption():
  assert oracle.parse_caption('a red circle') == ([('red', 'circle')], None)
  assert oracle.parse_caption('A Blue square to the right of a green triangle.') == (
    [('blue', 'square'), ('green', 'triangle')],
    'right',
  )
  with pytest.raises(ValueError):
    oracle.parse_caption('a purple circle')
  with pytest.raises(ValueError):
    oracle.parse_caption('two red circles')


def test_single_object_prompts():
  prompts = oracle.single_object_prompts()
  assert len(prompts) == len(set(prompts)) == len(oracle.COLOURS) * len(oracle.SHAPES)
  assert 'a red circle' in prompts
  for p in prompts:
    assert len(oracle.parse_caption(p)[0]) == 1


def test_caption_accuracy_checks_lengths():
  with pytest.raises(ValueError):
    oracle.caption_accuracy(np.zeros((2, 32, 32, 3), np.uint8), ['a red circle'])


def test_concept_shape_is_read_and_base_answers_do_not_change():
  """The concept shapes (a cross) have their own generator: the base scenes, vocabulary and the oracle's answers on
  base images stay what they were, and the oracle told about the concept reads it on real and blurred images."""
  base, captions = shapes.generate_arrays(120, 32, 1, seed=4321)
  assert 'cross' not in shapes.vocabulary() and shapes.SHAPES == ('circle', 'square', 'triangle')
  assert not any(o.shape == 'cross' for i in range(500) for o in shapes.scene_for_index(0, i, 2).objects)
  for image in np.concatenate([base, oracle.blur_images(base)]):
    plain = [(o['colour'], o['shape']) for o in oracle.detect_objects(image)]
    assert [(o['colour'], o['shape']) for o in oracle.detect_objects(image, oracle.ALL_SHAPES)] == plain
  assert oracle.caption_accuracy(base, captions, shapes=oracle.ALL_SHAPES) == 1.0
  scenes = [shapes.concept_scene_for_index('cross', 9, i) for i in range(60)]
  crosses = np.stack([shapes.render_scene(s, 32) for s in scenes])
  cross_captions = [s.caption for s in scenes]
  assert all(c.endswith(' cross') for c in cross_captions)
  assert oracle.caption_accuracy(crosses, cross_captions) == 1.0
  assert oracle.caption_accuracy(oracle.blur_images(crosses), cross_captions) >= 0.95
  as_circles = [c.replace('cross', 'circle') for c in cross_captions]
  assert oracle.caption_accuracy(crosses, as_circles, shapes=oracle.ALL_SHAPES) == 0.0  # Not a circle, once known.
  assert oracle.single_object_prompts(('cross',))[0] == 'a red cross'
