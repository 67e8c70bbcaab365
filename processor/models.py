"""The data ftjobs moves: OpenAI's fine-tuning job and webhook envelope, and our own queued `Event`.

Two trust boundaries, two Struct bases (msgspec's schema-evolution advice):

* payloads from OpenAI or another sender are *tolerant*: unknown fields are ignored, enum-like fields
  (`status`, `method.type`, grader `type`) are plain strings so a new value such as `paused` is kept, and
  `"error": {}` (sent by the live API on jobs that did not fail) decodes;
* records we write to Redis (`Event`) are `frozen=True, kw_only=True`, and every field added later must get
  a default, so old and new workers can run side by side during a deploy.

The stream record (`eventrecord.encode_event`) is positional: `Event` and the job in it are stored as arrays
of their fields in order. So a field added to `Event` or to any struct it holds (`FineTuningJob`, `Method`,
...) goes at the END of its class, with a default; see `processor.eventrecord`.

Reference: the `FineTuningJob` schema in OpenAI's API reference and `openai-python`'s
`types/fine_tuning/fine_tuning_job.py`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib import resources
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

#: Statuses the API documents. Others (e.g. `paused`) are accepted and carried as they are.
KNOWN_STATUSES: Final = frozenset({"validating_files", "queued", "running", "succeeded", "failed", "cancelled"})
#: Where each status sits in a job's life. A job only moves forward through these ranks, except that
#: `running` and `paused` share one (a job may be paused and resumed). Statuses not listed (a new one the
#: API adds) have no rank: they are judged by arrival, never as stale (see `status_rank`).
STATUS_RANK: Final = {
    "validating_files": 1,
    "queued": 2,
    "running": 3,
    "paused": 3,
    "succeeded": 4,
    "failed": 4,
    "cancelled": 4,
}
#: The rank of the statuses a job never leaves.
TERMINAL_RANK: Final = 4
#: The rank of a status we do not know.
UNRANKED: Final = 0
#: Statuses a job never leaves.
TERMINAL_STATUSES: Final = frozenset(s for s, rank in STATUS_RANK.items() if rank == TERMINAL_RANK)
#: Prefix of every fine-tuning event type: `fine_tuning.job.<status>`.
JOB_EVENT_PREFIX: Final = "fine_tuning.job."

Auto = Literal["auto"]
#: Which clock an event's time comes from: the API's (`created_at`, `finished_at`) or ours (when we received it).
#: Times from different clocks are never compared: a few seconds of skew would reorder a job's statuses.
Clock = Literal["api", "local"]
T = TypeVar("T")
R = TypeVar("R")


class Error(Struct, omit_defaults=True):
    """Why a job failed. `code`/`message` default to empty so the live API's `"error": {}` decodes."""

    code: str = ""
    message: str = ""
    param: str | None = None


class Hyperparameters(Struct, omit_defaults=True):
    """The job's top-level hyperparameters: each `"auto"` or the number the API resolved."""

    batch_size: Auto | int | None = None
    learning_rate_multiplier: Auto | float | None = None
    n_epochs: Auto | int | None = None


class DpoHyperparameters(Hyperparameters, omit_defaults=True):
    """Supervised hyperparameters plus DPO's `beta`."""

    beta: Auto | float | None = None


class ReinforcementHyperparameters(Hyperparameters, omit_defaults=True):
    """Supervised hyperparameters plus the reinforcement fine-tuning knobs."""

    compute_multiplier: Auto | float | None = None
    eval_interval: Auto | int | None = None
    eval_samples: Auto | int | None = None
    reasoning_effort: str | None = None


class Grader(Struct, omit_defaults=True):
    """A reinforcement grader. One tolerant struct for every `type` (string_check, text_similarity, python,
    score_model, multi, and any added later), so a new grader kind cannot make a job undecodable."""

    type: str
    name: str | None = None
    input: str | list[Any] | None = None
    reference: str | None = None
    operation: str | None = None
    evaluation_metric: str | None = None
    source: str | None = None
    image_tag: str | None = None
    model: str | None = None
    range: list[float] | None = None
    sampling_params: dict[str, Any] | None = None
    graders: Any = None
    calculate_output: str | None = None


