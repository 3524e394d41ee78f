"""Shared helpers for the tests: a tiny config, readers, image writing."""

import glob

import jax
import numpy as np

from configs import tiny

# float32 unit round-off: one rounding is off by at most EPS relative.
EPS = 2.0**-24


def tiny_config(**overrides):
  """configs/tiny.py with dotted-key overrides, e.g. tiny_config(**{'cac.weight': 0})."""
  c = tiny.get_config()
  for key, value in overrides.items():
    target = c
    *path, last = key.split('.')
    for p in path:
      target = target[p]
    target[last] = value
  return c


def read_scalars(workdir, *, images=False):
  """{tag: {step: [values]}} from the TensorBoard event files (clu writes tensors).

  Image summaries (arrays of encoded PNGs) are left out unless `images`.
  """
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util

  out = {}
  for path in glob.glob(f'{workdir}/events.out.tfevents.*'):
    acc = event_accumulator.EventAccumulator(path, size_guidance={'tensors': 0})
    acc.Reload()
    for tag in acc.Tags()['tensors']:
      for ev in acc.Tensors(tag):
        value = tensor_util.make_ndarray(ev.tensor_proto)
        if value.dtype == object:  # images: encoded PNG strings
          if images:
            out.setdefault(tag, {}).setdefault(ev.step, []).append(value)
          continue
        out.setdefault(tag, {}).setdefault(ev.step, []).append(float(np.ravel(value)[0]))
  return out


REPO = __import__('pathlib').Path(__file__).resolve().parents[1]


def assert_updates_close(got, want, init, *, steps, flip_frac, smooth_frac):
  """Parameters of two runs of `steps` updates from `init`, tensor by tensor.

  The error of an update is relative to the terms it sums (the gradients),
  not to the parameter, so each tensor is measured against its own largest
  update max|want - init|, after removing the parameters' own rounding: each
  step rounds p - u to float32 (<= EPS |p| per run), so two runs whose
  updates differ slightly may land up to 2 EPS |p| apart per step.
  - max of the excess <= flip_frac * scale: robust to a ReLU or max-pool
    decision that round-off tipped the other way (see the caller);
  - median <= smooth_frac * scale: the accumulated round-off, which moves
    every element, as would any real bug.
  """

  def check(path, g, w, i):
    g, w, i = (np.asarray(x, np.float64) for x in (g, w, i))
    scale = np.abs(w - i).max()
    excess = np.maximum(np.abs(g - w) - 2 * steps * EPS * np.abs(w), 0.0)
    name = jax.tree_util.keystr(path)
    assert excess.max() <= flip_frac * scale, (name, excess.max(), scale)
    assert np.median(excess) <= smooth_frac * scale, (name, np.median(excess), scale)

  jax.tree_util.tree_map_with_path(check, got, want, init)


def write_image(path, array, palette=None, **kwargs):
  """Saves `array` as an image file (a palette 'P' image with `palette`), making dirs."""
  from PIL import Image

  path.parent.mkdir(parents=True, exist_ok=True)
  if palette is None:
    image = Image.fromarray(array)
  else:
    image = Image.frombytes('P', array.shape[::-1], array.tobytes())
    image.putpalette(np.asarray(palette, np.uint8).ravel().tolist())
  image.save(path, **kwargs)


def restored_state(workdir, config, step=None):
  """The TrainState a run of `config` saved in `workdir` (latest, or `step`), on the host."""
  from cac_jax import checkpoint as ckpt_lib
  from cac_jax import optim, sharding, train_state
  from cac_jax.models import build_model

  model = build_model(config.model, num_classes=config.data.num_classes)
  tx, _ = optim.make_optimizer(config.optim, config.total_steps)
  mesh = sharding.make_mesh()
  manager = ckpt_lib.make_manager(str(workdir), config.keep_checkpoints)
  with jax.set_mesh(mesh):
    state = ckpt_lib.restore(manager, train_state.abstract_state(model, tx, config, mesh), step)
  manager.close()
  return jax.device_get(state)
