"""Every subpackage is named in pyproject.toml: an editable install finds unlisted ones, a wheel would not."""

from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "medseg").rglob("__init__.py")}
    assert found - {"medseg.presets"} <= listed and "medseg.presets" in listed


def test_package_data_is_declared():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "*.j2" in data["medseg.reporting.templates"] and "*.yaml" in data["medseg.presets"]
    assert (ROOT / "medseg" / "py.typed").is_file() and "py.typed" in data["medseg"]
