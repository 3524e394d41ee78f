"""The authors' optimiser: SGD with momentum, weight decay and poly decay.

torch's `SGD(weight_decay=wd, momentum=m)` adds `wd * param` to the gradient
before the momentum buffer; `add_decayed_weights` followed by `sgd` is the
same update. The backbone (everything under params['backbone']) learns at
`backbone_lr_mult` times the head learning rate.
"""

import jax
import optax


def poly_schedule(base_lr: float, total_steps: int, power: float = 0.9):
  """lr(step) = base_lr * (1 - step / total_steps) ** power, per step, no warm-up."""

  def schedule(step):
    frac = jax.numpy.clip(step / total_steps, 0.0, 1.0)
    return base_lr * (1.0 - frac) ** power

  return schedule


def param_groups(params):
  """'backbone' for every leaf under params['backbone'], 'head' otherwise."""
  return {
    k: jax.tree.map(lambda _, k=k: 'backbone' if k == 'backbone' else 'head', v)
    for k, v in params.items()
  }


def make_optimizer(optim_config, total_steps: int):
  """Returns (optax transform, head lr schedule) for the config's `optim` block."""

  def sgd(lr_mult):
    schedule = poly_schedule(optim_config.lr * lr_mult, total_steps, optim_config.poly_power)
    return optax.chain(
      optax.add_decayed_weights(optim_config.weight_decay),
      optax.sgd(schedule, momentum=optim_config.momentum),
    ), schedule

  head_tx, head_schedule = sgd(1.0)
  backbone_tx, _ = sgd(optim_config.backbone_lr_mult)
  tx = optax.multi_transform({'head': head_tx, 'backbone': backbone_tx}, param_groups)
  return tx, head_schedule
