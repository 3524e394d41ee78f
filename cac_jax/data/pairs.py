"""CAC's pair sampler: two overlapping crops of one unlabeled image.

Implements docs/method.md §2, "Unlabeled pairs", steps 1-6, as the
authors' `PairVOCDataset.__getitem__` does, with stateless randomness and
static shapes so it runs inside `tf.data`:

1. long side L ~ U{int(lo*base), ..., int(hi*base)}, aspect kept; pad
   bottom/right with the mean colour to >= crop C (remember the unpadded h, w);
2. crop 1 at a uniform top-left (y1, x1);
3. crop 2: `max_tries` uniform candidates (y2, x2), drawn at once; each offset
   is snapped to the stride s (floor towards -inf), and a candidate whose
   snapped position is negative moves by +s (the authors' `if x2 < 0: x2 += s`;
   the offset stays a multiple of s and the crop stays inside the image);
   candidates with |dy| > C or |dx| > C are rejected; the first candidate with
   IoU = inter / (2C^2 - inter) in [iou_lo, iou_hi] (inclusive) wins; if none
   does, crop 2 = crop 1;
4. overlap boxes (top, left, bottom, right) in each crop's own, *unflipped*
   frame, with the (h // s) * s term that keeps padding out of the overlap;
5. independent horizontal flips (p = 0.5 each);
6. independent photometric augmentation per view.

Where the unlabeled image has a mask (for the DC diagnostics only,
docs/method.md §4; never for a loss), it goes through the same scale, pad,
crops and flips and is reduced to one true class per stride-s cell
(`cell_labels`), the grid of the features the DC loss compares.
"""

from collections.abc import Sequence

import tensorflow as tf

from cac_jax.data import augment

MAX_TRIES = 50


def check_pair_args(
  crop_size: int,
  base_size: int,
  scale_range: Sequence[float],
  iou_range: Sequence[float],
  stride: int,
) -> None:
  """Raises ValueError for pair-sampler arguments that cannot work."""
  if stride <= 0:
    raise ValueError(f'stride must be positive, got {stride}.')
  if crop_size <= 0 or crop_size % stride:
    raise ValueError(
      f'crop_size must be a positive multiple of the feature stride {stride} '
      f'(overlap boxes are in stride units), got {crop_size}.'
    )
  if len(iou_range) != 2 or not 0.0 <= iou_range[0] <= iou_range[1] <= 1.0:
    raise ValueError(
      f'iou_range must be (lo, hi) with 0 <= lo <= hi <= 1, '
      f'got {iou_range!r}; the paper uses (0.1, 1.0).'
    )
  augment.check_scale_range(scale_range, base_size)


def select_second_crop(
  y1, x1, cand_y, cand_x, *, crop_size: int, iou_range: Sequence[float], stride: int
):
  """Vectorised form of the authors' 50-try loop for crop 2.

  Args:
    y1, x1: int32 scalars, top-left of crop 1.
    cand_y, cand_x: int32 [T], raw uniform candidate top-left corners of crop 2,
      in [0, H_pad - C] and [0, W_pad - C].
    crop_size: C.
    iou_range: inclusive (lo, hi) bounds on the IoU of the two crops.
    stride: s, the offset quantum.

  Returns:
    (y2, x2, accepted): int32 scalars and a bool scalar; crop 2 = crop 1 when
    no candidate is accepted.
  """
  c = crop_size

  def snap(cand, origin):
    # floordiv on int tensors rounds towards -inf, like Python's //.
    pos = (cand - origin) // stride * stride + origin
    return tf.where(pos < 0, pos + stride, pos)

  y2 = snap(cand_y, y1)
  x2 = snap(cand_x, x1)
  ady = tf.abs(y2 - y1)
  adx = tf.abs(x2 - x1)
  in_reach = (ady <= c) & (adx <= c)
  inter = tf.cast((c - ady) * (c - adx), tf.float64)
  iou = inter / (2.0 * c * c - inter)
  ok = in_reach & (iou >= iou_range[0]) & (iou <= iou_range[1])
  accepted = tf.reduce_any(ok)
  first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
  y2 = tf.where(accepted, y2[first], y1)
  x2 = tf.where(accepted, x2[first], x1)
  return y2, x2, accepted


