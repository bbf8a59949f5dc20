"""docs/methods.md is generated from the config classes and must be current; every method key has a meaning."""

from __future__ import annotations

from dataclasses import dataclass, field

from pruning.methods import list_methods
from scripts import methods_doc


def test_page_is_current() -> None:
    page = methods_doc.PAGE.read_text()
    assert page == methods_doc.render(), "docs/methods.md is stale: run python -m scripts.methods_doc"
    for name in list_methods():
        assert f"\n## {name}\n" in page, name


def test_every_method_key_has_a_meaning() -> None:
    assert methods_doc.missing() == []


@dataclass
class _Base:
    """alpha: the first (with a; semicolon in brackets); beta X: the second. gamma is not a clause."""

    alpha: int = 1
    beta: list[int] = field(default_factory=lambda: [2])
    gamma: float = 0.5   # from the comment,
                         # continued here


@dataclass
class _Child(_Base):
    """Nothing about alpha here."""

    alpha: int = 3
    delta: str | None = None


def test_meaning_conventions_on_a_tiny_config() -> None:
    assert methods_doc.meaning(_Child, "alpha") == "the first (with a; semicolon in brackets)"   # from the base
    assert methods_doc.meaning(_Child, "beta") == "the second"
    assert methods_doc.meaning(_Child, "gamma") == "from the comment, continued here"
    assert methods_doc.meaning(_Child, "delta") is None
    assert methods_doc.rows(_Child) == [("alpha", "3", "an integer", "the first (with a; semicolon in brackets)"),
                                        ("beta", "[2]", "a list of integers", "the second"),
                                        ("gamma", "0.5", "a number", "from the comment, continued here"),
                                        ("delta", "null", "a string or null", None)]


def test_check_mode_reports_a_stale_page(tmp_path, monkeypatch, capsys) -> None:
    stale = tmp_path / "methods.md"
    stale.write_text("old\n")
    monkeypatch.setattr(methods_doc, "PAGE", stale)
    assert methods_doc.main(["--check"]) == 1
    assert "methods.md is stale" in capsys.readouterr().err
    assert methods_doc.main([]) == 0 and methods_doc.main(["--check"]) == 0
