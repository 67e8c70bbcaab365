# One image for every ftjobs role: `receive`, `work`, or `serve` (all in one, with its embedded Valkey).
# Pinned at a full version: bump it on purpose (and rebuild for the base image's security fixes).
FROM python:3.12.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY processor ./processor
COPY handlers ./handlers
RUN pip install . \
    && groupadd --system --gid 10001 ftjobs \
    && useradd --system --uid 10001 --gid 10001 --home /app ftjobs \
    && mkdir -p /app/.ftjobs && chown 10001:10001 /app/.ftjobs && chmod 700 /app/.ftjobs
# Numeric, so Kubernetes `runAsNonRoot` can check it without reading /etc/passwd.
USER 10001:10001

EXPOSE 8080
ENTRYPOINT ["ftjobs"]
CMD ["serve"]
