"""Augmentations for CAC as pure TensorFlow functions (docs/method.md §2).

Every function here works eagerly and inside `tf.data` (graph mode), and all
randomness is *stateless*: it comes from an explicit `seed` (int tensor of
shape [2], as taken by `tf.random.stateless_*`), so an example's augmentation
can be recomputed exactly from (config seed, step, example slot).

Images travel as float32 in [0, 255] until `normalize`, which maps them to
ImageNet-standardised values. Labels are integer class ids, 255 = ignore.
Both facts, and the ImageNet statistics, are `cac_jax.constants` (re-exported
here under their old names).

Photometric choices (each matches the authors' PyTorch code where it matters):
  * Colour jitter follows torchvision's `ColorJitter` formulas (multiplicative
    brightness, contrast blended with the grey *mean*, saturation blended with
    the grey image, hue shift in HSV), each clipped to [0, 255] as PIL's
    8-bit images are, applied in a random order drawn per call from the
    stateless seed, as torchvision's `ColorJitter` draws one per call.
  * Gaussian blur is 5x5 with the kernel OpenCV uses for
    `cv2.GaussianBlur(img, (5, 5), 0)`, which is what the authors call: for
    sigma <= 0 and a kernel of at most 7 taps OpenCV takes the fixed binomial
    table [1, 4, 6, 4, 1] / 16 (close to a sampled Gaussian with sigma 1.1, the
    value its formula would give). Border: reflect-101, OpenCV's default.
  * Grayscale uses the ITU-R 601 weights (0.299, 0.587, 0.114), as torchvision.
"""

import functools
from collections.abc import Sequence

import tensorflow as tf

from cac_jax import constants
from cac_jax.constants import IGNORE_LABEL, IMAGENET_MEAN, IMAGENET_STD  # noqa: F401

# Padding colour of images: the ImageNet mean in [0, 255] (normalises to 0).
PAD_COLOR = tuple(255.0 * m for m in IMAGENET_MEAN)
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)
# OpenCV's fixed 5-tap Gaussian (ksize=5, sigma=0).
_BLUR_KERNEL_5 = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)


def split_seed(seed, num: int) -> tf.Tensor:
  """Derives `num` independent stateless seeds from one.

  Args:
    seed: int tensor [2].
    num: how many seeds.

  Returns:
    int64 tensor [num, 2]; row i is a seed for `tf.random.stateless_*`.
  """
  seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
  return tf.random.experimental.stateless_split(seed, num=num)


def bernoulli(seed, p: float) -> tf.Tensor:
  """Stateless coin flip: scalar bool tensor that is True with probability p."""
  return tf.random.stateless_uniform([], seed, dtype=tf.float32) < p


def check_scale_range(scale_range: Sequence[float], base_size: int) -> tuple[int, int]:
  """Validates a scale range and returns the inclusive long-side bounds.

  Long side bounds are `int(lo * base)` and `int(hi * base)`, as the authors'
  `random.randint(int(base * lo), int(base * hi))`.
  """
  if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
    raise ValueError(
      f'scale_range must be (lo, hi) with 0 < lo <= hi, got {scale_range!r}; '
      'the paper uses (0.5, 2.0) for labeled and (0.8, 2.0) for unlabeled.'
    )
  if base_size <= 0:
    raise ValueError(f'base_size must be positive, got {base_size}.')
  lo, hi = int(scale_range[0] * base_size), int(scale_range[1] * base_size)
  if lo < 1:
    raise ValueError(
      f'scale_range[0] * base_size = {scale_range[0] * base_size} '
      'gives a long side < 1 pixel; raise base_size or the scale.'
    )
  return lo, hi


def random_long_side(seed, base_size: int, scale_range: Sequence[float]) -> tf.Tensor:
  """Samples the long side L ~ U{int(lo*base), ..., int(hi*base)} (int32 scalar)."""
  lo, hi = check_scale_range(scale_range, base_size)
  return tf.random.stateless_uniform([], seed, minval=lo, maxval=hi + 1, dtype=tf.int32)


