"""Building blocks shared by the backbones and the DeepLabv3+ head.

Everything here reproduces PyTorch semantics where they differ from the Flax
or XLA defaults, because the backbones are initialised from torchvision
checkpoints and must compute the same function:

* Convolutions and max-pooling pad *symmetrically* (PyTorch), not with XLA's
  'SAME' rule, which puts the extra row/column of a strided window on the
  bottom/right only and so shifts every strided feature map by half a pixel.
* Bilinear resizing uses ``align_corners=True`` (the DeepLab convention the
  CAC code uses); ``jax.image.resize`` implements ``align_corners=False``.
* BatchNorm keeps its running statistics as ``torch.nn.BatchNorm2d`` does:
  momentum 0.1 (Flax convention ``momentum=0.9``), eps 1e-5, and the
  *unbiased* batch variance (n / (n - 1)) in the running variance, where
  Flax's ``nn.BatchNorm`` averages the biased one. Normalisation in training
  uses the biased batch variance in both. Under ``jax.jit`` over a batch
  sharded on a mesh, the batch mean and variance are global reductions, i.e.
  SyncBN comes for free; passing an ``axis_name`` (a pmap idiom) would fail
  there.
* Initialisation: backbone convolutions use torchvision's
  ``kaiming_normal_(mode='fan_out')`` (they are normally loaded from
  ImageNet); the DeepLabv3+ head (ASPP, decoder, classifier) uses
  ``kaiming_normal_`` in torch's default mode, fan_in, as the CAC code does;
  biases of convolutions that have one (classifier, projector) and the
  projector's kernels use torch's ``Conv2d`` default, U(+-1/sqrt(fan_in)).

Evaluation on a shared canvas (:func:`valid_region`): images of different
sizes can run as one batch on a canvas larger than each of them, placed at
its top-left, and each image's result is exactly what the network computes on
that image alone (up to float summation order). Inside the context, every
layer that mixes neighbouring pixels treats what lies beyond an image's own
region as that image's padding: convolutions and max-pooling see zeros / -inf
there, the global pooling averages over the region only, and the
align-corners resizes map each image's region onto its own output region.
Pointwise layers (1x1 convolutions, BatchNorm with running statistics, ReLU)
need nothing.

Groups in one batch (:func:`batch_groups`, training only): a batch that
stacks several equal-size groups (the labeled batch and the two unlabeled
views of a CAC step) runs as one call and computes what one call per group
would, in order: every BatchNorm normalises each group with that group's own
batch statistics and folds them into the running averages one group after
the other, and every dropout layer draws each group's mask from that group's
own rng collection (:func:`group_rngs`), i.e. the mask a call per group would
draw with that key.

Naming convention used by :mod:`cac_jax.models.convert`: a Flax module path
joined with ``_`` and with every ``_`` read as ``.`` is the torchvision
state-dict key prefix (``layer1_0/conv1/kernel`` <-> ``layer1.0.conv1.weight``),
so module names never contain ``_`` except as such a separator.
"""

import contextlib
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import normalization as _flax_normalization

