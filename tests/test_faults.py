"""Fault injection: SIGKILL (also mid-checkpoint-write), SIGTERM, failing
checkpoint writes and non-finite losses.

The kill and SIGTERM tests run the real command line in subprocesses
(`python -m cac_jax.main --config=configs/tiny.py ...`, 8 CPU devices, the
persistent compilation cache) and resume each time with the same command.
What they establish:
  * a resumed run ends bit-identical to an uninterrupted one (CPU);
  * a kill in the middle of an orbax write leaves only a temporary directory,
    which is never restored and is deleted by the next run;
  * no step's metrics are lost: each step's TensorBoard values, over all
    event files, equal the uninterrupted run's (steps after the resume point
    are written again, with the same values).
"""

import errno
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cac_jax import checkpoint as ckpt_lib
from cac_jax import train
from cac_jax.data import pipeline
from train_utils import REPO, read_scalars, restored_state, tiny_config

pytestmark = pytest.mark.slow

TMP_MARK = '.orbax-checkpoint-tmp'
# Wall-clock metrics differ between any two runs; everything else must not.
TIMING_TAGS = ('images_per_sec', 'steps_per_sec', 'uptime')
# 8 steps, checkpoints every 2 (tiny.py), DC loss from step 3; eval only at
# the end (tiny.py's eval_every=4 would add an eval to every run).
OVERRIDES = {'total_steps': 8, 'eval_every': 1000}
FLAGS = ['--config=configs/tiny.py'] + [f'--config.{k}={v}' for k, v in OVERRIDES.items()]


def _env():
  return dict(
    os.environ,
    JAX_NUM_CPU_DEVICES='8',
    TF_CPP_MIN_LOG_LEVEL='3',
    CUDA_VISIBLE_DEVICES='',
    JAX_COMPILATION_CACHE_DIR=str(REPO / '.cache' / 'jax'),
  )


_STARTED = []  # every _Run, so that a failing test leaves no process behind


@pytest.fixture(autouse=True)
def _kill_leftover_processes():
  yield
  while _STARTED:
    proc = _STARTED.pop().proc
    if proc.poll() is None:
      proc.kill()
      proc.wait()


