"""The composition root: it closes what it opened, also when starting fails half way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import pytest

from processor import registry
from processor.handler import Delivery, HandlerContext, NoOptions
from processor.runtime import running_worker
from processor.settings import Settings


class Opens:
    """Opens something in `setup` and says when it was closed."""

    Options = NoOptions
    closed: ClassVar[list[str]] = []

    def __init__(self, name: str, options: NoOptions) -> None:
        self.name = name
        self.opened = False

    async def setup(self, context: HandlerContext) -> None:
        self.opened = True

    async def close(self) -> None:
        Opens.closed.append(self.name)

    async def __call__(self, delivery: Delivery) -> None:
        return None


class FailsSetup(Opens):
    """A handler whose target is unreachable at start."""

    async def setup(self, context: HandlerContext) -> None:
        raise ConnectionRefusedError("target unreachable")


async def test_a_failed_setup_closes_the_handlers_already_set_up(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(
        [
            {"name": "first", "type": "tests.test_runtime:Opens"},
            {"name": "second", "type": "tests.test_runtime:Opens"},
            {"name": "broken", "type": "tests.test_runtime:FailsSetup"},
        ]
    )
    Opens.closed.clear()
    handlers: list[Any] = registry.build(settings.handlers)
    with pytest.raises(ConnectionRefusedError):
        async with running_worker(settings, settings.redis.url, handlers):
            pytest.fail("the worker must not start when a handler cannot be set up")
    assert [h.opened for h in handlers] == [True, True, False]
    assert Opens.closed == ["second", "first"]  # the ones set up, in reverse order