# torchvision initialises ResNet convolutions with kaiming_normal(fan_out, relu).
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# The CAC head: torch.nn.init.kaiming_normal_(w) with its defaults (mode fan_in,
# gain sqrt(2)): N(0, 2 / (kh * kw * C_in)).
head_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
# torch.nn.Conv2d's own default (kaiming_uniform with a=sqrt(5)): U(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def torch_default_bias_init(fan_in: int):
  """torch.nn.Conv2d's default bias: U(+-1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


BN_MOMENTUM = 0.9  # Flax convention: new = 0.9 * old + 0.1 * batch (torch 0.1)
BN_EPSILON = 1e-5


def torch_padding(kernel_size: int, dilation: int = 1) -> tuple:
  """Symmetric ((p, p), (p, p)) padding PyTorch uses for an odd kernel."""
  pad = dilation * (kernel_size - 1) // 2
  return ((pad, pad), (pad, pad))


# Input channels from which, on a CPU backend, a stride-1 undilated k x k
# convolution takes its kernel gradient as k*k matrix products
# (`_conv_tap_grad`) instead of XLA:CPU's convolution-shaped one. Chosen from
# `python -m cac_jax.bench.conv` (last column, docs/cpu_conv_160.json): it
# halves the decoder's 304->256 layer at 40x40 and does not help the 64- and
# 128-channel ones. Accelerators keep XLA's everywhere (cuDNN / TPU convs).
TAP_GRAD_MIN_CHANNELS = 256

# Whether `conv2d` applies its rewrites (trace-time switch; see
# `xla_convolutions`, which benchmarks use to time the plain lowering).
_REWRITES = [True]


@contextlib.contextmanager
def xla_convolutions():
  """Within this block, `conv2d` traces to the plain XLA convolution only.

  For benchmarks that compare the two lowerings in one process
  (`python -m cac_jax.bench.step_time --convs=xla`); functions must be
  traced (jitted and first called) inside the block.
  """
  _REWRITES.append(False)
  try:
    yield
  finally:
    _REWRITES.pop()


class _Region:
  """Per-image valid regions on an evaluation canvas (see `valid_region`)."""

  def __init__(self, sizes: jax.Array, canvas: tuple[int, int]):
    self.sizes = sizes
    self.canvas = canvas

  def extent(self, size: int, axis: int) -> jax.Array:
    """int32 [B]: the region's extent on a map with `size` pixels along `axis`.

    Every map of the network is the canvas at some stride s (its side is
    canvas / s exactly, the canvas being a multiple of the largest stride),
    and an image of side n alone gives a map of side ceil(n / s) there (each
    strided layer maps n to floor((n + 2p - k) / s) + 1 = ceil(n / s)).
    """
    full = self.canvas[axis - 1]
    if full % size:
      raise ValueError(
        f'a {size}-pixel map is not the {full}-pixel evaluation canvas at an integer '
        'stride; the canvas side must be a multiple of the largest stride (32)'
      )
    n = self.sizes[:, axis - 1]
    return (n * size + full - 1) // full

  def mask(self, x: jax.Array) -> jax.Array:
    """bool [B, H, W, 1]: True inside each image's region of map `x`."""
    h = jnp.arange(x.shape[1])[None, :] < self.extent(x.shape[1], 1)[:, None]
    w = jnp.arange(x.shape[2])[None, :] < self.extent(x.shape[2], 2)[:, None]
    return (h[:, :, None] & w[:, None, :])[..., None]


# The active evaluation canvas, or None (trace-time state, like _REWRITES).
_REGION = [None]


@contextlib.contextmanager
def valid_region(sizes: jax.Array, canvas: Sequence[int]):
  """Within this block, the network computes each image as if it ran alone.

  Batch entry b is an image of sizes[b] = (h, w) pixels at the top-left of an
  (H, W) canvas (the rest of the canvas may hold anything). Model calls
  traced inside the block give, inside each image's region, what the same
  model gives on the h x w image alone; outside it, values are meaningless.
  Used by evaluation to batch images of different sizes under one compiled
  shape. `sizes` is a traced int32 [B, 2] array of the same jit trace.

  Args:
    sizes: int32 [B, 2], each (h, w) <= canvas and h, w >= 1.
    canvas: (H, W), the batch's spatial shape; multiples of 32.
  """
  _REGION.append(_Region(jnp.asarray(sizes, jnp.int32), tuple(int(c) for c in canvas)))
  try:
    yield
  finally:
    _REGION.pop()


