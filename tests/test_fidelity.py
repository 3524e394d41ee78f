"""Where the authors' code is the reference: head initialisation and BatchNorm statistics."""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cac_jax.models import deeplabv3plus, layers


@pytest.mark.parametrize(
  'high_channels,low_channels', [(2048, 256), (320, 24)], ids=['resnet50', 'mobilenet_v2']
)
def test_head_and_classifier_kernels_start_kaiming_normal_fan_in(high_channels, low_channels):
  """std of every ASPP/decoder/classifier kernel = sqrt(2 / (kh * kw * C_in)).

  A kernel of n entries drawn from N(0, s^2) has a sample std within
  s * (1 +- 3 / sqrt(2n)) with probability 0.997; the smallest here (the
  21 x 256 classifier) has n = 5,376, so 3 / sqrt(2n) = 2.9%: 5% passes
  every draw, while fan_out (the old rule: 2.8x too large for the ASPP of
  ResNet-50) or torch's uniform default (std 1/sqrt(3 fan_in), 0.41x) fail.
  """
  key = jax.random.key(np.random.default_rng().integers(2**31))
  high = jnp.zeros((1, 4, 4, high_channels))
  low = jnp.zeros((1, 16, 16, low_channels))
  head = deeplabv3plus.Head().init(key, high, low, train=False)['params']
  classifier = deeplabv3plus.Classifier(21).init(key, jnp.zeros((1, 4, 4, 256)), train=False)[
    'params'
  ]
  kernels = {
    '/'.join(k): v for k, v in flax.traverse_util.flatten_dict(head).items() if k[-1] == 'kernel'
  }
  kernels['classifier'] = classifier['conv']['kernel']
  assert len(kernels) == 10  # ASPP b0-b3, pool, project; decoder low, fuse1, fuse2; classifier
  for name, kernel in kernels.items():
    kh, kw, c_in, _ = kernel.shape
    want = np.sqrt(2.0 / (kh * kw * c_in))
    assert abs(float(np.std(kernel)) / want - 1) < 0.05, (name, np.std(kernel), want)
    assert abs(float(np.mean(kernel))) < 5 * want / np.sqrt(kernel.size), name
  # Classifier bias: torch's default U(+-1/sqrt(fan_in)).
  bias = np.asarray(classifier['conv']['bias'])
  assert np.abs(bias).max() <= 1 / 16 and np.abs(bias).max() > 1 / 64


