"""The one HTTP status policy, shared by the handlers' requests and the OpenAI client."""

from __future__ import annotations

import pytest

from processor.outbound import classify


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, "ok"),
        (204, "ok"),
        (301, "redirect"),
        (308, "redirect"),
        (400, "refused"),
        (401, "refused"),
        (404, "refused"),
        (408, "retry"),
        (409, "refused"),
        (429, "retry"),
        (500, "retry"),
        (503, "retry"),
    ],
)
def test_each_status_has_one_meaning(status: int, outcome: str) -> None:
    assert classify(status) == outcome


def test_a_caller_may_name_the_statuses_that_count_as_success() -> None:
    """Airflow answers an existing run id with 409 (the trigger happened); the API client wants 200 only."""
    assert classify(409, ok=(200, 409)) == "ok"
    assert classify(204, ok=(200,)) == "refused"
    assert classify(503, ok=(200,)) == "retry"