class SupervisedMethod(Struct, omit_defaults=True):
    hyperparameters: Hyperparameters | None = None


class DpoMethod(Struct, omit_defaults=True):
    hyperparameters: DpoHyperparameters | None = None


class ReinforcementMethod(Struct, omit_defaults=True):
    grader: Grader | None = None
    hyperparameters: ReinforcementHyperparameters | None = None


class Method(Struct, omit_defaults=True):
    """How the job trains: `type` names which of the other keys carries the details."""

    type: str
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: ReinforcementMethod | None = None


class WandbIntegration(Struct, omit_defaults=True):
    project: str
    name: str | None = None
    entity: str | None = None
    tags: list[str] | None = None


class Integration(Struct, omit_defaults=True):
    """An integration enabled for the job; only `wandb` exists today."""

    type: str
    wandb: WandbIntegration | None = None


MetadataKey = Annotated[str, Meta(max_length=64)]
MetadataValue = Annotated[str, Meta(max_length=512)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Meta(max_length=16)]
#: A job id: OpenAI's are `ftjob-` + alphanumerics. Other senders may use `_ . : -` too, but never `/`, `%`,
#: `?`, `#` or a leading dot, so an id is one URL path segment and never `.` or `..` (no path traversal).
#: msgspec searches with the pattern, and `$` also matches before a final line break: `\Z` ends it exactly.
JOB_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}\Z"
JobId = Annotated[str, Meta(pattern=JOB_ID_PATTERN, max_length=128)]
#: The id grammar in words, for error messages (msgspec's names the regex).
JOB_ID_RULE: Final = "a job id (1 to 128 of A-Z a-z 0-9 _ . : -, starting with a letter or digit)"
_JOB_ID_REGEX: Final = f"`str` matching regex {JOB_ID_PATTERN!r}"
#: A job status (`running`, or a new one such as `paused`): short, and kept as sent.
Status = Annotated[str, Meta(min_length=1, max_length=64)]
#: An event id in a webhook envelope.
EnvelopeId = Annotated[str, Meta(max_length=128)]
#: An event type; `fine_tuning.job.` (16 characters) plus a status of at most 64.
EventType = Annotated[str, Meta(max_length=80)]


class FineTuningJob(Struct, tag_field="object", tag="fine_tuning.job", omit_defaults=True):
    """A fine-tuning job as the API returns it (`GET /v1/fine_tuning/jobs/{id}`), or as another system posts it.

    Fields the spec requires are required here too, except where the live API is known to omit them;
    the undocumented fields the live API sends (`user_provided_suffix`, `usage_metrics`, ...) are kept.
    """

    id: JobId
    created_at: int
    model: str
    status: Status
    organization_id: str = ""
    training_file: str = ""
    validation_file: str | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    error: Error | None = None
    hyperparameters: Hyperparameters | None = None
    result_files: list[str] = []
    seed: int | None = None
    trained_tokens: int | None = None
    estimated_finish: int | None = None
    integrations: list[Integration] | None = None
    metadata: Metadata | None = None
    method: Method | None = None
    user_provided_suffix: str | None = None
    usage_metrics: dict[str, Any] | None = None
    shared_with_openai: bool | None = None
    eval_id: str | None = None

    @property
    def event_type(self) -> str:
        """The event type a change to this job's current status is announced as."""
        return JOB_EVENT_PREFIX + self.status

    @property
    def failed_error(self) -> Error | None:
        """The error, or None when the API sent an empty `{}` placeholder."""
        return self.error if self.error is not None and (self.error.code or self.error.message) else None


class EventData(Struct):
    id: JobId


class Envelope(Struct, tag_field="object", tag="event"):
    """OpenAI's thin webhook body: which event, when, and the job id (never the job itself).

    `object: "event"` is optional on the wire; `decode_body` accepts it present or absent.
    """

    id: EnvelopeId
    type: EventType
    created_at: int
    data: EventData


Body = Envelope | FineTuningJob


