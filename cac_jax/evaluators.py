"""Evaluators: what evaluation measures, built from the config.

An evaluator scores the network's variables on one split with one
prediction protocol and yields (name, value) pairs, in the spirit of
big_vision's evaluators: floats are TensorBoard scalars, uint8
[N, H, W, 3] arrays are TensorBoard images. The training loop writes them
under the evaluator's prefix; `cac_jax.evaluate` and `cac_jax.predict` run
the same code from a checkpoint. The kinds (`KINDS`):

  miou    the exact confusion matrix over the whole split (`cac_jax.evaluate`)
          -> miou, pixel_acc, iou/<class>
  images  input | ground truth | prediction of the split's first images,
          each cropped to its own size -> examples (or examples_<i>)

The config names them (`entries`):

  config.eval.*      the default evaluator, prefix 'val': mIoU on the val
                     split and, with eval.num_images_logged > 0, its images.
                     Its mIoU alone makes the val history and picks the best
                     checkpoint.
  config.eval.extra  optional {name: {'kind': ..., 'split': ..., <option>: ...}}:
                     one more evaluator per name, prefix '<name>'; kind
                     defaults to miou, split to val, and every eval option
                     (flip, scales, window, canvas_multiple,
                     num_images_logged) to config.eval's.

Evaluators with the same prediction options share one `Prediction` (one
prediction function, `evaluate.make_predict_fn`, and its jitted label and
confusion steps), so the images show what is scored.

Adding an evaluation mode: a subclass of `Evaluator` whose `run` yields its
pairs, in a module of its own, named by a config entry's kind as
'package.module:Class' (or added to KINDS under a short name).
"""

import abc
import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cac_jax import config_lib, constants, datasets, evaluate, registry, sharding

DEFAULT = 'val'  # the default evaluator's name and TensorBoard prefix
# Prefixes an extra evaluator cannot take, and what already writes there.
RESERVED = {DEFAULT: 'the default evaluator (config.eval.*)', 'train': 'the training metrics'}
NAME = re.compile(r'[A-Za-z][A-Za-z0-9_]*')


def options() -> tuple[str, ...]:
  """The eval fields an extra entry may override: all of config.eval but `extra`."""
  return tuple(k for k in config_lib.base_config().eval if k != 'extra')


def entry_keys() -> tuple[str, ...]:
  return ('kind', 'split') + options()


def prediction_options(eval_config) -> dict:
  """The options of the prediction function (`evaluate.make_predict_fn`)."""
  return dict(
    flip=bool(eval_config.flip),
    scales=tuple(float(s) for s in eval_config.scales),
    window=int(eval_config.window),
  )


# ----------------------------------------------------------------------------
# Config entries.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Entry:
  """One configured evaluator.

  Attributes:
    prefix: its TensorBoard prefix (DEFAULT for config.eval.*).
    kind: a name in KINDS, or a 'package.module:Class' reference.
    split: the split it scores ('labeled' | 'unlabeled' | 'val').
    config: the run's config with this entry's eval options in config.eval
      (and no eval.extra): what the pipeline and the prediction read.
  """

  prefix: str
  kind: str
  split: str
  config: ml_collections.ConfigDict


def _as_dict(value) -> dict:
  return value.to_dict() if hasattr(value, 'to_dict') else dict(value)


def _with_options(config, overrides: dict) -> ml_collections.ConfigDict:
  """A copy of `config` whose config.eval holds `overrides`, and no extras.

  Raises:
    TypeError: a value of another type than the field's (ConfigDict's check).
  """
  out = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    out.eval[key] = tuple(value) if isinstance(value, list) else value
  out.eval.extra = ml_collections.ConfigDict()
  return out


def entries(config) -> list[Entry]:
  """The evaluators a config asks for: the default ones, then eval.extra by name.

  The default: an mIoU evaluator on val and, with eval.num_images_logged > 0,
  an images evaluator on val, both with the options of config.eval.
  """
  base = _with_options(config, {})
  out = [Entry(DEFAULT, 'miou', 'val', base)]
  if config.eval.num_images_logged > 0:
    out.append(Entry(DEFAULT, 'images', 'val', base))
  extra = config.eval.get('extra') or {}
  for name in sorted(extra.keys()):
    spec = _as_dict(extra[name])
    kind, split = spec.pop('kind', 'miou'), spec.pop('split', 'val')
    out.append(Entry(name, kind, split, _with_options(config, spec)))
  return out


def find(config, name: str = DEFAULT, *, kind: str = 'miou', split: str | None = None) -> Entry:
  """The configured `kind` evaluator `name`, scoring `split` if given.

  Raises:
    ConfigError: no such evaluator, or an unknown split; the message lists
      the allowed values.
  """
  found = [e for e in entries(config) if e.prefix == name and e.kind == kind]
  if not found:
    names = sorted({e.prefix for e in entries(config) if e.kind == kind})
    raise config_lib.ConfigError(
      f'this run has no {kind} evaluator named {name!r}; its {kind} evaluators: '
      f'{", ".join(names)} ({DEFAULT!r} is config.eval.*, the others eval.extra)'
    )
  entry = found[0]
  if split is None:
    return entry
  allowed = _splits()
  if split not in allowed:
    raise config_lib.ConfigError(f'split={split!r} is not one of {", ".join(allowed)}')
  return dataclasses.replace(entry, split=split)


