"""Decoding what senders post, and the record we store."""

from __future__ import annotations

import contextlib
import random
import re

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor import eventrecord, models
from processor.eventrecord import decode_event, encode_event
from processor.models import Envelope, Event, FineTuningJob, decode_body, decode_job, sample_job
from tests.conftest import sample

SUCCEEDED_JOB = "fine_tuning_job.succeeded.json"


@pytest.mark.parametrize("status", ["succeeded", "failed", "running"])
def test_sample_jobs_decode_completely(status: str) -> None:
    raw = sample(f"fine_tuning_job.{status}.json")
    job = decode_body(raw)
    assert isinstance(job, FineTuningJob)
    assert job.status == status
    # Every value of the sample survives (encoding leaves out defaults: nulls and empty lists).
    assert _without_nulls(msgspec.json.decode(msgspec.json.encode(job))) == _without_nulls(msgspec.json.decode(raw))
    assert decode_job(msgspec.json.encode(job)) == job


def _without_nulls(doc: object) -> object:
    if isinstance(doc, dict):
        return {k: _without_nulls(v) for k, v in doc.items() if v is not None and v != []}
    if isinstance(doc, list):
        return [_without_nulls(v) for v in doc]
    return doc


def test_nested_types_are_typed() -> None:
    dpo = decode_job(sample("fine_tuning_job.succeeded.json"))
    assert dpo.method is not None and dpo.method.dpo is not None and dpo.method.dpo.hyperparameters is not None
    assert dpo.method.dpo.hyperparameters.beta == 0.1
    assert dpo.integrations is not None and dpo.integrations[0].wandb is not None
    assert dpo.integrations[0].wandb.tags == ["dpo", "support", "dataset-v3.2"]
    failed = decode_job(sample("fine_tuning_job.failed.json"))
    assert failed.hyperparameters is not None and failed.hyperparameters.n_epochs == "auto"
    assert failed.failed_error is not None and failed.failed_error.code == "invalid_training_file"
    rft = decode_job(sample("fine_tuning_job.running.json"))
    assert rft.method is not None and rft.method.reinforcement is not None
    grader = rft.method.reinforcement.grader
    assert grader is not None and (grader.type, grader.operation) == ("string_check", "eq")
    hp = rft.method.reinforcement.hyperparameters
    assert hp is not None and (hp.reasoning_effort, hp.eval_interval) == ("medium", 5)


def test_envelope_with_and_without_object() -> None:
    raw = sample("webhook_event.fine_tuning.job.succeeded.json")
    with_object = decode_body(raw)
    doc = msgspec.json.decode(raw)
    del doc["object"]
    without_object = decode_body(msgspec.json.encode(doc))
    assert isinstance(with_object, Envelope)
    assert with_object == without_object
    assert with_object.data.id == "ftjob-7cQm2VfRZk1LwN8xTa4YpE3u"


class _RewordedDecoder:
    """The body decoder as a msgspec release that words its errors differently would behave."""

    def __init__(self, real: msgspec.json.Decoder[object]) -> None:
        self.real = real

    def decode(self, raw: bytes) -> object:
        try:
            return self.real.decode(raw)
        except msgspec.ValidationError as exc:
            raise msgspec.ValidationError(f"reworded: {exc}") from None


def test_an_envelope_without_object_does_not_depend_on_msgspec_wording(monkeypatch: pytest.MonkeyPatch) -> None:
    """A body without `object` is told apart by the key missing, not by the text of msgspec's error."""
    monkeypatch.setattr(models, "_body_decoder", _RewordedDecoder(models._body_decoder))
    doc = msgspec.json.decode(sample("webhook_event.fine_tuning.job.succeeded.json"))
    del doc["object"]
    body = decode_body(msgspec.json.encode(doc))
    assert isinstance(body, Envelope) and body.data.id == "ftjob-7cQm2VfRZk1LwN8xTa4YpE3u"
    # An `object` that is there, even null or of the wrong type, is never taken for a missing one.
    for value in (None, 5, "nope"):
        with pytest.raises(msgspec.ValidationError, match=r"^reworded: "):
            decode_body(msgspec.json.encode({**doc, "object": value}))
    with pytest.raises(msgspec.ValidationError, match=r"^reworded: "):
        decode_body(b"[]")


