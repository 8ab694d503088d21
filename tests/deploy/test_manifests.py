"""k8s/: every overlay renders with `kubectl kustomize`, validates against the Kubernetes schemas,
and every container is locked down, probed, sized and configured the way the services expect."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from support import make_pki

from rlhf_online import config

OVERLAYS = sorted(p.name for p in (Path(__file__).resolve().parents[2] / "k8s" / "overlays").iterdir()
                  if (p / "kustomization.yaml").is_file())
# The oldest release we promise (native gRPC probes are GA since 1.27; kubernetes-validate ships
# 1.25+) and the newest schema the installed kubernetes-validate knows.
K8S_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
CRD_GROUPS = ("monitoring.coreos.com/",)
SERVICES = {"generation": config.GenerationSettings, "reward": config.RewardSettings,
            "trainer": config.TrainerSettings}
UID = 10001


def defaults(cls: type) -> dict[str, object]:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def cpu(quantity: str | int) -> float:
    """A CPU quantity ("2", "500m") in cores."""
    q = str(quantity)
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


def memory(quantity: str) -> int:
    """A memory quantity ("512Mi", "4Gi") in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", str(quantity))
    assert m, quantity
    return int(m[1]) * units.get(m[2], 1)


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict) -> list[dict]:
    spec = pod_spec(workload)
    return spec.get("initContainers", []) + spec["containers"]


def component(obj: dict) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def services(docs: list[dict]) -> dict[str, dict]:
    """The three services' workloads by service name: Deployments, and the trainer's StatefulSet where it
    runs as torch.distributed ranks (components/distributed-trainer)."""
    out = {}
    for w in docs:
        if w["kind"] in ("Deployment", "StatefulSet"):
            [c] = pod_spec(w)["containers"]
            if c["name"] in SERVICES:
                out[c["name"]] = w
    assert set(out) == set(SERVICES), sorted(out)
    return out


def distributed(workload: dict) -> bool:
    """The trainer as ranks, one per pod."""
    return workload["kind"] == "StatefulSet"


def torchrun_args(c: dict, pod_index: int = 0) -> argparse.Namespace:
    """The container's torchrun command line in pod `pod_index`, parsed by torchrun's own parser."""
    from torch.distributed.run import get_args_parser

    assert c["command"] == ["torchrun"], c.get("command")
    return get_args_parser().parse_args([a.replace("$(POD_INDEX)", str(pod_index)) for a in c["args"]])


# --------------------------------------------------------------------------------------------
# rendering and schemas
# --------------------------------------------------------------------------------------------


