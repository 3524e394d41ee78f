"""Step-indexed tf.data input pipelines for training and evaluation.

Training (`train_iterator`): an infinite stream of per-host numpy batches, one
per step. Every example is a pure function of (config.seed, step, slot j in
the *global* batch):

  * which image: position q = step * B + j of an endless sequence of epochs,
    epoch q // N visiting the N images in a seeded random order
    (`tf.random.experimental.index_shuffle`, O(1) per example, no buffer);
  * how it is augmented: a stateless seed folded from (config.seed, stream,
    step, j).

So a run resumed at step k sees exactly the batches an uninterrupted run sees
from step k, and the hosts of a pod (host p owns slots [p*b, (p+1)*b)) need no
communication yet together produce exactly the single-host global batch. Each
step is freshly augmented; nothing is cached or replayed (CAC_SPEC.md
section 7, first flaw of the original).

Evaluation (`eval_iterator`): the full validation images, each reflect-padded
bottom/right to a multiple of 8 (as the authors' evaluation) and then padded
to one common canvas (largest val image, rounded up to 8) with the mean colour
(0 after normalisation) so that batches have a static shape; labels are 255
outside the original image. The list is padded with invalid entries to a
multiple of the global eval batch, so every image counts exactly once across
hosts and every host runs the same number of batches.
"""
import functools
import io
import math

import numpy as np
import tensorflow as tf
from PIL import Image

from cac_jax.data import augment
from cac_jax.data import pairs
from cac_jax.data import sources

# Independent randomness streams (second word of the base seed).
LABELED_AUG, LABELED_ORDER, UNLABELED_AUG, UNLABELED_ORDER = 0, 1, 2, 3
EVAL_MULTIPLE = 8
# Stride of the features the DC loss compares (CAC_SPEC.md section 3): crop
# offsets and overlap boxes are multiples of it.
FEATURE_STRIDE = 8


def _resolve_process(process_index, process_count) -> tuple[int, int]:
  """(process_index, process_count), from JAX where not given."""
  if process_index is None or process_count is None:
    import jax  # Only here: the pipeline itself does not need JAX.
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in '
                     f'[0, process_count={process_count}).')
  return int(process_index), int(process_count)


def per_host_batch_size(global_batch: int, process_count: int, name: str) -> int:
  """The per-host share of a global batch; raises unless it divides evenly."""
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(
        f'config.data.{name}={global_batch} must be a positive multiple of the '
        f'number of hosts ({process_count}); batch sizes are global.')
  return global_batch // process_count


def example_seed(seed: int, stream: int, step, slot) -> tf.Tensor:
  """Stateless augmentation seed (int64 [2]) of global slot `slot` at `step`."""
  base = tf.constant([seed, stream], tf.int64)
  folded = tf.random.experimental.stateless_fold_in(base, tf.cast(step, tf.int64))
  return tf.random.experimental.stateless_fold_in(folded, tf.cast(slot, tf.int64))


def example_index(seed: int, stream: int, step, slot, global_batch: int,
                  num_examples: int) -> tf.Tensor:
  """Source index (int64 scalar) of global slot `slot` at `step`.

  Position q = step * global_batch + slot; epoch q // N is a seeded random
  permutation of the N examples, so each epoch visits every example once.
  """
  q = tf.cast(step, tf.int64) * global_batch + tf.cast(slot, tf.int64)
  epoch, pos = q // num_examples, q % num_examples
  perm_seed = tf.random.experimental.stateless_fold_in(
      tf.constant([seed, stream], tf.int64), epoch)
  return tf.random.experimental.index_shuffle(
      pos, perm_seed, tf.constant(num_examples - 1, tf.int64))


def _refs(entries, name) -> tf.Tensor:
  if not entries:
    raise ValueError(f'the {name} split has no examples; check the dataset '
                     'and the labeled/unlabeled split settings.')
  return tf.constant(list(entries), tf.string)


