"""The budget-swept comparison (cac_jax.bench.sweep, sweep_records,
sweep_report): plan, cost model, records, report.

The fork it rests on (a warm-up forked with the same settings is the
uninterrupted run) is tested in test_fork.py; here the runs are stand-ins:
workdirs with a final checkpoint directory and TensorBoard scalars written
by clu, as training writes them.
"""

import collections
import json

import numpy as np
import pytest
from clu import metric_writers

from cac_jax.bench import ablation, sweep, sweep_records, sweep_report


def _args(tmp_path, **kw):
  argv = [
    f'--workdirs={tmp_path / "w"}',
    f'--out={tmp_path / "out" / "sweep"}',
    '--seeds=3',
    '--dc_steps=160,640',
    '--arms=supervised,cac,no_projector',
    '--settings=context_biased',
  ]
  return argv + [f'--{k}={v}' for k, v in kw.items()]


def _parsed(tmp_path, **kw):
  """The args object main() builds, through main's own parser (estimate_only
  trains nothing and returns before any report)."""
  captured = {}
  real_plan = sweep.plan

  def spy(args, *rest):
    captured['args'] = args
    return real_plan(args, *rest)

  sweep.plan = spy
  try:
    sweep.main(_args(tmp_path, **kw) + ['--estimate_only'])
  finally:
    sweep.plan = real_plan
  return captured['args']


def test_eval_interval_evaluates_the_fork_point_and_4_to_8_times():
  for dc, start in ((160, 80), (640, 80), (2560, 80), (100, 50), (24, 8)):
    every = sweep.eval_every_for(dc, start)
    assert start % every == 0 or every % start == 0, (dc, start, every)
    assert 4 <= dc // every <= 8, (dc, start, every)


def test_plan_forks_every_arm_from_its_own_seeds_warmup(tmp_path):
  args = _parsed(tmp_path)
  runs = sweep.plan(args)
  warmups = [r for r in runs if r.kind == 'warmup']
  assert len(warmups) == 2 * 3 and len(runs) == 2 * 3 * 4
  for run in runs:
    if run.kind == 'warmup':
      assert '--stop_at_step=80' in run.flags and run.end_step == 80
      continue
    dc = int(run.key.split('/')[0].removeprefix('dc'))
    assert run.end_step == 80 + dc
    assert f'--config.total_steps={80 + dc}' in run.flags
    if run.kind == 'no_projector':  # changes the network: trained from scratch
      assert run.after is None and not any('fork_from' in f for f in run.flags)
      assert (run.sup_steps, run.dc_steps) == (80, dc)
      continue
    warm = run.after
    # Same budget (hence the same schedule), setting and seed as its warm-up.
    assert warm.key.split('/')[:2] == run.key.split('/')[:2]
    assert warm.key.split('/')[3] == run.key.split('/')[3]
    assert f'--config.fork_from={warm.workdir}' in run.flags
    shared = [f for f in warm.flags if not f.startswith('--stop_at_step')]
    assert all(f in run.flags for f in shared)  # the arm only adds its switch
    assert (run.sup_steps, run.dc_steps) == ((dc, 0) if run.kind == 'supervised' else (0, dc))
  # Priority order: the longest budget's runs first, warm-ups before their forks.
  ordered = sweep.prioritise(runs, args)
  # (warm-up, supervised, CAC) x 3 seeds; no_projector is not a priority arm.
  assert [r.key.split('/')[0] for r in ordered[:9]] == ['dc640'] * 9
  assert {r.kind for r in ordered[:9]} == {'warmup', 'supervised', 'cac'}
  position = {r.key: i for i, r in enumerate(ordered)}
  assert all(position[r.after.key] < position[r.key] for r in runs if r.after)
  # With the weight-0 control: every seed's supervised and CAC runs come first.
  args.arms = ['supervised', 'cac', 'weight_0', 'no_projector']
  ordered = [r.key for r in sweep.prioritise(sweep.plan(args), args)]
  assert [k.split('/')[2] for k in ordered[9:12]] == ['weight_0'] * 3
  assert all(k.startswith('dc640/') for k in ordered[:12])
  # Then warm-up, supervised and CAC at the other budget of the same setting,
  # before any other arm or setting.
  args.settings = ['context_biased', 'frac_1_16']
  ordered = [r.key.split('/') for r in sweep.prioritise(sweep.plan(args), args)]
  assert all(k[:2] == ['dc640', 'context_biased'] for k in ordered[:12]), ordered[:12]
  assert all(k[:2] == ['dc160', 'context_biased'] for k in ordered[12:21]), ordered[12:21]
  assert {k[2] for k in ordered[12:21]} == {'warmup', 'supervised', 'cac'}
  assert not any(k[1] == 'context_biased' and k[2] in ('supervised', 'cac') for k in ordered[21:])
  assert ordered[21] == ['dc160', 'context_biased', 'weight_0', 'seed0']  # then plan order
  # context_biased is the priority setting wherever --settings lists it.
  args.settings = ['frac_1_16', 'context_biased']
  reordered = [r.key.split('/') for r in sweep.prioritise(sweep.plan(args), args)]
  assert reordered[:21] == ordered[:21]


