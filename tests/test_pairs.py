"""Tests of CAC's pair sampler (docs/method.md §2, steps 1-6).

The vectorised 50-try selection is compared with a plain-Python transcription
of the spec's loop on random inputs; the full sampler is checked for its
geometric invariants over 200 seeds and several image shapes (including images
smaller than the crop), pixel-exactly with photometric=False.
"""

import numpy as np
import pytest
import tensorflow as tf

from cac_jax.data import pairs

C, BASE, S = 32, 40, 8
MEAN = np.array([0.485, 0.456, 0.406]) * 255


def _reference_second_crop(y1, x1, cand_y, cand_x, c, iou_range, s):
  """The spec's loop, candidate by candidate, in Python integers."""
  for y2, x2 in zip(cand_y, cand_x):
    y2 = (y2 - y1) // s * s + y1
    x2 = (x2 - x1) // s * s + x1
    if y2 < 0:
      y2 += s
    if x2 < 0:
      x2 += s
    if c - abs(y2 - y1) < 0 or c - abs(x2 - x1) < 0:
      continue
    inter = (c - abs(y2 - y1)) * (c - abs(x2 - x1))
    iou = inter / (2 * c * c - inter)
    if iou_range[0] <= iou <= iou_range[1]:
      return y2, x2, True
  return y1, x1, False


def test_select_second_crop_matches_reference_loop():
  rng = np.random.default_rng(0)
  accepted_any = rejected_any = False
  for _ in range(300):
    c = int(rng.choice([16, 24, 32]))
    span_y, span_x = (int(v) for v in rng.integers(0, 3 * c, 2))
    lo = float(rng.choice([0.0, 0.1, 0.5, 0.9]))
    iou_range = (lo, float(rng.uniform(lo, 1.0)))
    y1, x1 = int(rng.integers(0, span_y + 1)), int(rng.integers(0, span_x + 1))
    tries = int(rng.integers(1, 8))
    cy = rng.integers(0, span_y + 1, tries)
    cx = rng.integers(0, span_x + 1, tries)
    ref = _reference_second_crop(y1, x1, cy.tolist(), cx.tolist(), c, iou_range, S)
    got = pairs.select_second_crop(
      tf.constant(y1),
      tf.constant(x1),
      tf.constant(cy, tf.int32),
      tf.constant(cx, tf.int32),
      crop_size=c,
      iou_range=iou_range,
      stride=S,
    )
    assert (int(got[0]), int(got[1]), bool(got[2])) == ref
    accepted_any |= ref[2]
    rejected_any |= not ref[2]
  assert accepted_any and rejected_any


def _unflip_box(view, box, flip):
  view = view[:, ::-1] if flip else view
  return view[box[0] : box[2], box[1] : box[3]]


SHAPES = [(30, 50), (64, 48), (17, 90), (100, 100), (12, 12), (200, 40)]


@pytest.mark.parametrize('shape', SHAPES)
def test_pair_geometry_and_pixels(shape):
  rng = np.random.default_rng(shape[0] * 1000 + shape[1])
  image = rng.integers(0, 256, shape + (3,)).astype(np.uint8)
  iou_range = (0.1, 1.0)
  n_accepted = n_flip = 0
  seeds = 34  # ~200 seeds over the 6 shapes
  for s in range(seeds):
    seed = tf.constant([s, shape[0]], tf.int64)
    kw = dict(crop_size=C, base_size=BASE, iou_range=iou_range, stride=S)
    geo = {
      k: v.numpy()
      for k, v in pairs.pair_geometry(
        seed, shape[0], shape[1], scale_range=(0.8, 2.0), **kw
      ).items()
    }
    out = {k: v.numpy() for k, v in pairs.sample_pair(image, seed, photometric=False, **kw).items()}
    h, w = geo['scaled_height'], geo['scaled_width']
    assert max(h, w) in range(int(0.8 * BASE), 2 * BASE + 1)
    hp, wp = max(h, C), max(w, C)
    y1, x1, y2, x2 = geo['y1'], geo['x1'], geo['y2'], geo['x2']
    for y, x in [(y1, x1), (y2, x2)]:
      assert 0 <= y <= hp - C and 0 <= x <= wp - C
    dy, dx = y2 - y1, x2 - x1
    assert dy % S == 0 and dx % S == 0
    b1, b2 = out['box1'], out['box2']
    np.testing.assert_array_equal(b1, geo['box1'])
    assert out['box1'].dtype == np.int32 and out['flip1'].dtype == np.bool_
    for b in (b1, b2):
      assert (b % S == 0).all() and (b >= 0).all() and (b <= C).all()
      # An image scaled below one stride cell has no usable overlap (the
      # (h // s) * s term); otherwise the IoU >= 0.1 overlap is non-empty.
      assert (b[2] > b[0] and b[3] > b[1]) == (min(h, w) >= S)
    assert b1[2] - b1[0] == b2[2] - b2[0] and b1[3] - b1[1] == b2[3] - b2[1]
    # Both boxes are the same image region: view-1 frame + its crop origin.
    np.testing.assert_array_equal(b1 + [y1, x1, y1, x1], b2 + [y2, x2, y2, x2])
    # ...and that region contains no padding (padding starts at row h, col w).
    assert y1 + b1[2] <= h and x1 + b1[3] <= w
    if geo['accepted']:
      inter = (C - abs(dy)) * (C - abs(dx))
      assert iou_range[0] <= inter / (2 * C * C - inter) <= iou_range[1]
      n_accepted += 1
    else:
      assert (y2, x2) == (y1, x1)
    assert out['image1'].shape == (C, C, 3) and out['image1'].dtype == np.float32
    # Un-flipped overlaps are pixel-identical (same resized image, no colour).
    o1 = _unflip_box(out['image1'], b1, out['flip1'])
    o2 = _unflip_box(out['image2'], b2, out['flip2'])
    np.testing.assert_array_equal(o1, o2)
    n_flip += int(out['flip1']) + int(out['flip2'])
  # Images with room to move mostly find an accepted second crop; flips ~1/2.
  if min(shape) >= 30:
    assert n_accepted >= seeds // 2
  assert 0.2 * 2 * seeds < n_flip < 0.8 * 2 * seeds


