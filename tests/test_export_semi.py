"""``--format 2:4``: the packed file form and its exact inverse, the per-layer plan, the whole export checked on a CPU
with the 2:4 layers as dense half weights, the one-line refusal without CUDA, and (marked gpu) the real kernels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from launcher.cli import main
from launcher.export import export_model, load_export
from pruning.export import write_export
from pruning.export.semi import SemiStructuredLinear, follows_two_four, pack, plan, relative_error, unpack
from pruning.methods import MethodContext, build_method
from pruning.methods.at_init import AtInitConfig
from pruning.targets import TargetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pack_by_hand_and_unpack_is_its_exact_inverse() -> None:
    weight = torch.tensor([[0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 0.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.25, 0.5, 0.0]])
    parts = pack(weight)
    # kept slots per group: (1, 3), (0, 1) (one non-zero, then the lowest zero slot), (0, 1), (1, 2)
    assert parts["values"].tolist() == [[1.5, -2.0, 3.0, 0.0], [0.0, 0.0, 0.25, 0.5]]
    codes = [1 | 3 << 2, 0 | 1 << 2, 0 | 1 << 2, 1 | 2 << 2]
    assert parts["positions"].tolist() == [codes[0] | codes[1] << 4, codes[2] | codes[3] << 4]
    assert parts["positions"].dtype == torch.uint8
    assert torch.equal(unpack(parts["values"], parts["positions"], weight.shape), weight)


@pytest.mark.parametrize("shape", [(3, 12), (32, 64), (5, 4)])
def test_round_trip_of_random_two_four_weights_in_half_precision(shape: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator)
    groups = weight.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().topk(2, 1).indices, True)
    weight = (groups * keep).reshape(shape).to(torch.bfloat16)
    weight[0, :4] = 0          # a group with nothing kept
    parts = pack(weight)
    assert parts["values"].dtype == torch.bfloat16 and parts["values"].numel() == weight.numel() // 2
    assert torch.equal(unpack(parts["values"], parts["positions"], shape), weight)


def test_weights_off_the_pattern_and_corrupt_positions_are_refused() -> None:
    assert not follows_two_four(torch.ones(2, 8)) and not follows_two_four(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="not 2:4"):
        pack(torch.ones(2, 8))
    parts = pack(torch.zeros(1, 8))
    with pytest.raises(ValueError, match="corrupt"):
        unpack(parts["values"], torch.tensor([0xFF], dtype=torch.uint8), (1, 8))
    with pytest.raises(ValueError, match="do not make"):
        unpack(parts["values"], parts["positions"], (2, 8))


def mlp() -> nn.Module:
    """The registered MLP on 8 x 8 digits: features.0 64 -> 64 and features.2 64 -> 32 fit the kernels' shapes, the
    32 -> 10 classifier does not (10 rows)."""
    torch.manual_seed(0)
    return models.build_model("mlp", in_channels=1, image_size=8, num_classes=10, hidden=[64, 32]).eval()


def two_four_mlp(device: str = "cpu") -> nn.Module:
    model = mlp().to(device)
    config = AtInitConfig(method="magnitude", density=0.5, nm=[2, 4],
                          targets=TargetConfig(exclude=["classifier.weight"]))
    build_method(config, model, None, MethodContext(device=torch.device(device))).setup()
    return model.eval()


MANIFEST = {"model": {"name": "mlp", "options": {"hidden": [64, 32]}},
            "input": {"channels": 1, "image_size": 8, "num_classes": 10}}


def test_plan_converts_the_two_four_linears_that_fit_and_says_why_not_elsewhere() -> None:
    choices = {c.name: c for c in plan(two_four_mlp(), torch.bfloat16)}
    assert choices["features.0"].kept == choices["features.2"].kept == "2:4"
    assert choices["classifier"].kept == "dense" and "more than 2" in choices["classifier"].reason
    model = two_four_mlp()
    with torch.no_grad():
        model.classifier.weight[:, 1::2] = 0.0   # 2:4 now; 10 rows, a multiple of 16 for the kernel with padding
    head = {c.name: c for c in plan(model, torch.bfloat16)}["classifier"]
    assert head.kept == "2:4" and head.reason == "outputs padded to 16"
    odd_layer = nn.Linear(40, 16)
    nn.init.zeros_(odd_layer.weight)
    odd, = plan(nn.Sequential(odd_layer), torch.bfloat16)
    assert odd.kept == "dense" and odd.reason == "the kernel needs inputs in multiples of 16"
    # the padded layer (zero rows added for the kernel, the extra outputs sliced off) computes the plain product
    weight, bias = model.classifier.weight.detach().bfloat16(), model.classifier.bias.detach().bfloat16()
    padded = SemiStructuredLinear(weight, bias, convert=False)
    assert padded.weight.shape == (16, 32)
    x = torch.randn(3, 32).bfloat16()
    assert torch.equal(padded(x), nn.functional.linear(x, weight, bias))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_export_on_a_cpu_without_the_kernel_matches_the_masked_model(precision: str, tmp_path: Path) -> None:
    model = two_four_mlp()
    lines: list[str] = []
    exported, tensors, manifest = export_model(model, MANIFEST, "2:4", torch.device("cpu"), report=lines.append,
                                               precision=precision, convert=False)
    assert manifest["format"] == "2:4" and manifest["precision"] == precision
    assert set(manifest["layers"]) == {"features.0", "features.2"} and manifest["rel_error"] < 5e-3
    assert any(line.startswith("classifier") and "-> dense (not 2:4" in line for line in lines)
    # 2 bytes per kept value + 1 byte per 2 groups: 64*64 weights -> 4096 + 512 bytes instead of 16384 fp32
    assert tensors["features.0.values"].numel() * 2 + tensors["features.0.positions"].numel() == 4096 + 512
    assert isinstance(exported.model.features[0], SemiStructuredLinear)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert relative_error(model(x), exported(x)) < (3e-2 if precision == "bf16" else 5e-3)
    write_export(str(tmp_path / "e"), tensors, manifest)
    loaded, saved = load_export(str(tmp_path / "e"), convert=False)
    assert saved["layers"] == {"features.0": {"shape": [64, 64]}, "features.2": {"shape": [32, 64]}}
    with torch.no_grad():
        assert torch.equal(loaded(x), exported(x))
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        load_export(str(tmp_path / "e"), "cpu")      # the kernel: CUDA only


def test_export_refuses_a_model_with_no_two_four_layer() -> None:
    with pytest.raises(ValueError, match=r"no linear layer keeping at most 2 of every 4 .* sparsity.nm=\[2,4\]"):
        export_model(mlp(), MANIFEST, "2:4", torch.device("cpu"), report=lambda _: None, convert=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_cli_says_in_one_line_that_two_four_needs_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # the path does not exist: the answer comes before anything is read
    assert main(["export", str(tmp_path / "no-run"), "--format", "2:4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("export error: --format 2:4 needs a CUDA GPU") and "\n" not in err


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_two_four_on_the_gpu_runs_the_semi_structured_kernel(precision: str, tmp_path: Path) -> None:
    from torch.sparse import SparseSemiStructuredTensor

    model = two_four_mlp("cuda")
    exported, tensors, manifest = export_model(model, MANIFEST, "2:4", torch.device("cuda"), report=lambda _: None,
                                               precision=precision)
    assert isinstance(exported.model.features[0].weight, SparseSemiStructuredTensor)
    x = torch.randn(64, 1, 8, 8, device="cuda")
    with torch.no_grad():
        assert relative_error(model(x), exported(x)) < (3e-2 if precision == "bf16" else 5e-3)
    write_export(str(tmp_path / "e"), tensors, manifest)
    loaded, _ = load_export(str(tmp_path / "e"), "cuda")
    assert isinstance(loaded.model.features[2].weight, SparseSemiStructuredTensor)
    with torch.no_grad():
        assert relative_error(exported(x), loaded(x)) < 1e-3
    assert json.loads((tmp_path / "e" / "export.json").read_text())["format"] == "2:4"
