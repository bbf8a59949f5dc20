"""Registry-wide contract tests for models/, exact parameter counts, and the configuration error table."""


import pytest
import torch
import torch.nn as nn

from models import build_model, check_model_options, list_models, model_options, register_model
from models.common import INPUT_ROLES, ROLES, get_role, set_role

# Small inputs per model (in_channels, image_size) so the whole registry runs in seconds on 2 CPU cores.
SMALL_INPUT: dict[str, tuple[int, int]] = {
    "mlp": (1, 8),
    "lenet_300_100": (1, 8),
    "conv": (3, 16),
    "wrn28_10": (3, 8),
}
NUM_CLASSES = 10


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv/linear layers in registration order, which every family keeps equal to forward order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _build_meta(name: str, **kwargs: object) -> nn.Module:
    """Build without allocating memory or running init: enough to count parameters and inspect structure."""
    with torch.device("meta"):
        return build_model(name, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list_models())
def test_model_contract(name: str) -> None:
    """Roles are tagged as the pruning code expects; forward gives logits; backward reaches every parameter."""
    torch.manual_seed(0)
    in_channels, image_size = SMALL_INPUT.get(name, (3, 32))
    model = build_model(name, in_channels=in_channels, image_size=image_size, num_classes=NUM_CLASSES)

    layers = _layers(model)
    assert get_role(layers[0][1]) in INPUT_ROLES, f"first layer {layers[0][0]} must be the stem"
    assert get_role(layers[-1][1]) == "classifier", f"last layer {layers[-1][0]} must be the classifier"
    roles = [get_role(m) for m in model.modules()]
    assert sum(r in INPUT_ROLES for r in roles) == 1
    assert roles.count("classifier") == 1
    for module_name, module in model.named_modules():
        if get_role(module) is not None:
            assert isinstance(module, (nn.Conv2d, nn.Linear)), f"{module_name} is tagged but not conv/linear"
            assert get_role(module) in ROLES

    x = torch.randn(2, in_channels, image_size, image_size)
    out = model(x)
    assert out.shape == (2, NUM_CLASSES)
    out.square().mean().backward()
    for param_name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{param_name} got no gradient"
            assert torch.isfinite(param.grad).all(), f"{param_name} has non-finite gradient"

    defaults = {key: default for key, (_, default) in model_options(name).items()}
    check_model_options(name, defaults)


# (name, options, in_channels, image_size, num_classes, exact parameter count)
PARAM_COUNTS = [
    # torchvision's published counts.
    ("resnet18", {}, 3, 224, 1000, 11_689_512),
    ("resnet50", {}, 3, 224, 1000, 25_557_032),
    # CIFAR stem: 7x7 -> 3x3 stem saves 40*3*64 = 7_680; 10-way head saves 512*990 + 990 = 507_870.
    ("resnet18", {"stem": "cifar"}, 3, 32, 10, 11_173_962),
    # VGG-16-BN, CIFAR-style, conv biases kept:
    # convs 14_714_688 (weights 3x3 + biases over 64,64,128,128,256x3,512x6), BN 2 * 4_224, linear 5_130.
    ("vgg16_bn", {}, 3, 32, 10, 14_728_266),
    # ResNet-20 with 1x1-conv+BN projections: stem 464, stage1 14_016, stage2 51_648, stage3 205_696, fc 650.
    # (= 269_722 of the paper's option-A ResNet-20 + 2_752 for the two projections.)
    ("resnet20", {}, 3, 32, 10, 272_474),
    # WRN-28-10 on CIFAR-10, the standard 36.5M figure.
    ("wide_resnet", {"depth": 28, "widen_factor": 10}, 3, 32, 10, 36_479_194),
    ("wrn28_10", {}, 3, 32, 10, 36_479_194),
    # LeNet-300-100: 784*300+300 + 300*100+100 + 100*10+10.
    ("lenet_300_100", {}, 1, 28, 10, 266_610),
    # timm's ViT-S/16 and ViT-B/16 at 224 px.
    ("vit_s16", {}, 3, 224, 1000, 22_050_664),
    ("vit_b16", {}, 3, 224, 1000, 86_567_656),
]


