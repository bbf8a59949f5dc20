"""The hand-written CSR kernel (``pruning/export/csr_kernel.c``): every variant equals torch's product on hand-computed
and random cases, for every input layout and batch size around its tile widths, on one and two threads; a layer
exported for it reloads, and runs on torch's kernel (with a warning) where it cannot be built."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from pruning.export import CsrConv2d, CsrLinear, csr_tensors, load_csr, native
from pruning.export.csr import sparsify


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine: the native kernel cannot be built (torch's kernel is used)")
    assert native.kernel() is not None, f"the native CSR kernel did not build: {native.unavailable_reason()}"


def _sparse_linear(rows: int, cols: int, density: float, seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(cols, rows, bias=bias)
    with torch.no_grad():
        layer.weight.mul_((torch.rand_like(layer.weight) < density).float())
        layer.weight[rows // 2].zero_()                       # a row with no non-zero at all
    return layer


@pytest.mark.parametrize("variant", native.VARIANTS)
def test_every_variant_by_hand(variant: tuple[int, int]) -> None:
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, -3.0]]))
        layer.bias.copy_(torch.tensor([0.5, -1.0, 0.0]))
    sparse = CsrLinear.from_linear(layer).with_native(variant)
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 5.0, 1.0]])
    assert sparse(x).tolist() == [[2.5, -1.0, -2.0], [0.5, -1.0, -1.0]]
    assert sparse(x.t().contiguous().t()).tolist() == [[2.5, -1.0, -2.0], [0.5, -1.0, -1.0]]   # transposed input
    assert sparse.form() == f"native {variant[0]}x{variant[1]}"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("variant", native.VARIANTS)
@pytest.mark.parametrize("batch", [1, 7, 8, 9, 16, 31, 33, 64, 100])
def test_every_variant_equals_the_dense_layer(variant: tuple[int, int], batch: int, threads: int) -> None:
    layer = _sparse_linear(37, 53, 0.15)
    sparse = CsrLinear.from_linear(layer).with_native(variant)
    x = torch.randn(batch, 53)
    layouts = {"row-major": x, "transposed": x.t().contiguous().t(), "strided": torch.randn(batch, 106)[:, ::2]}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            expected = layer(layouts["strided"])
            torch.testing.assert_close(sparse(layouts["strided"]), expected, atol=1e-5, rtol=0)
            for name in ("row-major", "transposed"):
                torch.testing.assert_close(sparse(layouts[name]), layer(x), atol=1e-5, rtol=0, msg=name)
    finally:
        torch.set_num_threads(before)


def test_no_bias_three_dimensional_input_and_an_empty_batch() -> None:
    layer = _sparse_linear(9, 20, 0.3, bias=False)
    sparse = CsrLinear.from_linear(layer).with_native(native.DEFAULT)
    x = torch.randn(3, 11, 20)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), layer(x), atol=1e-5, rtol=0)
        assert sparse(torch.randn(0, 20)).shape == (0, 9)


CONVS = [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=2, dilation=2, bias=False),
         dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=1, stride=2), dict(kernel_size=5, padding=0),
         dict(kernel_size=(3, 2), stride=(2, 3), padding=(1, 2))]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("options", CONVS)
@pytest.mark.parametrize("variant", [*native.VARIANTS, "direct"])
def test_conv_through_the_native_kernel(variant: tuple[int, int] | str, options: dict, threads: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, **options)
    with torch.no_grad():
        conv.weight.mul_((torch.rand_like(conv.weight) < 0.3).float())
        conv.weight[2].zero_()                                    # an output channel with no weight at all
    x = torch.randn(2, 3, 9, 7)
    sparse = CsrConv2d.from_conv(conv).with_native(variant)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            torch.testing.assert_close(sparse(x), conv(x), atol=1e-5, rtol=0)
            torch.testing.assert_close(sparse(x.transpose(2, 3).contiguous().transpose(2, 3)), conv(x), atol=1e-5,
                                       rtol=0)                    # a non-contiguous input
    finally:
        torch.set_num_threads(before)


def test_a_direct_conv_reloads() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_((torch.rand_like(conv.weight) < 0.3).float())
    model = nn.Sequential(CsrConv2d.from_conv(conv).with_native("direct"))
    tensors, layers = csr_tensors(model)
    assert layers["0"]["native"] == "direct"
    loaded = load_csr(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), tensors, layers)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert loaded[0].form() == "native direct" and torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("options", [dict(stride=2, padding=1), dict(stride=2, padding=0),
                                     dict(stride=(1, 2), padding=2),
                                     dict(stride=2, padding=1, dilation=2), dict(stride=3, padding=1)])
def test_direct_conv_on_wide_rows(options: dict) -> None:
    """Rows of 37 pixels: the stride-2 phases are split 16 pixels at a time in registers, the rest one by one."""
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, **options)
    with torch.no_grad():
        conv.weight.mul_((torch.rand_like(conv.weight) < 0.3).float())
    x = torch.randn(3, 4, 20, 37)
    with torch.no_grad():
        torch.testing.assert_close(CsrConv2d.from_conv(conv).with_native("direct")(x), conv(x), atol=1e-5, rtol=0)


def test_direct_conv_by_hand() -> None:
    conv = nn.Conv2d(1, 2, 3, padding=1, bias=True)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 2.0          # output 0: 2 * the pixel up-left, 0 past the border, + 1
        conv.weight[1, 0, 1, 2] = -1.0         # output 1: minus the pixel to the right
        conv.bias.copy_(torch.tensor([1.0, 0.0]))
    x = torch.arange(1.0, 7.0).view(1, 1, 2, 3)                  # [[1, 2, 3], [4, 5, 6]]
    out = CsrConv2d.from_conv(conv).with_native("direct")(x)
    assert out[0, 0].tolist() == [[1.0, 1.0, 1.0], [1.0, 3.0, 5.0]]
    assert out[0, 1].tolist() == [[-2.0, -3.0, 0.0], [-5.0, -6.0, 0.0]]
    with pytest.raises(ValueError, match="no native CSR variant 'direct' for CsrLinear"):
        CsrLinear(out.new_zeros(2, 2).to_sparse_csr(), None, None, "direct")


def test_other_dtypes_and_devices_fall_back_to_torch() -> None:
    layer = _sparse_linear(6, 10, 0.4).double()
    sparse = CsrLinear(layer.weight.detach().to_sparse_csr(), layer.bias, None, native.DEFAULT)
    x = torch.randn(5, 10, dtype=torch.float64)
    assert not native.NativeWeight.fits(sparse.weight, sparse.bias)         # int64 indices, float64 values
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), layer(x), atol=1e-12, rtol=0)


def test_a_native_layer_reloads_and_runs_on_torch_where_the_kernel_is_missing(monkeypatch) -> None:
    layer = _sparse_linear(8, 12, 0.3)
    model = nn.Sequential(CsrLinear.from_linear(layer).with_native((2, 4)))
    tensors, layers = csr_tensors(model)
    assert layers["0"]["native"] == [2, 4]
    x = torch.randn(10, 12)
    loaded = load_csr(nn.Sequential(nn.Linear(12, 8)), tensors, layers)
    assert loaded[0].native == (2, 4)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    monkeypatch.setitem(native._state, "lib", None)
    monkeypatch.setitem(native._state, "reason", "no C compiler (test)")
    with pytest.warns(UserWarning, match="native CSR kernel is unavailable here .no C compiler"):
        fallback = load_csr(nn.Sequential(nn.Linear(12, 8)), tensors, layers)
    with torch.no_grad():
        torch.testing.assert_close(fallback(x), layer(x), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no native CSR variant"):
        CsrLinear(model[0].weight, None, None, (3, 3))


def test_auto_choice_offers_the_native_variants_and_sparse_uses_the_default() -> None:
    model = nn.Sequential(_sparse_linear(64, 96, 0.05), nn.ReLU(), _sparse_linear(10, 64, 0.1, seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verdicts = sparsify(model, torch.randn(128, 96), "sparse")
    assert [v.form for v in verdicts] == [f"native {native.DEFAULT[0]}x{native.DEFAULT[1]}"] * 2
    from pruning.export.csr import _variants

    forms = [form.form() for form in _variants(CsrLinear.from_linear(_sparse_linear(8, 12, 0.3)), torch.randn(600, 12))]
    assert forms == ["torch"] + [f"native {v}x{u}" for v, u in native.VARIANTS]
    conv = CsrConv2d.from_conv(nn.Conv2d(2, 3, 3))
    forms = [form.form() for form in _variants(conv, torch.randn(2, 2, 5, 5))]
    assert forms == ["torch"] + [f"native {v}x{u}" for v, u in native.VARIANTS] + ["native direct"]


def test_the_build_is_cached_per_machine(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SPARSETRAIN_CACHE", str(tmp_path))
    path, reason = native._build(native._compiler())
    assert reason == "" and path is not None and path.parent == tmp_path / "native" and path.exists()
    assert native._build(native._compiler())[0] == path                   # second call: the cached file
    assert [p.name for p in (tmp_path / "native").iterdir()] == [path.name]   # no temporary left behind


def test_switched_off_by_the_environment(monkeypatch) -> None:
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("SPARSETRAIN_NATIVE", "0")
    assert native.kernel() is None and native.unavailable_reason() == "SPARSETRAIN_NATIVE=0"
    layer = _sparse_linear(5, 8, 0.5)
    sparse = CsrLinear.from_linear(layer).with_native(native.DEFAULT)       # a file exported for it still runs
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), layer(x), atol=1e-5, rtol=0)
