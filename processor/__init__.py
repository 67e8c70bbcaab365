"""ftjobs' core: receive, verify, decode and queue fine-tuning job events, and deliver them to handlers."""