def test_unknown_event_types_are_carried() -> None:
    body = decode_body(b'{"id":"evt_1","type":"batch.completed","created_at":1,"data":{"id":"batch_1"}}')
    assert isinstance(body, Envelope) and body.type == "batch.completed"


def test_live_api_quirks_are_tolerated() -> None:
    doc = msgspec.json.decode(sample("fine_tuning_job.succeeded.json"))
    doc |= {
        "error": {},
        "status": "paused",
        "estimated_finish": 0,
        "user_provided_suffix": "support-dpo-v3",
        "usage_metrics": {"tokens": 3},
        "shared_with_openai": False,
        "brand_new_field": {"x": 1},
    }
    doc["method"]["type"] = "something_new"
    job = decode_job(msgspec.json.encode(doc))
    assert job.status == "paused"
    assert job.error is not None and job.failed_error is None
    assert job.estimated_finish == 0
    assert job.user_provided_suffix == "support-dpo-v3"
    assert job.method is not None and job.method.type == "something_new"


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"created_at": "yesterday"}, "$.created_at"),
        ({"hyperparameters": {"n_epochs": "many"}}, "$.hyperparameters.n_epochs"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "$.metadata"),
        ({"metadata": {"k" * 65: "v"}}, "`key` in `$.metadata`"),
        ({"metadata": {"k": "v" * 513}}, "$.metadata"),
        ({"status": None}, "$.status"),
    ],
)
def test_schema_errors_name_the_path(change: dict[str, object], path: str) -> None:
    doc = msgspec.json.decode(sample("fine_tuning_job.failed.json")) | change
    with pytest.raises(msgspec.ValidationError, match=re.escape(path)):
        decode_body(msgspec.json.encode(doc))


def test_not_json_is_a_decode_error_not_a_validation_error() -> None:
    with pytest.raises(msgspec.DecodeError) as info:
        decode_body(b"{not json")
    assert not isinstance(info.value, msgspec.ValidationError)


def test_event_record_round_trips_and_is_compact() -> None:
    raw = compact_sample = msgspec.json.encode(msgspec.json.decode(sample("fine_tuning_job.succeeded.json")))
    job = decode_job(raw)
    event = Event.from_body(job, webhook_id="wh_1", received_at=1.5)
    record = encode_event(event)
    assert decode_event(record) == event
    assert decode_event(record).job == job
    assert record[0] == 0x90 + len(msgspec.structs.fields(Event)) + 1 and record[1] == eventrecord.EVENT_RECORD_VERSION
    assert len(record) < 0.65 * len(compact_sample)  # 599 of 1,032 bytes; the named map took 1,010
    assert event.type == "fine_tuning.job.succeeded" and event.status == "succeeded"


def _event(status: str = "succeeded", **changes: object) -> Event:
    event = Event.from_body(sample_job(status), webhook_id="wh_1", received_at=1.5)
    return msgspec.structs.replace(event, **changes)


def test_decoded_events_are_the_model_classes_not_their_positional_twins() -> None:
    """Handlers get `Event`, `FineTuningJob`, ... themselves: a twin would encode as an array (to JSON too)."""
    event = decode_event(encode_event(_event()))
    job = event.job
    assert type(event) is Event and type(job) is FineTuningJob
    assert job.integrations is not None and type(job.integrations[0]) is models.Integration
    assert job.method is not None and job.method.dpo is not None
    assert type(job.method.dpo.hyperparameters) is models.DpoHyperparameters
    assert msgspec.json.encode(job).startswith(b'{"object":"fine_tuning.job"')


