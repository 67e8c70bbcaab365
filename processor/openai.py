"""OpenAI fine-tuning API client (aiohttp), decoding into the same `FineTuningJob` struct as webhooks.

Retrieve a job, list jobs (pagination, `metadata[k]=v` filter), list a job's events. Statuses are read by
`outbound.classify`, the policy the handlers' requests follow too: 429, 408 and 5xx are retried (honouring
`Retry-After`, else exponential backoff with full jitter), bounded by `max_retries` and a per-request
timeout; 401/403 raise `OpenAIAuthError` naming what is wrong, never the key; 404 raises `JobNotFound`.
Redirects are never followed (they would carry the key to wherever they point): a 3xx is an `OpenAIError`
naming its target. Job ids are URL-quoted into paths, so an id is always one path segment.
API reference: https://platform.openai.com/docs/api-reference/fine-tuning
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Mapping
from math import inf
from typing import Any, Final, TypeVar
from urllib.parse import quote

import aiohttp
import msgspec
import structlog
from msgspec import Struct

from processor.errors import FtjobsError
from processor.models import FineTuningJob, check_storable
from processor.outbound import MAX_ANSWER_BYTES as _MAX_ANSWER_BYTES
from processor.outbound import classify, read_answer, redirect_target
from processor.outbound import retry_after as _retry_after
from processor.policy import backoff_delay
from processor.settings import OpenAISettings

log = structlog.get_logger()


class OpenAIError(FtjobsError):
    """The API could not be used right now (after retries): network, timeout, 429 or 5xx."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OpenAIAuthError(OpenAIError):
    """401/403: the key is missing, wrong, or lacks access to this organization/project."""


class JobNotFound(OpenAIError):
    """404: no such fine-tuning job (deleted, or another organization's)."""


class FineTuningJobEvent(Struct):
    """One entry of `GET /fine_tuning/jobs/{id}/events` (not a webhook)."""

    id: str
    created_at: int
    level: str
    message: str
    type: str | None = None
    data: Any = None


class JobPage(Struct):
    """One page of jobs. `skipped`: the jobs of the page that could not be read (the id when it could be, and
    why), left out so one odd job does not hide all the others; `last_id`: where the next page starts."""

    data: list[FineTuningJob]
    has_more: bool = False
    skipped: list[tuple[str | None, str]] = []
    last_id: str | None = None


class _RawJobPage(Struct):
    data: list[msgspec.Raw]
    has_more: bool = False


class _JobId(Struct):
    id: str


class EventPage(Struct):
    data: list[FineTuningJobEvent]
    has_more: bool = False


class _ErrorBody(Struct):
    message: str = ""
    code: str | None = None


class _ErrorEnvelope(Struct):
    error: _ErrorBody | None = None


T = TypeVar("T")
_job_decoder: Final = msgspec.json.Decoder(FineTuningJob)
_raw_job_page_decoder: Final = msgspec.json.Decoder(_RawJobPage)
_job_id_decoder: Final = msgspec.json.Decoder(_JobId)
_event_page_decoder: Final = msgspec.json.Decoder(EventPage)
_error_decoder: Final = msgspec.json.Decoder(_ErrorEnvelope)


