"""Confusion matrix, mIoU and test-time augmentation against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np

from cac_jax import evaluate
from cac_jax.models import build_model
from train_utils import tiny_config


def test_confusion_matrix_matches_numpy_bincount():
  rng = np.random.default_rng()
  k = 5
  label = rng.integers(0, k, (3, 9, 11))
  label[rng.random(label.shape) < 0.2] = 255  # ignored pixels
  pred = rng.integers(0, k, label.shape)
  valid = np.array([True, False, True])  # image 1 is padding
  got = np.asarray(
    evaluate.confusion_matrix(jnp.asarray(pred), jnp.asarray(label), jnp.asarray(valid), k)
  )
  keep = (label != 255) & valid[:, None, None]
  want = np.bincount(label[keep] * k + pred[keep], minlength=k * k).reshape(k, k)
  np.testing.assert_array_equal(got, want)


def test_scores_match_hand_computed_iou():
  conf = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])  # class 2 absent: IoU 0
  s = evaluate.scores(conf, ('a', 'b', 'c'))
  iou_a, iou_b = 5 / (5 + 1 + 2), 3 / (3 + 2 + 1)
  # Ratios of exact integer counts: one or two roundings, so
  # assert_allclose's default rtol 1e-7 suffices even in float32 (a few EPS,
  # EPS = 6e-8, plus the 3-term mean); an off-by-one count is > 1e-2 off.
  np.testing.assert_allclose(s['iou/a'], iou_a)
  np.testing.assert_allclose(s['iou/b'], iou_b)
  assert s['iou/c'] == 0.0
  np.testing.assert_allclose(s['miou'], (iou_a + iou_b) / 3)  # mean over ALL classes
  np.testing.assert_allclose(s['pixel_acc'], 8 / 11)


def _tiny_model(x):
  """(model, variables) of the tiny DeepLabv3+ (6 classes), initialised on x."""
  model = build_model(tiny_config().model, num_classes=6)
  variables = model.init(
    {'params': jax.random.key(0), 'dropout': jax.random.key(0)}, x, train=False
  )
  return model, variables


def test_flip_and_scales():
  x = jax.random.normal(jax.random.key(1), (2, 40, 48, 3))
  model, variables = _tiny_model(x)
  raw = model.apply(variables, x, train=False)['logits']
  # The default is the plain forward pass (the authors' protocol).
  np.testing.assert_array_equal(evaluate.predict_logits(model, variables, x), raw)
  # Tolerance on probabilities (here and below): the same forward pass, but
  # possibly compiled into another program, so the logits may differ by the
  # float32 error of the network, <~ 1e-5 of their scale of a few (derived
  # in test_models.py, where torch vs XLA measured 1e-6), and softmax damps
  # that by p (1 - p) <= 1/4: ~1e-6 to 1e-5 absolute, whatever p is. atol
  # 1e-5 (measured: equal). A mirrored score left mirrored, or a window
  # counted twice, is O(0.1) off.
  # Scale 1.0 twice = softmax of the plain pass.
  np.testing.assert_allclose(
    evaluate.predict_logits(model, variables, x, scales=(1.0, 1.0)),
    jax.nn.softmax(raw),
    rtol=0,
    atol=1e-5,
  )
  # Flip averages with the un-mirrored scores of the mirrored image.
  mirrored = model.apply(variables, x[:, :, ::-1], train=False)['logits'][:, :, ::-1]
  np.testing.assert_allclose(
    evaluate.predict_logits(model, variables, x, flip=True),
    0.5 * (jax.nn.softmax(raw) + jax.nn.softmax(mirrored)),
    rtol=0,
    atol=1e-5,
  )
  # Another scale returns scores at the input size that sum to one: a
  # softmax sums to 1 within ~K EPS, bilinear resizing back is a convex
  # combination (a few EPS more), then a mean of 2: ~10 EPS = 6e-7. rtol
  # 1e-5 (measured 1.2e-7); scores not resized back or not averaged are
  # O(1) off.
  ms = evaluate.predict_logits(model, variables, x, scales=(0.5, 1.5))
  assert ms.shape == raw.shape
  np.testing.assert_allclose(ms.sum(-1), 1.0, rtol=1e-5)


def test_sliding_window_matches_a_python_loop():
  x = jax.random.normal(jax.random.key(2), (1, 40, 56, 3))
  model, variables = _tiny_model(x)
  got = np.asarray(evaluate.predict_logits(model, variables, x, window=32))
  # Reference: windows at rows {0, 8} and cols {0, 16, 24} (stride 16 -> 2/3 of
  # 32 rounded to 8; last window flush with the border), softmax averaged.
  total, count = np.zeros((1, 40, 56, 6)), np.zeros((1, 40, 56, 1))
  for y in (0, 8):
    for xx in (0, 16, 24):
      crop = x[:, y : y + 32, xx : xx + 32]
      p = np.asarray(jax.nn.softmax(model.apply(variables, crop, train=False)['logits']))
      total[:, y : y + 32, xx : xx + 32] += p
      count[:, y : y + 32, xx : xx + 32] += 1
  # Probabilities: atol as derived in test_flip_and_scales (measured 4e-8).
  np.testing.assert_allclose(got, total / count, rtol=0, atol=1e-5)
  # An image no larger than the window is run whole.
  small = x[:, :32, :32]
  np.testing.assert_allclose(
    evaluate.predict_logits(model, variables, small, window=32),
    jax.nn.softmax(model.apply(variables, small, train=False)['logits']),
    rtol=0,
    atol=1e-5,
  )
