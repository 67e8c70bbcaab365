"""Decoding what senders post, and the record we store."""

from __future__ import annotations

import re

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor import models
from processor.models import (
    Envelope,
    Event,
    FineTuningJob,
    decode_body,
    decode_event,
    decode_job,
    encode_event,
    sample_job,
)
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
    assert len(record) < len(compact_sample)
    assert event.type == "fine_tuning.job.succeeded" and event.status == "succeeded"


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


_SENDER_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["..", ".", "../../files", "a/b", "ftjob-1?x=1#y", "ftjob-%2e%2e", "-x", "ftjob-abc"]),
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