def scaled_size(height, width, long_side) -> tuple[tf.Tensor, tf.Tensor]:
  """Output size (h, w) with the long side = `long_side`, aspect kept.

  The short side is rounded half up, `int(L * short / long + 0.5)`, in float64
  as the authors' Python does (ties h == w give both sides L).

  Returns:
    Two int32 scalar tensors, each >= 1.
  """
  h = tf.cast(height, tf.float64)
  w = tf.cast(width, tf.float64)
  big = tf.cast(long_side, tf.float64)
  new_w_if_tall = tf.floor(big * w / h + 0.5)
  new_h_if_wide = tf.floor(big * h / w + 0.5)
  new_h = tf.where(h > w, big, new_h_if_wide)
  new_w = tf.where(h > w, new_w_if_tall, big)
  return (tf.cast(tf.maximum(new_h, 1.0), tf.int32), tf.cast(tf.maximum(new_w, 1.0), tf.int32))


def resize_image(image, height, width) -> tf.Tensor:
  """Bicubic resize of an RGB image to [height, width, 3] float32, like PIL's.

  The authors resize images with `PIL.Image.BICUBIC` (labels: nearest). PIL's
  bicubic is the Keys kernel (a = -0.5) widened by the scale when shrinking;
  TensorFlow's antialiased 'bicubic' is the same filter, so the two agree up
  to PIL's rounding to 8 bits (tests/test_fidelity.py measures it on photos).
  The result stays float (no rounding) and is clipped to [0, 255], as PIL's
  cubic overshoot is clipped there.
  """
  image = tf.cast(image, tf.float32)
  out = tf.image.resize(image, tf.stack([height, width]), method='bicubic', antialias=True)
  return tf.clip_by_value(out, 0.0, 255.0)


def resize_label(label, height, width) -> tf.Tensor:
  """Nearest-neighbour resize of a label map [H, W] (any int dtype) to [height, width]."""
  out = tf.image.resize(label[..., None], tf.stack([height, width]), method='nearest')
  return tf.cast(out[..., 0], label.dtype)


def pad_bottom_right(x, min_height, min_width, value) -> tf.Tensor:
  """Pads [H, W] or [H, W, C] at the bottom/right to at least min_height x min_width."""
  shape = tf.shape(x)
  pad_h = tf.maximum(min_height - shape[0], 0)
  pad_w = tf.maximum(min_width - shape[1], 0)
  if x.shape.rank == 2:
    return tf.pad(x, [[0, pad_h], [0, pad_w]], constant_values=value)
  # Per-channel fill colours: pad each channel with its own constant.
  channels = tf.unstack(x, num=len(value), axis=-1)
  padded = [tf.pad(c, [[0, pad_h], [0, pad_w]], constant_values=v) for c, v in zip(channels, value)]
  return tf.stack(padded, axis=-1)


def pad_image(image, min_size: int) -> tf.Tensor:
  """Pads an image [H, W, 3] bottom/right with the mean colour to >= min_size."""
  return pad_bottom_right(tf.cast(image, tf.float32), min_size, min_size, PAD_COLOR)


def pad_label(label, min_size: int) -> tf.Tensor:
  """Pads a label map [H, W] bottom/right with 255 (ignore) to >= min_size."""
  return pad_bottom_right(label, min_size, min_size, tf.constant(IGNORE_LABEL, label.dtype))


def random_crop_origin(seed, height, width, crop_size: int) -> tuple[tf.Tensor, tf.Tensor]:
  """Uniform top-left corner (y, x) of a crop_size crop in a [height, width] image.

  The image must already be at least crop_size on both sides.
  """
  seeds = split_seed(seed, 2)
  y = tf.random.stateless_uniform(
    [], seeds[0], minval=0, maxval=height - crop_size + 1, dtype=tf.int32
  )
  x = tf.random.stateless_uniform(
    [], seeds[1], minval=0, maxval=width - crop_size + 1, dtype=tf.int32
  )
  return y, x


