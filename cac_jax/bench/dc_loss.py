"""Benchmark: forward+backward time and memory of the directional contrastive loss.

  python -m cac_jax.bench.dc_loss [--cases=voc,sweep,issue8] \
      [--variants=dense,compact] [--repeats=3] [--json=out.json]

Cases (128-d features, τ = 0.1, the VOC R50 switches: γ = 0.75, directional,
negatives filtered by pseudo-label):

  voc     both directions, 12,800 anchors each (8 images × 40 × 40 stride-8
          cells) × 51,200 negatives (this step's cells of both views + a
          one-step bank): the size of the VOC train step, half of whose cells
          are in the overlap;
  sweep   one direction, 12,800 anchors × K ∈ `--sweep-negatives` (the batch
          alone up to a 4-step bank), chunk `--chunk-size`;
  issue8  both directions, 6,400 anchors each × 51,200 negatives, for each
          chunk of `--issue8-chunks` (the time/memory trade-off).

Variants (`--variants`, comma list; each is `impl[:block][/option...]`):

  dense             every anchor scored (the path before active-anchor
                    compaction; `anchor_block=0`);
  compact[:f]       only the anchors with w > 0, in blocks of a fraction f
                    of the anchors (default `negative_lse.DEFAULT_ANCHOR_BLOCK`);
  /static           the static shift 1/τ instead of the positive logit;
  /nofilter         no pseudo-label filter (what the filter's comparison
                    costs: no formulation without it can be faster);
  /bf16, /f32, /auto  matmul operands (default: float32, HIGHEST).

All variants of a case are compiled first, then timed round-robin
(`--repeats` rounds, after one warm-up call each), so load on a shared
machine hits them alike; the median wall time and the median CPU seconds of
this process are reported (on a shared CPU the CPU seconds are the steadier
figure). Every variant's loss and gradients are compared with the first
variant's (`max_rel_diff`: the loss's relative difference and the largest
gradient difference over the largest gradient entry). Memory comes from
XLA's compile-time `memory_analysis()`: `temp` is the scratch the program
needs beyond its inputs and outputs, `peak` = arguments + outputs + temp.
Nothing here imports TensorFlow.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cac_jax import losses, negative_lse

DIM = 128
NUM_CLASSES = 21
TEMPERATURE = 0.1
MIB = 2.0**20
CASES = ('voc', 'sweep', 'issue8')
_DTYPES = {'bf16': 'bfloat16', 'f32': 'float32', 'auto': 'auto'}


def _unit(rng, shape):
  x = rng.normal(size=shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_inputs(num_anchors, num_negatives, seed=0):
  """Random unit-norm features, confidences and labels of benchmark size.

  Half the anchors are valid (in the overlap) and confidences are uniform in
  [0.3, 1], so ~15% of the anchors are active per direction (w = 1), as in
  VOC steps (15-25%).
  """
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


def parse_variant(spec: str) -> dict:
  """'compact:0.0625/static/bf16' -> loss keyword arguments (and the name)."""
  head, *options = spec.split('/')
  impl, _, block = head.partition(':')
  if impl not in ('dense', 'compact') or (block and impl == 'dense'):
    raise ValueError(f'variant {spec!r}: starts with dense or compact[:fraction]')
  kw = dict(
    anchor_block=0.0 if impl == 'dense' else float(block or negative_lse.DEFAULT_ANCHOR_BLOCK),
    shift='positive',
    filter_negatives=True,
    matmul_dtype='float32',
  )
  for option in options:
    if option == 'static':
      kw['shift'] = 'static'
    elif option == 'nofilter':
      kw['filter_negatives'] = False
    elif option in _DTYPES:
      kw['matmul_dtype'] = _DTYPES[option]
    else:
      raise ValueError(f'variant {spec!r}: unknown option {option!r}')
  negative_lse.anchor_block_rows(kw['anchor_block'], 1)  # range check
  return kw


def _loss_fn(both_directions, loss_kw):
  def fn(anchor, target, inputs):
    # In training both views' features carry gradients (view 1 anchors
    # 1->2, view 2 anchors 2->1), so differentiate w.r.t. both.
    rest = {k: v for k, v in inputs.items() if k not in ('anchor', 'target')}
    loss = losses.directional_contrastive_loss(anchor, target, **rest, **loss_kw)
    if both_directions:
      loss = loss + losses.directional_contrastive_loss(
        target,
        anchor,
        **dict(rest, anchor_conf=inputs['target_conf'], target_conf=inputs['anchor_conf']),
        **loss_kw,
      )
    return loss

  return fn


def _active(inputs, both_directions):
  """Active anchors per direction (w = 1) under the benchmark's switches."""
  dirs = [('anchor_conf', 'target_conf')] + (
    [('target_conf', 'anchor_conf')] if both_directions else []
  )
  return [
    int(
      jnp.sum(
        losses.contrastive_weights(
          inputs[a], inputs[t], inputs['valid'], pos_threshold=0.75, directional=True
        )
      )
    )
    for a, t in dirs
  ]


