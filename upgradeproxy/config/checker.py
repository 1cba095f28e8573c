"""Reading YAML nodes with their lines: the `Checker` every config section is read with.

Each reader returns None for an absent or bad value and records a `ConfigProblem` naming the
file, the line, the field and why, so one pass reports every problem at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from upgradeproxy.config import values
from upgradeproxy.config.model import Address
from upgradeproxy.config.values import parse_address

T = TypeVar("T")

STR, INT, FLOAT, BOOL = (f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool"))
_CONSTRUCTOR = SafeConstructor()


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with a config file; `line` is 1-based, None when no line applies."""

    file: str
    line: int | None
    field: str
    why: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.why}" if self.field else f"{where}: {self.why}"


class ConfigError(Exception):
    """A config that failed validation; `problems` holds every problem found."""

    def __init__(self, problems: Iterable[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def join(field: str, key: str) -> str:
    return f"{field}.{key}" if field else key


def scalar_value(node: ScalarNode) -> object:
    build = SafeConstructor.yaml_constructors.get(node.tag)
    try:
        return build(_CONSTRUCTOR, node) if build else node.value
    except yaml.YAMLError:
        return node.value


def describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping" if node.value else "an empty mapping"
    if isinstance(node, SequenceNode):
        return "a list" if node.value else "an empty list"
    if node.tag.startswith("!"):
        return f"a value tagged {node.tag}"
    return values.show(scalar_value(node)) if isinstance(node, ScalarNode) else "an unknown node"


class Checker:
    """Collects problems while reading nodes; readers return None for absent or bad values."""

    def __init__(self, source: str, base_dir: str) -> None:
        self.source = source
        self.base_dir = base_dir
        self.problems: list[ConfigProblem] = []
        self.warnings: list[ConfigProblem] = []  # reported, but the config still loads
        self.listener_addresses: list[Address] = []  # also of listeners with problems

    def warn(self, node: Node | None, field: str, why: str) -> None:
        line = None if node is None else node.start_mark.line + 1
        self.warnings.append(ConfigProblem(self.source, line, field, f"warning: {why}"))

    def report(self, node: Node | None, field: str, why: str) -> None:
        line = None if node is None else node.start_mark.line + 1
        self.problems.append(ConfigProblem(self.source, line, field, why))

    def compose(self, text: str) -> Node | None:
        try:
            root: Node | None = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f" at column {mark.column + 1}" if mark else ""
            context = f" ({exc.context})" if exc.context else ""
            line = None if mark is None else mark.line + 1
            why = f"invalid YAML: {exc.problem}{where}{context}"
            self.problems.append(ConfigProblem(self.source, line, "", why))
            return None
        except yaml.YAMLError as exc:  # Reader errors (bad characters) carry no line mark.
            why = "invalid YAML: " + " ".join(str(exc).split())  # One problem, one line.
            self.problems.append(ConfigProblem(self.source, None, "", why))
            return None
        if root is None:
            why = "the file is empty; expected at least 'listen', 'upstreams' and 'routes'"
            self.problems.append(ConfigProblem(self.source, None, "", why))
        return root

    def entries(self, node: Node | None, field: str, what: str) -> list[tuple[str, Node, Node]]:
        """String-keyed pairs of a mapping; reports non-mappings, odd keys and duplicates."""
        if node is not None and not isinstance(node, MappingNode):
            self.report(node, field, f"expected {what}, found {describe(node)}")
        if not isinstance(node, MappingNode):
            return []
        seen: dict[str, Node] = {}
        pairs: list[tuple[str, Node, Node]] = []
        for key_node, value_node in node.value:
            if not (isinstance(key_node, ScalarNode) and key_node.tag == STR):
                why = f"expected a name as key, found {describe(key_node)} (quote it)"
                self.report(key_node, field, why)
            elif (key := str(key_node.value)) in seen:
                # YAML itself would silently keep only the last one.
                first = seen[key].start_mark.line + 1
                self.report(key_node, join(field, key), f"duplicate key (first at line {first})")
            else:
                seen[key] = key_node
                pairs.append((key, key_node, value_node))
        return pairs

    def mapping(
        self, node: Node | None, field: str, allowed: Sequence[str],
        required: Sequence[str] = (), what: str = "a mapping",
    ) -> dict[str, Node] | None:  # fmt: skip
        """The known keys of a mapping; reports unknown keys and missing required ones."""
        pairs = self.entries(node, field, what)
        if not isinstance(node, MappingNode):
            return None
        found: dict[str, Node] = {}
        for key, key_node, value_node in pairs:
            if key in allowed:
                found[key] = value_node
            else:
                why = f"unknown key {key!r}{values.suggest(key, allowed)}"
                self.report(key_node, join(field, key), why)
        for key in required:
            if key not in found:
                # A missing top-level key has no line worth pointing at.
                self.report(node if field else None, join(field, key), "required but missing")
        return found

    def sequence(self, node: Node | None, field: str, what: str) -> list[Node] | None:
        if node is None or isinstance(node, SequenceNode):
            return None if node is None else list(node.value)
        self.report(node, field, f"expected {what}, found {describe(node)}")
        return None

    def scalar(
        self, node: Node | None, field: str, what: str, tags: Sequence[str],
        convert: Callable[[object], T],
    ) -> T | None:  # fmt: skip
        """`convert` applied to a scalar with one of `tags`; its ValueError becomes the why."""
        if node is None:
            return None
        if isinstance(node, ScalarNode) and node.tag in tags:
            try:
                return convert(scalar_value(node))
            except ValueError as exc:
                why = str(exc)
        else:
            why = f"expected {what}, found {describe(node)}"
        self.report(node, field, why)
        return None

    def text(self, node: Node | None, field: str, what: str) -> str | None:
        return self.scalar(node, field, what, (STR,), str)

    def boolean(self, node: Node | None, field: str, default: bool) -> bool:
        value = self.scalar(node, field, "true or false", (BOOL,), bool)
        return default if value is None else value

    def positive_int(self, node: Node | None, field: str) -> int | None:
        return self.scalar(node, field, "a positive whole number", (INT,), values.positive)

    def timeout(self, node: Node | None, field: str) -> float | None:
        return self.scalar(node, field, values.DURATION_HINT, (INT, FLOAT, STR), values.timeout)

    def duration(self, node: Node | None, field: str) -> float | None:
        """A `timeouts.*` value: above zero, except the delays where 0 means none."""
        convert = values.parse_duration if field in values.ZERO_ALLOWED else values.timeout
        return self.scalar(node, field, values.DURATION_HINT, (INT, FLOAT, STR), convert)

    def address(self, node: Node | None, field: str, *, listener: bool = False) -> Address | None:
        parse = parse_address if listener else values.upstream_address
        return self.scalar(node, field, values.ADDRESS_HINT, (STR,), lambda v: parse(str(v)))

    def file(self, node: Node | None, field: str) -> str | None:
        return self.scalar(node, field, "a file path", (STR,), self._readable_file)

    def _readable_file(self, value: object) -> str:
        path = os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(str(value))))
        if not value:
            raise ValueError("expected a file path, found an empty string")
        if not os.path.isfile(path):
            raise ValueError(
                f"not a file: {path}" if os.path.exists(path) else f"no such file: {path}"
            )
        if not os.access(path, os.R_OK):
            raise ValueError(f"file is not readable: {path}")
        return path