class _Groups:
  """`count` equal groups stacked in one batch, shard-major (see `batch_groups`).

  The batch is laid out as [shards, count, rows / shards] flattened: shard s
  holds, contiguously, the s-th slice of every group. With the batch split
  over `shards` devices along its leading axis, each device then holds its
  own slices of all the groups, so stacking and splitting move no data
  between devices.
  """

  def __init__(self, count: int, shards: int, stat_groups: int):
    self.count, self.shards, self.stat_groups = count, shards, stat_groups

  def view(self, x: jax.Array) -> jax.Array:
    """[count * B, ...] -> [shards, count, B / shards, ...]."""
    if x.shape[0] % (self.count * self.shards):
      raise ValueError(
        f'a batch of {x.shape[0]} rows is not {self.count} groups split over {self.shards} shards'
      )
    return x.reshape((self.shards, self.count, -1) + x.shape[1:])

  def merge(self, parts: Sequence[jax.Array]) -> jax.Array:
    """`count` arrays [B, ...] (group order) -> the stacked batch [count * B, ...]."""
    if len(parts) != self.count:
      raise ValueError(f'expected {self.count} groups, got {len(parts)}')
    views = [p.reshape((self.shards, -1) + p.shape[1:]) for p in parts]
    return jnp.stack(views, axis=1).reshape((-1,) + parts[0].shape[1:])

  def split(self, x: jax.Array) -> list[jax.Array]:
    """Inverse of `merge`: [count * B, ...] -> `count` arrays [B, ...]."""
    v = self.view(x)
    return [v[:, g].reshape((-1,) + x.shape[1:]) for g in range(self.count)]


# The active group layout, or None (trace-time state, like _REGION).
_GROUPS = [None]


@contextlib.contextmanager
def batch_groups(count: int, *, shards: int = 1, stat_groups: int | None = None):
  """Within this block, a training batch is `count` groups, each normalised alone.

  Model calls traced inside the block take a batch built by the yielded
  object's `merge` (and give outputs that its `split` takes apart) and compute
  what `count` calls would, one per group in order, each threading the
  running statistics to the next: every BatchNorm in training normalises
  group g with group g's batch statistics (global over the sharded batch)
  and updates its running averages with groups 0 .. stat_groups - 1 in turn;
  each dropout layer draws group g's mask with the rng collection
  `group_rngs` names for g. Training only: `valid_region` is refused inside.

  Args:
    count: number of groups (equal sizes).
    shards: the number of devices the batch is split over (its leading axis),
      so that each device's rows are its own slices of every group; any value
      that divides the group size is correct, others only move data.
    stat_groups: how many leading groups update the running statistics
      (default all; 1 keeps only the first group's update).
  """
  stat_groups = count if stat_groups is None else stat_groups
  if not 1 <= stat_groups <= count:
    raise ValueError(f'stat_groups={stat_groups} must be in [1, {count}]')
  groups = _Groups(int(count), int(shards), int(stat_groups))
  _GROUPS.append(groups)
  try:
    yield groups
  finally:
    _GROUPS.pop()


def group_rngs(keys: Sequence[jax.Array], collection: str = 'dropout') -> dict:
  """The `rngs` of a grouped call: group g's key under `group_rng_name(collection, g)`."""
  return {group_rng_name(collection, g): k for g, k in enumerate(keys)}


def group_rng_name(collection: str, group: int) -> str:
  """Group 0 keeps the plain name, so an ungrouped call is group 0 of one."""
  return collection if group == 0 else f'{collection}{group}'


def region_mask(x: jax.Array, fill=0.0) -> jax.Array:
  """`x` with `fill` outside each image's region (identity outside `valid_region`)."""
  region = _REGION[-1]
  if region is None:
    return x
  return jnp.where(region.mask(x), x, jnp.asarray(fill, x.dtype))


def spatial_mean(x: jax.Array) -> jax.Array:
  """Mean over H, W, keeping dims: [B, H, W, C] -> [B, 1, 1, C], per image region."""
  region = _REGION[-1]
  if region is None:
    return jnp.mean(x, axis=(1, 2), keepdims=True)
  mask = region.mask(x)
  count = jnp.sum(mask, axis=(1, 2), keepdims=True).astype(x.dtype)
  return jnp.sum(jnp.where(mask, x, 0), axis=(1, 2), keepdims=True) / count