def test_priority_seeds_add_seeds_to_the_priority_cell_only(tmp_path):
  args = _parsed(
    tmp_path,
    arms='supervised,cac,weight_0,no_projector',
    settings='context_biased,frac_1_16',
    priority_seeds=5,
  )
  runs = sweep.plan(args)
  seeds = {}
  for run in runs:
    budget, setting, kind, seed = run.key.split('/')
    seeds.setdefault((budget, setting, kind), set()).add(int(seed.removeprefix('seed')))
  for (budget, setting, kind), got in seeds.items():
    priority = (budget, setting) == ('dc640', 'context_biased') and kind != 'no_projector'
    assert got == set(range(5 if priority else 3)), (budget, setting, kind, got)
  for run in runs:  # an extra seed's arms fork from that seed's own warm-up
    if run.after:
      assert run.after.key.split('/')[3] == run.key.split('/')[3]
  # Tiers: core and weight 0 of seeds 0-2, core of seeds 3-4, core at the
  # other budget, then weight 0 of seeds 3-4, then the rest.
  ordered = [r.key.split('/') for r in sweep.prioritise(runs, args)]
  assert [(k[2], k[3]) for k in ordered[:12]] == (
    [(kind, f'seed{s}') for s in range(3) for kind in ('warmup', 'supervised', 'cac')]
    + [('weight_0', f'seed{s}') for s in range(3)]
  )
  assert [(k[2], k[3]) for k in ordered[12:18]] == (
    [(kind, f'seed{s}') for s in (3, 4) for kind in ('warmup', 'supervised', 'cac')]
  )
  assert all(k[:2] == ['dc640', 'context_biased'] for k in ordered[:18])
  assert all(k[:2] == ['dc160', 'context_biased'] for k in ordered[18:27]), ordered[18:27]
  assert {k[2] for k in ordered[18:27]} == {'warmup', 'supervised', 'cac'}
  assert [(k[:3], k[3]) for k in ordered[27:29]] == [
    (['dc640', 'context_biased', 'weight_0'], f'seed{s}') for s in (3, 4)
  ]
  assert ordered[29] == ['dc160', 'context_biased', 'weight_0', 'seed0']
  # Supervised alone has nothing to pair its extra seeds with: none are planned.
  args.arms = ['supervised', 'no_projector']
  assert {r.key.split('/')[3] for r in sweep.plan(args)} == {'seed0', 'seed1', 'seed2'}


def test_cost_fit_recovers_the_per_step_costs():
  rng = np.random.default_rng()
  start, sup, dc = rng.uniform(20, 60), rng.uniform(0.2, 0.6), rng.uniform(0.8, 2.0)
  shapes = [(80, 0), (160, 0), (0, 160), (0, 640), (640, 0)]
  ledger = {
    str(i): {'seconds': start + sup * s + dc * d, 'sup_steps': s, 'dc_steps': d}
    for i, (s, d) in enumerate(shapes)
  }
  np.testing.assert_allclose(sweep.fit_costs(ledger), (start, sup, dc), rtol=1e-9)
  assert sweep.fit_costs(dict(list(ledger.items())[:2])) is None  # too few shapes


def _fake_run(run, curve, diag=None):
  """A finished run: its final checkpoint directory and its scalars."""
  (run.workdir / 'checkpoints' / str(run.end_step)).mkdir(parents=True)
  writer = metric_writers.create_default_writer(str(run.workdir))
  for step, value in curve:
    writer.write_scalars(step, {'val/miou': value})
  for step, value in diag or []:
    writer.write_scalars(step, {'train/dc_loss_gap_12': value})
  writer.flush()
  writer.close()


