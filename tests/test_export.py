"""``python -m launcher export``: every format reproduces the masked model, and the files load without the project.

Two short runs on the bundled digits (no download): LeNet-300-100 under magnitude pruning at init, and an MLP under
HashedNet. The dense file must load with safetensors and torch alone into a freshly built model and give identical
outputs; CSR layers must match ``nn.Linear`` / ``nn.Conv2d`` within 1e-5 and store exactly the hand-computed rows;
the hashed file must reproduce the tied model and be smaller than the dense one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import models
from engine.run_config import load_config
from engine.trainer import train
from launcher.cli import main
from launcher.export import example_input, export, load_export, masked_model
from pruning.export import CsrConv2d, CsrLinear, csr_tensors, load_csr, sparsify

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _train(root: Path, name: str, *overrides: str) -> Path:
    cfg = load_config(None, [f"output_dir={root}", f"name={name}", "data.name=digits", "data.batch_size=64",
                             "train.epochs=1", "train.max_steps_per_epoch=3", "train.device=cpu",
                             "monitor.progress=false", "monitor.tensorboard=false", *overrides])
    train(cfg)
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    torch.set_num_threads(1)
    return {"magnitude": _train(root, "magnitude", "model.name=lenet_300_100", "sparsity.method=magnitude",
                                "sparsity.density=0.1"),
            "hashed": _train(root, "hashed", "model.name=mlp", "model.options.hidden=[64,32]",
                             "sparsity.method=hashednet", "sparsity.density=0.05")}


def _inputs(manifest: dict) -> torch.Tensor:
    return example_input(manifest, 16, seed=1)


def test_dense_loads_with_safetensors_and_torch_alone(runs: dict[str, Path], tmp_path: Path) -> None:
    export(str(runs["magnitude"]), "dense", str(tmp_path / "dense"), report=lambda _: None)
    raw = (tmp_path / "dense" / "model.safetensors").read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and json.loads(raw[8:8 + header])   # a JSON header and raw bytes: no pickle anywhere
    manifest = json.loads((tmp_path / "dense" / "export.json").read_text())
    assert manifest["model"] == {"name": "lenet_300_100", "options": {}} and manifest["format"] == "dense"
    shape = manifest["input"]
    built = models.build_model("lenet_300_100", in_channels=shape["channels"], image_size=shape["image_size"],
                               num_classes=shape["num_classes"])
    built.load_state_dict(load_file(str(tmp_path / "dense" / "model.safetensors")), strict=True)
    masked, _ = masked_model(str(runs["magnitude"]), [])
    x = _inputs(manifest)
    with torch.no_grad():
        assert torch.equal(built.eval()(x), masked(x))
    # and without the project at all: the same layers in plain torch, by the same names
    plain = nn.Module()
    plain.features = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU())
    plain.classifier = nn.Linear(100, 10)
    plain.load_state_dict(load_file(str(tmp_path / "dense" / "model.safetensors")), strict=True)
    with torch.no_grad():
        assert torch.equal(plain.classifier(plain.features(x.flatten(1))), masked(x))
    kept = sum(int(torch.count_nonzero(w)) for n, w in built.named_parameters() if n.endswith("weight"))
    total = sum(w.numel() for n, w in built.named_parameters() if n.endswith("weight"))
    assert kept < 0.2 * total        # the pruned weights arrived as zeros


def test_csr_matches_the_masked_model_and_reloads(runs: dict[str, Path], tmp_path: Path) -> None:
    lines: list[str] = []
    result = export(str(runs["magnitude"]), "csr", str(tmp_path / "csr"), choice="sparse", report=lines.append)
    assert len(lines) == 3 and all("-> csr (" in line for line in lines)
    loaded, manifest = load_export(str(tmp_path / "csr"))
    assert sum(isinstance(m, CsrLinear) for m in loaded.modules()) == 3
    masked, _ = masked_model(str(runs["magnitude"]), [])
    x = _inputs(manifest)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), masked(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(result["exported"](x), masked(x), atol=1e-5, rtol=0)
    nnz = sum(int(torch.count_nonzero(w)) for n, w in masked.named_parameters() if n.endswith("weight"))
    rows = 300 + 100 + 10
    bias = (300 + 100 + 10) * 4
    assert manifest["bytes"]["exported"] == nnz * 8 + (rows + 3) * 4 + bias    # int32 indices, fp32 values


def test_csr_export_says_when_the_project_kernel_is_missing(runs: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from pruning.export import native

    monkeypatch.setitem(native._state, "lib", None)
    monkeypatch.setitem(native._state, "reason", "no C compiler (cc, gcc or clang, or $CC) on this machine")
    lines: list[str] = []
    result = export(str(runs["magnitude"]), "csr", str(tmp_path / "csr"), choice="sparse", report=lines.append)
    assert lines[0] == ("the project's CSR kernel is not built here (no C compiler (cc, gcc or clang, or $CC) on this "
                        "machine): torch's kernels only")
    assert all(line.endswith("-> csr (torch)") for line in lines[1:])
    assert all(spec["native"] is None for spec in result["manifest"]["layers"].values())


def test_auto_choice_times_every_candidate_and_keeps_the_faster(runs: dict[str, Path], tmp_path: Path) -> None:
    masked, manifest = masked_model(str(runs["magnitude"]), [])
    model = masked
    verdicts = sparsify(model, _inputs(manifest), "auto", min_run_time=0.01)
    assert len(verdicts) == 3
    for verdict in verdicts:
        assert verdict.dense_us is not None and verdict.sparse_us is not None
        assert verdict.kept == ("csr" if verdict.sparse_us < verdict.dense_us else "dense")
    assert sum(isinstance(m, CsrLinear) for m in model.modules()) == sum(v.kept == "csr" for v in verdicts)


def test_csr_linear_by_hand() -> None:
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, -3.0]]))
        layer.bias.copy_(torch.tensor([0.5, -1.0, 0.0]))
    sparse = CsrLinear.from_linear(layer)
    assert sparse.weight.crow_indices().tolist() == [0, 1, 1, 3]
    assert sparse.weight.col_indices().tolist() == [1, 0, 3]
    assert sparse.weight.values().tolist() == [2.0, 1.0, -3.0]
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 5.0, 1.0]])
    assert sparse(x).tolist() == [[2.5, -1.0, -2.0], [0.5, -1.0, -1.0]]
    assert sparse(x.view(2, 1, 4)).shape == (2, 1, 3)


def test_layers_are_timed_on_the_input_the_converted_model_hands_them() -> None:
    from pruning.export.csr import _inputs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[:, ::2] = 0.0
    x = torch.randn(5, 6)
    calls = []
    model[4].register_forward_pre_hook(lambda *_: calls.append(1))
    assert _inputs(model, x, {"2": model[2]})["2"].is_contiguous() and calls == []   # stops once seen
    model[0] = CsrLinear.from_linear(model[0])
    handed = _inputs(model, x, {"2": model[2]})["2"]
    assert not handed.is_contiguous() and handed.t().is_contiguous()        # the CSR layer's transposed output


@pytest.mark.parametrize("tile", [1, 3, 7, 40])
def test_tiled_csr_linear_equals_the_untiled_one_and_reloads(tile: int) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(12, 5)
    with torch.no_grad():
        layer.weight.mul_((torch.rand_like(layer.weight) < 0.3).float())
    x = torch.randn(4, 5, 12)                   # 20 rows: tiles of 3 and 7 leave a short last tile, 40 is one tile
    tiled = CsrLinear.from_linear(layer, tile)
    with torch.no_grad():
        torch.testing.assert_close(tiled(x), layer(x), atol=1e-5, rtol=0)
        assert tiled(x).shape == (4, 5, 5) and tiled(x).is_contiguous() == (tile < 20)   # tiles write rows
    model = nn.Sequential(tiled)
    tensors, layers = csr_tensors(model)
    assert layers == {"0": {"kind": "linear", "shape": [5, 12], "tile": tile, "native": None}}
    loaded = load_csr(nn.Sequential(nn.Linear(12, 5)), tensors, layers)
    assert loaded[0].tile == tile
    with torch.no_grad():
        assert torch.equal(loaded(x), tiled(x))
    with pytest.raises(ValueError, match="at least 1 row"):
        CsrLinear.from_linear(layer, 0)


@pytest.mark.parametrize("options", [dict(padding=1), dict(stride=2, padding=2, dilation=2, bias=False),
                                     dict(kernel_size=(1, 3), padding=(0, 1))])
def test_csr_conv_matches_conv2d(options: dict) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, **{"kernel_size": 3, **options})
    with torch.no_grad():
        conv.weight.mul_((torch.rand_like(conv.weight) < 0.2).float())
    x = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(CsrConv2d.from_conv(conv)(x), conv(x), atol=1e-5, rtol=0)


def test_corrupt_csr_indices_are_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.mul_(torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]]))
    sparsify(model, torch.randn(2, 4), "sparse")
    tensors, layers = csr_tensors(model)
    tensors["0.col_indices"] = tensors["0.col_indices"].clone().fill_(9)   # past the 4 columns
    with pytest.raises(RuntimeError):
        load_csr(nn.Sequential(nn.Linear(4, 3)), tensors, layers)


def test_hashed_reproduces_the_tied_model_and_is_smaller(runs: dict[str, Path], tmp_path: Path) -> None:
    export(str(runs["hashed"]), "dense", str(tmp_path / "dense"), report=lambda _: None)
    result = export(str(runs["hashed"]), "hashed", str(tmp_path / "hashed"), report=lambda _: None)
    loaded, manifest = load_export(str(tmp_path / "hashed"))
    tied, _ = masked_model(str(runs["hashed"]), [])
    x = _inputs(manifest)
    with torch.no_grad():
        assert torch.equal(loaded(x), tied(x))
    tensors = load_file(str(tmp_path / "hashed" / "model.safetensors"))
    for name, spec in manifest["layers"].items():
        assert tensors[f"{name}.bank"].numel() == spec["bank"]
        assert tensors[f"{name}.assignment"].dtype == (torch.uint8 if spec["bank"] <= 256 else torch.int16)
    dense_file = (tmp_path / "dense" / "model.safetensors").stat().st_size
    assert (tmp_path / "hashed" / "model.safetensors").stat().st_size < 0.5 * dense_file
    assert result["bytes"]["exported"] < 0.5 * result["bytes"]["dense"]


def test_the_command_and_its_one_line_errors(runs: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    def cli(*args: str) -> tuple[int, str, str]:
        status = main(["export", *args])
        out, err = capsys.readouterr()
        return status, out, err

    status, out, _ = cli(str(runs["magnitude"]), "--format", "dense", "--out", str(tmp_path / "d"))
    assert status == 0 and "exported dense" in out and (tmp_path / "d" / "model.safetensors").is_file()
    status, out, err = cli(str(runs["magnitude"]), "--format", "csr", "--out", str(tmp_path / "c"), "--threads", "1",
                           "--bench", "--rounds", "2", "--serving-batch", "8")
    assert status == 0, err
    assert sum(line.startswith("| lenet_300_100 |") for line in out.splitlines()) == 4   # 2 batches x 2 variants
    status, _, err = cli(str(tmp_path / "nothing"), "--format", "dense")
    assert status == 2 and err.strip().startswith("export error:") and len(err.strip().splitlines()) == 1
    status, _, err = cli(str(runs["magnitude"]), "--format", "hashed", "--out", str(tmp_path / "h"))
    assert status == 2 and "needs a HashedNet run" in err and len(err.strip().splitlines()) == 1
    for flag in ("--timing-batch", "--serving-batch", "--rounds", "--threads"):
        status, _, err = cli(str(runs["magnitude"]), "--format", "csr", flag, "0", "--out", str(tmp_path / "z"))
        assert (status, err.strip()) == (2, f"export error: {flag} must be at least 1, got 0")
    assert not (tmp_path / "z").exists()