def _lax_conv(x, kernel, strides, dilation, padding, groups=1):
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=(strides, strides),
    padding=padding,
    rhs_dilation=(dilation, dilation),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=groups,
  )


def live_taps(kernel_size: int, dilation: int, size: int) -> int:
  """Half-width r of the kernel taps that can meet a real input pixel.

  With stride 1 and PyTorch's padding p = dilation * (k - 1) / 2, output
  pixel y reads input y + (i - c) * dilation for tap i (c = k // 2). A tap
  whose offset |i - c| * dilation is >= the input size reads only zero
  padding for every y, so it contributes exactly 0. This returns
  min(c, (size - 1) // dilation): the taps c - r .. c + r are the only ones
  that matter (e.g. the ASPP's rate-12 and -18 3x3 convolutions on a 10x10
  map, crop 160 at stride 16, are exactly 1x1 convolutions).
  """
  centre = kernel_size // 2
  return min(centre, (size - 1) // dilation)


def conv2d(
  x: jax.Array, kernel: jax.Array, *, strides: int = 1, dilation: int = 1, groups: int = 1
) -> jax.Array:
  """PyTorch-semantics NHWC convolution, lowered for speed, same numbers.

  Equal (up to float summation order) to ``lax.conv_general_dilated`` with
  symmetric padding ``dilation * (k - 1) // 2``; three exact rewrites:

  * stride 1: taps that can only see zero padding are dropped
    (:func:`live_taps`), per spatial axis, with the padding reduced to match;
  * 1x1 kernels (groups 1) become a matrix product over channels, after
    subsampling by the stride (a 1x1 window with padding 0 reads exactly
    x[:, ::s, ::s]): XLA:CPU runs a 1x1 convolution's weight gradient as a
    convolution over the spatial window, several times slower than the
    matrix product (figures in docs/benchmarks.md);
  * on a CPU backend, stride-1 dilated convolutions become one matrix
    product per tap over the pixels it really reads
    (:func:`_conv_shifted_taps`), and wide (>= TAP_GRAD_MIN_CHANNELS inputs)
    undilated ones take their kernel gradient from :func:`_conv_tap_grad`.
    Accelerators keep XLA's convolutions (cuDNN, TPU MXU).

  Args:
    x: [B, H, W, C_in].
    kernel: [k, k, C_in // groups, C_out] (HWIO), same dtype as x.
    strides, dilation, groups: as ``torch.nn.Conv2d``.

  Returns:
    [B, H', W', C_out].
  """
  k = kernel.shape[0]
  if not _REWRITES[-1]:
    return _lax_conv(x, kernel, strides, dilation, torch_padding(k, dilation), groups)
  if strides == 1 and k > 1:
    centre = k // 2
    r_h = live_taps(k, dilation, x.shape[1])
    r_w = live_taps(k, dilation, x.shape[2])
    kernel = kernel[centre - r_h : centre + r_h + 1, centre - r_w : centre + r_w + 1]
    padding = ((r_h * dilation,) * 2, (r_w * dilation,) * 2)
  else:
    padding = torch_padding(k, dilation)
  if kernel.shape[:2] == (1, 1) and groups == 1:
    if strides > 1:
      x = x[:, ::strides, ::strides]
    return jax.lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())))
  if strides == 1 and groups == 1 and jax.default_backend() == 'cpu':
    if dilation > 1:
      return _conv_shifted_taps(x, kernel, dilation)
    if x.shape[-1] >= TAP_GRAD_MIN_CHANNELS:
      return _conv_tap_grad(x, kernel, dilation, padding)
  return _lax_conv(x, kernel, strides, dilation, padding, groups)


