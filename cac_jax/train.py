"""train_and_evaluate(config, workdir): the training loop.

Sections: mesh -> model/optimiser/state (restore or init) -> data -> steps ->
loop (log, eval, checkpoint, preemption). The loop is resumable: running the
same command with the same workdir continues from the latest checkpoint and,
because the input stream is indexed by step, sees exactly the batches an
uninterrupted run would.
"""

import contextlib
import json
import os
import signal
import sys
import time

import jax
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath
from jax.experimental import multihost_utils

from cac_jax import checkpoint as ckpt_lib
from cac_jax import config_lib, evaluators, fork, optim, paths, precise_bn, run_dir, sharding
from cac_jax import train_state as state_lib
from cac_jax import train_step as step_lib
from cac_jax.models import build_model


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN/Inf; the last good checkpoint is kept."""


class _Preemption:
  """SIGTERM (what a preemption sends) -> every host saves at the same step, exit 0.

  The loop asks `reached(n)` before its n-th step of this invocation (n = 1,
  2, ...: the same count on every host) and `agree()` at its log points. How
  the hosts agree, without a collective on every step:

  * One process: a Python SIGTERM handler sets a flag, read before each step.
  * Several processes (jax.distributed.initialize): the distributed runtime's
    preemption sync manager. initialize() installs its SIGTERM handler (in
    C++; no Python handler is installed here, as one would replace it); a
    SIGTERM to any host is published through the coordination service, and
    a background thread on every host then computes the sync point: one past
    the largest n that any host has passed to reached_preemption_sync_point.
    Every host keeps stepping until its own count reaches that point, so all
    stop after the same step. Between notices, reached() is a mutex and an
    integer compare on the host: no collective, no device->host fetch. The
    count starts at 1 and each invocation restarts it: the manager's count
    starts at 0, so a SIGTERM during start-up (restore, compilation) sets the
    point at 1 and the loop stops before its first step, as on one process;
    global step numbers would never meet a point computed from 0 after a
    resume.
  * Several processes without that manager (jax_enable_preemption_service
    off, or no jax.distributed client): a Python handler, and the hosts'
    flags all-gathered only at the log points (and once before the loop),
    where the loop already waits for the device to summarise the metrics;
    every host has the same log steps, so all see the same result and stop
    at the same step, at most log_every steps after the SIGTERM instead of
    ~1 s (the runtime's poll interval).
  """

  def __init__(self):
    self.requested = False
    self._agreed = False
    self._runtime = False
    if jax.process_count() > 1 and jax.distributed.is_initialized():
      try:  # 0 is the manager's own start value: a probe that changes nothing
        multihost_utils.reached_preemption_sync_point(0)
        self._runtime = True
      except RuntimeError:  # the preemption service is disabled
        pass
    self._previous = None if self._runtime else signal.signal(signal.SIGTERM, self._handler)

  @property
  def mechanism(self) -> str:
    """How the stopping step is agreed, for the log."""
    if jax.process_count() == 1:
      return 'one process: its own SIGTERM handler'
    if self._runtime:
      return "agreed at the distributed runtime's preemption sync point"
    return 'agreed at a log step: the preemption service is disabled'

  def _handler(self, signum, frame):
    del signum, frame
    self.requested = True

  def agree(self):
    """At a log point (all hosts alike): the fallback's only collective."""
    if jax.process_count() > 1 and not self._runtime:
      flags = multihost_utils.process_allgather(np.int32(self.requested))
      self._agreed = bool(np.max(flags))

  def reached(self, n: int) -> bool:
    """Stop before this invocation's n-th step? Host-only work (see the class)."""
    if self._runtime:
      return multihost_utils.reached_preemption_sync_point(n)
    if jax.process_count() > 1:
      return self._agreed
    return self.requested

  def uninstall(self):
    """Puts back the SIGTERM handler that was there before."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# Profiler annotations of the loop (jax.profiler traces show them by name):
# the loop itself, and each point inside it where the host may wait for the
# device (HOST_SYNC + 'log' | 'eval' | 'checkpoint' | 'preemption').
TRAIN_LOOP = 'cac_jax/train_loop'
HOST_SYNC = 'cac_jax/host_sync:'


class _HostSync:
  """The loop's only device->host points: log, eval, checkpoint (and preemption).

  Between them the host dispatches steps (batch in, state and metrics out as
  device arrays) and never waits for the device, so it runs up to log_every
  steps ahead of it; the metrics are fetched in one go at the log points.
  Each point where it may wait is a `point(kind)` block: a profiler
  annotation (HOST_SYNC + kind), which places every fetch in a trace (the
  test reads them there) and, with a guard level, the only place where
  device->host transfers are allowed.

  guard: None (no guard), or a jax transfer-guard level applied to the
  device->host direction between the points: 'disallow_explicit' makes any
  fetch in the hot path raise (a float(metrics[...]), a jax.device_get),
  'log_explicit' logs each. From train_and_evaluate's `transfer_guard`, or
  the CAC_TRANSFER_GUARD environment variable for the command line. jax
  enforces it where device memory is separate (GPU, TPU); on the CPU backend
  a replicated or single-device array is handed to NumPy without a copy and
  passes unchecked, which is why the CPU test counts fetches in the trace.
  """

  def __init__(self, guard: str | None):
    self.guard = guard or None

  def hot(self):
    """The whole loop: transfers to the host disallowed (with a guard)."""
    if self.guard is None:
      return contextlib.nullcontext()
    return jax.transfer_guard_device_to_host(self.guard)

  @contextlib.contextmanager
  def point(self, kind: str):
    """A point where the host may fetch from (and so wait for) the device."""
    with jax.profiler.TraceAnnotation(HOST_SYNC + kind):
      if self.guard is None:
        yield
      else:
        with jax.transfer_guard_device_to_host('allow'):
          yield


def _write_config(config, workdir):
  if jax.process_index() == 0:
    path = epath.Path(workdir) / 'config.json'
    path.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))


def _log_sizes(config, mesh):
  n_dev, n_proc = mesh.devices.size, jax.process_count()
  d = config.data
  logging.info(
    'mesh: %d devices on %d hosts; global batch labeled=%d '
    'unlabeled=%d -> per host %d+%d, per device %d+%d',
    n_dev,
    n_proc,
    d.labeled_batch_size,
    d.unlabeled_batch_size,
    d.labeled_batch_size // n_proc,
    d.unlabeled_batch_size // n_proc,
    d.labeled_batch_size // n_dev,
    d.unlabeled_batch_size // n_dev,
  )


def _summarise(pending, step, schedule, manager):
  """Host-side mean of the metrics of the steps since the last log.

  Raises NonFiniteLossError if a loss or the gradient norm is NaN/Inf. The
  loop summarises before every checkpoint save, so the state of a bad step
  is never saved.
  """
  fetched = jax.device_get(pending)
  # Steps before unsup_start_step have no DC metrics: average what exists.
  keys = sorted({k for m in fetched for k in m})
  out = {k: float(np.mean([m[k] for m in fetched if k in m])) for k in keys}
  # grad_norm too: the loss is computed before the update, so a step whose
  # gradient overflowed still reports a finite loss while writing inf/NaN
  # into the parameters that the next checkpoint would hold.
  checked = sorted(k for k in out if k.startswith('loss') or k == 'grad_norm')
  if any(not np.isfinite(out[k]) for k in checked):
    latest = manager.latest_step()
    kept = (
      f'the latest checkpoint (step {latest}) predates them and is kept'
      if latest is not None
      else 'no checkpoint was written'
    )
    raise NonFiniteLossError(
      f'non-finite loss in steps {step - len(pending) + 1}..{step} (mean over '
      'these steps): '
      + ', '.join(f'{k}={out[k]}' for k in checked)
      + f'. Stopped without saving; {kept}. Lower optim.lr or check the data, '
      'then rerun to resume from that checkpoint.'
    )
  out['lr'] = float(schedule(step))
  return out


def _init_from(state, config, mesh):
  """Loads pretrained backbone weights (config.init_from) into a fresh state."""
  from cac_jax import backbones, registry
  from cac_jax.models import convert

  path = config.init_from
  if path == 'imagenet':  # validation checked that the backbone has such weights
    source = backbones.get(config.model.backbone).imagenet_path
    path = str(registry.load(source)(fetch=True))
  if not path:
    return state
  variables = convert.merge_backbone(
    {'params': state.params, 'batch_stats': state.batch_stats}, convert.load_backbone(path)
  )
  variables = jax.device_put(variables, sharding.replicated(mesh))
  logging.info('backbone initialised from %s', path)
  return state.replace(params=variables['params'], batch_stats=variables['batch_stats'])


def train_and_evaluate(
  config,
  workdir: str,
  *,
  stop_after: int | None = None,
  stop_at_step: int | None = None,
  transfer_guard: str | None = None,
) -> dict:
  """Trains (or resumes) and evaluates; returns the final eval scores.

  Args:
    config: a validated-on-entry config (see cac_jax/config_lib.py).
    workdir: checkpoints, TensorBoard events and config.json go here; if it
      holds a checkpoint, training resumes from the latest one.
    stop_after: stop (with a checkpoint) after this many steps of this
      invocation; for time-sliced jobs and the resume tests. The schedule is
      unaffected: it always spans config.total_steps.
    stop_at_step: stop (with a checkpoint) once the global step reaches this
      (e.g. a warm-up that other runs fork from: config.fork_from); a rerun
      without it continues. The schedule still spans config.total_steps.
    transfer_guard: a jax transfer-guard level for device->host transfers
      outside the loop's log, eval and checkpoint points (see _HostSync);
      default: the CAC_TRANSFER_GUARD environment variable, else none.
  """
  workdir = paths.resolve(str(workdir))
  paths.resolve_config(config)
  # Installed first, so that a SIGTERM during start-up (restore, compilation)
  # also ends in a clean exit instead of the default kill (on several
  # processes the runtime's handler does this, from jax.distributed.initialize).
  preemption = _Preemption()
  if transfer_guard is None:
    transfer_guard = os.environ.get('CAC_TRANSFER_GUARD')
  try:
    stop = (stop_after, stop_at_step)
    return _train_and_evaluate(config, workdir, stop, preemption, _HostSync(transfer_guard))
  finally:
    preemption.uninstall()


def _train_and_evaluate(config, workdir, stop, preemption, sync):
  """train_and_evaluate's body, run with the SIGTERM handler installed."""
  mesh = sharding.make_mesh()
  config_lib.validate(config, num_devices=mesh.devices.size, num_processes=jax.process_count())
  lead = jax.process_index() == 0
  for warning in config_lib.warnings_for(config):
    logging.warning('%s', warning)
    if lead:
      print(f'warning: {warning}', file=sys.stderr)
  _log_sizes(config, mesh)
  # Nothing is written until the workdir is known to be writable, ours alone,
  # and (if it holds checkpoints) resumable with this config.
  run_dir.check_writable(workdir)
  lock = run_dir.WorkdirLock(workdir, enabled=lead)
  refused = None
  try:
    lock.acquire()
  except config_lib.ConfigError as e:
    refused = e
  if jax.process_count() > 1:  # every host stops cleanly if process 0 was refused
    if multihost_utils.broadcast_one_to_all(np.int32(refused is not None)):
      refused = refused or config_lib.ConfigError(
        f'{workdir} is in use by another training run (process 0 could not take '
        'its lock); wait for it to finish, stop it, or pass another --workdir'
      )
  if refused is not None:
    raise refused
  with lock:
    saved = ckpt_lib.saved_config(workdir)
    if saved is not None:
      changed = run_dir.check_resumable(saved, config, workdir)
      if changed:
        logging.info('resuming with changed settings: %s', ', '.join(changed))
    if config.data.validate:
      from cac_jax.data import validate  # TF only where data is needed

      if validate.check_before_training(config.data, workdir, write_cache=lead):
        logging.info('data checked: every image and mask of the splits is valid')
    _write_config(config, workdir)
    return _train_loop(config, workdir, stop, preemption, sync, mesh)


def _history_path(workdir):
  return epath.Path(workdir) / 'val_history.json'


def _read_history(workdir) -> dict:
  try:
    return {int(k): v for k, v in json.loads(_history_path(workdir).read_text()).items()}
  except (OSError, ValueError):
    return {}


def _write_history(workdir, history: dict) -> None:
  """Replaces <workdir>/val_history.json (process 0), atomically where local."""
  if jax.process_index() != 0:
    return
  path = _history_path(workdir)
  text = json.dumps({str(k): v for k, v in sorted(history.items())}, indent=1)
  if paths.is_remote(str(workdir)):
    path.write_text(text)
    return
  temporary = path.with_name(path.name + '.tmp')
  temporary.write_text(text)
  os.replace(temporary, path)


def _record_eval(workdir, step: int, miou: float, history: dict) -> None:
  """Adds step -> mIoU to the run's val history (kept in val_history.json)."""
  history[int(step)] = float(miou)
  _write_history(workdir, history)


def _train_loop(config, workdir, stop, preemption, sync, mesh):
  """Model, state (restored or new), data, steps and the loop; returns final scores."""
  from cac_jax.data import pipeline  # TF only where data is needed
  from cac_jax.data import sources as sources_lib

  # --- Model, optimiser, state ------------------------------------------------
  num_classes = config.data.num_classes
  model = build_model(config.model, num_classes=num_classes)
  tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
  manager = ckpt_lib.make_manager(workdir, config.keep_checkpoints)
  with jax.set_mesh(mesh):
    if manager.latest_step() is not None:
      abstract = state_lib.abstract_state(model, tx, config, mesh)
      # A damaged newest checkpoint is skipped (and, by process 0, moved aside).
      state, restored_step = ckpt_lib.restore_latest_intact(manager, abstract, workdir=workdir)
      state_shardings = jax.tree.map(lambda x: x.sharding, abstract)
      logging.info('resumed from step %d', restored_step)
    else:
      state, state_shardings = state_lib.create_sharded_state(
        model, tx, config, mesh, jax.random.key(config.seed)
      )
      if config.fork_from:  # another run's state, this run's settings from here on
        abstract = state_lib.abstract_state(model, tx, config, mesh)
        state, _ = fork.forked_state(state, abstract, config)
      else:
        state = _init_from(state, config, mesh)
  start_step = int(jax.device_get(state.step))

  # --- Data ---------------------------------------------------------------------
  # The unlabeled pairs are only built from unsup_start_step on (before it
  # they would be decoded and thrown away); the streams are step-indexed, so
  # switching streams at that step leaves every batch as it was.
  def stream_from(step):
    with_unlabeled = not config.cac.supervised_only and step >= config.cac.unsup_start_step
    return pipeline.train_iterator(
      config, start_step=step, unlabeled=with_unlabeled
    ), with_unlabeled

  train_iter, iter_has_unlabeled = stream_from(start_step)
  if not config.cac.supervised_only:
    sources_lib.get_source(config.data, 'unlabeled')  # a bad split fails now, not later
  # Evaluations after the resume point belong to a timeline that was lost
  # (no checkpoint kept them); they are measured again.
  history = {k: v for k, v in _read_history(workdir).items() if k <= start_step}

  # --- Steps ----------------------------------------------------------------------
  sup_step = step_lib.make_train_step(model, tx, config, state_shardings, with_dc=False)
  dc_step = (
    None
    if config.cac.supervised_only
    else step_lib.make_train_step(model, tx, config, state_shardings, with_dc=True)
  )
  # The default evaluator (val/: its mIoU makes the history and picks the best
  # checkpoint) and config.eval.extra's; a split without masks fails here.
  evals = evaluators.build(config, model, mesh)
  # bn.running_stats='precise': the BN statistics are re-estimated before
  # each evaluation and each save, so a checkpoint holds what was scored.
  bn_stats = precise_bn.Reestimator(config, model, mesh)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  report = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer)

  def run_eval(step):
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    with report.timed('eval'):  # every host computes, process 0 writes
      results = evaluators.run_all(evals, variables)
    evaluators.write(writer, step, results)
    for prefix, values in results.items():
      if 'miou' in values and 'pixel_acc' in values:
        logging.info(
          'step %d: %s mIoU %.4f, pixel acc %.4f', step, prefix, values['miou'], values['pixel_acc']
        )
    scores = {k: v for k, v in results[evaluators.DEFAULT].items() if evaluators.is_scalar(v)}
    _record_eval(workdir, step, scores['miou'], history)
    best_step = max(history, key=lambda k: (history[k], -k))
    scores['best_miou'], scores['best_step'] = history[best_step], best_step
    return scores

  # --- Loop -------------------------------------------------------------------------
  # Between the sync points (log, eval, checkpoint, preemption) the host only
  # dispatches: no metric, step counter or flag is read back from the device
  # there (tests/test_host_loop.py checks a profiler trace of the loop).
  pending, scores = [], None
  timer_images, timer_start, compiled = 0, None, set()
  step = start_step
  logging.info('preemption: %s', preemption.mechanism)
  preemption.agree()  # a SIGTERM during start-up, on any host
  if jax.process_count() > 1:
    # The hosts enter the loop together. They leave start-up at different
    # times (a host that misses the compilation cache compiles for longer),
    # and the first step's collectives would wait for the slowest: on CPU,
    # gloo's rendezvous gives up after 30 s (the per-step all-gather of the
    # preemption flag used to align them here).
    multihost_utils.sync_global_devices('cac_jax: train loop')
  try:
    with jax.set_mesh(mesh), jax.profiler.TraceAnnotation(TRAIN_LOOP), sync.hot():
      stop_after, stop_at_step = stop
      end_step = config.total_steps
      if stop_after is not None:
        end_step = min(end_step, start_step + stop_after)
      if stop_at_step is not None:
        end_step = min(end_step, max(start_step, stop_at_step))
      while step < end_step:
        # Checked before each step, so a SIGTERM that arrived while starting
        # up stops before any work; after step k it saves step k. The count
        # passed is this invocation's, the same on every host (_Preemption).
        if preemption.reached(step - start_step + 1):
          with sync.point('preemption'):
            logging.warning(
              'SIGTERM: saving at step %d and exiting (%s); rerun the same command to resume',
              step,
              preemption.mechanism,
            )
            if pending:
              writer.write_scalars(
                step,
                {f'train/{k}': v for k, v in _summarise(pending, step, schedule, manager).items()},
              )
            if step > start_step:  # else the latest checkpoint already is `step`
              writer.flush()
              state = bn_stats.maybe_reestimate(state)
              ckpt_lib.save(manager, step, state, config)
          break
        use_dc = dc_step is not None and step >= config.cac.unsup_start_step
        fn = dc_step if use_dc else sup_step
        if use_dc and not iter_has_unlabeled:
          train_iter, iter_has_unlabeled = stream_from(step)
        host_batch = next(train_iter)
        if not use_dc:
          host_batch = {'labeled': host_batch['labeled']}
        batch = sharding.to_global(host_batch, mesh)
        state, metrics = fn(state, batch)
        step += 1
        pending.append(metrics)
        if use_dc not in compiled:  # exclude compilation from throughput
          compiled.add(use_dc)
          # A wait (no transfer), on the first step of each kind only.
          jax.block_until_ready(metrics)
          timer_start, timer_images = time.perf_counter(), 0
        else:
          # What this step processed: the labeled batch, and both views of
          # each unlabeled image on DC steps.
          timer_images += config.data.labeled_batch_size + (
            2 * config.data.unlabeled_batch_size if use_dc else 0
          )
        report(step)

        last = step == end_step
        save_now = step % config.checkpoint_every == 0 or last
        if step % config.log_every == 0 or save_now or last:
          with sync.point('log'):
            summary = _summarise(pending, step, schedule, manager)
            pending = []
            elapsed = time.perf_counter() - timer_start
            if timer_images and elapsed > 0:
              summary['images_per_sec'] = timer_images / elapsed
              summary['images_per_sec_per_device'] = summary['images_per_sec'] / mesh.devices.size
            writer.write_scalars(step, {f'train/{k}': v for k, v in summary.items()})
            preemption.agree()
        eval_metrics = None
        if step % config.eval_every == 0 or step == config.total_steps:
          with sync.point('eval'):
            t0 = time.perf_counter()
            state = bn_stats.maybe_reestimate(state)
            scores = run_eval(step)
            eval_metrics = {'miou': scores['miou']}
            timer_start += time.perf_counter() - t0  # pause the clock during eval
        if save_now:
          with sync.point('checkpoint'):
            t0 = time.perf_counter()
            # Metrics first: the TensorBoard writer buffers events (up to 2
            # minutes), and a run killed after this save resumes AFTER `step`,
            # so buffered metrics of steps <= `step` would be lost for good.
            writer.flush()
            state = bn_stats.maybe_reestimate(state)  # as scored, if it was
            ckpt_lib.save(manager, step, state, config, metrics=eval_metrics)
            timer_start += time.perf_counter() - t0
  finally:
    manager.wait_until_finished()
    writer.flush()
  if scores is None and step >= config.total_steps:
    state = bn_stats.maybe_reestimate(state)
    scores = run_eval(step)
  # Each host reads the checksum from its OWN replica of the parameters, so
  # equal prints on all hosts show that the replicas did not drift apart.
  logging.info("params fingerprint (this host's replica): %.10e", params_fingerprint(state.params))
  return scores or {}


def params_fingerprint(params) -> float:
  """sum(|p|) over all parameters, computed from this host's local replica."""
  total = jax.jit(lambda p: sum(jax.numpy.sum(jax.numpy.abs(x)) for x in jax.tree.leaves(p)))(
    params
  )
  return float(np.asarray(total.addressable_data(0)))
