"""Request shapes for common pipeline targets, from each target's public API docs.

* GitHub `repository_dispatch` — POST /repos/{owner}/{repo}/dispatches, `{"event_type", "client_payload"}`, 204
  (https://docs.github.com/rest/repos/repos#create-a-repository-dispatch-event)
* GitHub `workflow_dispatch` — POST /repos/{owner}/{repo}/actions/workflows/{id}/dispatches,
  `{"ref", "inputs"}`, 204 (https://docs.github.com/rest/actions/workflows#create-a-workflow-dispatch-event)
* GitLab pipeline trigger — POST /api/v4/projects/{id}/trigger/pipeline, form `token`, `ref`,
  `variables[KEY]`, 201 (https://docs.gitlab.com/ci/triggers/)
* Airflow DAG run — POST /api/v1/dags/{dag_id}/dagRuns, `{"dag_run_id", "conf"}`, 200; a 409 means this
  run id exists already, i.e. the trigger was done before (https://airflow.apache.org/docs/apache-airflow/stable/stable-rest-api-ref.html)
"""

from __future__ import annotations

import base64
import re
from typing import Any, Final
from urllib.parse import quote

from msgspec import Struct

from processor.errors import ConfigError

GITHUB_API: Final = "https://api.github.com"
GITLAB_API: Final = "https://gitlab.com"
PRESETS: Final = ("github_repository_dispatch", "github_workflow_dispatch", "gitlab_pipeline", "airflow_dag_run")
#: What a preset sends when `inputs` is not configured (each value a template).
DEFAULT_INPUTS: Final = {
    "job_id": "{{ job.id }}",
    "status": "{{ status }}",
    "model": "{{ job.model }}",
    "fine_tuned_model": "{{ job.fine_tuned_model }}",
}


class Target(Struct, frozen=True, kw_only=True):
    """A resolved request: everything but the per-event values."""

    method: str
    url: str
    headers: dict[str, str]
    #: How the rendered inputs are sent: a JSON document built by `payload`, or a form.
    form: bool = False
    ok: tuple[int, ...] = ()


def resolve(preset: str, o: Any) -> Target:
    """The request shape of `preset` from the handler's options `o` (raises ConfigError on a missing one)."""

    def need(*names: str) -> None:
        missing = [n for n in names if not getattr(o, n)]
        if missing:
            raise ConfigError(f"preset {preset} needs: {', '.join(missing)}")

    if preset.startswith("github_"):
        need("repo", "token")
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", o.repo):
            raise ConfigError(f"repo: {o.repo!r} is not owner/name")
        headers = {
            "Accept": "application/vnd.github+json",
            "Authorization": f"Bearer {o.token}",
            "X-GitHub-Api-Version": "2022-11-28",
        }
        base = (o.api_url or GITHUB_API).rstrip("/")
        if preset == "github_repository_dispatch":
            return Target(method="POST", url=f"{base}/repos/{o.repo}/dispatches", headers=headers, ok=(204,))
        need("workflow")
        url = f"{base}/repos/{o.repo}/actions/workflows/{quote(o.workflow, safe='')}/dispatches"
        return Target(method="POST", url=url, headers=headers, ok=(204, 200))
    if preset == "gitlab_pipeline":
        need("project", "token")
        base = (o.api_url or GITLAB_API).rstrip("/")
        url = f"{base}/api/v4/projects/{quote(o.project, safe='')}/trigger/pipeline"
        return Target(method="POST", url=url, headers={}, form=True, ok=(201,))
    if preset == "airflow_dag_run":
        need("api_url", "dag_id")
        headers = {}
        if o.username:
            basic = base64.b64encode(f"{o.username}:{o.password}".encode()).decode()
            headers["Authorization"] = f"Basic {basic}"
        elif o.token:
            headers["Authorization"] = f"Bearer {o.token}"
        url = f"{o.api_url.rstrip('/')}/api/v1/dags/{quote(o.dag_id, safe='')}/dagRuns"
        return Target(method="POST", url=url, headers=headers, ok=(200, 409))
    raise ConfigError(f"preset: {preset!r} is not one of {', '.join(PRESETS)}")


def payload(preset: str, o: Any, inputs: dict[str, str], idempotency_key: str) -> Any:
    """The body for one event: a JSON-able document, or form fields for `form` targets."""
    if preset == "github_repository_dispatch":
        return {"event_type": o.event_type, "client_payload": inputs}
    if preset == "github_workflow_dispatch":
        return {"ref": o.ref, "inputs": inputs}
    if preset == "gitlab_pipeline":
        return {"token": o.token, "ref": o.ref, **{f"variables[{k}]": v for k, v in inputs.items()}}
    # Airflow: the run id is derived from the idempotency key, so a redelivery is refused with 409.
    run_id = "ftjobs__" + re.sub(r"[^A-Za-z0-9_.~:+-]", "_", idempotency_key)
    return {"dag_run_id": run_id, "conf": inputs}
