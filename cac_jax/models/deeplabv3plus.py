"""DeepLabv3+ with the CAC classifier and projector heads.

Top-level variable collections (the optimiser gives 'backbone' lr / 10):

  params['backbone']    ResNet-50/101, MobileNetV2 or resnet_tiny
  params['head']        ASPP ('aspp') + decoder ('decoder')
  params['classifier']  dropout 0.1 -> 1x1 conv with bias to K classes
  params['projector']   1x1 conv 256->256 (bias) -> ReLU -> 1x1 conv -> proj_dim
  batch_stats: the same names where BatchNorm exists (backbone, head).

Outputs (see :class:`DeepLabV3Plus`): stride-4 logits upsampled to the input
size, and for the directional contrastive loss the classifier logits and the
unit-norm projections of the 2x2-average-pooled (stride-8) decoder features.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cac_jax.models.layers import (
  Conv,
  Dropout,
  batch_norm,
  head_kernel_init,
  l2_normalize,
  resize_bilinear_align_corners,
  spatial_mean,
  torch_default_kernel_init,
)

HEAD_CHANNELS = 256
LOW_LEVEL_CHANNELS = 48
ASPP_RATES_OS16 = (6, 12, 18)  # doubled at output stride 8


def aspp_rates(output_stride: int) -> tuple[int, ...]:
  """The ASPP's atrous rates at `output_stride` (8 or 16)."""
  return tuple(r * (16 // output_stride) for r in ASPP_RATES_OS16)


def untrained_aspp_rates(output_stride: int, train_size: int, eval_size: int) -> tuple:
  """ASPP rates whose off-centre taps training never reaches but evaluation uses.

  On a map of n cells a rate-r 3x3 tap offset by r reads a real feature only
  if r <= n - 1 (`layers.live_taps`); otherwise it reads zero padding alone
  and its kernel gets exactly zero gradient. If training crops give maps too
  small for a rate that the evaluation's (larger) maps reach, those taps keep
  their random initialisation and join the prediction only at evaluation.

  Args:
    output_stride: 8 or 16.
    train_size: the training crop side in pixels.
    eval_size: the largest side the network sees at evaluation (the val
      image's padded side, or the sliding window).
  """
  cells = lambda size: -(-int(size) // output_stride)
  return tuple(
    r for r in aspp_rates(output_stride) if r > cells(train_size) - 1 and r <= cells(eval_size) - 1
  )


class ConvBNReLU(nn.Module):
  """conv (no bias) -> BatchNorm -> ReLU; params under 'conv' and 'bn'."""

  features: int
  kernel_size: int = 1
  dilation: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = Conv(
      self.features,
      self.kernel_size,
      dilation=self.dilation,
      dtype=self.dtype,
      kernel_init=head_kernel_init,
      name='conv',
    )(x)
    return nn.relu(batch_norm(train, self.dtype, 'bn')(x))


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling.

  Branches 'b0' (1x1), 'b1'..'b3' (3x3 atrous at ``rates``), 'pool' (image
  pooling: global mean -> 1x1 -> BN -> ReLU -> broadcast back), each 256 ch;
  concatenated (1280 ch) -> 'project' 1x1 256 -> BN -> ReLU -> dropout 0.5.
  """

  rates: tuple[int, int, int] = (6, 12, 18)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """[B, h, w, C] deep features -> [B, h, w, 256]."""
    branches = [ConvBNReLU(HEAD_CHANNELS, 1, dtype=self.dtype, name='b0')(x, train)]
    for i, rate in enumerate(self.rates):
      branches.append(
        ConvBNReLU(HEAD_CHANNELS, 3, dilation=rate, dtype=self.dtype, name=f'b{i + 1}')(x, train)
      )
    pooled = spatial_mean(x)  # per image region on an evaluation canvas
    pooled = ConvBNReLU(HEAD_CHANNELS, 1, dtype=self.dtype, name='pool')(pooled, train)
    # Bilinear upsampling of a 1x1 map (any corner convention) is a broadcast.
    branches.append(jnp.broadcast_to(pooled, x.shape[:3] + (HEAD_CHANNELS,)))
    x = jnp.concatenate(branches, axis=-1)
    x = ConvBNReLU(HEAD_CHANNELS, 1, dtype=self.dtype, name='project')(x, train)
    return Dropout(0.5, deterministic=not train)(x)


class Decoder(nn.Module):
  """DeepLabv3+ decoder: fuse upsampled ASPP output with low-level features.

  'low' 1x1 -> 48 -> BN -> ReLU; ASPP output resized (bilinear,
  align_corners=True) to the low-level grid; concat (304 ch) -> 'fuse1' 3x3
  256 -> BN -> ReLU -> dropout 0.5 -> 'fuse2' 3x3 256 -> BN -> ReLU.
  """

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, aspp_out: jax.Array, low: jax.Array, train: bool) -> jax.Array:
    """([B, h, w, 256], [B, H4, W4, C_low]) -> [B, H4, W4, 256]."""
    low = ConvBNReLU(LOW_LEVEL_CHANNELS, 1, dtype=self.dtype, name='low')(low, train)
    up = resize_bilinear_align_corners(aspp_out, low.shape[1:3])
    x = jnp.concatenate([up.astype(low.dtype), low], axis=-1)
    x = ConvBNReLU(HEAD_CHANNELS, 3, dtype=self.dtype, name='fuse1')(x, train)
    x = Dropout(0.5, deterministic=not train)(x)
    return ConvBNReLU(HEAD_CHANNELS, 3, dtype=self.dtype, name='fuse2')(x, train)


class Head(nn.Module):
  """ASPP + decoder: (deep, low-level) features -> 256-ch stride-4 features."""

  rates: tuple[int, int, int] = (6, 12, 18)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, high: jax.Array, low: jax.Array, train: bool) -> jax.Array:
    x = ASPP(self.rates, dtype=self.dtype, name='aspp')(high, train)
    return Decoder(dtype=self.dtype, name='decoder')(x, low, train)


class Classifier(nn.Module):
  """Dropout 0.1 -> 1x1 conv with bias; logits returned in float32."""

  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = Dropout(0.1, deterministic=not train)(x)
    x = Conv(
      self.num_classes,
      1,
      use_bias=True,
      dtype=self.dtype,
      kernel_init=head_kernel_init,
      torch_bias_init=True,
      name='conv',
    )(x)
    return x.astype(jnp.float32)


class Projector(nn.Module):
  """1x1 conv 256->256 (bias) -> ReLU -> 1x1 conv -> proj_dim (bias), no BN.

  Returns float32 features, *not* normalised (the caller normalises).
  """

  proj_dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = Conv(
      HEAD_CHANNELS,
      1,
      use_bias=True,
      dtype=self.dtype,
      kernel_init=torch_default_kernel_init,
      torch_bias_init=True,
      name='conv1',
    )(x)
    x = nn.relu(x)
    x = Conv(
      self.proj_dim,
      1,
      use_bias=True,
      dtype=self.dtype,
      kernel_init=torch_default_kernel_init,
      torch_bias_init=True,
      name='conv2',
    )(x)
    return x.astype(jnp.float32)


def avg_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 average pooling, stride 2: [B, H, W, C] -> [B, H/2, W/2, C] (H, W even)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class DeepLabV3Plus(nn.Module):
  """DeepLabv3+ for CAC.

  Attributes:
    backbone: a module mapping ([B, H, W, 3], train) to {'low', 'high'}.
    num_classes: K.
    output_stride: 8 or 16; ASPP rates are (6, 12, 18) at 16, doubled at 8.
    projector: use the projector for the contrastive features; otherwise the
      pooled 256-d decoder features are L2-normalised directly (ablation).
    proj_dim: projector output width.
    dtype: compute dtype; logits and features are returned in float32.
  """

  backbone: nn.Module
  num_classes: int
  output_stride: int = 16
  projector: bool = True
  proj_dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, x: jax.Array, train: bool = False, dc_outputs: bool = False
  ) -> dict[str, jax.Array]:
    """Runs the network.

    Args:
      x: [B, H, W, 3] float32 images, ImageNet-normalised.
      train: BatchNorm batch statistics (collection 'batch_stats' must be
        mutable) and dropout (needs a 'dropout' rng) when True.
      dc_outputs: also return the stride-8 outputs of the directional
        contrastive loss; needs H and W to be multiples of 8.

    Returns:
      'logits': [B, H, W, K] float32, the stride-4 logits upsampled
        (bilinear, align_corners=True) to the input size.
      With dc_outputs:
      'logits8': [B, H/8, W/8, K] float32, classifier on the 2x2-average
        pooled stride-4 decoder features.
      'proj8': [B, H/8, W/8, D] float32, unit L2 norm per cell (D = proj_dim,
        or 256 when projector=False).
    """
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'expected images [B, H, W, 3], got shape {x.shape}.')
    if dc_outputs and (x.shape[1] % 8 or x.shape[2] % 8):
      raise ValueError(
        f'dc_outputs needs H and W divisible by 8, got {x.shape[1:3]}; use a '
        'crop size that is a multiple of 8.'
      )
    if self.output_stride not in (8, 16):
      raise ValueError(f'output_stride must be 8 or 16, got {self.output_stride}.')
    rates = aspp_rates(self.output_stride)

    feats = self.backbone(x.astype(self.dtype), train)
    decoded = Head(rates, dtype=self.dtype, name='head')(feats['high'], feats['low'], train)
    classifier = Classifier(self.num_classes, dtype=self.dtype, name='classifier')
    logits4 = classifier(decoded, train)
    out = {'logits': resize_bilinear_align_corners(logits4, x.shape[1:3])}

    # Initialise the projector even for a dc_outputs=False init call, so that
    # one init serves both the supervised and the contrastive passes.
    if dc_outputs or self.is_initializing():
      # With H, W multiples of 8 the decoder grid is exactly H/4 x W/4; the
      # crop to even sizes only matters for an init call at odd sizes.
      pooled = avg_pool_2x2(decoded[:, : decoded.shape[1] // 2 * 2, : decoded.shape[2] // 2 * 2])
      logits8 = classifier(pooled, train)
      if self.projector:
        proj = Projector(self.proj_dim, dtype=self.dtype, name='projector')(pooled)
      else:
        proj = pooled
      if dc_outputs:
        out['logits8'] = logits8
        out['proj8'] = l2_normalize(proj, axis=-1)
    return out
