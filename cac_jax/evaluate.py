"""Exact mIoU over the whole validation set, on all hosts.

The eval pipeline gives every image at its own size (reflect-padded to a
multiple of 8, label 255 in the padding), batched on a shared canvas with
each image's size (`batch['size']`; the model then computes every image as
if alone, `layers.valid_region`), or, for multi-scale and sliding-window
evaluation, batched with images of the same padded size. Batches are padded
with invalid entries so that every host runs the same batches; invalid
entries and ignore pixels add nothing to the confusion matrix, so each val
pixel is counted exactly once.
"""

import jax
import jax.numpy as jnp
import numpy as np

from cac_jax import sharding
from cac_jax.constants import FEATURE_STRIDE, IGNORE_LABEL
from cac_jax.models import layers


def sliding_window_scores(model, variables, images, window: int):
  """Softmax scores [B,H,W,K] averaged over window x window crops (stride 2/3 window).

  Windows are placed on a static grid that covers the image, the last one
  flush with the bottom/right border, so every pixel is seen at least once;
  images smaller than the window are run whole.
  """
  b, h, w, _ = images.shape
  if h <= window and w <= window:
    return jax.nn.softmax(model.apply(variables, images, train=False)['logits'])
  stride = max(FEATURE_STRIDE, (2 * window // 3) // FEATURE_STRIDE * FEATURE_STRIDE)

  def starts(size):
    if size <= window:
      return [0]
    last = size - window
    return sorted(set(list(range(0, last, stride)) + [last]))

  total, count = 0.0, jnp.zeros((1, h, w, 1))
  for y in starts(h):
    for x in starts(w):
      wh, ww = min(window, h), min(window, w)
      crop = images[:, y : y + wh, x : x + ww]
      probs = jax.nn.softmax(model.apply(variables, crop, train=False)['logits'])
      pad = ((0, 0), (y, h - y - wh), (x, w - x - ww), (0, 0))
      total = total + jnp.pad(probs, pad)
      count = count + jnp.pad(jnp.ones((1, wh, ww, 1)), pad)
  return total / count


def _flip_regions(x: jax.Array, sizes: jax.Array) -> jax.Array:
  """Mirrors each image's own columns [0, w) of a canvas batch [B, H, W, C]."""
  j = jnp.arange(x.shape[2])[None, :]
  w = sizes[:, 1:2]
  index = jnp.where(j < w, w - 1 - j, j)
  return jnp.take_along_axis(x, index[:, None, :, None], axis=2)


def predict_logits(
  model, variables, images, *, sizes=None, flip: bool = False, scales=(1.0,), window: int = 0
):
  """Full-image class scores [B,H,W,K] float32.

  The default (one scale, no flip) is the authors' protocol and returns raw
  logits. With `flip` and/or several `scales`, softmax probabilities are
  averaged over the mirrored image and over the image resized (bilinear) to
  each scale — rounded to a multiple of 8 — with the scores resized back.
  `window` > 0 evaluates each of those in sliding windows of that size.

  `sizes` (int32 [B, 2]) marks `images` as a shared canvas: image b is its
  top-left sizes[b] region, computed as if alone (flip mirrors that region);
  scores beyond it are meaningless. Only the whole-image protocol (one
  scale, no window) runs on a canvas.
  """
  if sizes is not None:
    if tuple(float(s) for s in scales) != (1.0,) or window:
      raise ValueError(
        'multi-scale and sliding-window evaluation need batches of one '
        'image size; a shared canvas holds whole images at scale 1 only'
      )
    with layers.valid_region(sizes, images.shape[1:3]):
      logits = model.apply(variables, images, train=False)['logits']
      if not flip:
        return logits
      mirrored = model.apply(variables, _flip_regions(images, sizes), train=False)['logits']
    return (jax.nn.softmax(logits) + _flip_regions(jax.nn.softmax(mirrored), sizes)) / 2
  scales = tuple(float(s) for s in scales)
  if not flip and scales == (1.0,) and not window:
    return model.apply(variables, images, train=False)['logits']
  b, h, w, c = images.shape
  total = 0.0
  for scale in scales:
    m = FEATURE_STRIDE
    size = (max(m, round(h * scale / m) * m), max(m, round(w * scale / m) * m))
    x = images if size == (h, w) else jax.image.resize(images, (b, *size, c), 'bilinear')
    views = [(x, False)] + ([(x[:, :, ::-1], True)] if flip else [])
    for view, flipped in views:
      if window:
        probs = sliding_window_scores(model, variables, view, window)
      else:
        probs = jax.nn.softmax(model.apply(variables, view, train=False)['logits'])
      probs = probs[:, :, ::-1] if flipped else probs
      if size != (h, w):
        probs = jax.image.resize(probs, (b, h, w, probs.shape[-1]), 'bilinear')
      total = total + probs
  return total / (len(scales) * (2 if flip else 1))


def confusion_matrix(pred, label, valid_image, num_classes: int):
  """[K, K] int32 counts, rows = ground truth, cols = prediction.

  Pixels labelled 255 (ignore, or padding) and images with valid_image=False
  are left out.
  """
  keep = (label != IGNORE_LABEL) & valid_image[:, None, None]
  index = jnp.where(keep, label * num_classes + pred, 0)
  counts = (
    jnp.zeros((num_classes * num_classes,), jnp.int32)
    .at[index.reshape(-1)]
    .add(keep.reshape(-1).astype(jnp.int32))
  )
  return counts.reshape(num_classes, num_classes)


def make_predict_fn(model, *, flip: bool = False, scales=(1.0,), window: int = 0):
  """(variables, batch) -> class scores [B, H, W, K]: the one prediction of evaluation.

  Scoring and the val images drawn in TensorBoard both call it, so what is
  drawn is what is scored, with the same options. A batch with 'size' is a
  shared canvas (see `predict_logits`).
  """

  def predict(variables, batch):
    return predict_logits(
      model,
      variables,
      batch['image'],
      sizes=batch.get('size'),
      flip=flip,
      scales=scales,
      window=window,
    )

  return predict


def make_confusion_step(predict, num_classes: int, mesh):
  """jit(variables, batch) -> replicated confusion matrix [K, K] of `predict`'s argmax.

  `predict` is a `make_predict_fn` function; the evaluators share one between
  this step and the images they draw (`cac_jax.evaluators.Prediction`).
  """

  def step(variables, batch):
    pred = jnp.argmax(predict(variables, batch), axis=-1)
    return confusion_matrix(pred, batch['label'], batch['valid'], num_classes)

  return jax.jit(step, out_shardings=sharding.replicated(mesh))


def make_eval_step(
  model, num_classes: int, mesh, *, flip: bool = False, scales=(1.0,), window: int = 0
):
  """jit((params, batch_stats), batch) -> replicated confusion matrix [K, K]."""
  return make_confusion_step(
    make_predict_fn(model, flip=flip, scales=scales, window=window), num_classes, mesh
  )


def scores(confusion: np.ndarray, class_names=()) -> dict:
  """mIoU, per-class IoU and pixel accuracy from a confusion matrix.

  Like the authors' code, IoU_c = inter_c / (union_c + eps) and the mean runs
  over ALL classes, so a class absent from both prediction and ground truth
  counts as 0; on the full VOC/Cityscapes val sets every class is present.
  """
  conf = np.asarray(confusion, np.float64)
  inter = np.diag(conf)
  union = conf.sum(0) + conf.sum(1) - inter
  iou = inter / (union + np.spacing(1))
  out = {'miou': float(iou.mean()), 'pixel_acc': float(inter.sum() / max(conf.sum(), 1.0))}
  names = list(class_names) or [str(i) for i in range(len(iou))]
  out.update({f'iou/{n}': float(v) for n, v in zip(names, iou)})
  return out


def evaluate(eval_step, variables, batches, mesh, num_classes: int) -> np.ndarray:
  """Runs `eval_step` over an iterable of host batches; returns the int64 confusion."""
  total = np.zeros((num_classes, num_classes), np.int64)
  for host_batch in batches:
    conf = eval_step(variables, sharding.to_global(host_batch, mesh))
    total += np.asarray(jax.device_get(conf), np.int64)
  return total


# ----------------------------------------------------------------------------
# Command line:
#   python -m cac_jax.evaluate --workdir=<run> [--which=best|latest] [--step=N]
#       [--evaluator=NAME] [--split=labeled|unlabeled|val]
#       [--config.eval.flip=True] [--config.data.eval_batch_size=N]
#       [--config.data.root=DIR]
# Evaluates one checkpoint with the config saved in the run: the mIoU
# evaluator NAME of that config (`cac_jax.evaluators`; default 'val', the one
# training selects the best checkpoint by) on its split or on --split. Only
# the fields below may be overridden, since the network and the data were
# fixed by training. Flags are defined only when run as a program: this
# module is also a library imported by the training loop, whose entry point
# defines its own --config and --workdir.
# ----------------------------------------------------------------------------

EVAL_OVERRIDES = ('eval.*', 'data.eval_batch_size', 'data.root')


def apply_overrides(config, overrides: dict) -> None:
  """Sets flat 'a.b' -> value overrides on `config` (eval fields only).

  Raises:
    ConfigError: a field outside EVAL_OVERRIDES.
  """
  from cac_jax import config_lib

  bad = [k for k in overrides if not (k.startswith('eval.') or k in EVAL_OVERRIDES)]
  if bad:
    raise config_lib.ConfigError(
      f'--config.{bad[0]} cannot be changed at evaluation (the network and '
      f'data were fixed by training); allowed: {", ".join(EVAL_OVERRIDES)}'
    )
  for key, value in overrides.items():
    *path, last = key.split('.')
    target = config
    for p in path:
      target = target[p]
    target[last] = value


def score_run(
  workdir: str,
  *,
  which: str = 'best',
  step: int | None = None,
  overrides: dict | None = None,
  evaluator: str | None = None,
  split: str | None = None,
):
  """One checkpoint of a run, scored by one of its config's mIoU evaluators.

  Args:
    workdir: the training run's --workdir.
    which, step: which checkpoint (see `cac_jax.saved_run.load_run`).
    overrides: flat {'eval.flip': True, ...} changes to the saved config
      (an extra evaluator starts from config.eval, so they apply to it too
      where it does not set the field itself).
    evaluator: the name of the evaluator (`cac_jax.evaluators.entries`):
      'val' (the default), or a name of the saved config's eval.extra.
    split: score this split instead of the evaluator's own.

  Returns:
    (scores, class_names, step, entry): `scores` as `scores()` returns,
    `entry` the `cac_jax.evaluators.Entry` that was run.
  """
  from cac_jax import config_lib, datasets, evaluators, paths, saved_run

  config, model, variables, step = saved_run.load_run(workdir, step=step, which=which)
  apply_overrides(config, overrides or {})
  config.data.root = paths.resolve(config.data.root)
  mesh = saved_run.mesh_of(variables)
  batch = int(config.data.eval_batch_size)
  if batch <= 0 or batch % mesh.devices.size or batch % jax.process_count():
    raise config_lib.ConfigError(
      f'data.eval_batch_size={batch} must be a positive multiple of the '
      f'{mesh.devices.size} devices here; pass --config.data.eval_batch_size=N'
    )
  entry = evaluators.find(config, evaluator or evaluators.DEFAULT, kind='miou', split=split)
  with jax.set_mesh(mesh):
    (scorer,) = evaluators.build(config, model, mesh, [entry])
    result = dict(scorer.run(variables))
  return result, datasets.class_names(config.data), step, entry


def evaluate_run(
  workdir: str,
  *,
  which: str = 'best',
  step: int | None = None,
  overrides: dict | None = None,
  evaluator: str | None = None,
  split: str | None = None,
):
  """mIoU of one checkpoint of a run (default: over its whole val set).

  `score_run`'s arguments; returns (scores, class_names, step, config),
  `config` the saved one with the evaluator's eval options.
  """
  result, class_names, step, entry = score_run(
    workdir, which=which, step=step, overrides=overrides, evaluator=evaluator, split=split
  )
  return result, class_names, step, entry.config


def describe(eval_config) -> str:
  """', flip, scales 0.75/1.0, window 64': the non-default prediction options."""
  parts = ['flip'] if eval_config.flip else []
  if tuple(float(s) for s in eval_config.scales) != (1.0,):
    parts.append('scales ' + '/'.join(f'{float(s):g}' for s in eval_config.scales))
  if eval_config.window:
    parts.append(f'window {int(eval_config.window)}')
  return ''.join(f', {p}' for p in parts)


def format_table(result: dict, class_names) -> str:
  """Per-class IoU, pixel accuracy and mIoU, in percent, one per line."""
  width = max([len(n) for n in class_names] + [len('pixel accuracy')])
  lines = [f'{"class":<{width}}  IoU (%)']
  lines += [f'{n:<{width}}  {100 * result[f"iou/{n}"]:7.2f}' for n in class_names]
  lines.append('-' * (width + 9))
  lines.append(f'{"pixel accuracy":<{width}}  {100 * result["pixel_acc"]:7.2f}')
  lines.append(f'{"mIoU":<{width}}  {100 * result["miou"]:7.2f}')
  return '\n'.join(lines)


def _define_flags():
  from absl import flags
  from ml_collections import config_flags

  from cac_jax import config_lib, saved_run

  flags.DEFINE_string('workdir', None, 'The training run (holds checkpoints/).')
  flags.DEFINE_enum(
    'which', 'best', saved_run.WHICH, 'best: the highest val mIoU checkpoint; latest: the last one.'
  )
  flags.DEFINE_integer('step', None, 'A specific checkpoint step (overrides --which).')
  flags.DEFINE_string(
    'evaluator',
    'val',
    "An mIoU evaluator of the run's config: 'val' (config.eval.*) or a name of its eval.extra.",
  )
  flags.DEFINE_string(
    'split', None, "Score this split (labeled, unlabeled, val) instead of the evaluator's own."
  )
  # Only the overrides given on the command line are applied, to the config
  # saved in the run; the defaults here are just the schema they parse against.
  config_flags.DEFINE_config_dict(
    'config', config_lib.base_config(), 'Overrides of eval fields: --config.eval.flip=True.'
  )
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  import sys

  from absl import app, flags, logging
  from ml_collections import config_flags

  from cac_jax import config_lib

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from cac_jax import checkpoint as ckpt_lib
  from cac_jax import cli

  f = flags.FLAGS
  cli.quiet_library_noise()
  if not f['verbosity'].present:
    # Orbax logs every file it touches at INFO; the CLI's own output is print.
    logging.set_verbosity(logging.WARNING)
  overrides = config_flags.get_override_values(f['config'])
  try:
    result, class_names, step, entry = score_run(
      f.workdir,
      which=f.which,
      step=f.step,
      overrides=overrides,
      evaluator=f.evaluator,
      split=f.split,
    )
  except config_lib.ConfigError as e:
    # User errors (no checkpoint, bad override, missing data): no stack trace.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except ckpt_lib.CheckpointRestoreError as e:  # a fault: no checkpoint reads back
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  if jax.process_index() == 0:
    print(
      f'checkpoint: {f.workdir} step {step}; {entry.config.data.name} {entry.split}'
      f'{describe(entry.config.eval)}'
    )
    print(format_table(result, class_names))


if __name__ == '__main__':
  from absl import app

  _define_flags()
  app.run(main)