def test_report_joins_the_warmup_curve_and_pairs_seeds(tmp_path):
  args = _parsed(tmp_path)
  args.dc_steps = [160]
  runs = sweep.plan(args)
  rng = np.random.default_rng()
  finals = {'supervised': rng.uniform(0.2, 0.3, 3)}
  finals['cac'] = finals['supervised'] + np.array([0.01, 0.02, 0.03])
  for run in runs:
    seed = int(run.key.split('seed')[-1])
    if run.kind == 'warmup':
      _fake_run(run, [(40, 0.05), (80, 0.10 + seed / 100)])
    elif run.kind in finals:
      f = float(finals[run.kind][seed])
      # Steps <= 80 in a fork's own events must be ignored (the warm-up's count).
      _fake_run(
        run,
        [(80, 0.99), (120, f - 0.04), (160, f + 0.05), (200, f - 0.01), (240, f)],
        diag=[(240, 1.5)],
      )
  results = sweep_report.summarise(runs, args)
  cac = results['dc160']['context_biased']['cac']
  run0 = cac['runs'][0]
  assert [s for s, _ in run0['curve']] == [40, 80, 120, 160, 200, 240]
  assert run0['curve'][1][1] == pytest.approx(0.10)
  assert run0['last3_miou'] == pytest.approx(
    np.mean([finals['cac'][0] + d for d in (0.05, -0.01, 0)]), abs=1e-6
  )
  assert run0['best_step'] == 160
  assert run0['diagnostics']['dc_loss_gap_12'] == [(240, 1.5)]
  assert results['dc160']['context_biased']['no_projector']['runs'] == []
  meta = {'command': 'cmd', 'partial': '3 of 12 runs not finished'}
  text = sweep_report.report(results, args, meta)
  # Paired final deltas +1, +2, +3 points: mean 2, t-interval [-0.5, +4.5].
  assert '| cac | 3 |' in text and '+2.0 [-0.5, +4.5]' in text
  assert '| no_projector | 0 | not run |' in text and '**Partial**' in text
  sweep_report.plots(results, tmp_path / 'sweep', args)
  for name in ('sweep.png', 'sweep_delta.png', 'sweep_diagnostics.png'):
    assert (tmp_path / name).stat().st_size > 0
  mean, low, high = ablation.paired_interval([1.0, 2.0, 3.0])
  assert f'{mean:+.1f} [{low:+.1f}, {high:+.1f}]' == '+2.0 [-0.5, +4.5]'


def test_report_pairs_cac_with_the_weight_0_control(tmp_path):
  args = _parsed(tmp_path, arms='supervised,cac,weight_0,bn_labeled', dc_steps='160')
  runs = sweep.plan(args)
  rng = np.random.default_rng()
  sup = rng.uniform(0.2, 0.3, 3)
  finals = {'supervised': sup, 'weight_0': sup - 0.05}
  finals['cac'] = finals['weight_0'] + np.array([0.01, 0.02, 0.03])
  finals['bn_labeled'] = finals['cac'] + np.array([0.04, 0.05, 0.06])
  for run in runs:
    seed = int(run.key.split('seed')[-1])
    if run.kind == 'warmup':
      _fake_run(run, [(80, 0.1)])
    else:
      _fake_run(run, [(240, float(finals[run.kind][seed]))])
  lines = sweep_report.report(
    sweep_report.summarise(runs, args), args, {'command': 'cmd'}
  ).splitlines()
  (line,) = [x for x in lines if x.startswith('CAC − weight 0, paired')]
  # CAC - weight 0 is +1, +2, +3 points per seed: mean 2, t-interval [-0.5, +4.5].
  assert 'Δ final +2.0 [-0.5, +4.5]' in line and '(3 seeds)' in line
  assert '| cac | 3 |' in '\n'.join(lines) and '| weight_0 | 3 |' in '\n'.join(lines)
  # Labeled-pass BN - CAC: +4, +5, +6 points, [+2.5, +7.5] (t(0.975, 2) = 4.303).
  (line,) = [x for x in lines if x.startswith('labeled-pass BN − CAC, paired')]
  assert 'Δ final **+5.0 [+2.5, +7.5]**' in line
  assert not any(x.startswith('precise BN') for x in lines)  # no such runs


def test_interval_cell_is_bold_markdown_only_where_it_excludes_0():
  # t(0.975, 2) = 4.303; deltas 4, 5, 6 have std 1: 5 +- 4.303 / sqrt(3) = [2.5, 7.5].
  assert sweep_report.interval([4.0, 5.0, 6.0]) == '**+5.0 [+2.5, +7.5]**'
  assert sweep_report.interval([-6.0, -5.0, -4.0]) == '**-5.0 [-7.5, -2.5]**'
  assert sweep_report.interval([1.0, 2.0, 3.0]) == '+2.0 [-0.5, +4.5]'
  assert sweep_report.interval([]) == '–'


