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

import numpy as np
from jax.extend import core as jex_core


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


def _real_pairs(size, taps, out, stride, pad_low, lhs_dilation, rhs_dilation) -> int:
  """(output position, kernel tap) pairs of one spatial dim whose input is real.

  In the padded, lhs-dilated input, output o's tap t reads position
  o·stride + t·rhs_dilation; real pixels sit at pad_low + i·lhs_dilation,
  0 <= i < size. Everything else is zero padding or an inserted zero.
  """
  pos = np.arange(out)[:, None] * stride + np.arange(taps)[None, :] * rhs_dilation - pad_low
  real = (pos >= 0) & (pos % lhs_dilation == 0) & (pos // lhs_dilation < size)
  return int(real.sum())


def _eqn_real_flops(eqn) -> int:
  """As `_eqn_flops`, but a convolution counts only taps over real input.

  2 FLOPs per multiply-accumulate whose input pixel is neither zero padding
  nor a zero inserted between pixels (the input gradient of a strided
  layer). Per spatial dimension the real (output, tap) pairs are counted;
  the dimensions are independent, so the count is their product.
  """
  if eqn.primitive.name != 'conv_general_dilated':
    return _eqn_flops(eqn)
  p = eqn.params
  lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  dn = p['dimension_numbers']
  pairs, out_spatial = 1, 1
  for i, (l, r, o) in enumerate(zip(dn.lhs_spec[2:], dn.rhs_spec[2:], dn.out_spec[2:])):
    pairs *= _real_pairs(
      lhs[l],
      rhs[r],
      out[o],
      p['window_strides'][i],
      p['padding'][i][0],
      p['lhs_dilation'][i],
      p['rhs_dilation'][i],
    )
    out_spatial *= out[o]
  return 2 * (_size(out) // out_spatial) * pairs * rhs[dn.rhs_spec[1]]


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


def count(jaxpr: Any, *, real_taps: bool = False) -> dict:
  """{'flops': int, 'while_loops': int} of a (Closed)Jaxpr.

  real_taps: count a convolution's taps over real input pixels only
  (`_eqn_real_flops`), the convention of XLA's own cost analysis on CPU;
  by default every window tap.
  """
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  eqn_flops = _eqn_real_flops if real_taps else _eqn_flops
  total, loops = 0, 0
  for eqn in jaxpr.eqns:
    total += eqn_flops(eqn)
    if eqn.primitive.name == 'while':
      loops += 1
    for sub, mult in _sub_jaxprs(eqn):
      if sub == 'max':
        counts = [count(b, real_taps=real_taps) for b in mult]
        total += max(c['flops'] for c in counts)
        loops += max(c['while_loops'] for c in counts)
        continue
      c = count(sub, real_taps=real_taps)
      total += mult * c['flops']
      loops += c['while_loops']
  return {'flops': total, 'while_loops': loops}


def traced_flops(jitted_fn, *args, real_taps: bool = False) -> dict:
  """`count` of `jitted_fn.trace(*args)` (a `jax.jit`-wrapped function)."""
  return count(jitted_fn.trace(*args).jaxpr, real_taps=real_taps)
