"""The workdir of a training run: writable, owned by one run, and resumable.

Three checks run before a training run writes anything into its workdir:

* `check_writable`: the workdir is (or can be made) a writable directory;
* `WorkdirLock`: one training at a time per workdir. The lock file
  `<workdir>/.lock` records host, PID and the PID's start time; a lock whose
  process is gone (same host, PID dead or reused) is stale and taken over,
  so a run killed with SIGKILL never blocks its own resume;
* `check_resumable`: a workdir that already holds checkpoints is only resumed
  with a config that can continue them. Fields in `RESUMABLE` (schedule
  length, loop intervals, evaluation options, data location) may change;
  any other difference is refused, naming the keys, before anything is
  written.

Remote workdirs (gs://) are not locked (no atomic create on object stores)
and not probed; on a pod only process 0 takes the lock.
"""
import json
import os
import socket
import time

from cac_jax import config_lib
from cac_jax import paths

LOCK_NAME = '.lock'
# Config fields that a resumed run may change (prefixes end with '.').
RESUMABLE = ('total_steps', 'log_every', 'eval_every', 'checkpoint_every',
             'keep_checkpoints', 'eval.', 'data.root', 'data.eval_batch_size',
             'data.validate', 'data.class_names', 'init_from', 'cac.chunk_size')


def check_writable(workdir: str) -> None:
  """Raises ConfigError unless `workdir` is, or can be created as, a writable dir."""
  if paths.is_remote(workdir):
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise config_lib.ConfigError(
        f'--workdir={workdir} is a file, not a directory; pass a directory '
        '(it is created if missing)')
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test.{socket.gethostname()}.{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise config_lib.ConfigError(
        f'--workdir={workdir} is not a writable directory ({type(e).__name__}: '
        f'{e.strerror or e}); pass a directory you can write to') from None


def _start_time(pid: int) -> str | None:
  """The start time of process `pid` (clock ticks since boot), None if no such process."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      # The command name (field 2) may hold spaces: split after its ')'.
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return None
    except PermissionError:
      pass
    return ''  # alive, start time unknown (no /proc)


class WorkdirLock:
  """`<workdir>/.lock` held for the lifetime of a training run (context manager)."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.path = os.path.join(workdir, LOCK_NAME)
    self.enabled = enabled and not paths.is_remote(workdir)
    self._held = False

  def _record(self) -> dict:
    pid = os.getpid()
    return {'host': socket.gethostname(), 'pid': pid, 'start': _start_time(pid),
            'since': time.strftime('%Y-%m-%d %H:%M:%S')}

  def _holder_alive(self, holder: dict) -> bool:
    if holder.get('host') != socket.gethostname():
      return True  # cannot check another machine: assume it is running
    start = _start_time(int(holder.get('pid', -1)))
    return start is not None and (start == '' or not holder.get('start')
                                  or start == holder['start'])

  def acquire(self) -> None:
    if not self.enabled:
      return
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        try:
          with open(self.path) as f:
            holder = json.load(f)
        except (OSError, ValueError):
          holder = {}
        if holder and self._holder_alive(holder):
          raise config_lib.ConfigError(
              f'{os.path.dirname(self.path)} is in use by another training run (host '
              f"{holder.get('host')}, PID {holder.get('pid')}, since "
              f"{holder.get('since')}); wait for it to finish, stop it, or pass another "
              f'--workdir. If no such run exists, delete {self.path}') from None
        # Stale (its process is gone) or unreadable (a crash mid-write): take over.
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      with os.fdopen(fd, 'w') as f:
        json.dump(self._record(), f)
      self._held = True
      return
    raise config_lib.ConfigError(f'could not take the lock {self.path}; another run '
                                 'is starting in the same --workdir')

  def release(self) -> None:
    if self._held:
      self._held = False
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


def _flat(tree, prefix=''):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


def _resumable(key: str) -> bool:
  return any(key == r or (r.endswith('.') and key.startswith(r)) for r in RESUMABLE)


def config_differences(saved: dict, config) -> tuple[list[str], list[str]]:
  """(refused, allowed): keys whose value differs between `saved` and `config`.

  Keys missing from `saved` (a run made before the field existed) count as
  equal when `config` holds the schema default. Tuples and lists compare
  equal, as JSON stores tuples as lists.
  """
  new = _flat(json.loads(json.dumps(config.to_dict())))
  old = _flat(saved)
  default = _flat(json.loads(json.dumps(config_lib.base_config().to_dict())))
  refused, allowed = [], []
  for key in sorted(set(new) | set(old)):
    before = old.get(key, default.get(key))
    if before != new.get(key, default.get(key)):
      (allowed if _resumable(key) else refused).append(key)
  return refused, allowed


def check_resumable(saved: dict, config, workdir: str) -> list[str]:
  """Raises ConfigError if `config` cannot resume the checkpoints made with `saved`.

  Returns:
    The changed keys that are allowed (for a log line).
  """
  refused, allowed = config_differences(saved, config)
  if refused:
    old, new = _flat(saved), _flat(json.loads(json.dumps(config.to_dict())))
    changes = ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in refused[:8])
    more = f' (and {len(refused) - 8} more)' if len(refused) > 8 else ''
    raise config_lib.ConfigError(
        f'--workdir={workdir} holds checkpoints of a run with a different config: '
        f'{changes}{more}. These cannot change on resume; pass a new --workdir, or '
        'use the saved values (in the checkpoint and config.json). Only '
        f"{', '.join(r + '*' if r.endswith('.') else r for r in RESUMABLE)} may "
        'change when resuming')
  return allowed
