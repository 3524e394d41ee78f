"""cac_jax.visualize: colours, blends and strips against hand-built arrays."""

import numpy as np
import pytest

from cac_jax import visualize


def test_colorize_matches_hand_built_expectation():
  palette = np.array([[10, 20, 30], [200, 100, 0], [0, 255, 7]], np.uint8)
  label = np.array([[0, 1, 2], [2, 255, 0]])
  expected = np.array(
    [[[10, 20, 30], [200, 100, 0], [0, 255, 7]], [[0, 255, 7], [0, 0, 0], [10, 20, 30]]], np.uint8
  )
  out = visualize.colorize(label, palette)
  assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
  np.testing.assert_array_equal(out, expected)


def test_colorize_out_of_range_ids_are_black():
  palette = np.full((2, 3), 99, np.uint8)
  out = visualize.colorize(np.array([[2, 7, -1, 1]]), palette)
  np.testing.assert_array_equal(out[0, :3], 0)
  np.testing.assert_array_equal(out[0, 3], [99, 99, 99])


def test_colorize_rejects_bad_shapes():
  with pytest.raises(ValueError, match='label'):
    visualize.colorize(np.zeros((2, 2, 1), int), np.zeros((3, 3), np.uint8))


def test_overlay_blends_and_rounds():
  image = np.array([[[0, 100, 255]]], np.uint8)
  mask = np.array([[[255, 0, 255]]], np.uint8)
  # 0.25 * mask + 0.75 * image = (63.75, 75, 255) -> rounded (64, 75, 255).
  np.testing.assert_array_equal(visualize.overlay(image, mask, 0.25), [[[64, 75, 255]]])
  np.testing.assert_array_equal(visualize.overlay(image, mask, 0.0), image)
  np.testing.assert_array_equal(visualize.overlay(image, mask, 1.0), mask)
  with pytest.raises(ValueError, match='differ'):
    visualize.overlay(image, np.zeros((2, 1, 3), np.uint8))


def test_side_by_side_pads_shorter_images_and_inserts_gap():
  a = np.full((2, 1, 3), 7, np.uint8)
  b = np.full((1, 2), 9, np.uint8)  # gray: repeated into 3 channels
  out = visualize.side_by_side(a, b, gap=1, fill=255)
  assert out.shape == (2, 4, 3)
  np.testing.assert_array_equal(out[:, 0], 7)
  np.testing.assert_array_equal(out[:, 1], 255)  # gap
  np.testing.assert_array_equal(out[0, 2:], 9)
  np.testing.assert_array_equal(out[1, 2:], 255)  # b padded at the bottom


def test_voc_palette_first_colours():
  # The published VOC colour map: background, aeroplane, bicycle, bird, ...
  np.testing.assert_array_equal(
    visualize.voc_palette(5), [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
  )
