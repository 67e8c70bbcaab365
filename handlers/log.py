"""The `log` handler: one structured line per event, so the default setup visibly does something."""

from __future__ import annotations

import structlog

from processor.handler import Delivery, NoOptions

log = structlog.get_logger()


class LogHandler:
    """Logs `event_received` with the job's id, status, model and (when set) fine-tuned model or error."""

    Options = NoOptions

    def __init__(self, name: str, options: NoOptions) -> None:
        self.name = name

    async def __call__(self, delivery: Delivery) -> None:
        event, job = delivery.event, delivery.event.job
        fields: dict[str, object] = {
            "event_type": event.type,
            "source": event.source,
            "attempt": delivery.attempt,
        }
        if job is not None:
            fields.update(status=job.status, model=job.model)
            if job.fine_tuned_model:
                fields["fine_tuned_model"] = job.fine_tuned_model
            if (error := job.failed_error) is not None:
                fields.update(error_code=error.code, error_message=error.message)
        else:
            fields["status"] = event.status
        log.info("event_received", **fields)
