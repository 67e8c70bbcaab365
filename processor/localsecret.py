"""The webhook secret of a zero-config local setup: kept under the data directory, created on first `serve`.

Configured secrets always win; the local one only stands in when none is set (with a warning, because OpenAI
cannot know it), and `ftjobs send` signs with it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import msgspec
import structlog

from processor import signatures
from processor.errors import ConfigError
from processor.settings import Settings

log = structlog.get_logger()

LOCAL_SECRET_FILE: Final = "webhook-secret"


def local_secret(settings: Settings, *, create: bool) -> str | None:
    """The secret kept under the data directory for a zero-config local setup (created on first `serve`)."""
    path = Path(settings.redis.data_dir) / LOCAL_SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    if not create:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(signatures.generate_secret() + "\n")
    return path.read_text().strip()


def with_secrets(settings: Settings, *, create_local: bool) -> Settings:
    """Settings whose receiver has a secret: the configured ones, else the local one (with a warning)."""
    receiver = settings.receiver
    if receiver.secrets or not receiver.verify_signatures:
        return settings
    secret = local_secret(settings, create=create_local)
    if secret is None:
        raise ConfigError("no webhook secret: set OPENAI_WEBHOOK_SECRET (or receiver.secrets) to your whsec_ secret")
    log.warning(
        "using_local_webhook_secret",
        file=str(Path(settings.redis.data_dir) / LOCAL_SECRET_FILE),
        hint="set OPENAI_WEBHOOK_SECRET to the endpoint's signing secret before pointing OpenAI here",
    )
    return msgspec.structs.replace(settings, receiver=msgspec.structs.replace(receiver, secrets=[secret]))


def warn_if_insecure(settings: Settings) -> None:
    """Log loudly when signatures are not verified (anyone reaching the port can inject events)."""
    if not settings.receiver.verify_signatures:
        log.warning(
            "SIGNATURE_VERIFICATION_DISABLED",
            hint="anyone who can reach this port can inject events; for local development only",
        )
