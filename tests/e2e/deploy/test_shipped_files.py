"""The shipped configs, the Dockerfile and the systemd unit agree with the loader and each other.

The Kubernetes manifests have their own file, tests/e2e/deploy/test_kubernetes.py.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.support.dockerfile import dockerfile_facts, instructions, only
from tests.support.processes import ROOT
from upgradeproxy.config.loader import load_config

CONFIGS = sorted(
    [
        *ROOT.glob("config/*.yaml"),
        ROOT / "deploy" / "pool.yaml",
        ROOT / "deploy" / "container.yaml",
        *ROOT.glob("deploy/kubernetes/*/upgradeproxy.yaml"),
    ]
)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_configs_pass_check(path: Path) -> None:
    """Every example config is one `upgradeproxy check` accepts."""
    load_config(str(path))


def test_dockerfile_copy_sources_exist() -> None:
    """Every COPY source is in the repository, which is the build context."""
    copies = [shlex.split(rest) for word, rest in instructions() if word == "COPY"]
    assert copies
    for args in copies:
        sources = [a for a in args[:-1] if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


def test_dockerfile_runs_non_root_drains_on_sigterm_and_checks_healthz() -> None:
    facts = dockerfile_facts()
    assert facts["user"] != 0
    assert only("STOPSIGNAL") == "SIGTERM"
    assert "slim" in only("FROM")
    assert facts["health_path"] == "/healthz"


def test_image_config_matches_expose_and_healthcheck() -> None:
    """The config the image carries listens on the EXPOSEd ports; /healthz is on its admin port."""
    facts = dockerfile_facts()
    copied = {
        args[-1]: args[-2]
        for word, rest in instructions()
        if word == "COPY"
        for args in [shlex.split(rest)]
    }
    assert facts["config"] in copied, "CMD's --config is not a file the image COPYs"
    config = load_config(str(ROOT / copied[str(facts["config"])]))
    assert config.admin is not None
    listening = {listener.address.port for listener in config.listeners}
    assert facts["ports"] == {*listening, config.admin.address.port}
    assert facts["health_port"] == config.admin.address.port


def test_systemd_unit_waits_longer_than_the_drain_and_signals_the_main_process() -> None:
    unit = (ROOT / "deploy/systemd/upgradeproxy.service").read_text()
    settings = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and line[:1].isalpha()
    )
    config_path = shlex.split(settings["ExecStart"])[-3]
    assert config_path == dockerfile_facts()["config"]
    timeouts = load_config(str(ROOT / "config/upgradeproxy.yaml")).timeouts
    assert int(settings["TimeoutStopSec"]) > timeouts.drain_delay + timeouts.drain
    assert settings["KillMode"] == "mixed"
    # After a SIGUSR2 with `workers: 1` the new process reports MAINPID=; systemd follows it.
    assert (settings["Type"], settings["NotifyAccess"]) == ("notify", "all")
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"


def test_prometheus_jobs_scrape_the_example_admin_port_and_the_pod_annotations() -> None:
    jobs = {
        job["job_name"]: job
        for job in yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())["scrape_configs"]
    }
    admin = load_config(str(ROOT / "config/upgradeproxy.yaml")).admin
    assert admin is not None
    assert jobs["upgradeproxy"]["static_configs"][0]["targets"] == [str(admin.address)]
    read = {
        label.removeprefix("__meta_kubernetes_pod_annotation_")
        for rule in jobs["kubernetes-pods"]["relabel_configs"]
        for label in rule["source_labels"]
        if label.startswith("__meta_kubernetes_pod_annotation_")
    }
    # prometheus.io/scrape, /port and /path, as Prometheus spells annotation names; the
    # Deployments carry them (tests/e2e/deploy/test_kubernetes.py checks their values).
    assert read == {"prometheus_io_scrape", "prometheus_io_port", "prometheus_io_path"}


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
    assert contract.splitlines()[0] == "# upgradeproxy — the external contract"
    assert "## Operations additions" in contract
    changelog = (ROOT / "CHANGELOG.md").read_text()
    versions = re.split(r"^## ", changelog, flags=re.M)[1:]
    assert [v.splitlines()[0] for v in versions][:2] == ["Unreleased", "0.1.0"]
    assert all("### Upgrading" in v for v in versions)


def test_systemd_socket_unit_listens_where_the_example_config_does() -> None:
    """Every ListenStream matches a listener or the admin address of the example config, so
    socket activation hands each one over (an unmatched socket would be closed)."""
    config = load_config(str(ROOT / "config" / "upgradeproxy.yaml"))
    addresses = {str(listener.address) for listener in config.listeners}
    addresses |= {str(config.admin.address)} if config.admin else set()
    unit = (ROOT / "deploy" / "systemd" / "upgradeproxy.socket").read_text()
    settings: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and line[:1].isalpha():
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    assert set(settings["ListenStream"]) == addresses
    assert settings["Accept"] == ["no"]
    assert settings["Service"] == ["upgradeproxy.service"]