def crop(x, top, left, size: int) -> tf.Tensor:
  """Static-shape square crop [size, size, ...] of x at (top, left)."""
  begin = tf.stack([top, left] + [0] * (x.shape.rank - 2))
  sizes = [size, size] + [-1] * (x.shape.rank - 2)
  out = tf.slice(x, begin, sizes)
  out.set_shape([size, size] + x.shape[2:].as_list())
  return out


def flip_left_right(x) -> tf.Tensor:
  """Horizontal flip of [H, W] or [H, W, C]."""
  return tf.reverse(x, axis=[1])


def to_grayscale(image) -> tf.Tensor:
  """Grey image [H, W, 1] (float32) from RGB [H, W, 3] with ITU-R 601 weights."""
  weights = tf.constant(_GRAY_WEIGHTS, tf.float32)
  return tf.reduce_sum(tf.cast(image, tf.float32) * weights, axis=-1, keepdims=True)


def adjust_brightness(image, factor) -> tf.Tensor:
  """torchvision brightness: image * factor, clipped to [0, 255]."""
  return tf.clip_by_value(image * factor, 0.0, 255.0)


def adjust_contrast(image, factor) -> tf.Tensor:
  """torchvision contrast: blend with the mean grey level of the whole image."""
  mean = tf.reduce_mean(to_grayscale(image))
  return tf.clip_by_value(factor * image + (1.0 - factor) * mean, 0.0, 255.0)


def adjust_saturation(image, factor) -> tf.Tensor:
  """torchvision saturation: blend with the grey version of the image."""
  gray = to_grayscale(image)
  return tf.clip_by_value(factor * image + (1.0 - factor) * gray, 0.0, 255.0)


def adjust_hue(image, delta) -> tf.Tensor:
  """Hue rotation by `delta` turns (in [-0.5, 0.5]) in HSV space."""
  out = tf.image.adjust_hue(image / 255.0, delta) * 255.0
  return tf.clip_by_value(out, 0.0, 255.0)


def random_color_jitter(
  image,
  seed,
  brightness: float = 0.4,
  contrast: float = 0.4,
  saturation: float = 0.4,
  hue: float = 0.1,
) -> tf.Tensor:
  """torchvision-style ColorJitter on a float [H, W, 3] image in [0, 255].

  Factors are uniform in [1 - b, 1 + b] (brightness, contrast, saturation) and
  the hue shift uniform in [-hue, hue]; the four operations are applied in
  the order `jitter_order(seed)`, a uniformly random permutation of
  (0 brightness, 1 contrast, 2 saturation, 3 hue), as torchvision does.
  """
  seeds = split_seed(seed, 4)

  def factor(s, amount):
    return tf.random.stateless_uniform([], s, minval=max(0.0, 1.0 - amount), maxval=1.0 + amount)

  b, c, s = (factor(seeds[i], a) for i, a in enumerate((brightness, contrast, saturation)))
  delta = tf.random.stateless_uniform([], seeds[3], minval=-hue, maxval=hue)
  ops = [
    lambda x: adjust_brightness(x, b),
    lambda x: adjust_contrast(x, c),
    lambda x: adjust_saturation(x, s),
    lambda x: adjust_hue(x, delta),
  ]
  order = jitter_order(seed)
  for k in range(4):
    image = tf.switch_case(order[k], [functools.partial(op, image) for op in ops])
  return image


def jitter_order(seed) -> tf.Tensor:
  """The colour-jitter order of a call: a uniform random permutation of 0..3 (int32 [4])."""
  keys = tf.random.stateless_uniform([4], split_seed(seed, 5)[4])
  return tf.cast(tf.argsort(keys), tf.int32)


def gaussian_blur(image) -> tf.Tensor:
  """OpenCV's 5x5 Gaussian blur (binomial taps, reflect-101 border).

  Args:
    image: float32 [H, W, 3], H and W >= 3 (reflect padding needs 2 pixels).

  Returns:
    float32 [H, W, 3].
  """
  taps = tf.constant(_BLUR_KERNEL_5, tf.float32)
  # Depthwise separable convolution: one vertical, one horizontal pass.
  k_v = tf.tile(tf.reshape(taps, [5, 1, 1, 1]), [1, 1, 3, 1])
  k_h = tf.tile(tf.reshape(taps, [1, 5, 1, 1]), [1, 1, 3, 1])
  x = tf.pad(image[None], [[0, 0], [2, 2], [2, 2], [0, 0]], mode='REFLECT')
  x = tf.nn.depthwise_conv2d(x, k_v, strides=[1, 1, 1, 1], padding='VALID')
  x = tf.nn.depthwise_conv2d(x, k_h, strides=[1, 1, 1, 1], padding='VALID')
  return x[0]


