"""Benchmark: forward+backward time and memory of the directional contrastive loss.

  python -m cac_jax.bench.dc_loss [--json out.json] [--repeats 3]

Two tables:

1. One direction, N = 12,800 anchors (VOC: 8 images × 40 × 40 stride-8
   cells) against K ∈ {25,600; 51,200; 102,400; 204,800} negatives of 128-d,
   i.e. the batch alone up to a 4-step bank.
2. The issue-8 size: both directions, 6,400 anchors each × 51,200 negatives ×
   128-d, for several chunk sizes (the time/memory trade-off).

Time is the median over `--repeats` runs of `value_and_grad` w.r.t. the
anchors, after AOT compilation and one warm-up call (compile excluded); the
CPU seconds of this process over the same runs are printed too, because on a
shared machine wall time also measures the neighbours. Memory comes from
XLA's compile-time `memory_analysis()`: `temp` is the scratch the program
needs beyond its inputs and outputs, `peak` = arguments + outputs + temp.
Nothing here imports TensorFlow.
"""
import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from cac_jax import losses

DIM = 128
NUM_CLASSES = 21
MIB = 2.0 ** 20


def _unit(rng, shape):
  x = rng.normal(size=shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_inputs(num_anchors, num_negatives, seed=0):
  """Random unit-norm features, confidences and labels of benchmark size."""
  rng = np.random.default_rng(seed)
  n, k = num_anchors, num_negatives
  arrays = dict(
      anchor=_unit(rng, (n, DIM)),
      target=_unit(rng, (n, DIM)),
      anchor_conf=rng.uniform(0.3, 1.0, n).astype(np.float32),
      target_conf=rng.uniform(0.3, 1.0, n).astype(np.float32),
      anchor_label=rng.integers(0, NUM_CLASSES, n).astype(np.int32),
      valid=rng.random(n) < 0.5,
      neg_feats=_unit(rng, (k, DIM)),
      neg_labels=rng.integers(0, NUM_CLASSES, k).astype(np.int32),
      neg_valid=np.ones((k,), bool),
  )
  return {name: jnp.asarray(x) for name, x in arrays.items()}


def measure(num_anchors, num_negatives, *, both_directions=False,
            chunk_size=1024, matmul_dtype='float32', repeats=3,
            temperature=0.1):
  """Times one jitted value_and_grad; returns a dict of results."""
  inputs = make_inputs(num_anchors, num_negatives)
  loss_kw = dict(temperature=temperature, pos_threshold=0.75,
                 directional=True, filter_negatives=True,
                 chunk_size=chunk_size, matmul_dtype=matmul_dtype)

  def fn(anchor, target, inputs):
    # In training both views' features carry gradients (view 1 anchors
    # 1->2, view 2 anchors 2->1), so differentiate w.r.t. both.
    rest = {k: v for k, v in inputs.items() if k not in ('anchor', 'target')}
    loss = losses.directional_contrastive_loss(anchor, target, **rest,
                                               **loss_kw)
    if both_directions:
      loss = loss + losses.directional_contrastive_loss(
          target, anchor, **dict(rest, anchor_conf=inputs['target_conf'],
                                 target_conf=inputs['anchor_conf']),
          **loss_kw)
    return loss

  args = (inputs['anchor'], inputs['target'], inputs)
  t0 = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(
      *args).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  jax.block_until_ready(compiled(*args))  # warm-up
  walls, cpus = [], []
  for _ in range(repeats):
    c0, w0 = time.process_time(), time.perf_counter()
    jax.block_until_ready(compiled(*args))
    walls.append(time.perf_counter() - w0)
    cpus.append(time.process_time() - c0)
  directions = 2 if both_directions else 1
  matmul_flop = 2 * 2 * directions * num_anchors * num_negatives * DIM
  return dict(
      anchors=num_anchors, negatives=num_negatives, dim=DIM,
      directions=directions, chunk_size=chunk_size,
      matmul_dtype=matmul_dtype, temperature=temperature,
      wall_s=statistics.median(walls), wall_all_s=walls,
      cpu_s=statistics.median(cpus), compile_s=compile_s,
      temp_mib=mem.temp_size_in_bytes / MIB,
      peak_mib=(mem.argument_size_in_bytes + mem.output_size_in_bytes +
                mem.temp_size_in_bytes - mem.alias_size_in_bytes) / MIB,
      gflop=matmul_flop / 1e9,
      gflops_per_s=matmul_flop / 1e9 / statistics.median(walls),
      exps_g=directions * num_anchors * num_negatives / 1e9)


def _row(r, label):
  return (f"| {label} | {r['anchors']:,} | {r['negatives']:,} | "
          f"{r['chunk_size']:,} | {r['matmul_dtype']} | {r['wall_s']:.2f} | "
          f"{r['cpu_s']:.2f} | {r['gflops_per_s']:.0f} | {r['temp_mib']:.0f} | "
          f"{r['peak_mib']:.0f} |")


HEADER = ('| case | anchors/dir | negatives | chunk | matmul | fwd+bwd s (median) '
          '| CPU s | matmul GFLOP/s | temp MiB | peak MiB |\n'
          '|---|---|---|---|---|---|---|---|---|---|')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--json', default='', help='write all results here')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--chunk-size', type=int, default=1024,
                      help='chunk size of the K sweep')
  parser.add_argument('--sweep-negatives', default='25600,51200,102400,204800')
  parser.add_argument('--issue8-chunks', default='512,1024,2048,8192')
  parser.add_argument('--bf16', action='store_true',
                      help='also time bfloat16 matmul operands at issue-8 size')
  args = parser.parse_args(argv)

  print(f'# DC loss fwd+bwd on {jax.devices()[0].device_kind} '
        f'({jax.default_backend()}, {os.cpu_count()} CPUs, '
        f'{platform.processor() or platform.machine()}), jax {jax.__version__}')
  print('\nOne direction, 12,800 anchors, 128-d, τ = 0.1:\n')
  print(HEADER)
  results = []
  for k in (int(x) for x in args.sweep_negatives.split(',') if x):
    r = measure(12_800, k, chunk_size=args.chunk_size, repeats=args.repeats)
    results.append(dict(r, case='sweep'))
    print(_row(r, 'sweep'), flush=True)

  print('\nIssue-8 size: both directions, 6,400 anchors each × 51,200 '
        'negatives × 128-d (target ≤ 5 s, ≤ 200 MB extra):\n')
  print(HEADER)
  dtypes = ['float32'] + (['bfloat16'] if args.bf16 else [])
  for dtype in dtypes:
    for chunk in (int(x) for x in args.issue8_chunks.split(',') if x):
      r = measure(6_400, 51_200, both_directions=True, chunk_size=chunk,
                  matmul_dtype=dtype, repeats=args.repeats)
      results.append(dict(r, case='issue8'))
      print(_row(r, 'issue-8'), flush=True)

  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(device=str(jax.devices()[0]), jax=jax.__version__,
                     results=results), f, indent=1)
    print(f'\nwrote {args.json}')


if __name__ == '__main__':
  main()