def test_bad_arm_is_a_clear_error(tmp_path, capsys):
  with pytest.raises(SystemExit):
    sweep.main(_args(tmp_path) + ['--arms=supervised,cca', '--estimate_only'])
  assert "unknown arm(s) ['cca']" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    sweep.main(_args(tmp_path) + ['--arms=cac', '--estimate_only'])
  assert 'must include supervised' in capsys.readouterr().err
  assert json.dumps(sweep.estimate([], _parsed(tmp_path)))  # nothing measured: no costs


def test_scalars_picture_of_a_real_run_shows_the_dc_diagnostics(tiny_run, tmp_path):
  from cac_jax.bench import tb_scalars

  workdir, _ = tiny_run
  drawn = tb_scalars.main([f'--workdir={workdir}', f'--out={tmp_path / "tb.png"}'])
  for tag in (
    'train/loss_ce',
    'train/dc_loss_gap_12',
    'train/dc_valid_negatives_21',
    'train/dc_anchor_label_acc_12',
    'train/dc_false_neg_rate_12',
    'val/miou',
  ):
    assert tag in drawn
  assert (tmp_path / 'tb.png').stat().st_size > 10_000
  with pytest.raises(SystemExit, match='holds no scalars'):
    tb_scalars.main([f'--workdir={tmp_path}', f'--out={tmp_path / "none.png"}'])


def test_report_of_one_seed_says_so_and_lists_what_has_not_run(tmp_path):
  args = _parsed(tmp_path)
  runs = sweep.plan(args)
  for run in runs:  # seed 0 of the 160-step budget only
    if run.key.startswith('dc160/') and run.key.endswith('seed0'):
      if run.kind == 'warmup':
        _fake_run(run, [(80, 0.1)])
      elif run.kind in ('supervised', 'cac'):
        _fake_run(run, [(240, 0.30 if run.kind == 'cac' else 0.25)])
  text = sweep_report.report(sweep_report.summarise(runs, args), args, {'command': 'cmd'})
  assert '+5.0 (1 seed: no interval)' in text and 'nan' not in text
  assert '### context_biased, 640 DC steps' not in text
  assert 'No finished run yet: context_biased at 640 DC steps.' in text


def _fake_trainer(monkeypatch, calls, drift=None):
  """ablation.run_one as a stand-in that 'trains' a run: a final checkpoint
  directory, scalars that depend on the run, and a params file whose hash is
  the fingerprint (a warm-up's bytes change per call only if `drift`)."""

  def run_one(workdir, flags, steps):
    calls.append(str(workdir))
    arm, seed = workdir.parts[-2], int(workdir.parts[-1].removeprefix('seed'))
    (workdir / 'checkpoints' / str(steps)).mkdir(parents=True)
    value = 0.2 + 0.01 * seed + (0.03 if arm == 'cac' else 0.0)
    writer = metric_writers.create_default_writer(str(workdir))
    writer.write_scalars(steps, {'val/miou': value, 'train/dc_loss_gap_12': value / 2})
    writer.flush()
    writer.close()
    salt = str(len(calls)) if drift else ''
    (workdir / 'params.bin').write_text(f'{flags}{salt}')
    return 10.0 + steps

  monkeypatch.setattr(ablation, 'run_one', run_one)
  monkeypatch.setattr(
    sweep_records, 'fingerprint', lambda workdir, step: (workdir / 'params.bin').read_text()
  )


