"""The seed experiments' models, checked against the seeds' own definitions (docs/models.md).

Each `_Seed*` class below is this test's reading of one published definition, written out independently of models/:
Synaptic Flow's lottery VGG / ResNet and Tiny ImageNet VGG / ResNet-18 (ganguli-lab/Synaptic-Flow, Models/), the DSR
code's WRN, ResNet-50 and MLP (Intel's dynamic-reparameterization model code as kept in TimDettmers/sparse_learning,
imagenet/partially_dense/model.py) and the Union Mask code's VGG and ResNet (DwaraknathT/sparsity, src/models/).
Our model's weights are copied into the seed's by position (the order in which a forward pass first calls each conv,
linear and norm layer) and both forwards must agree; parameter counts are compared with counts done by hand.
"""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import build_model
from models.common import get_role

REPO = Path(__file__).resolve().parents[1]
LAYERS = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


# ----------------------------------------------------------------------------------------------------------------
# The seeds' definitions, as read from their code.

class _Scale(nn.Module):
    """Synaptic Flow's Identity2d: an identity shortcut times a learnable per-channel factor that starts at 1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


# Synaptic Flow's lottery plans (Models/lottery_vgg.py `_plan`): no "M" after the last stage.
_LOTTERY_PLANS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


def _five_pools(depth: int) -> list[int | str]:
    """The torchvision-style configs of the Tiny ImageNet and Union Mask VGGs: the lottery plan plus a last "M"."""
    return [*_LOTTERY_PLANS[depth], "M"]


class _ConvUnit(nn.Module):
    """Synaptic Flow's ConvModule / ConvBNModule: relu(bn(conv(x))) with a biased 3x3 conv."""

    def __init__(self, cin: int, cout: int, batch_norm: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(cout) if batch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _he_fan_in(model: nn.Module) -> None:
    """Synaptic Flow's `_initialize_weights`: kaiming_normal_ defaults on convs and linears, zero biases, BN 1/0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class _SeedLotteryVGG(nn.Module):
    def __init__(self, depth: int, batch_norm: bool, classes: int) -> None:
        super().__init__()
        units: list[nn.Module] = []
        channels = 3
        for spec in _LOTTERY_PLANS[depth]:
            if spec == "M":
                units.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                units.append(_ConvUnit(channels, int(spec), batch_norm))
                channels = int(spec)
        self.layers = nn.Sequential(*units)
        self.fc = nn.Linear(512, classes)
        _he_fan_in(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.AvgPool2d(2)(self.layers(x))
        return self.fc(x.view(x.size(0), -1))


class _SeedLotteryBlock(nn.Module):
    def __init__(self, f_in: int, f_out: int, downsample: bool) -> None:
        super().__init__()
        stride = 2 if downsample else 1
        self.conv1 = nn.Conv2d(f_in, f_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(f_out)
        self.conv2 = nn.Conv2d(f_out, f_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(f_out)
        if downsample or f_in != f_out:
            self.shortcut: nn.Module = nn.Sequential(nn.Conv2d(f_in, f_out, 1, stride=2, bias=False),
                                                     nn.BatchNorm2d(f_out))
        else:
            self.shortcut = _Scale(f_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out += self.shortcut(x)
        return F.relu(out)


class _SeedLotteryResNet(nn.Module):
    """Models/lottery_resnet.py: plan [(W, D), (2W, D), (4W, D)] with D = (depth - 2) / 6."""

    def __init__(self, depth: int, width: int, classes: int) -> None:
        super().__init__()
        per_stage = (depth - 2) // 6
        self.conv = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks, current = [], width
        for segment, filters in enumerate((width, 2 * width, 4 * width)):
            for index in range(per_stage):
                blocks.append(_SeedLotteryBlock(current, filters, segment > 0 and index == 0))
                current = filters
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(4 * width, classes)
        _he_fan_in(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(F.relu(self.bn(self.conv(x))))
        out = F.avg_pool2d(out, out.size()[3])
        return self.fc(out.view(out.size(0), -1))


class _MaskedConv(nn.Conv2d):
    """The `sparsity` code's MaskedConv: no bias by default, one Xavier-uniform draw at construction."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)


class _MaskedDense(nn.Linear):
    """The `sparsity` code's MaskedDense: no bias by default, one Xavier-uniform draw at construction."""

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__(fan_in, fan_out, bias=False)

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)


