"""The Kubernetes layouts render with `kubectl kustomize`, every object is valid for Kubernetes
1.32 (offline, `kubernetes-validate`, unknown fields rejected), and ports, probe paths, file
names and the drain grace agree with the upgradeproxy config each one embeds.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.support.dockerfile import dockerfile_facts
from tests.support.processes import ROOT
from upgradeproxy.config.loader import parse_config
from upgradeproxy.config.model import Config

K8S = ROOT / "deploy" / "kubernetes"
LAYOUTS = ("sidecar", "pool")
KUBERNETES_VERSION = "1.32.0"

Obj = dict[str, Any]


def render(layout: str) -> list[Obj]:
    """`kubectl kustomize deploy/kubernetes/LAYOUT`, parsed."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: cannot render the kustomize layouts (kubectl 1.32)")
    done = subprocess.run(
        ["kubectl", "kustomize", str(K8S / layout)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize {layout}: {done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def schema_problem(obj: Obj) -> str | None:
    """None if `obj` is valid for Kubernetes 1.32; else "Kind/name: field.path: why"."""
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        where = ".".join(str(part) for part in err.path) or "(top level)"
        return f"{_name(obj)}: {where}: {err.message}"
    except kubernetes_validate.SchemaNotFoundError:
        return f"{_name(obj)}: no {obj.get('apiVersion')} {obj.get('kind')} in Kubernetes 1.32"
    return None


def _name(obj: Obj) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def _one(objs: list[Obj], kind: str) -> Obj:
    found = [obj for obj in objs if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {[_name(o) for o in found]}"
    return found[0]


class Layout:
    """A rendered layout, with the pieces the checks compare."""

    def __init__(self, name: str) -> None:
        self.objs = render(name)
        self.deployment = _one(self.objs, "Deployment")
        self.pod = self.deployment["spec"]["template"]["spec"]
        self.proxy = next(c for c in self.pod["containers"] if c["name"] == "upgradeproxy")
        args = self.proxy["args"]
        self.config_path = Path(args[args.index("--config") + 1])
        mount = next(
            m for m in self.proxy["volumeMounts"] if m["mountPath"] == str(self.config_path.parent)
        )
        volume = next(v for v in self.pod["volumes"] if v["name"] == mount["name"])
        config_map = next(
            o
            for o in self.objs
            if o["kind"] == "ConfigMap" and o["metadata"]["name"] == volume["configMap"]["name"]
        )
        assert self.config_path.name in config_map["data"], (
            f"{_name(config_map)} has no key {self.config_path.name} (the file --config names)"
        )
        self.config_text = config_map["data"][self.config_path.name]
        self.config: Config = parse_config(self.config_text, f"{name}/{self.config_path.name}")
        self.ports = {p["name"]: p["containerPort"] for p in self.proxy["ports"]}

    def services(self) -> list[Obj]:
        return [o for o in self.objs if o["kind"] == "Service"]


@pytest.fixture(scope="module", params=LAYOUTS)
def layout(request: pytest.FixtureRequest) -> Layout:
    return Layout(request.param)


@pytest.fixture(scope="module")
def pool() -> Layout:
    return Layout("pool")


@pytest.fixture(scope="module")
def sidecar() -> Layout:
    return Layout("sidecar")


# --- every object is valid Kubernetes 1.32 ------------------------------------------------


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_rendered_object_is_valid_for_kubernetes_1_32(name: str) -> None:
    objs = render(name)
    assert objs
    problems = [p for p in map(schema_problem, objs) if p is not None]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda d: d["spec"].__setitem__("replicas", "three"),
            "Deployment/bad: spec.replicas: 'three' is not of type 'integer'",
        ),
        (
            lambda d: d["spec"]["template"]["spec"]["containers"][0].__setitem__("prots", []),
            "Deployment/bad: spec.template.spec.containers.0: Additional properties",
        ),
    ],
    ids=["wrong type", "unknown field"],
)
def test_schema_problem_names_the_object_and_the_field(change: Any, expected: str) -> None:
    deployment: Obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "bad"},
        "spec": {
            "selector": {"matchLabels": {"app": "x"}},
            "template": {
                "metadata": {"labels": {"app": "x"}},
                "spec": {"containers": [{"name": "x", "image": "x"}]},
            },
        },
    }
    assert schema_problem(deployment) is None
    change(deployment)
    problem = schema_problem(deployment)
    assert problem is not None
    assert problem.startswith(expected), problem


# --- both layouts agree with their embedded config ----------------------------------------


def test_ports_match_the_embedded_config(layout: Layout) -> None:
    config = layout.config
    assert config.admin is not None
    assert layout.ports["admin"] == config.admin.address.port
    assert layout.ports["http"] == config.listeners[0].address.port
    annotations = layout.deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == config.admin.address.port
    assert annotations["prometheus.io/path"] == "/metrics"
    for service in layout.services():
        for port in service["spec"]["ports"]:
            if isinstance(port["targetPort"], str):
                assert port["targetPort"] in layout.ports, f"{_name(service)}: {port}"