@pytest.mark.parametrize(("name", "options", "channels", "size", "classes", "expected"), PARAM_COUNTS)
def test_parameter_counts(name: str, options: dict, channels: int, size: int, classes: int, expected: int) -> None:
    model = _build_meta(name, in_channels=channels, image_size=size, num_classes=classes, **options)
    assert _count(model) == expected


@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn"])
def test_vgg16_has_14_prunable_layers(name: str) -> None:
    """Synaptic Flow's layer-collapse experiment needs exactly 13 convs + 1 linear."""
    layers = [m for _, m in _layers(_build_meta(name, in_channels=3, image_size=32, num_classes=10))]
    assert sum(isinstance(m, nn.Conv2d) for m in layers) == 13
    assert sum(isinstance(m, nn.Linear) for m in layers) == 1


def test_vgg_skips_pools_on_small_inputs() -> None:
    model = build_model("vgg11", in_channels=3, image_size=8, num_classes=10)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 10)


def test_vit_module_names_for_pruning() -> None:
    """Synaptic Stripping hooks blocks.<i>.mlp.act; masks address qkv/proj/fc1/fc2 by name."""
    model = _build_meta("vit_cifar", in_channels=3, image_size=32, num_classes=10)
    modules = dict(model.named_modules())
    assert get_role(modules["patch_embed"]) == "patch_embed"
    assert get_role(modules["blocks.0.attn.qkv"]) == "attn_qkv"
    assert get_role(modules["blocks.0.attn.proj"]) == "attn_out"
    assert get_role(modules["blocks.6.mlp.fc1"]) == "mlp_fc1"
    assert isinstance(modules["blocks.6.mlp.act"], nn.ReLU)
    assert get_role(modules["blocks.6.mlp.fc2"]) == "mlp_fc2"
    assert "blocks.7.attn.qkv" not in modules
    assert model.pos_embed.shape == (1, 8 * 8 + 1, 384)
    assert modules["blocks.0.mlp.fc1"].out_features == 4 * 384
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


def test_shortcuts_are_tagged() -> None:
    resnet = dict(_build_meta("resnet50", in_channels=3, image_size=64, num_classes=10).named_modules())
    assert get_role(resnet["layer1.0.downsample.0"]) == "shortcut"
    assert get_role(resnet["layer2.0.downsample.0"]) == "shortcut"
    cifar = dict(_build_meta("resnet20", in_channels=3, image_size=32, num_classes=10).named_modules())
    assert cifar["layer1.0"].downsample is None
    assert get_role(cifar["layer2.0.downsample.0"]) == "shortcut"
    wrn = dict(_build_meta("wrn28_2", in_channels=3, image_size=32, num_classes=10).named_modules())
    assert get_role(wrn["block1.0.shortcut"]) == "shortcut"


def test_resnet_options() -> None:
    options = {"stem": "cifar", "width_factor": 2, "zero_init_residual": True}
    model = build_model("resnet18", in_channels=3, image_size=32, num_classes=10, **options)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.out_channels == 128
    assert model.fc.in_features == 1024
    assert torch.count_nonzero(model.layer1[0].bn2.weight) == 0
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_options_and_presets() -> None:
    assert list_models() == sorted(list_models())
    assert model_options("resnet18") == {
        "stem": (model_options("resnet18")["stem"][0], "imagenet"),
        "width_factor": (int, 1),
        "zero_init_residual": (bool, False),
        "init": (model_options("resnet18")["init"][0], "default"),
    }
    assert model_options("wrn28_10")["widen_factor"] == (int, 10)
    assert model_options("vit_cifar")["activation"][1] == "relu"
    assert model_options("mlp")["hidden"] == (list[int], [300, 100])
    model_options("mlp")["hidden"][1][0] = 7  # a returned default is a copy
    assert model_options("mlp")["hidden"][1] == [300, 100]
    assert model_options("resnet20") == {"width": (int, 16), "init": (model_options("resnet20")["init"][0], "default")}
    assert {key: default for key, (_, default) in model_options("vgg16").items()} == {
        "variant": "lottery", "init": "default"}
    check_model_options("vit", {"mlp_ratio": 2, "dropout": 0, "activation": "relu", "patch_size": 8})
    check_model_options("mlp", {"hidden": [64, 32], "bias": False})
    assert build_model("resnet20", in_channels=3, image_size=32, num_classes=10, width=32).fc.in_features == 128