def test_records_alone_finish_runs_when_the_workdirs_are_gone(tmp_path, monkeypatch):
  import shutil

  args = _parsed(tmp_path)
  args.dc_steps = [160]
  runs = sweep.plan(args)  # 3 seeds x (warm-up, supervised, cac, no_projector)
  calls = []
  _fake_trainer(monkeypatch, calls)
  sweep.train_all(runs, args)
  assert len(calls) == 12
  records = sweep_records.read_records(args)
  assert set(records) == {r.key for r in runs}
  warm = records['dc160/context_biased/warmup/seed1']
  assert warm['seconds'] == 90.0 and warm['fingerprint']
  assert all('{workdirs}' in ' '.join(r['flags']) for k, r in records.items() if 'cac/' in k)
  before = sweep_report.summarise(runs, args)

  shutil.rmtree(tmp_path / 'w')  # another machine, a fresh clone: no workdirs
  assert sweep_report.summarise(sweep.plan(args), args) == before
  sweep.train_all(sweep.plan(args), args)
  assert len(calls) == 12  # nothing trained again

  # One arm's record deleted: it trains again, after its warm-up (whose own
  # record stays, now marked as retrained with the same fingerprint).
  del records['dc160/context_biased/cac/seed1']
  sweep_records.write_records(args, records)
  sweep.train_all(sweep.plan(args), args)
  assert [c.split('/w/')[1] for c in calls[12:]] == [
    'dc160/context_biased/warmup/seed1',
    'dc160/context_biased/cac/seed1',
  ]
  again = sweep_records.read_records(args)
  assert again['dc160/context_biased/warmup/seed1']['fingerprint'] == warm['fingerprint']
  assert len(again['dc160/context_biased/warmup/seed1']['retrained']) == 1
  assert sweep_report.summarise(sweep.plan(args), args) == before
  # The report, from the records alone, names the code the runs were trained with.
  sweep.main(_args(tmp_path) + ['--dc_steps=160', '--summary_only'])
  text = (tmp_path / 'out' / 'sweep.md').read_text()
  assert f'trained with the code of commit: {warm["code"]} (12 runs).' in text
  assert '| cac | 3 |' in text
  # Other flags plan fewer runs: the records they do not plan are named, kept.
  saved = sweep_records.records_path(args).read_text()
  sweep.main(_args(tmp_path) + ['--dc_steps=160', '--seeds=2', '--summary_only'])
  text = (tmp_path / 'out' / 'sweep.md').read_text()
  assert '**Not in this report**: 4 recorded runs' in text
  assert 'dc160/context_biased/cac/seed2' in text and '| cac | 2 |' in text
  assert sweep_records.records_path(args).read_text() == saved


def _sweep_on_a_new_machine(tmp_path, monkeypatch, calls, unrecorded):
  """A 160-step sweep trained whole by a trainer whose warm-ups never
  reproduce, then its workdirs lost and the records of `unrecorded` deleted:
  (args, the records left)."""
  import shutil

  args = _parsed(tmp_path)
  args.dc_steps = [160]
  _fake_trainer(monkeypatch, calls, drift=True)
  sweep.train_all(sweep.plan(args), args)
  records = sweep_records.read_records(args)
  shutil.rmtree(tmp_path / 'w')
  for key in unrecorded:
    del records[f'dc160/context_biased/{key}']
  sweep_records.write_records(args, records)
  return args, records


def test_a_warmup_that_does_not_reproduce_stops_the_sweep(tmp_path, monkeypatch):
  calls = []
  # no_projector has no warm-up: not blocked.
  args, records = _sweep_on_a_new_machine(
    tmp_path, monkeypatch, calls, ['supervised/seed2', 'no_projector/seed1']
  )
  # The whole command: the runs it could train are trained and reported, then it fails.
  with pytest.raises(SystemExit, match='does not reproduce the parameters') as err:
    sweep.main(_args(tmp_path) + ['--dc_steps=160'])
  text = (tmp_path / 'out' / 'sweep.md').read_text()
  assert '| no_projector *scratch* | 3 |' in text and '; 1 run left,' in text
  assert 'would not pair exactly with dc160/context_biased/cac/seed2' in str(err.value)
  assert 'not trained: dc160/context_biased/supervised/seed2' in str(err.value)
  assert sweep_records.machine() in str(err.value)
  kept = sweep_records.read_records(args)
  # Nothing recorded is lost or overwritten; the run the warm-up does not block trained.
  assert kept.pop('dc160/context_biased/no_projector/seed1')['flags']
  assert kept == records
  assert [c.split('/w/')[1] for c in calls[12:]] == [
    'dc160/context_biased/no_projector/seed1',
    'dc160/context_biased/warmup/seed2',
  ]
  # The retrained warm-up is moved aside, so no later sweep forks from it.
  warm = tmp_path / 'w' / 'dc160' / 'context_biased' / 'warmup'
  assert not (warm / 'seed2').exists() and len(list(warm.glob('seed2.unreproduced.*'))) == 1