class Event(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One queued event: what was received (or polled), decoded once, stored in the stream as a positional
    msgpack record (`eventrecord.encode_event`; new fields go at the end).

    `id` is the dedupe key (the `webhook-id` header for HTTP deliveries). `job` is None for a thin
    envelope until it is hydrated from the API.
    """

    id: str
    type: str
    job_id: str
    source: Literal["webhook", "push", "poll"] | str
    created_at: int
    received_at: float
    event_id: str | None = None
    job: FineTuningJob | None = None
    previous_status: str | None = None
    stale: bool = False
    #: Set when another event already announced this job's status (e.g. the poller saw it first).
    repeat_of: str | None = None
    #: A replay from a dead-letter stream: only this handler gets it (and gets it even if stale or a repeat).
    target: str | None = None
    #: What happened to earlier deliveries of this event (one line per dead-lettering), for replays.
    history: list[str] = []

    @property
    def status(self) -> str | None:
        """The job status this event announces: the job's own, or the one in a `fine_tuning.job.*` type."""
        if self.job is not None:
            return self.job.status
        if self.type.startswith(JOB_EVENT_PREFIX):
            return self.type.removeprefix(JOB_EVENT_PREFIX)
        return None

    @classmethod
    def from_body(cls, body: Body, *, webhook_id: str, received_at: float) -> Event:
        """Build the queued record for a verified, decoded HTTP body."""
        match body:
            case Envelope():
                return cls(
                    id=webhook_id,
                    type=body.type,
                    job_id=body.data.id,
                    source="webhook",
                    created_at=body.created_at,
                    received_at=received_at,
                    event_id=body.id,
                )
            case FineTuningJob():
                return cls(
                    id=webhook_id,
                    type=body.event_type,
                    job_id=body.id,
                    source="push",
                    created_at=body.finished_at or body.created_at,
                    received_at=received_at,
                    job=body,
                )

    @property
    def observed(self) -> tuple[float, Clock]:
        """When the job reached this status as far as we know, and by which clock: when it finished or when the
        webhook says (the API's clock), or when we learned it (ours: a job object does not say when it entered
        a non-terminal status)."""
        if self.job is not None and self.job.finished_at and self.job.status in TERMINAL_STATUSES:
            return float(self.job.finished_at), "api"
        if self.source == "webhook":
            return float(self.created_at), "api"
        return self.received_at, "local"

    def envelope(self) -> Envelope:
        """The thin webhook envelope that announces this event (as `ftjobs send --thin` posts it)."""
        return Envelope(
            id=self.event_id or self.id,
            type=self.type,
            created_at=self.created_at,
            data=EventData(self.job_id),
        )


def status_rank(status: str) -> int:
    """The status's place in a job's life (`STATUS_RANK`), or `UNRANKED` for a status we do not know."""
    return STATUS_RANK.get(status, UNRANKED)


_body_decoder: Final[msgspec.json.Decoder[Body]] = msgspec.json.Decoder(Body)
_envelope_decoder: Final = msgspec.json.Decoder(Envelope)
_msgpack_encoder: Final = msgspec.msgpack.Encoder()
_job_decoder: Final = msgspec.json.Decoder(FineTuningJob)


def decode_body(raw: bytes) -> Body:
    """Decode a webhook body: an `Envelope` or a `FineTuningJob`, told apart by `object`.

    Raises `msgspec.DecodeError` for malformed JSON and its subclass `msgspec.ValidationError` for JSON
    that does not match the schema (the message carries the JSON path), or that our msgpack record cannot
    hold (an integer beyond 64 bits, values nested deeper than `MAX_DEPTH`).
    """
    try:
        body: Body = decoding(_body_decoder.decode, raw)
    except msgspec.ValidationError:
        # `object` is optional on OpenAI's envelope: a body without it can only be an envelope. Told by
        # looking for the key (only on this error path), not by msgspec's wording of the error.
        if _has_object_key(raw):
            raise
        body = decoding(_envelope_decoder.decode, raw)
    if isinstance(body, Envelope) and body.type == JOB_EVENT_PREFIX:
        raise msgspec.ValidationError(f"`{JOB_EVENT_PREFIX}` names no status - at `$.type`")
    check_storable(raw, body)
    return body


#: How deep a body may nest objects and arrays. The schema needs 6 levels; fields typed `Any`
#: (`usage_metrics`, a grader's) may hold more, up to this. A deeper body is quarantined: its record, two
#: levels deeper still, could not be read back (msgspec, like Python, stops at about 1,000 levels).
MAX_DEPTH: Final = 64
TOO_DEEP: Final = f"objects and arrays are nested more than {MAX_DEPTH} levels deep"
#: A JSON string, escapes included: its brackets are text, not nesting.
_JSON_STRING: Final = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def check_storable(raw: bytes, decoded: object) -> None:
    """Raise `msgspec.ValidationError` unless what `raw` decoded to can go into a stream record: no integer
    beyond 64 bits, nesting at most `MAX_DEPTH`.

    Every decoded document from outside passes here: a webhook body (`decode_body`) and the API's answers
    (`openai`), whose jobs become events too (hydrated, polled)."""
    _check_depth(raw)
    _check_storable(decoded)


def _check_depth(raw: bytes) -> None:
    """Refuse a body nested deeper than `MAX_DEPTH`. Counting its brackets (about 1 µs) settles it for any
    body with fewer than that many; only others are walked, their strings left out."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return
    depth = 0
    for byte in _JSON_STRING.sub(b"", raw):
        if byte in b"[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise msgspec.ValidationError(TOO_DEEP)
        elif byte in b"]}":
            depth -= 1


class _Tag(Struct):
    """Only the `object` key of a body, whatever its value (`UNSET` when the key is absent)."""

    object: Any = msgspec.UNSET


_tag_decoder: Final = msgspec.json.Decoder(_Tag)


def _has_object_key(raw: bytes) -> bool:
    """Whether `raw` is a JSON object with an `object` key (True too when it is no readable JSON object: the
    first decoder's error then stands)."""
    try:
        return _tag_decoder.decode(raw).object is not msgspec.UNSET
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return True


def _check_storable(decoded: object) -> None:
    """JSON integers have no size limit and msgspec decodes them all, but msgpack (the stream record) holds 64
    bits at most, here and in fields typed `Any` (`usage_metrics`). Encoding the body once (about 1 µs)
    finds such an integer before the event is built, so it is a schema mismatch, not a failed write."""
    try:
        _msgpack_encoder.encode(decoded)
    except OverflowError:
        raise msgspec.ValidationError("an integer is out of range (more than 64 bits)") from None


def decode_job(raw: bytes) -> FineTuningJob:
    """Decode one `FineTuningJob` JSON document (as the API returns it)."""
    return decoding(_job_decoder.decode, raw)


#: The statuses a packaged sample job exists for; any other status is made from the `running` one.
SAMPLE_STATUSES: Final = ("succeeded", "failed", "running")


def sample_job(status: str) -> FineTuningJob:
    """A job in `status` made from the packaged samples (`processor/samples/`): the sample of that status, or
    the `running` one, with its status replaced. The one reader of those files (`ftjobs send`, template checks)."""
    name = status if status in SAMPLE_STATUSES else "running"
    job = decode_job((resources.files("processor") / "samples" / f"fine_tuning_job.{name}.json").read_bytes())
    return msgspec.structs.replace(job, status=status)


def _not_utf8(exc: UnicodeDecodeError) -> msgspec.DecodeError:
    return msgspec.DecodeError(f"a string is not valid UTF-8 ({exc.reason})")


def decoding(decode: Callable[[R], T], raw: R) -> T:
    """`decode(raw)`, every failure a `DecodeError`: msgspec reports invalid UTF-8 inside a string as
    `UnicodeDecodeError`, and nesting beyond what it follows as `RecursionError`."""
    try:
        return decode(raw)
    except UnicodeDecodeError as exc:
        raise _not_utf8(exc) from None
    except RecursionError:  # a body is refused at `MAX_DEPTH` (quarantined); a record that deep is damaged
        raise msgspec.ValidationError(TOO_DEEP) from None
    except msgspec.ValidationError as exc:  # the id grammar in words, not as the regex's repr (`\\Z`)
        if _JOB_ID_REGEX in (message := str(exc)):
            raise msgspec.ValidationError(message.replace(_JOB_ID_REGEX, JOB_ID_RULE)) from None
        raise
