"""The CAC network in PyTorch, from `torch.nn` primitives (no torchvision).

A reference of `cac_jax.models` in the torchvision layout: the dilated
ResNet (Bottleneck v1.5 or BasicBlock, multi-grid layer4), ASPP, decoder,
classifier and projector, with the module names `cac_jax.models.convert`
maps one-to-one onto the Flax variables, so a state dict of this network
converts into ours (and tests/test_models.py checks both compute the same
function). The PyTorch benchmark baseline (`cac_jax.bench.torch_step`) trains
it. Built from the spec (docs/method.md §3), not from the Flax code: only the
layer plan's numbers are written out again here.

Importing this module imports torch (the rest of the package never does).
"""

import torch
import torch.nn.functional as F
from torch import nn

HEAD_CHANNELS = 256
LOW_CHANNELS = 48
MULTI_GRID = (1, 2, 4)
ASPP_RATES_OS16 = (6, 12, 18)
# Per output stride: stage strides and base dilations of the dilated ResNet.
LAYER_PLAN = {16: ((1, 2, 2, 1), (1, 1, 1, 2)), 8: ((1, 2, 1, 1), (1, 1, 2, 4))}
# backbone name -> (block, stage sizes, widths, stem width), torchvision's.
ARCHS = {
  'resnet50': ('bottleneck', (3, 4, 6, 3), (64, 128, 256, 512), 64),
  'resnet101': ('bottleneck', (3, 4, 23, 3), (64, 128, 256, 512), 64),
  'resnet_tiny': ('basic', (1, 1, 1, 1), (16, 32, 64, 128), 16),
}


def _bn(c):
  return nn.BatchNorm2d(c, eps=1e-5)


class TorchBottleneck(nn.Module):
  """torchvision Bottleneck v1.5 (stride on the 3x3) with an explicit dilation."""

  expansion = 4

  def __init__(self, inplanes, planes, stride, dilation, downsample):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = _bn(planes)
    self.conv2 = nn.Conv2d(
      planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False
    )
    self.bn2 = _bn(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = _bn(planes * 4)
    self.downsample = (
      nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), _bn(planes * 4))
      if downsample
      else None
    )

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = self.downsample(x) if self.downsample is not None else x
    return F.relu(out + identity)


class TorchBasicBlock(nn.Module):
  """torchvision BasicBlock (two 3x3 convolutions) with an explicit dilation."""

  expansion = 1

  def __init__(self, inplanes, planes, stride, dilation, downsample):
    super().__init__()
    self.conv1 = nn.Conv2d(
      inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False
    )
    self.bn1 = _bn(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
    self.bn2 = _bn(planes)
    self.downsample = (
      nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), _bn(planes))
      if downsample
      else None
    )

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    identity = self.downsample(x) if self.downsample is not None else x
    return F.relu(out + identity)


BLOCKS = {'bottleneck': TorchBottleneck, 'basic': TorchBasicBlock}


class TorchResNet(nn.Module):
  """conv1 7x7/2 -> bn1 -> relu -> maxpool 3/2 -> layer1..4; returns (low, high).

  `stage_dilations[s][i]` is the dilation of block i of stage s.
  """

  def __init__(self, stage_sizes, widths, stem, strides, stage_dilations, block=TorchBottleneck):
    super().__init__()
    self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
    self.bn1 = _bn(stem)
    inplanes = stem
    for s, (n, planes) in enumerate(zip(stage_sizes, widths)):
      blocks = []
      out = planes * block.expansion
      for i in range(n):
        blocks.append(
          block(
            inplanes,
            planes,
            strides[s] if i == 0 else 1,
            stage_dilations[s][i],
            downsample=i == 0 and (strides[s] != 1 or inplanes != out),
          )
        )
        inplanes = out
      setattr(self, f'layer{s + 1}', nn.Sequential(*blocks))

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
    low = self.layer1(x)
    return low, self.layer4(self.layer3(self.layer2(low)))


class TorchConvBNReLU(nn.Module):
  def __init__(self, cin, cout, k, dilation=1):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False)
    self.bn = _bn(cout)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class TorchASPP(nn.Module):
  """1x1, three atrous 3x3 and image pooling, 256 ch each -> 1x1 256 -> dropout 0.5."""

  def __init__(self, cin, rates):
    super().__init__()
    self.b0 = TorchConvBNReLU(cin, HEAD_CHANNELS, 1)
    self.b1, self.b2, self.b3 = (TorchConvBNReLU(cin, HEAD_CHANNELS, 3, r) for r in rates)
    self.pool = TorchConvBNReLU(cin, HEAD_CHANNELS, 1)
    self.project = TorchConvBNReLU(5 * HEAD_CHANNELS, HEAD_CHANNELS, 1)
    self.dropout = nn.Dropout(0.5)

  def forward(self, x):
    pooled = self.pool(F.adaptive_avg_pool2d(x, 1))
    pooled = F.interpolate(pooled, x.shape[2:], mode='bilinear', align_corners=True)
    return self.dropout(
      self.project(torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x), pooled], 1))
    )


