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


def readme_block(marker: str) -> str:
    """The README code block whose first line is `marker` (the file name it would be saved as)."""
    readme = (ROOT / "README.md").read_text()
    return readme.split(f"{marker}", 1)[1].split("\n", 1)[1].split("```", 1)[0]


FILES = ("my_handlers.py", "test_my_handlers.py")


def test_readme_handler_example_passes_mypy_strict_and_its_test_runs(tmp_path: Path) -> None:
    (tmp_path / "my_handlers.py").write_text(readme_block("# my_handlers.py"))
    (tmp_path / "test_my_handlers.py").write_text(readme_block("# test_my_handlers.py"))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    mypy = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / ".mypy"), *FILES],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert mypy.returncode == 0, mypy.stdout
    test = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "asyncio_mode=auto", FILES[1]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert test.returncode == 0 and "1 passed" in test.stdout, test.stdout


def test_module_class_type_is_found_next_to_the_config_without_pythonpath(tmp_path: Path) -> None:
    """`type = "my_handlers:Audit"` as the README writes it, run from another folder: no PYTHONPATH needed."""
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "my_handlers.py").write_text(readme_block("# my_handlers.py"))
    config = folder / "ftjobs.toml"
    config.write_text('[[handlers]]\nname = "a"\ntype = "my_handlers:Audit"\nurl = "https://a.example/"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "processor", "check-config", "-c", str(config)],
        cwd=elsewhere,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "handler a: type=my_handlers:Audit" in result.stdout


def test_a_user_package_named_like_ours_gets_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "handlers").mkdir()
    (tmp_path / "handlers" / "__init__.py").write_text("")
    (tmp_path / "handlers" / "audit.py").write_text(PLUGIN)
    config = tmp_path / "ftjobs.toml"
    config.write_text('[[handlers]]\nname = "a"\ntype = "handlers.audit:Greeter"\n')
    result = check_config(config, tmp_path / "site")
    assert result.returncode == 2
    assert "'handlers' is the name of ftjobs' own package" in result.stderr
    assert f"{tmp_path / 'handlers'} is hidden by it" in result.stderr


def test_example_plugin_package_installs_and_registers_its_entry_point(tmp_path: Path) -> None:
    """`examples/ftjobs-audit` built and installed as a user would (into its own target folder, not this venv):
    `type = "audit"` is found by its entry-point name, and the package's own tests pass with the test kit."""
    site = tmp_path / "site"
    example = ROOT / "examples" / "ftjobs-audit"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(example)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    config = tmp_path / "ftjobs.toml"
    trail = tmp_path / "audit.jsonl"
    config.write_text(f'[[handlers]]\nname = "trail"\ntype = "audit"\npath = "{trail}"\n')
    result = check_config(config, site)
    assert result.returncode == 0, result.stderr
    assert "handler trail: type=audit" in result.stdout
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "asyncio_mode=auto", "tests"],
        cwd=example,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{site}:{ROOT}", "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert tests.returncode == 0 and "1 passed" in tests.stdout, tests.stdout
