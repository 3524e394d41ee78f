"""Segment a folder of images with a trained run: palette PNG masks + overlays.

  python -m cac_jax.predict --workdir=<run> --images=<folder or file> \
      --out=<folder> [--which=best|latest] [--step=N] [--[no]flip] \
      [--config.eval.scales=...] [--config.eval.window=N]

For every image `<id>.<ext>` it writes `<out>/<id>.png`, a palette ('P') PNG
whose pixel values are class ids and whose palette is the dataset's colours
(so it opens as a colour picture and reads back as class ids), and
`<out>/<id>_overlay.jpg`, the image beside the mask blended over it.

Inference is the run's scored prediction (docs/method.md §5): the default
evaluator's prediction function (`cac_jax.evaluators`,
`evaluate.make_predict_fn`) with the eval options saved in the run (flip,
scales, sliding window; `--flip` and `--config.eval.*` override them), on
the full image, normalised, reflect-padded bottom/right to a multiple of 8,
scores cropped back to the image. So a mask written here is what
`cac_jax.evaluate` scores for that image. Images are decoded by the training pipeline's own
decoder (`sources.decode_image`: 16-bit PNGs scaled to 8 bits, EXIF
orientation ignored, as in training and evaluation), and processed one at a
time because their sizes differ; jit compiles once per distinct padded size.
Unreadable files are reported and skipped; the last line says
`N predicted, M skipped`. Exit status: 0 if at least one image was predicted,
2 for a user error (no such run or folder, no images found, --out a file),
1 if every image failed.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image

from cac_jax import checkpoint as ckpt_lib
from cac_jax import (
  cli,
  config_lib,
  constants,
  datasets,
  evaluators,
  paths,
  run_dir,
  saved_run,
  visualize,
)
from cac_jax import evaluate as eval_lib

# What the image decoder (TensorFlow's, shared with training) reads.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
MULTIPLE = constants.FEATURE_STRIDE  # eval protocol: pad to a multiple of the stride
MIN_SIDE = MULTIPLE  # reflect padding needs at least this many pixels


class BadImageError(ValueError):
  """A file that cannot be segmented (unreadable, or too small)."""


# ----------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------


def list_images(path: str) -> list[str]:
  """A file -> [it]; a folder -> its files with an image extension, sorted.

  Raises:
    config_lib.ConfigError: `path` does not exist, or the folder holds no image.
  """
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise config_lib.ConfigError(
      f'--images={path} is neither a file nor a folder; pass an image or a folder of images'
    )
  found = [
    os.path.join(path, name)
    for name in sorted(os.listdir(path))
    if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
    and os.path.isfile(os.path.join(path, name))
  ]
  if not found:
    raise config_lib.ConfigError(
      f'no images found in --images={path} (looked for {", ".join(IMAGE_EXTENSIONS)} '
      'files, any case); pass a folder that holds images, or one image'
    )
  return found


def check_out_dir(out: str) -> None:
  """Raises ConfigError unless `out` is, or can be created as, a writable folder."""
  run_dir.check_writable(out, flag='--out', noun='folder')


def output_ids(paths: list[str]) -> list[str]:
  """File stems as output ids; `a.jpg` and `a.png` together become a_jpg, a_png."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  return [
    s if stems.count(s) == 1 else os.path.basename(p).replace('.', '_')
    for s, p in zip(stems, paths)
  ]


def read_image(path: str) -> np.ndarray:
  """uint8 RGB [H, W, 3], decoded as training decodes (`sources.decode_image`).

  Pixels are used as stored: EXIF orientation is ignored, as in training and
  evaluation; 16-bit PNGs are scaled to 8 bits; alpha is dropped.

  Raises:
    BadImageError: unreadable, or a side shorter than 8 pixels.
  """
  import tensorflow as tf  # the shared decoder; only the CLI path needs TF

  from cac_jax.data import sources

  try:
    with open(path, 'rb') as f:
      data = f.read()
    image = sources.decode_image(tf.constant(data), from_files=False).numpy()
  except (OSError, tf.errors.OpError) as e:
    message = getattr(e, 'message', str(e)).strip().splitlines()
    raise BadImageError(
      f'cannot read image ({type(e).__name__}: {message[0] if message else ""})'
    ) from None
  if min(image.shape[:2]) < MIN_SIDE:
    raise BadImageError(
      f'image is {image.shape[0]}x{image.shape[1]}; both sides must be at least {MIN_SIDE} pixels'
    )
  return image