class _Run:
  """One `python -m cac_jax.main` subprocess, its combined output in a file."""

  def __init__(self, workdir, log_path, *flags):
    _STARTED.append(self)
    self.log_path = log_path
    self._stepped, self._checked = False, 0.0
    with open(log_path, 'w') as log:
      self.proc = subprocess.Popen(
        [sys.executable, '-m', 'cac_jax.main', f'--workdir={workdir}', *flags],
        cwd=REPO,
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
      )

  def log(self) -> str:
    return self.log_path.read_text(errors='replace')

  def logged_steps(self) -> list[int]:
    """Steps whose train metrics this process has logged so far."""
    return [int(s) for s in re.findall(r'\] \[(\d+)\] train/', self.log())]

  def stepped(self) -> bool:
    """Has this process logged a train step? (reads the log at most every 20 ms)."""
    if not self._stepped and time.monotonic() - self._checked > 0.02:
      self._checked = time.monotonic()
      self._stepped = bool(self.logged_steps())
    return self._stepped

  def resumed_from(self) -> int | None:
    found = re.findall(r'resumed from step (\d+)', self.log())
    return int(found[0]) if found else None

  def wait_for(self, condition, timeout: float = 400, poll: float = 0.001) -> bool:
    """Polls `condition()` until true (-> True) or the process ends (-> False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if condition():
        return True
      if self.proc.poll() is not None:
        return False
      time.sleep(poll)
    raise TimeoutError(f'timed out; log tail:\n{self.log()[-3000:]}')

  def finish(self, timeout: float = 400) -> int:
    try:
      return self.proc.wait(timeout=timeout)
    finally:
      if self.proc.poll() is None:
        self.proc.kill()


def _listing(ckpt_dir):
  """(finalized steps, names of temporary directories) under checkpoints/."""
  names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
  return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if TMP_MARK in n)


def _untimed(scalars):
  return {tag: steps for tag, steps in scalars.items() if not any(t in tag for t in TIMING_TAGS)}


def test_sigkill_anywhere_then_resume_equals_uninterrupted(tmp_path):
  """Four seeded SIGKILLs (three inside checkpoint writes), resumed each time."""
  reference = tmp_path / 'reference'
  train.train_and_evaluate(tiny_config(**OVERRIDES), str(reference))

  workdir, ckpt_dir = tmp_path / 'killed', tmp_path / 'killed' / 'checkpoints'
  rng = np.random.default_rng(9)
  kills = []  # one dict per kill: what triggered it and what it left on disk
  # in_write twice in a row: the second run starts with the first one's
  # temporary directory still on disk (it must be ignored, then deleted).
  for i, kind in enumerate(['in_write', 'in_write', 'after_step', 'in_write']):
    run = _Run(workdir, tmp_path / f'run{i}.log', *FLAGS)
    previous = kills[-1]['finalized'] if kills else []
    if kind == 'in_write':
      # A few ms into the write of the next checkpoint: a temporary directory
      # exists and the rename that finalizes it has not happened yet. Only
      # after this run's first step: one left by the previous kill (same
      # name, `<step>.orbax-checkpoint-tmp`) lasts until the manager opens.
      fired = run.wait_for(lambda: run.stepped() and _listing(ckpt_dir)[1])
      time.sleep(rng.uniform(0.0, 0.005))
    else:
      # A random moment (0-1.5 s) after a random logged step in 3..5 (DC steps).
      target = int(rng.integers(3, 6))
      fired = run.wait_for(
        lambda: run.logged_steps() and max(run.logged_steps()) >= target, poll=0.05
      )
      time.sleep(rng.uniform(0.0, 1.5))
    run.proc.send_signal(signal.SIGKILL)
    run.finish(timeout=30)
    assert fired, f'run {i} ended before its kill:\n{run.log()[-3000:]}'
    finalized, tmp = _listing(ckpt_dir)
    kills.append(
      {
        'kind': kind,
        'finalized': finalized,
        'tmp': tmp,
        'resumed_from': run.resumed_from(),
        'logged': run.logged_steps(),
      }
    )
    # The run resumed from the newest checkpoint finalized before the
    # previous kill, never from the temporary directory that kill left.
    assert run.resumed_from() == (previous[-1] if previous else None), kills
  print('kills:', kills)
  # At least one kill really happened inside a write (it left a temporary dir).
  assert any(k['tmp'] for k in kills if k['kind'] == 'in_write'), kills

  final = _Run(workdir, tmp_path / 'final.log', *FLAGS)
  assert final.finish() == 0, final.log()[-3000:]
  assert final.resumed_from() == (kills[-1]['finalized'][-1] if kills[-1]['finalized'] else None)
  # Temporary directories are deleted when the next run opens the manager.
  assert _listing(ckpt_dir) == ([6, 8], []), _listing(ckpt_dir)

  # Bit-identical final state (params, BN statistics, momentum, feature bank).
  jax.tree.map(
    np.testing.assert_array_equal,
    *(restored_state(w, tiny_config(**OVERRIDES)) for w in (reference, workdir)),
  )

  # TensorBoard: every (tag, step) of the uninterrupted run is present, and
  # every value written for it, by any of the runs, equals the reference.
  ref, got = _untimed(read_scalars(str(reference))), _untimed(read_scalars(str(workdir)))
  assert sorted(ref['train/loss']) == list(range(1, 9))
  assert set(got) == set(ref)
  for tag, steps in ref.items():
    assert set(got[tag]) == set(steps), tag
    for step, (value,) in steps.items():
      assert all(v == value for v in got[tag][step]), (tag, step, value, got[tag][step])


def test_sigterm_saves_at_current_step_and_exits_0(tmp_path):
  workdir, ckpt_dir = tmp_path / 'run', tmp_path / 'run' / 'checkpoints'
  run = _Run(workdir, tmp_path / 'run0.log', *FLAGS)
  # Step 3 is the first DC step: the feature bank is part of what must survive.
  assert run.wait_for(lambda: 3 in run.logged_steps(), timeout=400, poll=0.05)
  run.proc.send_signal(signal.SIGTERM)
  sent = time.monotonic()
  code = run.finish(timeout=120)
  took = time.monotonic() - sent
  print(f'SIGTERM -> exit in {took:.1f} s')
  assert code == 0, run.log()[-3000:]
  stopped = int(re.findall(r'SIGTERM: saving at step (\d+)', run.log())[0])
  assert 3 <= stopped < 8
  finalized, tmp = _listing(ckpt_dir)
  assert finalized[-1] == stopped and not tmp
  logged = read_scalars(str(workdir))['train/loss']
  assert max(logged) == stopped  # metrics flushed up to the saved step
  assert took < 60  # one step + one save (a few seconds), with a wide margin

  resumed = _Run(workdir, tmp_path / 'run1.log', *FLAGS)
  assert resumed.finish() == 0, resumed.log()[-3000:]
  assert resumed.resumed_from() == stopped
  # Each step logged exactly once across both runs: none lost, none repeated.
  assert {s: len(v) for s, v in read_scalars(str(workdir))['train/loss'].items()} == {
    s: 1 for s in range(1, 9)
  }


def test_checkpoint_dir_gone_mid_run_is_reported(tmp_path):
  """The checkpoints directory is replaced by a file after step 2 was saved."""
  workdir, ckpt_dir = tmp_path / 'run', tmp_path / 'run' / 'checkpoints'
  run = _Run(workdir, tmp_path / 'run.log', '--config=configs/tiny.py')  # 4 steps
  assert run.wait_for(lambda: _listing(ckpt_dir) == ([2], []), timeout=400)
  moved = tmp_path / 'moved'
  os.rename(ckpt_dir, moved)
  ckpt_dir.write_text('not a directory')
  code = run.finish()
  log = run.log()
  assert code == 1, log[-3000:]
  assert 'Traceback' not in log, log[-3000:]
  assert re.search(
    r'error: could not write the checkpoint of step 4 to \S+/checkpoints '
    r'\(\w+Error: .+\); the latest complete checkpoint \(step 2\) is intact',
    log,
  ), log[-3000:]
  # Step 2, untouched, is restorable once the directory is back.
  ckpt_dir.unlink()
  os.rename(moved, ckpt_dir)
  assert _listing(ckpt_dir) == ([2], [])
  assert int(restored_state(workdir, tiny_config()).step) == 2


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
  """The disk fills up in the middle of step 4's write (state written, config not)."""
  workdir = tmp_path / 'run'
  train.train_and_evaluate(tiny_config(), str(workdir), stop_after=2)
  before = restored_state(workdir, tiny_config())

  async def disk_full(self, x, directory):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(ocp.JsonCheckpointHandler, '_save_fn', disk_full)
  with pytest.raises(ckpt_lib.CheckpointWriteError) as e:
    train.train_and_evaluate(tiny_config(), str(workdir))
  message = str(e.value)
  assert 'checkpoint of step 4' in message and 'No space left on device' in message
  assert 'latest complete checkpoint (step 2) is intact' in message
  assert 'rerun the same command to resume' in message
  monkeypatch.undo()

  finalized, _ = _listing(workdir / 'checkpoints')
  assert finalized == [2]  # the partial step 4 is at most a temporary directory
  after = restored_state(workdir, tiny_config())
  jax.tree.map(np.testing.assert_array_equal, before, after)


