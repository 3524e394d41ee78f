"""The train-step benchmark: its fields on a tiny config, and the GPU script.

The benchmark runs in-process on the first of conftest's fake CPU devices
(resnet_tiny, crop 64, 2 + 2 images, 2 steps), so the numbers are only
checked for consistency, not for speed.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cac_jax import config_lib
from cac_jax.bench import step_time as bench
from train_utils import REPO


def _tiny(mode):
  return bench.bench_config(
    backbone='resnet_tiny',
    crop=64,
    labeled=2,
    unlabeled=2,
    dtype='float32',
    supervised_only=mode == 'sup',
  )


def _leaves(ns, prefix=''):
  out = {}
  for key, value in vars(ns).items():
    if hasattr(value, '__dict__'):
      out.update(_leaves(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


def test_bench_config_fields_match_the_schema():
  # The benchmark avoids ml_collections; its namespace must still use the
  # schema's names and, for what it does not set from flags, the defaults of
  # the VOC R50 config, or the step it times is not the step we train.
  from configs import voc_r50

  voc = voc_r50.get_config()
  for key, value in _leaves(bench.bench_config()).items():
    node = voc
    for part in key.split('.'):
      assert part in node, f'{key} is not in config_lib.base_config()'
      node = node[part]
    if key not in ('cac.supervised_only', 'data.labeled_batch_size', 'data.unlabeled_batch_size'):
      assert node == value, (key, node, value)
  config_lib.base_config()  # the schema itself imports


def test_synthetic_boxes_are_valid_overlaps():
  for crop in (64, 160, 320):
    box1, box2 = bench.synthetic_boxes(crop, 4)
    assert (box1 % 8 == 0).all() and (box2 % 8 == 0).all()
    assert ((box1 >= 0) & (box1 <= crop)).all() and ((box2 >= 0) & (box2 <= crop)).all()
    np.testing.assert_array_equal(box1[:, 2:] - box1[:, :2], box2[:, 2:] - box2[:, :2])
    assert (box1[:, 2:] > box1[:, :2]).all()  # non-empty


@pytest.mark.parametrize('mode', ['sup', 'cac'])
def test_benchmark_fields_are_consistent(mode):
  r = bench.benchmark(_tiny(mode), with_dc=mode == 'cac', steps=2, warmup=1)
  assert r['mode'] == mode and r['devices'] == 1 and r['platform'] == 'cpu'
  images = 2 + (4 if mode == 'cac' else 0)
  assert r['images_per_step'] == images
  assert r['step_s'] > 0 and len(r['step_all_s']) == 2
  # The derived fields are float64 quotients of the same numbers, computed in
  # another order at most (a couple of roundings, 1e-16): pytest.approx's
  # default rel 1e-6 (it was 1e-2 for the rates: 1e14 times the round-off,
  # room for a rate from another timing to pass).
  assert r['step_s'] == pytest.approx(float(np.median(r['step_all_s'])))
  assert r['images_per_s'] == pytest.approx(images / r['step_s'])
  assert r['compile_s'] > 0 and r['gflop_per_step'] > 0
  assert r['gflop_per_s'] == pytest.approx(r['gflop_per_step'] / r['step_s'])
  # On CPU the lowered and compiled FLOP counts agree (GPU: see the module).
  # Not round-off: XLA's cost analysis before and after optimisation counts
  # a few elementwise ops differently (measured 0.26% apart here). 5% leaves
  # room for other XLA versions; losing a pass (the backward pass is 2/3 of
  # the FLOPs) fails it.
  assert r['gflop_lowered'] == pytest.approx(r['gflop_compiled'], rel=0.05)
  # XLA counts only the window taps that meet real input (not padding, not
  # the zeros a strided layer's input gradient is dilated with) and a loop
  # body once; the jaxpr count (checked by hand in
  # test_jaxpr_flop_count_by_hand) counts every tap, so it is larger.
  assert r['gflop_per_step'] >= r['gflop_compiled'] > 0
  assert r['device_peak_mib'] > 0 and r['host_rss_mib'] > 0
  assert r['cpu_over_wall'] > 0 and np.isfinite(r['loss'])
  assert r['mfu'] is None and r['peak_flops'] is None  # no peak for a CPU
  if mode == 'cac':
    # Both views of both images at 8x8 cells, one step's worth in the bank.
    assert r['bank_rows'] == 2 * 2 * 8 * 8
    # dc_share is computed as this quotient: default rel 1e-6 (round-off 1e-16).
    assert 0 < r['dc_s'] and r['dc_share'] == pytest.approx(r['dc_s'] / r['step_s'])
    assert r['dc_gflop'] > 0
    # anchors 2*64, negatives 2*2*64 batch + 256 bank, 128-d, 2 dirs, fwd+bwd.
    assert r['dc_analytic_gflop'] == pytest.approx(8 * 128 * 512 * 128 / 1e9)
  else:
    assert 'dc_s' not in r and r['bank_rows'] == 0


def test_peak_flops_table():
  class Dev:
    platform, device_kind = 'gpu', 'NVIDIA H100 80GB HBM3'

  assert bench.peak_flops(Dev, 'bfloat16')[0] == 989e12
  assert bench.peak_flops(Dev, 'float32')[0] == 495e12
  assert bench.peak_flops(Dev, 'float32', 'highest')[0] == 67e12
  Dev.platform, Dev.device_kind = 'cpu', 'cpu'
  assert bench.peak_flops(Dev, 'float32')[0] is None


def test_cli_rejects_bad_flags_with_a_message():
  out = subprocess.run(
    [sys.executable, '-m', 'cac_jax.bench.step_time', '--crop=60', '--backbone=resnet_tiny'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 2 and 'multiple of 8' in out.stderr
  assert 'Traceback' not in out.stderr


def test_gpu_script_tiny_mode_runs_on_cpu(tmp_path):
  # Same devices, shapes and cache as the in-process tests above, so the
  # script's compilations are persistent-cache hits (seconds, not a minute).
  env = dict(
    os.environ,
    TINY='1',
    OUT=str(tmp_path),
    PYTHON=sys.executable,
    JAX_PLATFORMS='cpu',
    CUDA_VISIBLE_DEVICES='',
    JAX_NUM_CPU_DEVICES='8',
    JAX_COMPILATION_CACHE_DIR=str(REPO / '.cache' / 'jax'),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5',
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
  )
  out = subprocess.run(
    ['bash', 'launch/gpu_benchmark.sh'],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  # The table comes last: its rows (sup, cac before, cac after) are the
  # final lines; the profile and the DC-alone table come before it.
  lines = out.stdout.strip().splitlines()
  rows = [l for l in lines if l.startswith('| sup ') or l.startswith('| cac ')]
  assert len(rows) == 3 and lines[-3:] == rows
  assert '| cac | before: dense' in rows[1] and '| cac | after: block 0.125' in rows[2]
  assert any(l.startswith('wrote ') for l in lines)
  assert '| op kind | ms/step |' in out.stdout and '| alone | compact/bf16 |' in out.stdout
  results = json.loads((tmp_path / 'gpu_report.json').read_text())['results']
  steps, dc_alone = results[:3], results[3]['dc_alone']
  assert [r['mode'] for r in steps] == ['sup', 'cac', 'cac']
  assert [r['dc_anchor_block'] for r in steps[1:]] == [0.0, 0.125]
  assert all(r['backbone'] == 'resnet_tiny' and r['step_s'] > 0 for r in steps)
  # Padded 3x3 convolutions: fewer real-pixel taps than window taps.
  assert all(0 < r['gflop_real_per_step'] < r['gflop_per_step'] for r in steps)
  assert 0 < steps[2]['profile_dc_ms'] < steps[2]['profile_total_ms']
  # Every DC variant's loss agrees with the dense float32 one (bf16: ~1e-6
  # relative at this size, float32 rounding otherwise).
  assert all(r['loss_rel_diff'] < 1e-4 for r in dc_alone), dc_alone


def test_jaxpr_flop_count_by_hand():
  """Conv, dot, their gradients and a scan, counted against hand formulas."""
  from cac_jax.bench import flops

  dn = ('NHWC', 'HWIO', 'NHWC')
  conv = lambda x, w, s: jax.lax.conv_general_dilated(
    x, w, (s, s), ((1, 1), (1, 1)), dimension_numbers=dn
  )
  x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5))
  a, b = jnp.ones((4, 6)), jnp.ones((6, 7))
  f = jax.jit(lambda x, w, a, b: jnp.sum(conv(x, w, 2)) + jnp.sum(a @ b))
  # stride-2 conv: 2x4x4 outputs x 5 features x 27 taps*inputs; dot 4x7x6.
  assert flops.traced_flops(f, x, w, a, b)['flops'] == 2 * (2 * 4 * 4 * 5 * 27 + 4 * 7 * 6)
  g = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w, 1) ** 2), argnums=(0, 1)))
  # forward, input gradient and kernel gradient: 3 convolutions of equal cost.
  assert flops.traced_flops(g, x, w)['flops'] == 3 * 2 * 2 * 8 * 8 * 5 * 27
  loop = jax.jit(lambda m: jax.lax.fori_loop(0, 5, lambda i, c: c @ m, m))
  assert flops.traced_flops(loop, jnp.ones((4, 4))) == {
    'flops': 5 * 2 * 4 * 4 * 4,
    'while_loops': 0,
  }


@pytest.mark.parametrize(
  'stride,dilation,padding,k',
  [
    (1, 1, 'SAME', 3),
    (2, 1, 'SAME', 3),
    (2, 1, ((3, 3), (3, 3)), 7),
    (1, 6, ((6, 6), (6, 6)), 3),
    (2, 1, 'SAME', 1),
  ],
)
def test_real_tap_flop_count_is_xla_cpu_count(stride, dilation, padding, k):
  """The real-pixel convention (taps over zero padding or between the pixels
  of a strided layer's input gradient not counted) is XLA:CPU's own count:
  equal on a convolution and on both of its gradients, whose zeros it skips
  too. (The traced vjp also holds the forward, which XLA removes.)"""
  from cac_jax.bench import flops

  dn = ('NHWC', 'HWIO', 'NHWC')
  conv = lambda x, w: jax.lax.conv_general_dilated(
    x, w, (stride, stride), padding, rhs_dilation=(dilation, dilation), dimension_numbers=dn
  )
  x, w = jnp.ones((2, 17, 13, 3)), jnp.ones((k, k, 3, 5))
  ct = jnp.ones(jax.eval_shape(conv, x, w).shape)
  fwd = jax.jit(conv)
  vjp = jax.jit(lambda x, w, ct: jax.vjp(conv, x, w)[1](ct))
  xla = lambda f, *a: bench._cost_flops(f.lower(*a).compile())
  real = flops.traced_flops(fwd, x, w, real_taps=True)['flops']
  assert real == xla(fwd, x, w)
  assert flops.traced_flops(vjp, x, w, ct, real_taps=True)['flops'] - real == xla(vjp, x, w, ct)
  if k > 1:
    assert real < flops.traced_flops(fwd, x, w)['flops']  # padding taps left out


def test_conv_benchmark_runs_and_lowerings_agree(tmp_path, capsys):
  """`python -m cac_jax.bench.conv` at a tiny crop: every layer shape, both
  lowerings agree (forward and both gradients, float32) and the JSON is written."""
  from cac_jax.bench import conv as conv_bench

  out = tmp_path / 'conv.json'
  assert conv_bench.main(['--crop=32', '--batch=1', '--repeats=1', f'--json={out}']) == 0
  written = json.loads(out.read_text())
  rows = written['rows']
  assert written['matmul_gflops'] > 0
  assert [r['layer'] for r in rows] == [s[0] for s in conv_bench.layer_shapes(32)]
  for r in rows:
    # max|xla - conv2d| / max|xla| over the forward and both gradients, two
    # float32 lowerings of the same sums: at crop 32 each sums n <= 2,048
    # unit-scale terms (rates past the map prune the taps), off by ~sqrt(n)
    # EPS = 2.7e-6 of the rms output, ~1e-6 of the largest, on each side
    # (measured <= 1.7e-6). 2e-5: 10x (it was 1e-5, 6x over the measured
    # error). A wrong tap, padding or dilation is O(1) off.
    assert r['max_rel_err'] < 2e-5, r
    assert r['xla_ms'] > 0 and r['conv2d_ms'] > 0
    assert (r['tap_grad_ms'] is not None) == (r['kernel'] == 3 and r['dilation'] == 1)
  assert '| aspp 3x3 rate 18 | 2² | 2048→256 |' in capsys.readouterr().out


def test_ablation_report_tables_and_paired_deltas(tmp_path):
  """The ablation's Markdown: final and best per arm, per-seed paired deltas with 95% CIs."""
  from cac_jax.bench import ablation

  def arm(finals, bests):
    runs = [
      {
        'seed': i,
        'final_miou': f,
        'curve': [(40, f / 2), (80, b), (120, f)],
        'active_frac_12_last': None,
      }
      for i, (f, b) in enumerate(zip(finals, bests))
    ]
    return ablation.aggregate(runs)

  results = {
    'frac_1_16': {
      'supervised': arm([0.30, 0.20, 0.25], [0.30, 0.22, 0.26]),
      'cac': arm([0.31, 0.22, 0.28], [0.35, 0.23, 0.28]),
    }
  }
  out = tmp_path / 'abl'
  ablation.write_outputs(results, out, 'cmd', {'seeds': 3, 'steps': 120, 'unsup_start': 40})
  md = out.with_suffix('.md').read_text()
  # final 30, 20, 25 -> 25.0 ± 5.0; best 30 (a tie at 120 and 80 keeps the
  # earlier step), 22, 26 -> 26.0 ± 4.0.
  assert '| supervised | 25.0 ± 5.0 / 26.0 ± 4.0 |' in md
  # Paired final deltas +1, +2, +3 points: mean 2, sd 1, t(0.975, 2) = 4.3027
  # -> half-width 4.3027 / sqrt(3) = 2.484: [-0.5, +4.5].
  assert '| frac_1_16 | cac | 31.0, 35.0 @ 80; 22.0, 23.0 @ 80; 28.0, 28.0 @ 80 |' in md
  assert '| +2.0 [-0.5, +4.5] |' in md
  assert (
    '| frac_1_16 | supervised | 30.0, 30.0 @ 80; 20.0, 22.0 @ 80; 25.0, 26.0 @ 80 | – | – |' in md
  )
  assert out.with_suffix('.png').stat().st_size > 0
  assert json.loads(out.with_suffix('.json').read_text())['meta']['steps'] == 120
  # The report can be made again from the JSON alone, with the same tables.
  again = tmp_path / 'again'
  ablation.report_from_json(out.with_suffix('.json'), again)
  table = lambda text: [l for l in text.splitlines() if l.startswith('|')]
  assert table(again.with_suffix('.md').read_text()) == table(md)


def test_paired_interval_matches_the_t_formula():
  from cac_jax.bench import ablation

  mean, low, high = ablation.paired_interval([1.0, 2.0, 3.0])
  assert mean == 2.0 and abs(low - (2 - 2.4841)) < 1e-3 and abs(high - (2 + 2.4841)) < 1e-3


def test_profile_step_names_the_slow_ops(capsys):
  """`python -m cac_jax.bench.profile_step` on the tiny net: op kinds, and the
  top ops traced back to the model layer that produced them."""
  from cac_jax.bench import profile_step

  assert (
    profile_step.main(
      ['--backbone=resnet_tiny', '--crop=64', '--labeled=2', '--steps=1', '--warmup=1', '--top=5']
    )
    == 0
  )
  out = capsys.readouterr().out
  assert '| op kind | ms/step |' in out
  rows = [l for l in out.splitlines() if l.startswith('| ') and 'DeepLabV3Plus' in l]
  assert rows, out  # at least one top op is attributed to a layer