def overlap_boxes(y1, x1, y2, x2, height, width, *, crop_size: int, stride: int):
  """Overlap of the two crops in each crop's own frame (docs/method.md §2, step 4).

  Args:
    y1, x1, y2, x2: int32 scalars, crop top-left corners in the padded image.
    height, width: int32 scalars, the *unpadded* scaled image size h, w.

  Returns:
    (box1, box2): int32 [4] each, (top, left, bottom, right).
  """
  c = crop_size
  dy, dx = y2 - y1, x2 - x1
  h_in = height // stride * stride
  w_in = width // stride * stride
  box1 = tf.stack(
    [
      tf.maximum(0, dy),
      tf.maximum(0, dx),
      tf.minimum(tf.minimum(c, c + dy), h_in),
      tf.minimum(tf.minimum(c, c + dx), w_in),
    ]
  )
  box2 = tf.stack(
    [
      tf.maximum(0, -dy),
      tf.maximum(0, -dx),
      tf.minimum(tf.minimum(c, c - dy), h_in),
      tf.minimum(tf.minimum(c, c - dx), w_in),
    ]
  )
  return box1, box2


def pair_geometry(
  seed,
  height,
  width,
  *,
  crop_size: int,
  base_size: int,
  scale_range: Sequence[float] = (0.8, 2.0),
  iou_range: Sequence[float] = (0.1, 1.0),
  stride: int = 8,
  same_crop: bool = False,
  max_tries: int = MAX_TRIES,
) -> dict[str, tf.Tensor]:
  """The random geometry of one pair, without touching pixels.

  Args:
    seed: int tensor [2].
    height, width: int scalars, the decoded image size.

  Returns:
    dict of int32 scalars 'scaled_height', 'scaled_width' (unpadded h, w),
    'y1', 'x1', 'y2', 'x2' (crop corners in the padded image), int32 [4]
    'box1', 'box2', bool 'accepted' (False: fallback crop 2 = crop 1, or
    same_crop) and bool 'flip1', 'flip2'.
  """
  check_pair_args(crop_size, base_size, scale_range, iou_range, stride)
  seeds = augment.split_seed(seed, 6)
  long_side = augment.random_long_side(seeds[0], base_size, scale_range)
  h, w = augment.scaled_size(height, width, long_side)
  h_pad = tf.maximum(h, crop_size)
  w_pad = tf.maximum(w, crop_size)
  y1, x1 = augment.random_crop_origin(seeds[1], h_pad, w_pad, crop_size)
  if same_crop:
    y2, x2, accepted = y1, x1, tf.constant(False)
  else:
    cand = augment.split_seed(seeds[2], 2)
    cand_y = tf.random.stateless_uniform(
      [max_tries], cand[0], minval=0, maxval=h_pad - crop_size + 1, dtype=tf.int32
    )
    cand_x = tf.random.stateless_uniform(
      [max_tries], cand[1], minval=0, maxval=w_pad - crop_size + 1, dtype=tf.int32
    )
    y2, x2, accepted = select_second_crop(
      y1, x1, cand_y, cand_x, crop_size=crop_size, iou_range=iou_range, stride=stride
    )
  box1, box2 = overlap_boxes(y1, x1, y2, x2, h, w, crop_size=crop_size, stride=stride)
  return {
    'scaled_height': h,
    'scaled_width': w,
    'y1': y1,
    'x1': x1,
    'y2': y2,
    'x2': x2,
    'box1': box1,
    'box2': box2,
    'accepted': accepted,
    'flip1': augment.bernoulli(seeds[3], 0.5),
    'flip2': augment.bernoulli(seeds[4], 0.5),
    'photometric_seed': seeds[5],
  }


