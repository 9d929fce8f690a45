"""The deployment kit under ``deploy/``, checked with the real tools.

promtool checks and unit-tests the alert rules and parses every dashboard query; every manifest the
Kustomize base builds validates against Kubernetes' own schemas; every metric name the rules and the
dashboard use is in the ``/metrics`` of a real ``wsgate serve``; the policies shipped for containers pass
``wsgate check`` and the JSON Schema; the Dockerfile and the compose file are parsed and held to what
the README promises of them (no Docker daemon is needed).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import REPO, free_port
from prometheus_client.parser import text_string_to_metric_families

from proxy.policy.load import parse_policy
from proxy.policy.schema import policy_schema

DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
WSGATE = str(Path(sys.executable).with_name("wsgate"))
PROMTOOL = shutil.which("promtool")
#: The Kubernetes version whose schemas the manifests must satisfy (the oldest release still supported
#: upstream when this was written; the manifests use nothing newer).
KUBERNETES_VERSION = "1.32.0"

#: Metric names the rules or the dashboard use that wsgate does not export yet (work not merged yet).
NOT_YET_EXPORTED: set[str] = set()
#: Series Prometheus makes itself for each scrape, not exported by wsgate.
SCRAPE_SERIES = {"up"}

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool (the prometheus package) is not installed"
)


def run(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=env
    )


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def dashboard_queries() -> list[str]:
    return [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]


# -- PromQL: metric names -----------------------------------------------------------------------------

_NOT_METRICS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers left once strings, label matchers, ranges,
    grouping clauses and function calls are taken out (PromQL has no bare label names elsewhere)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", expr):
        name, call = match.groups()
        if not call and name.lower() not in _NOT_METRICS:
            names.add(name)
    return names


def test_promql_metric_names_finds_selected_metrics_only():
    expr = (
        'histogram_quantile(0.99, sum by (route, le) (rate(wsgate_x_bucket{job="wsgate", a=~"$i"}[5m])))'
        " / on (job) group_left (route) wsgate_y > 0.5 and up == 0 or vector(1)"
    )
    assert promql_metric_names(expr) == {"wsgate_x_bucket", "wsgate_y", "up"}


def used_metric_names() -> dict[str, set[str]]:
    """Every metric name in the alert rules (expressions and the names their annotations mention) and in
    the dashboard (queries and template variables), with where each is used."""
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        for name in promql_metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
        for text in rule["annotations"].values():
            for name in re.findall(r"\bwsgate_[a-z_]+[a-z]", text):
                used.setdefault(name, set()).add(f"alert {rule['alert']} annotation")
    for panel in dashboard_panels():
        for target in panel["targets"]:
            for name in promql_metric_names(target["expr"]):
                used.setdefault(name, set()).add(f"panel {panel['title']}")
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            for name in re.findall(r"label_values\(\s*([a-zA-Z_:][\w:]*)", variable["definition"]):
                used.setdefault(name, set()).add(f"variable {variable['name']}")
    return used


def exported_names(exposition: str) -> set[str]:
    """Family and sample names of a text exposition, with the sample names each family's type implies
    (a counter with no sample yet still declares its ``_total``)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}
    names = set()
    for family in text_string_to_metric_families(exposition):
        names.add(family.name)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


@pytest.mark.serve_process
async def test_every_metric_the_rules_and_dashboard_use_is_exported(tmp_path, upstream, wsgate_process):
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        'version: 1\nlisten: {address: "127.0.0.1:0"}\nadmin: {address: "127.0.0.1:0"}\n'
        f"routes:\n  - path: /echo\n    upstream: {upstream.url('/echo')}\n    auth: none\n"
    )
    process = wsgate_process("serve", "-c", str(policy), "--log-format", "json")
    listening = await process.wait_for("gateway.listening")
    port, admin = await process.listening_port(), listening["admin"]
    async with aiohttp.ClientSession() as session:
        # one session closed (a close code, a session duration) and one live (per-route series)
        async with session.ws_connect(f"ws://127.0.0.1:{port}/echo") as ws:
            await ws.send_str("close:4000")
            await ws.receive(timeout=5)
        async with session.ws_connect(f"ws://127.0.0.1:{port}/echo") as ws:
            await ws.send_str("hello")
            assert (await ws.receive(timeout=5)).data == "hello"
            async with session.get(f"http://{admin}/metrics") as response:
                assert response.status == 200
                exposition = await response.text()
    exported = exported_names(exposition)
    assert 'wsgate_connections_active{route="/echo"} 1.0' in exposition

    used = used_metric_names()
    missing = {
        name: sorted(where)
        for name, where in used.items()
        if name not in exported and name not in NOT_YET_EXPORTED | SCRAPE_SERIES
    }
    assert missing == {}, f"used but not exported: {missing}"
    assert set(used) >= NOT_YET_EXPORTED, "NOT_YET_EXPORTED lists a name nothing uses"
    now_exported = NOT_YET_EXPORTED & exported
    assert not now_exported, f"exported now: remove {sorted(now_exported)} from NOT_YET_EXPORTED"


