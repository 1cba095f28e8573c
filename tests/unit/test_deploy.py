"""The shipped configs and manifests agree with the loader and with each other."""

from __future__ import annotations

import re
import tomllib
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


# --- packaging (issue 11, item 7) --------------------------------------------------------


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_lock_pins_every_runtime_dependency() -> None:
    """requirements.lock pins (==) each dependency pyproject.toml declares, at a version its
    range allows."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line.strip() and not line.startswith("#"))
    pinned = {_normalized(name): version for name, version in pins.items()}
    for requirement in project["dependencies"]:
        name, floor = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement).groups()
        version = pinned[_normalized(name)]
        assert _version(version) >= _version(floor), (name, version, floor)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"[0-9]+", text)[:3])


def test_dockerfile_installs_from_the_lock() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "requirements.lock" in dockerfile
    assert re.search(r"pip install .*-c requirements\.lock", dockerfile)


def test_systemd_unit_needs_no_user_to_be_created() -> None:
    unit = (ROOT / "deploy" / "systemd" / "upgradeproxy.service").read_text()
    readme = (ROOT / "README.md").read_text()
    user = re.search(r"^User=(\S+)", unit, re.M)
    assert "DynamicUser=yes" in unit or (user and "useradd --system" in readme)


def test_the_contract_and_the_changelog_live_in_the_repository() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "../shared" not in readme
    assert "(docs/interface.md)" in readme
    contract = (ROOT / "docs" / "interface.md").read_text()
    assert contract.splitlines()[0].startswith("> This is upgradeproxy's external contract")
    assert "## Operations additions" in contract
    changelog = (ROOT / "CHANGELOG.md").read_text()
    versions = re.split(r"^## ", changelog, flags=re.M)[1:]
    assert [v.splitlines()[0] for v in versions][:2] == ["Unreleased", "0.1.0"]
    assert all("### Upgrading" in v for v in versions)