def test_base_renders_on_its_own(kit):
    docs = kit.render("../base")
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "PersistentVolumeClaim", "NetworkPolicy",
            "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= {d["kind"] for d in docs}
    assert not [d for d in docs if d["kind"] == "Secret"], "the base references Secrets, it never carries one"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_the_kubernetes_schemas(rendered, overlay):
    docs = rendered[overlay]
    assert {"Namespace", "Deployment", "StatefulSet", "Service", "ConfigMap", "PersistentVolumeClaim",
            "NetworkPolicy", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor",
            "PrometheusRule"} <= {d["kind"] for d in docs}
    errors = []
    for d in docs:
        if d["apiVersion"].startswith(CRD_GROUPS):
            continue  # no schema shipped for CRDs: test_monitoring checks them by hand
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(f"{d['kind']}/{d['metadata']['name']} @ {version}: {e.message} at "
                              f"{'.'.join(map(str, e.path))}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_lands_in_the_overlays_namespace(rendered, overlay):
    docs = rendered[overlay]
    [ns] = [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"]
    assert all(d["metadata"].get("namespace") == ns for d in docs if d["kind"] != "Namespace")
    # the namespace enforces what test_every_container_is_locked_down checks
    labels = next(d for d in docs if d["kind"] == "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


# --------------------------------------------------------------------------------------------
# security context, probes, resources
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_locked_down(kit, rendered, overlay):
    problems = []
    for w in kit.workloads(rendered[overlay]):
        spec, name = pod_spec(w), w["metadata"]["name"]
        psc = spec.get("securityContext", {})
        want_pod = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                    "seccompProfile": {"type": "RuntimeDefault"}}
        problems += [f"{name}: pod securityContext.{k} = {psc.get(k)!r}" for k, v in want_pod.items() if psc.get(k) != v]
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(key):
                problems.append(f"{name}: {key}")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: mounts a service account token")
        if spec.get("enableServiceLinks") is not False:
            problems.append(f"{name}: enableServiceLinks (would inject *_PORT env next to RLHF_* settings)")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        if any("hostPath" in v for v in volumes.values()):
            problems.append(f"{name}: hostPath volume")
        for c in containers(w):
            where, sc = f"{name}/{c['name']}", c.get("securityContext", {})
            want = {"runAsNonRoot": True, "runAsUser": UID, "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
                    "seccompProfile": {"type": "RuntimeDefault"}}
            problems += [f"{where}: securityContext.{k} = {sc.get(k)!r}" for k, v in want.items() if sc.get(k) != v]
            if sc.get("privileged"):
                problems.append(f"{where}: privileged")
            # a read-only root needs somewhere to write temp files
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            if not tmp or "emptyDir" not in volumes.get(tmp[0]["name"], {}):
                problems.append(f"{where}: no emptyDir at /tmp")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_probes_sized_for_model_loading(kit, rendered, overlay):
    problems = []
    for w in kit.workloads(rendered[overlay]):
        for c in pod_spec(w)["containers"]:
            where = f"{w['metadata']['name']}/{c['name']}"
            missing = [p for p in ("startupProbe", "readinessProbe", "livenessProbe") if p not in c]
            if missing:
                problems.append(f"{where}: no {', '.join(missing)}")
                continue
            startup, live = c["startupProbe"], c["livenessProbe"]
            if c["name"] in SERVICES:
                ports = {p["name"]: p["containerPort"] for p in c["ports"]}
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                # kubelet's gRPC probes speak plaintext: a TLS server is probed on its plaintext health port
                probed = ports["health"] if "RLHF_TLS_CERT" in env else ports["grpc"]
                if "health" in ports and env.get("RLHF_HEALTH_PORT") != str(ports["health"]):
                    problems.append(f"{where}: the health port {ports['health']} is not RLHF_HEALTH_PORT")
                for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                    if c[kind].get("grpc", {}).get("port") != probed:
                        problems.append(f"{where}: {kind} is not a gRPC health check on {probed}")
                # the server only listens once the model is loaded: allow minutes for that
                budget = startup["periodSeconds"] * startup["failureThreshold"]
                if budget < 300:
                    problems.append(f"{where}: startup probe allows only {budget}s to load the model")
            # a busy moment must not get a healthy process restarted
            if live.get("periodSeconds", 10) * live.get("failureThreshold", 3) < 45:
                problems.append(f"{where}: liveness gives up within 45s")
            if live.get("timeoutSeconds", 1) < 3:
                problems.append(f"{where}: liveness timeout under 3s")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits_and_torch_threads_follow_the_cpu_limit(kit, rendered, overlay):
    problems = []
    for w in kit.workloads(rendered[overlay]):
        for c in containers(w):
            where, res = f"{w['metadata']['name']}/{c['name']}", c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(kind, {}):
                        problems.append(f"{where}: no {kind}.{r}")
            if problems:
                continue
            if cpu(res["requests"]["cpu"]) > cpu(res["limits"]["cpu"]):
                problems.append(f"{where}: cpu request above limit")
            if memory(res["requests"]["memory"]) > memory(res["limits"]["memory"]):
                problems.append(f"{where}: memory request above limit")
            if c["name"] in SERVICES:
                env = {e["name"]: e for e in c.get("env", [])}
                ref = env.get("RLHF_TORCH_THREADS", {}).get("valueFrom", {}).get("resourceFieldRef", {})
                if (ref.get("resource"), ref.get("containerName", c["name"]), str(ref.get("divisor", "1"))) != (
                        "limits.cpu", c["name"], "1"):
                    problems.append(f"{where}: RLHF_TORCH_THREADS does not follow its own CPU limit: {ref}")
                # the services hold a whole model: guaranteed QoS, never a surprise eviction
                if res["requests"] != res["limits"]:
                    problems.append(f"{where}: requests != limits")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------
# the services' configuration, as the processes will see it
# --------------------------------------------------------------------------------------------


def container_env(docs: list[dict], c: dict) -> dict[str, str]:
    """The environment kubelet gives a container: envFrom first, then env in order with $(VAR)
    expansion; secrets are stand-ins, resourceFieldRef limits.cpu rounds up like kubelet.
    (Files of mounted Secrets are swapped for stand-ins by `secret_files`.)"""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        env.update(maps[src["configMapRef"]["name"]])
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                                    lambda m: env.get(m[1], m[0]), e["value"])
        elif "secretKeyRef" in e["valueFrom"]:
            env[e["name"]] = f"<{e['valueFrom']['secretKeyRef']['key']}>"
        elif "configMapKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["configMapKeyRef"]
            env[e["name"]] = maps[ref["name"]][ref["key"]]
        elif "resourceFieldRef" in e["valueFrom"]:
            env[e["name"]] = str(math.ceil(cpu(c["resources"]["limits"]["cpu"])))
    return env


# The keys of a cert-manager-style TLS Secret (kubernetes.io/tls plus the issuing CA).
TLS_SECRET_KEYS = ("tls.crt", "tls.key", "ca.crt")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    """PEM stand-ins for a TLS Secret's keys: a certificate, its key and the CA that signed it."""
    pki = make_pki(tmp_path_factory.mktemp("secret"))
    return {"tls.crt": pki.server_cert, "tls.key": pki.server_key, "ca.crt": pki.ca}


def secret_files(workload: dict, c: dict, env: dict[str, str], stand_ins: dict[str, Path]) -> dict[str, str]:
    """The environment with each path into a mounted TLS Secret replaced by a stand-in file of the same key;
    a path into a Secret that is not one of its keys fails the test."""
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    secrets = {m["mountPath"]: volumes[m["name"]]["secret"] for m in c.get("volumeMounts", [])
               if "secret" in volumes[m["name"]]}
    out = dict(env)
    for name, value in env.items():
        for mount, secret in secrets.items():
            if value.startswith(mount + "/"):
                key = value.removeprefix(mount + "/")
                keys = [i["path"] for i in secret.get("items", [])] or TLS_SECRET_KEYS
                assert key in keys, f"{name}={value}: {secret['secretName']} has no key {key!r}"
                out[name] = str(stand_ins[key])
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_builds_its_settings_from_the_rendered_environment(kit, rendered, overlay, stand_ins):
    docs = rendered[overlay]
    svcs = kit.by_kind(docs, "Service")
    for name, w in services(docs).items():
        [c] = pod_spec(w)["containers"]
        if distributed(w):  # under torchrun: its module is the CLI, its arguments the same
            run = torchrun_args(c)
            assert (run.module, run.training_script, run.training_script_args) == (True, "services.cli",
                                                                                   ["serve", name])
        else:
            assert c["args"] == ["serve", name]
        env = secret_files(w, c, container_env(docs, c), stand_ins)
        unexpanded = {k: v for k, v in env.items() if "$(" in v}
        assert not unexpanded, f"{name}: undefined $(VAR) in {unexpanded}"
        settings = config.build(SERVICES[name], None, env)  # raises ConfigError naming a bad value
        want = defaults(SERVICES[name])
        # the documented default ports, on the container and on its Service
        assert (settings.port, settings.metrics_port) == (want["port"], want["metrics_port"])
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        health = {"health": settings.health_port} if settings.health_port >= 0 else {}
        rendezvous = {"rendezvous": torchrun_args(c).master_port} if distributed(w) else {}
        assert ports == {"grpc": settings.port, "metrics": settings.metrics_port, **health, **rendezvous}
        svc = svcs[f"rlhf-{name}"]
        # the health port is kubelet's (probes reach the pod directly): no Service exposes it
        assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"grpc": ports["grpc"], "metrics": ports["metrics"]}
        selector = dict(svc["spec"]["selector"])
        if distributed(w):  # the API is rank 0's, and rank 0 is pod 0
            assert selector.pop("statefulset.kubernetes.io/pod-name") == f"{w['metadata']['name']}-0"
        assert selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        annotations = w["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(settings.metrics_port)
        assert annotations["prometheus.io/scrape"] == "true"
        assert settings.torch_threads == math.ceil(cpu(c["resources"]["limits"]["cpu"]))
        # the shared store: PostgreSQL, password out of the URL (libpq reads PGPASSWORD)
        assert settings.store_url == "postgresql://<username>@rlhf-postgres:5432/rlhf"
        assert env["PGPASSWORD"] == "<password>" and "<password>" not in settings.store_url
        # admin RPCs need the token; the generation service has none, so it never sees the token
        assert settings.admin_token == ("" if name == "generation" else "<token>")
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        if name in ("generation", "trainer"):
            # the adapter registry on the shared volume; only the trainer writes it
            m = mounts[str(settings.adapter_dir)]
            assert bool(m.get("readOnly")) is (name == "generation")
            vol = {v["name"]: v for v in pod_spec(w)["volumes"]}[m["name"]]
            assert vol["persistentVolumeClaim"]["claimName"] == "rlhf-adapters"
        if name == "reward":
            assert not mounts[str(settings.reward_dir)].get("readOnly")
        if name == "trainer":
            assert settings.reward_addr == f"rlhf-reward:{defaults(config.RewardSettings)['port']}"
        # the image's cache directory is writable
        assert "/home/rlhf/.cache" in mounts


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_keys_are_real_settings(rendered, overlay):
    fields = {f"RLHF_{s.name.upper()}" for cls in SERVICES.values() for s in config.settings_of(cls)}
    [cm] = [d for d in rendered[overlay] if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("rlhf-config")]
    unknown = {k for k in cm["data"] if k.startswith("RLHF_")} - fields
    assert not unknown, f"no such setting: {sorted(unknown)} (see rlhf_online/config.py)"
    assert {k for k in cm["data"] if not k.startswith("RLHF_")} <= {"PGHOST", "PGPORT", "PGDATABASE", "PGSSLMODE"}


# --------------------------------------------------------------------------------------------
# topology: replicas, disruption budget, autoscaler, volumes, secrets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_generation_scales_and_the_trainer_is_a_singleton(kit, rendered, overlay):
    docs = rendered[overlay]
    deps = services(docs)
    gen, trainer, reward = deps["generation"], deps["trainer"], deps["reward"]
    labels = gen["spec"]["template"]["metadata"]["labels"]
    [pdb] = kit.by_kind(docs, "PodDisruptionBudget").values()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [hpa] = kit.by_kind(docs, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rlhf-generation"}
    assert hpa["spec"]["minReplicas"] <= gen["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    # a PDB that allows no eviction at all would block every node drain
    assert pdb["spec"].get("maxUnavailable", 1) >= 1
    if overlay != "dev":  # dev is one machine
        assert gen["spec"]["replicas"] >= 2 and hpa["spec"]["minReplicas"] >= 2
        assert gen["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    if not distributed(trainer):
        assert trainer["spec"]["replicas"] == 1 and trainer["spec"]["strategy"] == {"type": "Recreate"}
    assert reward["spec"]["replicas"] == 1 and reward["spec"]["strategy"] == {"type": "Recreate"}
    # graceful drain fits in the termination grace period
    grace = float(next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("rlhf-config"))
                  ["data"]["RLHF_GRACE_SECONDS"])
    for d in deps.values():
        assert pod_spec(d)["terminationGracePeriodSeconds"] > grace


DISTRIBUTED = [o for o in OVERLAYS if "distributed" in o]  # each checked by the test below


def test_there_is_an_overlay_with_the_distributed_trainer(rendered):
    assert DISTRIBUTED and all(distributed(services(rendered[o])["trainer"]) for o in DISTRIBUTED)
    assert not any(distributed(services(rendered[o])["trainer"]) for o in OVERLAYS if o not in DISTRIBUTED)


@pytest.mark.parametrize("overlay", DISTRIBUTED)
def test_a_distributed_trainer_runs_one_rank_per_pod_meeting_at_pod_0(kit, rendered, overlay):
    docs = rendered[overlay]
    trainer = services(docs)["trainer"]
    [c] = pod_spec(trainer)["containers"]
    spec, name = trainer["spec"], trainer["metadata"]["name"]
    run = torchrun_args(c)
    # one rank per pod, as many pods as nodes, started together: rank 0 is ready only once all have joined
    assert (int(run.nnodes), run.nproc_per_node) == (spec["replicas"], "1") and spec["replicas"] >= 2
    assert spec["podManagementPolicy"] == "Parallel"
    # pod i is node i: its index from the StatefulSet's pod-index label, so pod 0 is rank 0
    assert [torchrun_args(c, i).node_rank for i in range(spec["replicas"])] == list(range(spec["replicas"]))
    [index] = [e for e in c["env"] if e["name"] == "POD_INDEX"]
    assert index["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    # the static rendezvous is on pod 0, by its stable name in the headless Service, resolvable before it is ready
    headless = kit.by_kind(docs, "Service")[spec["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert run.master_addr == f"{name}-0.{spec['serviceName']}"
    assert [p["port"] for p in headless["spec"]["ports"]] == [run.master_port]
    # a failed rank ends its container (kubelet restarts it) rather than torchrun restarting it alone
    assert run.max_restarts == 0 and pod_spec(trainer).get("restartPolicy", "Always") == "Always"


def test_base_runs_at_least_two_generation_replicas(kit):
    docs = kit.render("../base")
    assert kit.by_kind(docs, "Deployment")["rlhf-generation"]["spec"]["replicas"] >= 2
    assert kit.by_kind(docs, "HorizontalPodAutoscaler")["rlhf-generation"]["spec"]["minReplicas"] >= 2
    pvc = kit.by_kind(docs, "PersistentVolumeClaim")["rlhf-adapters"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_postgres_statefulset_and_secret_references(kit, rendered, overlay):
    docs = rendered[overlay]
    pg = kit.by_kind(docs, "StatefulSet")["rlhf-postgres"]
    assert pg["spec"]["replicas"] == 1 and pg["spec"]["serviceName"] == "rlhf-postgres"
    assert kit.by_kind(docs, "Service")["rlhf-postgres"]["spec"]["ports"][0]["port"] == 5432
    [claim] = pg["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    secrets = kit.by_kind(docs, "Secret")
    refs = set()
    for w in kit.workloads(docs):
        for c in containers(w):
            for e in c.get("env", []):
                if "value" in e:
                    assert not re.search(r"(?i)pass|token|secret", e["name"]), f"{e['name']} is a literal value"
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add(ref["name"])
    if overlay == "dev":
        # generated from literals that say what they are, with hashed names the refs follow
        assert refs == set(secrets)
        for s in secrets.values():
            assert all(v for v in s["data"].values())
        assert set(secrets) == {n for n in secrets if re.match(r"rlhf-(postgres|admin)-[a-z0-9]{10}$", n)}
        dev_kustomization = (kit.k8s / "overlays" / "dev" / "kustomization.yaml").read_text()
        assert "dev-only" in dev_kustomization
    else:
        # production ships references only: the operator creates these Secrets
        assert not secrets, f"{overlay} must not carry Secret values"
        assert refs == {"rlhf-postgres", "rlhf-admin"}


# --------------------------------------------------------------------------------------------
# network policy: default deny, then only the loop's flows
# --------------------------------------------------------------------------------------------


def _selects(selector: dict, labels: dict) -> bool:
    """Label selector semantics ({} selects everything)."""
    ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        ok &= {"In": value in expr.get("values", []), "NotIn": value not in expr.get("values", []),
               "Exists": expr["key"] in labels, "DoesNotExist": expr["key"] not in labels}[expr["operator"]]
    return ok


def _peer(peer: dict, policy_ns: str, ns: str, labels: dict) -> bool:
    if "ipBlock" in peer:
        return False  # pods are not matched by ipBlock (it is for traffic outside the cluster)
    ns_ok = _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": ns}) \
        if "namespaceSelector" in peer else ns == policy_ns
    return ns_ok and _selects(peer.get("podSelector", {}), labels)


def _allowed(policies: list[dict], direction: str, own: tuple[str, dict], other: tuple[str, dict], port: int,
             protocol: str = "TCP") -> bool:
    """Whether `own` admits this flow in `direction` (Ingress: from `other`; Egress: to `other`)."""
    own_ns, own_labels = own
    selecting = [p for p in policies if p["metadata"]["namespace"] == own_ns and direction in p["spec"]["policyTypes"]
                 and _selects(p["spec"]["podSelector"], own_labels)]
    if not selecting:
        return True
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for p in selecting:
        for rule in p["spec"].get(key, []):
            peers = rule.get(peers_key)
            if peers is not None and not any(_peer(pe, own_ns, *other) for pe in peers):
                continue
            ports = rule.get("ports")
            if ports is None or any(pp.get("port") in (None, port) and pp.get("protocol", "TCP") == protocol
                                    for pp in ports):
                return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_allows_only_the_loops_flows(kit, rendered, overlay):
    docs = rendered[overlay]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    [ns] = [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    assert deny, "no default-deny policy"

    def pod(comp: str) -> tuple[str, dict]:
        return ns, {"app.kubernetes.io/name": "rlhf-online", "app.kubernetes.io/component": comp}

    client = ("apps", {"app": "shop", "rlhf-online/client": "true"})
    stranger = ("apps", {"app": "other"})
    prometheus = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
    dns = ("kube-system", {"k8s-app": "kube-dns"})

    def flow(src: tuple[str, dict], dst: tuple[str, dict], port: int, protocol: str = "TCP") -> bool:
        return (_allowed(policies, "Egress", src, dst, port, protocol) if src[0] == ns else True) and \
               (_allowed(policies, "Ingress", dst, src, port, protocol) if dst[0] == ns else True)

    allowed = [(client, pod("generation"), 50051), (pod("generation"), pod("postgres"), 5432),
               (pod("reward"), pod("postgres"), 5432), (pod("trainer"), pod("postgres"), 5432),
               (pod("trainer"), pod("reward"), 50052), (prometheus, pod("generation"), 9091),
               (prometheus, pod("reward"), 9092), (prometheus, pod("trainer"), 9093)]
    for src, dst, port in allowed:
        assert flow(src, dst, port), f"blocked: {src} -> {dst}:{port}"
    for comp in ("generation", "reward", "trainer", "postgres"):
        assert flow(pod(comp), dns, 53, "UDP") and flow(pod(comp), dns, 53, "TCP"), f"{comp} cannot resolve names"
    denied = [(stranger, pod("generation"), 50051), (client, pod("reward"), 50052), (client, pod("trainer"), 50053),
              (client, pod("postgres"), 5432), (pod("generation"), pod("reward"), 50052),
              (pod("generation"), pod("trainer"), 50053), (pod("reward"), pod("trainer"), 50053),
              (client, pod("generation"), 9091), (prometheus, pod("postgres"), 5432),
              (pod("generation"), ("internet", {}), 443), (pod("trainer"), ("internet", {}), 443),
              (pod("postgres"), ("internet", {}), 443), (pod("generation"), pod("generation"), 50051),
              (client, pod("reward"), 50062), (pod("generation"), pod("reward"), 50062)]  # the plaintext health port
    for src, dst, port in denied:
        assert not flow(src, dst, port), f"allowed but not needed: {src} -> {dst}:{port}"
    # the trainer's ranks reach each other (rendezvous 29500, collectives on ports the kernel picks) only
    # where the trainer runs as ranks
    ranks = distributed(services(docs)["trainer"])
    for port in (29500, 41234):
        assert flow(pod("trainer"), pod("trainer"), port) is ranks, f"trainer -> trainer:{port} with ranks={ranks}"
    assert not flow(pod("generation"), pod("trainer"), 29500) and not flow(client, pod("trainer"), 29500)


# --------------------------------------------------------------------------------------------
# TLS between the trainer and the reward service
# --------------------------------------------------------------------------------------------


def service_settings(docs: list[dict], stand_ins: dict[str, Path]) -> dict[str, object]:
    """Each service's settings as its container's rendered environment builds them (Secret files: stand-ins)."""
    out = {}
    for name, w in services(docs).items():
        [c] = pod_spec(w)["containers"]
        out[name] = config.build(SERVICES[name], None, secret_files(w, c, container_env(docs, c), stand_ins))
    return out


def mounted_secret(workload: dict, path: Path) -> str:
    """The name of the Secret whose volume holds `path` in the workload's pod."""
    [c] = pod_spec(workload)["containers"]
    volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
    [name] = [volumes[m["name"]]["secret"]["secretName"] for m in c["volumeMounts"]
              if str(path).startswith(m["mountPath"] + "/") and "secret" in volumes[m["name"]]]
    return name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_trainer_and_the_reward_service_agree_on_tls(kit, rendered, overlay, stand_ins):
    docs = rendered[overlay]
    s = service_settings(docs, stand_ins)
    reward, trainer = s["reward"], s["trainer"]
    # The trainer speaks TLS exactly when the reward service serves it, and presents a client certificate
    # exactly when the reward service requires one: otherwise every round finds the reward unreachable.
    assert (trainer.reward_tls is not None) == bool(reward.tls_cert), overlay
    assert bool(trainer.reward_tls and trainer.reward_tls.cert) == bool(reward.tls_client_ca), overlay
    if overlay == "dev":  # plaintext on one machine, opt-in there (docs/operations.md)
        assert trainer.reward_tls is None and not reward.tls_cert
        return
    # prod: mutual TLS, each side's files from its own Secret, the reward probed on its plaintext health port
    deps = services(docs)
    rendered_env = {e["name"]: e["value"] for e in pod_spec(deps["reward"])["containers"][0]["env"]
                    if "value" in e}
    assert reward.tls_client_ca and trainer.reward_tls.cert and reward.health_port > 0
    assert mounted_secret(deps["reward"], Path(rendered_env["RLHF_TLS_CERT"])) == "rlhf-reward-tls"
    trainer_env = {e["name"]: e["value"] for e in pod_spec(deps["trainer"])["containers"][0]["env"]
                   if "value" in e}
    assert {mounted_secret(deps["trainer"], Path(trainer_env[k])) for k in
            ("RLHF_TLS_CA", "RLHF_TLS_CLIENT_CERT", "RLHF_TLS_CLIENT_KEY")} == {"rlhf-trainer-tls"}
    assert not s["generation"].tls_ca and not s["generation"].tls_client_cert  # no service-to-service calls
    for name in ("reward", "trainer"):
        volumes = [v for v in pod_spec(deps[name])["volumes"] if "secret" in v]
        assert volumes and all(v["secret"]["defaultMode"] & 0o007 == 0 for v in volumes)  # not world-readable


def test_cert_manager_issues_the_secrets_the_tls_component_mounts(kit, tmp_path):
    # An overlay of prod plus the cert-manager component, as docs/operations.md describes it.
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "rlhf-online",
        "resources": [os.path.relpath(kit.k8s / "overlays" / "prod", tmp_path)],  # kustomize wants them relative
        "components": [os.path.relpath(kit.k8s / "components" / "cert-manager", tmp_path)]}))
    r = kit.run(kit.tool("kubectl"), "kustomize", "--load-restrictor=LoadRestrictionsNone", str(tmp_path))
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    certs = kit.by_kind(docs, "Certificate")
    issuers = kit.by_kind(docs, "Issuer")
    deps = kit.by_kind(docs, "Deployment")
    mounted = {v["secret"]["secretName"] for d in deps.values() for v in pod_spec(d).get("volumes", []) if "secret" in v}
    by_secret = {c["spec"]["secretName"]: c["spec"] for c in certs.values()}
    assert mounted == {"rlhf-reward-tls", "rlhf-trainer-tls"} and mounted <= set(by_secret)
    # Both signed by the same CA, which the other side trusts through the ca.crt of its own Secret.
    assert {by_secret[m]["issuerRef"]["name"] for m in mounted} == {"rlhf-ca"} and "ca" in issuers["rlhf-ca"]["spec"]
    assert by_secret[issuers["rlhf-ca"]["spec"]["ca"]["secretName"]]["isCA"] is True
    # The reward certificate names the host the trainer dials; each is only good for its side.
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("rlhf-config"))
    host = cm["data"]["RLHF_REWARD_ADDR"].rsplit(":", 1)[0]
    assert host in by_secret["rlhf-reward-tls"]["dnsNames"]
    assert by_secret["rlhf-reward-tls"]["usages"] == ["server auth"]
    assert by_secret["rlhf-trainer-tls"]["usages"] == ["client auth"]
    assert all(d["metadata"].get("namespace") == "rlhf-online" for d in [*certs.values(), *issuers.values()])


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned(kit, rendered, overlay):
    for w in kit.workloads(rendered[overlay]):
        for c in containers(w):
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] or "@sha256:" in image, f"{image} has no tag"
            assert not image.endswith(":latest"), image
    images = {name: c["image"] for name, w in services(rendered[overlay]).items() for c in containers(w)}
    engine = {e["name"]: e.get("value") for e in containers(services(rendered[overlay])["generation"])[0].get("env", [])}
    if engine.get("RLHF_ENGINE") == "vllm":  # generation runs the Dockerfile's vllm target of the same release
        assert images.pop("generation") == images["reward"] + "-vllm", images
    assert len(set(images.values())) == 1, f"the services run one image: {images}"


def test_the_gpu_overlay_serves_on_vllm_with_a_gpu(rendered):
    generation = services(rendered["gpu"])["generation"]
    spec = generation["spec"]["template"]["spec"]
    [c] = containers(generation)
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["RLHF_ENGINE"] == "vllm" and c["image"].endswith("-vllm")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert int(env["RLHF_TENSOR_PARALLEL_SIZE"]) == c["resources"]["limits"]["nvidia.com/gpu"]
    assert int(env["RLHF_MAX_LORAS"]) >= 2
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    shm = [v for v in spec["volumes"] if v["name"] == "dshm"]
    assert shm and shm[0]["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    # everything prod has is still there: the same mounts and probes
    prod = containers(services(rendered["prod"])["generation"])[0]
    assert {m["mountPath"] for m in prod["volumeMounts"]} < {m["mountPath"] for m in c["volumeMounts"]}
    assert c["startupProbe"] == prod["startupProbe"]
    others = [containers(services(rendered["gpu"])[s])[0] for s in ("reward", "trainer")]
    assert all("nvidia.com/gpu" not in o.get("resources", {}).get("limits", {}) for o in others)


def test_the_dockerfile_and_the_manifests_agree_on_paths(kit):
    dockerfile = (kit.repo / "Dockerfile").read_text()
    env = dict(re.findall(r"^\s*(?:ENV\s+)?([A-Z_]+)=(\S+?)\s*\\?$", dockerfile, re.M))
    cfg = yaml.safe_load((kit.k8s / "base" / "kustomization.yaml").read_text())
    assert cfg["configMapGenerator"][0]["envs"] == ["config.env"]
    config_env = dict(line.split("=", 1) for line in (kit.k8s / "base" / "config.env").read_text().splitlines()
                      if line and not line.startswith("#"))
    assert env["RLHF_DATA_DIR"] == config_env["RLHF_DATA_DIR"]
    assert env["RLHF_BASE_MODEL"] == config_env["RLHF_BASE_MODEL"]
    assert env["XDG_CACHE_HOME"] == env["HOME"] + "/.cache"  # mounted as an emptyDir in every pod
