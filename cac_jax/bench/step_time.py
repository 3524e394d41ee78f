"""Benchmark: one jitted CAC train step (compile, step time, FLOPs, memory).

  python -m cac_jax.bench.step_time --backbone=resnet50 --crop=160 \
      --labeled=4 --unlabeled=4 --dtype=float32,bfloat16 --modes=sup,cac \
      --steps=10 --json=out.json

For each (dtype, mode) it builds the real train step
(`cac_jax.train_step.make_train_step`: model, SGD, bank, DC loss) on a 1-D
mesh of `--devices` devices (default 1) and feeds it SYNTHETIC device
batches of the real shapes: normalised N(0, 1) images, labels uniform in
[0, K), valid CAC overlap boxes (offsets of ±crop/4 snapped to multiples of
8) and random flips. Modes:

  sup  the supervised-only step: one labeled pass, CE only.
  cac  the full CAC step (with_dc=True): labeled pass + two unlabeled view
       passes + DC loss against this step's negatives and a FULL feature bank
       of `--bank-steps` steps (the steady state) + the bank write.

Reported per configuration:
  compile_s          lower + compile of the step (excluded from all timings);
  step_s             median wall time of `--steps` steps after `--warmup`
                     steps, each blocked on its whole output (state + metrics);
  images_per_s       images per step / step_s, images = labeled (+ 2 ×
                     unlabeled views in cac mode);
  gflop_per_step     the step's convolution and matmul FLOPs counted from its
                     jaxpr (`cac_jax.bench.flops`: the same on every backend,
                     scan bodies × their length, so the chunked DC loss is
                     counted in full); XLA's own cost analyses are kept in the
                     JSON (gflop_compiled, gflop_lowered) — XLA:GPU's omits
                     the cuDNN convolutions;
  gflop_per_s, mfu   achieved FLOP/s, and on H100/H200 that over the peak
                     (bf16 dense 989 TFLOP/s; float32 counted against TF32
                     495 TFLOP/s, because XLA's DEFAULT matmul precision uses
                     TF32 tensor cores on these GPUs; against fp32 67 TFLOP/s
                     with --precision=highest); None elsewhere;
  device_peak_mib    arguments + outputs + temp − aliased, from the compiled
                     step's `memory_analysis()`; on GPU also the allocator's
                     `peak_bytes_in_use` (device_alloc_peak_mib);
  host_rss_mib       peak resident set of this process (getrusage);
  cpu_over_wall      process CPU seconds / wall seconds over the timed steps
                     (on a CPU backend: how many cores XLA kept busy);
  cpu_step_s         process CPU seconds per timed step (on a shared CPU,
                     the cost of a step without the neighbours' share);
  dc_s, dc_share     (cac only) `losses.dc_loss_from_views` forward+backward
                     alone at the step's shapes (proj/logits of both views,
                     full bank), median time and its share of step_s.

`dc_analytic_gflop` gives the DC loss's matmul FLOPs (fwd + bwd, both
directions) for comparison. `--dc-matmul-dtype` sets `cac.matmul_dtype` (the
row's `dc_matmul_resolved` says what 'auto' chose) and `--dc-anchor-block`
`cac.anchor_block` (0: every anchor scored, the loss's dense path), and
`--fused-passes` `cac.fused_passes` (on/off/auto: the CAC step's three
network passes as one call; the row's `fused_passes` says what ran).

`--torch` (CPU backend, float32 rows) also builds the authors' PyTorch step
of the same shapes on the same batch (`cac_jax.bench.torch_step`: the same
network from torch.nn primitives, NCHW float32, their DC loss, torch SGD)
and times it INTERLEAVED with the JAX step, step for step in one process
(torch's threads = the cores this process may use), so their ratio holds on
the machine that runs it, busy or not. Extra fields: torch_step_s (median),
torch_cpu_step_s, torch_over_jax (ratio of medians), torch_over_jax_pairs
(median of the per-pair ratios: the robust figure on a shared machine),
torch_over_jax_cpu, torch_dc_s (their DC loss alone, cac rows); the JSON
also says whether the machine was already loaded when the run began
(`under_load`: 1-minute load average above 0.5 before any work). The four
CPU rows (docs/cpu_torch_ratio.json) are two runs, crop 160 with 4 (+ 4) and
crop 320 with 2 (+ 2) images:

  python -m cac_jax.bench.step_time --torch --crop=160 --labeled=4 \
      --unlabeled=4 --steps=5 --warmup=1 --json=torch_160.json
  python -m cac_jax.bench.step_time --torch --crop=320 --labeled=2 \
      --unlabeled=2 --steps=5 --warmup=1 --json=torch_320.json

CPU threads: XLA:CPU keeps both cores of the development machine busy in
both steps (cpu_over_wall 1.9-2.0 on an idle machine); an earlier reading of
0.98 for the CAC step was the machine's load, not XLA.

Nothing here imports TensorFlow, clu or ml_collections (the config is a plain
namespace with the fields the train step reads), so it runs on a bare
JAX + flax + optax machine.
"""

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from cac_jax import backbones, losses, negative_lse, optim, sharding
from cac_jax import bank as bank_lib
from cac_jax import train_state as state_lib
from cac_jax import train_step as step_lib
from cac_jax.bench import flops as flops_lib
from cac_jax.constants import FEATURE_STRIDE
from cac_jax.models import build_model, layers

