"""Does CAC beat supervised training here, and does each of its parts matter?

  python -m cac_jax.bench.ablation --out=docs/ablation --settings=frac_1_16,context_biased
  python -m cac_jax.bench.ablation --out=docs/ablation --summary_only   # report only
  python -m cac_jax.bench.ablation --out=docs/ablation --from_json=docs/ablation.json
      # the report again from the curves a JSON report recorded

Trains every arm x seed x setting with `python -m cac_jax.main` (one process
per run, `--parallel` at a time) on the embedded texture dataset, from the
same base config (configs/default.py: MobileNetV2 from ImageNet, crop 64,
4 labeled + 4 unlabeled images, 240 steps, DC loss from step 80), then writes
`<out>.json`, `<out>.md` (per arm and setting: the final and the best val
mIoU, mean +- std over seeds, the step of each run's best, and the paired
difference to supervised with a 95% t-interval over seeds) and `<out>.png`
(val mIoU over steps). The paper reports the best evaluation of a run; both
are given.

Fairness: every arm of a (setting, seed) pair sees the same labeled split,
the same step-indexed data stream, the same initialisation, schedule, number
of steps and evaluation; only the arm's switch differs. Runs are resumable:
a run whose workdir already holds its final checkpoint is not trained again.
"""

import argparse
import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]

# Each arm: config overrides relative to full CAC.
ARMS = {
  'supervised': ['--config.cac.supervised_only=True'],
  'cac': [],
  # The control: the unlabeled passes run (and feed BatchNorm's running
  # statistics) but the DC loss adds no gradient. CAC minus this arm is the
  # DC gradient's effect; this arm minus supervised is the statistics'.
  'weight_0': ['--config.cac.weight=0'],
  # Where evaluation's BatchNorm running statistics come from (config.bn):
  # CAC with the labeled pass's statistics only, CAC and supervised with
  # statistics re-estimated on un-augmented labeled images ("precise BN").
  'bn_labeled': ['--config.bn.running_stats=labeled'],
  'bn_precise': ['--config.bn.running_stats=precise'],
  'supervised_precise': ['--config.cac.supervised_only=True', '--config.bn.running_stats=precise'],
  'no_directional': ['--config.cac.directional=False'],
  'no_neg_filter': ['--config.cac.filter_negatives=False'],
  'vanilla': [
    '--config.cac.directional=False',
    '--config.cac.filter_negatives=False',
    '--config.cac.pos_threshold=0.0',
  ],
  'no_projector': ['--config.model.projector=False'],
  'same_crop': ['--config.data.same_crop=True'],
}
SETTINGS = {
  # 16 of 256 training images labeled (1/16), unbiased context everywhere.
  'frac_1_16': [],
  # Same fraction, but the labeled images show fixed class pairs while the
  # unlabeled and val images do not: the situation CAC is designed for.
  'context_biased': ['--config.data.embedded.context_biased=True'],
  # The config as given (e.g. a folder dataset: `sweep --config=...`).
  'as_configured': [],
}


def base_flags(steps: int, unsup_start: int, eval_every: int):
  return [
    '--config=configs/default.py',
    f'--config.total_steps={steps}',
    f'--config.cac.unsup_start_step={unsup_start}',
    f'--config.eval_every={eval_every}',
    f'--config.checkpoint_every={steps}',
    f'--config.log_every={eval_every}',
    '--config.keep_checkpoints=1',
  ]


def run_one(workdir: pathlib.Path, flags: list[str], steps: int) -> float:
  """Trains one run (unless finished); returns its wall time in seconds."""
  if (workdir / 'checkpoints' / str(steps)).is_dir():
    return 0.0
  workdir.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  with open(workdir / 'log.txt', 'w') as log:
    subprocess.run(
      [sys.executable, '-m', 'cac_jax.main', f'--workdir={workdir}', *flags],
      cwd=REPO,
      stdout=log,
      stderr=subprocess.STDOUT,
      check=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'),
    )
  return time.time() - t0


def read_curves(workdir: pathlib.Path) -> dict:
  """{tag: [(step, value)]} of every scalar TensorBoard tag of a run (clu
  writes tensor summaries; image summaries are skipped)."""
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util

  points = {}
  for path in sorted(workdir.glob('events.out.tfevents.*')):
    acc = event_accumulator.EventAccumulator(str(path), size_guidance={'tensors': 0})
    acc.Reload()
    for tag in acc.Tags()['tensors']:
      for ev in acc.Tensors(tag):
        value = tensor_util.make_ndarray(ev.tensor_proto)
        if value.dtype != object:
          points.setdefault(tag, {})[ev.step] = float(np.ravel(value)[0])
  return {tag: sorted(by_step.items()) for tag, by_step in points.items()}