def cell_labels(label, stride: int) -> tf.Tensor:
  """The true class of each stride x stride cell: the most frequent pixel value.

  The DC loss compares stride-8 features (the decoder output pooled 2x2 from
  stride 4), each of which sees a whole 8x8 cell, so a cell's class is the
  mode of its pixels, not the value of one sampled pixel. Ignore (255) is a
  value like the others: a cell is ignored only if more of its pixels are 255
  than belong to any one class (ties go to the smaller value, so a class beats
  255). Counted with one bincount over (cell, value) pairs: O(pixels + cells
  x 256), no one-hot array.

  Args:
    label: int [H, W], values in [0, 256), H and W multiples of `stride`.
    stride: the cell side s.

  Returns:
    int32 [H / s, W / s].
  """
  label = tf.cast(tf.convert_to_tensor(label), tf.int32)
  shape = tf.shape(label)
  tf.debugging.assert_equal(
    shape % stride, 0, message='label sides must be multiples of the stride'
  )
  rows, cols = shape[0] // stride, shape[1] // stride
  cell = (tf.range(shape[0])[:, None] // stride) * cols + tf.range(shape[1])[
    None, :
  ] // stride  # [H, W] flat cell index
  counts = tf.math.bincount(
    tf.reshape(cell * 256 + label, [-1]), minlength=rows * cols * 256, maxlength=rows * cols * 256
  )
  mode = tf.argmax(tf.reshape(counts, [rows * cols, 256]), axis=1, output_type=tf.int32)
  out = tf.reshape(mode, [rows, cols])
  if label.shape.rank == 2 and label.shape[0] is not None and label.shape[1] is not None:
    out.set_shape([label.shape[0] // stride, label.shape[1] // stride])
  return out


def sample_pair(
  image,
  seed,
  *,
  crop_size: int,
  base_size: int,
  scale_range: Sequence[float] = (0.8, 2.0),
  iou_range: Sequence[float] = (0.1, 1.0),
  stride: int = 8,
  photometric: bool = True,
  same_crop: bool = False,
  label=None,
) -> dict[str, tf.Tensor]:
  """Two overlapping, independently flipped and coloured crops of one image.

  Args:
    image: uint8 or float [H, W, 3] with values in [0, 255].
    seed: int tensor [2] (a `tf.random.stateless_*` seed).
    crop_size: C, a multiple of `stride`.
    base_size: base of the long-side scale range.
    scale_range: (lo, hi), long side uniform in [lo * base, hi * base].
    iou_range: inclusive IoU bounds for accepting crop 2.
    stride: feature stride s; crop offsets and boxes are multiples of it.
    photometric: apply the per-view blur / jitter / grayscale.
    same_crop: ablation "no context change": crop 2 = crop 1 (flips and
      photometric augmentation stay independent).
    label: optional int [H, W] mask of `image` (255 = ignore), for the DC
      diagnostics only; it changes none of the other outputs.

  Returns:
    'image1', 'image2': float32 [C, C, 3] in [0, 255] (NOT normalised);
    'box1', 'box2': int32 [4] = (top, left, bottom, right) of the overlap in
      each view's unflipped frame, equal sizes, multiples of `stride`;
    'flip1', 'flip2': bool scalars, True where the view was flipped;
    with `label`, 'truth1', 'truth2': int32 [C / s, C / s], the true class of
      each stride-s cell of the view (`cell_labels`), flipped with it (the
      frame of the view's feature maps); 255 in the padding.
  """
  image = tf.cast(tf.convert_to_tensor(image), tf.float32)
  shape = tf.shape(image)
  geo = pair_geometry(
    seed,
    shape[0],
    shape[1],
    crop_size=crop_size,
    base_size=base_size,
    scale_range=scale_range,
    iou_range=iou_range,
    stride=stride,
    same_crop=same_crop,
  )
  scaled = augment.resize_image(image, geo['scaled_height'], geo['scaled_width'])
  scaled = augment.pad_image(scaled, crop_size)
  if label is not None:
    label = tf.cast(tf.convert_to_tensor(label), tf.int32)
    label = augment.pad_label(
      augment.resize_label(label, geo['scaled_height'], geo['scaled_width']), crop_size
    )
  view_seeds = augment.split_seed(geo['photometric_seed'], 2)
  out = {}
  for v, (y, x) in enumerate([(geo['y1'], geo['x1']), (geo['y2'], geo['x2'])], start=1):
    view = augment.crop(scaled, y, x, crop_size)
    flip = geo[f'flip{v}']
    view = tf.cond(flip, lambda: augment.flip_left_right(view), lambda: view)
    if photometric:
      view = augment.photometric_augment(view, view_seeds[v - 1])
    out[f'image{v}'] = view
    out[f'box{v}'] = geo[f'box{v}']
    out[f'flip{v}'] = flip
    if label is not None:
      # Flipped at pixel level, then reduced: C is a multiple of s, so this
      # equals flipping the cell grid, as the model's feature maps are.
      truth = augment.crop(label, y, x, crop_size)
      truth = tf.cond(flip, lambda: augment.flip_left_right(truth), lambda: truth)
      out[f'truth{v}'] = cell_labels(truth, stride)
  return out