def _conv_shifted_taps(x, kernel, dilation):
  """Stride-1 'same' convolution as one matrix product per kernel tap.

  Tap (i, j) adds x[y + (i - c) * d, x + (j - c) * d] @ kernel[i, j] to the
  output pixels whose source pixel lies inside the map, and only to those:
  the product runs over that overlap rectangle alone and is zero-padded back
  to the output size. A dilated convolution spends most of XLA's FLOPs on
  padding (rate 18 on a 20x20 map: 16% of the window products are real), and
  XLA:CPU runs dilated windows slowly; here the forward pass and both
  gradients are matrix products over real pixels only (measured per layer by
  `python -m cac_jax.bench.conv`; docs/benchmarks.md).
  """
  _, h, w, _ = x.shape
  k_h, k_w = kernel.shape[:2]
  # Materialise x once rather than fusing its producer into every tap's slice.
  x = jax.lax.optimization_barrier(x)
  y = None
  for i in range(k_h):
    dy = (i - k_h // 2) * dilation
    top, bottom = max(0, -dy), min(h, h - dy)
    for j in range(k_w):
      dx = (j - k_w // 2) * dilation
      left, right = max(0, -dx), min(w, w - dx)
      if bottom <= top or right <= left:
        continue  # cannot happen after live_taps pruning; kept for safety
      part = jax.lax.dot_general(
        x[:, top + dy : bottom + dy, left + dx : right + dx, :],
        kernel[i, j],
        (((3,), (0,)), ((), ())),
      )
      part = jnp.pad(part, ((0, 0), (top, h - bottom), (left, w - right), (0, 0)))
      y = part if y is None else y + part
  return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_tap_grad(x, kernel, dilation, padding):
  """Stride-1 convolution whose kernel gradient is k_h*k_w matrix products.

  The forward pass and the input gradient are XLA's own convolutions. The
  kernel gradient of tap (i, j) is sum over (b, y, x) of
  x_pad[b, y + i*d, x + j*d, :]^T g[b, y, x, :], a [C_in, C_out] matrix
  product over B*H'*W' rows, accumulated in float32.
  """
  return _lax_conv(x, kernel, 1, dilation, padding)


def _conv_tap_grad_fwd(x, kernel, dilation, padding):
  return _lax_conv(x, kernel, 1, dilation, padding), (x, kernel)


def _conv_tap_grad_bwd(dilation, padding, residuals, g):
  x, kernel = residuals
  _, x_vjp = jax.vjp(lambda x_: _lax_conv(x_, kernel, 1, dilation, padding), x)
  (dx,) = x_vjp(g)
  k_h, k_w, c_in, c_out = kernel.shape
  out_h, out_w = g.shape[1:3]
  # Materialised once, so that XLA does not fuse x's producer (the decoder's
  # resize + concat) into each of the k*k window slices.
  x_pad = jax.lax.optimization_barrier(jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0))))
  g_rows = g.reshape(-1, c_out)
  taps = []
  for i in range(k_h):
    for j in range(k_w):
      window = x_pad[:, i * dilation : i * dilation + out_h, j * dilation : j * dilation + out_w, :]
      taps.append(
        jax.lax.dot_general(
          window.reshape(-1, c_in),
          g_rows,
          (((0,), (0,)), ((), ())),
          preferred_element_type=jnp.float32,
        )
      )
  dkernel = jnp.stack(taps).reshape(k_h, k_w, c_in, c_out)
  return dx, dkernel.astype(kernel.dtype)


