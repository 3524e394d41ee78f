"""The sweep's records: one JSON file (`<out>_runs.json`) that holds every
finished run of a sweep (its flags, code, machine, wall time, and the val
mIoU and DC-diagnostic curves the report needs).

The records alone make a run finished, so a sweep whose workdirs are gone
(another machine, a fresh clone) reports from them and trains only what is
missing. A warm-up's record also holds a fingerprint of its parameters, the
check that a retrained warm-up is the one its recorded arms forked from, and,
if its seed was retired (`sweep --retire`), when, where and why.
"""

import json
import pathlib
import time

import numpy as np

from cac_jax.bench import ablation

REPO = ablation.REPO
# The train scalars of the CAC arm the report plots over steps (direction 1->2).
DIAGNOSTICS = (
  'dc_loss_gap_12',
  'dc_anchor_label_acc_12',
  'dc_false_neg_rate_12',
  'dc_cos_pos_12',
  'active_frac_12',
)


class SweepError(RuntimeError):
  """The records and the runs disagree; the message says what to do."""


def records_path(args) -> pathlib.Path:
  return REPO / f'{args.out}_runs.json'


def read_records(args) -> dict:
  """{run key: record} of the finished runs (empty if none is recorded)."""
  path = records_path(args)
  return json.loads(path.read_text()) if path.exists() else {}


def write_records(args, records: dict) -> None:
  path = records_path(args)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.json.tmp')
  tmp.write_text(json.dumps(records, indent=1, sort_keys=True))
  tmp.replace(path)  # atomic: an interrupted write leaves the old records


def portable_flags(run, args) -> list[str]:
  """The run's flags with the workdirs root spelled `{workdirs}`, so that records
  made under one root match the plan under another."""
  root = str(REPO / args.workdirs)
  return [f.replace(root, '{workdirs}') for f in run.flags]


def check_records(runs, records: dict, args) -> None:
  """Refuses records that another protocol made (other flags for the same run)."""
  for run in runs:
    rec = records.get(run.key)
    if rec is not None and rec['flags'] != portable_flags(run, args):
      ours, theirs = set(portable_flags(run, args)), set(rec['flags'])
      raise SweepError(
        f'{records_path(args)} records {run.key} with other flags (recorded only: '
        f'{sorted(theirs - ours)}; planned only: {sorted(ours - theirs)}); pass another '
        '--out for this protocol, or delete that record to train the run again'
      )


def backfill(runs, args) -> None:
  """Records the runs whose workdirs are finished but that no record holds yet
  (trained before records existed): their wall time comes from the cost
  ledger those sweeps kept in `<workdirs>/costs.json`, where it is there."""
  records = read_records(args)
  legacy = REPO / args.workdirs / 'costs.json'
  seconds = json.loads(legacy.read_text()) if legacy.exists() else {}
  new = [r for r in runs if r.key not in records and r.finished()]
  for run in new:
    wall = (seconds.get(run.key) or {}).get('seconds')
    records[run.key] = record(run, args, wall, code=None, on=None)
  if new:
    write_records(args, records)


def is_done(run, records: dict) -> bool:
  return run.key in records or run.finished()


def retired_seeds(records: dict) -> set[str]:
  """The warm-up keys of the retired seeds (`sweep --retire`)."""
  return {key for key, rec in records.items() if rec.get('retired')}


def fingerprint(workdir: pathlib.Path, step: int) -> str:
  """sha256 of a checkpoint's params and batch_stats (leaf paths, dtypes and
  bytes): equal exactly when the saved network is equal bit for bit."""
  import hashlib

  import jax

  from cac_jax import saved_run

  _, _, variables, _ = saved_run.load_run(str(workdir), step=step)
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    value = np.asarray(leaf)
    digest.update(f'{jax.tree_util.keystr(path)}:{value.dtype}:{value.shape};'.encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def scalars_of(run, records: dict) -> dict:
  """{tag: [(step, value)]} of the tags the report uses, from the run's record,
  else from its workdir's event files."""
  if run.key in records:
    return {tag: [tuple(p) for p in curve] for tag, curve in records[run.key]['scalars'].items()}
  curves = ablation.read_curves(run.workdir)
  tags = ['val/miou'] + [f'train/{tag}' for tag in DIAGNOSTICS]
  return {tag: curves[tag] for tag in tags if tag in curves}


def record(run, args, seconds: float | None, code: str | None, on: str | None) -> dict:
  """What the report and the cost model need of a finished run; `code` is the
  commit it was trained with and `on` the machine (None: not known)."""
  return {
    'flags': portable_flags(run, args),
    'code': code,
    'seconds': seconds,
    'sup_steps': run.sup_steps,
    'dc_steps': run.dc_steps,
    'parallel': args.parallel,
    'finished_at': time.strftime('%Y-%m-%d %H:%M:%S'),
    'scalars': scalars_of(run, {}),
    'fingerprint': fingerprint(run.workdir, run.end_step) if run.kind == 'warmup' else None,
    'machine': on,
  }


def machine() -> str:
  """The CPU and jaxlib a run was trained with: XLA's float rounding, and so
  a warm-up's fingerprint, may differ between CPUs."""
  import importlib.metadata
  import platform

  info = {}
  try:  # the first processor's block
    for line in pathlib.Path('/proc/cpuinfo').read_text().split('\n\n')[0].splitlines():
      key, _, value = line.partition(':')
      info[key.strip()] = value.strip()
  except OSError:
    pass
  cpu = info.get('model name') or platform.processor() or platform.machine()
  if 'cpu family' in info:
    cpu += f' (family {info["cpu family"]}, model {info.get("model")})'
  if 'flags' in info:
    cpu += ', ' + ('AVX-512' if 'avx512f' in info['flags'].split() else 'no AVX-512')
  return f'{cpu}; jaxlib {importlib.metadata.version("jaxlib")}'


def commit() -> str:
  """The repository's commit, with '+changes' if the code (cac_jax/, configs/)
  differs from it; reports and records elsewhere in the tree do not count."""
  import subprocess

  git = lambda *a: subprocess.run(
    ['git', *a], cwd=REPO, capture_output=True, text=True
  ).stdout.strip()
  head = git('rev-parse', '--short', 'HEAD') or 'unknown'
  changed = git('status', '--porcelain', '--untracked-files=no', '--', 'cac_jax', 'configs')
  return head + ('+changes' if changed else '')
