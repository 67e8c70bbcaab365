"""The handler contract, re-exported for handlers written against its old path.

New code imports `processor.handler` (the documented path); this module only keeps out-of-tree handlers that
import `handlers.base` working.
"""

from __future__ import annotations

from processor.handler import ConfigError, Delivery, Handler, HandlerContext, NoOptions, PermanentFailure, RetryLater

__all__ = ["ConfigError", "Delivery", "Handler", "HandlerContext", "NoOptions", "PermanentFailure", "RetryLater"]
