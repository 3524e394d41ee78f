"""Numerical tests of the network against PyTorch references.

The references (`cac_jax.bench.torch_deeplab`, which the PyTorch benchmark
baseline also trains) use only ``torch.nn`` primitives (no torchvision) in the
torchvision layout, get random weights and random BatchNorm running
statistics, and their ``state_dict`` goes through the real converter
(:func:`cac_jax.models.convert.convert_state_dict`). Tolerances are relative
to the largest reference magnitude (`_close`), derived at each test from the
float32 error of the sums involved (EPS = 2^-24 per rounding; a blocked sum of
n terms is off by ~sqrt(n) EPS of its typical size); a wrong padding, stride,
dilation or layout change gives O(1) errors.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cac_jax.bench.torch_deeplab import TorchDeepLab, TorchResNet
from cac_jax.models import build_model, convert, deeplabv3plus, layers, resnet

# Network outputs, float32 torch vs float32 XLA: each layer's sum of n <= 147
# (ResNet) or <= 2,736 (decoder) products is off by ~sqrt(n) EPS = 1e-6 to
# 3e-6 of its typical output, and through ~25-35 conv/BN layers these add
# up randomly to ~1e-5 at most, on each side. 1e-4 of the largest output:
# ~10x over that estimate (measured <= 1.1e-6).
RTOL = 1e-4


def _model_config(**overrides) -> ml_collections.ConfigDict:
  cfg = dict(
    backbone='resnet_tiny', output_stride=16, projector=True, proj_dim=128, dtype='float32'
  )
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def _close(ours, ref, rtol=RTOL):
  """|ours - ref| <= rtol * max|ref| everywhere.

  The error of a sum scales with its terms, not with its (possibly
  cancelled) value, and the largest output stands for the terms' size; a
  per-element relative part would only loosen the largest entries.
  """
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=rtol * np.abs(ref).max())


# ---------------------------------------------------------------- references


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Random conv weights and BatchNorm affine + running statistics; eval mode."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, torch.nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
      elif isinstance(m, torch.nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.5 + torch.rand(c, generator=g))
        m.bias.copy_(0.1 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + torch.rand(c, generator=g))
  return module.eval()


def _state_dict(module):
  return {k: v.numpy() for k, v in module.state_dict().items()}


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


# Narrow Bottleneck ResNet with every structural feature of ResNet-50: strided
# stages, downsample branches (strided and not), dilated and multi-grid stages.
SMALL_STAGES, SMALL_WIDTHS, SMALL_STEM = (1, 2, 2, 3), (4, 8, 8, 16), 8


def _small_flax_resnet(output_stride):
  return resnet.ResNet(
    resnet.Bottleneck,
    SMALL_STAGES,
    SMALL_WIDTHS,
    stem_width=SMALL_STEM,
    output_stride=output_stride,
  )


def _small_torch_resnet(output_stride, seed):
  strides, base = resnet.layer_plan(output_stride)
  # Dilations written out from the spec (docs/method.md §3), not from code.
  dilations = {16: [[1], [1, 1], [1, 1], [2, 4, 8]], 8: [[1], [1, 1], [2, 2], [4, 8, 16]]}[
    output_stride
  ]
  assert strides == {16: (1, 2, 2, 1), 8: (1, 2, 1, 1)}[output_stride]
  del base
  return _randomise(TorchResNet(SMALL_STAGES, SMALL_WIDTHS, SMALL_STEM, strides, dilations), seed)


# --------------------------------------------------------------------- tests


@pytest.mark.parametrize(
  'in_hw,out_hw', [((5, 7), (17, 9)), ((9, 6), (4, 11)), ((1, 3), (4, 4)), ((6, 6), (6, 6))]
)
def test_resize_matches_torch_align_corners(in_hw, out_hw):
  x = np.random.default_rng(0).standard_normal((2,) + in_hw + (3,)).astype(np.float32)
  ref = F.interpolate(_nchw(x), out_hw, mode='bilinear', align_corners=True)
  ours = layers.resize_bilinear_align_corners(jnp.asarray(x), out_hw)
  # A convex combination of 4 inputs (<= 4 EPS of max|x|) with weights from
  # float32 source coordinates i (in - 1)/(out - 1) (off by ~in EPS <= 17
  # EPS): ~20 EPS = 1.3e-6 of max|x| on each side, both float32. 1e-5: 4x
  # over that worst case (measured 2e-7). A misaligned grid (half-pixel
  # centres instead of align_corners) is off by O(0.1).
  _close(ours, _nhwc(ref), rtol=1e-5)


@pytest.mark.parametrize('output_stride', [16, 8])
def test_bottleneck_resnet_matches_torch(output_stride):
  torch_net = _small_torch_resnet(output_stride, seed=output_stride)
  flax_net = _small_flax_resnet(output_stride)
  variables = convert.convert_state_dict(
    _state_dict(torch_net), convert.abstract_variables(flax_net)
  )
  # Odd sizes exercise PyTorch's floor arithmetic of strided padded windows.
  x = np.random.default_rng(output_stride).standard_normal((2, 45, 38, 3)).astype(np.float32)
  with torch.no_grad():
    low_ref, high_ref = torch_net(_nchw(x))
  out = _apply(flax_net, variables, jnp.asarray(x), train=False)
  _close(out['low'], _nhwc(low_ref))
  _close(out['high'], _nhwc(high_ref))
  assert out['high'].shape[1:3] == {16: (3, 3), 8: (6, 5)}[output_stride]


@pytest.mark.parametrize('output_stride', [16, 8])
def test_deeplabv3plus_matches_torch(output_stride):
  """Backbone + ASPP + decoder + classifier + projector, eval mode."""
  rates = tuple(r * 16 // output_stride for r in (6, 12, 18))
  k, proj_dim = 5, 16
  torch_net = _randomise(
    TorchDeepLab(
      _small_torch_resnet(output_stride, seed=1),
      SMALL_WIDTHS[3] * 4,
      SMALL_WIDTHS[0] * 4,
      rates,
      k,
      proj_dim,
    ),
    seed=2,
  )
  flax_net = deeplabv3plus.DeepLabV3Plus(
    backbone=_small_flax_resnet(output_stride),
    num_classes=k,
    output_stride=output_stride,
    proj_dim=proj_dim,
  )
  variables = convert.convert_state_dict(
    _state_dict(torch_net), convert.abstract_variables(flax_net)
  )
  x = np.random.default_rng(3).standard_normal((2, 48, 40, 3)).astype(np.float32)
  with torch.no_grad():
    logits_ref, logits8_ref, proj8_ref = torch_net(_nchw(x))
  out = _apply(flax_net, variables, jnp.asarray(x), train=False, dc_outputs=True)
  _close(out['logits'], _nhwc(logits_ref))
  _close(out['logits8'], _nhwc(logits8_ref))
  _close(out['proj8'], _nhwc(proj8_ref))


def _init(model, x):
  # Jitted: eager Flax dispatches (and compiles) every op on its own, which is
  # ~10x slower here than one compiled program from the persistent cache.
  init = jax.jit(
    lambda y: model.init(
      {'params': jax.random.key(0), 'dropout': jax.random.key(1)}, y, train=False
    )
  )
  return init(x)


def _apply(model, variables, x, **kwargs):
  return jax.jit(lambda v, y: model.apply(v, y, **kwargs))(variables, x)


def test_resnet_tiny_output_shapes_and_contract():
  model = build_model(_model_config(), num_classes=6)
  x = jax.random.normal(jax.random.key(5), (2, 64, 96, 3))
  variables = _init(model, x)  # dc_outputs=False, yet projector is created
  assert set(variables['params']) == {'backbone', 'head', 'classifier', 'projector'}
  assert set(variables['batch_stats']) == {'backbone', 'head'}
  feats = _apply(
    resnet.resnet_tiny(),
    {
      'params': variables['params']['backbone'],
      'batch_stats': variables['batch_stats']['backbone'],
    },
    x,
    train=False,
  )
  assert feats['low'].shape == (2, 16, 24, 16)
  assert feats['high'].shape == (2, 4, 6, 128)

  eval_out = _apply(model, variables, x, train=False)
  assert set(eval_out) == {'logits'}
  assert eval_out['logits'].shape == (2, 64, 96, 6)

  out, new_state = _apply(
    model,
    variables,
    x,
    train=True,
    dc_outputs=True,
    rngs={'dropout': jax.random.key(2)},
    mutable=['batch_stats'],
  )
  assert out['logits'].shape == (2, 64, 96, 6) and out['logits'].dtype == jnp.float32
  assert out['logits8'].shape == (2, 8, 12, 6) and out['logits8'].dtype == jnp.float32
  assert out['proj8'].shape == (2, 8, 12, 128) and out['proj8'].dtype == jnp.float32
  # A float32 sum of 128 squares (log2(128) = 7 roundings), a sqrt and a
  # division: ~10 EPS = 6e-7. rtol 1e-5 (measured 1.2e-7); unnormalised
  # features are O(1) off.
  np.testing.assert_allclose(np.linalg.norm(out['proj8'], axis=-1), 1.0, rtol=1e-5)
  # Training mode updated the running statistics: new = 0.9 old + 0.1 batch.
  old = variables['batch_stats']['backbone']['bn1']['mean']
  new = new_state['batch_stats']['backbone']['bn1']['mean']
  assert float(jnp.abs(new - old).max()) > 0

  no_proj = build_model(_model_config(projector=False), num_classes=6)
  v2 = _init(no_proj, x)
  assert 'projector' not in v2['params']
  out2 = _apply(no_proj, v2, x, train=False, dc_outputs=True)
  assert out2['proj8'].shape == (2, 8, 12, 256)
  with pytest.raises(ValueError, match='divisible by 8'):
    model.apply(variables, x[:, :60], train=False, dc_outputs=True)
  with pytest.raises(ValueError, match='resnet50'):
    build_model(_model_config(backbone='resnet5'), num_classes=6)


def test_mobilenet_v2_feature_shapes():
  from cac_jax.models import mobilenet_v2

  x = jax.ShapeDtypeStruct((1, 96, 64, 3), jnp.float32)
  for output_stride, high_hw in ((16, (6, 4)), (32, (3, 2))):
    net = mobilenet_v2.MobileNetV2(output_stride=output_stride)
    out = jax.eval_shape(
      lambda y, net=net: net.init_with_output(jax.random.key(0), y, train=False)[0], x
    )
    assert out['low'].shape == (1, 24, 16, 24)
    assert out['high'].shape == (1,) + high_hw + (320,)


def test_batchnorm_is_global_under_sharded_jit():
  """SyncBN: on a batch sharded over 8 devices the statistics are global."""
  model = build_model(_model_config(), num_classes=3)
  x = jax.random.normal(jax.random.key(7), (8, 32, 32, 3))
  variables = _init(model, x)

  def step(v, images):
    out, state = model.apply(
      v,
      images,
      train=True,
      dc_outputs=True,
      rngs={'dropout': jax.random.key(0)},
      mutable=['batch_stats'],
    )
    return out['proj8'], state['batch_stats']

  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(x, NamedSharding(mesh, P('data')))
  proj_s, stats_s = jax.jit(step)(variables, sharded)
  proj_1, stats_1 = jax.jit(step)(variables, x)
  # Only the order of the batch reductions differs (per-device partials +
  # all-reduce): a BN mean over up to 8*32*32 positions of mixed sign is off
  # by ~sqrt(8192) EPS = 5e-6 of the activations' scale at most (the
  # variance, of positive terms, by ~log2(n) EPS = 8e-7), and ~20 BN layers
  # add these randomly to ~1e-5 of an activation. 1e-4 of the largest
  # value: 10x over that (measured 2.6e-6). Running statistics new = 0.9 old
  # + 0.1 batch carry 0.1x the same errors. Per-device statistics of one
  # image each would differ by O(1).
  _close(proj_s, proj_1, rtol=1e-4)
  jax.tree.map(lambda a, b: _close(a, b, rtol=1e-4), stats_s, stats_1)


def test_bfloat16_close_to_float32_and_params_stay_float32():
  x = jax.random.normal(jax.random.key(9), (2, 64, 64, 3))
  f32 = build_model(_model_config(), num_classes=4)
  bf16 = build_model(_model_config(dtype='bfloat16'), num_classes=4)
  variables = _init(bf16, x)
  dtypes = {a.dtype for a in jax.tree.leaves(variables)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  out32 = _apply(f32, variables, x, train=False, dc_outputs=True)
  out16 = _apply(bf16, variables, x, train=False, dc_outputs=True)
  for key in ('logits', 'logits8', 'proj8'):
    assert out16[key].dtype == jnp.float32
    # bf16 rounds each layer's inputs and weights to 8 bits (2^-9 = 2e-3
    # relative); these errors are independent, so a layer adds ~2e-3 of its
    # output and ~20 layers ~sqrt(20) 2e-3 = 1e-2 (measured 9e-3 of the
    # output scale, the rms 6e-3). 0.05: 5x over that. No looser: a conv
    # accumulating its ~2,000 products in bf16 would add ~sqrt(n) 2^-9 =
    # 0.1 per layer, and bf16 BN statistics are O(1) off.
    err = float(jnp.abs(out16[key] - out32[key]).max())
    scale = float(jnp.abs(out32[key]).max())
    assert err < 0.05 * scale, (key, err, scale)


def test_parameter_count_deeplabv3plus_r50_os16():
  """By hand (K = 21, projector 256 -> 256 -> 128):

  backbone  ResNet-50 without fc                                23,508,032
  ASPP      b0 2048*256 + b1..b3 3 * 9*2048*256 + pool 2048*256
            + project 1280*256 = 15,532,032; 6 BN * 2*256 = 3,072 15,535,104
  decoder   low 256*48 + BN 96 = 12,384; fuse1 9*304*256 + 512 = 700,928;
            fuse2 9*256*256 + 512 = 590,336                        1,303,648
  classifier 256*21 + 21                                               5,397
  projector  256*256 + 256 + 256*128 + 128                            98,688
  total                                                           40,450,869
  """
  model = build_model(_model_config(backbone='resnet50'), num_classes=21)
  abstract = jax.eval_shape(
    lambda: model.init(
      {'params': jax.random.key(0), 'dropout': jax.random.key(1)},
      jnp.zeros((1, 64, 64, 3)),
      train=False,
    )
  )
  counts = {k: convert.count_params(v) for k, v in abstract['params'].items()}
  total = sum(counts.values())
  print('DeepLabv3+ R50 OS16 parameters:', counts, 'total', f'{total:,}')
  assert counts == {
    'backbone': 23_508_032,
    'head': 15_535_104 + 1_303_648,
    'classifier': 5_397,
    'projector': 98_688,
  }
  assert total == 40_450_869


def test_l2_normalize_matches_float64_and_has_finite_gradient_at_zero():
  x = np.random.default_rng(11).standard_normal((4, 5, 7)).astype(np.float32)
  x[0, 0] = 0.0  # an all-zero feature vector
  ref = x.astype(np.float64)
  ref = ref / np.maximum(np.linalg.norm(ref, axis=-1, keepdims=True), 1e-12)
  # Per element x_i / ||x||, no cancellation: relative error of a sum of 7
  # squares (<= 6 EPS, halved by the sqrt), the sqrt and the division: ~6
  # EPS = 3.6e-7 at worst. rtol 4e-6 (10x; measured 1.3 EPS). No atol: the
  # zero vector maps to exact zeros. Dividing by ||x||^2, or a clamp that
  # bites on ordinary norms, is O(1) off.
  np.testing.assert_allclose(layers.l2_normalize(jnp.asarray(x)), ref, rtol=4e-6, atol=0)
  grad = jax.grad(lambda y: layers.l2_normalize(y)[..., 0].sum())(jnp.asarray(x))
  assert bool(jnp.all(jnp.isfinite(grad)))


# (B, H, W, C_in, C_out, kernel, stride, dilation, groups): every lowering of
# layers.conv2d — taps pruned to 1x1 (rate 12 on 10x10, the ASPP at crop 160),
# pruned on one axis only (rate 6 on 10x7 / 5 wide), 1x1 as a matmul with
# stride 2 on an odd map, the per-tap kernel gradient (>= 256 inputs, with
# and without dilation), a strided 3x3 and a depthwise dilated 3x3 (XLA's).
CONV_CASES = [
  (2, 10, 10, 256, 24, 3, 1, 12, 1),
  (2, 10, 5, 32, 16, 3, 1, 6, 1),
  (2, 9, 7, 32, 16, 1, 2, 1, 1),
  (1, 11, 9, 260, 8, 3, 1, 1, 1),
  (2, 12, 12, 256, 16, 3, 1, 4, 1),
  (2, 12, 12, 8, 8, 3, 2, 1, 1),
  (1, 6, 6, 16, 16, 3, 1, 2, 16),
]


@pytest.mark.parametrize('case', CONV_CASES)
def test_conv2d_value_and_gradients_match_torch_float64(case):
  """conv2d's rewrites compute torch's Conv2d, forward and both gradients.

  Reference: torch.nn.functional.conv2d in float64 with autograd, same
  padding rule. Fresh random inputs, weights and output cotangent each run.
  Tolerance: each output (and each gradient entry) is a float32 sum of
  n <= 9 * 260 = 2,340 products of unit-scale terms, off by ~sqrt(n) EPS =
  3e-6 of its rms size and ~1e-6 of the largest (measured <= 1.1e-6 of it;
  the worst case n EPS = 1.4e-4 needs all roundings aligned, which blocked
  sums do not do). 1e-5 of the largest magnitude: 10x. A wrong tap, a shift
  by one or a transposed kernel gives O(1).
  """
  b, h, w, c_in, c_out, k, stride, dilation, groups = case
  rng = np.random.default_rng()
  x = rng.standard_normal((b, h, w, c_in)).astype(np.float32)
  kernel = (
    rng.standard_normal((k, k, c_in // groups, c_out)) / np.sqrt(k * k * c_in / groups)
  ).astype(np.float32)
  conv = lambda x_, k_: layers.conv2d(x_, k_, strides=stride, dilation=dilation, groups=groups)
  y, vjp = jax.vjp(conv, jnp.asarray(x), jnp.asarray(kernel))
  g = rng.standard_normal(y.shape).astype(np.float32)
  dx, dkernel = vjp(jnp.asarray(g))

  xt = torch.from_numpy(x.astype(np.float64).transpose(0, 3, 1, 2)).requires_grad_()
  kt = torch.from_numpy(kernel.astype(np.float64).transpose(3, 2, 0, 1)).requires_grad_()
  yt = F.conv2d(
    xt, kt, stride=stride, padding=dilation * (k // 2), dilation=dilation, groups=groups
  )
  yt.backward(torch.from_numpy(g.astype(np.float64).transpose(0, 3, 1, 2)))
  _close(y, _nhwc(yt.detach()), rtol=1e-5)
  _close(dx, _nhwc(xt.grad), rtol=1e-5)
  _close(dkernel, kt.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-5)


def test_live_taps_rule():
  """Taps whose offset reaches past the map only ever read padding."""
  assert layers.live_taps(3, 12, 10) == 0  # ASPP rate 12 on 10x10: 1x1
  assert layers.live_taps(3, 18, 21) == 1  # VOC crop 321 keeps all taps
  assert layers.live_taps(3, 6, 7) == 1
  assert layers.live_taps(3, 7, 7) == 0  # offset 7 on a 7-wide map
  assert layers.live_taps(7, 1, 2) == 1  # a 7x7 kernel on a 2-wide map


def test_xla_convolutions_switch_traces_the_plain_convolution():
  """Benchmarks' before/after switch: inside it, conv2d is lax's conv alone."""
  x, k = jnp.ones((1, 10, 10, 8)), jnp.ones((1, 1, 8, 4))
  prims = lambda: {
    e.primitive.name for e in jax.make_jaxpr(lambda a, b: layers.conv2d(a, b))(x, k).eqns
  }
  assert 'dot_general' in prims() and 'conv_general_dilated' not in prims()
  with layers.xla_convolutions():
    assert prims() == {'conv_general_dilated'}
  assert 'dot_general' in prims()
