"""The files under `deploy/`. Monitoring: they parse, `promtool` accepts the rules, and every metric they use is
one that a live ftjobs scrape exports (a renamed metric would otherwise leave an alert silently empty).
Kubernetes: every container runs a real `ftjobs` command, probes the port that command serves, runs locked
down, takes its secrets from the Secret, and the set runs for real (as processes) against Redis."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from processor import registry
from processor.cli import _parser
from processor.openai import OpenAIClient
from processor.settings import RedisSettings, Settings
from tests.conftest import ROOT, SECRET, compact, eventually, free_port, make_poller, sample, signed, sink
from tests.fake_openai import KEY, FakeOpenAI
from tests.processes import Proc, base_env, post, wait_for, write_config
from tests.test_gauges import scrape

ALERTS = ROOT / "deploy" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
_METRIC = re.compile(r"\bftjobs_[a-z_]+\b")


def alert_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    [group] = rules["groups"]
    return [rule["expr"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_alerts_cover_what_operators_must_hear_about() -> None:
    names = {rule["alert"] for rule in yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]}
    expected = {"FtjobsHandlerLagGrowing", "FtjobsDeadLettersGrowing", "FtjobsCircuitOpen"}
    assert expected | {"FtjobsPollerFailing", "FtjobsNoWorkerHeartbeat"} <= names


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_exprs())} rules found" in result.stdout


async def test_rules_and_dashboard_use_only_exported_metrics(
    rig: Any, redis_url: str, prefix: str, aiohttp_server: Callable[..., Any]
) -> None:
    fake = FakeOpenAI()
    api_url = str((await aiohttp_server(fake.app())).make_url("/v1"))
    handlers = [sink("ok", redis_url, prefix), sink("broken", redis_url, prefix, fail_times=-1, permanent=True)]
    async with rig(handlers, openai={"api_key": KEY, "base_url": api_url, "timeout_s": 2.0}) as r:
        await r.post(compact(sample("fine_tuning_job.succeeded.json")))
        await eventually(r.settled)
        async with OpenAIClient(r.settings.openai) as api:
            await make_poller(r.settings, r.rclient, api).poll_once()
        _, samples = await scrape(r.client)
    exported = {name for name, _ in samples}
    used = {name for expr in alert_exprs() + dashboard_exprs() for name in _METRIC.findall(expr)}
    assert len(used) >= 10
    assert used <= exported, f"not exported: {sorted(used - exported)}"


# The Kubernetes manifests under deploy/kubernetes/: what a cluster would run, checked without a cluster.

KUBERNETES = ROOT / "deploy" / "kubernetes"
#: The environment variables that carry secrets: in the manifests, only ever from the Secret.
SECRET_ENV = {"REDIS_URL", "OPENAI_WEBHOOK_SECRET", "OPENAI_API_KEY"}
RECEIVER, WORKER = ("Deployment", "ftjobs-receiver"), ("Deployment", "ftjobs-worker")


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object in deploy/kubernetes/*.yaml, by (kind, name); the Kustomization has no name."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            key = (doc["kind"], doc.get("metadata", {}).get("name", ""))
            assert key not in objects, f"{path.name}: {key} defined twice"
            objects[key] = doc
    return objects


def pod(deployment: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A Deployment's pod spec and its one container."""
    spec = deployment["spec"]["template"]["spec"]
    [container] = spec["containers"]
    return spec, container


