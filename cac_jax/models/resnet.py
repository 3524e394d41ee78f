"""Dilated ResNet backbones in torchvision layout (ResNet v1.5).

ResNet-50/101 follow the CAC code (DeepLab-style dilated ResNet): strides
(1, 2, 2, 1) and layer4 dilated with multi-grid (1, 2, 4) x 2 at output
stride 16; at output stride 8 layer3 is dilated by 2 (every block) and layer4
uses multi-grid x 4. The stride of a downsampling bottleneck sits on its 3x3
convolution (v1.5), which is what torchvision's checkpoints were trained with.

``resnet_tiny`` is a narrow ResNet-18-like network (basic blocks, widths
16/32/64/128, one block per stage) with the same output contract, for tests.

Parameter names mirror torchvision (``conv1``, ``bn1``, ``layer1_0/conv1``,
``layer1_0/downsample_0``, ...) so that :mod:`cac_jax.models.convert` maps a
torchvision ``state_dict`` one-to-one (see :mod:`cac_jax.models.layers`).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cac_jax.models.layers import Conv, batch_norm, max_pool_3x3_s2

MULTI_GRID = (1, 2, 4)


class Bottleneck(nn.Module):
  """torchvision Bottleneck (expansion 4), stride on the 3x3 convolution."""

  planes: int
  strides: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """[B, H, W, C_in] -> [B, H/stride, W/stride, 4 * planes]."""
    out = Conv(self.planes, 1, dtype=self.dtype, name='conv1')(x)
    out = nn.relu(batch_norm(train, self.dtype, 'bn1')(out))
    out = Conv(
      self.planes, 3, strides=self.strides, dilation=self.dilation, dtype=self.dtype, name='conv2'
    )(out)
    out = nn.relu(batch_norm(train, self.dtype, 'bn2')(out))
    out = Conv(self.planes * 4, 1, dtype=self.dtype, name='conv3')(out)
    out = batch_norm(train, self.dtype, 'bn3')(out)
    if self.downsample:
      x = Conv(self.planes * 4, 1, strides=self.strides, dtype=self.dtype, name='downsample_0')(x)
      x = batch_norm(train, self.dtype, 'downsample_1')(x)
    return nn.relu(out + x)


class BasicBlock(nn.Module):
  """torchvision BasicBlock (expansion 1): two 3x3 convolutions."""

  planes: int
  strides: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """[B, H, W, C_in] -> [B, H/stride, W/stride, planes]."""
    out = Conv(
      self.planes, 3, strides=self.strides, dilation=self.dilation, dtype=self.dtype, name='conv1'
    )(x)
    out = nn.relu(batch_norm(train, self.dtype, 'bn1')(out))
    out = Conv(self.planes, 3, dilation=self.dilation, dtype=self.dtype, name='conv2')(out)
    out = batch_norm(train, self.dtype, 'bn2')(out)
    if self.downsample:
      x = Conv(self.planes, 1, strides=self.strides, dtype=self.dtype, name='downsample_0')(x)
      x = batch_norm(train, self.dtype, 'downsample_1')(x)
    return nn.relu(out + x)


def layer_plan(output_stride: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Per-stage (strides, base dilations) of the CAC dilated ResNet.

  Raises:
    ValueError: output_stride is not 8 or 16.
  """
  if output_stride == 16:
    return (1, 2, 2, 1), (1, 1, 1, 2)
  if output_stride == 8:
    return (1, 2, 1, 1), (1, 1, 2, 4)
  raise ValueError(
    f'output_stride must be 8 or 16, got {output_stride}; set '
    'config.model.output_stride to 8 or 16.'
  )


class ResNet(nn.Module):
  """Dilated ResNet feature extractor (no average pool, no fc).

  Attributes:
    block: ``Bottleneck`` or ``BasicBlock``.
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50. Stage 4
      always has ``len(MULTI_GRID)`` blocks in the CAC network, so its entry
      must be 3 (checked).
    widths: ``planes`` per stage, (64, 128, 256, 512) in torchvision.
    stem_width: output channels of conv1.
    output_stride: 8 or 16.
    dtype: compute dtype (parameters and BatchNorm statistics stay float32).
  """

  block: Any = Bottleneck
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  widths: Sequence[int] = (64, 128, 256, 512)
  stem_width: int = 64
  output_stride: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    """Computes low-level and deep features.

    Args:
      x: [B, H, W, 3] images, ImageNet-normalised.
      train: batch statistics (True) or running averages (False) in BatchNorm.

    Returns:
      {'low': [B, ceil(H/4), ceil(W/4), widths[0] * expansion] (layer1),
       'high': [B, ~H/os, ~W/os, widths[3] * expansion] (layer4)}, in dtype.
      Spatial sizes follow PyTorch's floor formula (e.g. 321 -> 81 -> 21).
    """
    strides, dilations = layer_plan(self.output_stride)
    x = Conv(self.stem_width, 7, strides=2, dtype=self.dtype, name='conv1')(x)
    x = nn.relu(batch_norm(train, self.dtype, 'bn1')(x))
    x = max_pool_3x3_s2(x)
    in_channels = self.stem_width
    low = x
    for stage, num_blocks in enumerate(self.stage_sizes):
      planes = self.widths[stage]
      out_channels = planes * self.block.expansion
      if stage == 3:
        # Multi-grid: the blocks of layer4 use dilation base * (1, 2, 4).
        if self.block is Bottleneck and num_blocks != len(MULTI_GRID):
          raise ValueError(
            f'layer4 must have {len(MULTI_GRID)} blocks (multi-grid), got {num_blocks}.'
          )
        block_dilations = [dilations[3] * MULTI_GRID[i] for i in range(num_blocks)]
      else:
        block_dilations = [dilations[stage]] * num_blocks
      for i in range(num_blocks):
        first = i == 0
        x = self.block(
          planes,
          strides=strides[stage] if first else 1,
          dilation=block_dilations[i],
          downsample=first and (strides[stage] != 1 or in_channels != out_channels),
          dtype=self.dtype,
          name=f'layer{stage + 1}_{i}',
        )(x, train)
        in_channels = out_channels
      if stage == 0:
        low = x
    return {'low': low, 'high': x}


def resnet50(output_stride: int = 16, dtype: Any = jnp.float32) -> ResNet:
  """ResNet-50 (23,508,032 parameters without fc)."""
  return ResNet(Bottleneck, (3, 4, 6, 3), output_stride=output_stride, dtype=dtype)


def resnet101(output_stride: int = 16, dtype: Any = jnp.float32) -> ResNet:
  """ResNet-101 (42,500,160 parameters without fc)."""
  return ResNet(Bottleneck, (3, 4, 23, 3), output_stride=output_stride, dtype=dtype)


def resnet_tiny(output_stride: int = 16, dtype: Any = jnp.float32) -> ResNet:
  """Narrow ResNet-18-like backbone for tests: low 16 ch, high 128 ch."""
  return ResNet(
    BasicBlock,
    (1, 1, 1, 1),
    widths=(16, 32, 64, 128),
    stem_width=16,
    output_stride=output_stride,
    dtype=dtype,
  )