def photometric_augment(
  image, seed, *, p_blur: float = 0.5, p_jitter: float = 0.8, p_gray: float = 0.2
) -> tf.Tensor:
  """CAC's per-view photometric augmentation (docs/method.md §2, step 6).

  In the authors' order: Gaussian blur (p_blur), colour jitter
  (0.4, 0.4, 0.4, 0.1) with p_jitter, grayscale (p_gray).

  Args:
    image: float32 [H, W, 3] in [0, 255].
    seed: int tensor [2].

  Returns:
    float32 [H, W, 3] in [0, 255].
  """
  seeds = split_seed(seed, 4)
  image = tf.cast(image, tf.float32)
  image = tf.cond(bernoulli(seeds[0], p_blur), lambda: gaussian_blur(image), lambda: image)
  image = tf.cond(
    bernoulli(seeds[1], p_jitter), lambda: random_color_jitter(image, seeds[2]), lambda: image
  )
  image = tf.cond(
    bernoulli(seeds[3], p_gray), lambda: tf.tile(to_grayscale(image), [1, 1, 3]), lambda: image
  )
  return image


def normalize(image) -> tf.Tensor:
  """ImageNet standardisation of an image in [0, 255] -> float32 (constants.normalize)."""
  return constants.normalize(tf.cast(image, tf.float32))


def labeled_example(
  image_u8,
  label_u8,
  seed,
  *,
  crop_size: int,
  base_size: int,
  scale_range: Sequence[float] = (0.5, 2.0),
  color_jitter: bool = False,
) -> dict[str, tf.Tensor]:
  """Augments one labeled example as the authors' supervised loader.

  Long-side random scale, bottom/right pad to >= crop (mean colour / 255),
  uniform crop, horizontal flip p=0.5, optional colour jitter, normalisation.

  Args:
    image_u8: uint8 (or float in [0, 255]) [H, W, 3].
    label_u8: uint8/int [H, W] class ids, 255 = ignore.
    seed: int tensor [2].
    crop_size: side C of the square output crop.
    base_size: base of the long-side scale range.
    scale_range: (lo, hi): long side uniform in [lo * base, hi * base].
    color_jitter: torchvision ColorJitter(0.4, 0.4, 0.4, 0.1) always on
      (the authors use it for Cityscapes, not for VOC).

  Returns:
    {'image': float32 [C, C, 3] normalised, 'label': int32 [C, C]}.
  """
  if crop_size <= 0:
    raise ValueError(f'crop_size must be positive, got {crop_size}.')
  check_scale_range(scale_range, base_size)
  seeds = split_seed(seed, 4)
  image = tf.convert_to_tensor(image_u8)
  label = tf.cast(tf.convert_to_tensor(label_u8), tf.int32)
  shape = tf.shape(image)
  long_side = random_long_side(seeds[0], base_size, scale_range)
  h, w = scaled_size(shape[0], shape[1], long_side)
  image = pad_image(resize_image(image, h, w), crop_size)
  label = pad_label(resize_label(label, h, w), crop_size)
  padded = tf.shape(label)
  top, left = random_crop_origin(seeds[1], padded[0], padded[1], crop_size)
  image = crop(image, top, left, crop_size)
  label = crop(label, top, left, crop_size)
  flip = bernoulli(seeds[2], 0.5)
  image = tf.cond(flip, lambda: flip_left_right(image), lambda: image)
  label = tf.cond(flip, lambda: flip_left_right(label), lambda: label)
  if color_jitter:
    image = random_color_jitter(image, seeds[3])
  return {'image': normalize(image), 'label': label}