def test_overlap_never_contains_padding_pixels():
  # A constant image far from the mean colour: every overlap pixel keeps it.
  colour = np.array([250.0, 5.0, 250.0])
  n_small = 0
  # Shapes and base keep the scaled short side >= 8 (else no overlap at all)
  # and mostly below C = 32, so most pairs contain padding.
  for shape in [(16, 40), (40, 16), (20, 20)]:
    image = np.broadcast_to(colour, shape + (3,)).astype(np.uint8)
    for s in range(10):
      out = pairs.sample_pair(
        image, tf.constant([s, 9]), crop_size=C, base_size=28, photometric=False
      )
      for v in (1, 2):
        region = _unflip_box(
          out[f'image{v}'].numpy(), out[f'box{v}'].numpy(), bool(out[f'flip{v}'])
        )
        assert region.size
        # Resizing a constant image: float32 weights summing to 1 within a
        # few EPS (2^-24), so ~4 EPS * 250 = 6e-5 (measured 6.1e-5). atol
        # 1e-3 (it was 0.5); a padding pixel is >= 100 off, a blend of one
        # at the overlap's edge >= 1 grey level.
        np.testing.assert_allclose(region, np.broadcast_to(colour, region.shape), atol=1e-3)
      # Padding (mean colour) is in the crop exactly when the image is small.
      geo = pairs.pair_geometry(tf.constant([s, 9]), *shape, crop_size=C, base_size=28)
      small = min(int(geo['scaled_height']), int(geo['scaled_width'])) < C
      full = out['image1'].numpy()
      # A padding pixel is the mean colour rounded to float32 (<= 7.4e-6
      # off); image pixels here are >= 100 away from it. atol 1e-3.
      assert np.isclose(full, MEAN, atol=1e-3).all(axis=-1).any() == small
      n_small += small
  assert n_small > 10


def test_same_crop_ablation():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (60, 80, 3)).astype(np.uint8)
  flips_differ = photometric_differs = False
  # base 64: the scaled short side is >= 38 > C, so the overlap is the full crop.
  for s in range(16):
    seed = tf.constant([s, 2])
    out = pairs.sample_pair(
      image, seed, crop_size=C, base_size=64, same_crop=True, photometric=False
    )
    np.testing.assert_array_equal(out['box1'], out['box2'])
    np.testing.assert_array_equal(out['box1'], [0, 0, C, C])
    a, b = out['image1'].numpy(), out['image2'].numpy()
    if bool(out['flip1']) != bool(out['flip2']):
      flips_differ = True
      b = b[:, ::-1]
    np.testing.assert_array_equal(a, b)
    col = pairs.sample_pair(
      image, seed, crop_size=C, base_size=64, same_crop=True, photometric=True
    )
    a, b = col['image1'].numpy(), col['image2'].numpy()
    if bool(col['flip1']) != bool(col['flip2']):
      b = b[:, ::-1]
    # np.allclose's 1e-5 relative default only absorbs rounding; two
    # different colour jitters differ by >= 1e-2 relative.
    photometric_differs |= not np.allclose(a, b)
  assert flips_differ and photometric_differs


def test_eager_equals_tf_data_map():
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, (50, 70, 3)).astype(np.uint8)
  seeds = np.array([[i, 5] for i in range(5)], np.int64)
  kw = dict(crop_size=C, base_size=BASE)
  ds = tf.data.Dataset.from_tensor_slices(seeds).map(
    lambda s: pairs.sample_pair(image, s, **kw), num_parallel_calls=2, deterministic=True
  )
  for s, g in zip(seeds, ds.as_numpy_iterator()):
    e = pairs.sample_pair(image, tf.constant(s), **kw)
    for k in g:
      np.testing.assert_array_equal(e[k].numpy(), g[k], err_msg=k)


def test_bad_arguments_raise():
  img = np.zeros((10, 10, 3), np.uint8)
  with pytest.raises(ValueError, match='multiple of the feature stride'):
    pairs.sample_pair(img, [0, 0], crop_size=30, base_size=40)
  with pytest.raises(ValueError, match='iou_range'):
    pairs.sample_pair(img, [0, 0], crop_size=32, base_size=40, iou_range=(0.5, 0.1))
  with pytest.raises(ValueError, match='scale_range'):
    pairs.sample_pair(img, [0, 0], crop_size=32, base_size=40, scale_range=(0.0, 1.0))