def probe_port(container: dict[str, Any], probe: str) -> int:
    """The port a probe asks, its name resolved to the container's port, as the kubelet does."""
    port = container[probe]["httpGet"]["port"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    return int(ports.get(port, port))


def config_tables() -> dict[str, Any]:
    """The ConfigMap's ftjobs.toml, parsed."""
    return tomllib.loads(manifests()[("ConfigMap", "ftjobs-config")]["data"]["ftjobs.toml"])


def without_unknown_redis_keys(tables: dict[str, Any]) -> dict[str, Any]:
    """`tables` minus `[redis]` keys this build does not know (none: every key must be known)."""
    known = set(RedisSettings.__struct_fields__)
    assert set(tables.get("redis", {})) <= known
    return tables


def test_kubernetes_objects_are_the_expected_set() -> None:
    objects = manifests()
    assert set(objects) == {
        ("Kustomization", ""),
        ("Secret", "ftjobs"),
        ("ConfigMap", "ftjobs-config"),
        RECEIVER,
        ("Service", "ftjobs-receiver"),
        ("PodDisruptionBudget", "ftjobs-receiver"),
        WORKER,
        ("PodDisruptionBudget", "ftjobs-worker"),
    }
    assert all("namespace" not in obj.get("metadata", {}) for obj in objects.values())  # applied into any namespace
    # The Kustomization applies every file but the Secret's example, whose placeholders must never replace real values.
    resources = objects[("Kustomization", "")]["resources"]
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert sorted(resources) == sorted(files)
    assert objects[RECEIVER]["spec"]["replicas"] >= 2 and objects[WORKER]["spec"]["replicas"] >= 2


def test_kubernetes_selectors_match_their_pods() -> None:
    objects = manifests()
    for deployment in (RECEIVER, WORKER):
        labels = objects[deployment]["spec"]["template"]["metadata"]["labels"]
        assert objects[deployment]["spec"]["selector"]["matchLabels"].items() <= labels.items()
        pdb = objects[("PodDisruptionBudget", deployment[1])]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    receiver_labels = objects[RECEIVER]["spec"]["template"]["metadata"]["labels"]
    worker_labels = objects[WORKER]["spec"]["template"]["metadata"]["labels"]
    service = objects[("Service", "ftjobs-receiver")]["spec"]
    assert service["selector"].items() <= receiver_labels.items()
    assert not service["selector"].items() <= worker_labels.items()  # the Service never sends webhooks to workers


def test_kubernetes_containers_run_real_commands_and_probe_their_ports() -> None:
    objects = manifests()
    parser = _parser()
    _, receiver = pod(objects[RECEIVER])
    args = parser.parse_args(receiver["args"])  # exits (fails the test) on an unknown command or flag
    assert "command" not in receiver  # the image's entrypoint, `ftjobs`, runs the args
    assert args.command == "receive" and args.port
    assert receiver["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert receiver["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probe_port(receiver, "readinessProbe") == probe_port(receiver, "livenessProbe") == args.port
    [target] = objects[("Service", "ftjobs-receiver")]["spec"]["ports"]
    assert {p["name"]: p["containerPort"] for p in receiver["ports"]}[target["targetPort"]] == args.port
    settings = Settings.from_raw(without_unknown_redis_keys(config_tables()), {})
    assert settings.receiver.metrics_port in {p["containerPort"] for p in receiver["ports"]}
    assert settings.receiver.metrics_port != target["port"]  # /metrics stays off the public port

    _, worker = pod(objects[WORKER])
    args = parser.parse_args(worker["args"])
    assert "command" not in worker
    assert args.command == "work" and args.health_port and args.metrics_port
    for probe in ("readinessProbe", "livenessProbe"):
        assert worker[probe]["httpGet"]["path"] == "/healthz"
        assert probe_port(worker, probe) == args.health_port
    assert {args.health_port, args.metrics_port} == {p["containerPort"] for p in worker["ports"]}


def test_kubernetes_pods_are_locked_down() -> None:
    """Non-root as the image's own numeric user, no privilege escalation or capabilities, a read-only root."""
    [user] = re.findall(r"^USER (\d+):\d+$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    objects = manifests()
    for deployment in (RECEIVER, WORKER):
        spec, container = pod(objects[deployment])
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == int(user) > 0
        assert spec["automountServiceAccountToken"] is False
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"] and "add" not in context["capabilities"]
        resources = container["resources"]
        assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]
        # Workers finish in-flight handlers on SIGTERM for worker.grace_s; the pod must be given that long.
        grace_s = Settings.from_raw(without_unknown_redis_keys(config_tables()), {}).worker.grace_s
        assert spec["terminationGracePeriodSeconds"] > grace_s


def test_kubernetes_secrets_come_from_the_secret() -> None:
    objects = manifests()
    secret = objects[("Secret", "ftjobs")]
    assert set(secret["stringData"]) == SECRET_ENV  # keys named as the variables that read them
    configmap = objects[("ConfigMap", "ftjobs-config")]
    wanted = {RECEIVER: {"REDIS_URL", "OPENAI_WEBHOOK_SECRET"}, WORKER: {"REDIS_URL", "OPENAI_API_KEY"}}
    for deployment, needed in wanted.items():
        spec, container = pod(objects[deployment])
        env = {e["name"]: e for e in container["env"]}
        assert needed <= set(env)
        for name in SECRET_ENV & set(env):
            assert "value" not in env[name], name
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], name)
        # FTJOBS_CONFIG names the ConfigMap's file where the pod mounts it.
        volumes = {v["name"]: v for v in spec["volumes"]}
        [mount] = [m for m in container["volumeMounts"] if "configMap" in volumes[m["name"]]]
        assert volumes[mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
        assert env["FTJOBS_CONFIG"]["value"] == f"{mount['mountPath']}/ftjobs.toml"
        assert "ftjobs.toml" in configmap["data"] and mount["readOnly"] is True


def test_kubernetes_config_is_valid_and_partitioned_for_a_cluster() -> None:
    tables = config_tables()
    assert tables["redis"]["partitions"] == 16
    assert "url" not in tables["redis"]  # REDIS_URL, from the Secret
    env = {"REDIS_URL": "redis://valkey-cluster:6379", "OPENAI_WEBHOOK_SECRET": SECRET}
    settings = Settings.from_raw(without_unknown_redis_keys(tables), env)
    registry.build(settings.handlers)  # what `ftjobs check-config` checks
    assert settings.log.format == "json"


def test_kubernetes_commands_serve_what_their_probes_ask(
    tmp_path: Path, procs: Callable[..., Proc], redis_url: str, prefix: str, rclient: object
) -> None:
    """The receiver and the worker run with the manifests' args, env and config (ports moved to free ones, the
    Secret's values from the test): each answers its probes on the probed port, and an event goes through."""
    objects = manifests()
    _, receiver = pod(objects[RECEIVER])
    _, worker = pod(objects[WORKER])
    ports = {p["containerPort"]: free_port() for c in (receiver, worker) for p in c["ports"]}
    tables = without_unknown_redis_keys(config_tables())
    tables["redis"]["prefix"] = prefix
    tables["redis"]["cluster"] = "auto"  # the manifests say "yes"; here it runs on whichever server the tests use
    tables["receiver"]["metrics_port"] = free_port()  # each pod has its own; here both share one host
    tables["receiver"]["metrics_host"] = "127.0.0.1"
    config = write_config(tmp_path / "ftjobs.toml", **tables)
    secrets = {"REDIS_URL": redis_url, "OPENAI_WEBHOOK_SECRET": SECRET, "OPENAI_API_KEY": KEY}

    def start(container: dict[str, Any]) -> Proc:
        env = {e["name"]: secrets[e["name"]] if "valueFrom" in e else e["value"] for e in container["env"]}
        env["FTJOBS_CONFIG"] = str(config)
        args = [str(ports[int(a)]) if a.isdigit() and int(a) in ports else a for a in container["args"]]
        return procs(args, tmp_path, base_env(**env), container["name"])

    def answers(container: dict[str, Any], probe: str) -> Callable[[], bool]:
        url = f"http://127.0.0.1:{ports[probe_port(container, probe)]}{container[probe]['httpGet']['path']}"

        def check() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        return check

    receiving, working = start(receiver), start(worker)
    for container, proc in ((receiver, receiving), (worker, working)):
        for probe in ("readinessProbe", "livenessProbe"):
            wait_for(answers(container, probe), what=f"{container['name']} {probe} ({proc.output()[-500:]})")
    body = compact(sample("fine_tuning_job.succeeded.json"))
    status, _ = post(ports[probe_port(receiver, "readinessProbe")], body, signed(body))
    assert status == 200
    wait_for(lambda: any(line.get("event") == "event_received" for line in working.lines()), what="event delivered")
    scrape = f"http://127.0.0.1:{tables['receiver']['metrics_port']}/metrics"
    assert {"event": "metrics_listening", "address": scrape}.items() <= next(
        line for line in receiving.lines() if line.get("event") == "metrics_listening"
    ).items()
    assert receiving.stop() == 0 and working.stop() == 0


def test_readmes_name_the_manifests_commands_and_secrets() -> None:
    """The README's Deployment section and deploy/kubernetes/README.md describe what the manifests run."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Deployment\n") : readme.index("\n## Architecture\n")]
    local = (KUBERNETES / "README.md").read_text()
    objects = manifests()
    for deployment in (RECEIVER, WORKER):
        _, container = pod(objects[deployment])
        command = f"`ftjobs {' '.join(container['args'])}`"
        assert command in section and command in local, command
    for text in (section, local):
        assert all(f"`{name}`" in text for name in SECRET_ENV)
        assert "partitions = 16" in text and "kubectl apply -k deploy/kubernetes/" in text
    assert "deploy/kubernetes/" in section and "`ftjobs status`" in section


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_builds_the_set() -> None:
    """`kubectl kustomize` (offline, no cluster) builds every listed object and names the image in each pod."""
    result = subprocess.run(
        ["kubectl", "kustomize", str(KUBERNETES)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    expected = {key for key in manifests() if key[0] not in {"Kustomization", "Secret"}}
    assert {(doc["kind"], doc["metadata"]["name"]) for doc in built} == expected
    images = [pod(doc)[1]["image"] for doc in built if doc["kind"] == "Deployment"]
    assert len(images) == 2 and all(image.startswith("ftjobs:") for image in images), images