def _seed_features(plan: list[int | str], batch_norm: bool, masked: bool) -> nn.Sequential:
    """pytorch-cifar100 / torchvision `make_layers`: conv (+ BN) + ReLU per entry, max-pool per "M"."""
    layers: list[nn.Module] = []
    channels = 3
    for spec in plan:
        if spec == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        if masked:
            layers.append(_MaskedConv(channels, int(spec), kernel_size=3, padding=1))
        else:
            layers.append(nn.Conv2d(channels, int(spec), kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(int(spec)))
        layers.append(nn.ReLU(inplace=True))
        channels = int(spec)
    return nn.Sequential(*layers)


class _SeedTinyImageNetVGG(nn.Module):
    """Models/tinyimagenet_vgg.py: five pools, dim = 512 * 4, classifier dim -> dim/2 -> dim/2 -> classes."""

    def __init__(self, depth: int, batch_norm: bool, classes: int) -> None:
        super().__init__()
        self.features = _seed_features(_five_pools(depth), batch_norm, masked=False)
        dim = 512 * 4
        self.classifier = nn.Sequential(nn.Linear(dim, dim // 2), nn.ReLU(inplace=True), nn.Dropout(),
                                        nn.Linear(dim // 2, dim // 2), nn.ReLU(inplace=True), nn.Dropout(),
                                        nn.Linear(dim // 2, classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        return self.classifier(out.view(out.size()[0], -1))


class _SeedTinyBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.residual_function = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut: nn.Module = _Scale(cin)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.residual_function(x) + self.shortcut(x))


class _SeedTinyImageNetResNet18(nn.Module):
    """Models/tinyimagenet_resnet.py resnet18 (its wide_resnet18 builds the very same network: see docs)."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(True))
        stages, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(_SeedTinyBasicBlock(cin, cout, stride), _SeedTinyBasicBlock(cout, cout, 1)))
            cin = cout
        self.conv2_x, self.conv3_x, self.conv4_x, self.conv5_x = stages
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv5_x(self.conv4_x(self.conv3_x(self.conv2_x(self.conv1(x)))))
        return self.fc(self.avg_pool(out).view(out.size(0), -1))


class _SeedUnionMaskVGG(nn.Module):
    """DwaraknathT/sparsity src/models/vgg.py: bias-free masked convs, 512 -> 512 -> 512 -> classes classifier."""

    def __init__(self, depth: int, batch_norm: bool, classes: int) -> None:
        super().__init__()
        self.features = _seed_features(_five_pools(depth), batch_norm, masked=True)
        self.classifier = nn.Sequential(_MaskedDense(512, 512), nn.ReLU(True), _MaskedDense(512, 512),
                                        nn.ReLU(True), nn.Linear(512, classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, (2.0 / n) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))


class _SeedUnionMaskBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _MaskedConv(cin, planes, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _MaskedConv(planes, planes, 3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        self.bn3: nn.Module | None = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride=stride, bias=False))
            self.bn3 = nn.BatchNorm2d(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.downsample is not None and self.bn3 is not None:
            residual = self.bn3(self.downsample(x))
        out += residual
        return F.relu(out)


class _SeedUnionMaskResNet(nn.Module):
    """src/models/resnet.py: widths 32/64/128; Xavier-normal on the masked convs and the linear (not on shortcuts)."""

    def __init__(self, per_stage: int, classes: int) -> None:
        super().__init__()
        self.conv1 = _MaskedConv(3, 32, 3, stride=1, padding=1)
        self.bn = nn.BatchNorm2d(32)
        stages, cin = [], 32
        for planes, stride in ((32, 1), (64, 2), (128, 2)):
            blocks = []
            for s in [stride] + [1] * (per_stage - 1):
                blocks.append(_SeedUnionMaskBlock(cin, planes, s))
                cin = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(128, classes)
        for m in self.modules():        # `self.apply(_weights_init)` reaches the leaves in registration order
            if isinstance(m, (nn.Linear, _MaskedConv)):
                nn.init.xavier_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(F.relu(self.bn(self.conv1(x))))))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


class _SeedDSRBlock(nn.Module):
    """The DSR WideResNet BasicBlock: pre-activation; a projection shortcut reads the pre-activated input."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.equal = cin == cout
        self.shortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.equal:
            x = F.relu(self.bn1(x))
            out = F.relu(self.bn2(self.conv1(x)))
        else:
            out = F.relu(self.bn2(self.conv1(F.relu(self.bn1(x)))))
        out = self.conv2(out)
        return torch.add(x if self.shortcut is None else self.shortcut(x), out)


class _SeedDSRWideResNet(nn.Module):
    def __init__(self, depth: int, k: int, classes: int) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        stages, cin = [], 16
        for i, cout in enumerate(widths[1:]):
            first_stride = 1 if i == 0 else 2
            blocks = [_SeedDSRBlock(cin, cout, first_stride)]
            blocks += [_SeedDSRBlock(cout, cout, 1) for _ in range(1, n)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.block1, self.block2, self.block3 = stages
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], classes)
        self.channels = widths[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(F.relu(self.bn1(out)), 8)
        return self.fc(out.view(-1, self.channels))


class _SeedDSRMLP(nn.Module):
    """mnist_mlp with batch norm (the code's default): layers registered fc1, fc_int, fc2, then bn1..bn3."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 300, bias=False)
        self.fc_int = nn.Linear(300, 100, bias=False)
        self.fc2 = nn.Linear(100, 10, bias=False)
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm1d(300), nn.BatchNorm1d(100), nn.BatchNorm1d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.fc1(x.view(-1, 784))))
        x = F.relu(self.bn2(self.fc_int(x)))
        return self.bn3(self.fc2(x))


class _SeedDSRBottleneck(nn.Module):
    """The DSR ResNet-50 Bottleneck; the code creates conv3 before conv2 (state-dict order differs from ours)."""

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(planes), nn.BatchNorm2d(planes), nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class _SeedDSRResNet50(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages, cin = [], 64
        for i, blocks in enumerate((3, 4, 6, 3)):
            planes, stride = 64 * 2**i, 1 if i == 0 else 2
            down = None
            if stride != 1 or cin != planes * 4:
                down = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride=stride, bias=False),
                                     nn.BatchNorm2d(planes * 4))
            layer = [_SeedDSRBottleneck(cin, planes, stride, down)]
            cin = planes * 4
            layer += [_SeedDSRBottleneck(cin, planes, 1, None) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AvgPool2d(7, stride=1)
        self.fc = nn.Linear(2048, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).view(x.size(0), -1))


# ----------------------------------------------------------------------------------------------------------------
# Helpers.

def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _call_order(model: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """Conv, linear and norm layers in the order a forward pass first calls them."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, _i, _o: order.append(mod) if mod not in order else None)
             for m in model.modules() if isinstance(m, LAYERS)]
    with torch.no_grad():
        model.eval()(x)
    for hook in hooks:
        hook.remove()
    return order


def _perturb(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial biases, norm affines and running statistics, so every one of them is checked by the forward."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=generator))
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=generator))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=generator))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=generator))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=generator))


