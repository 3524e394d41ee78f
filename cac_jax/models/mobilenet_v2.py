"""MobileNetV2 in torchvision layout: segmentation backbone and ImageNet classifier.

torchvision's ``features`` list is reproduced index by index (module names
``features_0`` ... ``features_18``, inner names as in the torchvision
``state_dict``), so converted ImageNet weights load one-to-one:

  features[0]      ConvBNReLU6 3 -> 32, stride 2
  features[1..17]  inverted residual blocks, settings (t, c, n, s):
                   (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1)
                   (6,160,3,2) (6,320,1,1)
  features[18]     ConvBNReLU6 1x1 320 -> 1280
  classifier       Dropout(0.2) -> Linear 1280 -> 1000

As a segmentation backbone (``include_top=False``) it follows DeepLab's
MobileNetV2: low-level features after features[3] (24 ch, stride 4); deep
features after features[17] (320 ch; features[18] and the classifier are not
built, as in DeepLab). At output stride 16 the last stride-2 stage
(features[14..16]) gets stride 1 and the blocks after its first one dilation 2
(the first keeps dilation 1, as DeepLab and torchvision do when they trade
stride for dilation).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cac_jax.models.layers import Conv, batch_norm

# (expand ratio t, output channels c, repeats n, first stride s).
INVERTED_RESIDUAL_SETTING = (
  (1, 16, 1, 1),
  (6, 24, 2, 2),
  (6, 32, 3, 2),
  (6, 64, 4, 2),
  (6, 96, 3, 1),
  (6, 160, 3, 2),
  (6, 320, 1, 1),
)
LOW_LEVEL_INDEX = 3  # features[3] output: 24 channels at stride 4
NUM_IMAGENET_CLASSES = 1000


def relu6(x: jax.Array) -> jax.Array:
  return jnp.clip(x, 0, 6)


class InvertedResidual(nn.Module):
  """torchvision InvertedResidual: [1x1 expand] -> 3x3 depthwise -> 1x1 project.

  Submodule names reproduce torchvision's ``conv`` Sequential: with expansion
  ``conv_0_0/conv_0_1`` (expand conv/BN), ``conv_1_0/conv_1_1`` (depthwise),
  ``conv_2`` (project conv), ``conv_3`` (BN); without expansion (t = 1) the
  depthwise pair is ``conv_0_*`` and the projection ``conv_1``/``conv_2``.
  """

  in_channels: int
  out_channels: int
  strides: int
  dilation: int
  expand_ratio: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    hidden = self.in_channels * self.expand_ratio
    out = x
    idx = 0
    if self.expand_ratio != 1:
      out = Conv(hidden, 1, dtype=self.dtype, name=f'conv_{idx}_0')(out)
      out = relu6(batch_norm(train, self.dtype, f'conv_{idx}_1')(out))
      idx += 1
    out = Conv(
      hidden,
      3,
      strides=self.strides,
      dilation=self.dilation,
      groups=hidden,
      dtype=self.dtype,
      name=f'conv_{idx}_0',
    )(out)
    out = relu6(batch_norm(train, self.dtype, f'conv_{idx}_1')(out))
    out = Conv(self.out_channels, 1, dtype=self.dtype, name=f'conv_{idx + 1}')(out)
    out = batch_norm(train, self.dtype, f'conv_{idx + 2}')(out)
    if self.strides == 1 and self.in_channels == self.out_channels:
      out = out + x
    return out


class MobileNetV2(nn.Module):
  """MobileNetV2 (width 1.0).

  Attributes:
    output_stride: 16 (dilated last stride-2 stage) or 32 (plain, as trained
      on ImageNet). 8 is not supported.
    include_top: build features[18] and the ImageNet classifier and return
      logits (used to test the converted ImageNet weights).
    dtype: compute dtype (parameters and BatchNorm statistics stay float32).
  """

  output_stride: int = 16
  include_top: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool):
    """Runs the network.

    Args:
      x: [B, H, W, 3] images, ImageNet-normalised.
      train: batch statistics (True) or running averages (False); also
        enables the classifier's dropout (needs a 'dropout' rng).

    Returns:
      include_top=False: {'low': [B, ~H/4, ~W/4, 24],
                          'high': [B, ~H/os, ~W/os, 320]}.
      include_top=True: float32 logits [B, 1000].
    """
    if self.output_stride not in (16, 32):
      raise ValueError(
        f'MobileNetV2 supports output_stride 16 or 32, got '
        f'{self.output_stride}; set config.model.output_stride to 16.'
      )
    x = Conv(32, 3, strides=2, dtype=self.dtype, name='features_0_0')(x)
    x = relu6(batch_norm(train, self.dtype, 'features_0_1')(x))
    current_stride, dilation = 2, 1
    in_channels = 32
    index = 1
    low = None
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
      for i in range(n):
        stride = s if i == 0 else 1
        block_dilation = dilation
        if stride > 1 and current_stride * stride > self.output_stride:
          # Trade this stride for dilation: this block keeps the current
          # dilation, the following ones see the dilated grid.
          dilation *= stride
          stride = 1
        current_stride *= stride
        x = InvertedResidual(
          in_channels, c, stride, block_dilation, t, dtype=self.dtype, name=f'features_{index}'
        )(x, train)
        in_channels = c
        if index == LOW_LEVEL_INDEX:
          low = x
        index += 1
    if not self.include_top:
      return {'low': low, 'high': x}
    x = Conv(1280, 1, dtype=self.dtype, name=f'features_{index}_0')(x)
    x = relu6(batch_norm(train, self.dtype, f'features_{index}_1')(x))
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = nn.Dropout(0.2, deterministic=not train)(x)
    return nn.Dense(
      NUM_IMAGENET_CLASSES, dtype=jnp.float32, param_dtype=jnp.float32, name='classifier_1'
    )(x)


def mobilenet_v2(output_stride: int = 16, dtype: Any = jnp.float32) -> MobileNetV2:
  """MobileNetV2 segmentation backbone: low 24 ch (stride 4), high 320 ch."""
  return MobileNetV2(output_stride=output_stride, include_top=False, dtype=dtype)
