"""The shipped configs and manifests agree with the loader and with each other."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from upgradeproxy.config.loader import load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted([*ROOT.glob("config/*.yaml"), ROOT / "deploy" / "pool.yaml"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_configs_pass_check(path: Path) -> None:
    """Every example config is one `upgradeproxy check` accepts."""
    load_config(str(path))


def _sidecar() -> list[dict]:
    return list(yaml.safe_load_all((ROOT / "deploy/kubernetes/sidecar.yaml").read_text()))


def test_sidecar_config_map_is_valid_and_matches_probes() -> None:
    """The ConfigMap's config loads, and the probes hit its admin port within the drain."""
    docs = {doc["kind"]: doc for doc in _sidecar()}
    config = parse_config(docs["ConfigMap"]["data"]["upgradeproxy.yaml"], "sidecar.yaml")
    assert config.admin is not None
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    proxy = next(c for c in pod["containers"] if c["name"] == "upgradeproxy")
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert ports["admin"] == config.admin.address.port
    assert ports["http"] == config.listeners[0].address.port
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # SIGKILL must not come before open tunnels had their drain time.
    timeouts = config.timeouts
    assert pod["terminationGracePeriodSeconds"] > timeouts.drain_delay + timeouts.drain
    # The proxy still accepts until the probe has seen 503 enough times to take it out.
    probe = proxy["readinessProbe"]
    assert timeouts.drain_delay > probe["periodSeconds"] * probe["failureThreshold"]


def _unit(name: str) -> dict[str, list[str]]:
    """A systemd unit file as key -> values (a key may repeat), sections flattened."""
    found: dict[str, list[str]] = {}
    for line in (ROOT / "deploy" / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_systemd_service_follows_the_new_pid_and_outlasts_the_drain() -> None:
    """Type=notify + NotifyAccess=all (the new process of a SIGUSR2 reports MAINPID), reload
    is SIGHUP to the main pid, and the stop timeout covers the example config's drain."""
    unit = _unit("upgradeproxy.service")
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["all"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    timeouts = load_config(str(ROOT / "config" / "upgradeproxy.yaml")).timeouts
    assert int(unit["TimeoutStopSec"][0]) > timeouts.drain_delay + timeouts.drain


def test_systemd_socket_unit_listens_where_the_example_config_does() -> None:
    """Every ListenStream matches a listener or the admin address of the example config, so
    socket activation hands each one over (an unmatched socket would be closed)."""
    config = load_config(str(ROOT / "config" / "upgradeproxy.yaml"))
    addresses = {str(listener.address) for listener in config.listeners}
    addresses |= {str(config.admin.address)} if config.admin else set()
    unit = _unit("upgradeproxy.socket")
    assert set(unit["ListenStream"]) == addresses
    assert unit["Accept"] == ["no"]
    assert unit["Service"] == ["upgradeproxy.service"]