def _kind(module: nn.Module) -> type:
    return next(kind for kind in LAYERS if isinstance(module, kind))


def _copy_by_position(ours: nn.Module, seed: nn.Module, x: torch.Tensor) -> int:
    """Load our layers' tensors into the seed's by call order; every pair must have the same type and shapes."""
    mine, theirs = _call_order(ours, x[:1]), _call_order(seed, x[:1])
    assert len(mine) == len(theirs), (len(mine), len(theirs))
    with torch.no_grad():
        for a, b in zip(mine, theirs):
            assert _kind(a) is _kind(b), (a, b)
            for key, tensor in a.state_dict().items():
                target = b.state_dict()[key]
                assert target.shape == tensor.shape, (key, a, b)
                target.copy_(tensor)
            assert set(a.state_dict()) == set(b.state_dict()), (a, b)
    return len(mine)


def _compare(ours: nn.Module, seed: nn.Module, x: torch.Tensor) -> float:
    """Max |difference| of the two forwards on identical weights (eval mode); asserts they agree."""
    _perturb(ours, torch.Generator().manual_seed(1))
    _copy_by_position(ours, seed, x)
    with torch.no_grad():
        a, b = ours.eval()(x), seed.eval()(x)
    assert a.shape == b.shape
    scale = float(a.abs().max())
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(scale, 1.0))
    return float((a - b).abs().max())