_conv_tap_grad.defvjp(_conv_tap_grad_fwd, _conv_tap_grad_bwd)


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
  # False: zeros (the head's bias-free layers never use it); True: torch's
  # Conv2d default U(+-1/sqrt(fan_in)).
  torch_bias_init: bool = False

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
        f'groups={self.groups}; use a channel count that is a multiple.'
      )
    kernel = self.param(
      'kernel', self.kernel_init, (k, k, in_features // self.groups, self.features), jnp.float32
    )
    if k > 1:  # a wider kernel reads its neighbours: zeros beyond the image
      x = region_mask(x)
    y = conv2d(
      x.astype(self.dtype),
      kernel.astype(self.dtype),
      strides=self.strides,
      dilation=self.dilation,
      groups=self.groups,
    )
    if self.use_bias:
      bias_init = (
        torch_default_bias_init(k * k * in_features // self.groups)
        if self.torch_bias_init
        else nn.initializers.zeros
      )
      bias = self.param('bias', bias_init, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class BatchNorm(nn.Module):
  """``torch.nn.BatchNorm2d``: Flax's BatchNorm with torch's running variance.

  The same parameters ('scale', 'bias') and statistics ('mean', 'var') as
  ``nn.BatchNorm``, and the same output: the batch statistics and the
  normalisation are Flax's own (``_compute_stats``, ``_normalize``). Only the
  running-variance update differs: it averages the unbiased batch variance
  var * n / (n - 1), n = the number of values per channel (global batch x
  height x width), as torch does. That matters where n is small, e.g. the
  ASPP image-pooling branch, where n is the global batch.

  Inside `batch_groups` (training), the statistics are per group and the
  running averages take the groups' updates in order, each with its own n.
  """

  use_running_average: bool
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    reduction_axes = tuple(range(x.ndim - 1))
    features = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable('batch_stats', 'var', lambda s: jnp.ones(s, jnp.float32), features)
    groups = _GROUPS[-1]
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    elif groups is not None:
      return self._grouped(x, groups, ra_mean, ra_var)
    else:
      mean, var = _flax_normalization._compute_stats(x, reduction_axes, dtype=self.dtype)
      if not self.is_initializing():
        n = int(np.prod(x.shape[:-1]))
        # torch refuses n = 1 in training; keep the biased value there.
        unbiased = var * (n / (n - 1)) if n > 1 else var
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
    return _flax_normalization._normalize(
      self,
      x,
      mean,
      var,
      reduction_axes,
      (x.ndim - 1,),
      self.dtype,
      self.param_dtype,
      self.epsilon,
      True,
      True,
      nn.initializers.zeros,
      nn.initializers.ones,
    )

  def _grouped(self, x, groups, ra_mean, ra_var):
    """Training on a `batch_groups` batch: statistics [count, C], one row per group."""
    if _REGION[-1] is not None:
      raise ValueError(
        'batch_groups is for training; valid_region (evaluation) cannot be combined with it'
      )
    xg = groups.view(x)  # [S, G, b, ..., C]
    axes = (0,) + tuple(range(2, xg.ndim - 1))
    mean, var = _flax_normalization._compute_stats(xg, axes, dtype=self.dtype)
    if not self.is_initializing():
      n = int(np.prod(x.shape[:-1])) // groups.count
      unbiased = var * (n / (n - 1)) if n > 1 else var
      for g in range(groups.stat_groups):  # the per-group calls' order
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean[g]
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased[g]
    y = _flax_normalization._normalize(
      self,
      xg,
      mean,
      var,
      axes,
      (xg.ndim - 1,),
      self.dtype,
      self.param_dtype,
      self.epsilon,
      True,
      True,
      nn.initializers.zeros,
      nn.initializers.ones,
    )
    return y.reshape(x.shape)


def batch_norm(train: bool, dtype: Any, name: str | None = None) -> BatchNorm:
  """BatchNorm with PyTorch semantics; statistics and parameters in float32.

  Args:
    train: True uses (global, under jit: synchronised) batch statistics and
      updates the running averages; False uses the running averages.
    dtype: compute dtype of the output.
    name: module name in the torchvision layout (``bn1``, ``downsample_1``).
  """
  return BatchNorm(use_running_average=not train, dtype=dtype, name=name)


class Dropout(nn.Module):
  """``nn.Dropout`` (same masks, same rng path) that knows `batch_groups`.

  Outside `batch_groups` it draws exactly Flax's mask: bernoulli(keep) of the
  input's shape with the key ``make_rng('dropout')``. Inside, group g's mask
  is that same draw, of one group's shape, with the key of the rng
  collection `group_rng_name('dropout', g)`, so a grouped call masks each
  group as the call with that group's key alone would. (The class keeps the
  name Dropout: Flax names it Dropout_N and folds that name into the key.)
  """

  rate: float
  deterministic: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep = 1.0 - self.rate
    groups = _GROUPS[-1]
    if groups is None:
      mask = jax.random.bernoulli(self.make_rng('dropout'), keep, x.shape)
    else:
      shape = (x.shape[0] // groups.count,) + x.shape[1:]
      mask = groups.merge(
        [
          jax.random.bernoulli(self.make_rng(group_rng_name('dropout', g)), keep, shape)
          for g in range(groups.count)
        ]
      )
    return jax.lax.select(mask, x / keep, jnp.zeros_like(x))


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch ``MaxPool2d(3, stride=2, padding=1)``: pads with -inf symmetrically.

  Args:
    x: [B, H, W, C].

  Returns:
    [B, floor((H - 1) / 2) + 1, floor((W - 1) / 2) + 1, C].
  """
  # Flax's max_pool pads with the reduction's identity (-inf), like PyTorch.
  x = region_mask(x, -jnp.inf)
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _align_corners_taps(in_size: int, out_size: int):
  """Source indices and weights of 1-D linear interpolation, align_corners=True.

  Output sample i maps to source coordinate i * (in - 1) / (out - 1) (0 when
  out == 1), i.e. the corner samples of input and output coincide. The index
  and weight come from integer arithmetic, the weight as one correctly
  rounded float32 division, so that the per-image version on a canvas
  (`_region_resize_axis`) gives bit-identical weights.

  Returns:
    (lo, hi, frac): int32 [out], int32 [out], float32 [out] (NumPy, static).
  """
  num = np.arange(out_size, dtype=np.int64) * (in_size - 1)
  den = max(out_size - 1, 1)
  lo = np.minimum(num // den, in_size - 1).astype(np.int32)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (num % den).astype(np.float32) / np.float32(den)
  return lo, hi, frac


def _region_resize_axis(x: jax.Array, out_size: int, axis: int, region: _Region):
  """`resize_bilinear_align_corners` along one axis, each image region to its own.

  Image b's region of n_in input samples maps onto its region of n_out
  output samples, with the static version's integer index and weight
  formulas evaluated per image; outputs beyond the region are meaningless.
  """
  n_in = region.extent(x.shape[axis], axis)[:, None]
  n_out = region.extent(out_size, axis)[:, None]
  num = jnp.arange(out_size, dtype=jnp.int32)[None, :] * (n_in - 1)
  den = jnp.maximum(n_out - 1, 1)
  lo = jnp.clip(num // den, 0, n_in - 1)
  hi = jnp.minimum(lo + 1, n_in - 1)
  frac = (num % den).astype(jnp.float32) / den.astype(jnp.float32)
  shape = [x.shape[0]] + [out_size if a == axis else 1 for a in (1, 2, 3)]
  x_lo = jnp.take_along_axis(x, lo.reshape(shape), axis=axis)
  x_hi = jnp.take_along_axis(x, hi.reshape(shape), axis=axis)
  return x_lo + (x_hi - x_lo) * frac.reshape(shape).astype(x.dtype)


def resize_bilinear_align_corners(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resize of NHWC maps with PyTorch ``align_corners=True`` semantics.

  Written as two separable gather-and-lerp passes with static indices: exact in
  float32 (no matmul, so no reduced-precision passes on TPU) and cheap. Inside
  `valid_region` the indices are per image (each region to its own).

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
  region = _REGION[-1]
  for axis, out_size in ((1, out_h), (2, out_w)):
    in_size = x.shape[axis]
    if region is not None:  # per-image regions (a same-size map may still differ)
      x = _region_resize_axis(x, out_size, axis, region)
      continue
    if in_size == out_size:
      continue
    lo, hi, frac = _align_corners_taps(in_size, out_size)
    # Indices are in range by construction; 'clip' skips the bounds masking.
    x_lo = jnp.take(x, lo, axis=axis, mode='clip')
    x_hi = jnp.take(x, hi, axis=axis, mode='clip')
    w = jnp.asarray(frac, x.dtype).reshape([-1 if a == axis else 1 for a in range(4)])
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
