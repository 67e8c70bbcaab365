# One image for every ftjobs role: `receive`, `work`, or `serve` (all in one, with its embedded Valkey).
# Pinned at a full version: bump it on purpose (and rebuild for the base image's security fixes).
FROM python:3.12.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
# Dependencies first, in a layer of their own: it is rebuilt when pyproject.toml changes, not on every code edit.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip install -r requirements.txt && rm requirements.txt
COPY README.md LICENSE ./
COPY processor ./processor
COPY handlers ./handlers
RUN pip install --no-deps . \
    && groupadd --system --gid 10001 ftjobs \
    && useradd --system --uid 10001 --gid 10001 --home /app ftjobs \
    && mkdir -p /app/.ftjobs && chown 10001:10001 /app/.ftjobs && chmod 700 /app/.ftjobs
# `serve`'s data directory (`[redis] data_dir`, default .ftjobs): the embedded Valkey's AOF and the local
# webhook secret. A volume, so they outlive the container; mount a named volume to keep them across upgrades.
VOLUME ["/app/.ftjobs"]
# Numeric, so Kubernetes `runAsNonRoot` can check it without reading /etc/passwd.
USER 10001:10001

EXPOSE 8080
ENTRYPOINT ["ftjobs"]
CMD ["serve"]