class OpenAIClient:
    """A small async client; use as `async with OpenAIClient(settings) as api:`."""

    def __init__(self, settings: OpenAISettings) -> None:
        self.settings = settings
        self._base = settings.base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {settings.api_key}", "User-Agent": "ftjobs"}
        if settings.organization:
            headers["OpenAI-Organization"] = settings.organization
        if settings.project:
            headers["OpenAI-Project"] = settings.project
        self._headers = headers
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OpenAIClient:
        self._session = aiohttp.ClientSession(headers=self._headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def retrieve_job(self, job_id: str) -> FineTuningJob:
        """`GET /fine_tuning/jobs/{id}`."""
        return _decode(_job_decoder, await self._get(f"/fine_tuning/jobs/{_segment(job_id)}", {}), storable=True)

    async def list_jobs(
        self, *, limit: int = 20, after: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> JobPage:
        """One page of `GET /fine_tuning/jobs` (newest first)."""
        params: dict[str, str] = {"limit": str(limit)}
        if after:
            params["after"] = after
        for key, value in (metadata or {}).items():
            params[f"metadata[{key}]"] = value
        return _job_page(await self._get("/fine_tuning/jobs", params))

    async def iter_jobs(
        self,
        *,
        page_size: int = 100,
        max_pages: int = 10,
        metadata: Mapping[str, str] | None = None,
        skipped: set[str] | None = None,
    ) -> AsyncIterator[FineTuningJob]:
        """Recent jobs, newest first, following `has_more` for at most `max_pages` pages. The ids of the jobs
        listed but unreadable (logged, not yielded) are added to `skipped` when given."""
        after = None
        for _ in range(max_pages):
            page = await self.list_jobs(limit=page_size, after=after, metadata=metadata)
            for job_id, why in page.skipped:
                log.warning("api_job_unreadable", job_id=job_id, error=why)
                if skipped is not None and job_id is not None:
                    skipped.add(job_id)
            for job in page.data:
                yield job
            if not page.has_more or page.last_id is None:
                return
            after = page.last_id

    async def list_events(self, job_id: str, *, limit: int = 20, after: str | None = None) -> EventPage:
        """One page of `GET /fine_tuning/jobs/{id}/events`."""
        params = {"limit": str(limit)} | ({"after": after} if after else {})
        return _decode(_event_page_decoder, await self._get(f"/fine_tuning/jobs/{_segment(job_id)}/events", params))

    async def _get(self, path: str, params: dict[str, str]) -> bytes:
        assert self._session is not None, "use `async with OpenAIClient(...)`"
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s)
        what, url = f"GET {path}", self._base + path
        for attempt in range(self.settings.max_retries + 1):
            retry_after: float | None = None
            try:
                async with self._session.get(url, params=params, timeout=timeout, allow_redirects=False) as resp:
                    body = await read_answer(resp, _MAX_ANSWER_BYTES + 1)
                    status = resp.status
                    retry_after = _retry_after(resp.headers)
                    location = resp.headers.get("Location", "")
            except (TimeoutError, aiohttp.ClientError) as exc:
                problem = OpenAIError(f"{what}: {type(exc).__name__ or 'timeout'}")
            else:
                outcome = classify(status, ok=(200,))
                if outcome == "ok":
                    if len(body) > _MAX_ANSWER_BYTES:
                        raise OpenAIError(f"{what}: the answer is larger than {_MAX_ANSWER_BYTES >> 20} MiB")
                    return body
                if outcome == "redirect":
                    where = redirect_target(location, url)
                    raise OpenAIError(f"{what}: redirected ({status}) to {where}; check openai.base_url")
                message = _error_message(body)
                if status in (401, 403):
                    raise OpenAIAuthError(
                        f"{what}: {status} — {message or 'check OPENAI_API_KEY'} (organization/project headers: "
                        f"{self.settings.organization or '-'} / {self.settings.project or '-'})"
                    )
                if status == 404:
                    raise JobNotFound(f"{what}: 404 — {message or 'not found'}")
                if outcome == "refused":
                    raise OpenAIError(f"{what}: {status} — {message}")
                problem = OpenAIError(f"{what}: {status} — {message}", retry_after)
            if attempt == self.settings.max_retries:
                raise problem
            delay = retry_after if retry_after is not None else backoff_delay(attempt + 1, 0.5, inf, random.random())
            await asyncio.sleep(min(delay, self.settings.timeout_s))
        raise AssertionError("unreachable")


def _job_page(body: bytes) -> JobPage:
    """A page of jobs, each read on its own: one the schema refuses is skipped (`JobPage.skipped`)."""
    raw = _decode(_raw_job_page_decoder, body)
    page = JobPage(data=[], has_more=raw.has_more)
    for item in map(bytes, raw.data):
        try:
            job = _decode(_job_decoder, item, storable=True)
        except OpenAIError as exc:
            job_id = _id_of(item)
            page.skipped.append((job_id, str(exc)))
            page.last_id = job_id or page.last_id
        else:
            page.data.append(job)
            page.last_id = job.id
    return page


def _id_of(item: bytes) -> str | None:
    """The `id` of a job the schema refused, when it has a readable one (for the log and the next page)."""
    try:
        return _job_id_decoder.decode(item).id
    except msgspec.DecodeError:
        return None


def _segment(job_id: str) -> str:
    """A job id as exactly one URL path segment: `/`, `%`, `?`, `#` and the rest quoted.

    `.` and `..` stay dot segments even when quoted (URLs are normalised), so they are refused as
    `JobNotFound`; decoded job ids can be neither (their schema), this holds for ids from anywhere else too.
    """
    if not job_id.strip("."):
        raise JobNotFound(f"{job_id!r} is not a job id")
    return quote(job_id, safe="")


def _decode(decoder: msgspec.json.Decoder[T], body: bytes, *, storable: bool = False) -> T:
    """A 200 answer that does not match the schema is the API's problem: an `OpenAIError`, with the path.

    A job becomes a stream record (a hydrated or polled event), so one (`storable`) must hold what a record
    can, as a webhook body must: an integer beyond 64 bits in `usage_metrics` made every hydration of the
    batch, or the whole poll, fail with an `OverflowError`."""
    try:
        decoded = decoder.decode(body)
        if storable:
            check_storable(body, decoded)
        return decoded
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise OpenAIError(f"the API answered with an unexpected document: {exc}") from None


def _error_message(body: bytes) -> str:
    try:
        error = _error_decoder.decode(body).error
    except (msgspec.DecodeError, UnicodeDecodeError):
        return body[:200].decode(errors="replace")
    return error.message if error else ""