def test_version_1_records_still_decode() -> None:
    """Records written before version 2 (a named map: dead letters keep them, replays re-enqueue them)."""
    event = _event(
        "failed", previous_status="running", repeat_of="wh_0", target="slack", history=["dead-lettered once"]
    )
    old = msgspec.msgpack.Encoder().encode(event)  # how releases before version 2 wrote the record
    assert old[0] & 0xF0 == 0x80
    assert decode_event(old) == event
    assert decode_event(msgspec.msgpack.encode(_event("running", stale=True))) == _event("running", stale=True)


def _fields(record: bytes) -> list[object]:
    fields = msgspec.msgpack.decode(record)
    assert isinstance(fields, list)
    return fields


def test_a_newer_writers_appended_fields_are_ignored() -> None:
    """A later release appends fields (with defaults) to `Event` and to the job: this one reads the rest."""
    event = _event()
    fields = _fields(encode_event(event))
    job = fields[1 + [f.name for f in msgspec.structs.fields(Event)].index("job")]
    assert isinstance(job, list)
    job += ["a field added later", {"nested": [1, 2]}]
    fields += [True, "another", None]
    assert decode_event(msgspec.msgpack.encode(fields)) == event


def test_an_older_writers_record_gets_the_newer_fields_defaults() -> None:
    """A record from before the trailing optional fields existed: they take their defaults."""
    minimal_job = FineTuningJob(id="ftjob-1", created_at=1, model="m", status="running")
    event = Event.from_body(minimal_job, webhook_id="wh_1", received_at=1.5)
    fields = _fields(encode_event(event))
    job_at = 1 + [f.name for f in msgspec.structs.fields(Event)].index("job")
    job_fields = fields[job_at]
    assert isinstance(job_fields, list)
    fields[job_at] = job_fields[:4]  # id, created_at, model, status: the required ones
    fields = fields[: job_at + 1]  # no previous_status, stale, repeat_of, target, history
    assert decode_event(msgspec.msgpack.encode(fields)) == event


#: The version 2 record's positions. A field appended at the end of its class keeps the version: add it here.
#: Any other change to this layout moves positions: it needs a new `EVENT_RECORD_VERSION` (see models.py).
PINNED_LAYOUT = {
    "Error": ["code", "message", "param"],
    "Hyperparameters": ["batch_size", "learning_rate_multiplier", "n_epochs"],
    "WandbIntegration": ["project", "name", "entity", "tags"],
    "Integration": ["type", "wandb"],
    "SupervisedMethod": ["hyperparameters"],
    "DpoHyperparameters": ["batch_size", "learning_rate_multiplier", "n_epochs", "beta"],
    "DpoMethod": ["hyperparameters"],
    "Grader": [
        "type",
        "name",
        "input",
        "reference",
        "operation",
        "evaluation_metric",
        "source",
        "image_tag",
        "model",
        "range",
        "sampling_params",
        "graders",
        "calculate_output",
    ],
    "ReinforcementHyperparameters": [
        "batch_size",
        "learning_rate_multiplier",
        "n_epochs",
        "compute_multiplier",
        "eval_interval",
        "eval_samples",
        "reasoning_effort",
    ],
    "ReinforcementMethod": ["grader", "hyperparameters"],
    "Method": ["type", "supervised", "dpo", "reinforcement"],
    "FineTuningJob": [
        "id",
        "created_at",
        "model",
        "status",
        "organization_id",
        "training_file",
        "validation_file",
        "fine_tuned_model",
        "finished_at",
        "error",
        "hyperparameters",
        "result_files",
        "seed",
        "trained_tokens",
        "estimated_finish",
        "integrations",
        "metadata",
        "method",
        "user_provided_suffix",
        "usage_metrics",
        "shared_with_openai",
        "eval_id",
    ],
    "Event": [
        "id",
        "type",
        "job_id",
        "source",
        "created_at",
        "received_at",
        "event_id",
        "job",
        "previous_status",
        "stale",
        "repeat_of",
        "target",
        "history",
    ],
}


