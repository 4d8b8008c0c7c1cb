"""Tests of the synthetic scenes and of their TFDS builder."""

import re

import numpy as np
import pytest

from diffusion.data import shapes, tfds_shapes


def test_scenes_are_deterministic_per_index():
  a = shapes.scene_for_index(7, 3, max_objects=2)
  b = shapes.scene_for_index(7, 3, max_objects=2)
  c = shapes.scene_for_index(8, 3, max_objects=2)
  assert a == b
  assert a != c
  np.testing.assert_array_equal(shapes.render_scene(a, 32), shapes.render_scene(b, 32))


def test_captions_use_only_the_vocabulary_and_cover_it():
  vocab = set(shapes.vocabulary())
  seen = set()
  for i in range(300):
    words = shapes.scene_for_index(0, i, max_objects=2).caption.split()
    assert set(words) <= vocab
    seen |= set(words)
  assert seen == vocab


def test_palette_and_shapes():
  assert len(shapes.COLOURS) >= 6 and len(shapes.SHAPES) == 3
  hues = []
  for rgb in shapes.PALETTE.values():
    r, g, b = (np.asarray(rgb) / 255.0).tolist()
    hues.append(np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360)
  hues = np.sort(hues)
  gaps = np.diff(np.concatenate([hues, hues[:1] + 360]))
  assert gaps.min() > 40, gaps  # Well separated in hue.


def test_single_object_counts_and_sizes():
  counts = [len(shapes.scene_for_index(0, i, max_objects=1).objects) for i in range(50)]
  assert set(counts) == {1}
  counts = [len(shapes.scene_for_index(0, i, max_objects=2).objects) for i in range(200)]
  assert set(counts) == {1, 2}
  assert 0.3 < np.mean(np.array(counts) == 2) < 0.7
  with pytest.raises(ValueError):
    shapes.scene_for_index(0, 0, max_objects=3)


def test_two_object_scenes_are_separated_and_captions_tell_the_truth():
  for i in range(200):
    scene = shapes.scene_for_index(1, i, max_objects=2)
    if len(scene.objects) != 2:
      continue
    a, b = scene.objects
    assert a.colour != b.colour
    left, right = sorted(scene.objects, key=lambda o: o.cx)
    assert left.cx + left.r < right.cx - right.r  # Boxes do not overlap horizontally.
    m = re.fullmatch(r'a (\w+) (\w+) to the (left|right) of a (\w+) (\w+)', scene.caption)
    assert m, scene.caption
    first = (m.group(1), m.group(2))
    expect_first = (left.colour, left.shape) if m.group(3) == 'left' else (right.colour, right.shape)
    assert first == expect_first


@pytest.mark.parametrize('resolution', [32, 64])
def test_render_is_antialiased_and_in_bounds(resolution):
  scene = shapes.scene_for_index(0, 5, max_objects=1)
  image = shapes.render_scene(scene, resolution)
  assert image.shape == (resolution, resolution, 3) and image.dtype == np.uint8
  obj = scene.objects[0]
  colour = np.asarray(shapes.PALETTE[obj.colour])
  bg = np.asarray(shapes.BACKGROUND)
  is_bg = (image == bg).all(-1)
  is_fg = (image == colour).all(-1)
  edge = ~is_bg & ~is_fg
  assert is_bg.any() and is_fg.any()
  assert edge.sum() > 4  # Antialiased edge pixels with mixed colour exist.
  # Area of the rendered shape matches the geometry.
  coverage = (image.astype(float) - bg).sum(-1) / (colour - bg).sum()
  expected = shapes.SHAPE_AREA_FACTOR[obj.shape] * (obj.r * resolution) ** 2
  assert abs(coverage.sum() - expected) / expected < 0.03


def test_shape_coverage_area_and_centroid():
  for shape in shapes.SHAPES:
    cov = shapes.shape_coverage(shape, 20.3, 18.7, 9.0, 40, 40)
    area = cov.sum()
    np.testing.assert_allclose(area, shapes.SHAPE_AREA_FACTOR[shape] * 81, rtol=0.02)
    ys, xs = np.mgrid[:40, :40] + 0.5
    cy = (cov * ys).sum() / area
    cx = (cov * xs).sum() / area
    np.testing.assert_allclose(cx, 20.3, atol=0.1)
    np.testing.assert_allclose(cy, 18.7 + shapes.SHAPE_CENTROID_DY[shape] * 9.0, atol=0.1)


def test_generate_arrays():
  images, captions = shapes.generate_arrays(5, 32, 2, seed=(3, 4))
  assert images.shape == (5, 32, 32, 3) and len(captions) == 5
  again, _ = shapes.generate_arrays(5, 32, 2, seed=(3, 4))
  np.testing.assert_array_equal(images, again)


def test_config_names():
  assert tfds_shapes.config_name(32, 1) == 'r32_o1'
  assert tfds_shapes.config_name(64, 2, 100, 10) == 'r64_o2_n100_e10'
  names = {c.name for c in tfds_shapes.ShapesBuilder.BUILDER_CONFIGS}
  assert {'r32_o1', 'r32_o2', 'r64_o1', 'r64_o2'} <= names


def test_builder_prepares_locally(shapes_data_dir):
  builder = tfds_shapes.shapes_builder(shapes_data_dir, resolution=32, max_objects=2, num_train=64, num_eval=16)
  assert builder.info.splits['train'].num_examples == 64
  assert builder.info.splits['validation'].num_examples == 16
  assert builder.info.splits['test'].num_examples == 16
  train = builder.as_data_source('train')
  val = builder.as_data_source('validation')
  record = train[0]
  assert record['image'].shape == (32, 32, 3) and record['image'].dtype == np.uint8
  caption = record['caption'].decode() if isinstance(record['caption'], bytes) else record['caption']
  names = builder.info.features['objects']['colour'].names
  colours = [names[c] for c in record['objects']['colour']]
  assert all(c in caption for c in colours)
  # Splits are different scenes; records are the scenes the generator makes.
  train_images = {train[i]['image'].tobytes() for i in range(len(train))}
  val_images = {val[i]['image'].tobytes() for i in range(len(val))}
  assert len(train_images) == 64 and not train_images & val_images
  expected = {im.tobytes() for im in shapes.generate_arrays(16, 32, 2, seed=(0, 1))[0]}
  assert val_images == expected


def test_prepare_is_idempotent(shapes_data_dir):
  # Preparing again reuses the files (no error, same content).
  builder = tfds_shapes.prepare_shapes(shapes_data_dir, resolution=32, max_objects=2, num_train=64, num_eval=16)
  assert len(builder.as_data_source('train')) == 64
