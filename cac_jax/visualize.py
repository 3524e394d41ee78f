"""Colourised masks, overlays and image strips (NumPy only).

Used by `python -m cac_jax.predict` and the README figure. Everything works on
uint8 RGB arrays [H, W, 3]; nothing here imports TensorFlow or JAX. Class
colours come from the dataset table (`cac_jax.datasets`), which is NumPy only.
"""

import numpy as np

from cac_jax.datasets import voc_palette  # noqa: F401  (the default colour map)

# Colour of the ignore label (255) and of any other id without a palette entry.
IGNORE_COLOR = (0, 0, 0)


def colorize(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """Class-id mask -> RGB image.

  Args:
    label: int [H, W] class ids in [0, K); 255 (ignore) and any other value
      outside [0, K) are drawn black.
    palette: uint8 [K, 3] colour of each class.

  Returns:
    uint8 [H, W, 3].
  """
  label = np.asarray(label)
  palette = np.asarray(palette, np.uint8)
  if label.ndim != 2 or palette.ndim != 2 or palette.shape[1] != 3:
    raise ValueError(
      f'colorize expects label [H, W] and palette [K, 3], got {label.shape} and {palette.shape}'
    )
  # One extra row for everything out of range, so a single gather does it.
  table = np.concatenate([palette, np.array([IGNORE_COLOR], np.uint8)])
  known = (label >= 0) & (label < len(palette))
  index = np.where(known, label, len(palette)).astype(np.intp)
  return table[index]


def overlay(image: np.ndarray, mask_rgb: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """Blends a colourised mask over an image: (1 - alpha) * image + alpha * mask.

  Args:
    image, mask_rgb: uint8 [H, W, 3] of equal size.
    alpha: mask opacity in [0, 1].

  Returns:
    uint8 [H, W, 3], rounded to nearest.
  """
  if image.shape != mask_rgb.shape:
    raise ValueError(f'overlay: image {image.shape} and mask {mask_rgb.shape} differ in size')
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'overlay: alpha={alpha} must be in [0, 1]')
  blend = (1.0 - alpha) * image.astype(np.float32) + alpha * mask_rgb.astype(np.float32)
  return np.clip(np.round(blend), 0, 255).astype(np.uint8)


def _as_rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'side_by_side expects [H, W] or [H, W, 3] images, got {image.shape}')
  return image.astype(np.uint8)


def side_by_side(*images: np.ndarray, gap: int = 0, fill: int = 255) -> np.ndarray:
  """Images placed left to right, top-aligned, `gap` columns of `fill` between.

  Shorter images are padded at the bottom with `fill`. Gray [H, W] images
  are repeated into three channels.

  Returns:
    uint8 [max H, sum W + gap * (n - 1), 3].
  """
  if not images:
    raise ValueError('side_by_side needs at least one image')
  images = [_as_rgb(im) for im in images]
  height = max(im.shape[0] for im in images)
  parts = []
  for i, im in enumerate(images):
    if i and gap:
      parts.append(np.full((height, gap, 3), fill, np.uint8))
    pad = np.full((height - im.shape[0], im.shape[1], 3), fill, np.uint8)
    parts.append(np.concatenate([im, pad], axis=0))
  return np.concatenate(parts, axis=1)