def test_nan_loss_from_huge_lr_stops_cleanly(tmp_path):
  """lr=1e6: step 2's update is finite but huge (loss 8.7e9), step 3's loss is NaN."""
  workdir = tmp_path / 'run'
  run = _Run(workdir, tmp_path / 'run.log', '--config=configs/tiny.py', '--config.optim.lr=1e6')
  code = run.finish()
  log = run.log()
  assert code == 1, log[-3000:]
  assert 'Traceback' not in log, log[-3000:]
  error = [line for line in log.splitlines() if line.startswith('error: ')]
  assert len(error) == 1, log[-3000:]
  assert 'non-finite loss in steps 3..3' in error[0]
  assert 'loss=nan' in error[0] and 'loss_ce=nan' in error[0] and 'grad_norm=nan' in error[0]
  assert 'the latest checkpoint (step 2) predates them and is kept' in error[0]
  assert _listing(workdir / 'checkpoints') == ([2], [])  # nothing saved after the NaN
  state = restored_state(workdir, tiny_config())
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_nan_in_data_names_the_logged_step_range(tmp_path, monkeypatch):
  """NaN pixels at step 2 with log_every=3: the error names steps 1..3, no checkpoint."""
  real_iterator = pipeline.train_iterator

  def poisoned(config, *, start_step=0, **kwargs):
    for step, batch in enumerate(
      real_iterator(config, start_step=start_step, **kwargs), start=start_step + 1
    ):
      if step == 2:
        batch['labeled']['image'] = np.full_like(batch['labeled']['image'], np.nan)
      yield batch

  monkeypatch.setattr(pipeline, 'train_iterator', poisoned)
  # Supervised steps only (no DC compilation): the check does not depend on it.
  config = tiny_config(**{'log_every': 3, 'checkpoint_every': 4, 'cac.unsup_start_step': 100})
  with pytest.raises(train.NonFiniteLossError) as e:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert 'non-finite loss in steps 1..3' in str(e.value)
  assert 'loss_ce=nan' in str(e.value) and 'no checkpoint was written' in str(e.value)
  assert _listing(tmp_path / 'run' / 'checkpoints') == ([], [])