def test_set_role_rejects_unknown_roles() -> None:
    layer = set_role(nn.Linear(2, 2), "shortcut")
    assert layer.sparsity_role == "shortcut"
    with pytest.raises(ValueError, match="unknown sparsity role 'body'"):
        set_role(nn.Linear(2, 2), "body")


def test_duplicate_registration_fails() -> None:
    with pytest.raises(ValueError, match="model 'mlp' is already registered"):
        register_model("mlp")(lambda in_channels, image_size, num_classes: nn.Identity())


ERRORS = [
    ("resnet19", {}, 32, "unknown model 'resnet19'; did you mean 'resnet18'? valid: conv, lenet_300_100, mlp, "),
    ("resnet18", {"widht": 2}, 32,
     "model resnet18 has no option 'widht'; valid options: init, stem, width_factor, zero_init_residual"),
    ("resnet18", {"width_factr": 2}, 32,
     "model resnet18 has no option 'width_factr'; did you mean 'width_factor'? valid options: init, stem, "),
    ("vgg16", {"width": 2}, 32, "model vgg16 has no option 'width'; valid options: init, variant"),
    ("wide_resnet", {"depth": "28"}, 32, "model wide_resnet: option depth must be int, got str"),
    ("wide_resnet", {"depth": True}, 32, "model wide_resnet: option depth must be int, got bool"),
    ("wide_resnet", {"dropout": "0.3"}, 32, "model wide_resnet: option dropout must be float, got str"),
    ("mlp", {"hidden": [300, "100"]}, 8, "model mlp: option hidden[1] must be int, got str"),
    ("mlp", {"hidden": 300}, 8, "model mlp: option hidden must be list[int], got int"),
    ("resnet18", {"stem": "cifra"}, 32,
     "model resnet18: option stem must be one of 'imagenet', 'cifar', got 'cifra'; did you mean 'cifar'?"),
    ("wide_resnet", {"depth": 27}, 32,
     "model wide_resnet: depth 27 is invalid: (depth - 4) must be a positive multiple of 6; set depth to e.g. 16"),
    ("wide_resnet", {"dropout": 1.0}, 32, "model wide_resnet: option dropout must be in [0, 1), got 1.0"),
    ("vit_cifar", {}, 30,
     "model vit_cifar: image_size 30 is not divisible by patch_size 4; set data.image_size to a multiple of 4"),
    ("vit", {"dim": 100, "heads": 3}, 32, "model vit: dim 100 is not divisible by heads 3; set dim to a multiple"),
    ("conv", {"width": 0}, 32, "model conv: option width must be >= 1, got 0"),
    ("mlp", {"hidden": []}, 8, "model mlp: option hidden must list at least one hidden layer width"),
]


@pytest.mark.parametrize(("name", "options", "size", "message"), ERRORS)
def test_error_messages(name: str, options: dict, size: int, message: str) -> None:
    with pytest.raises(ValueError) as info:
        _build_meta(name, in_channels=3, image_size=size, num_classes=10, **options)
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_check_model_options_does_not_build() -> None:
    """Names and types are checked; value rules that need the input size (depth, patches) wait for build."""
    check_model_options("wide_resnet", {"depth": 27})
    with pytest.raises(ValueError, match="^unknown model 'vit_tiny'"):
        check_model_options("vit_tiny", {})
    with pytest.raises(ValueError, match="^model vit_b16: option dim must be int, got float$"):
        check_model_options("vit_b16", {"dim": 768.0})


def test_size_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="^model conv: in_channels must be a positive int, got 0$"):
        build_model("conv", in_channels=0, image_size=32, num_classes=10)
