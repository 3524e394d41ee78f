"""Train-step report for one accelerator: time, MFU, the DC loss, before/after.

  python -m cac_jax.bench.gpu_report [--tiny] [--json=out.json]

What `launch/gpu_benchmark.sh` runs. At VOC size (ResNet-50 DeepLabv3+ OS16,
crop 320, 8 labeled + 8 unlabeled images, bfloat16 compute) it prints, per
step kind:

  sup         the supervised-only step;
  cac before  the CAC step with the DC loss as it was before active-anchor
              compaction and bfloat16 matmuls: every anchor scored
              (cac.anchor_block = 0), float32 operands at HIGHEST precision,
              1,024-negative chunks;
  cac after   the same step with `--after-*` (default: anchor_block 0.125,
              matmul_dtype 'auto' = bfloat16 off CPU, 8,192-negative chunks);

each with the median step time, images/s, GFLOP per step and MFU by two
conventions: every window tap (`cac_jax.bench.flops`, the benchmark's own
count) and real-pixel taps only (taps over zero padding or between a strided
layer's input-gradient pixels left out, 2 FLOPs per multiply-accumulate: the
convention of XLA's CPU cost analysis), and the DC loss's share: timed alone
at the step's shapes (`bench.step_time.dc_loss_share`) and, for the after
step, measured inside the step from a profile (ops under the loss's name
scope, `losses.DC_SCOPE`). Then the DC loss alone at the VOC size (both
directions, 12,800 anchors each × 51,200 negatives) for several variants
(`cac_jax.bench.dc_loss`), and the profile's top op kinds and ops.

A compacted DC loss runs a while loop over anchor blocks, which the FLOP
count takes once (one block): its GFLOP per step is one block's work, not the
dense loss's.

`--tiny`: resnet_tiny, crop 64, 2 + 2 images, float32, 2 steps and a smaller
DC-alone problem: the same code path, a CPU check of the script.
"""

import argparse
import collections
import json
import os
import re
import sys
import time

import jax

from cac_jax import losses, negative_lse, optim, sharding
from cac_jax import train_state as state_lib
from cac_jax import train_step as step_lib
from cac_jax.bench import dc_loss as dc_bench
from cac_jax.bench import flops as flops_lib
from cac_jax.bench import profile_step
from cac_jax.bench import step_time as bench
from cac_jax.models import build_model

# The DC loss before this change, as the GPU script ran it (chunk 1,024).
BEFORE = dict(anchor_block=0.0, matmul_dtype='float32', chunk_size=1024)


def real_tap_gflop(config, with_dc: bool) -> float:
  """The step's GFLOP with convolutions counted over real input taps only."""
  mesh = sharding.make_mesh(jax.devices()[:1])
  model = build_model(config.model, num_classes=config.data.num_classes)
  tx, _ = optim.make_optimizer(config.optim, config.total_steps)
  with jax.set_mesh(mesh):
    init = state_lib.make_init_fn(model, tx, config)
    state = jax.eval_shape(init, jax.random.key(0))
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
    batch = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), bench.synthetic_batch(config, with_dc)
    )
    step = step_lib.make_train_step(model, tx, config, shardings, with_dc=with_dc)
    return flops_lib.traced_flops(step, state, batch, real_taps=True)['flops'] / 1e9


def profile_summary(config, *, steps: int, warmup: int, top: int):
  """(op kinds ms, top ops [(op, ms, shape, op_name)], DC ms, total ms) per step."""
  per_op, hlo = profile_step.profile(config, with_dc=True, steps=steps, warmup=warmup)
  index = profile_step._op_index(hlo)
  kinds = collections.Counter()
  for op, ms in per_op.items():
    kinds[re.sub(r'[.\d]+$', '', op)] += ms
  dc_ms = sum(ms for op, ms in per_op.items() if losses.DC_SCOPE in index[op][1])
  ops = [(op, ms, *index[op]) for op, ms in per_op.most_common(top)]
  return kinds.most_common(12), ops, dc_ms, sum(per_op.values())


