"""Handlers: what ftjobs does with an event. Built-ins live here; others plug in via entry points."""
