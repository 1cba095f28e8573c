"""Every code block in README.md and docs/ that is meant to run is checked.

- ```yaml: a complete config must pass `parse_config` (with its TLS files created);
  `<!-- fragment -->` must parse as YAML, and when its keys are config keys, the fragment
  laid over a minimal config must pass too; `<!-- invalid -->` must fail, with exactly the
  problems of the ```text block that follows it.
- ```json must parse. ```python must say how it is run (test_embedding_example.py runs it).
- ```sh/```bash: every command exists (the project's own console scripts are parsed with the
  CLI's own parser), and every repository path named exists.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from tests.docs.blocks import ROOT, Block, all_blocks, code_blocks, doc_files, write_tls_files
from upgradeproxy import cli
from upgradeproxy.config.loader import _TOP_KEYS, ConfigError, parse_config

YAML = all_blocks("yaml")
SH = all_blocks("sh", "bash")
MARKERS = {"fragment", "invalid", "run: embedding"}
MINIMAL = {
    "listen": [{"address": "127.0.0.1:8080"}],
    "upstreams": {"chat": {"servers": ["127.0.0.1:9000"]}},
    "routes": [{"upstream": "chat"}],
}
# Commands the docs give for other machines (a container host, a cluster, a remote host).
ELSEWHERE = {"docker", "kubectl", "systemctl", "scp", "ssh"}
# Paths that a documented command creates or that belong to the reader, not the repository.
REPO_DIRS = ("deploy/", "tests/", "config/", "docs/", "upgradeproxy/")


def _ids(blocks: list[Block]) -> list[str]:
    return [b.where for b in blocks]


def test_the_checks_find_the_blocks() -> None:
    """A sanity floor: the README's config and commands are among the blocks checked."""
    readme = code_blocks(ROOT / "README.md")
    assert {b.lang for b in readme} >= {"yaml", "sh", "python"}
    reference = code_blocks(ROOT / "docs" / "configuration.md")
    assert any(b.lang == "yaml" and b.marker is None for b in reference)  # the full example
    assert any(b.marker == "invalid" for b in YAML)


@pytest.mark.parametrize("block", YAML, ids=_ids(YAML))
def test_yaml_block(block: Block, tmp_path: Path, ca: trustme.CA) -> None:
    assert block.marker in (None, "fragment", "invalid"), f"{block.where}: unknown marker"
    if block.marker == "fragment":
        _check_fragment(block, tmp_path, ca)
    elif block.marker == "invalid":
        _check_invalid(block)
    else:
        write_tls_files(block.text, tmp_path, ca)
        try:
            parse_config(block.text, block.where, base_dir=str(tmp_path))
        except ConfigError as err:
            pytest.fail(f"{block.where} is not a valid config (mark it <!-- fragment -->?):\n{err}")


def _check_fragment(block: Block, tmp_path: Path, ca: trustme.CA) -> None:
    fragment = yaml.safe_load(block.text)
    if not isinstance(fragment, dict) or not set(fragment) <= set(_TOP_KEYS):
        return  # another program's YAML (a Prometheus job, a manifest): parsing is the check
    text = yaml.safe_dump({**MINIMAL, **fragment}, sort_keys=False)
    write_tls_files(text, tmp_path, ca)
    try:
        parse_config(text, block.where, base_dir=str(tmp_path))
    except ConfigError as err:
        pytest.fail(f"{block.where}: this fragment over a minimal config is invalid:\n{err}")


def _check_invalid(block: Block) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(block.text, "proxy.yaml")
    blocks = code_blocks(block.path)
    after = [b for b in blocks if b.line > block.line]
    if after and after[0].lang == "text":
        shown = after[0].text.splitlines()
        assert shown == [str(p) for p in caught.value.problems], f"{after[0].where} is stale"


@pytest.mark.parametrize("block", all_blocks("json"), ids=_ids(all_blocks("json")))
def test_json_block(block: Block) -> None:
    json.loads(block.text)


def test_every_python_block_is_run() -> None:
    unmarked = [b.where for b in all_blocks("python") if b.marker != "run: embedding"]
    assert not unmarked, "python blocks no test runs (mark them and run them)"


def test_markers_are_known() -> None:
    blocks = [b for path in doc_files() for b in code_blocks(path)]
    unknown = [(b.where, b.marker) for b in blocks if b.marker and b.marker not in MARKERS]
    assert not unknown


@pytest.mark.parametrize("block", SH, ids=_ids(SH))
def test_shell_block_names_what_exists(block: Block) -> None:
    for command in _commands(block.text):
        _check_command(block, command)


def _commands(text: str) -> list[list[str]]:
    """Each simple command of a shell block, as words (comments and operators removed)."""
    joined = text.replace("\\\n", " ")
    commands: list[list[str]] = []
    for line in joined.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        for word in lexer:
            if word in ("&&", "||", ";", "|", "&"):
                commands.append(current)
                current = []
            else:
                current.append(word)
        commands.append(current)
    return [c for c in commands if c]


def _check_command(block: Block, words: list[str]) -> None:
    while words and (("=" in words[0] and not words[0].startswith("-")) or words[0] == "sudo"):
        words = words[1:]  # VAR=value prefixes and sudo
    name, args = Path(words[0]).name, words[1:]
    where = f"{block.where}: {shlex.join(words)}"
    if name == "upgradeproxy":
        _check_cli(args, where)
    elif name in ("bash", "python", "python3") and args and not args[0].startswith("-"):
        assert (ROOT / args[0]).is_file(), f"{where}: no such script {args[0]}"
    elif name not in ELSEWHERE:
        found = shutil.which(name) or (Path(sys.executable).parent / name).exists()
        assert found, f"{where}: no command {name!r} here"
    for arg in args:
        if arg.startswith(REPO_DIRS):
            assert list(ROOT.glob(arg.rstrip("/"))), f"{where}: no such path {arg}"


def _check_cli(args: list[str], where: str) -> None:
    """The CLI's own parser accepts `args` (`--version` and `--help` exit 0)."""
    code: int | str | None = 0
    try:
        cli._parser().parse_args(args)
    except SystemExit as exit_:
        code = exit_.code
    assert code == 0, f"{where}: the CLI rejects these arguments"


@pytest.fixture(scope="module")
def ca() -> Any:
    return trustme.CA()