def _ours(name: str, size: int, classes: int, channels: int = 3, **options: object) -> nn.Module:
    return build_model(name, in_channels=channels, image_size=size, num_classes=classes, **options)  # type: ignore


def _prunable_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# ----------------------------------------------------------------------------------------------------------------
# The lottery VGG-16-BN (Synaptic Flow's layer-collapse model) at CIFAR-100 shape.

VGG16_CONVS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256), (256, 512),
               (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]


def test_lottery_vgg16_bn_layer_list_and_count_equal_the_seed() -> None:
    torch.manual_seed(0)
    model = _ours("vgg16_bn", 32, 100)
    layers = [(n, tuple(m.weight.shape), get_role(m)) for n, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))]
    expected_shapes = [(cout, cin, 3, 3) for cin, cout in VGG16_CONVS] + [(100, 512)]
    assert [shape for _, shape, _ in layers] == expected_shapes
    assert layers[0][0] == "features.0" and layers[0][2] == "stem"
    assert layers[-1][0] == "classifier" and layers[-1][2] == "classifier"
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))      # convs keep a bias
    # the feature stack is conv -> BN -> ReLU per layer with 4 max-pools (none after the last stage)
    kinds = [type(m).__name__ for m in model.features]
    assert kinds.count("MaxPool2d") == 4 and kinds[-3:] == ["Conv2d", "BatchNorm2d", "ReLU"]
    # hand count: 3x3 conv weights + conv biases + BN weight and bias per channel + the 512 -> 100 classifier
    conv_weights = 9 * (3 * 64 + 64 * 64 + 64 * 128 + 128 * 128 + 128 * 256 + 2 * 256 * 256 + 256 * 512
                        + 5 * 512 * 512)
    channels = 2 * 64 + 2 * 128 + 3 * 256 + 6 * 512
    hand = conv_weights + channels + 2 * channels + 512 * 100 + 100
    assert (conv_weights, channels, hand) == (14_710_464, 4_224, 14_774_436)
    assert _count(model) == hand
    seed = _SeedLotteryVGG(16, batch_norm=True, classes=100)
    assert _count(seed) == hand and _prunable_shapes(seed) == expected_shapes