def test_probes_ask_readyz_and_healthz_on_the_admin_port(layout: Layout) -> None:
    readiness = layout.proxy["readinessProbe"]["httpGet"]
    liveness = layout.proxy["livenessProbe"]["httpGet"]
    assert (readiness["path"], readiness["port"]) == ("/readyz", "admin")
    assert (liveness["path"], liveness["port"]) == ("/healthz", "admin")


def test_grace_covers_the_prestop_sleep_and_the_drain(layout: Layout) -> None:
    """SIGKILL must not come before open tunnels had their drain time; SIGTERM comes after
    the preStop sleep, which runs inside the grace period."""
    pre_stop = layout.proxy["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop >= 1
    timeouts = layout.config.timeouts
    assert layout.pod["terminationGracePeriodSeconds"] > (
        pre_stop + timeouts.drain_delay + timeouts.drain
    )


def test_proxy_container_is_locked_down_and_bounded(layout: Layout) -> None:
    security = layout.proxy["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert layout.pod["securityContext"]["runAsNonRoot"] is True
    assert security["runAsUser"] == dockerfile_facts()["user"]
    assert str(layout.config_path) == dockerfile_facts()["config"]
    mounts = {m["mountPath"]: m["name"] for m in layout.proxy["volumeMounts"]}
    tmp = next(v for v in layout.pod["volumes"] if v["name"] == mounts["/tmp"])
    assert "emptyDir" in tmp  # the only writable place: workers' metrics files
    resources = layout.proxy["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert {"cpu", "memory"} <= resources["limits"].keys()
    ports = {int(p) for p in dockerfile_facts()["ports"]}  # type: ignore[attr-defined]
    assert set(layout.ports.values()) == ports


def test_embedded_configs_spread_reconnects(layout: Layout) -> None:
    """Tunnels end within a lifetime (so new pods fill) and a drain closes them a few at a
    time (so the other pods are not hit by one reconnect wave)."""
    config = layout.config
    assert config.timeouts.tunnel_max_lifetime >= 60
    assert config.drain_tunnels == "spread"


# --- the sidecar ------------------------------------------------------------------------


def test_sidecar_app_outlives_the_proxy_drain(sidecar: Layout) -> None:
    """The app gets SIGTERM only after the proxy's preStop and drain, within the grace."""
    app = next(c for c in sidecar.pod["containers"] if c["name"] != "upgradeproxy")
    timeouts = sidecar.config.timeouts
    proxy_done = (
        sidecar.proxy["lifecycle"]["preStop"]["sleep"]["seconds"]
        + timeouts.drain_delay
        + timeouts.drain
    )
    app_pre_stop = app["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert app_pre_stop >= proxy_done
    assert sidecar.pod["terminationGracePeriodSeconds"] > app_pre_stop
    upstream = sidecar.config.upstreams["app"].servers[0].address
    assert upstream.host == "127.0.0.1"
    assert upstream.port in {p["containerPort"] for p in app["ports"]}


# --- the pool ---------------------------------------------------------------------------


def test_pool_workers_match_the_cpu_limit(pool: Layout) -> None:
    cpu = str(pool.proxy["resources"]["limits"]["cpu"])
    cores = int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    assert pool.config.workers == cores
    assert pool.config.workers > 1  # multiprocess metrics: /tmp must be writable (checked above)


def test_pool_load_balancer_keeps_client_addresses(pool: Layout) -> None:
    (public,) = [s for s in pool.services() if s["spec"].get("type") == "LoadBalancer"]
    assert public["spec"]["externalTrafficPolicy"] == "Local"
    assert public["spec"]["selector"] == pool.deployment["spec"]["selector"]["matchLabels"]
    assert pool.config.listeners[0].proxy_protocol is True


def test_pool_upstream_is_the_headless_service(pool: Layout) -> None:
    """Every pod of the Service is a server of its own: the upstream discovers the name."""
    found = [u.discover for u in pool.config.upstreams.values()]
    assert found
    headless = {
        s["metadata"]["name"]: s for s in pool.services() if s["spec"].get("clusterIP") == "None"
    }
    for discover in found:
        assert discover is not None, "the pool's upstream lists servers instead of discovering"
        assert discover.name in headless, f"{discover.name} is not a headless Service here"
        assert not discover.resolvers  # the pod's own: its search domains find the Service
        assert discover.port in {p["port"] for p in headless[discover.name]["spec"]["ports"]}


def test_pool_has_a_budget_an_autoscaler_and_spreads_over_nodes(pool: Layout) -> None:
    labels = pool.deployment["spec"]["selector"]["matchLabels"]
    budget = _one(pool.objs, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"] == labels
    hpa = _one(pool.objs, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", pool.deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    # The HPA owns the count: a `replicas` here would be reset by every apply.
    assert "replicas" not in pool.deployment["spec"]
    spread = pool.pod["topologySpreadConstraints"]
    assert any(c["topologyKey"] == "kubernetes.io/hostname" for c in spread)
    assert all(c["labelSelector"]["matchLabels"] == labels for c in spread)