def _step_slots(start_step: int, per_host: int, process_index: int):
  """Infinite dataset of (step, global slot) for this host, from start_step."""
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  counter = tf.data.Dataset.counter(start=start_step * per_host, dtype=tf.int64)
  offset = process_index * per_host
  return counter.map(lambda e: (e // per_host, offset + e % per_host))


def _finish(ds: tf.data.Dataset, per_host: int) -> tf.data.Dataset:
  return ds.batch(per_host, drop_remainder=True)


def labeled_dataset(config, source, *, start_step: int, process_index: int,
                    process_count: int) -> tf.data.Dataset:
  """Per-host batches {'image': f32 [b, C, C, 3], 'label': i32 [b, C, C]}."""
  data = config.data
  if source.labels is None:
    raise ValueError('the labeled source has no labels; get_source(..., '
                     "'labeled') must return label masks.")
  global_batch = int(data.labeled_batch_size)
  per_host = per_host_batch_size(global_batch, process_count,
                                 'labeled_batch_size')
  images, labels = _refs(source.images, 'labeled'), _refs(source.labels, 'labeled')
  n, seed = len(source), int(config.seed)
  # Validated eagerly here, so a bad config fails before tf.data tracing.
  augment.check_scale_range(tuple(data.labeled_scale_range), data.base_size)

  def load(step, slot):
    idx = example_index(seed, LABELED_ORDER, step, slot, global_batch, n)
    image = sources.decode_image(tf.gather(images, idx), source.from_files)
    label = sources.decode_label(tf.gather(labels, idx), source.from_files,
                                 source.label_map)
    tf.debugging.assert_equal(
        tf.shape(image)[:2], tf.shape(label),
        message='image and label mask sizes differ; fix the dataset files')
    return augment.labeled_example(
        image, label, example_seed(seed, LABELED_AUG, step, slot),
        crop_size=data.crop_size, base_size=data.base_size,
        scale_range=tuple(data.labeled_scale_range),
        color_jitter=bool(data.labeled_color_jitter))

  ds = _step_slots(start_step, per_host, process_index)
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _finish(ds, per_host)


def unlabeled_dataset(config, source, *, start_step: int, process_index: int,
                      process_count: int) -> tf.data.Dataset:
  """Per-host batches of CAC pairs (keys as `train_iterator`'s 'unlabeled')."""
  data = config.data
  global_batch = int(data.unlabeled_batch_size)
  per_host = per_host_batch_size(global_batch, process_count,
                                 'unlabeled_batch_size')
  images = _refs(source.images, 'unlabeled')
  n, seed = len(source), int(config.seed)
  pair_kwargs = dict(
      crop_size=data.crop_size, base_size=data.base_size,
      scale_range=tuple(data.unlabeled_scale_range),
      iou_range=tuple(data.iou_range), stride=FEATURE_STRIDE,
      same_crop=bool(data.same_crop))
  # Validated eagerly here, so a bad config fails before tf.data tracing.
  pairs.check_pair_args(data.crop_size, data.base_size,
                        pair_kwargs['scale_range'], pair_kwargs['iou_range'],
                        FEATURE_STRIDE)

  def load(step, slot):
    idx = example_index(seed, UNLABELED_ORDER, step, slot, global_batch, n)
    image = sources.decode_image(tf.gather(images, idx), source.from_files)
    pair = pairs.sample_pair(
        image, example_seed(seed, UNLABELED_AUG, step, slot), **pair_kwargs)
    pair['image1'] = augment.normalize(pair['image1'])
    pair['image2'] = augment.normalize(pair['image2'])
    return pair

  ds = _step_slots(start_step, per_host, process_index)
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _finish(ds, per_host)


def train_dataset(config, *, start_step: int = 0, process_index=None,
                  process_count=None) -> tf.data.Dataset:
  """The tf.data.Dataset behind `train_iterator` (same arguments)."""
  process_index, process_count = _resolve_process(process_index, process_count)
  kwargs = dict(start_step=start_step, process_index=process_index,
                process_count=process_count)
  streams = {'labeled': labeled_dataset(
      config, sources.get_source(config.data, 'labeled'), **kwargs)}
  if not config.cac.supervised_only:
    streams['unlabeled'] = unlabeled_dataset(
        config, sources.get_source(config.data, 'unlabeled'), **kwargs)
  return tf.data.Dataset.zip(streams).prefetch(tf.data.AUTOTUNE)


def train_iterator(config, *, start_step: int = 0, process_index=None,
                   process_count=None):
  """Infinite iterator of this host's training batches, one per step.

  Args:
    config: the experiment ConfigDict (reads config.seed, config.data.*,
      config.cac.supervised_only).
    start_step: the first step to produce (resume point).
    process_index, process_count: this host and the number of hosts; default
      `jax.process_index()` / `jax.process_count()`.

  Yields:
    {'labeled': {'image': float32 [b_l, C, C, 3] normalised,
                 'label': int32 [b_l, C, C]},
     'unlabeled': {'image1', 'image2': float32 [b_u, C, C, 3] normalised,
                   'box1', 'box2': int32 [b_u, 4] (top, left, bottom, right),
                   'flip1', 'flip2': bool [b_u]}}
    with b = global batch // process_count; no 'unlabeled' key when
    config.cac.supervised_only.
  """
  return train_dataset(config, start_step=start_step,
                       process_index=process_index,
                       process_count=process_count).as_numpy_iterator()


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------


# PNG/JPEG headers (JPEG: after any EXIF block) almost always fit in this.
_HEADER_BYTES = 1 << 16


def _image_size(ref, from_files: bool) -> tuple[int, int]:
  """(height, width) from the image header (PIL decodes lazily).

  For files only the first 64 KiB are read (fast on remote storage); if the
  header lies beyond them, the whole file is read.
  """
  if not from_files:
    width, height = Image.open(io.BytesIO(ref)).size
    return height, width
  with tf.io.gfile.GFile(ref, 'rb') as f:
    head = f.read(_HEADER_BYTES)
    try:
      width, height = Image.open(io.BytesIO(head)).size
    except (OSError, SyntaxError):
      width, height = Image.open(io.BytesIO(head + f.read())).size
  return height, width


def _round_up(x, multiple):
  return -(-x // multiple) * multiple


@functools.lru_cache(maxsize=8)
def eval_canvas_size(source) -> tuple[int, int]:
  """Common eval canvas (H, W): the largest val size, rounded up to 8.

  Memoised per Source (immutable, and get_source returns the same object for
  the same config): training evaluates many times and would otherwise re-read
  every val image's header at each evaluation.
  """
  sizes = np.array([_image_size(r, source.from_files) for r in source.images])
  return (int(_round_up(sizes[:, 0].max(), EVAL_MULTIPLE)),
          int(_round_up(sizes[:, 1].max(), EVAL_MULTIPLE)))


def eval_num_batches(config) -> int:
  """Batches per host of `eval_iterator` (the same on every host)."""
  n = len(sources.get_source(config.data, 'val'))
  return math.ceil(n / int(config.data.eval_batch_size))


def eval_iterator(config, *, process_index=None, process_count=None):
  """Finite iterator of this host's evaluation batches.

  Yields `eval_num_batches(config)` batches of
    {'image': float32 [b, H, W, 3] normalised, 'label': int32 [b, H, W]
     (255 outside the image and in padding entries), 'valid': bool [b]},
  with b = eval_batch_size // process_count and (H, W) the common canvas.
  Global batch k holds val images [k*B, (k+1)*B); host p holds its slice
  [k*B + p*b, k*B + (p+1)*b).
  """
  process_index, process_count = _resolve_process(process_index, process_count)
  source = sources.get_source(config.data, 'val')
  if source.labels is None:
    raise ValueError('the val source has no labels; evaluation needs masks.')
  global_batch = int(config.data.eval_batch_size)
  per_host = per_host_batch_size(global_batch, process_count, 'eval_batch_size')
  images, labels = _refs(source.images, 'val'), _refs(source.labels, 'val')
  n = len(source)
  num_batches = math.ceil(n / global_batch)
  canvas_h, canvas_w = eval_canvas_size(source)

  def load(e):
    k, i = e // per_host, e % per_host
    g = k * global_batch + process_index * per_host + i
    valid = g < n
    idx = tf.minimum(g, n - 1)
    image = tf.cast(sources.decode_image(tf.gather(images, idx),
                                         source.from_files), tf.float32)
    label = tf.cast(sources.decode_label(tf.gather(labels, idx),
                                         source.from_files, source.label_map),
                    tf.int32)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    tf.debugging.assert_equal(
        tf.shape(label), tf.shape(image)[:2],
        message='image and label mask sizes differ; fix the dataset files')
    tf.debugging.assert_greater_equal(
        tf.minimum(h, w), EVAL_MULTIPLE,
        message='val images must be at least 8 pixels on each side')
    # Reflect padding to a multiple of 8, as the authors' evaluation.
    pad_h = _round_up(h, EVAL_MULTIPLE) - h
    pad_w = _round_up(w, EVAL_MULTIPLE) - w
    image = tf.pad(augment.normalize(image), [[0, pad_h], [0, pad_w], [0, 0]],
                   mode='REFLECT')
    # Then the common canvas: zeros = mean colour after normalisation.
    image = tf.pad(image, [[0, canvas_h - h - pad_h], [0, canvas_w - w - pad_w],
                           [0, 0]])
    label = tf.pad(label, [[0, canvas_h - h], [0, canvas_w - w]],
                   constant_values=augment.IGNORE_LABEL)
    image = tf.where(valid, image, tf.zeros_like(image))
    label = tf.where(valid, label, tf.fill(tf.shape(label),
                                           augment.IGNORE_LABEL))
    image.set_shape([canvas_h, canvas_w, 3])
    label.set_shape([canvas_h, canvas_w])
    return {'image': image, 'label': label, 'valid': valid}

  ds = tf.data.Dataset.range(num_batches * per_host)
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(per_host, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return ds.as_numpy_iterator()