# (our model, its options, input side, classes, in_channels, the seed's definition, seed count, our count)
FORWARD_CASES: list[tuple[str, dict, int, int, int, Callable[[], nn.Module], int, int]] = [
    ("vgg16_bn", {}, 32, 100, 3, lambda: _SeedLotteryVGG(16, True, 100), 14_774_436, 14_774_436),
    ("vgg11", {}, 32, 10, 3, lambda: _SeedLotteryVGG(11, False, 10), 9_225_610, 9_225_610),
    ("vgg19_bn", {}, 32, 10, 3, lambda: _SeedLotteryVGG(19, True, 10), 20_040_522, 20_040_522),
    ("resnet20", {}, 32, 10, 3, lambda: _SeedLotteryResNet(20, 16, 10), 272_714, 272_474),
    ("resnet110", {}, 32, 10, 3, lambda: _SeedLotteryResNet(110, 16, 10), 1_732_634, 1_730_714),
    ("vgg16_bn", {"variant": "tinyimagenet"}, 64, 200, 3, lambda: _SeedTinyImageNetVGG(16, True, 200),
     18_075_912, 18_075_912),
    ("resnet18", {"stem": "cifar"}, 32, 10, 3, lambda: _SeedTinyImageNetResNet18(10), 11_174_986, 11_173_962),
    ("vgg19_bn", {"variant": "union_mask"}, 32, 100, 3, lambda: _SeedUnionMaskVGG(19, True, 100),
     20_605_476, 20_605_476),
    ("resnet32", {"width": 32}, 32, 100, 3, lambda: _SeedUnionMaskResNet(5, 100), 1_872_132, 1_872_132),
    ("wrn28_2", {}, 32, 10, 3, lambda: _SeedDSRWideResNet(28, 2, 10), 1_467_610, 1_467_610),
    ("lenet_300_100", {"bias": False, "batch_norm": True}, 28, 10, 1, _SeedDSRMLP, 267_020, 267_020),
    ("resnet50", {}, 224, 1000, 3, lambda: _SeedDSRResNet50(1000), 25_557_032, 25_557_032),
]


@pytest.mark.parametrize(("name", "options", "size", "classes", "channels", "seed", "seed_count", "our_count"),
                         FORWARD_CASES, ids=[c[0] + "".join(f"-{v}" for v in c[1].values()) for c in FORWARD_CASES])
def test_forward_matches_the_seed_on_identical_weights(name: str, options: dict, size: int, classes: int,
                                                      channels: int, seed: Callable[[], nn.Module],
                                                      seed_count: int, our_count: int) -> None:
    """Counts equal the hand counts of docs/models.md; copying our weights into the seed's model by position gives
    the same logits. The Synaptic Flow ResNets' extra parameters are their identity-shortcut scales, held at 1."""
    torch.manual_seed(0)
    ours, reference = _ours(name, size, classes, channels, **options), seed()
    assert (_count(ours), _count(reference)) == (our_count, seed_count)
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(2))
    _compare(ours, reference, x)


# ----------------------------------------------------------------------------------------------------------------
# Initialisation schemes.

def _weights_and_biases(model: nn.Module) -> list[torch.Tensor]:
    return [t for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
            for t in (m.weight, m.bias) if t is not None]


@pytest.mark.parametrize(("name", "options", "seed"), [
    ("vgg16_bn", {"init": "fan_in"}, lambda: _SeedLotteryVGG(16, True, 100)),
    ("resnet20", {"init": "fan_in"}, lambda: _SeedLotteryResNet(20, 16, 100)),
    ("vgg16_bn", {"variant": "tinyimagenet"}, lambda: _SeedTinyImageNetVGG(16, True, 100)),
    ("resnet32", {"width": 32, "init": "xavier"}, lambda: _SeedUnionMaskResNet(5, 100)),
])
def test_init_draws_the_seeds_weights_from_the_same_torch_seed(name: str, options: dict,
                                                               seed: Callable[[], nn.Module]) -> None:
    """Built in the seed's layer order, our scheme draws exactly the seed's init: equal tensors, bit for bit."""
    size = 64 if options.get("variant") == "tinyimagenet" else 32
    torch.manual_seed(7)
    ours = _ours(name, size, 100, **options)
    torch.manual_seed(7)
    reference = seed()
    mine, theirs = _weights_and_biases(ours), _weights_and_biases(reference)
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        assert torch.equal(a, b)