def summarise(root: pathlib.Path, settings, arms, seeds, steps: int):
  results = {}
  for setting in settings:
    for arm in arms:
      runs = []
      for seed in seeds:
        wd = root / setting / arm / f'seed{seed}'
        if (wd / 'checkpoints' / str(steps)).is_dir():  # finished runs only
          curves = read_curves(wd)  # each run's event files read once
          curve = curves.get('val/miou', [])
          active = curves.get('train/active_frac_12')
          uptime = curves.get('uptime')  # seconds since the (last) start
          runs.append(
            {
              'seed': seed,
              'curve': curve,
              'final_miou': curve[-1][1],
              'active_frac_12_last': active[-1][1] if active else None,
              'uptime_s': uptime[-1][1] if uptime else None,
            }
          )
      results.setdefault(setting, {})[arm] = aggregate(runs)
  return results


def best_of(curve):
  """(best mIoU, its step) of a [(step, mIoU), ...] curve; the earliest on ties."""
  step, value = max(curve, key=lambda sv: (sv[1], -sv[0]))
  return value, step


def aggregate(runs) -> dict:
  """Mean +- std over seeds of the final and the best mIoU (best filled in per run)."""
  for r in runs:
    r['best_miou'], r['best_step'] = best_of(r['curve'])
  out = {'runs': runs}
  for name, key in (('', 'final_miou'), ('best_', 'best_miou')):
    values = np.array([r[key] for r in runs])
    out[f'{name}mean'] = float(values.mean()) if runs else None
    out[f'{name}std'] = float(values.std(ddof=1)) if len(runs) > 1 else 0.0
  return out


