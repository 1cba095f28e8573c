"""What the shipped Dockerfile says: its instructions and the facts the manifests must match."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.support.processes import ROOT

DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def only(instruction: str, path: Path = DOCKERFILE) -> str:
    """The arguments of the one `instruction` in the file."""
    values = [rest for word, rest in instructions(path) if word == instruction]
    assert len(values) == 1, f"{path.name}: expected one {instruction}, found {values}"
    return values[0]


def dockerfile_facts() -> dict[str, object]:
    """What the manifests must agree with: user, ports, config path, health-check URL."""
    cmd = json.loads(only("CMD"))
    health = only("HEALTHCHECK")
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", health)
    assert url is not None, f"HEALTHCHECK asks no local URL: {health}"
    return {
        "user": int(only("USER")),
        "ports": {int(p) for p in only("EXPOSE").split()},
        "config": cmd[cmd.index("--config") + 1],
        "health_port": int(url.group(1)),
        "health_path": url.group(2),
    }
