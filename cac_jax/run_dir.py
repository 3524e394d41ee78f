"""The workdir of a training run: writable, owned by one run, and resumable.

Three checks run before a training run writes anything into its workdir:

* `check_writable`: the workdir is (or can be made) a writable directory;
* `WorkdirLock`: one training at a time per workdir, an exclusive `flock` on
  `<workdir>/.lock` that the kernel drops when the holder dies (SIGKILL too),
  so a killed run never blocks its own resume;
* `check_resumable`: a workdir that already holds checkpoints is only resumed
  with a config that can continue them. Fields in `RESUMABLE` (schedule
  length, loop intervals, evaluation options, data location) may change;
  any other difference is refused, naming the keys, before anything is
  written.

Remote workdirs (gs://) are not locked (object stores have no locks) and not
probed; on a pod process 0 takes the lock and tells the other hosts.
"""

import fcntl
import json
import os
import socket
import time

from cac_jax import config_lib, paths

LOCK_NAME = '.lock'
# Config fields that a resumed run may change (prefixes end with '.').
RESUMABLE = (
  'total_steps',
  'log_every',
  'eval_every',
  'checkpoint_every',
  'keep_checkpoints',
  'eval.',
  'data.root',
  'data.eval_batch_size',
  'data.validate',
  'data.class_names',
  'init_from',
  'cac.chunk_size',
  'cac.matmul_dtype',
  'cac.anchor_block',
  'cac.fused_passes',
  'fork_from',
  'fork_step',
)  # read only where a run starts


def check_writable(path: str, *, flag: str = '--workdir', noun: str = 'directory') -> None:
  """Raises ConfigError unless `path` is, or can be created as, a writable directory.

  `flag` and `noun` name it in the message (predict's `--out` is a 'folder').
  """
  if paths.is_remote(path):
    return
  if os.path.exists(path) and not os.path.isdir(path):
    raise config_lib.ConfigError(
      f'{flag}={path} is a file, not a {noun}; pass a {noun} (it is created if missing)'
    )
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f'.write_test.{socket.gethostname()}.{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise config_lib.ConfigError(
      f'{flag}={path} is not a writable {noun} ({type(e).__name__}: '
      f'{e.strerror or e}); pass a {noun} you can write to'
    ) from None


class WorkdirLock:
  """`<workdir>/.lock`, held for the lifetime of a training run (context manager).

  The lock is an exclusive `flock` on the file, kept open for the whole run:
  the kernel releases it when the process ends in any way (SIGKILL included),
  so a crashed run never blocks its own resume, and two starters can never
  both hold it. The file also records host, PID and start of the holder,
  for the message that refuses a second run; it is left in place on exit.
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.path = os.path.join(workdir, LOCK_NAME)
    self.enabled = enabled and not paths.is_remote(workdir)
    self._file = None

  def acquire(self) -> None:
    if not self.enabled or self._file is not None:  # off, or already held
      return
    f = open(self.path, 'a+')
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      try:
        holder = json.loads(f.read() or '{}')
      except ValueError:
        holder = {}
      f.close()
      raise config_lib.ConfigError(
        f'{os.path.dirname(self.path)} is in use by another training run (host '
        f'{holder.get("host", "?")}, PID {holder.get("pid", "?")}, since '
        f'{holder.get("since", "?")}); wait for it to finish, stop it, or pass another '
        '--workdir'
      ) from None
    f.seek(0)
    f.truncate()
    json.dump(
      {
        'host': socket.gethostname(),
        'pid': os.getpid(),
        'since': time.strftime('%Y-%m-%d %H:%M:%S'),
      },
      f,
    )
    f.flush()
    self._file = f

  def release(self) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None

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
    before, after = old.get(key, default.get(key)), new.get(key, default.get(key))
    if before != after and not _same_path(key, before, after):
      (allowed if _resumable(key) else refused).append(key)
  return refused, allowed


def _same_path(key: str, before, after) -> bool:
  """A relative path saved by a run made before paths were resolved, and its
  absolute form now (the same file, if it still ends in the saved path)."""
  if key not in paths.CONFIG_PATH_FIELDS or not isinstance(before, str) or not before:
    return False
  if os.path.isabs(before) or paths.is_remote(before) or not isinstance(after, str):
    return False
  return after.endswith(os.sep + os.path.normpath(before))


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
      f'{", ".join(r + "*" if r.endswith(".") else r for r in RESUMABLE)} may '
      'change when resuming'
    )
  return allowed
