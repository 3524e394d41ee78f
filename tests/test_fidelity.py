"""Where the authors' code is the reference: head initialisation and BatchNorm statistics."""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cac_jax.models import deeplabv3plus, layers


@pytest.mark.parametrize('high_channels,low_channels', [(2048, 256), (320, 24)],
                         ids=['resnet50', 'mobilenet_v2'])
def test_head_and_classifier_kernels_start_kaiming_normal_fan_in(high_channels,
                                                                 low_channels):
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
  classifier = deeplabv3plus.Classifier(21).init(key, jnp.zeros((1, 4, 4, 256)),
                                                 train=False)['params']
  kernels = {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(head).items()
             if k[-1] == 'kernel'}
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
  np.testing.assert_allclose(stats['mean'], reference.running_mean.numpy(), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(stats['var'], reference.running_var.numpy(), rtol=1e-5,
                             atol=1e-5)
  # Flax's own BatchNorm keeps the biased variance: measurably different here.
  assert not np.allclose(flax_variables['batch_stats']['var'],
                         reference.running_var.numpy(), rtol=1e-4, atol=1e-4)
  # Evaluation mode normalises with the running statistics.
  eval_y = layers.BatchNorm(use_running_average=True).apply(variables, jnp.asarray(
      inputs[0], jnp.float32))
  want = (inputs[0] - reference.running_mean.numpy()) / np.sqrt(
      reference.running_var.numpy() + 1e-5)
  np.testing.assert_allclose(eval_y, want, rtol=1e-4, atol=1e-4)