@pytest.mark.parametrize('shape', [(2, 4, 4, 5), (8, 1, 1, 7)], ids=['map', 'pooled_1x1'])
def test_batchnorm_running_statistics_equal_torch(shape):
  """Three train-mode passes: running mean/var equal torch.nn.BatchNorm2d's (float64).

  Tolerance: the float32 statistics of n <= 32 values per channel (|x| <= 4)
  carry a rounding error of at most ~n * 2^-24 * E[x^2] ~ 2e-6 relative on
  E[x^2] and E[x]^2 each, and the running average only contracts errors
  (momentum 0.9). rtol = atol = 1e-5 is 5x that and far below the biased vs
  unbiased difference it must detect (0.1 * var / (n - 1): 3e-3 for n = 32,
  1.4e-2 for the pooled n = 8).
  """
  rng = np.random.default_rng()
  inputs = [rng.normal(rng.uniform(-1, 1), rng.uniform(0.5, 1.5), shape) for _ in range(3)]
  module = layers.BatchNorm(use_running_average=False)
  variables = module.init(jax.random.key(0), jnp.zeros(shape, jnp.float32))
  reference = torch.nn.BatchNorm2d(shape[-1], momentum=0.1, eps=1e-5).double().train()
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  flax_variables = flax_bn.init(jax.random.key(0), jnp.zeros(shape, jnp.float32))
  for x in inputs:
    x32 = jnp.asarray(x, jnp.float32)
    y, updates = module.apply(variables, x32, mutable=['batch_stats'])
    variables = {**variables, **updates}
    reference(torch.from_numpy(x).permute(0, 3, 1, 2))
    # The training-mode output is Flax's own, bit for bit.
    y_flax, flax_updates = flax_bn.apply(flax_variables, x32, mutable=['batch_stats'])
    flax_variables = {**flax_variables, **flax_updates}
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_flax))
  stats = variables['batch_stats']
  np.testing.assert_allclose(stats['mean'], reference.running_mean.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats['var'], reference.running_var.numpy(), rtol=1e-5, atol=1e-5)
  # Flax's own BatchNorm keeps the biased variance: measurably different here.
  assert not np.allclose(
    flax_variables['batch_stats']['var'], reference.running_var.numpy(), rtol=1e-4, atol=1e-4
  )
  # Evaluation mode normalises with the running statistics.
  eval_y = layers.BatchNorm(use_running_average=True).apply(
    variables, jnp.asarray(inputs[0], jnp.float32)
  )
  want = (inputs[0] - reference.running_mean.numpy()) / np.sqrt(
    reference.running_var.numpy() + 1e-5
  )
  np.testing.assert_allclose(eval_y, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
  'size', [(300, 410), (128, 96), (700, 900), (513, 257)], ids=['down', 'down_4x', 'up', 'mixed']
)
def test_image_resize_is_pil_bicubic(size):
  """augment.resize_image against PIL's BICUBIC on real photos (skimage), up and down.

  PIL works in 8 bits: it rounds its output (and, in its two 1-D passes, the
  intermediate result) to integers and clips; our float result is neither
  rounded nor re-quantised. Rounding alone makes the mean absolute difference
  ~0.25 of a grey level and 0.5 at most per pass, so: mean < 0.4 and 99th
  percentile < 1.5 levels (measured 0.24-0.27 and 0.7-0.85). Bilinear, the
  previous rule, is 0.9-2.1 levels off on average and fails.
  """
  import skimage.data
  import tensorflow as tf
  from PIL import Image

  from cac_jax.data import augment

  h, w = size
  for photo in (skimage.data.astronaut(), skimage.data.chelsea()):
    want = np.asarray(Image.fromarray(photo).resize((w, h), Image.BICUBIC), np.float64)
    got = augment.resize_image(tf.constant(photo), h, w).numpy()
    assert got.shape == want.shape
    diff = np.abs(got - want)
    assert diff.mean() < 0.4 and np.percentile(diff, 99) < 1.5, (
      diff.mean(),
      np.percentile(diff, 99),
    )


def test_colour_jitter_order_is_a_uniform_random_permutation_per_call():
  """All 24 orders appear, at their expected rate (chi-square, 2,400 seeds)."""
  import itertools

  import tensorflow as tf
  from scipy import stats

  from cac_jax.data import augment

  base = int(np.random.default_rng().integers(2**30))
  orders = [
    tuple(augment.jitter_order(tf.constant([base, i], tf.int64)).numpy()) for i in range(2400)
  ]
  counts = [orders.count(p) for p in itertools.permutations(range(4))]
  assert sum(counts) == 2400 and min(counts) > 0
  # p < 1e-4 only for a biased draw (or one fixed order: chi2 ~ 55,000).
  assert stats.chisquare(counts).pvalue > 1e-4, counts