# -- Prometheus: rules, their unit tests, the compose configuration -----------------------------------


@needs_promtool
def test_promtool_checks_the_alert_rules():
    result = run(PROMTOOL, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@needs_promtool
def test_the_alert_rules_unit_tests_pass():
    tests = DEPLOY / "prometheus" / "alerts_test.yaml"
    result = run(PROMTOOL, "test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {
        test["alertname"]
        for case in yaml.safe_load(tests.read_text())["tests"]
        for test in case["alert_rule_test"]
        if test.get("exp_alerts")
    }
    assert {"WsgateLimiterDown", "WsgatePolicyReloadFailed"} <= tested
    assert tested == {rule["alert"] for rule in alert_rules()}, "every alert is shown to fire"


def test_every_alert_has_a_severity_and_runbook_annotations():
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} >= {
        "WsgateInstanceDown",
        "WsgateHandshakeRefusalRatioHigh",
        "WsgateUpstreamUnavailable",
        "WsgateLimiterDown",
        "WsgatePolicyReloadFailed",
        "WsgateFileDescriptorsExhausted",
        "WsgateFileDescriptorsHigh",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]
        assert 'job="wsgate"' in rule["expr"], f"{rule['alert']} selects wsgate's targets by job"


def test_the_alerts_use_the_label_values_wsgate_exports():
    expressions = " ".join(rule["expr"] for rule in alert_rules())
    assert 'wsgate_policy_reloads_total{job="wsgate", result="error"}' in expressions
    assert 'reason="upstream_unavailable"' in expressions
    assert 'wsgate_accept_errors_total{job="wsgate", reason="fd_exhausted"}' in expressions
    readme = (REPO / "README.md").read_text()
    for value in re.findall(r'(?:reason|result)="(\w+)"', expressions):
        assert f"`{value}`" in readme, f"{value} is not a documented label value"