def prepare(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [1, H8, W8, 3]: normalised, reflect-padded.

  H8, W8 are H, W rounded up to a multiple of 8; padding is bottom/right, as
  in `cac_jax.data.pipeline.eval_iterator`, and the normalisation is the
  training pipeline's (`constants.normalize`).
  """
  x = constants.normalize(image.astype(np.float32))
  h, w = image.shape[:2]
  pad_h, pad_w = -h % MULTIPLE, -w % MULTIPLE
  x = np.pad(x, [(0, pad_h), (0, pad_w), (0, 0)], mode='reflect')
  return x[None]


# ----------------------------------------------------------------------------
# Model.
# ----------------------------------------------------------------------------


class Predictor:
  """image uint8 [H, W, 3] -> class-id mask uint8 [H, W], on one device.

  Single images gain nothing from several devices, so the (replicated)
  variables are moved to the first device and the work runs there.
  """

  def __init__(self, model, variables, *, flip: bool = False, scales=(1.0,), window: int = 0):
    self.device = jax.devices()[0]
    self.variables = jax.device_put(variables, self.device)
    scores = eval_lib.make_predict_fn(model, flip=flip, scales=scales, window=window)

    def predict(variables, x):
      return jnp.argmax(scores(variables, {'image': x}), axis=-1).astype(jnp.int32)

    self._predict = jax.jit(predict)

  def __call__(self, image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    x = jax.device_put(prepare(image), self.device)
    pred = np.asarray(self._predict(self.variables, x))[0]
    # Crop the padding away (argmax then crop == crop then argmax).
    return pred[:h, :w].astype(np.uint8)


def dataset_palette(config) -> np.ndarray:
  """uint8 [K, 3]: the dataset's colours from the dataset table (no data read,
  no TensorFlow); the VOC colour map for a dataset this installation lacks."""
  return datasets.palette(config.data)


# ----------------------------------------------------------------------------
# Outputs.
# ----------------------------------------------------------------------------


def save_mask(mask: np.ndarray, palette: np.ndarray, path: str) -> None:
  """Writes a mode-'P' PNG: values = class ids, palette = class colours."""
  full = np.zeros((256, 3), np.uint8)  # 255 (ignore) and unused ids: black
  full[: len(palette)] = palette
  im = Image.fromarray(mask.astype(np.uint8), mode='P')
  im.putpalette(full.reshape(-1).tolist())
  im.save(path)


def save_overlay(
  image: np.ndarray, mask: np.ndarray, palette: np.ndarray, path: str, alpha: float = 0.5
) -> None:
  """Writes image | mask blended over image, as a JPEG."""
  blended = visualize.overlay(image, visualize.colorize(mask, palette), alpha)
  Image.fromarray(visualize.side_by_side(image, blended, gap=4)).save(path, quality=92)


def predict_paths(
  predictor, paths: list[str], out_dir: str, palette: np.ndarray
) -> tuple[int, list[tuple[str, str]]]:
  """Segments each path; writes <id>.png and <id>_overlay.jpg under out_dir.

  Returns:
    (number predicted, [(path, reason) for each skipped file]).
  """
  os.makedirs(out_dir, exist_ok=True)
  done, skipped = 0, []
  for path, image_id in zip(paths, output_ids(paths)):
    try:
      image = read_image(path)
    except BadImageError as e:
      print(f'skipped {path}: {e}', file=sys.stderr)
      skipped.append((path, str(e)))
      continue
    mask = predictor(image)
    mask_path = os.path.join(out_dir, f'{image_id}.png')
    save_mask(mask, palette, mask_path)
    save_overlay(image, mask, palette, os.path.join(out_dir, f'{image_id}_overlay.jpg'))
    print(f'{path} -> {mask_path} ({mask.shape[0]}x{mask.shape[1]})')
    done += 1
  return done, skipped


def run(
  workdir: str,
  images: str,
  out: str,
  *,
  which: str = 'best',
  step: int | None = None,
  flip: bool | None = None,
  overrides: dict | None = None,
) -> int:
  """The CLI's work; returns the exit status (0: at least one image predicted).

  The prediction options are the run's config.eval (the default evaluator's),
  changed by `overrides` ({'eval.window': 0, ...}, as `cac_jax.evaluate`
  takes them) and by `flip` where it is not None.
  """
  workdir, images, out = paths.resolve(workdir), paths.resolve(images), paths.resolve(out)
  image_paths = list_images(images)
  check_out_dir(out)
  config, model, variables, step = saved_run.load_run(workdir, step=step, which=which)
  eval_lib.apply_overrides(
    config, {**(overrides or {}), **({} if flip is None else {'eval.flip': bool(flip)})}
  )
  options = evaluators.prediction_options(config.eval)
  print(
    f'checkpoint: {workdir} step {step} ({config.model.backbone}, '
    f'{config.data.num_classes} classes){eval_lib.describe(config.eval)}'
  )
  predictor = Predictor(model, variables, **options)
  done, skipped = predict_paths(predictor, image_paths, out, dataset_palette(config))
  print(f'{done} predicted, {len(skipped)} skipped')
  return 0 if done else 1


# ----------------------------------------------------------------------------
# Command line. Flags are defined only when run as a program, so importing
# this module (tests, notebooks) adds nothing to absl's global flags.
# ----------------------------------------------------------------------------


def _define_flags():
  flags.DEFINE_string('workdir', None, 'The training run (holds checkpoints/).')
  flags.DEFINE_string('images', None, 'An image file, or a folder of images.')
  flags.DEFINE_string('out', None, 'Output folder for masks and overlays.')
  flags.DEFINE_enum(
    'which', 'best', saved_run.WHICH, 'best: the highest val mIoU checkpoint; latest: the last one.'
  )
  flags.DEFINE_integer('step', None, 'A specific checkpoint step (overrides --which).')
  flags.DEFINE_bool(
    'flip', None, 'Average with the mirrored image (default: as the run evaluates, its eval.flip).'
  )
  # The run's eval options are the defaults; only those given are applied.
  config_flags.DEFINE_config_dict(
    'config', config_lib.base_config(), 'Overrides of eval fields: --config.eval.window=0.'
  )
  flags.mark_flags_as_required(['workdir', 'images', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  cli.quiet_library_noise()
  if not f['verbosity'].present:
    # Orbax logs every file it touches at INFO; the CLI's own output is print.
    logging.set_verbosity(logging.WARNING)
  try:
    status = run(
      f.workdir,
      f.images,
      f.out,
      which=f.which,
      step=f.step,
      flip=f.flip,
      overrides=config_flags.get_override_values(f['config']),
    )
  except config_lib.ConfigError as e:
    # User errors (no checkpoint, bad path): the message, no stack trace.
    print(f'error: {e}', file=sys.stderr)
    status = 2
  except ckpt_lib.CheckpointRestoreError as e:
    print(f'error: {e}', file=sys.stderr)
    status = 1
  sys.exit(status)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