def test_colour_jitter_applies_the_ops_in_the_drawn_order():
  """random_color_jitter == the four torchvision ops composed in jitter_order (NumPy)."""
  import colorsys

  import tensorflow as tf

  from cac_jax.data import augment

  rng = np.random.default_rng()
  image = rng.uniform(0, 255, (6, 7, 3))
  gray_w = np.array([0.299, 0.587, 0.114])

  def hue(x, delta):
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:2]):
      h, s_, v = colorsys.rgb_to_hsv(*(x[idx] / 255))
      out[idx] = np.array(colorsys.hsv_to_rgb((h + delta) % 1.0, s_, v)) * 255
    return out

  orders_seen, order_effects = set(), []
  for i in range(12):
    seed = tf.constant([int(rng.integers(2**30)), i], tf.int64)
    seeds = augment.split_seed(seed, 4)
    b, c, s = (float(tf.random.stateless_uniform([], seeds[k], 0.6, 1.4)) for k in range(3))
    delta = float(tf.random.stateless_uniform([], seeds[3], -0.1, 0.1))
    ops = [
      lambda x: np.clip(x * b, 0, 255),
      lambda x: np.clip(c * x + (1 - c) * (x @ gray_w).mean(), 0, 255),
      lambda x: np.clip(s * x + (1 - s) * (x @ gray_w)[..., None], 0, 255),
      lambda x: np.clip(hue(x, delta), 0, 255),
    ]
    order = augment.jitter_order(seed).numpy()
    orders_seen.add(tuple(order))
    want = image
    for k in order:
      want = ops[k](want)
    got = augment.random_color_jitter(tf.constant(image, tf.float32), seed).numpy()
    # float32 arithmetic on values <= 255 through 4 ops (TF's HSV round trip
    # included): a few ulps of 255, ~1e-4; 1e-2 of a grey level is 100x that.
    np.testing.assert_allclose(got, want, atol=1e-2)
    # The order matters (through the clipping at 0 and 255 and the hue
    # rotation): the fixed order the code used before is measurably different.
    fixed = image
    for k in range(4):
      fixed = ops[k](fixed)
    if tuple(order) != (0, 1, 2, 3):
      order_effects.append(np.abs(fixed - want).max())
  assert len(orders_seen) > 1
  assert max(order_effects) > 0.1, order_effects


def test_batched_sharded_evaluation_equals_a_per_image_loop(tmp_path):
  """Variable-size val images: the confusion matrix of the batched evaluation on
  8 devices equals the authors' protocol run image by image, and `predict`
  writes exactly the labels that are scored.

  Eval-mode BatchNorm has no cross-image statistics, so batching can only
  change a label through float round-off in the convolutions (batch 1 and
  batch 3 are different XLA programs), i.e. where two logits are within
  ~1e-6 of each other: an expected ~0.02 of the ~20,000 pixels here. The
  counts may therefore differ by 2 per flipped pixel; up to 2 flips are
  allowed (4 counts), while evaluating on a shared canvas or with the
  wrong padding moves hundreds (the border rows and columns of every image).
  """
  from PIL import Image

  from cac_jax import evaluate as eval_lib
  from cac_jax import predict, sharding
  from cac_jax.data import pipeline
  from cac_jax.models import build_model
  from train_utils import tiny_config

  rng = np.random.default_rng()
  sizes = [(37, 50), (64, 64), (50, 37), (64, 64), (33, 41), (64, 64), (40, 48)]
  root = tmp_path / 'data'
  for sub in ('images', 'masks', 'splits'):
    (root / sub).mkdir(parents=True)
  names = [f'v{i}' for i in range(len(sizes))]
  for name, (h, w) in zip(names, sizes):
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(root / 'images' / f'{name}.png')
    mask = rng.integers(0, 3, (h, w)).astype(np.uint8)
    mask[:3] = 255
    Image.fromarray(mask).save(root / 'masks' / f'{name}.png')
  for split in ('labeled', 'unlabeled', 'val'):
    (root / 'splits' / f'{split}.txt').write_text('\n'.join(names) + '\n')
  config = tiny_config(
    **{
      'data.name': 'folder',
      'data.root': str(root),
      'data.num_classes': 3,
      'data.unlabeled_split_file': '',
    }
  )
  model = build_model(config.model, num_classes=3)
  variables = model.init(
    jax.random.key(int(rng.integers(2**31))), jnp.zeros((1, 64, 64, 3)), train=False
  )
  mesh = sharding.make_mesh()
  assert mesh.devices.size == 8
  with jax.set_mesh(mesh):
    step = eval_lib.make_eval_step(model, 3, mesh)
    batched = eval_lib.evaluate(step, variables, pipeline.eval_iterator(config), mesh, 3)
  # The per-image loop, as the authors evaluate, with predict's own code.
  predictor = predict.Predictor(model, variables)
  loop = np.zeros((3, 3), np.int64)
  for name in names:
    image = predict.read_image(str(root / 'images' / f'{name}.png'))
    label = np.asarray(Image.open(root / 'masks' / f'{name}.png')).astype(np.int64)
    pred = predictor(image).astype(np.int64)
    keep = label != 255
    loop += np.bincount(3 * label[keep] + pred[keep], minlength=9).reshape(3, 3)
  assert batched.sum() == loop.sum() == sum(h * w - 3 * w for h, w in sizes)
  assert np.abs(batched - loop).sum() <= 4, (batched, loop)