def test_a_warmup_no_recorded_run_forks_from_is_retrained_and_replaced(tmp_path, monkeypatch):
  calls = []
  # Seed 2's forks are not recorded (as after a cut-off session).
  args, records = _sweep_on_a_new_machine(
    tmp_path, monkeypatch, calls, ['supervised/seed2', 'cac/seed2']
  )
  old = records['dc160/context_biased/warmup/seed2']
  sweep.train_all(sweep.plan(args), args)  # no error: nothing pairs with the old warm-up
  assert [c.split('/w/')[1] for c in calls[12:]] == [
    'dc160/context_biased/warmup/seed2',
    'dc160/context_biased/supervised/seed2',
    'dc160/context_biased/cac/seed2',
  ]
  now = sweep_records.read_records(args)
  warm = now['dc160/context_biased/warmup/seed2']
  assert warm['fingerprint'] != old['fingerprint']
  assert warm['replaced'] == [
    {k: old[k] for k in ('code', 'finished_at', 'fingerprint', 'machine')}
  ]
  assert warm['machine'] == sweep_records.machine() and 'jaxlib' in warm['machine']
  assert {k: v for k, v in now.items() if 'seed2' not in k} == {
    k: v for k, v in records.items() if 'seed2' not in k
  }


def test_forks_of_a_warmup_recorded_on_another_machine_go_last(tmp_path, monkeypatch, capsys):
  calls = []
  args, records = _sweep_on_a_new_machine(
    tmp_path, monkeypatch, calls, ['supervised/seed1', 'supervised/seed2', 'no_projector/seed2']
  )
  # Seed 1's warm-up was recorded elsewhere; seed 2's here (its retrained
  # warm-up still drifts: the fake trainer never reproduces).
  records['dc160/context_biased/warmup/seed1']['machine'] = 'another CPU; jaxlib 0.0'
  sweep_records.write_records(args, records)
  with pytest.raises(sweep_records.SweepError, match='does not reproduce'):
    sweep.train_all(sweep.plan(args), args)
  # Plan order would be seed 1's warm-up and supervised arm first; they go
  # last, after the runs that can pair on this machine.
  assert [c.split('/w/')[1] for c in calls[12:]] == [
    'dc160/context_biased/warmup/seed2',
    'dc160/context_biased/no_projector/seed2',
    'dc160/context_biased/warmup/seed1',
  ]
  out = capsys.readouterr().out
  assert 'trained last, as their warm-ups were recorded on another machine (another CPU' in out
  assert (
    '(then they are blocked): 1 run, dc160/context_biased/supervised/seed1; '
    '--retire=foreign gives their seeds up for new ones\n'
  ) in out
  # The report's next runs follow the same order.
  sweep.main(_args(tmp_path) + ['--dc_steps=160', '--summary_only'])
  text = (tmp_path / 'out' / 'sweep.md').read_text()
  assert (
    'next to train: dc160/context_biased/supervised/seed2, dc160/context_biased/supervised/seed1'
    in text
  )


def test_a_warmup_waits_for_the_first_run_that_forks_from_it(tmp_path):
  args = _parsed(tmp_path)
  args.dc_steps = [160]
  by_key = {r.key: r for r in sweep.plan(args)}
  key = 'dc160/context_biased/{}/seed{}'.format
  # In priority order seed 1's supervised arm comes first, seed 0's CAC later;
  # seed 0's warm-up (retrained only for that CAC arm) must not go first.
  pending = [by_key[key(*k)] for k in (('warmup', 0), ('warmup', 1), ('supervised', 1), ('cac', 0))]
  ordered = sweep.seeds_together(pending)
  assert [r.key for r in ordered] == [
    key('warmup', 1),
    key('supervised', 1),
    key('warmup', 0),
    key('cac', 0),
  ]
  scratch = by_key[key('no_projector', 2)]  # no warm-up: stays where it is
  assert sweep.seeds_together([scratch, *pending])[0] is scratch


def test_backfilled_runs_record_their_code_and_machine_as_unknown(tmp_path):
  args = _parsed(tmp_path)
  args.dc_steps = [160]
  (run,) = [r for r in sweep.plan(args) if r.key == 'dc160/context_biased/supervised/seed0']
  _fake_run(run, [(240, 0.3)])  # a workdir trained before records existed
  sweep_records.backfill(sweep.plan(args), args)
  got = sweep_records.read_records(args)[run.key]
  assert got['code'] is None and got['machine'] is None
  assert got['scalars']['val/miou'] == [[240, pytest.approx(0.3)]]


def test_records_of_another_protocol_are_refused_by_name(tmp_path, monkeypatch):
  args = _parsed(tmp_path)
  args.dc_steps = [160]
  _fake_trainer(monkeypatch, [])
  sweep.train_all(sweep.plan(args), args)
  saved = sweep_records.records_path(args).read_text()
  argv = _args(tmp_path) + ['--dc_steps=160', '--extra=--config.data.crop_size=96']
  with pytest.raises(SystemExit, match='records dc160/context_biased/warmup/seed0 with other'):
    sweep.main(argv + ['--summary_only'])
  assert sweep_records.records_path(args).read_text() == saved