def test_the_record_layout_only_grows_at_the_end() -> None:
    layout = eventrecord.record_layout()
    for name, pinned in PINNED_LAYOUT.items():
        assert layout[name][: len(pinned)] == pinned, (
            f"{name}'s fields moved in the event record: append new fields at the end, or bump EVENT_RECORD_VERSION"
        )
    assert layout == PINNED_LAYOUT, "fields were appended: add them to PINNED_LAYOUT"
    assert eventrecord.EVENT_RECORD_VERSION == 2


@pytest.mark.parametrize(("version", "message"), [(3, "version 3 is newer than this release reads"), (0, "version 0")])
def test_a_record_of_another_version_is_refused_clearly(version: int, message: str) -> None:
    fields = _fields(encode_event(_event()))
    fields[0] = version
    with pytest.raises(msgspec.DecodeError, match=message):
        decode_event(msgspec.msgpack.encode(fields))


def test_version_2_records_are_validated_like_the_model() -> None:
    fields = _fields(encode_event(_event()))
    fields[1 + [f.name for f in msgspec.structs.fields(Event)].index("job")][0] = "../etc"  # type: ignore[index]
    with pytest.raises(msgspec.ValidationError, match=r"a job id .* at `\$\.job\.id`"):
        decode_event(msgspec.msgpack.encode(fields))
    fields = _fields(encode_event(_event()))
    fields[5] = "yesterday"  # created_at
    with pytest.raises(msgspec.ValidationError, match="Expected `int`, got `str`"):
        decode_event(msgspec.msgpack.encode(fields))
    with pytest.raises(msgspec.ValidationError, match="at least length"):
        decode_event(msgspec.msgpack.encode(fields[:3]))


@pytest.mark.parametrize("first", range(256))
def test_any_bytes_are_an_event_or_a_decode_error(first: int) -> None:
    """Whatever sits in the stream's `e` field: a DecodeError (the worker dead-letters it), never another
    exception. Every first byte (map, array and every other msgpack type), then random tails."""
    rng = random.Random(first)
    tails = [b"", b"\x02", b"\x03", b"\x02\xa0"] + [rng.randbytes(rng.randrange(1, 80)) for _ in range(40)]
    tails += [bytes([2]) + rng.randbytes(rng.randrange(1, 80)) for _ in range(20)]
    for tail in tails:
        with contextlib.suppress(msgspec.DecodeError):
            assert isinstance(decode_event(bytes([first]) + tail), Event)


@settings(max_examples=1000, deadline=None, database=None)
@given(data=st.data(), version=st.sampled_from([1, 2]))
def test_damaged_records_are_an_event_or_a_decode_error(data: st.DataObject, version: int) -> None:
    event = _event(data.draw(st.sampled_from(["succeeded", "failed", "running"])))
    record = bytearray(encode_event(event) if version == 2 else msgspec.msgpack.encode(event))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(record) - 1))
        record[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(record)))
    with contextlib.suppress(msgspec.DecodeError):
        assert isinstance(decode_event(bytes(record[:cut])), Event)


def test_thin_event_keeps_the_envelope() -> None:
    envelope = decode_body(sample("webhook_event.fine_tuning.job.succeeded.json"))
    assert isinstance(envelope, Envelope)
    event = Event.from_body(envelope, webhook_id="wh_2", received_at=2.0)
    assert event.job is None and event.status == "succeeded" and event.source == "webhook"
    assert decode_event(encode_event(event)).envelope() == envelope


def test_old_records_decode_with_new_fields_defaulted() -> None:
    old = msgspec.msgpack.encode(
        {
            "id": "wh_1",
            "type": "fine_tuning.job.failed",
            "job_id": "j",
            "source": "webhook",
            "created_at": 1,
            "received_at": 1.0,
        }
    )
    event = decode_event(old)
    assert event.previous_status is None and event.stale is False and event.job is None


