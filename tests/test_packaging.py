"""pyproject.toml declares what the code imports, agrees with requirements.txt's pins, and installs a working command.

`pip install -e .` must give a `sparsetrain` that runs: every third-party import of the shipped packages is a declared
dependency (or an extra, for the optional backends), and the pinned set in requirements.txt satisfies those bounds.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")   # Python 3.11+; the checks are the same on every version
from packaging.requirements import Requirement  # noqa: E402  (pip's own dependency, always installed with it)

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
OURS = {"launcher", "engine", "pruning", "models", "common", "tune", "benchmarks", "scripts", "tests"}


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(requirement).name).lower()


def _declared() -> dict[str, Requirement]:
    extras = [r for group, reqs in PROJECT["optional-dependencies"].items() for r in reqs if group != "all"]
    return {_name(r): Requirement(r) for r in [*PROJECT["dependencies"], *extras]}


def _pinned() -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    return {_name(line): Requirement(line).specifier.__str__().removeprefix("==") for line in lines if line}


def _shipped_packages() -> list[str]:
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    return [p.rstrip("*") for p in packages["find"]["include"]]


def _third_party_imports() -> dict[str, str]:
    """Top-level module -> first file importing it, over every module of the shipped packages."""
    found: dict[str, str] = {}
    for package in _shipped_packages():
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in OURS and top != "__future__":
                        found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_every_third_party_import_is_declared() -> None:
    providers = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = []
    for module, where in _third_party_imports().items():
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in providers.get(module, [module])}
        if not dists & declared.keys():
            missing.append(f"{module} (imported by {where}; distributions {sorted(dists)})")
    assert not missing, f"add to pyproject.toml dependencies or an extra: {missing}"


def test_the_pinned_set_satisfies_the_declared_bounds_and_covers_them() -> None:
    """requirements.txt pins every declared package, or a package that requires it (pillow comes with torchvision),
    and declares nothing pyproject.toml leaves out."""
    pinned, declared = _pinned(), _declared()
    assert not pinned.keys() - declared.keys(), "requirements.txt pins packages pyproject.toml does not declare"
    brought = {_name(r) for dist in pinned for r in importlib.metadata.requires(dist) or [] if "extra ==" not in r}
    for name, requirement in declared.items():
        if name not in pinned:
            assert name in brought, f"{name} is declared but neither pinned in requirements.txt nor required by a pin"
            continue
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"requirements.txt pins {name}=={pinned[name]}, outside pyproject.toml's {requirement}")


def test_every_package_directory_ships_and_the_command_is_the_launcher() -> None:
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests", "benchmarks", "scripts"}
    assert packages == set(_shipped_packages())
    assert PROJECT["scripts"] == {"sparsetrain": "launcher.cli:main"}
    assert PROJECT["optional-dependencies"]["all"] == ["sparsetrain[deepspeed,tune,test]"]


@pytest.mark.slow
def test_pip_install_editable_gives_a_working_command(tmp_path: Path) -> None:
    """In a fresh venv that sees this interpreter's packages (no downloads): `pip install -e .`, then `sparsetrain`
    from outside the checkout."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=300)
    # this interpreter's pip and setuptools build it (a new venv's own setuptools may predate editable wheels)
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                              "--no-deps", "--no-build-isolation", "-e", "."],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run([str(venv / "bin" / "sparsetrain"), "train", str(REPO / "configs" / "quickstart.yaml"),
                             "--print-config"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "quickstart" in result.stdout and "sparsity:" in result.stdout
    usage = subprocess.run([str(venv / "bin" / "sparsetrain"), "--help"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300, env=env)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: sparsetrain "), usage.stdout[:300]
