"""Does CAC beat supervised training, and at what budget? The paired, budget-swept protocol.

  python -m cac_jax.bench.sweep --out=docs/sweep --dc_steps=160,640,2560 \
      --settings=context_biased,frac_1_16 --arms=supervised,cac,weight_0 --seeds=3 \
      --priority_seeds=5
  ... the same flags and --estimate_only   # cost, then exit
  ... the same flags and --summary_only    # report only, from the records

A report made with other flags plans other runs: records that its plan does
not hold are named (and left alone), never silently counted or dropped.

For every budget (DC steps after `--unsup_start`), setting and seed:

1. **Shared warm-up.** One run of the base config trains the supervised
   steps up to `unsup_start` and stops there (`--stop_at_step`), with the
   schedule of the full budget. Every arm of that (budget, setting, seed)
   forks from its checkpoint (`config.fork_from`, cac_jax/fork.py): the
   supervised arm continues it without the unlabeled stream, CAC adds the DC
   loss, the controls change their one switch. The arms therefore share
   initialisation, labeled split, data stream and warm-up exactly and differ
   only after the fork; their curves are the warm-up's evaluations followed by
   their own. Arms that change the network (no_projector) cannot fork and
   train from scratch, with their own warm-up.
2. **Report.** Per arm: final, best (and its step) and the mean of the last
   `--last_k` evaluations of val mIoU, mean +- std over seeds, and the paired
   difference to supervised (same seed) with a 95% t-interval over seeds;
   "beats supervised" only where the interval excludes 0; with the weight-0
   control, CAC - weight 0 paired the same way (the DC gradient alone). Then
   the paired difference against the number of DC steps (`<out>_delta.png`), val mIoU
   over steps (`<out>.png`) and the DC diagnostics of the CAC arm over steps
   (`<out>_diagnostics.png`). Written to `<out>.json` and `<out>.md`.
3. **Cost first.** Every run's wall time goes to its record (below).
   Before training, a per-step cost (start-up + supervised steps + DC steps)
   is fitted to the runs measured so far (the first warm-up, supervised and
   CAC runs of the smallest budget are trained first for this) and the
   remaining runs are priced. If the whole sweep exceeds `--max_hours`, the
   priority runs go first: the context-biased setting at the longest budget
   with the supervised and CAC arms of the first `--seeds` seeds, then
   weight 0; then the same for the seeds up to `--priority_seeds` (a total,
   e.g. 5), trained after the first seeds' runs so that an interrupted sweep
   has those first; then supervised and CAC at the other budgets of that
   setting (the paired difference against DC steps); then the rest.

Runs are resumable (a finished run is never trained again; an interrupted one
continues from its checkpoint), so a sweep can be finished over several
sessions; the report uses finished runs only and marks what is missing.

**Records.** Every finished run is also written to `<out>_runs.json` (its
flags, code, wall time, val mIoU and DC-diagnostic curves), which is small
enough to commit beside the report. The records alone make a run finished:
a sweep whose workdirs are gone (another machine, a fresh clone) reports
from them and trains only what is missing. An arm still to train whose
warm-up checkpoint is gone retrains the warm-up just before it; training is
deterministic on one machine, but another CPU may round differently. The
warm-up's record holds a fingerprint of its parameters (sha256) and the
machine; a retrained warm-up that does not reproduce it stops the sweep if
recorded arms forked from it (new forks would no longer pair exactly with
them), and otherwise replaces the record (nothing paired with it yet).
`--config` points the protocol at any config (a folder dataset too: use
`--settings=as_configured`).
"""

import argparse
import collections
import concurrent.futures
import json
import pathlib
import sys
import threading
import time

import numpy as np

from cac_jax.bench import ablation

REPO = ablation.REPO
# Arms whose switch changes the network: they cannot fork from the warm-up.
NOT_FORKABLE = ('no_projector',)
PRIORITY_ARMS = ('supervised', 'cac', 'weight_0')
DIAGNOSTICS = (
  'dc_loss_gap_12',
  'dc_anchor_label_acc_12',
  'dc_false_neg_rate_12',
  'dc_cos_pos_12',
  'active_frac_12',
)


