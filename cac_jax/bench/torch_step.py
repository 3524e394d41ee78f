"""A PyTorch baseline of the benchmarked train step, timed beside ours.

`python -m cac_jax.bench.step_time --torch ...` builds, for each row, this
module's `TorchTrainStep` on the same host batch as the JAX step and times
the two interleaved in one process (`time_interleaved`), so that their ratio
holds on whatever machine runs it, whatever else that machine is doing.

The step is the authors' PyTorch training step, written from `torch.nn`
primitives (no torchvision):

  network  `cac_jax.bench.torch_deeplab.build_deeplab`: DeepLabv3+ on the
           dilated ResNet (layer4 multi-grid), ASPP 6/12/18 at OS16, decoder,
           classifier; for CAC the 2x2-average-pooled stride-8 features,
           projector and classifier logits8; NCHW float32, train mode
           (BatchNorm batch statistics, dropout), as the authors ran it.
  sup      labeled forward, cross-entropy (ignore 255), backward, SGD.
  cac      three separate passes (labeled, view 1, view 2: each with its own
           BatchNorm batch statistics), cross-entropy + weight x DC loss,
           backward, SGD; then the feature bank keeps this step's negatives.
  SGD      torch.optim.SGD, momentum 0.9, weight decay 1e-4, the backbone at
           lr / 10, poly decay of the lr set each step.

The DC loss (`dc_loss_authors`) is written the authors' way: crop the two
views' features, confidences and pseudo-labels to the overlap (after
flipping flipped views back); positives are the other view's feature there
(detached); negatives are every cell of both views of the batch (detached)
plus the feature bank (a list of past steps' negatives), those with the
anchor's pseudo-label masked out; the directional mask keeps anchors less
confident than their target whose target's confidence exceeds the
threshold; the log-sum-exp runs over chunks of negatives, each chunk under
`torch.utils.checkpoint` (recomputed in the backward pass), shifted by the
maximum logit of the first chunk and the positive, with the authors' eps of
1e-8 inside the ratio and the log. It computes `cac_jax.losses`'s
`dc_loss_from_views` (tests/test_torch_baseline.py checks the value and both
views' gradients in float64 with eps = 0); only the arithmetic differs.

Threads: `configure_threads` gives torch's intra-op pool one thread per core
this process may use (what XLA:CPU uses); the count is in the results.
Importing this module imports torch (the rest of the package never does).
"""

import os
import statistics
import sys
import time

import numpy as np

# torch.utils.checkpoint imports torch._dynamo, which imports triton when it
# is installed (torch's CUDA wheels bring it), and importing triton crashes
# (SIGSEGV) a process that already holds XLA's and TensorFlow's LLVM, as the
# test suite's workers do. This baseline runs on CPU only and needs no
# triton: hide it (torch then reports that triton is absent).
sys.modules.setdefault('triton', None)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.utils.checkpoint  # noqa: E402

from cac_jax.bench import torch_deeplab  # noqa: E402
from cac_jax.constants import FEATURE_STRIDE  # noqa: E402

# The authors' chunk of negatives in the log-sum-exp.
AUTHORS_CHUNK = 8000
AUTHORS_EPS = 1e-8
IGNORE_LABEL = 255


def configure_threads(threads: int | None = None) -> int:
  """Sets torch's intra-op threads (default: the cores this process may use)."""
  threads = threads or len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  return torch.get_num_threads()


# ------------------------------------------------------------------ DC loss


