"""What the package says about itself is true: the wheel ships its licence and `py.typed`, the version is written
once, and every dependency floor is the version the lowest-versions run in `.ci/run` installs."""

from __future__ import annotations

import email.parser
import importlib.metadata
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from processor import __version__
from tests.conftest import ROOT

LOWEST = ROOT / ".ci" / "constraints-lowest.txt"
#: Test tools whose floors the lowest-versions run leaves to float (see the constraints file).
FLOATING = {"mypy", "ruff", "matplotlib", "playwright"}


def test_wheel_ships_license_py_typed_and_the_one_version(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("ftjobs-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata_name,) = (name for name in names if name.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(metadata_name).decode())
        licence = archive.read(metadata_name.replace("METADATA", "licenses/LICENSE")).decode()
    assert {"processor/py.typed", "handlers/py.typed"} <= names
    assert licence.startswith("MIT License")
    assert metadata["License-Expression"] == "MIT"
    assert metadata["Version"] == __version__
    assert "Typing :: Typed" in metadata.get_all("Classifier", [])


def test_version_flag_prints_the_one_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "processor", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ftjobs {__version__}"
    assert importlib.metadata.version("ftjobs") == __version__


def test_lowest_constraints_pin_every_floor_and_nothing_else() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors: dict[str, Version] = {}
    extras = [line for group in project["optional-dependencies"].values() for line in group]
    for line in [*project["dependencies"], *extras]:
        requirement = Requirement(line)
        if requirement.name in FLOATING or requirement.name == project["name"]:  # `ftjobs[otel]` in `test`
            continue
        (floor,) = (Version(spec.version) for spec in requirement.specifier if spec.operator == ">=")
        floors[requirement.name.lower()] = floor
    pins: dict[str, Version] = {}
    for line in LOWEST.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = Version(version.strip())
    assert pins == floors