def _splits() -> tuple[str, ...]:
  from cac_jax.data import sources  # TensorFlow: only where a split is named

  return tuple(sources.SPLITS)


def kind_class(kind: str) -> type:
  """The Evaluator subclass of `kind`: a KINDS name or 'package.module:Class'.

  Raises:
    ValueError: neither (the message lists the KINDS names), or a reference
      that does not name an Evaluator subclass.
  """
  if kind in KINDS:
    return KINDS[kind]
  if not isinstance(kind, str) or ':' not in kind:
    raise ValueError(
      f'kind={kind!r} is not one of {", ".join(KINDS)} (or a '
      "'package.module:Class' Evaluator subclass)"
    )
  try:
    cls = registry.load(kind)
  except (ImportError, AttributeError, ValueError) as e:
    raise ValueError(
      f'kind={kind!r} cannot be loaded ({type(e).__name__}: {e}); '
      f'use one of {", ".join(KINDS)} or a module:Class that exists'
    ) from None
  if not (isinstance(cls, type) and issubclass(cls, Evaluator)):
    raise ValueError(f'kind={kind!r} is not a subclass of cac_jax.evaluators.Evaluator')
  return cls


def config_problems(config) -> list[str]:
  """What is wrong with config.eval.extra, one message per problem.

  Each entry's name (its TensorBoard prefix), keys, kind and split are
  checked, and its eval options as config.eval's are
  (`config_lib.eval_option_problems`).
  """
  extra = config.eval.get('extra')
  if not extra:
    return []
  if not hasattr(extra, 'items'):
    return [f'eval.extra={extra!r} must be a dict {{name: {{kind, split, options}}}}']
  problems, allowed_keys, splits = [], entry_keys(), _splits()
  for name in sorted(extra.keys()):
    where, spec = f'eval.extra.{name}', extra[name]
    if not NAME.fullmatch(name):
      problems.append(
        f'{where}: the name is the TensorBoard prefix: letters, digits and '
        '_, starting with a letter'
      )
    if name in RESERVED:
      problems.append(
        f'{where}: the prefix {name!r} is taken by {RESERVED[name]}; choose another name'
      )
    if not hasattr(spec, 'items'):
      problems.append(f'{where}={spec!r} must be a dict of {", ".join(allowed_keys)}')
      continue
    spec = _as_dict(spec)
    unknown = sorted(set(spec) - set(allowed_keys))
    if unknown:
      problems.append(
        f'{where}: unknown key(s) {", ".join(unknown)}; an entry takes {", ".join(allowed_keys)}'
      )
    kind = spec.get('kind', 'miou')
    try:
      kind_class(kind)
    except ValueError as e:
      problems.append(f'{where}.{e}')
    split = spec.get('split', 'val')
    if split not in splits:
      problems.append(f'{where}.split={split!r} is not one of {", ".join(splits)}')
    try:
      merged = _with_options(config, {k: v for k, v in spec.items() if k in options()})
    except (TypeError, ValueError) as e:
      problems.append(f'{where}: {e}')
      continue
    problems += config_lib.eval_option_problems(merged.eval, where)
    if kind == 'images' and merged.eval.num_images_logged <= 0:
      problems.append(
        f'{where}: an images evaluator draws num_images_logged images; set it to at least 1'
      )
  return problems


# ----------------------------------------------------------------------------
# The prediction, and the evaluators.
# ----------------------------------------------------------------------------


class Prediction:
  """One prediction protocol: its function and jitted steps, shared by evaluators.

  Attributes:
    options: flip, scales, window (`prediction_options`).
    predict: (variables, batch) -> class scores [B, H, W, K]
      (`evaluate.make_predict_fn`).
    labels: jit((variables, {'image'[, 'size']}) -> class ids [B, H, W]),
      sharded on 'data'.
    confusion: jit((variables, batch) -> replicated confusion matrix [K, K]).
  """

  def __init__(
    self, model, mesh, num_classes: int, *, flip: bool = False, scales=(1.0,), window: int = 0
  ):
    self.options = dict(flip=bool(flip), scales=tuple(float(s) for s in scales), window=int(window))
    self.predict = evaluate.make_predict_fn(model, **self.options)
    self.labels = jax.jit(
      lambda v, batch: jnp.argmax(self.predict(v, batch), -1),
      out_shardings=sharding.data_sharded(mesh),
    )
    self.confusion = evaluate.make_confusion_step(self.predict, num_classes, mesh)