def eval_every_for(dc_steps: int, unsup_start: int) -> int:
  """4-8 evaluations of the DC phase, at an interval that divides unsup_start
  (so the warm-up evaluates the fork point) or is a multiple of it."""
  if dc_steps >= 8 * unsup_start:
    return unsup_start * (dc_steps // (8 * unsup_start))
  every = unsup_start
  while every % 2 == 0 and dc_steps // every < 4:
    every //= 2
  return every


class Run:
  """One training run of the sweep: its workdir, flags and the steps it ends at."""

  def __init__(self, workdir, flags, end_step, kind, sup_steps, dc_steps, after=None):
    self.workdir, self.flags, self.end_step = workdir, flags, end_step
    self.kind = kind  # 'warmup' | arm name
    self.sup_steps, self.dc_steps = sup_steps, dc_steps  # what this run trains
    self.after = after  # the warm-up it forks from (a Run) or None

  @property
  def key(self) -> str:
    return str(self.workdir.relative_to(self.workdir.parents[3]))

  def finished(self) -> bool:
    return (self.workdir / 'checkpoints' / str(self.end_step)).is_dir()


def priority_setting(args) -> str:
  """The setting whose longest budget is the priority cell: context_biased if
  it is in `--settings` (the case CAC is designed for), else the first one."""
  return 'context_biased' if 'context_biased' in args.settings else args.settings[0]


def in_priority_cell(dc: int, setting: str, args) -> bool:
  return dc == max(args.dc_steps) and setting == priority_setting(args)


def plan(args) -> list[Run]:
  """Every run of the sweep, warm-ups before the arms that fork from them.
  The priority cell (longest budget, `priority_setting`) runs its priority
  arms for `--priority_seeds` seeds in all where that is more than `--seeds`
  (not when supervised would be their only arm: nothing to pair it with)."""
  root = REPO / args.workdirs
  runs = []
  for dc in args.dc_steps:
    total = args.unsup_start + dc
    every = args.eval_every or eval_every_for(dc, args.unsup_start)
    base = [
      '--config=' + args.config,
      f'--config.total_steps={total}',
      f'--config.cac.unsup_start_step={args.unsup_start}',
      f'--config.eval_every={every}',
      f'--config.checkpoint_every={every}',
      f'--config.log_every={every}',
      '--config.keep_checkpoints=1',
      *args.extra,
    ]
    for setting in args.settings:
      extra = [a for a in args.arms if a in PRIORITY_ARMS]
      if not in_priority_cell(dc, setting, args) or extra == ['supervised']:
        extra = []
      for seed in range(max(args.seeds, args.priority_seeds) if extra else args.seeds):
        arms = args.arms if seed < args.seeds else extra
        where = root / f'dc{dc}' / setting
        common = base + ablation.SETTINGS[setting] + [f'--config.seed={seed}']
        warm = Run(
          where / 'warmup' / f'seed{seed}',
          common + [f'--stop_at_step={args.unsup_start}'],
          args.unsup_start,
          'warmup',
          args.unsup_start,
          0,
        )
        runs.append(warm)
        for arm in arms:
          flags = common + ablation.ARMS[arm]
          sup = '--config.cac.supervised_only=True' in ablation.ARMS[arm]
          if arm in NOT_FORKABLE:
            runs.append(Run(where / arm / f'seed{seed}', flags, total, arm, args.unsup_start, dc))
            continue
          flags += [f'--config.fork_from={warm.workdir}', f'--config.fork_step={args.unsup_start}']
          runs.append(
            Run(
              where / arm / f'seed{seed}',
              flags,
              total,
              arm,
              dc if sup else 0,
              0 if sup else dc,
              after=warm,
            )
          )
  return runs


# --- Records ---------------------------------------------------------------------


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


def portable_flags(run: Run, args) -> list[str]:
  """The run's flags with the workdirs root spelled `{workdirs}`, so that records
  made under one root match the plan under another."""
  root = str(REPO / args.workdirs)
  return [f.replace(root, '{workdirs}') for f in run.flags]


def check_records(runs: list[Run], records: dict, args) -> None:
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


def backfill(runs: list[Run], args) -> None:
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


def is_done(run: Run, records: dict) -> bool:
  return run.key in records or run.finished()


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


def scalars_of(run: Run, records: dict) -> dict:
  """{tag: [(step, value)]} of the tags the report uses, from the run's record,
  else from its workdir's event files."""
  if run.key in records:
    return {tag: [tuple(p) for p in curve] for tag, curve in records[run.key]['scalars'].items()}
  curves = ablation.read_curves(run.workdir)
  tags = ['val/miou'] + [f'train/{tag}' for tag in DIAGNOSTICS]
  return {tag: curves[tag] for tag in tags if tag in curves}


def record(run: Run, args, seconds: float | None, code: str | None, on: str | None) -> dict:
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


# --- Cost -----------------------------------------------------------------------


def fit_costs(ledger: dict):
  """(start-up s, s per supervised step, s per DC step) by least squares over
  the measured runs; None until runs of all three shapes are measured."""
  rows = [
    (1.0, r['sup_steps'], r['dc_steps'], r['seconds']) for r in ledger.values() if r.get('seconds')
  ]
  if len(rows) < 3:
    return None
  a = np.array([r[:3] for r in rows], np.float64)
  if np.linalg.matrix_rank(a) < 3:
    return None
  coef, *_ = np.linalg.lstsq(a, np.array([r[3] for r in rows]), rcond=None)
  return tuple(float(max(c, 0.0)) for c in coef)


def price(run: Run, costs) -> float:
  start, per_sup, per_dc = costs
  return start + per_sup * run.sup_steps + per_dc * run.dc_steps


def prioritise(runs: list[Run], args) -> list[Run]:
  """The priority runs first, each warm-up just before the first run that
  needs it, in tiers:
    0. the priority cell (context-biased, longest budget): warm-up,
       supervised and CAC of the first `--seeds` seeds (the main comparison
       gets its interval first);
    1. the weight-0 control for those seeds;
    2. warm-up, supervised and CAC of the cell's extra `--priority_seeds`;
    3. warm-up, supervised and CAC at the setting's other budgets, shortest
       first (the difference against the number of DC steps);
    4. weight 0 for the extra seeds (it only narrows the interval of a
       control that three seeds already measure);
    5. the rest.
  """
  longest = f'dc{max(args.dc_steps)}'
  core = ('warmup', 'supervised', 'cac')

  def rank(run):
    budget, setting, _, seed = run.key.split('/')
    if setting != priority_setting(args):
      return 5
    if budget != longest:
      return 3 if run.kind in core else 5
    extra = int(seed.removeprefix('seed')) >= args.seeds
    if run.kind in core:
      return 2 if extra else 0
    if run.kind not in PRIORITY_ARMS:
      return 5
    return 4 if extra else 1

  return sorted(runs, key=rank)  # stable: warm-ups stay before their forks


# --- Training -------------------------------------------------------------------


_RECORDS_LOCK = threading.Lock()


def train(run: Run, args, forks: tuple[str, ...] = ()) -> float:
  """Trains one run (unless its checkpoint is there), records it and returns
  its wall time. A warm-up trained again must reproduce its recorded
  fingerprint if `forks` (the recorded runs that forked from it) is not empty;
  with no recorded fork nothing pairs with it yet, and its record is replaced."""
  if run.finished():
    return 0.0
  code = _commit()  # before training: the tree may change while it runs
  seconds = ablation.run_one(run.workdir, run.flags, run.end_step)
  new = record(run, args, seconds, code, on=machine())
  with _RECORDS_LOCK:
    records = read_records(args)
    old = records.get(run.key)
    if old is not None and old.get('fingerprint') not in (None, new['fingerprint']):
      if forks:
        # Moved aside (not deleted), so that no later sweep forks from it.
        aside = run.workdir.with_name(f'{run.workdir.name}.unreproduced.{int(time.time())}')
        run.workdir.rename(aside)
        was_on = old.get('machine') or 'a machine not recorded'
        raise SweepError(
          f'the warm-up {run.key}, trained again at code {new["code"]} on '
          f'{new["machine"]}, does not reproduce the parameters recorded in '
          f'{records_path(args)} (code {old["code"]}, on {was_on}), '
          f'so new forks of it would not pair exactly with {", ".join(forks)}; it is '
          f"kept in {aside}. Another CPU can change XLA's float rounding. Delete the "
          'records of this seed to train all its runs again, or find what changed the numerics'
        )
      print(
        f'note: {run.key} does not reproduce its recorded parameters, but no recorded '
        'run forks from it: its record is replaced',
        flush=True,
      )
      replaced = {k: old.get(k) for k in ('code', 'finished_at', 'fingerprint', 'machine')}
      records[run.key] = dict(new, replaced=old.get('replaced', []) + [replaced])
    elif old is not None:  # a warm-up retrained for forks still to run
      if old.get('fingerprint') is None:
        print(
          f'warning: {run.key} has no recorded fingerprint; its new forks pair with '
          'the arms recorded before only if training is reproducible across sessions',
          flush=True,
        )
      old['fingerprint'] = new['fingerprint']
      old.setdefault('retrained', []).append(
        {k: new[k] for k in ('code', 'finished_at', 'machine')}
      )
    else:
      records[run.key] = new
    write_records(args, records)
  return seconds


def warmups_before_first_fork(runs: list[Run]) -> list[Run]:
  """`runs` in order, each warm-up moved to just before the first of them that
  forks from it: a warm-up retrained only for low-priority forks (its record
  holds, its workdir is gone) waits for them instead of going first."""
  first_fork = {}
  for i, r in enumerate(runs):
    if r.after is not None:
      first_fork.setdefault(r.after.key, i)
  position = {
    r.key: first_fork.get(r.key, i) - 0.5 * (r.key in first_fork) for i, r in enumerate(runs)
  }
  return sorted(runs, key=lambda r: position[r.key])


def train_all(runs: list[Run], args) -> None:
  """Runs warm-ups before their forks, `--parallel` at a time. Warm-ups known
  only from their records are trained again where a fork still needs them; a
  retrained warm-up that does not reproduce blocks its own forks only: the
  other runs train, and the sweep then stops with every such error."""
  records = read_records(args)
  needed = {r.after.key for r in runs if r.after is not None and not is_done(r, records)}
  done = {r.key for r in runs if r.finished() or (r.key in records and r.key not in needed)}
  pending = warmups_before_first_fork([r for r in runs if r.key not in done])
  forks = collections.defaultdict(list)  # warm-up key -> its recorded forks
  for r in runs:
    if r.after is not None and r.key in records:
      forks[r.after.key].append(r.key)
  blocked = []
  with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
    running = {}
    while pending or running:
      ready = [r for r in pending if r.after is None or r.after.key in done]
      while ready and len(running) < args.parallel:
        run = ready.pop(0)
        pending.remove(run)
        running[pool.submit(train, run, args, tuple(forks[run.key]))] = run
      if not running:
        raise RuntimeError(
          'runs wait for warm-ups that are not planned: ' + ', '.join(r.key for r in pending)
        )
      finished, _ = concurrent.futures.wait(running, return_when='FIRST_COMPLETED')
      for fut in finished:
        run = running.pop(fut)
        try:
          print(f'{run.key}: {fut.result():.0f} s', flush=True)
        except SweepError as e:
          skipped = [r for r in pending if r.after is not None and r.after.key == run.key]
          pending = [r for r in pending if r not in skipped]
          blocked.append(f'{e} (not trained: {_listed([r.key for r in skipped])})')
          print(f'error: {blocked[-1]}; the other runs go on', flush=True)
          continue
        done.add(run.key)
  if blocked:
    raise SweepError('\n'.join(blocked))


def train_in_order(runs: list[Run], args) -> None:
  """Prices the sweep (measuring the cost model first if needed), then trains
  what is missing, the priority runs first if it is long."""
  if fit_costs(read_records(args)) is None:
    print('measuring the cost model on the first runs of the smallest budget', flush=True)
    train_all(calibration_runs(runs, args), args)
  cost = estimate(runs, args)
  print(f'estimate: {json.dumps(cost)}', flush=True)
  if cost.get('todo_hours') is None or cost['todo_hours'] > args.max_hours:
    print(f'over {args.max_hours} h (or not yet priced): priority runs first', flush=True)
    runs_in_order = prioritise(runs, args)
  else:
    runs_in_order = runs
  train_all(runs_in_order, args)


def estimate(runs: list[Run], args) -> dict:
  records = read_records(args)
  costs = fit_costs(records)
  todo = [r for r in runs if not is_done(r, records)]
  if costs is None:
    return {'costs': None, 'todo_runs': len(todo)}
  seconds = sum(price(r, costs) for r in todo) / args.parallel
  return {
    'costs': dict(zip(('startup_s', 'per_sup_step_s', 'per_dc_step_s'), costs)),
    'todo_runs': len(todo),
    'todo_hours': seconds / 3600,
  }


def calibration_runs(runs: list[Run], args) -> list[Run]:
  """The first warm-up, supervised and CAC runs of the smallest budget: three
  shapes of (sup steps, DC steps), enough to fit the cost model."""
  smallest = f'dc{min(args.dc_steps)}/'
  first = [r for r in runs if r.key.startswith(smallest)]
  picked = []
  for kind in ('warmup', 'supervised', 'cac'):
    match = [r for r in first if r.kind == kind]
    if match:
      picked.append(match[0])
  return picked


# --- Report ---------------------------------------------------------------------


def run_result(run: Run, seed: int, last_k: int, records: dict) -> dict:
  curves = scalars_of(run, records)
  if run.after is not None:  # the shared warm-up's evaluations come first
    warm = scalars_of(run.after, records).get('val/miou', [])
    fork_step = run.after.end_step
    curve = [p for p in warm if p[0] <= fork_step] + [
      p for p in curves.get('val/miou', []) if p[0] > fork_step
    ]
  else:
    curve = curves.get('val/miou', [])
  diagnostics = {tag: curves.get(f'train/{tag}', []) for tag in DIAGNOSTICS}
  return {
    'seed': seed,
    'curve': curve,
    'final_miou': curve[-1][1],
    f'last{last_k}_miou': float(np.mean([v for _, v in curve[-last_k:]])),
    'diagnostics': diagnostics,
    'forked': run.after is not None,
  }


def summarise(runs: list[Run], args) -> dict:
  """{budget: {setting: {arm: aggregate}}} over finished runs."""
  records = read_records(args)
  results = {}
  for run in runs:
    if run.kind == 'warmup':
      continue
    dc, setting, arm, seed = run.key.split('/')
    cell = results.setdefault(dc, {}).setdefault(setting, {}).setdefault(arm, [])
    if is_done(run, records):
      cell.append(run_result(run, int(seed.removeprefix('seed')), args.last_k, records))
  for dc in results:
    for setting in results[dc]:
      for arm, rs in results[dc][setting].items():
        agg = ablation.aggregate(rs)
        values = np.array([r[f'last{args.last_k}_miou'] for r in rs])
        agg['last_mean'] = float(values.mean()) if rs else None
        agg['last_std'] = float(values.std(ddof=1)) if len(rs) > 1 else 0.0
        results[dc][setting][arm] = agg
  return results


def deltas(results, dc, setting, arm, key, base='supervised'):
  """Paired differences (points) of `arm` to `base` at `key`, per seed."""
  base = {r['seed']: r for r in results[dc][setting].get(base, {}).get('runs', [])}
  return [
    100 * (r[key] - base[r['seed']][key])
    for r in results[dc][setting][arm]['runs']
    if r['seed'] in base
  ]


def _keys(k):
  return ('final_miou', 'best_miou', f'last{k}_miou')


def _count(n, word) -> str:
  return f'{n} {word}' + 's' * (n != 1)


def _listed(keys, n=6) -> str:
  """The first `n` keys, comma-separated, '...' if there are more."""
  return ', '.join(keys[:n]) + (' ...' if len(keys) > n else '')


def _interval(d) -> str:
  """A paired difference (points, per seed) as a report cell: mean and 95%
  t-interval, bold where the interval excludes 0."""
  if not d:
    return '–'
  mean, low, high = ablation.paired_interval(d)
  if len(d) < 2:
    return f'{mean:+.1f} (1 seed: no interval)'
  cell = f'{mean:+.1f} [{low:+.1f}, {high:+.1f}]'
  # No space inside the asterisks: Markdown renders ' **x **' literally.
  return f'**{cell}**' if (low > 0 or high < 0) else cell


def report(results, args, meta) -> str:
  k = args.last_k
  lines = [f'Command: `{meta["command"]}` (code {meta.get("code", "?")})', '']
  if meta.get('partial'):
    lines += [f'**Partial**: {meta["partial"]}', '']
  if meta.get('unplanned'):
    lines += [
      f'**Not in this report**: {len(meta["unplanned"])} recorded runs that these flags '
      f'do not plan ({_listed(meta["unplanned"])}); the flags that made them report them.',
      '',
    ]
  lines += [
    f'Val mIoU (%), mean ± std over seeds of final / best / mean of the last {k} '
    'evaluations, and the paired difference to supervised (same seed: same '
    'initialisation, split, stream and warm-up) with its 95% t-interval. Every '
    f'arm forks from one supervised warm-up of {args.unsup_start} steps per seed '
    '(not the arms marked *scratch*). "Beats supervised" only where an interval '
    'excludes 0. Arms of one table may have different numbers of seeds (the '
    '`seeds` column); compare them through the paired differences, not the means.',
    '',
  ]
  empty = [
    f'{setting} at {dc.removeprefix("dc")} DC steps'
    for dc in results
    for setting in results[dc]
    if not any(r['runs'] for r in results[dc][setting].values())
  ]
  for dc in results:
    for setting in results[dc]:
      if f'{setting} at {dc.removeprefix("dc")} DC steps' in empty:
        continue
      lines += [
        f'### {setting}, {dc.removeprefix("dc")} DC steps',
        '',
        '| arm | seeds | final | best (step) | last-k mean | Δ final [95% CI] | '
        'Δ best [95% CI] | Δ last-k [95% CI] |',
        '|---|---|---|---|---|---|---|---|',
      ]
      for arm, r in results[dc][setting].items():
        if not r['runs']:
          lines.append(f'| {arm} | 0 | not run | | | | | |')
          continue
        steps = ', '.join(str(x['best_step']) for x in r['runs'])
        cells = [
          f'{100 * r["mean"]:.1f} ± {100 * r["std"]:.1f}',
          f'{100 * r["best_mean"]:.1f} ± {100 * r["best_std"]:.1f} ({steps})',
          f'{100 * r["last_mean"]:.1f} ± {100 * r["last_std"]:.1f}',
        ]
        for key in _keys(k):
          d = deltas(results, dc, setting, arm, key) if arm != 'supervised' else []
          cells.append(_interval(d))
        name = arm + (' *scratch*' if not r['runs'][0]['forked'] else '')
        lines.append(f'| {name} | {len(r["runs"])} | ' + ' | '.join(cells) + ' |')
      lines.append('')
      arms = results[dc][setting]
      if arms.get('cac', {}).get('runs') and arms.get('weight_0', {}).get('runs'):
        d = {key: deltas(results, dc, setting, 'cac', key, base='weight_0') for key in _keys(k)}
        lines += [
          'CAC − weight 0, paired (the DC gradient alone: both arms run the unlabeled '
          f'passes): Δ final {_interval(d["final_miou"])}, Δ best {_interval(d["best_miou"])}, '
          f'Δ last-k {_interval(d[f"last{k}_miou"])} ({_count(len(d["final_miou"]), "seed")}).',
          '',
        ]
  if empty:
    lines += ['No finished run yet: ' + '; '.join(empty) + '.', '']
  if meta.get('trained_at'):
    codes = ', '.join(f'{code} ({_count(n, "run")})' for code, n in meta['trained_at'].items())
    lines += [f'Runs (warm-ups included) trained with the code of commit: {codes}.', '']
  if meta.get('cost'):
    c = meta['cost']
    lines += [
      f'Cost: {c["measured_hours"]:.2f} h of training measured over '
      f'{_count(c["measured_runs"], "run")} ({args.parallel} at a time)'
      + (
        f'; {_count(c["todo_runs"], "run")} left, estimated {c["todo_hours"]:.1f} h'
        if c.get('todo_hours') is not None and c['todo_runs']
        else ''
      )
      + '.',
      '',
    ]
  return '\n'.join(lines) + '\n'


def plots(results, out: pathlib.Path, args) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  budgets, settings = list(results), sorted({s for dc in results for s in results[dc]})
  # Paired Δ final vs DC steps, per setting and arm: every seed's difference
  # (dots) and, from 2 seeds on, the mean with its 95% t-interval.
  fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), squeeze=False)
  for ax, setting in zip(axes[0], settings):

    def paired(arm, dc):
      cell = results[dc].get(setting, {})
      return deltas(results, dc, setting, arm, 'final_miou') if arm in cell else []

    # Arms with at least one pair, side by side around each budget's tick;
    # colours by the arm's place in --arms, as in the curves.
    arms = [a for a in args.arms if a != 'supervised' and any(paired(a, dc) for dc in budgets)]
    for i, arm in enumerate(arms):
      color, shift = _color(arm, args), 1 + 0.05 * (i - (len(arms) - 1) / 2)
      xs, ys, lo, hi = [], [], [], []
      for j, dc in enumerate(budgets):
        d, x = paired(arm, dc), int(dc.removeprefix('dc')) * shift
        ax.plot([x] * len(d), d, '.', color=color, alpha=0.5, ms=5, label=None if j else arm)
        if len(d) >= 2:
          mean, low, high = ablation.paired_interval(d)
          xs.append(x), ys.append(mean), lo.append(mean - low), hi.append(high - mean)
      ax.errorbar(xs, ys, yerr=[lo, hi], marker='o', capsize=3, color=color)
    ax.axhline(0, color='gray', lw=1)
    ax.set_xscale('log')
    ax.set_xticks(args.dc_steps, [str(x) for x in args.dc_steps])
    ax.minorticks_off()
    ax.set_xlim(min(args.dc_steps) / 1.6, max(args.dc_steps) * 1.6)
    if not arms:
      ax.text(0.5, 0.6, 'no paired runs finished yet', ha='center', transform=ax.transAxes)
    ax.set_title(setting)
    ax.set_xlabel('DC steps')
    ax.set_ylabel('Δ final val mIoU vs supervised (points)\ndots: seeds; mean, 95% CI')
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out.parent / f'{out.name}_delta.png', dpi=110)
  plt.close(fig)
  # Val mIoU over steps, and the CAC arm's diagnostics, per (budget, setting).
  pairs = [
    (dc, s)
    for dc in budgets
    for s in results[dc]
    if any(r['runs'] for r in results[dc][s].values())
  ] or [(budgets[0], settings[0])]
  for suffix, draw in (('', _draw_curves), ('_diagnostics', _draw_diagnostics)):
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4), squeeze=False)
    for ax, (dc, setting) in zip(axes[0], pairs):
      draw(ax, results[dc][setting], args)
      ax.set_title(f'{setting}, {dc.removeprefix("dc")} DC steps')
      ax.set_xlabel('step')
      ax.grid(alpha=0.3)
      if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.parent / f'{out.name}{suffix}.png', dpi=110)
    plt.close(fig)


