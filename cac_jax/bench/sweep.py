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
   setting (the paired difference against DC steps); then the rest (each
   seed's runs together: see below).

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
machine; a retrained warm-up that does not reproduce it blocks its new forks
if recorded arms forked from it (new forks would no longer pair exactly
with the recorded arms): the other runs train, the report is written, and
the command exits with an error naming the blocked runs. Such forks of a
warm-up recorded on another machine are therefore trained last. With no
recorded fork, the new warm-up replaces the record (nothing paired with it
yet).

**Seeds and machines.** Training is chaotic: a warm-up trained on another
CPU differs after 80 steps about as much as another seed's, so a seed's arms
pair only on one machine. The sweep therefore trains all the forks of a
warm-up before it starts another (the seeds whose warm-up this machine has
trained first, then the others in priority order; an arm trained from
scratch has no warm-up and keeps its own place), and `--longest_arms` keeps a
seed at the longest budget within reach (e.g. supervised, CAC and weight 0).
A seed that cannot be finished here (its warm-up recorded on a machine that
is gone) can be retired: `--retire=foreign` (every such seed) or
`--retire=dc<N>/<setting>/seed<K>,...` marks it in the records; its recorded
runs still count, its missing ones are no longer planned, and its cell gets a
new seed, numbered after the cell's last, with the same arms. The report
lists the retired seeds. Undo: delete the `retired` field of that warm-up's
record.

`--config` points the protocol at any config (a folder dataset too: use
`--settings=as_configured`).

This module plans, prices, orders and trains the runs; the records are
`sweep_records.py`, the report and its plots `sweep_report.py`.
"""

import argparse
import collections
import concurrent.futures
import json
import sys
import threading
import time

import numpy as np

from cac_jax.bench import ablation
from cac_jax.bench.sweep_records import (
  SweepError,
  backfill,
  check_records,
  commit,
  is_done,
  machine,
  read_records,
  record,
  records_path,
  retired_seeds,
  write_records,
)
from cac_jax.bench.sweep_report import counted, listed, plots, report, summarise

REPO = ablation.REPO
# Arms whose switch changes the network: they cannot fork from the warm-up.
NOT_FORKABLE = ('no_projector',)
PRIORITY_ARMS = ('supervised', 'cac', 'weight_0')


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

  def __init__(self, workdir, flags, end_step, kind, sup_steps, dc_steps, after=None, extra=False):
    self.workdir, self.flags, self.end_step = workdir, flags, end_step
    self.kind = kind  # 'warmup' | arm name
    self.sup_steps, self.dc_steps = sup_steps, dc_steps  # what this run trains
    self.after = after  # the warm-up it forks from (a Run) or None
    self.extra = extra  # one of the priority cell's extra seeds (or a stand-in for one)

  @property
  def key(self) -> str:
    return str(self.workdir.relative_to(self.workdir.parents[3]))

  def finished(self) -> bool:
    return (self.workdir / 'checkpoints' / str(self.end_step)).is_dir()

  @property
  def seed_key(self) -> str:
    """The key of its seed's warm-up (where a retirement is recorded)."""
    budget, setting, _, seed = self.key.split('/')
    return f'{budget}/{setting}/warmup/{seed}'


def priority_setting(args) -> str:
  """The setting whose longest budget is the priority cell: context_biased if
  it is in `--settings` (the case CAC is designed for), else the first one."""
  return 'context_biased' if 'context_biased' in args.settings else args.settings[0]


def in_priority_cell(dc: int, setting: str, args) -> bool:
  return dc == max(args.dc_steps) and setting == priority_setting(args)


def plan(args, retired=None) -> list[Run]:
  """Every run of the sweep, warm-ups before the arms that fork from them.
  The longest budget trains `--longest_arms` only. The priority cell
  (longest budget, `priority_setting`) runs its priority arms for
  `--priority_seeds` seeds in all where that is more than `--seeds` (not
  when supervised would be their only arm: nothing to pair it with).

  A retired seed (`retired`: warm-up keys; None: those its records mark,
  `to_retire`) keeps its recorded runs and plans no more, and its cell gets a
  new seed, numbered after the cell's last, with the retired seed's arms and
  rank. The numbers follow from the seed counts: other `--seeds` or
  `--priority_seeds` number the stand-ins again (their records stay, named as
  not in the plan)."""
  records = read_records(args)
  if retired is None:
    retired = retired_seeds(records)
  root = REPO / args.workdirs
  runs = []
  for dc in args.dc_steps:
    total = args.unsup_start + dc
    every = args.eval_every or eval_every_for(dc, args.unsup_start)
    here = (args.longest_arms or args.arms) if dc == max(args.dc_steps) else args.arms
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
      extra_arms = [a for a in here if a in PRIORITY_ARMS]
      if not in_priority_cell(dc, setting, args) or extra_arms == ['supervised']:
        extra_arms = []
      count = max(args.seeds, args.priority_seeds) if extra_arms else args.seeds
      seeds = [(s, s >= args.seeds) for s in range(count)]
      where = root / f'dc{dc}' / setting
      for seed, is_extra in seeds:  # grows by one seed per retired seed
        arms = extra_arms if is_extra else here
        common = base + ablation.SETTINGS[setting] + [f'--config.seed={seed}']
        warm = Run(
          where / 'warmup' / f'seed{seed}',
          common + [f'--stop_at_step={args.unsup_start}'],
          args.unsup_start,
          'warmup',
          args.unsup_start,
          0,
          extra=is_extra,
        )
        runs.append(warm)
        if warm.key in retired:
          seeds.append((len(seeds), is_extra))
        for arm in arms:
          flags = common + ablation.ARMS[arm]
          sup = '--config.cac.supervised_only=True' in ablation.ARMS[arm]
          if arm in NOT_FORKABLE:
            run = Run(
              where / arm / f'seed{seed}', flags, total, arm, args.unsup_start, dc, extra=is_extra
            )
          else:
            flags += [
              f'--config.fork_from={warm.workdir}',
              f'--config.fork_step={args.unsup_start}',
            ]
            run = Run(
              where / arm / f'seed{seed}',
              flags,
              total,
              arm,
              dc if sup else 0,
              0 if sup else dc,
              after=warm,
              extra=is_extra,
            )
          if warm.key not in retired or is_done(run, records):
            runs.append(run)
  return runs


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


# --- Order and training --------------------------------------------------------


def prioritise(runs: list[Run], args) -> list[Run]:
  """The priority runs first, each warm-up just before the first run that
  needs it, in tiers (training then keeps each seed's runs together,
  `seeds_together`, so the tiers decide which seed starts next):
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
    budget, setting, _, _ = run.key.split('/')
    if setting != priority_setting(args):
      return 5
    if budget != longest:
      return 3 if run.kind in core else 5
    if run.kind in core:
      return 2 if run.extra else 0
    if run.kind not in PRIORITY_ARMS:
      return 5
    return 4 if run.extra else 1

  return sorted(runs, key=rank)  # stable: warm-ups stay before their forks


_RECORDS_LOCK = threading.Lock()


def train(run: Run, args, forks: tuple[str, ...] = ()) -> float:
  """Trains one run (unless its checkpoint is there), records it and returns
  its wall time. A warm-up trained again must reproduce its recorded
  fingerprint if `forks` (the recorded runs that forked from it) is not empty;
  with no recorded fork nothing pairs with it yet, and its record is replaced."""
  if run.finished():
    return 0.0
  code = commit()  # before training: the tree may change while it runs
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
          f"kept in {aside}. Another CPU can change XLA's float rounding. Retire the seed "
          f'(--retire={run.key.replace("/warmup", "")}: its recorded runs count, a new seed '
          'replaces it), delete the records of this seed to train all its runs again, or '
          'find what changed the numerics'
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


def seeds_together(runs: list[Run]) -> list[Run]:
  """`runs` in order, with each warm-up and all its forks moved together to
  where the first of those forks is, the warm-up leading, and the seeds whose
  warm-up this machine has already trained first of all: a seed's arms pair
  only with a warm-up trained on the same machine, so a sweep spread over
  machines finishes the seeds it has started before starting another (a seed
  cut off can be retired, `to_retire`). A warm-up retrained only for
  low-priority forks (its record holds, its workdir is gone) waits for them."""

  def group(run):
    return (run.after or run).key

  first, started = {}, set()
  for i, r in enumerate(runs):
    if r.kind != 'warmup':
      first.setdefault(group(r), i)
      if r.after is not None and r.after.finished():
        started.add(group(r))
  position = {
    group(r): first.get(group(r), i) - len(runs) * (group(r) in started) for i, r in enumerate(runs)
  }
  return sorted(runs, key=lambda r: (position[group(r)], r.kind != 'warmup'))


def recorded_forks(runs: list[Run], records: dict) -> dict:
  """{warm-up key: the keys of its recorded forks}."""
  forks = collections.defaultdict(list)
  for r in runs:
    if r.after is not None and r.key in records:
      forks[r.after.key].append(r.key)
  return forks


def foreign_last(runs: list[Run], records: dict, forks: dict, here: str):
  """(`runs` in order with the foreign ones last, the foreign ones). A run is
  foreign if its warm-up must be trained again (its workdir is gone, recorded
  arms forked from it) and was recorded on another machine than `here` (or an
  unrecorded one): another CPU rounds differently, so the retrained warm-up
  will likely not reproduce and the run will be blocked. Runs that can pair
  on this machine train first. `forks`: `recorded_forks` of the whole plan."""

  def foreign(run):
    warm = run.after
    return (
      warm is not None
      and warm.key in records
      and bool(forks[warm.key])
      and not warm.finished()
      and records[warm.key].get('machine') != here
    )

  is_foreign = [foreign(r) for r in runs]  # one look at each warm-up's workdir
  late = [r for r, f in zip(runs, is_foreign) if f]
  return [r for r, f in zip(runs, is_foreign) if not f] + late, late


def to_retire(args, retired: set) -> dict:
  """{warm-up key: what its record keeps of the retirement} for `--retire`:
  `foreign` (the seeds with runs still to train that fork from a warm-up
  recorded on another machine, or on one not recorded, which this machine
  would train again and likely not reproduce) or a comma list of
  `dc<N>/<setting>/seed<K>`. `retired`: the seeds retired already."""
  records = read_records(args)
  runs = plan(args, retired)
  planned = {r.key for r in runs}
  missing = collections.defaultdict(list)  # warm-up key: its seed's runs still to train
  for r in runs:
    if r.kind != 'warmup' and not is_done(r, records):
      missing[r.seed_key].append(r.kind)
  here = machine()
  if args.retire == 'foreign':
    _, late = foreign_last(runs, records, recorded_forks(runs, records), here)
    keys = sorted({r.after.key for r in late if not is_done(r, records)})
  else:
    keys = []
    for name in args.retire.split(','):
      parts = name.split('/')
      key = '/'.join(parts[:2] + ['warmup'] + parts[2:]) if len(parts) == 3 else ''
      if key not in planned:
        example = next(k for k in sorted(planned) if '/warmup/' in k).replace('/warmup', '')
        raise SweepError(
          f'--retire={name}: this sweep plans no such seed; name it as '
          f'dc<steps>/<setting>/seed<k> (e.g. {example}), or pass --retire=foreign'
        )
      if key in retired:
        raise SweepError(f'--retire={name}: retired already ({records[key]["retired"]["at"]})')
      if key not in records:
        raise SweepError(
          f'--retire={name}: its warm-up is not recorded (the retirement is kept in '
          'that record); nothing of this seed is lost if the sweep trains it, so let it'
        )
      if not missing[key]:
        raise SweepError(f'--retire={name}: every run of this seed is finished; nothing to retire')
      keys.append(key)
  when = time.strftime('%Y-%m-%d %H:%M:%S')
  return {
    k: {'at': when, 'on': here, 'warmup_on': records[k].get('machine'), 'not_trained': missing[k]}
    for k in keys
  }


def train_all(runs: list[Run], args) -> None:
  """Runs warm-ups before their forks, `--parallel` at a time. Warm-ups known
  only from their records are trained again where a fork still needs them
  (such forks go last where the warm-up was recorded on another machine); a
  retrained warm-up that does not reproduce blocks its own forks only: the
  other runs train, and the sweep then stops with every such error."""
  records = read_records(args)
  needed = {r.after.key for r in runs if r.after is not None and not is_done(r, records)}
  done = {r.key for r in runs if r.finished() or (r.key in records and r.key not in needed)}
  forks = recorded_forks(runs, records)
  todo = [r for r in runs if r.key not in done]
  pending, late = foreign_last(todo, records, forks, machine())
  pending = seeds_together(pending)
  if late:
    machines = sorted({str(records[r.after.key].get('machine')) for r in late})
    print(
      'trained last, as their warm-ups were recorded on another machine '
      f'({"; ".join(machines)}) and may not reproduce here (then they are blocked): '
      f'{counted(len(late), "run")}, {listed([r.key for r in late])}; --retire=foreign '
      'gives their seeds up for new ones',
      flush=True,
    )
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
          blocked.append(f'{e} (not trained: {listed([r.key for r in skipped])})')
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
  parser.add_argument(
    '--longest_arms',
    default='',
    help='the arms at the longest budget, a subset of --arms (default: all of them); '
    "a seed's arms must train on one machine, so keep a seed there within reach",
  )
  parser.add_argument(
    '--retire',
    default='',
    help='give up seeds whose missing runs cannot pair here: foreign (their warm-up '
    'was recorded on another machine) or dc<N>/<setting>/seed<K>,...; kept in the '
    'records: their recorded runs count, a new seed per cell replaces each',
  )
  parser.add_argument('--settings', default='context_biased,frac_1_16')
  parser.add_argument('--parallel', type=int, default=1)
  parser.add_argument('--max_hours', type=float, default=6.0)
  parser.add_argument('--extra', default='', help='more flags for every run, space-separated')
  parser.add_argument('--estimate_only', action='store_true')
  parser.add_argument('--summary_only', action='store_true')
  args = parser.parse_args(argv)
  args.dc_steps = [int(x) for x in args.dc_steps.split(',')]
  args.arms, args.settings = args.arms.split(','), args.settings.split(',')
  args.longest_arms = args.longest_arms.split(',') if args.longest_arms else []  # []: --arms
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
  if args.longest_arms and 'supervised' not in args.longest_arms:
    parser.error('--longest_arms must include supervised (every difference is paired with it)')
  if set(args.longest_arms) - set(args.arms):
    parser.error(f'--longest_arms must be a subset of --arms {args.arms}')
  retired = retired_seeds(read_records(args))
  try:
    runs = plan(args, retired)
    check_records(runs, read_records(args), args)
    backfill(runs, args)
    if args.retire:
      retiring = to_retire(args, retired)
      retired |= set(retiring)
      print(
        f'retiring {counted(len(retiring), "seed")}'
        + (' (not written: --estimate_only)' if args.estimate_only else '')
        + ''.join(
          f'; {k.replace("/warmup", "")} ({", ".join(v["not_trained"])} not trained)'
          for k, v in retiring.items()
        ),
        flush=True,
      )
      if retiring and not args.estimate_only:
        records = read_records(args)
        for key, why in retiring.items():
          records[key]['retired'] = why
        write_records(args, records)
      runs = plan(args, retired)  # with the new seeds that stand in for the retired ones
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
  forks = recorded_forks(runs, records)
  ordered, _ = foreign_last(prioritise(runs, args), records, forks, machine())
  ordered = seeds_together(ordered)
  missing = [r.key for r in ordered if not is_done(r, records)]
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
    'longest_arms': args.longest_arms or args.arms,
    'retired': {r.key: records[r.key]['retired'] for r in runs if r.key in retired},
    'settings': args.settings,
    'config': args.config,
    'extra': args.extra,
    'cost': cost,
    'code': commit(),
    'trained_at': dict(
      sorted(
        collections.Counter(
          str(records[r.key]['code'] or 'unknown') for r in runs if r.key in records
        ).items()
      )
    ),
    'partial': (
      f'{len(missing)} of {len(runs)} runs not finished; next to train: {listed(missing)}'
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
