"""What an embedding program imports from `upgradeproxy` is there, and is the real thing."""

from __future__ import annotations

import importlib.metadata

import pytest

import upgradeproxy
from upgradeproxy.config import checker, loader, model
from upgradeproxy.service import server

EXPORTS = [
    ("serve", server.serve),
    ("Proxy", server.Proxy),
    ("Config", model.Config),
    ("load_config", loader.load_config),
    ("parse_config", loader.parse_config),
    ("ConfigError", checker.ConfigError),
    ("ConfigProblem", checker.ConfigProblem),
]


@pytest.mark.parametrize(("name", "home"), EXPORTS, ids=[name for name, _ in EXPORTS])
def test_exported_from_the_package(name: str, home: object) -> None:
    assert name in upgradeproxy.__all__
    assert getattr(upgradeproxy, name) is home


def test_all_names_only_what_exists() -> None:
    assert sorted(upgradeproxy.__all__) == sorted([*(n for n, _ in EXPORTS), "__version__"])


def test_version_is_the_installed_distributions() -> None:
    assert upgradeproxy.__version__ == importlib.metadata.version("upgradeproxy")


def test_parse_config_errors_name_file_line_field_and_why() -> None:
    with pytest.raises(upgradeproxy.ConfigError) as caught:
        upgradeproxy.parse_config("listen: []\nupstreams: {}\nroutes: []\n", "inline.yaml")
    problems = caught.value.problems
    assert all(isinstance(p, upgradeproxy.ConfigProblem) for p in problems)
    assert ("inline.yaml", 1, "listen") in {(p.file, p.line, p.field) for p in problems}