@needs_promtool
def test_the_compose_prometheus_configuration_checks(tmp_path):
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yaml"]
    assert [job["job_name"] for job in config["scrape_configs"]] == ["wsgate"]
    shutil.copy(ALERTS, tmp_path / "alerts.yaml")
    config["rule_files"] = [str(tmp_path / "alerts.yaml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = run(PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


# -- Grafana -------------------------------------------------------------------------------------------


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path):
    """promtool parses each query as a recording rule's expression (Grafana's variables filled in)."""
    queries = dashboard_queries()
    rules = [
        {"record": f"dashboard:query{index}", "expr": expr.replace("$__rate_interval", "1m").replace("$", "")}
        for index, expr in enumerate(queries)
    ]
    (tmp_path / "queries.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    result = run(PROMTOOL, "check", "rules", str(tmp_path / "queries.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_covers_what_operators_watch():
    used = used_metric_names()
    on_dashboard = {name for name, where in used.items() if any(w.startswith("panel") for w in where)}
    assert on_dashboard >= {
        "wsgate_connections_active",
        "wsgate_connections_total",
        "wsgate_handshake_rejections_total",
        "wsgate_messages_total",
        "wsgate_bytes_total",
        "wsgate_handshake_duration_seconds_bucket",
        "wsgate_upstream_connect_duration_seconds_bucket",
        "wsgate_closes_total",
        "wsgate_message_violations_total",
        "wsgate_policy_reloads_total",
        "wsgate_limiter_up",
        "process_open_fds",
        "process_max_fds",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    }
    queries = " ".join(dashboard_queries())
    assert "histogram_quantile(0.5," in queries and "histogram_quantile(0.99," in queries
    ids = [panel["id"] for panel in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard_panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus():
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    assert [(d["type"], d["url"]) for d in datasources["datasources"]] == [
        ("prometheus", "http://prometheus:9090")
    ]
    providers = yaml.safe_load((provisioning / "dashboards" / "wsgate.yaml").read_text())["providers"]
    grafana = compose()["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    assert mounts["./grafana/dashboard.json"].startswith(providers[0]["options"]["path"] + "/")
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


# -- Kubernetes ----------------------------------------------------------------------------------------


def _kustomization_by_hand(base: Path) -> list[dict[str, Any]]:
    """What ``kustomize build`` makes of this base, without kustomize: its resources as they are, and the
    generated Secret (no name hash, so references stay as written)."""
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    documents = [
        document
        for resource in kustomization["resources"]
        for document in yaml.safe_load_all((base / resource).read_text())
        if document
    ]
    for generator in kustomization.get("secretGenerator", []):
        data = {}
        for env_file in generator.get("envs", []):
            for line in (base / env_file).read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    name, _, value = line.partition("=")
                    data[name] = value
        documents.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": generator["name"]},
                "stringData": data,
            }
        )
    return documents


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> list[dict[str, Any]]:
    """The base built as an operator builds it: a secret.env made from the example, then kustomize."""
    base = tmp_path_factory.mktemp("kubernetes") / "base"
    shutil.copytree(KUBERNETES, base)
    (base / "secret.env").write_text((base / "secret.env.example").read_text())
    if shutil.which("kubectl"):
        result = run("kubectl", "kustomize", str(base))
    elif shutil.which("kustomize"):
        result = run("kustomize", "build", str(base))
    else:
        return _kustomization_by_hand(base)
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def one(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The manifest of that kind and name (a generated one's name carries a hash suffix)."""
    found = [
        m
        for m in manifests
        if m["kind"] == kind and re.fullmatch(re.escape(name) + r"(-[a-z0-9]{10})?", m["metadata"]["name"])
    ]
    assert len(found) == 1, f"{kind} {name}: {[m['metadata']['name'] for m in found]}"
    return found[0]


def test_the_base_builds_every_kind(manifests):
    kinds = sorted({(m["apiVersion"], m["kind"]) for m in manifests})
    assert kinds == [
        ("apps/v1", "Deployment"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("networking.k8s.io/v1", "NetworkPolicy"),
        ("policy/v1", "PodDisruptionBudget"),
        ("v1", "ConfigMap"),
        ("v1", "Secret"),
        ("v1", "Service"),
    ]


def test_the_manual_build_matches_kustomize(manifests, tmp_path):
    shutil.copytree(KUBERNETES, tmp_path / "base")
    (tmp_path / "base" / "secret.env").write_text((KUBERNETES / "secret.env.example").read_text())
    by_hand = _kustomization_by_hand(tmp_path / "base")
    assert sorted((m["kind"], m["metadata"]["name"]) for m in by_hand) == sorted(
        (m["kind"], re.sub(r"-[a-z0-9]{10}$", "", m["metadata"]["name"])) for m in manifests
    )


def test_every_manifest_validates_against_the_kubernetes_schemas(manifests):
    errors = {}
    for manifest in manifests:
        if manifest["kind"] == "ServiceMonitor":
            continue  # a CRD: its schema ships with the Prometheus Operator (its shape is tested below)
        try:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors[f"{manifest['kind']} {manifest['metadata']['name']}"] = error.message
    assert errors == {}


def test_the_validator_refuses_a_misspelt_field():
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"portz": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBERNETES_VERSION, strict=True)


def configmap_policy_text() -> str:
    configmap = yaml.safe_load((KUBERNETES / "configmap.yaml").read_text())
    return str(configmap["data"]["policy.yaml"])


def secret_variables(document: dict[str, Any]) -> set[str]:
    """The environment variables a policy reads secrets from."""
    names = {(document.get("admin") or {}).get("token_env")}
    names |= {provider.get("secret_env") for provider in (document.get("auth") or {}).values()}
    names.add(((document.get("limiter") or {}).get("redis") or {}).get("password_env"))
    return {name for name in names if name}


def test_the_deployment_serves_the_configmap_policy_safely(manifests, monkeypatch):
    deployment = one(manifests, "Deployment", "wsgate")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    document = yaml.safe_load(configmap_policy_text())
    for variable in secret_variables(document):
        monkeypatch.setenv(variable, secrets.token_hex(32))
    policy = parse_policy(configmap_policy_text())

    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns the replica count"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"ws": policy.listen.address.port, "admin": policy.admin.port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}

    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop >= 5
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + policy.limits.drain_timeout + 5

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert "limits" in container["resources"] and "cpu" in container["resources"]["requests"]

    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    policy_mount = mounts["/etc/wsgate"]
    assert "subPath" not in policy_mount, "a subPath mount never sees the ConfigMap's updates"
    assert volumes[policy_mount["name"]]["configMap"]["name"] == "wsgate-policy"
    assert container["args"] == ["serve", "-c", "/etc/wsgate/policy.yaml"]

    secret = one(manifests, "Secret", "wsgate-secrets")
    from_secret = {
        env["name"]: env["valueFrom"]["secretKeyRef"] for env in container["env"] if "valueFrom" in env
    }
    assert set(from_secret) == secret_variables(document)
    for name, reference in from_secret.items():
        assert reference == {"name": secret["metadata"]["name"], "key": name}


def test_the_configmap_policy_shares_its_limits_through_the_redis_service(manifests):
    document = yaml.safe_load(configmap_policy_text())
    url = document["limiter"]["redis"]["url"]
    host, port = re.fullmatch(r"redis://([\w.-]+):(\d+)/\d+", url).groups()
    service = one(manifests, "Service", host)
    assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]
    assert document["admin"]["token_env"]


def test_the_configmap_policy_passes_wsgate_check_with_its_secrets_set(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(configmap_policy_text())
    variables = secret_variables(yaml.safe_load(configmap_policy_text()))
    assert variables == {"WSGATE_ADMIN_TOKEN", "WSGATE_HMAC_SECRET"}
    env = {**os.environ, **{name: secrets.token_hex(32) for name in variables}}
    result = run(WSGATE, "check", "-c", str(path), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", "no warning once its secrets are set"


def test_the_secret_is_generated_from_an_uncommitted_file_of_placeholders():
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert [g["envs"] for g in kustomization["secretGenerator"]] == [["secret.env"]]
    assert "secret.env" in (KUBERNETES / ".gitignore").read_text().split()
    tracked = run("git", "ls-files", "deploy").stdout.split()
    assert "deploy/kubernetes/secret.env" not in tracked
    values = [
        line.partition("=")[2]
        for line in (KUBERNETES / "secret.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert values and set(values) == {"REPLACE_ME"}
    for resource in kustomization["resources"]:
        kinds = [d["kind"] for d in yaml.safe_load_all((KUBERNETES / resource).read_text()) if d]
        assert "Secret" not in kinds, f"{resource} holds a Secret"


def test_the_network_policy_keeps_the_admin_port_inside_the_cluster(manifests):
    policy = one(manifests, "NetworkPolicy", "wsgate")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "wsgate"}
    rules = {tuple(p["port"] for p in rule["ports"]): rule.get("from") for rule in policy["spec"]["ingress"]}
    assert rules[("ws",)] is None, "the client port is open to anyone"
    assert rules[("admin",)] == [
        {"podSelector": {}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
    ]


def test_the_services_pdb_and_autoscaler_target_the_gateway(manifests):
    labels = {"app.kubernetes.io/name": "wsgate"}
    client = one(manifests, "Service", "wsgate")
    admin = one(manifests, "Service", "wsgate-admin")
    assert client["spec"]["selector"] == admin["spec"]["selector"] == labels
    assert [p["targetPort"] for p in client["spec"]["ports"]] == ["ws"]
    assert [p["targetPort"] for p in admin["spec"]["ports"]] == ["admin"]
    assert one(manifests, "PodDisruptionBudget", "wsgate")["spec"]["selector"]["matchLabels"] == labels
    autoscaler = one(manifests, "HorizontalPodAutoscaler", "wsgate")["spec"]
    assert autoscaler["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "wsgate"}
    assert [m["resource"]["name"] for m in autoscaler["metrics"]] == ["cpu"]
    assert autoscaler["minReplicas"] >= 2


def test_the_servicemonitor_scrapes_the_admin_service_as_job_wsgate(manifests):
    monitor = one(manifests, "ServiceMonitor", "wsgate")
    admin = one(manifests, "Service", "wsgate-admin")
    spec = monitor["spec"]
    assert set(spec) <= {"jobLabel", "selector", "endpoints", "namespaceSelector"}
    assert spec["selector"]["matchLabels"].items() <= admin["metadata"]["labels"].items()
    assert (
        not spec["selector"]["matchLabels"].items()
        <= one(manifests, "Service", "wsgate")["metadata"]["labels"].items()
    ), "the client Service is not scraped"
    assert admin["metadata"]["labels"][spec["jobLabel"]] == "wsgate", "the alert rules select job=wsgate"
    port_names = {port["name"] for port in admin["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+s", endpoint["interval"])


# -- policies for containers --------------------------------------------------------------------------

CONTAINER_POLICIES = [DEPLOY / "policy.yaml", DEPLOY / "compose" / "policy.yaml"]


@pytest.mark.parametrize("path", CONTAINER_POLICIES, ids=lambda path: str(path.relative_to(DEPLOY)))
def test_the_container_policies_pass_check_and_the_schema(path):
    document = yaml.safe_load(path.read_text())
    assert list(jsonschema.Draft202012Validator(policy_schema()).iter_errors(document)) == []
    env = {**os.environ, **{name: secrets.token_hex(32) for name in secret_variables(document)}}
    result = run(WSGATE, "check", "-c", str(path.relative_to(REPO)), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert document["admin"]["address"] == "0.0.0.0:9090", "reachable by probes and Prometheus"


# -- Dockerfile ----------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, arguments = line.partition(" ")
            instructions.append((instruction.upper(), " ".join(arguments.split())))
    return instructions


def test_the_dockerfile_builds_in_two_stages_and_runs_unprivileged():
    instructions = dockerfile_instructions()
    froms = [arguments for instruction, arguments in instructions if instruction == "FROM"]
    assert froms == ["python:3.11-slim AS build", "python:3.11-slim"]
    runtime = instructions[[i for i, (name, _) in enumerate(instructions) if name == "FROM"][-1] :]
    by_name: dict[str, list[str]] = {}
    for instruction, arguments in runtime:
        by_name.setdefault(instruction, []).append(arguments)

    assert [c for c in by_name["COPY"] if c.startswith("--from=")] == ["--from=build /opt/venv /opt/venv"]
    assert "RUN" not in by_name, "the runtime stage only copies the venv in"
    (user,) = by_name["USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric, non-root user"
    environment = " ".join(by_name["ENV"])
    assert "PYTHONDONTWRITEBYTECODE=1" in environment
    assert by_name["STOPSIGNAL"] == ["SIGTERM"]
    assert json.loads(by_name["ENTRYPOINT"][0]) == ["wsgate"]
    assert json.loads(by_name["CMD"][0]) == ["serve", "-c", "/etc/wsgate/policy.yaml"]

    policy = parse_policy((DEPLOY / "policy.yaml").read_text())
    assert by_name["EXPOSE"] == [f"{policy.listen.address.port} {policy.admin.port}"]
    (healthcheck,) = by_name["HEALTHCHECK"]
    options, _, command = healthcheck.partition(" CMD ")
    assert "--interval=" in options and "--timeout=" in options
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"], "slim images have no curl"
    assert f"http://127.0.0.1:{policy.admin.port}/healthz" in argv[2]
    for source in (arguments.split()[0] for arguments in by_name["COPY"] if not arguments.startswith("--")):
        assert (REPO / source).exists(), source

    build = instructions[: [i for i, (name, _) in enumerate(instructions) if name == "FROM"][-1]]
    build_env = " ".join(arguments for instruction, arguments in build if instruction == "ENV")
    assert "PIP_NO_CACHE_DIR=1" in build_env
    steps = " ".join(arguments for instruction, arguments in build if instruction == "RUN")
    assert "python -m venv /opt/venv" in steps and "pip wheel" in steps


@pytest.mark.serve_process
async def test_the_dockerfile_healthcheck_passes_against_wsgate_and_fails_without(tmp_path, wsgate_process):
    """The HEALTHCHECK's program, run as is (its port moved to the one bound here), against a gateway
    serving the image's policy: exit 0 while it runs, non-zero once it has stopped."""
    ((_, healthcheck),) = [entry for entry in dockerfile_instructions() if entry[0] == "HEALTHCHECK"]
    program = json.loads(healthcheck.partition(" CMD ")[2])[2]
    policy = tmp_path / "policy.yaml"
    text = (DEPLOY / "policy.yaml").read_text()
    policy.write_text(text.replace("0.0.0.0:8080", "127.0.0.1:0").replace("0.0.0.0:9090", "127.0.0.1:0"))
    process = wsgate_process("serve", "-c", str(policy))
    admin_port = (await process.wait_for("gateway.listening"))["admin"].rsplit(":", 1)[1]
    probe = program.replace("127.0.0.1:9090", f"127.0.0.1:{admin_port}")
    assert probe != program
    healthy = await asyncio.to_thread(run, sys.executable, "-I", "-c", probe)
    assert healthy.returncode == 0, healthy.stderr
    process.signal()
    assert await process.wait_exit() == 0
    unhealthy = await asyncio.to_thread(run, sys.executable, "-I", "-c", probe)
    assert unhealthy.returncode != 0


# -- compose -------------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_names_its_services_and_hardens_wsgate():
    services = compose()["services"]
    assert set(services) == {"wsgate", "echo", "redis", "prometheus", "grafana"}
    wsgate = services["wsgate"]
    assert wsgate["read_only"] is True
    assert any(entry.startswith("/tmp") for entry in wsgate["tmpfs"])
    assert wsgate["cap_drop"] == ["ALL"]
    assert wsgate["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert "127.0.0.1:9090:9090" in wsgate["ports"], "the admin port on the host's loopback only"
    assert re.fullmatch(r"\$\{WSGATE_ADMIN_TOKEN:\?[^}]+\}", wsgate["environment"]["WSGATE_ADMIN_TOKEN"])
    assert services["redis"]["read_only"] is True and services["echo"]["read_only"] is True
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"


def test_compose_runs_the_compose_policy_against_its_own_services():
    services = compose()["services"]
    mounts = dict(volume.split(":")[:2] for volume in services["wsgate"]["volumes"])
    assert mounts["./compose/policy.yaml"] == "/etc/wsgate/policy.yaml"
    policy = yaml.safe_load((DEPLOY / "compose" / "policy.yaml").read_text())
    assert policy["limiter"]["redis"]["url"].startswith("redis://redis:6379/")
    upstreams = {route["upstream"] for route in policy["routes"]}
    assert upstreams == {"ws://echo:8000/"}
    echo = services["echo"]
    assert echo["entrypoint"][:2] == ["python", "-c"]
    assert 'start_echo_upstream("0.0.0.0", 8000)' in echo["entrypoint"][2]
    policy_limits = parse_policy(
        (DEPLOY / "compose" / "policy.yaml").read_text(), require_secrets=False
    ).limits
    grace = re.fullmatch(r"(\d+)s", services["wsgate"]["stop_grace_period"])
    assert grace and int(grace.group(1)) >= policy_limits.drain_timeout + 5
    prometheus_mounts = dict(volume.split(":")[:2] for volume in services["prometheus"]["volumes"])
    assert prometheus_mounts["./prometheus/alerts.yaml"] == "/etc/prometheus/alerts.yaml"


async def test_the_compose_echo_service_echoes(tmp_path):
    """The echo service's program, as compose runs it (on a free port here)."""
    program = compose()["services"]["echo"]["entrypoint"][2]
    port = free_port()
    echo = subprocess.Popen(
        [sys.executable, "-c", program.replace("8000", str(port))], cwd=tmp_path, stdin=subprocess.DEVNULL
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    ws = await session.ws_connect(f"ws://127.0.0.1:{port}/")
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("the echo service did not listen")
            await ws.send_str("hello")
            assert (await ws.receive(timeout=5)).data == "hello"
            await ws.close()
    finally:
        echo.kill()
        echo.wait(5)