def paired_interval(deltas) -> tuple[float, float, float]:
  """(mean, low, high): the 95% t-interval of the mean of paired differences."""
  from scipy import stats

  d = np.asarray(deltas, np.float64)
  if len(d) < 2:
    return float(d.mean()), float('nan'), float('nan')
  half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
  return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def write_outputs(results, out: pathlib.Path, command: str, meta: dict):
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix('.json').write_text(json.dumps({'meta': meta, 'results': results}, indent=1))
  settings = list(results)
  arms = list(results[settings[0]])
  lines = [f'Command: `{command}`', '']
  if meta.get('note'):
    lines += [meta['note'], '']
  lines += [
    'Val mIoU (%), mean ± std over seeds: final (last evaluation) / best '
    f'(best evaluation of each run, as the paper reports) ({meta["seeds"]} seeds, '
    f'{meta["steps"]} steps, DC loss from step {meta["unsup_start"]}).',
    '',
    '| arm | ' + ' | '.join(f'{s}: final / best' for s in settings) + ' |',
    '|---|' + '---|' * len(settings),
  ]

  def cell(r):
    if not r['runs']:
      return 'not run'
    n = '' if len(r['runs']) == meta['seeds'] else f' ({len(r["runs"])} of {meta["seeds"]} seeds)'
    return (
      f'{100 * r["mean"]:.1f} ± {100 * r["std"]:.1f} / '
      f'{100 * r["best_mean"]:.1f} ± {100 * r["best_std"]:.1f}{n}'
    )

  for arm in arms:
    lines.append(f'| {arm} | ' + ' | '.join(cell(results[s][arm]) for s in settings) + ' |')
  lines += [
    '',
    'Per seed: final and best val mIoU (%) with the step of the best, and '
    'the paired difference to the supervised run of the same seed (same '
    'labeled split, data stream and initialisation): mean and 95% '
    't-interval over seeds. "Beats supervised" only where the interval '
    'excludes 0.',
    '',
    '| setting | arm | per seed: final, best @ step | Δ final vs supervised '
    '[95% CI] | Δ best vs supervised [95% CI] |',
    '|---|---|---|---|---|',
  ]
  for setting in settings:
    base = results[setting].get('supervised')
    base_by_seed = {r['seed']: r for r in base['runs']} if base else {}
    for arm in arms:
      runs = results[setting][arm]['runs']
      if not runs:
        continue
      per_seed = '; '.join(
        f'{100 * r["final_miou"]:.1f}, {100 * r["best_miou"]:.1f} @ {r["best_step"]}' for r in runs
      )
      deltas = []
      for key in ('final_miou', 'best_miou'):
        d = [
          100 * (r[key] - base_by_seed[r['seed']][key]) for r in runs if r['seed'] in base_by_seed
        ]
        if arm == 'supervised' or not d:
          deltas.append('–')
          continue
        mean, low, high = paired_interval(d)
        deltas.append(f'{mean:+.1f} [{low:+.1f}, {high:+.1f}]')
      lines.append(f'| {setting} | {arm} | {per_seed} | {deltas[0]} | {deltas[1]} |')
  uptimes = [
    r['uptime_s']
    for s in settings
    for a in arms
    for r in results[s][a]['runs']
    if r.get('uptime_s')
  ]
  if uptimes:
    lines += [
      '',
      f"Training time of the {len(uptimes)} runs (each run's last "
      f'logged `uptime`): {sum(uptimes) / 60:.0f} min in total, '
      f'{min(uptimes) / 60:.1f}–{max(uptimes) / 60:.1f} min per run, with '
      f'{meta.get("parallel", 1)} runs at a time on this machine.',
    ]
  out.with_suffix('.md').write_text('\n'.join(lines) + '\n')

  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
  for ax, setting in zip(axes[0], settings):
    for arm in arms:
      curves = [r['curve'] for r in results[setting][arm]['runs']]
      if not curves:
        continue
      steps = [s for s, _ in curves[0]]
      values = np.array([[v for _, v in c] for c in curves if len(c) == len(steps)])
      mean = 100 * values.mean(0)
      ax.plot(steps, mean, label=arm, lw=2 if arm in ('cac', 'supervised') else 1)
    ax.axvline(meta['unsup_start'], color='gray', ls=':', lw=1)
    ax.set_title(setting)
    ax.set_xlabel('step')
    ax.set_ylabel('val mIoU (%), mean over seeds')
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out.with_suffix('.png'), dpi=110)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='docs/ablation')
  parser.add_argument('--workdirs', default='workdirs/ablation')
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--steps', type=int, default=240)
  parser.add_argument('--unsup_start', type=int, default=80)
  parser.add_argument('--eval_every', type=int, default=40)
  parser.add_argument('--arms', default=','.join(ARMS))
  parser.add_argument('--settings', default=','.join(SETTINGS))
  parser.add_argument('--parallel', type=int, default=2)
  parser.add_argument('--extra', default='', help='more flags for every run, space-separated')
  parser.add_argument(
    '--from_json',
    default='',
    help='train nothing: write the report again from the run curves '
    'recorded in this JSON report (e.g. docs/ablation.json)',
  )
  parser.add_argument(
    '--summary_only',
    action='store_true',
    help='train nothing: write the report from the finished runs '
    '(arms or seeds without one show as "not run" / fewer seeds)',
  )
  args = parser.parse_args()
  if args.from_json:
    return report_from_json(pathlib.Path(args.from_json), REPO / args.out)
  arms, settings = args.arms.split(','), args.settings.split(',')
  seeds = list(range(args.seeds))
  root = REPO / args.workdirs
  jobs = []
  for setting in settings:
    for seed in seeds:
      for arm in arms:
        flags = (
          base_flags(args.steps, args.unsup_start, args.eval_every)
          + SETTINGS[setting]
          + ARMS[arm]
          + [f'--config.seed={seed}']
          + args.extra.split()
        )
        jobs.append((root / setting / arm / f'seed{seed}', flags))
  t0 = time.time()
  if args.summary_only:
    jobs = []
  with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
    futures = {pool.submit(run_one, wd, flags, args.steps): wd for wd, flags in jobs}
    for fut in concurrent.futures.as_completed(futures):
      print(f'{futures[fut].relative_to(root)}: {fut.result():.0f} s', flush=True)
  wall = time.time() - t0
  results = summarise(root, settings, arms, seeds, args.steps)
  meta = {
    'seeds': args.seeds,
    'steps': args.steps,
    'unsup_start': args.unsup_start,
    'wall_time_s': None if args.summary_only else wall,
    'parallel': args.parallel,
    'extra': args.extra,
  }
  command = 'python -m cac_jax.bench.ablation ' + ' '.join(sys.argv[1:])
  meta['command'] = command
  write_outputs(results, REPO / args.out, command, meta)
  print((REPO / args.out).with_suffix('.md').read_text())
  print(f'wall time: {wall / 60:.1f} min')


def report_from_json(source: pathlib.Path, out: pathlib.Path) -> None:
  """Rewrites <out>.{json,md,png} from the curves recorded in a JSON report."""
  saved = json.loads(source.read_text())
  results = {
    setting: {arm: aggregate(r['runs']) for arm, r in arms.items()}
    for setting, arms in saved['results'].items()
  }
  meta = dict(saved['meta'])
  provenance = (
    (
      f' The runs were made by `{meta["runs_made_by"]}`'
      + (f' with the code of {meta["code"]}' if meta.get('code') else '')
      + '.'
    )
    if meta.get('runs_made_by')
    else ''
  )
  meta['note'] = (
    f'Re-rendered from the run curves recorded in {source.name} (no run was repeated).{provenance}'
  )
  command = 'python -m cac_jax.bench.ablation ' + ' '.join(sys.argv[1:])
  write_outputs(results, out, meta.get('command', command), meta)
  print(out.with_suffix('.md').read_text())


if __name__ == '__main__':
  main()