def test_fingerprint_tells_checkpoints_apart_bit_for_bit(tiny_run):
  import pathlib

  workdir = pathlib.Path(tiny_run[0])
  final = sweep_records.fingerprint(workdir, 4)
  assert len(final) == 64 and final == sweep_records.fingerprint(workdir, 4)
  assert sweep_records.fingerprint(workdir, 2) != final


def test_a_retired_seed_keeps_its_runs_and_a_new_seed_takes_its_place(
  tmp_path, monkeypatch, capsys
):
  calls = []
  args, records = _sweep_on_a_new_machine(tmp_path, monkeypatch, calls, ['cac/seed1'])
  records['dc160/context_biased/warmup/seed1']['machine'] = 'another CPU; jaxlib 0.0'
  sweep_records.write_records(args, records)
  argv = _args(tmp_path) + ['--dc_steps=160', '--retire=foreign']
  sweep.main(argv)  # retires seed 1, then trains the seed that replaces it
  assert 'retiring 1 seed; dc160/context_biased/seed1 (cac not trained)' in capsys.readouterr().out
  new = [c.split('/w/')[1] for c in calls[12:]]
  assert new[0] == 'dc160/context_biased/warmup/seed3'
  arms = ('cac', 'no_projector', 'supervised')
  assert sorted(new[1:]) == [f'dc160/context_biased/{arm}/seed3' for arm in arms]
  kept = sweep_records.read_records(args)
  why = kept['dc160/context_biased/warmup/seed1'].pop('retired')
  assert why['not_trained'] == ['cac'] and why['warmup_on'] == 'another CPU; jaxlib 0.0'
  assert why['on'] == sweep_records.machine()
  assert {k: v for k, v in kept.items() if 'seed3' not in k} == records  # nothing lost
  text = (tmp_path / 'out' / 'sweep.md').read_text()
  assert '**Retired seeds**' in text and 'dc160/context_biased/seed1 (cac not trained;' in text
  assert '| supervised | 4 |' in text and '| cac | 3 |' in text and '**Partial**' not in text
  # The paired difference takes the seeds that have both arms: 0, 2 and 3.
  results = json.loads((tmp_path / 'out' / 'sweep.json').read_text())['results']
  assert len(sweep_report.deltas(results, 'dc160', 'context_biased', 'cac', 'final_miou')) == 3
  # Nothing is foreign any more: retiring again changes nothing.
  saved = sweep_records.records_path(args).read_text()
  sweep.main(argv + ['--summary_only'])
  assert 'retiring 0 seeds' in capsys.readouterr().out
  assert sweep_records.records_path(args).read_text() == saved


def test_retire_names_what_it_cannot_retire_and_writes_nothing(tmp_path, monkeypatch, capsys):
  import shutil

  args = _parsed(tmp_path)
  args.dc_steps = [160]
  _fake_trainer(monkeypatch, [])
  runs = [r for r in sweep.plan(args) if r.key != 'dc160/context_biased/cac/seed2']
  sweep.train_all(runs, args)
  saved = sweep_records.records_path(args).read_text()
  argv = _args(tmp_path) + ['--dc_steps=160', '--summary_only']
  for name, error in (
    ('dc160/context_biased/seed7', 'plans no such seed; name it as dc<steps>/<setting>/seed<k>'),
    ('context_biased/seed1', 'plans no such seed'),
    ('dc160/context_biased/seed0', 'every run of this seed is finished'),
  ):
    with pytest.raises(SystemExit, match=error):
      sweep.main(argv + [f'--retire={name}'])
  assert sweep_records.records_path(args).read_text() == saved
  # --estimate_only prices the new seed without writing the retirement.
  retire = '--retire=dc160/context_biased/seed2'
  cost = sweep.main(_args(tmp_path) + ['--dc_steps=160', retire, '--estimate_only'])
  assert '(not written: --estimate_only); dc160/context_biased/seed2 (cac not trained)' in (
    capsys.readouterr().out
  )
  assert cost['todo_runs'] == 4  # seed 3: warm-up, supervised, cac, no_projector
  assert sweep_records.records_path(args).read_text() == saved
  # An unrecorded seed is simply trained whole: nothing to retire.
  sweep_records.records_path(args).unlink()
  shutil.rmtree(tmp_path / 'w')
  with pytest.raises(SystemExit, match='its warm-up is not recorded'):
    sweep.main(argv + [retire])


