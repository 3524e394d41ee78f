"""Supervised-only baseline for voc_r101.py.

  python -m cac_jax.main --config=configs/voc_r101_supervised.py:split=1323 \
      --config.data.root=/data/VOCdevkit/VOC2012 \
      --config.init_from=weights/resnet101.msgpack --workdir=gs://BUCKET/voc_r101_sup_1323

Published (supervised only, R101): 66.4 / 71.0 / 73.5 / 77.7 mIoU.
"""

from configs import voc_r101


def get_config(arg=None):
  config = voc_r101.get_config(arg)
  config.cac.supervised_only = True
  return config
