"""The sweep's report: per (budget, setting) and arm, val mIoU over seeds and
the paired difference to supervised with its 95% t-interval (the summary
`sweep.main` writes as JSON, and the Markdown report), and its plots: the
difference against the number of DC steps, val mIoU over steps, and the CAC
arm's DC diagnostics over steps.
"""

import pathlib

import numpy as np

from cac_jax.bench import ablation
from cac_jax.bench.sweep_records import DIAGNOSTICS, is_done, read_records, scalars_of

# Paired comparisons between two arms that each isolate one switch: (arm,
# base, what the difference measures), reported where both arms have runs.
CONTROLS = (
  ('cac', 'weight_0', 'the DC gradient alone: both arms run the unlabeled passes'),
  ('bn_labeled', 'cac', "CAC's BatchNorm statistics from the labeled pass only, vs all passes"),
  ('bn_precise', 'cac', "CAC's BatchNorm statistics re-estimated before each evaluation"),
  ('supervised_precise', 'supervised', 'precise BatchNorm statistics without the DC loss'),
)
NAMES = {
  'cac': 'CAC',
  'weight_0': 'weight 0',
  'bn_labeled': 'labeled-pass BN',
  'bn_precise': 'precise BN',
  'supervised_precise': 'supervised with precise BN',
  'supervised': 'supervised',
}


def run_result(run, seed: int, last_k: int, records: dict) -> dict:
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


def summarise(runs, args) -> dict:
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
    for setting, cell in results[dc].items():  # arms in --arms order, whichever seed came first
      results[dc][setting] = {arm: cell[arm] for arm in args.arms if arm in cell}
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


def counted(n, word) -> str:
  return f'{n} {word}' + 's' * (n != 1)


def listed(keys, n=6) -> str:
  """The first `n` keys, comma-separated, '...' if there are more."""
  return ', '.join(keys[:n]) + (' ...' if len(keys) > n else '')


def interval(d) -> str:
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
  if meta.get('retired'):
    events = {}  # (where, when): [seed, ...]: one line per retirement
    for key, why in meta['retired'].items():
      seed = (
        f'{key.replace("/warmup", "")} ({", ".join(why["not_trained"])} not trained; '
        f'warm-up on {why["warmup_on"] or "a machine not recorded"})'
      )
      events.setdefault((why['on'], why['at'][:10]), []).append(seed)
    lines += [
      '**Retired seeds** (`--retire`: their recorded runs count; each cell trains a new '
      'seed, numbered after its last, in place of each):',
      '',
      *(f'- on {on}, {at}: ' + '; '.join(seeds) + '.' for (on, at), seeds in events.items()),
      '',
    ]
  if meta.get('longest_arms') and set(meta['longest_arms']) != set(meta.get('arms', ())):
    lines += [
      f'At {max(meta["dc_steps"])} DC steps only {", ".join(meta["longest_arms"])} '
      'are planned (`--longest_arms`).',
      '',
    ]
  if meta.get('unplanned'):
    lines += [
      f'**Not in this report**: {len(meta["unplanned"])} recorded runs that these flags '
      f'do not plan ({listed(meta["unplanned"])}); the flags that made them report them.',
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
          cells.append(interval(d))
        name = arm + (' *scratch*' if not r['runs'][0]['forked'] else '')
        lines.append(f'| {name} | {len(r["runs"])} | ' + ' | '.join(cells) + ' |')
      lines.append('')
      arms = results[dc][setting]
      for arm, base, what in CONTROLS:
        if not (arms.get(arm, {}).get('runs') and arms.get(base, {}).get('runs')):
          continue
        d = {key: deltas(results, dc, setting, arm, key, base=base) for key in _keys(k)}
        if not d['final_miou']:
          continue  # no seed has both
        lines += [
          f'{NAMES[arm]} − {NAMES[base]}, paired ({what}): Δ final '
          f'{interval(d["final_miou"])}, Δ best {interval(d["best_miou"])}, Δ last-k '
          f'{interval(d[f"last{k}_miou"])} ({counted(len(d["final_miou"]), "seed")}).',
          '',
        ]
  if empty:
    lines += ['No finished run yet: ' + '; '.join(empty) + '.', '']
  if meta.get('trained_at'):
    codes = ', '.join(f'{code} ({counted(n, "run")})' for code, n in meta['trained_at'].items())
    lines += [f'Runs (warm-ups included) trained with the code of commit: {codes}.', '']
  if meta.get('cost'):
    c = meta['cost']
    lines += [
      f'Cost: {c["measured_hours"]:.2f} h of training measured over '
      f'{counted(c["measured_runs"], "run")} ({args.parallel} at a time)'
      + (
        f'; {counted(c["todo_runs"], "run")} left, estimated {c["todo_hours"]:.1f} h'
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
    _decorate(ax, fontsize=8)
  _save(fig, out.parent / f'{out.name}_delta.png')
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
      _decorate(ax, fontsize=7)
    _save(fig, out.parent / f'{out.name}{suffix}.png')


def _decorate(ax, fontsize):
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=fontsize)


def _save(fig, path):
  import matplotlib.pyplot as plt

  fig.tight_layout()
  fig.savefig(path, dpi=110)
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
