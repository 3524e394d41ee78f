"""Static-shape overlap geometry of the two unlabeled views (docs/method.md §2, §4).

The pair sampler gives, per unlabeled image, the overlap box of each view in
that view's own *unflipped* pixel frame, `(top, left, bottom, right)`, all
multiples of the feature stride (8), both boxes of equal size. The box size
varies per image, so slicing `[ul // 8 : br // 8]` would give ragged arrays
under `jax.jit`. Instead each image keeps its full `h × w` stride-8 grid with

* a validity mask: cell (i, j) of view 1 lies inside box 1, and
* an index map into view 2: cell (i, j) of view 1 shows the same image
  location as cell (i − t1/8 + t2/8, j − l1/8 + l2/8) of view 2,

and `jax.vmap` runs the per-image function over the batch. Nothing here
imports TensorFlow.
"""

import jax
import jax.numpy as jnp

FEATURE_STRIDE = 8  # stride of the maps the DC loss sees (decoder pooled 2x2)


def overlap_index_map(box1, box2, grid_shape, stride=FEATURE_STRIDE):
  """Cell correspondence between the two views of ONE image.

  Args:
    box1: int [4] `(top, left, bottom, right)` of the overlap in view 1's
      unflipped frame, in pixels, multiples of `stride`.
    box2: int [4] the same region in view 2's unflipped frame (same size).
    grid_shape: static `(h, w)` of the stride-`stride` feature grid.
    stride: static feature stride in pixels.

  Returns:
    valid: bool [h * w], True where view-1 cell (i, j) (row-major flat index
      i * w + j) is inside box 1 AND its partner lies on view 2's grid (the
      second condition only matters for malformed, unequal boxes).
    index2: int32 [h * w], flat row-major index of the partner cell in view 2;
      clipped into range (and meaningless) where `valid` is False.
  """
  h, w = grid_shape
  box1 = jnp.asarray(box1, jnp.int32) // stride
  box2 = jnp.asarray(box2, jnp.int32) // stride
  rows = jnp.arange(h, dtype=jnp.int32)[:, None]  # [h, 1]
  cols = jnp.arange(w, dtype=jnp.int32)[None, :]  # [1, w]
  inside1 = (rows >= box1[0]) & (rows < box1[2]) & (cols >= box1[1]) & (cols < box1[3])  # [h, w]
  rows2 = rows - box1[0] + box2[0]
  cols2 = cols - box1[1] + box2[1]
  on_grid2 = (rows2 >= 0) & (rows2 < h) & (cols2 >= 0) & (cols2 < w)
  valid = inside1 & on_grid2
  index2 = jnp.clip(rows2, 0, h - 1) * w + jnp.clip(cols2, 0, w - 1)
  return valid.reshape(h * w), index2.reshape(h * w).astype(jnp.int32)


def batched_overlap_index_map(box1, box2, grid_shape, stride=FEATURE_STRIDE):
  """`overlap_index_map` vmapped over images.

  Args:
    box1, box2: int [B, 4] overlap boxes, see `overlap_index_map`.
    grid_shape: static `(h, w)`.
    stride: static feature stride in pixels.

  Returns:
    valid: bool [B, h * w]; index2: int32 [B, h * w].
  """
  box1 = jnp.asarray(box1)
  box2 = jnp.asarray(box2)
  if box1.ndim != 2 or box1.shape[-1] != 4 or box1.shape != box2.shape:
    raise ValueError(
      f'box1 and box2 must both be [B, 4] (top, left, bottom, right); got '
      f'{box1.shape} and {box2.shape}.'
    )
  if len(grid_shape) != 2:
    raise ValueError(f'grid_shape must be (h, w); got {grid_shape}.')
  fn = lambda b1, b2: overlap_index_map(b1, b2, tuple(grid_shape), stride)
  return jax.vmap(fn)(box1, box2)


def unflip(x, flip):
  """Undoes a per-image horizontal flip of a map.

  Args:
    x: [B, h, w, ...] a map computed on a (possibly) flipped view image.
    flip: bool [B], True where that image was flipped horizontally.

  Returns:
    [B, h, w, ...] the map in the unflipped frame (same dtype).
  """
  flip = jnp.asarray(flip, bool)
  if x.ndim < 3 or flip.shape != x.shape[:1]:
    raise ValueError(
      f'unflip expects x [B, h, w, ...] and flip [B]; got {x.shape} and {flip.shape}.'
    )
  flip = flip.reshape(flip.shape + (1,) * (x.ndim - 1))
  return jnp.where(flip, jnp.flip(x, axis=2), x)
