"""Shared helpers for the training tests: a tiny config and readers."""
import glob

import numpy as np

from configs import tiny


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