def _step_config(args, *, mode, dc):
  return bench.bench_config(
    backbone=args.backbone,
    crop=args.crop,
    labeled=args.labeled,
    unlabeled=args.unlabeled,
    dtype=args.dtype,
    supervised_only=mode == 'sup',
    chunk_size=dc['chunk_size'],
    dc_matmul_dtype=dc['matmul_dtype'],
    dc_anchor_block=dc['anchor_block'],
  )


def _fmt_mfu(gflop, step_s, peak):
  return f'{100 * gflop * 1e9 / step_s / peak:.1f}%' if peak else '–'


TABLE = (
  '| step | DC loss | step s | images/s | GFLOP/step (every tap) '
  '| GFLOP/step (real taps) | MFU every tap | MFU real taps '
  '| DC alone s (share) | DC in step, profile ms (share) |\n'
  '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|'
)


def _table_row(r):
  dc = f'{r["dc_s"]:.4f} ({100 * r["dc_share"]:.0f}%)' if 'dc_s' in r else '–'
  prof = (
    f'{r["profile_dc_ms"]:.2f} ({100 * r["profile_dc_share"]:.0f}%)'
    if 'profile_dc_ms' in r
    else '–'
  )
  return (
    f'| {r["mode"]} | {r["dc_variant"]} | {r["step_s"]:.4f} '
    f'| {r["images_per_s"]:.1f} | {r["gflop_per_step"]:.1f} '
    f'| {r["gflop_real_per_step"]:.1f} | {r["mfu_every_tap"]} '
    f'| {r["mfu_real_taps"]} | {dc} | {prof} |'
  )


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m cac_jax.bench.gpu_report', description=__doc__.splitlines()[0]
  )
  parser.add_argument(
    '--tiny', action='store_true', help='resnet_tiny, crop 64, 2+2, float32: a CPU check'
  )
  parser.add_argument('--steps', type=int, default=0, help='timed steps (0: 10, tiny 2)')
  parser.add_argument('--after-anchor-block', type=float, default=negative_lse.DEFAULT_ANCHOR_BLOCK)
  parser.add_argument(
    '--after-matmul-dtype', default='auto', choices=('auto', 'float32', 'bfloat16')
  )
  parser.add_argument('--after-chunk-size', type=int, default=8192)
  parser.add_argument(
    '--dc-variants',
    default='dense/bf16,compact/bf16,compact:0.0625/bf16,compact:0.25/bf16,compact/bf16/static',
    help='DC loss alone: bench.dc_loss variants, timed at each chunk '
    'of --dc-chunks after the dense float32 loss',
  )
  parser.add_argument(
    '--dc-chunks',
    default='8192,51200',
    help='DC loss alone: negatives per chunk (51,200 = all at once)',
  )
  parser.add_argument('--top', type=int, default=15, help='profile: top ops printed')
  parser.add_argument('--json', default='')
  args = parser.parse_args(argv)
  # The profile attributes ops to the DC loss by their op_name metadata, which
  # the persistent cache otherwise leaves out of its key: an executable
  # compiled before a name scope changed would come back with stale names.
  jax.config.update('jax_compilation_cache_include_metadata_in_key', True)
  tiny = args.tiny
  args.backbone, args.crop = ('resnet_tiny', 64) if tiny else ('resnet50', 320)
  args.labeled = args.unlabeled = 2 if tiny else 8
  args.dtype = 'float32' if tiny else 'bfloat16'
  steps = args.steps or (2 if tiny else 10)
  warmup = 1 if tiny else 2
  dev = jax.devices()[0]
  after = dict(
    anchor_block=args.after_anchor_block,
    matmul_dtype=args.after_matmul_dtype,
    chunk_size=args.after_chunk_size,
  )
  after_name = (
    f'block {after["anchor_block"]:g}, '
    f'{negative_lse.resolve_matmul_dtype(after["matmul_dtype"], dev.platform)}, '
    f'chunk {after["chunk_size"]:,}'
  )
  before_name = 'dense, float32 HIGHEST, chunk 1,024'
  header = (
    f'# train-step report on {dev.device_kind} ({dev.platform}), jax '
    f'{jax.__version__}: {args.backbone} OS16, crop {args.crop}, '
    f'{args.labeled}+{args.unlabeled} images, {args.dtype}, {steps} timed steps '
    f'after {warmup}; load average {os.getloadavg()[0]:.2f}'
  )
  print(header, flush=True)
  t_start = time.perf_counter()
  results = []

  def dump():
    if args.json:
      with open(args.json, 'w') as f:
        json.dump(
          {'header': header, 'argv': sys.argv[1:] if argv is None else argv, 'results': results},
          f,
          indent=1,
        )

  plan = [
    ('sup', '–', BEFORE),
    ('cac', f'before: {before_name}', BEFORE),
    ('cac', f'after: {after_name}', after),
  ]
  peak = None
  for mode, name, dc in plan:
    config = _step_config(args, mode=mode, dc=dc)
    r = bench.benchmark(config, with_dc=mode == 'cac', steps=steps, warmup=warmup, dc_share=True)
    peak, _ = bench.peak_flops(dev, args.dtype)
    r['gflop_real_per_step'] = real_tap_gflop(config, mode == 'cac')
    r['mfu_every_tap'] = _fmt_mfu(r['gflop_per_step'], r['step_s'], peak)
    r['mfu_real_taps'] = _fmt_mfu(r['gflop_real_per_step'], r['step_s'], peak)
    r.update(dc_variant=name, **{f'dc_{k}': v for k, v in dc.items()})
    results.append(r)
    print(
      f'{mode} ({name}): step {r["step_s"]:.4f} s, {r["images_per_s"]:.1f} images/s, '
      f'compile {r["compile_s"]:.1f} s',
      flush=True,
    )
    dump()

  kinds, ops, dc_ms, total_ms = profile_summary(
    _step_config(args, mode='cac', dc=after), steps=2, warmup=1, top=args.top
  )
  results[-1].update(
    profile_dc_ms=dc_ms,
    profile_total_ms=total_ms,
    profile_dc_share=dc_ms / total_ms if total_ms else 0.0,
  )
  print(
    f'\n## Profile of the cac step (after): op time per step, {total_ms:.2f} ms in '
    f"all (ops may overlap on CPU), {dc_ms:.2f} ms under the DC loss's name scope\n"
  )
  print('| op kind | ms/step |\n|---|---:|')
  for kind, ms in kinds:
    print(f'| {kind} | {ms:.3f} |')
  print('\n| op | ms/step | output | produced by |\n|---|---:|---|---|')
  for op, ms, shape, op_name in ops:
    print(f'| {op} | {ms:.3f} | {shape[:40]} | {op_name[-70:]} |')

  n, k = (512, 2048) if tiny else (12_800, 51_200)
  specs = [v for v in args.dc_variants.split(',') if v]
  print(
    f'\n## DC loss alone, fwd+bwd, both directions, {n:,} anchors each x {k:,} '
    f'negatives x {dc_bench.DIM}-d (the dense float32 loss at chunk 1,024, as '
    'before, then per chunk the variants; differences vs the dense float32 loss '
    'at that chunk)\n'
  )
  print(dc_bench.HEADER)
  dc_rows = []
  chunks = dict.fromkeys(min(int(c), k) for c in args.dc_chunks.split(',') if c)
  for i, chunk in enumerate([1024, *chunks]):
    rows = dc_bench.measure_variants(
      n, k, ['dense/f32'] + (specs if i else []), both_directions=True, chunk_size=chunk, repeats=3
    )
    for r in rows[1:] if i else rows:
      dc_rows.append(r)
      print(dc_bench._row(r, 'alone'), flush=True)
  results.append({'dc_alone': dc_rows})
  dump()

  print(
    f'\n{header}\nMFU peak: {bench.peak_flops(dev, args.dtype)[1]}; DC alone = '
    "dc_loss_from_views fwd+bwd at the step's shapes (share of the step); "
    f'report took {time.perf_counter() - t_start:.0f} s.'
  )
  if args.json:
    print(f'wrote {args.json}')
  print()
  print(TABLE)
  for r in results[:3]:
    print(_table_row(r))
  return 0


if __name__ == '__main__':
  sys.exit(main())
