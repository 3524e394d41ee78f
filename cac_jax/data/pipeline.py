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
step is freshly augmented; nothing is cached or replayed (docs/method.md
§7, first point).

Evaluation (`eval_iterator`): the full validation images, each at its own
size, reflect-padded bottom/right to a multiple of 8 (as the authors'
evaluation); labels are 255 in the padding. Batches group images on a shared
canvas (a bounded set of shapes; the model masks each image's region) and are
padded with invalid entries to a multiple of the device count, so every image
counts exactly once across hosts and every host runs the same batches.
"""

import dataclasses
import functools
import io
import math
import re

import numpy as np
import tensorflow as tf
from PIL import Image

from cac_jax.constants import FEATURE_STRIDE, IGNORE_LABEL
from cac_jax.data import augment, pairs, sources

# Independent randomness streams (second word of the base seed).
LABELED_AUG, LABELED_ORDER, UNLABELED_AUG, UNLABELED_ORDER = 0, 1, 2, 3
# The order of the labeled images that re-estimate BatchNorm statistics
# (`bn_stats_iterator`); they are not augmented, so no augmentation stream.
BN_STATS_ORDER = 4
# Val images are reflect-padded to a multiple of the feature stride, as the
# authors' evaluation does (crop offsets and overlap boxes are multiples too).
EVAL_MULTIPLE = FEATURE_STRIDE


def _resolve_process(process_index, process_count) -> tuple[int, int]:
  """(process_index, process_count), from JAX where not given."""
  if process_index is None or process_count is None:
    import jax  # Only here: the pipeline itself does not need JAX.

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(
      f'process_index={process_index} must be in [0, process_count={process_count}).'
    )
  return int(process_index), int(process_count)


def per_host_batch_size(global_batch: int, process_count: int, name: str) -> int:
  """The per-host share of a global batch; raises unless it divides evenly."""
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(
      f'config.data.{name}={global_batch} must be a positive multiple of the '
      f'number of hosts ({process_count}); batch sizes are global.'
    )
  return global_batch // process_count


def example_seed(seed: int, stream: int, step, slot) -> tf.Tensor:
  """Stateless augmentation seed (int64 [2]) of global slot `slot` at `step`."""
  base = tf.constant([seed, stream], tf.int64)
  folded = tf.random.experimental.stateless_fold_in(base, tf.cast(step, tf.int64))
  return tf.random.experimental.stateless_fold_in(folded, tf.cast(slot, tf.int64))


def example_index(
  seed: int, stream: int, step, slot, global_batch: int, num_examples: int
) -> tf.Tensor:
  """Source index (int64 scalar) of global slot `slot` at `step`.

  Position q = step * global_batch + slot; epoch q // N is a seeded random
  permutation of the N examples, so each epoch visits every example once.
  """
  q = tf.cast(step, tf.int64) * global_batch + tf.cast(slot, tf.int64)
  epoch, pos = q // num_examples, q % num_examples
  perm_seed = tf.random.experimental.stateless_fold_in(tf.constant([seed, stream], tf.int64), epoch)
  return tf.random.experimental.index_shuffle(
    pos, perm_seed, tf.constant(num_examples - 1, tf.int64)
  )


def _refs(entries, name) -> tf.Tensor:
  if not entries:
    raise ValueError(
      f'the {name} split has no examples; check the dataset '
      'and the labeled/unlabeled split settings.'
    )
  return tf.constant(list(entries), tf.string)


def _step_slots(start_step: int, per_host: int, process_index: int):
  """Infinite dataset of (step, global slot) for this host, from start_step."""
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  counter = tf.data.Dataset.counter(start=start_step * per_host, dtype=tf.int64)
  offset = process_index * per_host
  return counter.map(lambda e: (e // per_host, offset + e % per_host))


def _names(source, field: str) -> tf.Tensor:
  """Per example, what error messages call its image or mask: the path, or the id."""
  refs = getattr(source, field)
  if source.from_files:
    return tf.constant(list(refs), tf.string)
  what = 'mask' if field == 'labels' else 'image'
  return tf.constant([f'{what} of id {i}' for i in source.ids], tf.string)


def _finish(ds: tf.data.Dataset, per_host: int) -> tf.data.Dataset:
  return ds.batch(per_host, drop_remainder=True)


def labeled_dataset(
  config, source, *, start_step: int, process_index: int, process_count: int
) -> tf.data.Dataset:
  """Per-host batches {'image': f32 [b, C, C, 3], 'label': i32 [b, C, C]}."""
  data = config.data
  if source.labels is None:
    raise ValueError(
      "the labeled source has no labels; get_source(..., 'labeled') must return label masks."
    )
  global_batch = int(data.labeled_batch_size)
  per_host = per_host_batch_size(global_batch, process_count, 'labeled_batch_size')
  images, labels = _refs(source.images, 'labeled'), _refs(source.labels, 'labeled')
  n, seed = len(source), int(config.seed)
  # Validated eagerly here, so a bad config fails before tf.data tracing.
  augment.check_scale_range(tuple(data.labeled_scale_range), data.base_size)

  names = _names(source, 'labels')

  def load(step, slot):
    idx = example_index(seed, LABELED_ORDER, step, slot, global_batch, n)
    image = sources.decode_image(tf.gather(images, idx), source.from_files)
    # Checked while decoding (values in [0, K) or 255, size = image size),
    # with the file named: a bad mask never reaches the loss as NaN.
    label = sources.decode_label(
      tf.gather(labels, idx),
      source.from_files,
      source.label_map,
      num_classes=source.num_classes,
      name=tf.gather(names, idx),
      image_shape=tf.shape(image),
    )
    return augment.labeled_example(
      image,
      label,
      example_seed(seed, LABELED_AUG, step, slot),
      crop_size=data.crop_size,
      base_size=data.base_size,
      scale_range=tuple(data.labeled_scale_range),
      color_jitter=bool(data.labeled_color_jitter),
    )

  ds = _step_slots(start_step, per_host, process_index)
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _finish(ds, per_host)


def unlabeled_dataset(
  config, source, *, start_step: int, process_index: int, process_count: int
) -> tf.data.Dataset:
  """Per-host batches of CAC pairs (keys as `train_iterator`'s 'unlabeled').

  Where the source has masks (`source.labels`), each pair also carries the
  true class of every stride-8 cell of each view ('truth1', 'truth2'), cut
  with the pair's own geometry (`pairs.sample_pair`). They feed the DC
  diagnostics only (docs/method.md §4); no loss reads them.
  """
  data = config.data
  global_batch = int(data.unlabeled_batch_size)
  per_host = per_host_batch_size(global_batch, process_count, 'unlabeled_batch_size')
  images = _refs(source.images, 'unlabeled')
  n, seed = len(source), int(config.seed)
  pair_kwargs = dict(
    crop_size=data.crop_size,
    base_size=data.base_size,
    scale_range=tuple(data.unlabeled_scale_range),
    iou_range=tuple(data.iou_range),
    stride=FEATURE_STRIDE,
    same_crop=bool(data.same_crop),
  )
  # Validated eagerly here, so a bad config fails before tf.data tracing.
  pairs.check_pair_args(
    data.crop_size,
    data.base_size,
    pair_kwargs['scale_range'],
    pair_kwargs['iou_range'],
    FEATURE_STRIDE,
  )

  truth = source.labels is not None
  if truth:
    labels, names = _refs(source.labels, 'unlabeled'), _names(source, 'labels')

  def load(step, slot):
    idx = example_index(seed, UNLABELED_ORDER, step, slot, global_batch, n)
    image = sources.decode_image(tf.gather(images, idx), source.from_files)
    label = None
    if truth:  # checked like a labeled mask, the file named on error
      label = sources.decode_label(
        tf.gather(labels, idx),
        source.from_files,
        source.label_map,
        num_classes=source.num_classes,
        name=tf.gather(names, idx),
        image_shape=tf.shape(image),
      )
    pair = pairs.sample_pair(
      image, example_seed(seed, UNLABELED_AUG, step, slot), label=label, **pair_kwargs
    )
    pair['image1'] = augment.normalize(pair['image1'])
    pair['image2'] = augment.normalize(pair['image2'])
    return pair

  ds = _step_slots(start_step, per_host, process_index)
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _finish(ds, per_host)


def _with_unlabeled(config, unlabeled) -> bool:
  return not config.cac.supervised_only if unlabeled is None else bool(unlabeled)


def train_dataset(
  config, *, start_step: int = 0, process_index=None, process_count=None, unlabeled=None
) -> tf.data.Dataset:
  """The tf.data.Dataset behind `train_iterator` (same arguments)."""
  process_index, process_count = _resolve_process(process_index, process_count)
  kwargs = dict(start_step=start_step, process_index=process_index, process_count=process_count)
  streams = {
    'labeled': labeled_dataset(config, sources.get_source(config.data, 'labeled'), **kwargs)
  }
  if _with_unlabeled(config, unlabeled):
    streams['unlabeled'] = unlabeled_dataset(
      config, sources.get_source(config.data, 'unlabeled'), **kwargs
    )
  return tf.data.Dataset.zip(streams).prefetch(tf.data.AUTOTUNE)


def train_iterator(
  config, *, start_step: int = 0, process_index=None, process_count=None, unlabeled=None
):
  """Infinite iterator of this host's training batches, one per step.

  Args:
    config: the experiment ConfigDict (reads config.seed, config.data.*,
      config.cac.supervised_only).
    start_step: the first step to produce (resume point).
    process_index, process_count: this host and the number of hosts; default
      `jax.process_index()` / `jax.process_count()`.
    unlabeled: whether to produce the unlabeled pairs (default: unless
      config.cac.supervised_only). Each stream is a function of the step
      alone, so a labeled-only stream up to step k followed by a full stream
      from step k gives exactly the batches of a full stream from 0.

  Yields:
    {'labeled': {'image': float32 [b_l, C, C, 3] normalised,
                 'label': int32 [b_l, C, C]},
     'unlabeled': {'image1', 'image2': float32 [b_u, C, C, 3] normalised,
                   'box1', 'box2': int32 [b_u, 4] (top, left, bottom, right),
                   'flip1', 'flip2': bool [b_u],
                   and where the unlabeled source has masks (for the DC
                   diagnostics only) 'truth1', 'truth2': int32
                   [b_u, C/8, C/8], the true class of each stride-8 cell}}
    with b = global batch // process_count; no 'unlabeled' key without the
    unlabeled stream.

  Raises:
    sources.DataError: a file of the stream cannot be read or is invalid; the
      message names it (the step's files are checked to find it).
  """
  process_index, process_count = _resolve_process(process_index, process_count)
  with_unlabeled = _with_unlabeled(config, unlabeled)
  batches = train_dataset(
    config,
    start_step=start_step,
    process_index=process_index,
    process_count=process_count,
    unlabeled=with_unlabeled,
  ).as_numpy_iterator()

  def step_sources(step):
    """This host's examples of `step`, per split, as sub-Sources."""
    out = []
    streams = [('labeled', LABELED_ORDER, config.data.labeled_batch_size)]
    if with_unlabeled:
      streams.append(('unlabeled', UNLABELED_ORDER, config.data.unlabeled_batch_size))
    for split, stream, global_batch in streams:
      source = sources.get_source(config.data, split)
      per_host = int(global_batch) // process_count
      slots = range(process_index * per_host, (process_index + 1) * per_host)
      index = [
        int(example_index(int(config.seed), stream, step, j, int(global_batch), len(source)))
        for j in slots
      ]
      out.append(_subset(source, index))
    return out

  def named_errors():
    step = start_step
    while True:
      try:
        batch = next(batches)
      except tf.errors.OpError as e:
        raise _data_error(e, step_sources(step), f'step {step}') from None
      yield batch
      step += 1

  return named_errors()


def _subset(source, index) -> sources.Source:
  """The examples `index` of `source`, as a Source of their own."""

  def pick(refs):
    return None if refs is None else tuple(refs[i] for i in index)

  return dataclasses.replace(
    source, ids=pick(source.ids), images=pick(source.images), labels=pick(source.labels)
  )


def _data_error(error, subsets, where: str) -> sources.DataError:
  """A DataError naming the file behind a tf.data failure.

  Masks are checked while decoding, so their messages already name the file
  (`masks.MaskError`). Other failures (a truncated image, say) are located by
  checking the files the failing batch reads with the data validator.
  """
  from cac_jax.data import validate  # PIL only; imported on failure

  text = getattr(error, 'message', str(error))
  found = re.search(r'MaskError: (.*)', text)
  if found:
    return sources.DataError(found.group(1).strip())
  problems = []
  for subset in subsets:
    for p in validate.source_problems(subset, allow_empty=True):
      if p not in problems:
        problems.append(p)
  if problems:
    return sources.DataError(problems)
  files = [r if s.from_files else f'id {i}' for s in subsets for i, r in zip(s.ids, s.images)]
  first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
  return sources.DataError(
    f'reading the data of {where} failed ({first}); it reads {", ".join(files[:16])}'
    f'{" ..." if len(files) > 16 else ""}. Run with --validate_only to check every file'
  )


def bn_stats_example(image, crop_size: int) -> tf.Tensor:
  """One un-augmented image for the BatchNorm estimation: float32 [C, C, 3] normalised.

  At its own resolution (evaluation scores every val image at its own size;
  no random scale), padded bottom/right with the mean colour to at least
  C = crop_size on each side as training pads, then its centre C x C
  window. No flip, no colour jitter.
  """
  image = augment.pad_image(image, crop_size)
  shape = tf.shape(image)
  top, left = (shape[0] - crop_size) // 2, (shape[1] - crop_size) // 2
  return augment.normalize(augment.crop(image, top, left, crop_size))


def bn_stats_iterator(config, *, num_batches: int, process_index=None, process_count=None):
  """This host's share of the images that re-estimate BatchNorm statistics.

  The labeled training images (the split the labeled pass trains on), in a
  seeded random order of their own (`BN_STATS_ORDER`: batch i, global slot
  j is position i * B + j of that endless sequence of epochs, as training's
  order: N batches hold min(N * B, n) distinct images of the n, an image
  repeating only once every other one has been used), each prepared by
  `bn_stats_example`. B is the global labeled
  batch size, so each batch's statistics are taken over as many images as
  the labeled pass normalises with. The same `num_batches` batches every
  call: the estimate is a function of the parameters alone.

  Yields `num_batches` batches {'image': float32 [b, C, C, 3]}, b = B //
  process_count: host p holds global slots [p*b, (p+1)*b), like training.

  Raises:
    sources.DataError: an image cannot be read (named).
  """
  if num_batches <= 0:
    raise ValueError(f'num_batches must be positive, got {num_batches}.')
  process_index, process_count = _resolve_process(process_index, process_count)
  source = sources.get_source(config.data, 'labeled')
  global_batch = int(config.data.labeled_batch_size)
  per_host = per_host_batch_size(global_batch, process_count, 'labeled_batch_size')
  images, n, seed = _refs(source.images, 'labeled'), len(source), int(config.seed)
  crop_size = int(config.data.crop_size)

  def load(step, slot):
    idx = example_index(seed, BN_STATS_ORDER, step, slot, global_batch, n)
    return bn_stats_example(
      sources.decode_image(tf.gather(images, idx), source.from_files), crop_size
    )

  ds = _step_slots(0, per_host, process_index).take(num_batches * per_host)
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  batches = _finish(ds, per_host).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
  for i in range(num_batches):
    try:
      image = next(batches)
    except tf.errors.OpError as e:
      slots = range(process_index * per_host, (process_index + 1) * per_host)
      index = [int(example_index(seed, BN_STATS_ORDER, i, j, global_batch, n)) for j in slots]
      raise _data_error(
        e, [_subset(source, index)], f'batch {i} of the BatchNorm statistics'
      ) from None
    yield {'image': image}


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
def eval_sizes(source) -> tuple[tuple[int, int], ...]:
  """(height, width) of every val image, from the headers.

  Memoised per Source (immutable, and get_source returns the same object for
  the same config): training evaluates many times and would otherwise re-read
  every val image's header at each evaluation.
  """
  try:
    return tuple(_image_size(r, source.from_files) for r in source.images)
  except (OSError, SyntaxError, ValueError) as e:
    raise sources.DataError(
      f'a val image cannot be read ({type(e).__name__}: {e}); run '
      'with --validate_only to find every bad file'
    ) from None


# Canvas sides are multiples of this: the largest stride of any backbone
# (MobileNetV2 and ResNets at output stride 32), so that every feature map
# of the network is the canvas at an integer stride.
CANVAS_GRANULE = 32


def canvas_multiple(eval_config) -> int:
  """The canvas granularity for this protocol; 0 = one shape per padded size.

  Shared canvases need masks through the network (`layers.valid_region`),
  which cover the whole image with or without a flip; multi-scale and
  sliding-window evaluation resize and cut the image, so they keep one
  batch shape per padded size.
  """
  default = tuple(float(s) for s in eval_config.scales) == (1.0,) and not eval_config.window
  return int(eval_config.canvas_multiple) if default else 0


def plan_batches(
  sizes, global_batch: int, multiple: int, canvas: int = 0
) -> list[tuple[tuple[int, int], list[int]]]:
  """The global eval batches: (canvas shape, val indices), -1 for a padding entry.

  Every image is padded to its own size rounded up to 8 (the shape the
  network would see alone). With `canvas` = 0 images are grouped by that
  padded size, so each group is its own compiled shape. With `canvas` = c
  (a multiple of CANVAS_GRANULE) they are grouped by the padded size
  rounded up to c, and a group's canvas is the smallest multiple of
  CANVAS_GRANULE that holds all its members: at most (max side / c)^2
  shapes, each image placed at the canvas's top-left (masks make its result
  its own). Groups keep their order of first appearance; each is cut into
  batches of `global_batch`, the last padded with -1 to a multiple of
  `multiple` (the device count), not to a full batch, so a lone large image
  costs one forward pass per device, not `global_batch`.
  """
  padded = [(_round_up(h, EVAL_MULTIPLE), _round_up(w, EVAL_MULTIPLE)) for h, w in sizes]
  groups: dict[tuple[int, int], list[int]] = {}
  for i, (h, w) in enumerate(padded):
    key = (h, w) if not canvas else (_round_up(h, canvas), _round_up(w, canvas))
    groups.setdefault(key, []).append(i)
  plan = []
  for key, members in groups.items():
    shape = (
      key
      if not canvas
      else tuple(
        _round_up(max(padded[i][axis] for i in members), CANVAS_GRANULE) for axis in (0, 1)
      )
    )
    for start in range(0, len(members), global_batch):
      batch = members[start : start + global_batch]
      plan.append((shape, batch + [-1] * (_round_up(len(batch), multiple) - len(batch))))
  return plan


def eval_plan(source, global_batch: int, multiple: int, canvas: int = 0):
  """`plan_batches` over the val images of `source` (sizes from their headers)."""
  return plan_batches(eval_sizes(source), global_batch, multiple, canvas)


def _eval_multiple(process_count: int, multiple) -> int:
  if multiple is None:
    import jax  # Only here: the pipeline itself does not need JAX.

    multiple = jax.device_count()
  return math.lcm(int(multiple), process_count)


def eval_num_batches(config, *, split: str = 'val', process_count=None, multiple=None) -> int:
  """Batches per host of `eval_iterator` (the same on every host)."""
  if process_count is None:
    _, process_count = _resolve_process(None, None)
  source = sources.get_source(config.data, split)
  return len(
    eval_plan(
      source,
      int(config.data.eval_batch_size),
      _eval_multiple(process_count, multiple),
      canvas_multiple(config.eval),
    )
  )


def eval_iterator(
  config,
  *,
  split: str = 'val',
  process_index=None,
  process_count=None,
  multiple=None,
  max_batches: int | None = None,
):
  """Finite iterator of this host's evaluation batches of `split` (default val).

  Every val image is evaluated at its own size, as the authors' evaluation:
  reflect-padded bottom/right to a multiple of 8, nothing more (labels are
  255 in that padding). Batches hold images on one canvas (`eval_plan`):
  for the default protocol a shared canvas of `eval.canvas_multiple`
  granularity, with each image's padded size in 'size' (the model masks
  the rest, `layers.valid_region`); otherwise (or with canvas_multiple 0)
  images of one padded size and no 'size'. Jit compiles once per shape.

  Yields `eval_num_batches(config)` batches of
    {'image': float32 [b, H, W, 3] normalised, 'label': int32 [b, H, W],
     'valid': bool [b], and on shared canvases 'size': int32 [b, 2]}
  (beyond an image and in padding entries: zeros, label 255; padding
  entries have valid False and size (8, 8)),
  where b is this host's share of the global batch: host p holds entries
  [p*b, (p+1)*b). `multiple` (default: the device count) is what each
  global batch size is a multiple of. `split` is any split of
  `sources.SPLITS` that has masks (evaluators score others than val);
  `max_batches` yields only the first that many batches, decoding only
  their images (the TensorBoard examples need the first batch alone).

  Raises:
    sources.DataError: a val image or mask is unreadable or invalid (named).
  """
  process_index, process_count = _resolve_process(process_index, process_count)
  source = sources.get_source(config.data, split)
  if source.labels is None:
    raise ValueError(f'the {split} source has no labels; evaluation needs masks.')
  global_batch = int(config.data.eval_batch_size)
  per_host_batch_size(global_batch, process_count, 'eval_batch_size')
  canvas = canvas_multiple(config.eval)
  plan = eval_plan(source, global_batch, _eval_multiple(process_count, multiple), canvas)
  if max_batches is not None:
    plan = plan[:max_batches]
  # This host's entries, batch by batch.
  mine = []
  for _, batch in plan:
    share = len(batch) // process_count
    mine.append(batch[process_index * share : (process_index + 1) * share])
  flat = [i for batch in mine for i in batch if i >= 0]  # padding is not decoded
  images, labels = _refs(source.images, split), _refs(source.labels, split)
  names = _names(source, 'labels')

  def load(idx):
    image = tf.cast(sources.decode_image(tf.gather(images, idx), source.from_files), tf.float32)
    label = tf.cast(
      sources.decode_label(
        tf.gather(labels, idx),
        source.from_files,
        source.label_map,
        num_classes=source.num_classes,
        name=tf.gather(names, idx),
        image_shape=tf.shape(image),
      ),
      tf.int32,
    )
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    tf.debugging.assert_greater_equal(
      tf.minimum(h, w), EVAL_MULTIPLE, message='val images must be at least 8 pixels on each side'
    )
    # Reflect padding to a multiple of 8, as the authors' evaluation.
    pad_h = _round_up(h, EVAL_MULTIPLE) - h
    pad_w = _round_up(w, EVAL_MULTIPLE) - w
    image = tf.pad(augment.normalize(image), [[0, pad_h], [0, pad_w], [0, 0]], mode='REFLECT')
    label = tf.pad(label, [[0, pad_h], [0, pad_w]], constant_values=IGNORE_LABEL)
    return image, label

  ds = tf.data.Dataset.from_tensor_slices(tf.constant(flat, tf.int64))
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  examples = ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
  for ((h8, w8), _), batch in zip(plan, mine):
    image = np.zeros((len(batch), h8, w8, 3), np.float32)
    label = np.full((len(batch), h8, w8), IGNORE_LABEL, np.int32)
    size = np.full((len(batch), 2), EVAL_MULTIPLE, np.int32)
    for k, g in enumerate(batch):
      if g < 0:
        continue
      try:
        example, example_label = next(examples)
      except tf.errors.OpError as e:
        raise _data_error(
          e, [_subset(source, [i for i in batch if i >= 0])], f'the {split} set'
        ) from None
      h, w = example_label.shape
      image[k, :h, :w], label[k, :h, :w], size[k] = example, example_label, (h, w)
    out = {'image': image, 'label': label, 'valid': np.array([g >= 0 for g in batch], bool)}
    if canvas:
      out['size'] = size
    yield out