class TorchDecoder(nn.Module):
  """low 1x1 -> 48; upsampled ASPP ++ low -> 3x3 256 -> dropout 0.5 -> 3x3 256."""

  def __init__(self, low_channels):
    super().__init__()
    self.low = TorchConvBNReLU(low_channels, LOW_CHANNELS, 1)
    self.fuse1 = TorchConvBNReLU(HEAD_CHANNELS + LOW_CHANNELS, HEAD_CHANNELS, 3)
    self.dropout = nn.Dropout(0.5)
    self.fuse2 = TorchConvBNReLU(HEAD_CHANNELS, HEAD_CHANNELS, 3)

  def forward(self, x, low):
    low = self.low(low)
    x = F.interpolate(x, low.shape[2:], mode='bilinear', align_corners=True)
    return self.fuse2(self.dropout(self.fuse1(torch.cat([x, low], 1))))


class TorchHead(nn.Module):
  def __init__(self, high_channels, low_channels, rates):
    super().__init__()
    self.aspp = TorchASPP(high_channels, rates)
    self.decoder = TorchDecoder(low_channels)

  def forward(self, high, low):
    return self.decoder(self.aspp(high), low)


class TorchDeepLab(nn.Module):
  """DeepLabv3+ with the CAC classifier (dropout 0.1 -> 1x1) and projector."""

  def __init__(self, backbone, high_channels, low_channels, rates, k, proj_dim):
    super().__init__()
    self.backbone = backbone
    self.head = TorchHead(high_channels, low_channels, rates)
    self.classifier = nn.Module()
    self.classifier.dropout = nn.Dropout(0.1)
    self.classifier.conv = nn.Conv2d(HEAD_CHANNELS, k, 1)
    self.projector = nn.Module()
    self.projector.conv1 = nn.Conv2d(HEAD_CHANNELS, HEAD_CHANNELS, 1)
    self.projector.conv2 = nn.Conv2d(HEAD_CHANNELS, proj_dim, 1)

  def classify(self, x):
    return self.classifier.conv(self.classifier.dropout(x))

  def forward(self, x, logits=True, dc_outputs=True):
    """[B, 3, H, W] -> (logits [B, K, H, W]?, logits8 [B, K, H/8, W/8]?, proj8?).

    `logits`: the stride-4 logits upsampled (align_corners) to the input;
    `dc_outputs`: the classifier logits and unit-norm projections of the
    2x2-average-pooled decoder features (what the DC loss reads). The
    outputs asked for are returned in that order, as a tuple.
    """
    low, high = self.backbone(x)
    decoded = self.head(high, low)
    out = ()
    if logits:
      out += (
        F.interpolate(self.classify(decoded), x.shape[2:], mode='bilinear', align_corners=True),
      )
    if dc_outputs:
      pooled = F.avg_pool2d(decoded, 2)
      proj = self.projector.conv2(F.relu(self.projector.conv1(pooled)))
      out += (self.classify(pooled), F.normalize(proj, dim=1))
    return out


def block_dilations(stage_sizes, output_stride):
  """Per stage, the dilation of each block: the base dilation of the layer
  plan, times the multi-grid (1, 2, 4) in layer4."""
  _, base = LAYER_PLAN[output_stride]
  return [
    [base[s] * (MULTI_GRID[i] if s == 3 else 1) for i in range(n)]
    for s, n in enumerate(stage_sizes)
  ]


def init_like_ours(net: nn.Module) -> nn.Module:
  """The initialisation `cac_jax.models` uses (its layers.py): backbone convs
  kaiming-normal fan_out, head and classifier kernels kaiming-normal fan_in,
  BatchNorm 1 / 0, the projector and all biases torch's Conv2d default."""
  for name, m in net.named_modules():
    if isinstance(m, nn.Conv2d) and not name.startswith('projector'):
      mode = 'fan_out' if name.startswith('backbone') else 'fan_in'
      nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity='relu')
    elif isinstance(m, nn.BatchNorm2d):
      nn.init.ones_(m.weight)
      nn.init.zeros_(m.bias)
  return net


def build_deeplab(
  backbone: str = 'resnet50', num_classes: int = 21, output_stride: int = 16, proj_dim: int = 128
) -> TorchDeepLab:
  """The CAC network of `cac_jax.models.build_model` for a ResNet backbone.

  Raises:
    ValueError: a backbone without a torch twin here, or a stride not 8/16.
  """
  if backbone not in ARCHS:
    raise ValueError(f'no PyTorch network for backbone {backbone!r}; one of {sorted(ARCHS)}')
  if output_stride not in LAYER_PLAN:
    raise ValueError(f'output_stride must be 8 or 16, got {output_stride}')
  kind, sizes, widths, stem = ARCHS[backbone]
  block = BLOCKS[kind]
  strides, _ = LAYER_PLAN[output_stride]
  resnet = TorchResNet(sizes, widths, stem, strides, block_dilations(sizes, output_stride), block)
  rates = tuple(r * 16 // output_stride for r in ASPP_RATES_OS16)
  net = TorchDeepLab(
    resnet, widths[3] * block.expansion, widths[0] * block.expansion, rates, num_classes, proj_dim
  )
  return init_like_ours(net)


def param_count(net: nn.Module) -> int:
  return sum(p.numel() for p in net.parameters())
