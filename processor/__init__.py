"""ftjobs' core: receive, verify, decode and queue fine-tuning job events, and deliver them to handlers."""

#: The package's version: the one place it is written (the build reads it from here; see pyproject.toml).
__version__ = "0.1.0"
