# One image for every ftjobs role: `receive`, `work`, or `serve` (all in one, with its embedded Valkey).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY processor ./processor
COPY handlers ./handlers
RUN pip install . && useradd --system --home /app ftjobs && mkdir -p /app/.ftjobs && chown ftjobs /app/.ftjobs
USER ftjobs

EXPOSE 8080
ENTRYPOINT ["ftjobs"]
CMD ["serve"]
