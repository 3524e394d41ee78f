"""Supervised-only baseline for cityscapes_r50.py.

  python -m cac_jax.main --config=configs/cityscapes_r50_supervised.py:split=372 \
      --config.data.root=/data/cityscapes \
      --config.init_from=weights/resnet50.msgpack --workdir=gs://BUCKET/cs_r50_sup_372

Published (supervised only, R50): 66.0 / 70.7 / 77.7 mIoU for 1/8 / 1/4 / full.
"""

from configs import cityscapes_r50


def get_config(arg=None):
  config = cityscapes_r50.get_config(arg)
  config.cac.supervised_only = True
  return config
