"""Switching ``sparsity.method`` on the command line, and the one vocabulary (density kept, scope ``layer``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from engine.config import ConfigError
from engine.run_config import load_config, switch_method
from launcher.cli import main

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


def test_switch_keeps_the_shared_keys_and_names_the_dropped_ones(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(QUICKSTART, ["sparsity.method=rigl"])
    assert (cfg.sparsity.method, cfg.sparsity.density, cfg.sparsity.distribution) == ("rigl", 0.1, "erk")
    assert (cfg.sparsity.period, cfg.sparsity.drop_decay) == (100, "cosine")       # rigl's own defaults
    assert capsys.readouterr().err == ("note: sparsity.method=rigl replaces magnitude: rigl starts from its defaults, "
                                       "dropping sparsity.scope (kept: sparsity.density, sparsity.distribution)\n")


def test_switch_to_dense_drops_density(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(QUICKSTART, ["sparsity.method=dense"])
    assert cfg.sparsity.method == "dense" and not hasattr(cfg.sparsity, "density")
    assert capsys.readouterr().err == ("note: sparsity.method=dense replaces magnitude: dense starts from its defaults,"
                                       " dropping sparsity.density, sparsity.scope, sparsity.distribution\n")


def test_overrides_on_the_same_command_line_still_apply() -> None:
    cfg = load_config(QUICKSTART, ["sparsity.period=10", "sparsity.method=set", "sparsity.density=0.3"])
    assert (cfg.sparsity.method, cfg.sparsity.period, cfg.sparsity.density) == ("set", 10, 0.3)
    with pytest.raises(ConfigError, match=r"^unknown key 'sparsity\.density'"):    # asked for explicitly: refused
        load_config(QUICKSTART, ["sparsity.method=dense", "sparsity.density=0.2"])


def test_no_switch_no_note(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    data = yaml.safe_load(Path(QUICKSTART).read_text())
    assert switch_method(data, ["sparsity.method=magnitude", "optim.lr=0.1"]) == (data, None)
    assert switch_method(data, ["sparsity.method=nope"]) == (data, None)      # build names the valid methods
    with pytest.raises(ConfigError, match="^sparsity.method 'nope' is not a known sparsity method; valid: "):
        load_config(QUICKSTART, ["sparsity.method=nope"])
    monkeypatch.setenv("RANK", "1")                 # workers load the config too: only rank 0 says it
    load_config(QUICKSTART, ["sparsity.method=set"])
    assert capsys.readouterr().err == ""


def test_switch_through_the_launcher(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", QUICKSTART, "sparsity.method=rigl", "--print-config"]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["sparsity"]["method"] == "rigl" and "dropping sparsity.scope" in err


# ---------------------------------------------------------------------------------------------------- vocabulary
@pytest.mark.parametrize("method", ["union_mask", "iterative"])
def test_density_everywhere_and_final_sparsity_refused(method: str) -> None:
    cfg = load_config(None, [f"sparsity.method={method}", "sparsity.density=0.05", "train.epochs=7"])
    assert cfg.sparsity.density == 0.05
    with pytest.raises(ConfigError) as caught:
        load_config(None, [f"sparsity.method={method}", "sparsity.final_sparsity=0.95", "train.epochs=7"])
    assert str(caught.value) == ("sparsity.final_sparsity is no longer accepted: use sparsity.density="
                                 "<1 - final_sparsity> (the fraction kept, as in every method)")


def test_scope_layer_is_the_per_layer_word_and_local_is_refused(tmp_path: Path) -> None:
    assert load_config(None, ["sparsity.method=snip", "sparsity.scope=layer"]).sparsity.scope == "layer"
    old = tmp_path / "old.yaml"
    old.write_text("sparsity: {method: magnitude, scope: local}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(old))
    assert str(caught.value) == ("sparsity.scope=local is no longer accepted: write sparsity.scope=layer (per-layer "
                                 "budgets: one word for it across methods)")
