"""The stream record against generated bodies: every accepted job body round trips through it, and nesting
is bounded, so no accepted body makes a record that cannot be read back (found by a review)."""

from __future__ import annotations

import json
import os
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processor.eventrecord import decode_event, encode_event
from processor.models import MAX_DEPTH, Event, decode_body, sample_job

#: Generated bodies per run: 200 in CI; `FTJOBS_PROPERTY_EXAMPLES=2000` for a long run.
EXAMPLES = int(os.environ.get("FTJOBS_PROPERTY_EXAMPLES", "200"))

TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=12)
INT64 = st.integers(-(2**63), 2**64 - 1)
FLOAT = st.floats(allow_nan=False, allow_infinity=False)
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | INT64 | FLOAT | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
AUTO_INT = st.sampled_from(["auto"]) | INT64 | st.none()
AUTO_FLOAT = st.sampled_from(["auto"]) | FLOAT | INT64 | st.none()


def optional(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """An object with each key absent, null, or a value (null only where the model allows it is fine: a
    body the model refuses is skipped)."""
    return st.fixed_dictionaries({}, optional={k: st.none() | v for k, v in fields.items()})


HYPER = {"batch_size": AUTO_INT, "learning_rate_multiplier": AUTO_FLOAT, "n_epochs": AUTO_INT}
GRADER = st.fixed_dictionaries(
    {"type": TEXT},
    optional={
        "name": TEXT,
        "input": TEXT | st.lists(JSON_VALUE, max_size=2),
        "range": st.lists(FLOAT, max_size=2),
        "sampling_params": st.dictionaries(TEXT, JSON_VALUE, max_size=2),
        "graders": JSON_VALUE,
        "extra_unknown": JSON_VALUE,
    },
)
METHOD = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("supervised")}, optional={"supervised": optional({"hyperparameters": optional(HYPER)})}
    ),
    st.fixed_dictionaries(
        {"type": st.just("dpo")},
        optional={"dpo": optional({"hyperparameters": optional({**HYPER, "beta": AUTO_FLOAT})})},
    ),
    st.fixed_dictionaries(
        {"type": st.just("reinforcement")},
        optional={
            "reinforcement": optional(
                {
                    "grader": GRADER,
                    "hyperparameters": optional(
                        {**HYPER, "compute_multiplier": AUTO_FLOAT, "eval_interval": AUTO_INT, "reasoning_effort": TEXT}
                    ),
                }
            )
        },
    ),
    st.fixed_dictionaries({"type": TEXT}),
)
JOB = st.fixed_dictionaries(
    {
        "object": st.just("fine_tuning.job"),
        "id": st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,20}\Z"),
        "created_at": INT64,
        "model": TEXT,
        "status": st.text(alphabet=st.characters(exclude_categories=("Cs",)), min_size=1, max_size=10),
    },
    optional={
        "organization_id": TEXT,
        "training_file": TEXT,
        "validation_file": st.none() | TEXT,
        "fine_tuned_model": st.none() | TEXT,
        "finished_at": st.none() | INT64,
        "error": st.none() | optional({"code": TEXT, "message": TEXT, "param": TEXT}),
        "hyperparameters": st.none() | optional(HYPER),
        "result_files": st.lists(TEXT, max_size=3),
        "seed": st.none() | INT64,
        "trained_tokens": st.none() | INT64,
        "estimated_finish": st.none() | INT64,
        "integrations": st.none()
        | st.lists(
            st.fixed_dictionaries(
                {"type": TEXT},
                optional={
                    "wandb": st.none()
                    | st.fixed_dictionaries({"project": TEXT}, optional={"tags": st.lists(TEXT, max_size=2)})
                },
            ),
            max_size=2,
        ),
        "metadata": st.none()
        | st.dictionaries(st.text(max_size=64, alphabet=st.characters(exclude_categories=("Cs",))), TEXT, max_size=16),
        "method": st.none() | METHOD,
        "usage_metrics": st.none() | st.dictionaries(TEXT, JSON_VALUE, max_size=3),
        "shared_with_openai": st.none() | st.booleans(),
        "eval_id": st.none() | TEXT,
        "an_unknown_field": JSON_VALUE,
    },
)


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=JOB, received_at=FLOAT, webhook_id=TEXT)
def test_every_accepted_job_body_round_trips_through_the_record(
    doc: dict[str, Any], received_at: float, webhook_id: str
) -> None:
    raw = json.dumps(doc, ensure_ascii=bool(len(webhook_id) % 2)).encode()
    try:
        body = decode_body(raw)
    except msgspec.ValidationError:
        return  # refused (quarantined): not an accepted event
    event = Event.from_body(body, webhook_id=webhook_id, received_at=received_at)
    back = decode_event(encode_event(event))
    assert back == event
    assert msgspec.to_builtins(back) == msgspec.to_builtins(event)
    assert msgspec.json.encode(back.job) == msgspec.json.encode(body)


def _deep(depth: int) -> bytes:
    return b"\x91" * depth + b"\x90"


def test_a_deeply_nested_corrupt_record_is_a_decode_error() -> None:
    """A damaged version 2 record (7 fields, the first one nested 5,000 arrays deep) must be a DecodeError
    (the worker dead-letters it). Version 1 refused it as a type error; version 2 decodes the fields as `Any`
    first and raises RecursionError, which the runner does not catch (the batch is retried forever) and
    `dlq list` / the dashboard do not catch either."""
    record = b"\x97\x02" + _deep(5000) + b"\xa1t\xa1j\xa1s\x01\x01"
    with pytest.raises(msgspec.DecodeError):
        decode_event(record)


def _nested_job(depth: int, value: str = "D") -> bytes:
    """The sample job with `usage_metrics` = {"a": <`depth` nested arrays>}: the body nests depth + 2 levels."""
    doc = msgspec.to_builtins(sample_job("succeeded"))
    return json.dumps({**doc, "usage_metrics": {"a": value}}).replace(f'"{value}"', "[" * depth + "]" * depth).encode()


def test_a_body_at_the_nesting_limit_round_trips_and_a_deeper_one_is_refused() -> None:
    body = decode_body(_nested_job(MAX_DEPTH - 2))
    event = Event.from_body(body, webhook_id="w", received_at=1.0)
    assert decode_event(encode_event(event)) == event
    for depth in (MAX_DEPTH - 1, 990, 5000):  # the last ones beyond what msgspec itself follows
        with pytest.raises(msgspec.ValidationError, match=f"nested more than {MAX_DEPTH} levels"):
            decode_body(_nested_job(depth))


def test_brackets_inside_strings_are_not_nesting() -> None:
    text = '[{\\"' * 40  # brackets, escaped quotes and backslashes, all inside one string
    raw = json.dumps({**msgspec.to_builtins(sample_job("running")), "metadata": {"note": text}}).encode()
    assert raw.count(b"[") + raw.count(b"{") > MAX_DEPTH  # so the string-aware walk runs
    assert decode_body(raw).metadata == {"note": text}
