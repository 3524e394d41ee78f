"""Where a train step's time goes: time per compiled op, from a profiler trace.

  python -m cac_jax.bench.profile_step --backbone=resnet50 --crop=320 \
      --labeled=2 --unlabeled=2 --mode=sup [--top=25] [--convs=xla]

Builds the same step as `cac_jax.bench.step_time` (synthetic batches, full
bank), runs it `--warmup` times, traces `--steps` steps with
`jax.profiler`, and prints the op time per step: totals by op kind (the
fusion name without its number) and the `--top` single ops, each with its
output shape and the model path that produced it (the HLO `op_name`), so a
slow layer can be found by name. On a multi-threaded backend ops may overlap,
so per-op times can add up to more than the step.
"""

import argparse
import collections
import contextlib
import glob
import gzip
import json
import re
import sys
import tempfile

import jax

from cac_jax import optim, sharding
from cac_jax import train_state as state_lib
from cac_jax import train_step as step_lib
from cac_jax.bench import step_time as bench
from cac_jax.models import build_model, layers


def _op_index(hlo_text: str) -> dict:
  """HLO instruction name -> (output shape, op_name metadata)."""
  index = {}
  for m in re.finditer(r'^\s*%?([\w.\-]+) = (\S+) [^\n]*', hlo_text, re.M):
    op_name = re.search(r'op_name="([^"]*)"', m.group(0))
    index[m.group(1)] = (m.group(2), op_name.group(1) if op_name else '')
  return index


def profile(config, *, with_dc: bool, steps: int = 2, warmup: int = 2):
  """Returns ({op: ms per step}, compiled HLO text)."""
  mesh = sharding.make_mesh(jax.devices()[:1])
  model = build_model(config.model, num_classes=config.data.num_classes)
  tx, _ = optim.make_optimizer(config.optim, config.total_steps)
  with jax.set_mesh(mesh):
    state, shardings = state_lib.create_sharded_state(
      model, tx, config, mesh, jax.random.key(config.seed)
    )
    batch = sharding.to_global(bench.synthetic_batch(config, with_dc), mesh)
    step = step_lib.make_train_step(model, tx, config, shardings, with_dc=with_dc)
    compiled = step.lower(state, batch).compile()
    for _ in range(warmup):
      state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as trace_dir:
      jax.profiler.start_trace(trace_dir)
      for _ in range(steps):
        state, _ = compiled(state, batch)
        jax.block_until_ready(state)
      jax.profiler.stop_trace()
      (trace_file,) = glob.glob(f'{trace_dir}/**/*.trace.json.gz', recursive=True)
      with gzip.open(trace_file) as f:
        events = json.load(f)['traceEvents']
  hlo = compiled.as_text()
  ops = set(_op_index(hlo))
  return op_times(events, ops, steps), hlo


def op_times(events, ops, steps: int) -> collections.Counter:
  """{HLO op: ms per step} from trace events of `steps` steps.

  On CPU an op's event is named by the op; on GPU a kernel's event is named
  by the kernel (e.g. a cuBLAS gemm) and names its op in args['hlo_op'].
  """
  per_op = collections.Counter()
  for e in events:
    if e.get('ph') != 'X':
      continue
    name = (e.get('args') or {}).get('hlo_op', e.get('name'))
    if name in ops:
      per_op[name] += e['dur'] / 1e3 / steps
  return per_op


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m cac_jax.bench.profile_step')
  parser.add_argument('--backbone', default='resnet50', choices=bench.BACKBONES)
  parser.add_argument('--crop', type=int, default=160)
  parser.add_argument('--labeled', type=int, default=4)
  parser.add_argument('--unlabeled', type=int, default=4)
  parser.add_argument('--dtype', default='float32', choices=bench.DTYPES)
  parser.add_argument('--mode', default='sup', choices=bench.MODES)
  parser.add_argument('--convs', default='rewritten', choices=('rewritten', 'xla'))
  parser.add_argument('--steps', type=int, default=2)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--top', type=int, default=25)
  args = parser.parse_args(argv)
  config = bench.bench_config(
    backbone=args.backbone,
    crop=args.crop,
    labeled=args.labeled,
    unlabeled=args.unlabeled,
    dtype=args.dtype,
    supervised_only=args.mode == 'sup',
  )
  with layers.xla_convolutions() if args.convs == 'xla' else contextlib.nullcontext():
    per_op, hlo = profile(config, with_dc=args.mode == 'cac', steps=args.steps, warmup=args.warmup)
  index = _op_index(hlo)
  kinds = collections.Counter()
  for op, ms in per_op.items():
    kinds[re.sub(r'[.\d]+$', '', op)] += ms
  print(
    f'# {args.mode} step, {args.backbone}, crop {args.crop}, {args.dtype}, '
    f'convs={args.convs}, {jax.default_backend()}: op time, ms per step '
    f'(sum {sum(per_op.values()):.0f})'
  )
  print('\n| op kind | ms/step |\n|---|---:|')
  for kind, ms in kinds.most_common(12):
    print(f'| {kind} | {ms:.1f} |')
  print('\n| op | ms/step | output | produced by |\n|---|---:|---|---|')
  for op, ms in per_op.most_common(args.top):
    shape, op_name = index[op]
    print(f'| {op} | {ms:.1f} | {shape} | {op_name[-70:]} |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