def test_longest_arms_plans_fewer_arms_at_the_longest_budget_only(tmp_path, capsys):
  args = _parsed(tmp_path, longest_arms='supervised,cac')
  kinds = collections.defaultdict(set)
  for run in sweep.plan(args):
    kinds[run.key.split('/')[0]].add(run.kind)
  assert kinds == {
    'dc160': {'warmup', 'supervised', 'cac', 'no_projector'},
    'dc640': {'warmup', 'supervised', 'cac'},
  }
  for bad, error in (
    ('supervised,weight_0', 'subset of --arms'),
    ('cac', 'must include supervised'),
  ):
    with pytest.raises(SystemExit):
      sweep.main(_args(tmp_path, longest_arms=bad) + ['--estimate_only'])
    assert error in capsys.readouterr().err


def test_a_seed_started_is_finished_before_the_next_starts(tmp_path):
  args = _parsed(tmp_path, arms='supervised,cac,weight_0')
  prioritised = [r.key for r in sweep.prioritise(sweep.plan(args), args)]
  # Priority alone interleaves seeds: every seed's supervised and CAC, then weight 0.
  assert [k.split('/')[2] for k in prioritised[9:12]] == ['weight_0'] * 3
  runs = sweep.prioritise(sweep.plan(args), args)
  ordered = [r.key.split('/') for r in sweep.seeds_together(runs)]
  assert [(k[0], k[2], k[3]) for k in ordered[:8]] == [
    ('dc640', kind, f'seed{s}')
    for s in (0, 1)
    for kind in ('warmup', 'supervised', 'cac', 'weight_0')
  ]
  seeds = [tuple(k[:2] + k[3:]) for k in ordered]
  assert all(seeds.index(s) + 4 == len(seeds) - seeds[::-1].index(s) for s in seeds)
  # A seed whose warm-up this machine has trained (a sweep cut off and begun
  # again) is finished first, whatever its priority.
  warm = next(r for r in runs if r.key == 'dc160/context_biased/warmup/seed2')
  _fake_run(warm, [(80, 0.2)])
  ordered = [r.key for r in sweep.seeds_together(runs)]
  kinds = ('warmup', 'supervised', 'cac', 'weight_0')
  assert ordered[:4] == [f'dc160/context_biased/{k}/seed2' for k in kinds]


def test_a_stand_in_seed_takes_the_arms_and_rank_of_the_seed_it_replaces(
  tmp_path, monkeypatch, capsys
):
  flags = dict(arms='supervised,cac,weight_0,no_projector', priority_seeds=5)
  args = _parsed(tmp_path, **flags)
  _fake_trainer(monkeypatch, [])
  key = 'dc640/context_biased/{}/seed{}'.format
  cut = {key('weight_0', 1), key('no_projector', 1), key('weight_0', 3)}
  sweep.train_all([r for r in sweep.plan(args) if r.key not in cut], args)
  # Seed 1 is one of the first three (every arm); seed 3 an extra one (priority arms).
  retire = '--retire=dc640/context_biased/seed1,dc640/context_biased/seed3'
  sweep.main(_args(tmp_path, **flags) + [retire, '--summary_only'])
  assert (
    'retiring 2 seeds; dc640/context_biased/seed1 (weight_0, no_projector not trained); '
    'dc640/context_biased/seed3 (weight_0 not trained)'
  ) in capsys.readouterr().out
  runs = sweep.plan(args)
  arms = collections.defaultdict(set)
  for run in runs:
    if run.key.startswith('dc640/'):
      arms[int(run.key.split('/seed')[1])].add(run.kind)
  every, priority = {'warmup', 'supervised', 'cac', 'weight_0', 'no_projector'}, {'warmup'}
  priority |= set(sweep.PRIORITY_ARMS)
  assert arms == {
    0: every,
    1: every - {'weight_0', 'no_projector'},  # recorded runs only
    2: every,
    3: priority - {'weight_0'},
    4: priority,
    5: every,  # stands in for seed 1
    6: priority,  # stands in for seed 3
  }
  # Seed 5 ranks with the first seeds (tiers 0-1), seed 6 with the extra ones.
  ordered = [r.key for r in sweep.prioritise(runs, args)]
  assert {key(k, 5) for k in ('warmup', 'supervised', 'cac')} <= set(ordered[:12])  # tier 0
  assert key('weight_0', 5) in ordered[12:15]  # tier 1: weight 0 of seeds 0, 2 and 5
  assert ordered.index(key('cac', 6)) > ordered.index(key('cac', 4)) > ordered.index(key('cac', 5))
  with pytest.raises(SystemExit, match='seed1: retired already'):
    sweep.main(_args(tmp_path, **flags) + [retire, '--summary_only'])