def _color(arm, args) -> str:
  return f'C{args.arms.index(arm) % 10}'


def _draw_curves(ax, arms, args):
  for arm, r in arms.items():
    curves = [x['curve'] for x in r['runs']]
    if not curves:
      continue
    steps = [s for s, _ in curves[0]]
    values = np.array([[v for _, v in c] for c in curves if len(c) == len(steps)])
    ax.plot(steps, 100 * values.mean(0), label=arm, color=_color(arm, args))
  ax.axvline(args.unsup_start, color='gray', ls=':', lw=1)
  ax.set_ylabel('val mIoU (%), mean over seeds')


def _draw_diagnostics(ax, arms, args):
  runs = arms.get('cac', {}).get('runs', [])
  for tag in DIAGNOSTICS:
    series = [x['diagnostics'].get(tag) or [] for x in runs]
    series = [s for s in series if s]
    if not series:
      continue
    n = min(len(s) for s in series)
    steps = [p[0] for p in series[0][:n]]
    ax.plot(steps, np.mean([[v for _, v in s[:n]] for s in series], 0), label=tag)
  ax.set_ylabel('CAC arm, mean over seeds')


def _commit() -> str:
  """The repository's commit, with '+changes' if the code (cac_jax/, configs/)
  differs from it; reports and records elsewhere in the tree do not count."""
  import subprocess

  git = lambda *a: subprocess.run(
    ['git', *a], cwd=REPO, capture_output=True, text=True
  ).stdout.strip()
  head = git('rev-parse', '--short', 'HEAD') or 'unknown'
  changed = git('status', '--porcelain', '--untracked-files=no', '--', 'cac_jax', 'configs')
  return head + ('+changes' if changed else '')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='docs/sweep')
  parser.add_argument('--workdirs', default='workdirs/sweep')
  parser.add_argument('--config', default='configs/default.py')
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument(
    '--priority_seeds',
    type=int,
    default=0,
    help='seeds in all for supervised, cac and weight_0 in the priority cell '
    '(the longest budget of context_biased), used if above --seeds',
  )
  parser.add_argument('--dc_steps', default='160,640,2560')
  parser.add_argument('--unsup_start', type=int, default=80)
  parser.add_argument('--eval_every', type=int, default=0, help='0: from the budget')
  parser.add_argument('--last_k', type=int, default=3)
  parser.add_argument('--arms', default=','.join(PRIORITY_ARMS))
  parser.add_argument('--settings', default='context_biased,frac_1_16')
  parser.add_argument('--parallel', type=int, default=1)
  parser.add_argument('--max_hours', type=float, default=6.0)
  parser.add_argument('--extra', default='', help='more flags for every run, space-separated')
  parser.add_argument('--estimate_only', action='store_true')
  parser.add_argument('--summary_only', action='store_true')
  args = parser.parse_args(argv)
  args.dc_steps = [int(x) for x in args.dc_steps.split(',')]
  args.arms, args.settings = args.arms.split(','), args.settings.split(',')
  args.extra = args.extra.split()
  for name, table, given in (
    ('arm', ablation.ARMS, args.arms),
    ('setting', ablation.SETTINGS, args.settings),
  ):
    bad = [g for g in given if g not in table]
    if bad:
      parser.error(f'unknown {name}(s) {bad}; choose from {sorted(table)}')
  if 'supervised' not in args.arms:
    parser.error('the arms must include supervised (every difference is paired with it)')
  runs = plan(args)
  try:
    check_records(runs, read_records(args), args)
    backfill(runs, args)
  except SweepError as e:
    sys.exit(f'error: {e}')
  blocked = None  # runs a non-reproducing warm-up blocked: reported, then the exit
  if not (args.summary_only or args.estimate_only):
    try:
      train_in_order(runs, args)
    except SweepError as e:
      blocked = e
  cost = estimate(runs, args)
  if args.estimate_only:
    print(json.dumps(cost, indent=1))
    return cost
  records = read_records(args)
  measured = [r for r in runs if (records.get(r.key) or {}).get('seconds')]
  cost.update(
    measured_runs=len(measured),
    measured_hours=sum(records[r.key]['seconds'] for r in measured) / 3600,
  )
  missing = [r.key for r in prioritise(runs, args) if not is_done(r, records)]
  unplanned = sorted(set(records) - {r.key for r in runs})
  if unplanned:
    print(f'{len(unplanned)} recorded runs are not in this plan: {unplanned}', flush=True)
  meta = {
    'command': 'python -m cac_jax.bench.sweep ' + ' '.join(sys.argv[1:] if argv is None else argv),
    'dc_steps': args.dc_steps,
    'unsup_start': args.unsup_start,
    'seeds': args.seeds,
    'priority_seeds': max(args.seeds, args.priority_seeds),
    'arms': args.arms,
    'settings': args.settings,
    'config': args.config,
    'extra': args.extra,
    'cost': cost,
    'code': _commit(),
    'trained_at': dict(
      sorted(
        collections.Counter(
          str(records[r.key]['code'] or 'unknown') for r in runs if r.key in records
        ).items()
      )
    ),
    'partial': (
      f'{len(missing)} of {len(runs)} runs not finished; next to train: {_listed(missing)}'
    )
    if missing
    else '',
    'unplanned': unplanned,
  }
  results = summarise(runs, args)
  out = REPO / args.out
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix('.json').write_text(json.dumps({'meta': meta, 'results': results}, indent=1))
  text = report(results, args, meta)
  out.with_suffix('.md').write_text(text)
  plots(results, out, args)
  print(text)
  if blocked is not None:
    sys.exit(f'error: {blocked}')
  return results


if __name__ == '__main__':
  main()
