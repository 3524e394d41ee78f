"""The PyTorch benchmark baseline (cac_jax/bench/torch_step.py) computes our step.

The DC loss written the authors' way (torch, float64; their eps guard of
1e-8 set to 0, since it shifts the loss where a positive's softmax weight
nears 1e-8 and ours needs no guard) is checked
against `cac_jax.losses.dc_loss_from_views` (JAX, float32) on random features,
logits, flips, boxes and a bank: the loss, both views' gradients and the
negatives pushed to the bank. Tolerances follow tests/test_losses.py: EPS =
2^-24 per float32 rounding, a logit <a, n>/τ of unit D-vectors is off by
~sqrt(D) EPS / τ, the loss by about twice that, a gradient entry by that
times its terms (<= 2/τ), i.e. relative to the largest entry. A wrong crop,
flip, mask or detach changes the loss by > 1e-2 relative.

The torch network's forward matches ours through the real converter (eval
mode, random BatchNorm statistics; resnet_tiny, 64 px), and its ResNet-50
DeepLab has exactly our parameter names, shapes and count. The timing path
runs end to end at tiny size (figures checked for consistency, not speed).
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from cac_jax import losses
from cac_jax.bench import step_time as bench
from cac_jax.bench import torch_deeplab, torch_step
from cac_jax.models import build_model, convert

B, CROP, D, K, BANK = 2, 64, 16, 5, 256
CELLS = CROP // 8


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _problem(seed):
  rng = np.random.default_rng(seed)
  box1, box2 = bench.synthetic_boxes(CROP, B)
  return dict(
    proj1=_unit(rng.normal(size=(B, CELLS, CELLS, D))).astype(np.float32),
    proj2=_unit(rng.normal(size=(B, CELLS, CELLS, D))).astype(np.float32),
    # Scale 2: confidences spread over (0.2, 1), so that the threshold
    # 0.75 and the direction both keep and drop anchors.
    logits1=(2 * rng.normal(size=(B, CELLS, CELLS, K))).astype(np.float32),
    logits2=(2 * rng.normal(size=(B, CELLS, CELLS, K))).astype(np.float32),
    box1=box1,
    box2=box2,
    flip1=np.array([True, False]),
    flip2=np.array([True, True]) ^ (seed % 2 == 0),
    bank_feats=_unit(rng.normal(size=(BANK, D))).astype(np.float32),
    bank_labels=rng.integers(0, K, BANK).astype(np.int32),
  )


def _jax_dc(p, switches, chunk_size):
  def f(proj1, proj2):
    return losses.dc_loss_from_views(
      proj1,
      proj2,
      p['logits1'],
      p['logits2'],
      p['box1'],
      p['box2'],
      p['flip1'],
      p['flip2'],
      p['bank_feats'],
      p['bank_labels'],
      np.ones(BANK, bool),
      key=None,
      temperature=0.1,
      chunk_size=chunk_size,
      diagnostics=False,
      **switches,
    )

  (value, aux), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
    p['proj1'], p['proj2']
  )
  return float(value), aux, [np.asarray(g) for g in grads]


def _t64(x, grad=False):
  t = torch.from_numpy(np.ascontiguousarray(x.astype(np.float64).transpose(0, 3, 1, 2)))
  return t.requires_grad_(grad)


SWITCHES = [
  dict(pos_threshold=0.75, directional=True, filter_negatives=True),
  dict(pos_threshold=0.0, directional=False, filter_negatives=False),
]


@pytest.mark.parametrize('switches', SWITCHES)
@pytest.mark.parametrize('checkpoint', [True, False])
def test_authors_dc_loss_equals_ours(switches, checkpoint):
  p = _problem(seed=int(checkpoint) + 2 * switches['directional'])
  # 512 negatives: JAX chunks of 100 (a remainder of 12), torch chunks of 96
  # (a remainder of 32): neither chunking is the other's.
  value, aux, (g1, g2) = _jax_dc(p, switches, chunk_size=100)
  t1, t2 = _t64(p['proj1'], True), _t64(p['proj2'], True)
  ref, new_feats, new_labels = torch_step.dc_loss_authors(
    t1,
    t2,
    _t64(p['logits1']),
    _t64(p['logits2']),
    p['box1'],
    p['box2'],
    p['flip1'],
    p['flip2'],
    torch.from_numpy(p['bank_feats'].astype(np.float64)),
    torch.from_numpy(p['bank_labels'].astype(np.int64)),
    temperature=0.1,
    chunk_size=96,
    eps=0.0,
    checkpoint=checkpoint,
    **switches,
  )
  ref.backward()
  # A real problem: both directions have active anchors and a loss ~ log(512).
  assert min(float(aux['active_frac_12']), float(aux['active_frac_21'])) > 0.05
  assert ref.item() > 2.0
  # D = 16, τ = 0.1: a logit is off by ~sqrt(16) EPS / 0.1 = 2.4e-6, the sum
  # of two weighted means of l = lse - pos by ~1e-5 of l ~ 5-10 at worst:
  # rtol 1e-5 (a wrong mask or crop: > 1e-2).
  np.testing.assert_allclose(value, ref.item(), rtol=1e-5)
  # Gradients: ~2.4e-6 x (2/τ) x w/Σw, the scale of the largest entry;
  # 1e-5 of max|grad|, absolute (entries may cancel).
  for ours, theirs in ((g1, t1.grad), (g2, t2.grad)):
    theirs = theirs.numpy().transpose(0, 2, 3, 1)
    assert np.abs(theirs).max() > 0
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())
  # The bank's new rows: the same cells (as a set: the authors keep the view
  # frame, we unflip), exact copies of the features and their pseudo-labels.
  ours = np.concatenate(
    [np.asarray(aux['new_neg_feats'], np.float64), np.asarray(aux['new_neg_labels'])[:, None]], 1
  )
  theirs = np.concatenate([new_feats.numpy(), new_labels.numpy()[:, None]], 1)
  sort = lambda x: x[np.lexsort(x.T[::-1])]
  np.testing.assert_array_equal(sort(ours), sort(theirs))


def _randomise_eval(net, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.5 + torch.rand(c, generator=g))
        m.bias.copy_(0.1 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + torch.rand(c, generator=g))
  return net.eval()


def _model_config(backbone, proj_dim=16):
  return ml_collections.ConfigDict(
    dict(backbone=backbone, output_stride=16, projector=True, proj_dim=proj_dim, dtype='float32')
  )


def test_torch_network_forward_equals_ours():
  """build_deeplab('resnet_tiny') and ours, same weights, eval mode, 64 px."""
  torch.manual_seed(0)
  net = _randomise_eval(torch_deeplab.build_deeplab('resnet_tiny', K, 16, 16), seed=1)
  flax_net = build_model(_model_config('resnet_tiny'), num_classes=K)
  variables = convert.convert_state_dict(
    {k: v.numpy() for k, v in net.state_dict().items()}, convert.abstract_variables(flax_net)
  )
  x = np.random.default_rng(2).standard_normal((2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
  out = jax.jit(lambda v, y: flax_net.apply(v, y, train=False, dc_outputs=True))(
    variables, jnp.asarray(x)
  )
  # float32 on both sides through ~15 conv/BN layers (tests/test_models.py's
  # RTOL derivation): 1e-4 of the largest output; a wrong dilation, padding
  # or pooling is O(1).
  for name, theirs in zip(('logits', 'logits8', 'proj8'), ref):
    theirs = theirs.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(
      np.asarray(out[name]), theirs, rtol=0, atol=1e-4 * np.abs(theirs).max()
    )


def test_torch_resnet50_deeplab_has_our_parameters():
  net = torch_deeplab.build_deeplab('resnet50', 21, 16, 128)
  flax_net = build_model(_model_config('resnet50', proj_dim=128), num_classes=21)
  target = convert.abstract_variables(flax_net)
  # Every Flax leaf found with its shape, no torch tensor left over.
  converted = convert.convert_state_dict(
    {k: v.detach().numpy() for k, v in net.state_dict().items()}, target
  )
  assert convert.count_params(converted['params']) == torch_deeplab.param_count(net)
  assert torch_deeplab.param_count(net) == convert.count_params(target['params'])
  # Dilations and strides are not parameters: written out from the spec
  # (docs/method.md §3: layer4 multi-grid (1, 2, 4) x 2 at OS16, x 4 at
  # OS8 with layer3 dilated by 2).
  assert torch_deeplab.block_dilations((3, 4, 6, 3), 16) == [[1] * 3, [1] * 4, [1] * 6, [2, 4, 8]]
  assert torch_deeplab.block_dilations((3, 4, 6, 3), 8) == [[1] * 3, [1] * 4, [2] * 6, [4, 8, 16]]
  assert [b.conv2.dilation[0] for b in net.backbone.layer4] == [2, 4, 8]
  assert [
    layer[0].conv2.stride[0]
    for layer in (
      net.backbone.layer1,
      net.backbone.layer2,
      net.backbone.layer3,
      net.backbone.layer4,
    )
  ] == [1, 2, 2, 1]
  assert [b.conv.dilation[0] for b in (net.head.aspp.b1, net.head.aspp.b2, net.head.aspp.b3)] == [
    6,
    12,
    18,
  ]


def test_torch_step_trains_and_keeps_a_fifo_bank():
  config = bench.bench_config(
    backbone='resnet_tiny', crop=CROP, labeled=2, unlabeled=2, bank_steps=2
  )
  step = torch_step.TorchTrainStep(config, bench.synthetic_batch(config, True), with_dc=True)
  lrs = [g['lr'] for g in step.opt.param_groups]
  assert lrs == pytest.approx([1e-3, 1e-2])  # backbone at lr / 10
  grouped = sum(len(g['params']) for g in step.opt.param_groups)
  assert grouped == len(list(step.net.parameters()))
  before = [p.detach().clone() for p in step.net.parameters()]
  old_bank = list(step.bank)
  assert np.isfinite(step())
  assert all(not torch.equal(a, b) for a, b in zip(before, step.net.parameters()))
  # Two steps of 2 views x 2 images x 64 cells; the oldest dropped, this
  # step's unit-norm projections appended.
  assert len(step.bank) == 2 and step.bank[0] is old_bank[1]
  assert step.bank[1].shape == (2 * 2 * CELLS * CELLS, 128)
  np.testing.assert_allclose(step.bank[1].norm(dim=1).numpy(), 1.0, atol=1e-5)
  assert torch_step.time_dc_loss(step, steps=1, warmup=0) > 0


def test_time_interleaved_alternates_the_order():
  calls = []
  out = torch_step.time_interleaved(lambda: calls.append('j'), lambda: calls.append('t'), 4)
  assert ''.join(calls) == 'jttjjttj'
  assert all(len(v) == 4 and min(v) >= 0 for v in out.values())


def test_cli_torch_smoke(tmp_path):
  path = tmp_path / 'out.json'
  # test_bench.py's shapes, so the JAX steps are persistent-cache hits.
  bench.main(
    [
      '--torch',
      '--backbone=resnet_tiny',
      '--crop=64',
      '--labeled=2',
      '--unlabeled=2',
      '--steps=2',
      '--warmup=0',
      '--no-dc-share',
      f'--json={path}',
    ]
  )
  data = json.loads(path.read_text())
  assert isinstance(data['under_load'], bool) and data['load_note']
  assert data['torch_threads'] >= 1
  for r in data['results']:
    assert len(r['torch_step_all_s']) == 2 and np.isfinite(r['torch_loss'])
    # Quotients of the recorded numbers: default rel 1e-6 (round-off 1e-16).
    assert r['torch_over_jax'] == pytest.approx(r['torch_step_s'] / r['step_s'])
    pairs = [t / j for t, j in zip(r['torch_step_all_s'], r['step_all_s'])]
    assert r['torch_over_jax_pairs'] == pytest.approx(float(np.median(pairs)))
  assert [r['mode'] for r in data['results']] == ['sup', 'cac']
