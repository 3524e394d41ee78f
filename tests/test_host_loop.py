"""The training loop reads nothing back from the device between its sync points.

A blocking device->host fetch in the hot path (a float(metrics['loss']) per
step, an int(state.step)) makes the host wait for each step to finish before
it dispatches the next, so the device idles while the host prepares a batch.
The loop fetches only at its log, eval and checkpoint points (train._HostSync).

How it is checked: jax annotates every fetch of a jax.Array in the profiler
trace (float/int/bool/np.asarray/.item() go through ArrayImpl._value,
annotated 'np.asarray(jax.Array)'; jax.device_get also starts with
ArrayImpl.copy_to_host_async), and the loop annotates itself
(train.TRAIN_LOOP) and each of its sync points (train.HOST_SYNC + kind). Every
fetch inside the loop must lie in a sync point.

The run also turns on the loop's transfer guard ('disallow_explicit' between
the points), which is what catches such a fetch on a GPU or TPU. It cannot
on the CPU backend: a replicated or single-device array is handed to NumPy
without a copy, unchecked (measured: with the points' 'allow' removed this
run still passes), hence the trace.
"""

import jax
import jax.numpy as jnp

from cac_jax import train
from train_utils import tiny_config

# jax's own annotations of a device->host fetch (jax/_src/array.py).
FETCHES = ('np.asarray(jax.Array)', 'ArrayImpl.copy_to_host_async')


def _trace(fn):
  """fn()'s result and [(name, start_ns, end_ns)] of the host events it traced."""
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0  # annotations only: no per-function events
  with jax.profiler.trace(profiler_options=options) as session:
    result = fn()
  events = [
    (ev.name, ev.start_ns, ev.start_ns + ev.duration_ns)
    for plane in session.profile_data.planes
    if plane.name.startswith('/host')
    for line in plane.lines
    for ev in line.events
  ]
  return result, events


def _fetches(events):
  """{sync-point kind or None (outside every point): fetches} inside the loop."""

  def spans(match):
    return [(n, s, e) for n, s, e in events if match(n)]

  loops = spans(lambda n: n == train.TRAIN_LOOP)
  points = spans(lambda n: n.startswith(train.HOST_SYNC))
  assert loops, 'no loop annotation in the trace'
  out = {}
  for name, start, end in spans(lambda n: n in FETCHES):
    if not any(a <= start and end <= b for _, a, b in loops):
      continue
    kind = next((n[len(train.HOST_SYNC) :] for n, a, b in points if a <= start and end <= b), None)
    out.setdefault(kind, []).append((name, start))
  return out


def test_fetches_outside_a_sync_point_are_found():
  """The check itself: a fetch in the loop but outside a point is reported."""

  def loop():
    x = jax.jit(lambda: jnp.ones(()))()
    with jax.profiler.TraceAnnotation(train.TRAIN_LOOP):
      with jax.profiler.TraceAnnotation(train.HOST_SYNC + 'log'):
        jax.device_get({'loss': x})
      return float(x)  # what a hot-path float(metrics[...]) looks like

  _, events = _trace(loop)
  fetches = _fetches(events)
  assert set(fetches) == {'log', None}, fetches
  assert [n for n, _ in fetches[None]] == ['np.asarray(jax.Array)']


def test_loop_fetches_only_at_log_eval_and_checkpoint_points(tmp_path):
  # tiny.py's 4 steps (DC from step 3), logged and saved at step 4 only:
  # the metrics of steps 1-3 must stay on the device until then. The
  # compiled programs are those of the other tiny runs (same cache entries).
  config = tiny_config(log_every=4, checkpoint_every=4)
  scores, events = _trace(
    lambda: train.train_and_evaluate(
      config, str(tmp_path / 'run'), transfer_guard='disallow_explicit'
    )
  )
  assert 0.0 <= scores['miou'] <= 1.0
  fetches = _fetches(events)
  hot = fetches.pop(None, [])
  assert not hot, f'{len(hot)} device->host fetches between sync points: {hot[:5]}'
  # The check sees the loop's real fetches (so a renamed jax annotation
  # cannot make it pass vacuously): the metrics at log steps, the eval, and
  # the state at checkpoint steps.
  assert {'log', 'eval', 'checkpoint'} <= set(fetches), sorted(fetches)
