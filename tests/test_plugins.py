"""Third-party handlers: an out-of-tree package registered through the `ftjobs.handlers` entry-point group."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PLUGIN = """
import msgspec


class Options(msgspec.Struct, forbid_unknown_fields=True):
    greeting: str = "hello"


class Greeter:
    Options = Options

    def __init__(self, name, options):
        self.name = name
        self.greeting = options.greeting

    async def __call__(self, delivery):
        print(self.greeting, delivery.event.job_id)
"""


def install_plugin(site: Path) -> None:
    """Lay the package out as an installer does: the module, and a dist-info with its entry points."""
    (site / "ftjobs_greeter").mkdir(parents=True)
    (site / "ftjobs_greeter" / "__init__.py").write_text(PLUGIN)
    info = site / "ftjobs_greeter-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ftjobs-greeter\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ftjobs.handlers]\ngreeter = ftjobs_greeter:Greeter\n")


def check_config(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{site}:{ROOT}"}
    return subprocess.run(
        [sys.executable, "-m", "processor", "check-config", "-c", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_entry_point_handler_is_loaded_by_type(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install_plugin(site)
    config = tmp_path / "ftjobs.toml"
    config.write_text('[[handlers]]\nname = "hi"\ntype = "greeter"\ngreeting = "hej"\n')
    result = check_config(config, site)
    assert result.returncode == 0, result.stderr
    assert "handler hi: type=greeter" in result.stdout
    config.write_text('[[handlers]]\nname = "hi"\ntype = "greeter"\ngreting = "hej"\n')
    typo = check_config(config, site)
    assert typo.returncode == 2 and "handlers[0]: Object contains unknown field `greting`" in typo.stderr


def test_unknown_type_lists_plugins_too(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install_plugin(site)
    config = tmp_path / "ftjobs.toml"
    config.write_text('[[handlers]]\nname = "x"\ntype = "greeterr"\n')
    result = check_config(config, site)
    assert result.returncode == 2 and "greeter" in result.stderr and "slack" in result.stderr
