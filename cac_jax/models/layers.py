"""Building blocks shared by the backbones and the DeepLabv3+ head.

Everything here reproduces PyTorch semantics where they differ from the Flax
or XLA defaults, because the backbones are initialised from torchvision
checkpoints and must compute the same function:

* Convolutions and max-pooling pad *symmetrically* (PyTorch), not with XLA's
  'SAME' rule, which puts the extra row/column of a strided window on the
  bottom/right only and so shifts every strided feature map by half a pixel.
* Bilinear resizing uses ``align_corners=True`` (the DeepLab convention the
  CAC code uses); ``jax.image.resize`` implements ``align_corners=False``.
* BatchNorm uses PyTorch's defaults (momentum 0.1 -> Flax ``momentum=0.9``,
  eps 1e-5). Under ``jax.jit`` over a batch sharded on a mesh, the batch mean
  and variance are global reductions, i.e. SyncBN comes for free; passing an
  ``axis_name`` (a pmap idiom) would fail there.

Naming convention used by :mod:`cac_jax.models.convert`: a Flax module path
joined with ``_`` and with every ``_`` read as ``.`` is the torchvision
state-dict key prefix (``layer1_0/conv1/kernel`` <-> ``layer1.0.conv1.weight``),
so module names never contain ``_`` except as such a separator.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# torchvision initialises ResNet convolutions with kaiming_normal(fan_out, relu)
# and the CAC head with kaiming_normal as well; use the same for random init.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# torch.nn.Conv2d's own default (kaiming_uniform with a=sqrt(5)): U(+-1/sqrt(fan_in)).
# Used for the 1x1 classifier and projector: with the fan_out rule above a
# 6-way classifier on 256 unit-scale channels starts with logits of std ~9
# (cross-entropy ~6 and gradient norms in the hundreds at step 0).
torch_default_kernel_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')

BN_MOMENTUM = 0.9   # Flax convention: new = 0.9 * old + 0.1 * batch (torch 0.1)
BN_EPSILON = 1e-5


def torch_padding(kernel_size: int, dilation: int = 1) -> tuple:
  """Symmetric ((p, p), (p, p)) padding PyTorch uses for an odd kernel."""
  pad = dilation * (kernel_size - 1) // 2
  return ((pad, pad), (pad, pad))


class Conv(nn.Module):
  """2-D convolution with PyTorch's symmetric padding, NHWC.

  Attributes:
    features: output channels.
    kernel_size: square kernel size (odd, or 1).
    strides: square stride.
    dilation: square dilation (atrous rate).
    groups: feature groups (== input channels for depthwise convolution).
    use_bias: whether to add a bias.
    dtype: compute dtype; parameters stay float32.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  dilation: int = 1
  groups: int = 1
  use_bias: bool = False
  dtype: Any = jnp.float32
  kernel_init: Any = conv_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the convolution.

    Args:
      x: [B, H, W, C_in].

    Returns:
      [B, H', W', features] in ``dtype`` with
      H' = floor((H + 2p - dilation*(k-1) - 1) / stride) + 1, as in PyTorch.
    """
    # Parameters live directly on this module (not one level deeper in a
    # wrapped nn.Conv) so that the tree mirrors the torchvision key layout.
    k = self.kernel_size
    in_features = x.shape[-1]
    if in_features % self.groups:
      raise ValueError(
          f'Conv: {in_features} input channels are not divisible by '
          f'groups={self.groups}; use a channel count that is a multiple.')
    kernel = self.param('kernel', self.kernel_init,
                        (k, k, in_features // self.groups, self.features),
                        jnp.float32)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype),
        window_strides=(self.strides, self.strides),
        padding=torch_padding(k, self.dilation),
        rhs_dilation=(self.dilation, self.dilation),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=self.groups)
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros, (self.features,),
                        jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def batch_norm(train: bool, dtype: Any, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm with PyTorch defaults; statistics and parameters in float32.

  Args:
    train: True uses (global, under jit: synchronised) batch statistics and
      updates the running averages; False uses the running averages.
    dtype: compute dtype of the output.
    name: module name in the torchvision layout (``bn1``, ``downsample_1``).
  """
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=BN_MOMENTUM,
      epsilon=BN_EPSILON,
      dtype=dtype,
      param_dtype=jnp.float32,
      name=name)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch ``MaxPool2d(3, stride=2, padding=1)``: pads with -inf symmetrically.

  Args:
    x: [B, H, W, C].

  Returns:
    [B, floor((H - 1) / 2) + 1, floor((W - 1) / 2) + 1, C].
  """
  # Flax's max_pool pads with the reduction's identity (-inf), like PyTorch.
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _align_corners_taps(in_size: int, out_size: int):
  """Source indices and weights of 1-D linear interpolation, align_corners=True.

  Output sample i maps to source coordinate i * (in - 1) / (out - 1) (0 when
  out == 1), i.e. the corner samples of input and output coincide.

  Returns:
    (lo, hi, frac): int32 [out], int32 [out], float32 [out] (NumPy, static).
  """
  if out_size == 1 or in_size == 1:
    src = np.zeros((out_size,), np.float64)
  else:
    src = np.arange(out_size, dtype=np.float64) * ((in_size - 1) / (out_size - 1))
  lo = np.clip(np.floor(src).astype(np.int32), 0, in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo).astype(np.float32)
  return lo, hi, frac


def resize_bilinear_align_corners(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resize of NHWC maps with PyTorch ``align_corners=True`` semantics.

  Written as two separable gather-and-lerp passes with static indices: exact in
  float32 (no matmul, so no reduced-precision passes on TPU) and cheap.

  Args:
    x: [B, H, W, C], any float dtype (the result keeps it).
    size: (H_out, W_out).

  Returns:
    [B, H_out, W_out, C], equal to ``F.interpolate(x, size, mode='bilinear',
    align_corners=True)`` up to float rounding.
  """
  if x.ndim != 4:
    raise ValueError(f'resize expects [B, H, W, C], got shape {x.shape}.')
  out_h, out_w = (int(s) for s in size)
  if out_h < 1 or out_w < 1:
    raise ValueError(f'resize target size must be positive, got {size}.')
  for axis, out_size in ((1, out_h), (2, out_w)):
    in_size = x.shape[axis]
    if in_size == out_size:
      continue
    lo, hi, frac = _align_corners_taps(in_size, out_size)
    # Indices are in range by construction; 'clip' skips the bounds masking.
    x_lo = jnp.take(x, lo, axis=axis, mode='clip')
    x_hi = jnp.take(x, hi, axis=axis, mode='clip')
    w = jnp.asarray(frac, x.dtype).reshape(
        [-1 if a == axis else 1 for a in range(4)])
    x = x_lo + (x_hi - x_lo) * w
  return x


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along ``axis`` (torch ``F.normalize``), in float32.

  Written with rsqrt of the clamped squared norm: ``sqrt`` has an infinite
  derivative at 0, which turns the gradient of an all-zero feature (possible
  after ReLU when the projector is off) into NaN.
  """
  x = x.astype(jnp.float32)
  sum_sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sum_sq, eps * eps))
