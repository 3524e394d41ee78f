"""Input data: datasets as `Source`s, decoding, validation, and tf.data pipelines.

This package (and only it) imports TensorFlow. Datasets: `embedded` (texture
mosaics, the offline default), `voc` (VOC 2012 + SBD), `cityscapes`, `folder`
(custom images/masks/splits); `sources.get_source(config.data, split)`
dispatches on `config.data.name`, and `validate.validate_dataset` checks a
dataset on the host before training.
"""
