"""Tiny: the smallest end-to-end CAC run (seconds per step on a laptop CPU).

Used by the tests and by launch/local_multiprocess.sh:

  python -m cac_jax.main --config=configs/tiny.py --workdir=workdirs/tiny

resnet_tiny on 24 embedded 64x64 images, 4 steps, DC loss from step 2 with
the positive threshold off (a random network is never confident, so with the
paper's 0.75 no anchor would be active). Checks plumbing, not accuracy.
"""

from cac_jax.config_lib import base_config


def get_config():
  c = base_config()
  c.data.name = 'embedded'
  c.data.embedded.num_train = 24
  c.data.embedded.num_val = 8
  c.data.embedded.image_size = 64
  c.data.num_labeled = 8
  c.data.crop_size = 64
  c.data.base_size = 64
  c.data.labeled_batch_size = 8
  c.data.unlabeled_batch_size = 8
  c.data.eval_batch_size = 8
  c.model.backbone = 'resnet_tiny'
  c.model.proj_dim = 32
  c.init_from = ''
  c.cac.unsup_start_step = 2
  c.cac.pos_threshold = 0.0
  c.total_steps = 4
  c.log_every = 1
  c.eval_every = 4
  c.checkpoint_every = 2
  return c
