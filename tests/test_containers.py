"""The container files: compose builds every ftjobs service, the Dockerfile caches its dependency layer and
declares `serve`'s data directory a volume, `.dockerignore` keeps local state out, the comments match the README."""

from __future__ import annotations

import re
from fnmatch import fnmatch
from pathlib import PurePosixPath

import yaml

from processor.settings import Settings
from tests.conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions (continuation lines joined), as (KEYWORD, arguments)."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    lines = [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def ignored(path: str) -> bool:
    """Whether `.dockerignore` keeps `path` out of the build context (its rules in order, the last match wins)."""
    rules = [r.strip() for r in (ROOT / ".dockerignore").read_text().splitlines() if r.strip() and r[0] != "#"]
    verdict = False
    parts = PurePosixPath(path).parts
    for rule in rules:
        negated, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch(prefix, pattern) or fnmatch(prefix, pattern.removeprefix("**/")) for prefix in prefixes) or (
            pattern.startswith("**/") and any(fnmatch(part, pattern[3:]) for part in parts)
        ):
            verdict = not negated
    return verdict


def test_every_ftjobs_service_can_be_built() -> None:
    """`docker compose pull` skips a service with `build:`; without it the local image name is pulled and fails."""
    services = yaml.safe_load(COMPOSE_TEXT)["services"]
    ours = {name: service for name, service in services.items() if service.get("image", "").startswith("ftjobs:")}
    assert set(ours) >= {"receiver", "worker"}
    assert all(service.get("build") == "." for service in ours.values()), ours


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    steps = instructions()
    copies = [i for i, (keyword, _) in enumerate(steps) if keyword == "COPY"]
    first_copy = steps[copies[0]][1].split()
    assert first_copy == ["pyproject.toml", "./"], first_copy  # the dependency layer depends on this file only
    code = min(i for i in copies if "processor" in steps[i][1])
    deps = [i for i, (keyword, args) in enumerate(steps) if keyword == "RUN" and "pip install -r" in args]
    assert deps and deps[0] < code
    assert any(keyword == "RUN" and "pip install --no-deps ." in args for keyword, args in steps[code:])


def test_serve_data_directory_is_a_volume() -> None:
    steps = instructions()
    [workdir] = [args for keyword, args in steps if keyword == "WORKDIR"]
    data_dir = str(PurePosixPath(workdir) / Settings().redis.data_dir)
    volumes = [args for keyword, args in steps if keyword == "VOLUME"]
    assert any(data_dir in volume for volume in volumes), (data_dir, volumes)
    # Declared after the directory is created and owned by the image's user, or the volume starts root-owned.
    order = [keyword for keyword, args in steps if keyword == "VOLUME" or "chown" in args]
    assert order.index("VOLUME") > 0


def test_dockerignore_keeps_local_state_out_and_what_the_image_copies_in() -> None:
    sources = [
        src for keyword, args in instructions() if keyword == "COPY" for src in args.split()[:-1] if src[0] != "-"
    ]
    for source in sources:
        assert not ignored(source), source
    for path in (".git/HEAD", ".venv/bin/python", ".ftjobs/appendonly.aof", "config/ftjobs.toml", "tests/x.py"):
        assert ignored(path), path
    assert ignored("processor/__pycache__/cli.cpython-312.pyc")
    assert not ignored("processor/cli.py")


def test_compose_header_matches_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    header = [line.removeprefix("#") for line in COMPOSE_TEXT.splitlines() if line.startswith("#")]
    commands = [line.strip() for line in header if line.startswith("   ")]
    assert commands and all(command in readme for command in commands), commands
    assert "FTJOBS_CONFIG=/config/ftjobs.toml" in " ".join(header) and "`FTJOBS_CONFIG=/config/ftjobs.toml`" in readme
