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
    assert pod["terminationGracePeriodSeconds"] > config.timeouts.drain