@pytest.mark.parametrize(
  'backbone,output_stride,flips',
  [
    ('resnet_tiny', 16, (True,)),  # the flipped pass also runs the unflipped one
    ('resnet_tiny', 8, (False,)),
    ('mobilenet_v2', 16, (False,)),
  ],
)
def test_shared_canvas_computes_each_image_as_if_alone(backbone, output_stride, flips):
  """`layers.valid_region`: logits on a shared canvas equal each image run alone.

  Five images of random sizes (multiples of 8, from 8 to 64 px a side) on a
  64 x 64 canvas whose free part holds noise; every spatial layer of the
  network (strided and dilated convolutions, max-pooling, the ASPP image
  pooling, both align-corners resizes) must ignore it; with a flip, each
  image's own region is mirrored. BatchNorm statistics are drawn at random
  so that normalisation is not the identity. Tolerance: the
  canvas sums the same products in another order (extra zero terms, batch
  of 6 vs 1), float32 rounding over dot products of <= 3 x 3 x 320 terms,
  ~1e-6 relative; 1e-4 of the largest logit leaves ~100x room, while the
  unmasked canvas is off by ~1e4 x the tolerance (checked, so the test
  can fail).
  """
  import ml_collections

  from cac_jax import evaluate as eval_lib
  from cac_jax.models import build_model

  rng = np.random.default_rng()
  cfg = ml_collections.ConfigDict(
    dict(
      backbone=backbone, output_stride=output_stride, projector=True, proj_dim=16, dtype='float32'
    )
  )
  model = build_model(cfg, num_classes=5)
  variables = model.init(
    jax.random.key(int(rng.integers(2**31))), jnp.zeros((1, 64, 64, 3)), train=False
  )
  stats = flax.traverse_util.flatten_dict(variables['batch_stats'])
  stats = {
    k: (rng.normal(0, 0.2, v.shape) if k[-1] == 'mean' else rng.uniform(0.5, 2.0, v.shape)).astype(
      np.float32
    )
    for k, v in stats.items()
  }
  variables = {
    'params': variables['params'],
    'batch_stats': flax.traverse_util.unflatten_dict(stats),
  }
  sizes = np.array(
    [(64, 64), (8, 8)] + [tuple(8 * rng.integers(1, 8, 2)) for _ in range(3)], np.int32
  )
  images = [rng.normal(size=(h, w, 3)).astype(np.float32) for h, w in sizes]
  canvas = rng.normal(size=(len(sizes), 64, 64, 3)).astype(np.float32)
  for i, image in enumerate(images):
    canvas[i, : image.shape[0], : image.shape[1]] = image
  for flip in flips:
    predict = jax.jit(functools.partial(eval_lib.predict_logits, model, flip=flip))
    got = np.asarray(predict(variables, canvas, sizes=jnp.asarray(sizes)))
    plain = np.asarray(predict(variables, canvas))
    unmasked_error = 0.0
    for i, image in enumerate(images):
      h, w = image.shape[:2]
      alone = np.asarray(predict(variables, image[None]))[0]
      tol = 1e-4 * np.abs(alone).max()
      np.testing.assert_allclose(got[i, :h, :w], alone, rtol=0, atol=tol)
      unmasked_error = max(unmasked_error, np.abs(plain[i, :h, :w] - alone).max() / tol)
    assert unmasked_error > 100