def _overlap_cells(x, box, flip):
  """One view's map [C, h, w] or [h, w], unflipped, cropped to the overlap and
  flattened row-major: [n, C] or [n].

  `box` is (top, left, bottom, right) in pixels of the unflipped view.
  """
  if flip:
    x = torch.flip(x, dims=(-1,))
  t, l, b, r = (int(v) // FEATURE_STRIDE for v in box)
  x = x[..., t:b, l:r]
  if x.ndim == 2:
    return x.reshape(-1)
  return x.permute(1, 2, 0).reshape(-1, x.shape[0])


def _chunk_sum(anchor, negs, neg_labels, anchor_label, shift, inv_t, filter_negatives):
  """Σ_j m_kj exp(<a_k, n_j>/τ − shift_k) over one chunk of negatives, [n]."""
  logits = anchor @ negs.T * inv_t
  e = torch.exp(logits - shift)
  if filter_negatives:
    e = e * (neg_labels.unsqueeze(0) != anchor_label.unsqueeze(-1)).to(e.dtype)
  return e.sum(-1)


def _first_chunk_sum(pos, anchor, negs, neg_labels, anchor_label, inv_t, filter_negatives):
  """The first chunk with the positive: (sum incl. exp(0)-shifted positive, shift)."""
  logits = torch.cat([pos.unsqueeze(-1), anchor @ negs.T * inv_t], 1)
  shift = logits.max(1, keepdim=True)[0]
  e = torch.exp(logits - shift)
  if filter_negatives:
    keep = (neg_labels.unsqueeze(0) != anchor_label.unsqueeze(-1)).to(e.dtype)
    e = e * torch.cat([torch.ones_like(keep[:, :1]), keep], 1)
  return e.sum(-1), shift


def _direction(
  anchor,
  pos,
  anchor_label,
  negs,
  neg_labels,
  *,
  inv_t,
  chunk_size,
  filter_negatives,
  eps,
  checkpoint,
):
  """Per anchor, −log(exp(pos) / (exp(pos) + Σ_j m_kj exp(s_kj))), chunked."""
  run = (
    (lambda f, *a: torch.utils.checkpoint.checkpoint(f, *a, use_reentrant=False))
    if checkpoint
    else (lambda f, *a: f(*a))
  )
  down, shift = run(
    _first_chunk_sum,
    pos,
    anchor,
    negs[:chunk_size],
    neg_labels[:chunk_size],
    anchor_label,
    inv_t,
    filter_negatives,
  )
  for start in range(chunk_size, negs.shape[0], chunk_size):
    down = down + run(
      _chunk_sum,
      anchor,
      negs[start : start + chunk_size],
      neg_labels[start : start + chunk_size],
      anchor_label,
      shift,
      inv_t,
      filter_negatives,
    )
  ratio = torch.exp(pos - shift.squeeze(-1)) / (down + eps)
  return -torch.log(ratio + eps)


def dc_loss_authors(
  proj1,
  proj2,
  logits1,
  logits2,
  box1,
  box2,
  flip1,
  flip2,
  bank_feats,
  bank_labels,
  *,
  temperature=0.1,
  pos_threshold=0.75,
  directional=True,
  filter_negatives=True,
  neg_per_image=0,
  chunk_size=AUTHORS_CHUNK,
  eps=AUTHORS_EPS,
  checkpoint=True,
  generator=None,
):
  """L_1→2 + L_2→1 of a batch of view pairs, the authors' way (module docstring).

  Args:
    proj1, proj2: [B, D, h, w] unit-norm stride-8 features (view frames).
    logits1, logits2: [B, K, h, w] stride-8 classifier logits.
    box1, box2: int [B, 4] overlap boxes (top, left, bottom, right), pixels
      of the unflipped view, multiples of 8; flip1, flip2: bool [B].
    bank_feats: [C, D] past negatives (C may be 0); bank_labels: int [C].
    temperature, pos_threshold, directional, filter_negatives, neg_per_image:
      as `cac_jax.losses.dc_loss_from_views`; neg_per_image > 0 samples that
      many cells per view per image (with `generator`).
    chunk_size: negatives per log-sum-exp chunk (the authors': 8,000).
    eps: the authors' guard in the ratio and the log; 0 gives the exact loss.
    checkpoint: recompute each chunk in the backward pass (the authors do).

  Returns:
    (loss, new_feats [M, D] detached, new_labels [M]): this step's negatives,
    M = 2 B (neg_per_image or h w), for the bank.
  """
  b, d, h, w = proj1.shape
  inv_t = 1.0 / temperature
  with torch.no_grad():
    conf1, label1 = F.softmax(logits1, 1).max(1)[0], logits1.argmax(1)
    conf2, label2 = F.softmax(logits2, 1).max(1)[0], logits2.argmax(1)
  cells = lambda maps, boxes, flips: torch.cat(
    [_overlap_cells(maps[i], boxes[i], flips[i]) for i in range(b)]
  )
  feat1, feat2 = cells(proj1, box1, flip1), cells(proj2, box2, flip2)  # [n, D]
  conf1_o, conf2_o = cells(conf1, box1, flip1), cells(conf2, box2, flip2)
  label1_o, label2_o = cells(label1, box1, flip1), cells(label2, box2, flip2)

  with torch.no_grad():
    flat = lambda x, c: x.permute(0, 2, 3, 1).reshape(b, h * w, c)
    view_feats = torch.stack([flat(proj1, d), flat(proj2, d)], 1)  # [B, 2, hw, D]
    view_labels = torch.stack([label1.reshape(b, -1), label2.reshape(b, -1)], 1)
    if neg_per_image and neg_per_image < h * w:
      idx = torch.stack(
        [torch.randperm(h * w, generator=generator)[:neg_per_image] for _ in range(2 * b)]
      ).reshape(b, 2, -1)
      view_feats = torch.gather(view_feats, 2, idx.unsqueeze(-1).expand(-1, -1, -1, d))
      view_labels = torch.gather(view_labels, 2, idx)
    new_feats, new_labels = view_feats.reshape(-1, d), view_labels.reshape(-1)
    negs = torch.cat([new_feats, bank_feats.to(new_feats.dtype)])
    neg_labels = torch.cat([new_labels, bank_labels.to(new_labels.dtype)])

  pos1 = (feat1 * feat2.detach()).sum(-1) * inv_t
  pos2 = (feat1.detach() * feat2).sum(-1) * inv_t
  kw = dict(
    inv_t=inv_t,
    chunk_size=int(chunk_size),
    filter_negatives=filter_negatives,
    eps=eps,
    checkpoint=checkpoint,
  )
  loss1 = _direction(feat1, pos1, label1_o, negs, neg_labels, **kw)
  loss2 = _direction(feat2, pos2, label2_o, negs, neg_labels, **kw)

  def weights(anchor_conf, target_conf):
    mask = torch.ones_like(anchor_conf, dtype=torch.bool)
    if pos_threshold > 0:
      mask = mask & (target_conf > pos_threshold)
    if directional:
      mask = mask & (anchor_conf < target_conf)
    return mask.to(loss1.dtype)

  mask1, mask2 = weights(conf1_o, conf2_o), weights(conf2_o, conf1_o)
  loss = (loss1 * mask1).sum() / (mask1.sum() + 1e-12) + (loss2 * mask2).sum() / (
    mask2.sum() + 1e-12
  )
  return loss, new_feats, new_labels


# --------------------------------------------------------------- the step


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def random_bank(rows: int, dim: int, seed: int = 3):
  """A full bank like the JAX benchmark's: N(0, 1/D) features, labels 0."""
  g = torch.Generator().manual_seed(seed)
  return (torch.randn(rows, dim, generator=g) / dim**0.5, torch.zeros(rows, dtype=torch.int64))


class TorchTrainStep:
  """The authors' train step (module docstring) on one fixed host batch.

  Args:
    config: a `cac_jax.bench.step_time.bench_config` namespace (the model,
      data, cac and optim fields it reads are the JAX step's).
    batch: the host numpy batch of `train_step.synthetic_batch` (NHWC).
    with_dc: the CAC step (True) or the supervised one.
    chunk_size: DC-loss chunk of negatives (default the authors' 8,000).
    seed: torch's seed for the weights and dropout.
  """

  def __init__(
    self, config, batch, *, with_dc: bool, chunk_size: int = AUTHORS_CHUNK, seed: int = 0
  ):
    torch.manual_seed(seed)
    m, d, o = config.model, config.data, config.optim
    if m.dtype != 'float32' or not m.projector:
      raise ValueError(
        'the PyTorch baseline is float32 with the projector '
        f"(the authors'); got dtype={m.dtype!r} projector={m.projector}"
      )
    self.config, self.with_dc, self.chunk_size = config, with_dc, int(chunk_size)
    self.net = torch_deeplab.build_deeplab(
      m.backbone, d.num_classes, m.output_stride, m.proj_dim
    ).train()
    backbone = list(self.net.backbone.parameters())
    ids = {id(p) for p in backbone}
    head = [p for p in self.net.parameters() if id(p) not in ids]
    self.base_lrs = (o.lr * o.backbone_lr_mult, o.lr)
    self.opt = torch.optim.SGD(
      [{'params': backbone, 'lr': self.base_lrs[0]}, {'params': head, 'lr': self.base_lrs[1]}],
      lr=o.lr,
      momentum=o.momentum,
      weight_decay=o.weight_decay,
    )
    self.image = _nchw(batch['labeled']['image'])
    self.label = torch.from_numpy(np.asarray(batch['labeled']['label'], np.int64))
    self.step_count = 0
    self.bank, self.bank_labels = [], []
    if with_dc:
      un = batch['unlabeled']
      self.image1, self.image2 = _nchw(un['image1']), _nchw(un['image2'])
      self.box1, self.box2 = np.asarray(un['box1']), np.asarray(un['box2'])
      self.flip1, self.flip2 = np.asarray(un['flip1']), np.asarray(un['flip2'])
      cells = (d.crop_size // FEATURE_STRIDE) ** 2
      per_step = 2 * d.unlabeled_batch_size * (config.cac.neg_per_image or cells)
      for s in range(config.cac.bank_steps):  # a full bank: the steady state
        feats, labels = random_bank(per_step, m.proj_dim, seed=3 + s)
        self.bank.append(feats)
        self.bank_labels.append(labels)
      self.generator = torch.Generator().manual_seed(seed + 1)

  def _set_lr(self):
    o = self.config.optim
    frac = min(self.step_count / self.config.total_steps, 1.0)
    for group, base in zip(self.opt.param_groups, self.base_lrs):
      group['lr'] = base * (1.0 - frac) ** o.poly_power

  def _dc_loss(self):
    (logits1, proj1), (logits2, proj2) = (
      self.net(x, logits=False, dc_outputs=True) for x in (self.image1, self.image2)
    )
    dim = proj1.shape[1]
    bank = torch.cat(self.bank) if self.bank else torch.zeros(0, dim)
    labels = torch.cat(self.bank_labels) if self.bank_labels else torch.zeros(0, dtype=torch.int64)
    cac = self.config.cac
    return dc_loss_authors(
      proj1,
      proj2,
      logits1,
      logits2,
      self.box1,
      self.box2,
      self.flip1,
      self.flip2,
      bank,
      labels,
      temperature=cac.temperature,
      pos_threshold=cac.pos_threshold,
      directional=cac.directional,
      filter_negatives=cac.filter_negatives,
      neg_per_image=cac.neg_per_image,
      chunk_size=self.chunk_size,
      generator=self.generator,
    )

  def __call__(self) -> float:
    """One update; returns the loss (a Python float, so the step has finished)."""
    self._set_lr()
    self.opt.zero_grad(set_to_none=True)
    (logits,) = self.net(self.image, logits=True, dc_outputs=False)
    loss = F.cross_entropy(logits, self.label, ignore_index=IGNORE_LABEL)
    negatives = None
    if self.with_dc:
      dc, *negatives = self._dc_loss()
      loss = loss + self.config.cac.weight * dc
    loss.backward()
    self.opt.step()
    if negatives is not None and self.bank:  # FIFO of the last bank_steps steps
      self.bank = self.bank[1:] + [negatives[0]]
      self.bank_labels = self.bank_labels[1:] + [negatives[1]]
    self.step_count += 1
    return float(loss.detach())


def time_dc_loss(step: TorchTrainStep, steps: int, warmup: int = 1) -> float:
  """Median seconds of `dc_loss_authors` fwd+bwd alone at the step's shapes.

  Random unit features and N(0, 1) logits of both views (the JAX
  benchmark's `dc_loss_share` inputs), the step's (full) bank.
  """
  c, d = step.config.data, step.config.model
  cells = c.crop_size // FEATURE_STRIDE
  g = torch.Generator().manual_seed(7)
  shape = (c.unlabeled_batch_size, d.proj_dim, cells, cells)
  unit = lambda: F.normalize(torch.randn(shape, generator=g), dim=1).requires_grad_()
  proj1, proj2 = unit(), unit()
  logits = [torch.randn((shape[0], c.num_classes, cells, cells), generator=g) for _ in range(2)]
  bank = torch.cat(step.bank) if step.bank else torch.zeros(0, d.proj_dim)
  labels = torch.cat(step.bank_labels) if step.bank_labels else torch.zeros(0, dtype=torch.int64)
  cac = step.config.cac

  def run():
    loss, _, _ = dc_loss_authors(
      proj1,
      proj2,
      *logits,
      step.box1,
      step.box2,
      step.flip1,
      step.flip2,
      bank,
      labels,
      temperature=cac.temperature,
      pos_threshold=cac.pos_threshold,
      directional=cac.directional,
      filter_negatives=cac.filter_negatives,
      chunk_size=step.chunk_size,
    )
    loss.backward()
    proj1.grad = proj2.grad = None

  for _ in range(warmup):
    run()
  walls = []
  for _ in range(steps):
    t = time.perf_counter()
    run()
    walls.append(time.perf_counter() - t)
  return statistics.median(walls)


# ----------------------------------------------------------------- timing


def _clocked(fn):
  c, t = time.process_time(), time.perf_counter()
  fn()
  return time.perf_counter() - t, time.process_time() - c


def time_interleaved(jax_fn, torch_fn, steps: int) -> dict:
  """Times `steps` calls of each, alternating which goes first in each pair.

  Pair i runs jax_fn then torch_fn for even i, torch_fn then jax_fn for odd
  i, so neither always follows the other; the machine's load at pair i is
  shared by both timings of the pair. Each call's wall and process CPU time
  are its own (CPU time counts every thread of the process during the call).

  Returns:
    {'jax_walls', 'jax_cpu', 'torch_walls', 'torch_cpu'}: lists of seconds.
  """
  out = {'jax_walls': [], 'jax_cpu': [], 'torch_walls': [], 'torch_cpu': []}
  for i in range(steps):
    order = (('jax', jax_fn), ('torch', torch_fn))
    for name, fn in order if i % 2 == 0 else order[::-1]:
      wall, cpu = _clocked(fn)
      out[f'{name}_walls'].append(wall)
      out[f'{name}_cpu'].append(cpu)
  return out


def summary(timing: dict, images: int) -> dict:
  """The result fields of an interleaved timing (train_step's JSON and table).

  torch_over_jax is the ratio of the medians; torch_over_jax_pairs the
  median of the per-pair ratios (each pair ran back to back, under the same
  load, so it is the figure that a busy machine disturbs least);
  torch_over_jax_cpu the ratio of CPU seconds per step.
  """
  jw, tw = timing['jax_walls'], timing['torch_walls']
  jax_s, torch_s = statistics.median(jw), statistics.median(tw)
  jax_cpu, torch_cpu = (sum(timing[k]) / len(timing[k]) for k in ('jax_cpu', 'torch_cpu'))
  return {
    'torch_version': torch.__version__,
    'torch_threads': torch.get_num_threads(),
    'torch_dtype': 'float32',
    'torch_layout': 'NCHW',
    'torch_step_s': torch_s,
    'torch_step_all_s': list(tw),
    'torch_images_per_s': images / torch_s,
    'torch_cpu_step_s': torch_cpu,
    'torch_cpu_over_wall': sum(timing['torch_cpu']) / sum(tw),
    'torch_over_jax': torch_s / jax_s,
    'torch_over_jax_pairs': statistics.median(t / j for t, j in zip(tw, jw)),
    'torch_over_jax_cpu': torch_cpu / jax_cpu,
  }