@pytest.mark.parametrize(
    "raw",
    [b'{"object":"\x89"}', b'{"object":"fine_tuning.job","id":"\x89"}', b'{"id":"e","type":"\xff","created_at":1}'],
)
def test_invalid_utf8_inside_strings_is_a_decode_error(raw: bytes) -> None:
    """Found by the fuzzer: msgspec raises UnicodeDecodeError for these, which must not become a 500."""
    with pytest.raises(msgspec.DecodeError, match="not valid UTF-8"):
        decode_body(raw)


@pytest.mark.parametrize("job_id", ["ftjob-abc\n", "ftjob-abc\r", "ftjob-abc\n\n", "\nftjob-abc"])
@pytest.mark.parametrize("thin", [True, False])
def test_a_job_id_with_a_line_break_is_refused(job_id: str, thin: bool) -> None:
    """`$` in a searched pattern also matches before a final "\\n": "ftjob-abc\\n" passed the grammar, and was
    fetched as `/fine_tuning/jobs/ftjob-abc%0A` and kept as a second job next to "ftjob-abc"."""
    doc = msgspec.json.decode(sample("webhook_event.fine_tuning.job.succeeded.json" if thin else SUCCEEDED_JOB))
    (doc["data"] if thin else doc)["id"] = job_id
    with pytest.raises(msgspec.ValidationError, match=r"Expected a job id \(1 to 128 of"):
        decode_body(msgspec.json.encode(doc))


_SENDER_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["..", ".", "../../files", "a/b", "ftjob-1?x=1#y", "ftjob-%2e%2e", "-x", "ftjob-abc", "ftjob-abc\n"]
    ),
    st.integers(0, 80).map(lambda n: "fine_tuning.job." + "s" * n),
    st.integers(0, 300).map(lambda n: "x" * n),
)
_SENDER_INT = st.one_of(st.integers(), st.integers(min_value=2**63 - 2, max_value=2**64 + 2), st.just(10**30))


@settings(max_examples=2000, deadline=None, database=None)
@given(
    thin=st.booleans(),
    changes=st.dictionaries(
        st.sampled_from(["id", "status", "created_at", "finished_at", "trained_tokens", "usage_metrics", "type"]),
        st.one_of(_SENDER_TEXT, _SENDER_INT, st.dictionaries(st.text(max_size=5), _SENDER_INT, max_size=2)),
        max_size=3,
    ),
)
def test_whatever_decodes_can_be_stored_and_fetched_by_its_id(thin: bool, changes: dict[str, object]) -> None:
    """A signed body either fails to decode (→ quarantine) or becomes an event we can store (msgpack takes
    64-bit integers) and whose job id is one bounded URL path segment; never an error of another kind."""
    doc = msgspec.json.decode(sample("webhook_event.fine_tuning.job.succeeded.json" if thin else SUCCEEDED_JOB))
    for key, value in changes.items():
        (doc["data"] if thin and key == "id" else doc)[key] = value
    try:
        body = decode_body(msgspec.json.encode(doc))
    except msgspec.DecodeError:
        return
    event = Event.from_body(body, webhook_id="wh_fuzz", received_at=0.0)
    assert decode_event(encode_event(event)) == event
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}", event.job_id)
    assert 1 <= len(event.status or "x") <= 64


@pytest.mark.parametrize(
    ("status", "sample_name"),
    [("succeeded", "succeeded"), ("failed", "failed"), ("running", "running"), ("queued", "running")],
)
def test_sample_job_is_the_closest_packaged_sample(status: str, sample_name: str) -> None:
    """Statuses without a sample of their own are made from the running one, with the status replaced."""
    job = sample_job(status)
    expected = decode_job(sample(f"fine_tuning_job.{sample_name}.json"))
    assert job.status == status
    assert msgspec.structs.replace(job, status=expected.status) == expected
