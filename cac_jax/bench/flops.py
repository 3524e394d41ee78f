"""Model FLOPs of a traced JAX function, counted from its jaxpr.

XLA's cost analysis depends on the backend: XLA:GPU turns convolutions into
cuDNN custom calls and counts them as 0 FLOPs. This counts the matrix work
of the program itself (`conv_general_dilated` and `dot_general`, the only
primitives whose cost matters in a CNN train step), so the same number serves
every device and MFU can be computed on GPUs:

  conv: 2 · (output elements) · (kernel taps) · (input features per group);
  dot:  2 · (output elements) · (size of the contracted dimensions).

Sub-programs are followed: jit calls, custom_jvp/custom_vjp calls, remat,
cond (the most expensive branch), scan (body × length) and while loops (body
counted once, as XLA does; `while_loops` in the result says how many were
seen). Every window tap is counted, including taps over zero padding and, for
the input gradient of a strided layer (a convolution with lhs dilation), the
zeros inserted between input pixels; XLA's cost analysis counts only taps
that meet real input, so on a CPU it reports less (R50 crop 160 supervised
step: 167 GFLOP here, 125 from XLA). Code that `jax.vjp` traces but never
uses (e.g. a forward pass inside a backward rule) is counted too; XLA
removes it.
"""
from typing import Any

from jax.extend import core as jex_core
import numpy as np


def _size(shape) -> int:
  return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1


def _eqn_flops(eqn) -> int:
  name = eqn.primitive.name
  if name == 'conv_general_dilated':
    rhs = eqn.invars[1].aval.shape
    rhs_spec = eqn.params['dimension_numbers'].rhs_spec  # (out, in, *spatial)
    taps = _size([rhs[d] for d in rhs_spec[2:]])
    return 2 * _size(eqn.outvars[0].aval.shape) * taps * rhs[rhs_spec[1]]
  if name == 'dot_general':
    (lhs_contract, _), _ = eqn.params['dimension_numbers']
    lhs = eqn.invars[0].aval.shape
    return 2 * _size(eqn.outvars[0].aval.shape) * _size([lhs[d] for d in lhs_contract])
  return 0


def _sub_jaxprs(eqn):
  """(jaxpr, multiplier) pairs of the sub-programs an equation runs."""
  params = eqn.params
  name = eqn.primitive.name
  if name == 'scan':
    return [(params['jaxpr'], int(params['length']))]
  if name == 'cond':
    return [('max', params['branches'])]
  if name == 'while':
    return [(params['body_jaxpr'], 1), (params['cond_jaxpr'], 1)]
  subs = []
  for value in params.values():
    if isinstance(value, (jex_core.Jaxpr, jex_core.ClosedJaxpr)):
      subs.append((value, 1))
  return subs


def count(jaxpr: Any) -> dict:
  """{'flops': int, 'while_loops': int} of a (Closed)Jaxpr."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total, loops = 0, 0
  for eqn in jaxpr.eqns:
    total += _eqn_flops(eqn)
    if eqn.primitive.name == 'while':
      loops += 1
    for sub, mult in _sub_jaxprs(eqn):
      if sub == 'max':
        counts = [count(b) for b in mult]
        total += max(c['flops'] for c in counts)
        loops += max(c['while_loops'] for c in counts)
        continue
      c = count(sub)
      total += mult * c['flops']
      loops += c['while_loops']
  return {'flops': total, 'while_loops': loops}


def traced_flops(jitted_fn, *args) -> dict:
  """`count` of `jitted_fn.trace(*args)` (a `jax.jit`-wrapped function)."""
  return count(jitted_fn.trace(*args).jaxpr)