MIB = 2.0**20
# The backbone table's names when this module was imported (--backbone's
# choices; bench/profile_step.py reads them too).
BACKBONES = backbones.names()
DTYPES = ('float32', 'bfloat16')
MODES = ('sup', 'cac')
# Dense peak FLOP/s per chip (NVIDIA datasheets, SXM): (dtype, precision) ->
# (FLOP/s, description). H200 has the H100's tensor cores.
GPU_PEAKS = {
  ('bfloat16', 'default'): (989e12, 'bf16 dense 989 TFLOP/s'),
  ('bfloat16', 'highest'): (989e12, 'bf16 dense 989 TFLOP/s'),
  ('float32', 'default'): (495e12, 'tf32 dense 495 TFLOP/s'),
  ('float32', 'highest'): (67e12, 'fp32 non-tensor 67 TFLOP/s'),
}


def _ns(**kw):
  """A nested attribute namespace (what the train step reads of a config)."""
  return types.SimpleNamespace(**kw)


def bench_config(
  *,
  backbone='resnet50',
  crop=320,
  labeled=8,
  unlabeled=8,
  dtype='float32',
  output_stride=16,
  chunk_size=1024,
  bank_steps=1,
  num_classes=21,
  proj_dim=128,
  neg_per_image=0,
  supervised_only=False,
  dc_matmul_dtype='auto',
  dc_anchor_block=0.125,
  fused_passes='auto',
):
  """The fields of a cac_jax config that the model, optimiser and step read.

  Values are the paper's VOC settings (configs/voc_r50.py, docs/method.md §4-5)
  except where a flag overrides them; tests/test_bench.py checks that every
  field exists in `config_lib.base_config()` with the same meaning.
  """
  return _ns(
    seed=0,
    total_steps=92560,
    data=_ns(
      crop_size=crop,
      labeled_batch_size=labeled,
      unlabeled_batch_size=unlabeled,
      num_classes=num_classes,
    ),
    model=_ns(
      backbone=backbone, output_stride=output_stride, projector=True, proj_dim=proj_dim, dtype=dtype
    ),
    cac=_ns(
      supervised_only=supervised_only,
      weight=0.1,
      temperature=0.1,
      pos_threshold=0.75,
      directional=True,
      filter_negatives=True,
      bank_steps=bank_steps,
      neg_per_image=neg_per_image,
      chunk_size=chunk_size,
      matmul_dtype=dc_matmul_dtype,
      anchor_block=dc_anchor_block,
      fused_passes=fused_passes,
    ),
    bn=_ns(running_stats='all'),
    optim=_ns(lr=0.01, backbone_lr_mult=0.1, momentum=0.9, weight_decay=1e-4, poly_power=0.9),
  )