class Evaluator(abc.ABC):
  """Scores variables on one split; `run` yields (name, value) pairs.

  Built by `build` from an `Entry` and the `Prediction` of its options.
  Every host runs every evaluator (the batches are sharded over all hosts);
  a pair yielded on process 0 alone is fine, as only process 0 writes.
  """

  def __init__(self, entry: Entry, prediction: Prediction, mesh):
    self.prefix, self.kind, self.split = entry.prefix, entry.kind, entry.split
    self.config, self.prediction, self.mesh = entry.config, prediction, mesh
    _check_masks(self.config.data, self.split, self.prefix)

  def batches(self, max_batches: int | None = None):
    """This host's eval batches of the split (`pipeline.eval_iterator`)."""
    from cac_jax.data import pipeline  # TensorFlow only where data is read

    return pipeline.eval_iterator(self.config, split=self.split, max_batches=max_batches)

  @abc.abstractmethod
  def run(self, variables) -> Iterator[tuple[str, Any]]:
    """Yields (name, float) scalars and (name, uint8 [N, H, W, 3]) images."""


def _check_masks(data_config, split: str, prefix: str) -> None:
  """Raises ConfigError if `split` has no masks to score (e.g. VOC's unlabeled)."""
  from cac_jax.data import sources  # TensorFlow only where data is read

  if sources.get_source(data_config, split).labels is None:
    raise config_lib.ConfigError(
      f'evaluator {prefix!r}: the {split} split of {data_config.name} has no masks to '
      'score; evaluate a split that has them (labeled and val always do)'
    )


class MIoU(Evaluator):
  """miou, pixel_acc and iou/<class> from one confusion matrix over the whole split."""

  def run(self, variables):
    k = int(self.config.data.num_classes)
    conf = evaluate.evaluate(self.prediction.confusion, variables, self.batches(), self.mesh, k)
    yield from evaluate.scores(conf, datasets.class_names(self.config.data)).items()


class Images(Evaluator):
  """'examples': input | ground truth | prediction, for the split's first images.

  All hosts run the (sharded) prediction on their share of the first eval
  batch; process 0 draws its first eval.num_images_logged images, each
  cropped to its own size on a shared canvas, in the dataset's palette.
  Equal panel sizes are one stacked image ('examples'), others one image
  each ('examples_<i>'): TensorBoard stacks equal shapes only.
  """

  def run(self, variables):
    from cac_jax import visualize

    host_batch = next(self.batches(max_batches=1))
    inputs = {k: host_batch[k] for k in ('image', 'size') if k in host_batch}
    pred = self.prediction.labels(variables, sharding.to_global(inputs, self.mesh))
    # This host's rows of the global prediction, in order.
    shards = sorted(pred.addressable_shards, key=lambda sh: sh.index[0].start or 0)
    pred = np.concatenate([np.asarray(sh.data) for sh in shards])
    n = min(int(self.config.eval.num_images_logged), int(np.sum(host_batch['valid'])))
    if jax.process_index() != 0 or n == 0:
      return
    palette = datasets.palette(self.config.data)
    panels = []
    for i in range(n):
      h, w = host_batch['size'][i] if 'size' in host_batch else host_batch['image'].shape[1:3]
      pixels = host_batch['image'][i, :h, :w] * constants.PIXEL_STD + constants.PIXEL_MEAN
      panels.append(
        visualize.side_by_side(
          np.clip(np.round(pixels), 0, 255).astype(np.uint8),
          visualize.colorize(host_batch['label'][i, :h, :w], palette),
          visualize.colorize(pred[i, :h, :w], palette),
          gap=2,
        )
      )
    if len({p.shape for p in panels}) == 1:
      yield 'examples', np.stack(panels)
    else:
      for i, panel in enumerate(panels):
        yield f'examples_{i}', panel[None]


KINDS: dict[str, type] = {'miou': MIoU, 'images': Images}


# ----------------------------------------------------------------------------
# What the loop and the tools call.
# ----------------------------------------------------------------------------


def build(config, model, mesh, selected: list[Entry] | None = None) -> list[Evaluator]:
  """The evaluators of `selected` (default: all of `entries(config)`).

  Entries with equal prediction options share one `Prediction`.

  Raises:
    ConfigError: an entry's split has no masks.
  """
  predictions, out = {}, []
  for entry in entries(config) if selected is None else selected:
    options = prediction_options(entry.config.eval)
    key = (options['flip'], options['scales'], options['window'])
    if key not in predictions:
      predictions[key] = Prediction(model, mesh, int(config.data.num_classes), **options)
    out.append(kind_class(entry.kind)(entry, predictions[key], mesh))
  return out


def run_all(evaluators: list[Evaluator], variables) -> dict[str, dict[str, Any]]:
  """{prefix: {name: value}}: every evaluator's pairs, grouped by prefix."""
  results = {}
  for ev in evaluators:
    results.setdefault(ev.prefix, {}).update(ev.run(variables))
  return results


def is_scalar(value) -> bool:
  return np.ndim(value) == 0


def write(writer, step: int, results: dict[str, dict[str, Any]]) -> None:
  """Writes `run_all`'s results: '<prefix>/<name>' scalars and images."""
  for prefix, values in results.items():
    scalars = {f'{prefix}/{k}': float(v) for k, v in values.items() if is_scalar(v)}
    images = {f'{prefix}/{k}': v for k, v in values.items() if not is_scalar(v)}
    if scalars:
      writer.write_scalars(step, scalars)
    if images:
      writer.write_images(step, images)
