"""Supervised-only baseline for voc_r50.py (no unlabeled stream at all).

  python -m cac_jax.main --config=configs/voc_r50_supervised.py:split=1323 \
      --config.data.root=/data/VOCdevkit/VOC2012 \
      --config.init_from=weights/resnet50.msgpack --workdir=gs://BUCKET/voc_r50_sup_1323

Published (supervised only, R50): 63.9 / 68.3 / 71.2 / 76.3 mIoU for
1/16 / 1/8 / 1/4 / full. Same as `configs/voc_r50.py:split=1323,supervised=1`.
"""

from configs import voc_r50


def get_config(arg=None):
  config = voc_r50.get_config(arg)
  config.cac.supervised_only = True
  return config