def _rows_scored(n, active, anchor_block):
  """Anchor rows the loss scores per direction (all N on the dense path)."""
  rows = negative_lse.anchor_block_rows(anchor_block, n)
  if not rows:
    return [n] * len(active)
  return [min(n, -(-a // rows) * rows) if a else 0 for a in active]


def measure_variants(
  num_anchors, num_negatives, specs, *, both_directions=False, chunk_size=1024, repeats=3
):
  """Compiles every variant of one problem, then times them round-robin."""
  inputs = make_inputs(num_anchors, num_negatives)
  args = (inputs['anchor'], inputs['target'], inputs)
  active = _active(inputs, both_directions)
  runs = []
  for spec in specs:
    kw = parse_variant(spec)
    loss_kw = dict(
      kw, temperature=TEMPERATURE, pos_threshold=0.75, directional=True, chunk_size=chunk_size
    )
    t0 = time.perf_counter()
    compiled = (
      jax.jit(jax.value_and_grad(_loss_fn(both_directions, loss_kw), argnums=(0, 1)))
      .lower(*args)
      .compile()
    )
    compile_s = time.perf_counter() - t0
    out = jax.device_get(compiled(*args))  # warm-up, and the values
    runs.append(
      dict(spec=spec, kw=kw, compiled=compiled, compile_s=compile_s, out=out, walls=[], cpus=[])
    )
  for _ in range(repeats):
    for run in runs:
      c0, w0 = time.process_time(), time.perf_counter()
      jax.block_until_ready(run['compiled'](*args))
      run['walls'].append(time.perf_counter() - w0)
      run['cpus'].append(time.process_time() - c0)
  directions = 2 if both_directions else 1
  dense_flop = 2 * 2 * directions * num_anchors * num_negatives * DIM
  ref_loss, ref_grads = runs[0]['out']
  scale = max(float(np.abs(g).max()) for g in ref_grads)
  results = []
  for run in runs:
    loss, grads = run['out']
    mem = run['compiled'].memory_analysis()
    rows = _rows_scored(num_anchors, active, run['kw']['anchor_block'])
    wall = statistics.median(run['walls'])
    results.append(
      dict(
        variant=run['spec'],
        **{k: v for k, v in run['kw'].items()},
        anchors=num_anchors,
        negatives=num_negatives,
        dim=DIM,
        directions=directions,
        chunk_size=chunk_size,
        temperature=TEMPERATURE,
        active=active,
        rows_scored=rows,
        wall_s=wall,
        wall_all_s=run['walls'],
        cpu_s=statistics.median(run['cpus']),
        cpu_all_s=run['cpus'],
        compile_s=run['compile_s'],
        temp_mib=mem.temp_size_in_bytes / MIB,
        peak_mib=(
          mem.argument_size_in_bytes
          + mem.output_size_in_bytes
          + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes
        )
        / MIB,
        gflop=dense_flop / 1e9,
        gflop_scored=dense_flop * sum(rows) / (directions * num_anchors) / 1e9,
        loss=float(loss),
        loss_rel_diff=abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)),
        grad_rel_diff=max(float(np.abs(g - r).max()) for g, r in zip(grads, ref_grads)) / scale,
      )
    )
  return results


def _row(r, label):
  rows = '+'.join(f'{x:,}' for x in r['rows_scored'])
  return (
    f'| {label} | {r["variant"]} | {r["anchors"]:,} | {r["negatives"]:,} | '
    f'{r["chunk_size"]:,} | {rows} | {r["wall_s"]:.3f} | {r["cpu_s"]:.3f} | '
    f'{r["temp_mib"]:.0f} | {r["peak_mib"]:.0f} | '
    f'{r["loss_rel_diff"]:.1e} / {r["grad_rel_diff"]:.1e} |'
  )


HEADER = (
  '| case | variant | anchors/dir | negatives | chunk | rows scored/dir '
  '| fwd+bwd s (median) | CPU s (median) | temp MiB | peak MiB '
  '| vs first: loss / grad |\n'
  '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|'
)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--json', default='', help='write all results here')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--cases', default=','.join(CASES))
  parser.add_argument(
    '--variants',
    '--dc_impl',
    default='dense,compact',
    help='comma list of impl[:block][/option...], see above',
  )
  parser.add_argument(
    '--chunk-size',
    '--chunk_size',
    type=int,
    default=1024,
    help='chunk size of the voc and sweep cases',
  )
  parser.add_argument('--sweep-negatives', default='25600,51200,102400,204800')
  parser.add_argument('--issue8-chunks', default='512,1024,2048,8192')
  args = parser.parse_args(argv)
  cases = [c for c in args.cases.split(',') if c]
  specs = [v for v in args.variants.split(',') if v]
  for case in cases:
    if case not in CASES:
      parser.error(f'--cases: {case!r} is not one of {CASES}')
  for spec in specs:
    try:
      parse_variant(spec)
    except ValueError as e:
      parser.error(str(e))

  load = os.getloadavg()
  header = (
    f'# DC loss fwd+bwd on {jax.devices()[0].device_kind} '
    f'({jax.default_backend()}, {os.cpu_count()} CPUs, '
    f'{platform.processor() or platform.machine()}), jax {jax.__version__}, '
    f'load average {load[0]:.2f} at the start'
  )
  print(header)
  print(f'variants: {specs}; {args.repeats} timed rounds, round-robin\n')
  print(HEADER, flush=True)
  plan = []
  if 'voc' in cases:
    plan.append(
      (
        'voc',
        dict(
          num_anchors=12_800, num_negatives=51_200, both_directions=True, chunk_size=args.chunk_size
        ),
      )
    )
  if 'sweep' in cases:
    plan += [
      ('sweep', dict(num_anchors=12_800, num_negatives=int(k), chunk_size=args.chunk_size))
      for k in args.sweep_negatives.split(',')
      if k
    ]
  if 'issue8' in cases:
    plan += [
      (
        'issue8',
        dict(num_anchors=6_400, num_negatives=51_200, both_directions=True, chunk_size=int(c)),
      )
      for c in args.issue8_chunks.split(',')
      if c
    ]
  results = []
  for case, kw in plan:
    for r in measure_variants(**kw, specs=specs, repeats=args.repeats):
      results.append(dict(r, case=case))
      print(_row(r, case), flush=True)
  print(f'\nload average at the end: {os.getloadavg()[0]:.2f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(
        dict(
          header=header,
          device=str(jax.devices()[0]),
          jax=jax.__version__,
          argv=sys.argv[1:] if argv is None else argv,
          load_start=load,
          load_end=os.getloadavg(),
          results=results,
        ),
        f,
        indent=1,
      )
    print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
