"""The `http` handler: start a pipeline (or call anything) with one HTTP request per event.

A generic request (method, URL, headers, a JSON body template that must render valid JSON — checked at start
against sample jobs), or a preset for GitHub Actions, GitLab or Airflow (`handlers/presets.py`). Every
request carries `Idempotency-Key` (stable per event and handler) and, with `sign_secret`, Standard Webhooks
signature headers so the receiver can verify it came from us. Secrets in headers come from the environment
(`Authorization = "Bearer ${PIPELINE_TOKEN}"`) and are never logged.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final, Literal
from urllib.parse import urlencode

import aiohttp
import msgspec

from handlers import presets
from handlers.templates import Template
from processor import outbound, signatures
from processor.handler import ConfigError, Delivery, HandlerContext

Preset = Literal["", "github_repository_dispatch", "github_workflow_dispatch", "gitlab_pipeline", "airflow_dag_run"]
_json: Final = msgspec.json.Encoder()


class HttpOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    preset: Preset = ""
    url: str = ""
    method: Literal["POST", "PUT", "PATCH", "GET", "DELETE"] = "POST"
    headers: dict[str, str] = {}
    #: JSON body template (generic requests). Default: the event with the full job.
    body: str | None = None
    #: Statuses that count as success; empty: any 2xx (a preset sets its own).
    success_status: list[int] = []
    #: `whsec_...`: sign each request with Standard Webhooks headers.
    sign_secret: str = ""
    # Preset parameters.
    api_url: str = ""
    token: str = ""
    username: str = ""
    password: str = ""
    repo: str = ""
    workflow: str = ""
    event_type: str = "fine-tuning-job"
    ref: str = "main"
    project: str = ""
    dag_id: str = ""
    #: Preset inputs (workflow inputs, client_payload, GitLab variables, Airflow conf); values are templates.
    inputs: dict[str, str] = {}


class HttpHandler:
    """Sends one request per event; never twice for the same event (effectively once)."""

    Options = HttpOptions
    effectively_once = True

    def __init__(self, name: str, options: HttpOptions) -> None:
        self.name = name
        self.options = options
        if options.preset:
            self.target = presets.resolve(options.preset, options)
            self.inputs = {
                key: Template(value, "text", f"{name}.inputs.{key}")
                for key, value in (options.inputs or presets.DEFAULT_INPUTS).items()
            }
            self.body: Template | None = None
        else:
            if not options.url.startswith(("http://", "https://")):
                raise ConfigError("url: an http:// or https:// URL is required (or a preset)")
            self.target = presets.Target(method=options.method, url=options.url, headers={})
            self.inputs = {}
            self.body = Template(options.body, "json", f"{name}.body") if options.body is not None else None
        self.ok = tuple(options.success_status) or self.target.ok
        self.signing_key = signatures.parse_secret(options.sign_secret) if options.sign_secret else None
        self._session: aiohttp.ClientSession | None = None
        self.timeout_s = HandlerContext.timeout_s

    async def setup(self, context: HandlerContext) -> None:
        self.timeout_s = context.timeout_s
        self._session = aiohttp.ClientSession()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def request(self, delivery: Delivery) -> tuple[dict[str, str], bytes]:
        """Headers and body for one delivery."""
        event = delivery.event
        headers = {**self.target.headers, **self.options.headers, "Idempotency-Key": delivery.idempotency_key}
        if self.options.preset:
            inputs = {key: template.render(event) for key, template in self.inputs.items()}
            document: Any = presets.payload(self.options.preset, self.options, inputs, delivery.idempotency_key)
            if self.target.form:
                headers["Content-Type"] = "application/x-www-form-urlencoded"
                return headers, urlencode(document).encode()
            body = _json.encode(document)
        elif self.body is not None:
            body = self.body.render(event).encode()
        else:
            body = _json.encode(
                {
                    "type": event.type,
                    "job_id": event.job_id,
                    "status": event.status,
                    "previous_status": event.previous_status,
                    "idempotency_key": delivery.idempotency_key,
                    "job": event.job,
                }
            )
        headers.setdefault("Content-Type", "application/json")
        if self.signing_key is not None:
            # Standard Webhooks ids must not contain '.', so sign under a digest of the idempotency key.
            msg_id = "msg_" + hashlib.sha256(delivery.idempotency_key.encode()).hexdigest()[:32]
            headers |= signatures.signed_headers([self.signing_key], msg_id, body)
        return headers, body

    async def __call__(self, delivery: Delivery) -> None:
        assert self._session is not None, "setup() was not called"
        headers, body = self.request(delivery)
        await outbound.request(
            self._session,
            f"http:{self.name}",
            self.target.method,
            self.target.url,
            ok=self.ok,
            timeout_s=self.timeout_s,
            data=body,
            headers=headers,
        )
