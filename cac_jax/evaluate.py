"""Exact mIoU over the whole validation set, on all hosts.

The eval pipeline pads every image to a common size (label 255 in the
padding) and pads the image list with invalid entries so that every host runs
the same number of batches; invalid entries and ignore pixels add nothing to
the confusion matrix, so each val pixel is counted exactly once.
"""
import jax
import jax.numpy as jnp
import numpy as np

from cac_jax import sharding

IGNORE = 255


def predict_logits(model, variables, images, *, flip: bool = False):
  """Full-image logits [B,H,W,K] float32; `flip` averages with the mirrored image."""
  logits = model.apply(variables, images, train=False)['logits']
  if flip:
    flipped = model.apply(variables, images[:, :, ::-1], train=False)['logits']
    logits = 0.5 * (jax.nn.softmax(logits) + jax.nn.softmax(flipped[:, :, ::-1]))
  return logits


def confusion_matrix(pred, label, valid_image, num_classes: int):
  """[K, K] int32 counts, rows = ground truth, cols = prediction.

  Pixels labelled 255 (ignore, or padding) and images with valid_image=False
  are left out.
  """
  keep = (label != IGNORE) & valid_image[:, None, None]
  index = jnp.where(keep, label * num_classes + pred, 0)
  counts = jnp.zeros((num_classes * num_classes,), jnp.int32).at[
      index.reshape(-1)].add(keep.reshape(-1).astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


def make_eval_step(model, num_classes: int, mesh, *, flip: bool = False):
  """jit((params, batch_stats), batch) -> replicated confusion matrix [K, K]."""
  def step(variables, batch):
    logits = predict_logits(model, variables, batch['image'], flip=flip)
    pred = jnp.argmax(logits, axis=-1)
    return confusion_matrix(pred, batch['label'], batch['valid'], num_classes)
  return jax.jit(step, out_shardings=sharding.replicated(mesh))


def scores(confusion: np.ndarray, class_names=()) -> dict:
  """mIoU, per-class IoU and pixel accuracy from a confusion matrix.

  Like the authors' code, IoU_c = inter_c / (union_c + eps) and the mean runs
  over ALL classes, so a class absent from both prediction and ground truth
  counts as 0; on the full VOC/Cityscapes val sets every class is present.
  """
  conf = np.asarray(confusion, np.float64)
  inter = np.diag(conf)
  union = conf.sum(0) + conf.sum(1) - inter
  iou = inter / (union + np.spacing(1))
  out = {'miou': float(iou.mean()),
         'pixel_acc': float(inter.sum() / max(conf.sum(), 1.0))}
  names = list(class_names) or [str(i) for i in range(len(iou))]
  out.update({f'iou/{n}': float(v) for n, v in zip(names, iou)})
  return out


def evaluate(eval_step, variables, batches, mesh, num_classes: int) -> np.ndarray:
  """Runs `eval_step` over an iterable of host batches; returns the int64 confusion."""
  total = np.zeros((num_classes, num_classes), np.int64)
  for host_batch in batches:
    conf = eval_step(variables, sharding.to_global(host_batch, mesh))
    total += np.asarray(jax.device_get(conf), np.int64)
  return total