def synthetic_boxes(crop: int, n: int):
  """Valid overlap boxes of n view pairs: int32 [n, 4] each, (t, l, b, r).

  View 2 is view 1 shifted by (dy, dx) = (±s, ±s), s = crop/4 snapped down
  to a multiple of 8 (at least 8), signs alternating over the batch; the
  boxes follow docs/method.md §2 step 4 for an unpadded image.
  """
  s = max(FEATURE_STRIDE, crop // 4 // FEATURE_STRIDE * FEATURE_STRIDE)
  box1, box2 = [], []
  for i in range(n):
    dy = s if i % 2 == 0 else -s
    dx = s if i % 4 < 2 else -s
    box1.append([max(0, dy), max(0, dx), min(crop, crop + dy), min(crop, crop + dx)])
    box2.append([max(0, -dy), max(0, -dx), min(crop, crop - dy), min(crop, crop - dx)])
  return np.asarray(box1, np.int32), np.asarray(box2, np.int32)


def synthetic_batch(config, with_dc: bool, seed: int = 0) -> dict:
  """Host numpy batch of the train step's shapes (see train_step docstring)."""
  rng = np.random.default_rng(seed)
  c, k = config.data.crop_size, config.data.num_classes
  n_lab, n_un = config.data.labeled_batch_size, config.data.unlabeled_batch_size
  image = lambda n: rng.standard_normal((n, c, c, 3), dtype=np.float32)
  batch = {
    'labeled': {'image': image(n_lab), 'label': rng.integers(0, k, (n_lab, c, c), dtype=np.int32)}
  }
  if with_dc:
    box1, box2 = synthetic_boxes(c, n_un)
    batch['unlabeled'] = {
      'image1': image(n_un),
      'image2': image(n_un),
      'box1': box1,
      'box2': box2,
      'flip1': rng.random(n_un) < 0.5,
      'flip2': rng.random(n_un) < 0.5,
    }
  return batch


def _cost_flops(compiled) -> float:
  """FLOPs of a lowered/compiled computation from XLA's cost analysis (0 if absent)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX returned one dict per device
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', 0.0))


def _memory_mib(compiled) -> float | None:
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return (
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    + mem.temp_size_in_bytes
    - mem.alias_size_in_bytes
  ) / MIB


def _alloc_peak_mib(device) -> float | None:
  """The allocator's peak (GPU/TPU); None where the backend keeps no stats."""
  try:
    stats = device.memory_stats()
  except Exception:  # CPU clients raise or return None, depending on version
    return None
  if not stats or 'peak_bytes_in_use' not in stats:
    return None
  return stats['peak_bytes_in_use'] / MIB


def _host_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _timed(fn, steps: int):
  """Runs fn() `steps` times; returns (wall times [s], total CPU s, total wall s)."""
  walls = []
  c0, w0 = time.process_time(), time.perf_counter()
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    walls.append(time.perf_counter() - t)
  return walls, time.process_time() - c0, time.perf_counter() - w0


def peak_flops(device, dtype: str, precision: str = 'default'):
  """(peak FLOP/s, description) of `device` for `dtype`, or (None, reason)."""
  kind = getattr(device, 'device_kind', '')
  if device.platform == 'gpu' and ('H100' in kind or 'H200' in kind):
    return GPU_PEAKS[(dtype, precision)]
  return None, f'no peak known for {device.platform} {kind!r}'


def dc_loss_share(model, variables, config, bank, steps: int, warmup: int):
  """Times losses.dc_loss_from_views fwd+bwd alone at the step's shapes.

  The projected features and logits of both views come from one eval_shape of
  the model (so their shapes and dtypes are the step's), filled with random
  unit-norm features / logits; the bank is the step's (full) bank. The
  gradient is taken w.r.t. both views' features, as in training.

  Returns:
    {'dc_s': median seconds, 'dc_compile_s', 'dc_gflop' (cost analysis),
     'dc_analytic_gflop' (matmul FLOPs fwd+bwd, both directions)}.
  """
  n, c = config.data.unlabeled_batch_size, config.data.crop_size
  x = jax.ShapeDtypeStruct((n, c, c, 3), jnp.float32)
  out, _ = jax.eval_shape(
    lambda v, im: model.apply(
      v,
      im,
      train=True,
      dc_outputs=True,
      rngs={'dropout': jax.random.key(0)},
      mutable=['batch_stats'],
    ),
    variables,
    x,
  )
  keys = jax.random.split(jax.random.key(1), 4)
  unit = lambda k, s: (lambda f: f / jnp.linalg.norm(f, axis=-1, keepdims=True))(
    jax.random.normal(k, s.shape, s.dtype)
  )
  proj1, proj2 = unit(keys[0], out['proj8']), unit(keys[1], out['proj8'])
  logits1 = jax.random.normal(keys[2], out['logits8'].shape, out['logits8'].dtype)
  logits2 = jax.random.normal(keys[3], out['logits8'].shape, out['logits8'].dtype)
  box1, box2 = synthetic_boxes(c, n)
  flips = np.arange(n) % 2 == 0
  bank = bank if bank is not None else bank_lib.init_bank(0, proj1.shape[-1])
  cac = config.cac

  def loss(p1, p2):
    value, _ = losses.dc_loss_from_views(
      p1,
      p2,
      logits1,
      logits2,
      box1,
      box2,
      flips,
      ~flips,
      bank.feats,
      bank.labels,
      jnp.ones_like(bank.valid),
      key=jax.random.key(2),
      **losses.dc_options(cac),
    )
    return value

  t0 = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(proj1, proj2).compile()
  compile_s = time.perf_counter() - t0
  run = lambda: jax.block_until_ready(compiled(proj1, proj2))
  for _ in range(warmup):
    run()
  walls, _, _ = _timed(run, steps)
  b, h, w, d = proj1.shape
  anchors = b * h * w
  cells = h * w if not cac.neg_per_image else cac.neg_per_image
  negatives = 2 * b * cells + bank.feats.shape[0]
  # Per direction: anchors x negatives dot products of length d, forward (1
  # matmul) and backward w.r.t. the anchors (1 matmul), 2 FLOPs per MAC.
  analytic = 2 * 2 * 2 * anchors * negatives * d
  return {
    'dc_s': statistics.median(walls),
    'dc_compile_s': compile_s,
    'dc_gflop': _cost_flops(compiled) / 1e9,
    'dc_analytic_gflop': analytic / 1e9,
  }


def benchmark(
  config,
  *,
  with_dc: bool,
  steps: int = 10,
  warmup: int = 2,
  devices=None,
  precision: str = 'default',
  dc_share: bool = True,
  torch_baseline: bool = False,
  torch_chunk: int | None = None,
) -> dict:
  """Compiles and times one train-step configuration.

  Args:
    config: a `bench_config(...)` namespace (or a full cac_jax config).
    with_dc: False = supervised-only step; True = full CAC step (the config
      must have cac.supervised_only False).
    steps, warmup: timed steps and untimed steps after compilation.
    devices: the mesh's devices (default: the first device only).
    precision: 'default' | 'highest' matmul precision (selects the MFU peak;
      set jax_default_matmul_precision yourself to change what runs).
    dc_share: also time the DC loss alone (cac mode only).
    torch_baseline: also build the PyTorch step on the same host batch and
      time the two interleaved (module docstring; CPU, float32).
    torch_chunk: the PyTorch DC loss's chunk (default the authors' 8,000).

  Returns:
    A flat dict of the fields listed in the module docstring.
  """
  devices = list(devices) if devices is not None else jax.devices()[:1]
  mesh = sharding.make_mesh(devices)
  d = config.data
  sharding.check_batch_divisible('labeled', d.labeled_batch_size, mesh)
  if with_dc:
    if config.cac.supervised_only:
      raise ValueError('with_dc=True needs config.cac.supervised_only=False.')
    sharding.check_batch_divisible('unlabeled', d.unlabeled_batch_size, mesh)
  model = build_model(config.model, num_classes=d.num_classes)
  tx, _ = optim.make_optimizer(config.optim, config.total_steps)
  with jax.set_mesh(mesh):
    state, state_shardings = state_lib.create_sharded_state(
      model, tx, config, mesh, jax.random.key(config.seed)
    )
    if state.bank is not None:
      # Steady state: a full bank (every row valid), so the DC loss does the
      # work of a trained run, not of step 0.
      bank = state.bank
      state = state.replace(
        bank=bank.replace(
          feats=jax.random.normal(jax.random.key(3), bank.feats.shape)
          / np.sqrt(bank.feats.shape[1]),
          valid=jnp.ones_like(bank.valid),
        )
      )
    host_batch = synthetic_batch(config, with_dc)
    batch = sharding.to_global(host_batch, mesh)
    step = step_lib.make_train_step(model, tx, config, state_shardings, with_dc=with_dc)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    # XLA's cost analyses, kept for reference: XLA:GPU turns convolutions
    # into cuDNN custom calls that its compiled analysis counts as 0 FLOPs,
    # and both count a loop body once.
    flops_compiled = _cost_flops(compiled)
    flops_lowered = _cost_flops(lowered)
    # The program's own conv + matmul FLOPs, the same on every backend
    # (cac_jax/bench/flops.py): what MFU is computed from.
    counted = flops_lib.traced_flops(step, state, batch)
    flops = counted['flops']

    def run():
      nonlocal state
      state, metrics = compiled(state, batch)  # the state is donated
      jax.block_until_ready((state, metrics))
      return metrics

    baseline = None
    if torch_baseline:
      from cac_jax.bench import torch_step as torch_lib  # imports torch

      baseline = torch_lib.TorchTrainStep(
        config, host_batch, with_dc=with_dc, chunk_size=torch_chunk or torch_lib.AUTHORS_CHUNK
      )
    for _ in range(warmup):
      metrics = run()
      if baseline is not None:
        baseline()
    load_before = os.getloadavg()
    if baseline is None:
      walls, cpu_s, wall_s = _timed(run, steps)
    else:
      timing = torch_lib.time_interleaved(run, baseline, steps)
      walls, cpu_s, wall_s = (timing['jax_walls'], sum(timing['jax_cpu']), sum(timing['jax_walls']))
    load_after = os.getloadavg()
    metrics = jax.device_get(run())
    extra = {}
    if with_dc and dc_share:
      variables = {'params': state.params, 'batch_stats': state.batch_stats}
      extra = dc_loss_share(model, variables, config, state.bank, max(3, steps // 2), 1)
    if baseline is not None:
      extra['torch_loss'] = baseline()
      extra['torch_chunk_size'] = baseline.chunk_size
      if with_dc and dc_share:
        extra['torch_dc_s'] = torch_lib.time_dc_loss(baseline, max(3, steps // 2))
  step_s = statistics.median(walls)
  images = d.labeled_batch_size + (2 * d.unlabeled_batch_size if with_dc else 0)
  peak, peak_name = peak_flops(devices[0], config.model.dtype, precision)
  flops_per_s = flops / step_s
  result = {
    'mode': 'cac' if with_dc else 'sup',
    'backbone': config.model.backbone,
    'dtype': config.model.dtype,
    'crop': d.crop_size,
    'labeled': d.labeled_batch_size,
    'unlabeled': d.unlabeled_batch_size if with_dc else 0,
    'output_stride': config.model.output_stride,
    'chunk_size': config.cac.chunk_size,
    'bank_steps': config.cac.bank_steps,
    'bank_rows': 0 if state.bank is None else int(state.bank.feats.shape[0]),
    'devices': len(devices),
    'device_kind': devices[0].device_kind,
    'platform': devices[0].platform,
    'steps': steps,
    'warmup': warmup,
    'compile_s': compile_s,
    'step_s': step_s,
    'step_all_s': walls,
    'images_per_step': images,
    'images_per_s': images / step_s,
    'gflop_per_step': flops / 1e9,
    'gflop_per_s': flops_per_s / 1e9,
    'gflop_compiled': flops_compiled / 1e9,
    'gflop_lowered': flops_lowered / 1e9,
    'jaxpr_while_loops': counted['while_loops'],
    'peak_flops': peak,
    'peak_name': peak_name,
    'mfu': flops_per_s / peak if peak else None,
    'dc_matmul_dtype': config.cac.matmul_dtype,
    'dc_matmul_resolved': negative_lse.resolve_matmul_dtype(
      config.cac.matmul_dtype, devices[0].platform
    ),
    'dc_anchor_block': config.cac.anchor_block,
    'fused_passes': step_lib.fused_passes(config.cac) if with_dc else None,
    'device_peak_mib': _memory_mib(compiled),
    'device_alloc_peak_mib': _alloc_peak_mib(devices[0]),
    'host_rss_mib': _host_rss_mib(),
    'cpu_over_wall': cpu_s / wall_s,
    # CPU seconds per step: on a shared CPU host this is what the step costs
    # when the wall time also counts the neighbours' share of the cores.
    'cpu_step_s': cpu_s / steps,
    'loadavg_before': load_before,
    'loadavg_after': load_after,
    'loss': float(metrics['loss']),
  }
  if baseline is not None:
    result.update(torch_lib.summary(timing, images))
  result.update(extra)
  if 'dc_s' in result:
    result['dc_share'] = result['dc_s'] / step_s
  return result


HEADER = (
  '| mode | dtype | backbone | crop | batch | compile s | step s (median) '
  '| images/s | GFLOP/step | GFLOP/s | MFU | device MiB | host RSS MiB '
  '| CPU/wall | CPU s/step | DC loss s (share) | load 1 min |\n'
  '|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|'
)


def table_row(r: dict) -> str:
  batch = f'{r["labeled"]}+{r["unlabeled"]}' if r['mode'] == 'cac' else f'{r["labeled"]}'
  mfu = f'{100 * r["mfu"]:.1f}%' if r['mfu'] is not None else '–'
  dc = f'{r["dc_s"]:.3f} ({100 * r["dc_share"]:.0f}%)' if 'dc_s' in r else '–'
  mem = r['device_peak_mib']  # the allocator peak (JSON) spans the process
  return (
    f'| {r["mode"]} | {r["dtype"]} | {r["backbone"]} | {r["crop"]} | {batch} '
    f'| {r["compile_s"]:.1f} | {r["step_s"]:.3f} | {r["images_per_s"]:.1f} '
    f'| {r["gflop_per_step"]:.1f} | {r["gflop_per_s"]:.1f} | {mfu} '
    f'| {mem:.0f} | {r["host_rss_mib"]:.0f} | {r["cpu_over_wall"]:.2f} '
    f'| {r["cpu_step_s"]:.2f} '
    f'| {dc} | {r["loadavg_before"][0]:.2f} |'
  )


TORCH_HEADER = (
  '| mode | crop | batch | JAX step s | PyTorch step s | PyTorch / JAX '
  '(medians) | PyTorch / JAX (per pair) | JAX CPU s/step '
  '| PyTorch CPU s/step | JAX DC s | PyTorch DC s | load 1 min |\n'
  '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|'
)


def torch_row(r: dict) -> str:
  """A row of the interleaved PyTorch comparison (rows run with --torch)."""
  batch = f'{r["labeled"]}+{r["unlabeled"]}' if r['mode'] == 'cac' else f'{r["labeled"]}'
  dc = lambda key: f'{r[key]:.3f}' if key in r else '–'
  return (
    f'| {r["mode"]} | {r["crop"]} | {batch} | {r["step_s"]:.3f} '
    f'| {r["torch_step_s"]:.3f} | {r["torch_over_jax"]:.2f} '
    f'| {r["torch_over_jax_pairs"]:.2f} | {r["cpu_step_s"]:.2f} '
    f'| {r["torch_cpu_step_s"]:.2f} | {dc("dc_s")} | {dc("torch_dc_s")} '
    f'| {r["loadavg_before"][0]:.2f} |'
  )


# A 1-minute load average above this before the run means others share the CPU.
BUSY_LOAD = 0.5


def _csv(value: str, allowed, name: str, parser) -> list[str]:
  items = [v.strip() for v in value.split(',') if v.strip()]
  bad = [v for v in items if v not in allowed]
  if not items or bad:
    parser.error(f'--{name}={value!r}: each item must be one of {list(allowed)}')
  return items


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m cac_jax.bench.step_time', description=__doc__.splitlines()[0]
  )
  parser.add_argument('--backbone', default='resnet50', choices=backbones.names())
  parser.add_argument('--crop', type=int, default=320)
  parser.add_argument('--labeled', type=int, default=8, help='global labeled batch')
  parser.add_argument(
    '--unlabeled', type=int, default=8, help='global unlabeled batch (each gives 2 views)'
  )
  parser.add_argument(
    '--dtype', default='float32', help='comma list of float32,bfloat16 (compute dtype)'
  )
  parser.add_argument('--modes', default='sup,cac', help='comma list of sup,cac')
  parser.add_argument('--steps', type=int, default=10, help='timed steps')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps after compilation')
  parser.add_argument(
    '--output-stride',
    '--output_stride',
    type=int,
    default=16,
    choices=backbones.HEAD_STRIDES,
    help='one the backbone supports (cac_jax/backbones.py)',
  )
  parser.add_argument(
    '--chunk-size', '--chunk_size', type=int, default=1024, help='DC loss negatives per chunk'
  )
  parser.add_argument(
    '--dc-matmul-dtype',
    '--dc_matmul_dtype',
    default='auto',
    choices=('auto', 'float32', 'bfloat16', 'compute'),
    help="DC-loss matmul operands (cac.matmul_dtype); 'compute' = "
    "the --dtype of each row; 'auto' = bfloat16 off CPU",
  )
  parser.add_argument(
    '--dc-anchor-block',
    '--dc_anchor_block',
    type=float,
    default=0.125,
    help='cac.anchor_block: active anchors scored in blocks of this '
    'fraction of the anchors; 0 = every anchor (dense)',
  )
  parser.add_argument(
    '--convs',
    default='rewritten',
    choices=('rewritten', 'xla'),
    help="'xla': plain XLA convolutions, without conv2d's rewrites "
    '(cac_jax.models.layers.conv2d), to time the difference',
  )
  parser.add_argument(
    '--bank-steps',
    '--bank_steps',
    type=int,
    default=1,
    help='previous steps in the feature bank (VOC R50: 1)',
  )
  parser.add_argument(
    '--devices', type=int, default=1, help='devices in the mesh (batches are split over them)'
  )
  parser.add_argument(
    '--precision',
    default='default',
    choices=('default', 'highest'),
    help='matmul precision (also sets jax_default_matmul_precision)',
  )
  parser.add_argument('--no-dc-share', action='store_true', help='skip timing the DC loss alone')
  parser.add_argument(
    '--torch',
    action='store_true',
    help="also time the authors' PyTorch step, interleaved with "
    'ours (CPU backend, float32 rows; cac_jax/bench/torch_step.py)',
  )
  parser.add_argument(
    '--torch-chunk',
    '--torch_chunk',
    type=int,
    default=0,
    help="PyTorch DC-loss chunk of negatives (0: the authors' 8000)",
  )
  parser.add_argument(
    '--torch-threads',
    '--torch_threads',
    type=int,
    default=0,
    help='torch intra-op threads (0: the cores this process may use)',
  )
  parser.add_argument(
    '--fused-passes',
    '--fused_passes',
    default='auto',
    choices=('auto', 'on', 'off'),
    help="cac.fused_passes: the CAC step's three passes as one call "
    "('auto': on GPU/TPU); the row's fused_passes says what ran",
  )
  parser.add_argument('--json', default='', help='write all results here')
  args = parser.parse_args(argv)
  dtypes = _csv(args.dtype, DTYPES, 'dtype', parser)
  modes = _csv(args.modes, MODES, 'modes', parser)
  if args.crop < 32 or args.crop % FEATURE_STRIDE:
    parser.error(
      f'--crop={args.crop} must be a multiple of {FEATURE_STRIDE} and >= 32 '
      f'(the DC loss works on the stride-{FEATURE_STRIDE} grid)'
    )
  supported = backbones.get(args.backbone).output_strides
  if args.output_stride not in supported:
    parser.error(
      f'--output-stride={args.output_stride} is not supported by '
      f'{args.backbone} (it supports {supported})'
    )
  if (
    min(args.labeled, args.unlabeled, args.steps, args.chunk_size) < 1
    or min(args.warmup, args.bank_steps) < 0
  ):
    parser.error(
      'need --labeled, --unlabeled, --steps, --chunk-size >= 1 and --warmup, --bank-steps >= 0'
    )
  available = jax.devices()
  if not 1 <= args.devices <= len(available):
    parser.error(
      f'--devices={args.devices}: this machine has {len(available)} '
      f'{available[0].platform} device(s)'
    )
  for name in ('labeled', 'unlabeled'):
    if getattr(args, name) % args.devices:
      parser.error(
        f'--{name}={getattr(args, name)} must be a multiple of '
        f'--devices={args.devices} (batch sizes are global)'
      )
  if args.torch:
    if available[0].platform != 'cpu':
      parser.error(
        '--torch times PyTorch on the CPU beside JAX on the same cores; '
        'run it on a CPU backend (JAX_PLATFORMS=cpu)'
      )
    if args.backbone not in ('resnet50', 'resnet101', 'resnet_tiny'):
      parser.error(
        f'--torch has a PyTorch network for resnet50, resnet101 and '
        f'resnet_tiny, not {args.backbone}'
      )
    if 'float32' not in dtypes:
      parser.error("--torch compares float32 steps (the authors' dtype); add float32 to --dtype")
    if min(args.torch_chunk, args.torch_threads) < 0:
      parser.error('--torch-chunk and --torch-threads must be >= 0')
  if args.precision == 'highest':
    jax.config.update('jax_default_matmul_precision', 'highest')

  dev = available[0]
  cpu_model = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu_model = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    pass
  header = (
    f'# train step on {args.devices} x {dev.device_kind} ({dev.platform}); '
    f'host {os.cpu_count()} CPUs ({cpu_model}); jax {jax.__version__}; '
    f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; '
    f'load average {os.getloadavg()[0]:.2f}'
  )
  start_load = os.getloadavg()
  meta = {}
  if args.torch:
    from cac_jax.bench import torch_step as torch_lib  # imports torch

    threads = torch_lib.configure_threads(args.torch_threads or None)
    busy = start_load[0] > BUSY_LOAD
    meta = {
      'torch_version': torch_lib.torch.__version__,
      'torch_threads': threads,
      'cpus': os.cpu_count(),
      'load_at_start': start_load,
      'under_load': busy,
      'load_note': (
        f'under load: 1-minute load average {start_load[0]:.2f} on '
        f'{os.cpu_count()} CPUs before the run (other work shared the cores); '
        'absolute times are inflated, the per-pair ratio is the robust figure'
        if busy
        else f'idle at start (load average {start_load[0]:.2f})'
      ),
    }
    header += f'; torch {meta["torch_version"]} ({threads} threads)'
  print(header, flush=True)
  if meta:
    print(f'# {meta["load_note"]}', flush=True)
  results = []
  for dtype in dtypes:
    for mode in modes:
      config = bench_config(
        backbone=args.backbone,
        crop=args.crop,
        labeled=args.labeled,
        unlabeled=args.unlabeled,
        dtype=dtype,
        output_stride=args.output_stride,
        chunk_size=args.chunk_size,
        bank_steps=args.bank_steps,
        supervised_only=mode == 'sup',
        dc_matmul_dtype=dtype if args.dc_matmul_dtype == 'compute' else args.dc_matmul_dtype,
        dc_anchor_block=args.dc_anchor_block,
        fused_passes=args.fused_passes,
      )
      with layers.xla_convolutions() if args.convs == 'xla' else contextlib.nullcontext():
        r = benchmark(
          config,
          with_dc=mode == 'cac',
          steps=args.steps,
          warmup=args.warmup,
          devices=available[: args.devices],
          precision=args.precision,
          dc_share=not args.no_dc_share,
          torch_baseline=args.torch and dtype == 'float32',
          torch_chunk=args.torch_chunk or None,
        )
      r['convs'] = args.convs
      results.append(r)
      print(
        f'{mode} {dtype}: compile {r["compile_s"]:.1f} s, step '
        f'{r["step_s"]:.3f} s, {r["images_per_s"]:.1f} images/s',
        flush=True,
      )
      if 'torch_step_s' in r:
        print(
          f'{mode} {dtype}: PyTorch step {r["torch_step_s"]:.3f} s, PyTorch/JAX '
          f'{r["torch_over_jax"]:.2f} (per pair {r["torch_over_jax_pairs"]:.2f})',
          flush=True,
        )
      if args.json:  # after every row, so a run cut short keeps what it measured
        with open(args.json, 'w') as f:
          json.dump(
            {
              'header': header,
              'argv': sys.argv[1:] if argv is None else argv,
              **meta,
              'results': results,
            },
            f,
            indent=1,
          )
  peaks = sorted({r['peak_name'] for r in results if r['peak_flops']})
  print(
    f'\n{header}\nMFU peak: {", ".join(peaks) or "none (not a known GPU)"}; '
    f'{args.steps} timed steps after {args.warmup} warm-up; synthetic batches; '
    'DC loss = dc_loss_from_views fwd+bwd alone (share of the step).\n'
  )
  if args.json:
    print(f'wrote {args.json}\n')
  print(HEADER)
  for r in results:
    print(table_row(r))
  compared = [r for r in results if 'torch_step_s' in r]
  if compared:
    print(
      f'\nPyTorch {meta["torch_version"]} ({meta["torch_threads"]} threads, NCHW '
      "float32, the authors' step) timed interleaved with the JAX float32 rows; "
      f'{meta["load_note"]}.\n'
    )
    print(TORCH_HEADER)
    for r in compared:
      print(torch_row(r))
  return 0


if __name__ == '__main__':
  sys.exit(main())