def test_fan_in_gives_he_normal_std_and_zero_biases() -> None:
    """std sqrt(2 / fan_in) on every conv and linear weight (checked on the layers big enough for a 2% bound to be
    40 standard errors wide), mean near 0, every bias 0, BN weight 1 and bias 0."""
    torch.manual_seed(3)
    model = _ours("vgg16_bn", 32, 100, init="fan_in").requires_grad_(False)
    checked = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert torch.count_nonzero(m.bias) == 0
            fan_in = m.weight[0].numel()
            if m.weight.numel() >= 2**17:
                expected = (2.0 / fan_in) ** 0.5
                assert abs(float(m.weight.std()) / expected - 1) < 0.02
                assert abs(float(m.weight.mean())) < 0.02 * expected
                checked += 1
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert checked == 10
    # the default keeps He-normal with fan_out on convs (today's scheme); the seed's scheme differs on the stem
    default = _ours("vgg16_bn", 32, 100).requires_grad_(False)
    stem = default.features[0].weight
    assert abs(float(stem.std()) / (2.0 / (64 * 9)) ** 0.5 - 1) < 0.1


def test_uniform_and_xavier_schemes() -> None:
    torch.manual_seed(4)
    mlp = _ours("lenet_300_100", 28, 10, channels=1, bias=False, batch_norm=True, init="uniform").requires_grad_(False)
    for m in mlp.modules():
        if isinstance(m, nn.Linear):
            bound = 1.0 / m.in_features ** 0.5
            assert float(m.weight.abs().max()) <= bound and float(m.weight.abs().max()) > 0.99 * bound
    assert [type(m).__name__ for m in mlp.features] == ["Linear", "BatchNorm1d", "ReLU"] * 2
    assert isinstance(mlp.out_norm, nn.BatchNorm1d)
    # xavier leaves the 1x1 shortcuts at PyTorch's constructor init (bound 1/sqrt(fan_in)), as the Union Mask code
    resnet = _ours("resnet32", 32, 100, width=32, init="xavier").requires_grad_(False)
    shortcut = resnet.layer2[0].downsample[0].weight
    assert float(shortcut.abs().max()) <= 1.0 / 32**0.5
    body = resnet.layer3[1].conv1.weight
    assert abs(float(body.std()) / (2.0 / (2 * 9 * 128)) ** 0.5 - 1) < 0.02


# ----------------------------------------------------------------------------------------------------------------
# Other input sizes and the configs.

@pytest.mark.parametrize(("size", "pools"), [(8, 3), (28, 4), (32, 4), (64, 4)])
def test_lottery_vgg_builds_at_other_sizes(size: int, pools: int) -> None:
    """Max-pools that would go below 1x1 are skipped; the final map is averaged to 1x1 (the seed's 2x2 at 32 px)."""
    model = _ours("vgg11_bn", size, 10, channels=1)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == pools
    assert model(torch.randn(2, 1, size, size)).shape == (2, 10)
    for variant in ("tinyimagenet", "union_mask"):
        flat = _ours("vgg11_bn", size, 10, channels=1, variant=variant)
        assert flat(torch.randn(2, 1, size, size)).shape == (2, 10)


def _model_options(path: Path) -> tuple[str, dict]:
    from engine.run_config import load_config

    cfg = load_config(str(path))
    return cfg.model.name, dict(cfg.model.options)


def test_seed_configs_select_the_seeds_models_and_init() -> None:
    for path in sorted((REPO / "configs" / "synflow").glob("*.yaml")):
        name, options = _model_options(path)
        if name.startswith("vgg") and "tinyimagenet" in path.stem:
            assert options == {"variant": "tinyimagenet", "init": "default"}, path
        elif name.startswith("vgg"):
            assert options == {"variant": "lottery", "init": "fan_in"}, path
        else:
            assert name == "resnet18" and options["init"] == "default" and options["stem"] == "cifar", path
    for path in sorted((REPO / "configs" / "union_mask").glob("*.yaml")):
        name, options = _model_options(path)
        expected = {"variant": "union_mask"} if name == "vgg19_bn" else {"width": 32, "init": "xavier"}
        assert options == expected, path
    name, options = _model_options(REPO / "configs" / "dsr" / "mlp_mnist_dsr.yaml")
    assert options == {"bias": False, "batch_norm": True, "init": "uniform"}
