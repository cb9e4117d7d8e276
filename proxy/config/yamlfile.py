"""YAML as a config file is read: safe, bounded (depth, size, alias expansion), duplicate keys
refused, and syntax errors as one line with where they are.
"""

from __future__ import annotations

from typing import Any

import yaml

from proxy.errors import ConfigError

#: Deepest nesting of lists and mappings in a config file.
MAX_DEPTH = 64
#: Most values a config may hold once its aliases are expanded (a bound on alias bombs).
MAX_NODES = 100_000


def _unquoted_in_flow(line: str) -> bool:
    """Whether ``line`` has a ``${`` after an opening ``[`` or ``{`` and outside quotes, where
    YAML reads ``{`` as the start of a mapping."""
    at = line.find("${")
    while at >= 0:
        before = line[:at]
        quoted = before.count('"') % 2 == 1 or before.count("'") % 2 == 1
        if not quoted and ("[" in before or "{" in before):
            return True
        at = line.find("${", at + 2)
    return False


def parse_yaml(text: str, name: str) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        message = f"{where}: YAML syntax error: {exc.problem or exc.context}"
        lines = text.splitlines()
        if mark is not None and mark.line < len(lines) and _unquoted_in_flow(lines[mark.line]):
            message += (
                '; inside [...] or {...} a ${VAR} must be quoted ("${VAR}"), '
                "or write the list one item per line (- ${VAR})"
            )
        raise ConfigError([message]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{name}: YAML error: {exc}"]) from None
    if data is None:
        raise ConfigError([f"{name}: the file is empty; it needs at least backend_provider"])
    if not isinstance(data, dict):
        kind = "list" if isinstance(data, list) else "single value"
        raise ConfigError([f"{name}: the top level must be a mapping of keys, not a {kind}"])
    return data


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with bounds, for files that may be hostile or simply wrong.

    Refuses a key given twice in one mapping (YAML would keep the last), keys that are lists
    or mappings, nesting deeper than :data:`MAX_DEPTH`, a value that contains itself, and more
    than :data:`MAX_NODES` values once aliases are expanded (an alias bomb is small on disk).
    Merge keys (``<<: *base``) work as in YAML 1.1; the mapping's own keys win.
    """

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        # The composer recurses once per level; bound it before Python's own limit.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_DEPTH} levels deep",
                    self.peek_event().start_mark,  # type: ignore[no-untyped-call]
                )
            node: yaml.Node | None = super().compose_node(parent, index)
            return node
        finally:
            self._depth -= 1

    def get_single_node(self) -> yaml.Node | None:
        node: yaml.Node | None = super().get_single_node()
        if node is not None:
            _check_graph(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain value, not a {kind}",
                    key_node.start_mark,
                )
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        self.flatten_mapping(node)
        return super().construct_mapping(node, deep=deep)


def _check_graph(root: yaml.Node) -> None:
    """Refuse a node graph that refers to itself or expands to more than MAX_NODES values.

    Iterative (no recursion), and each node's expanded size is counted once, so the check
    itself stays cheap however many times an alias is used.
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            size = 1 + sum(sizes[id(child)] for child in _children(node))
            if size > MAX_NODES:
                raise yaml.composer.ComposerError(
                    None, None,
                    f"expands to more than {MAX_NODES} values (aliases used too often)",
                    node.start_mark,
                )
            sizes[key] = size
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise yaml.composer.ComposerError(
                None, None, "an alias refers to a value that contains it", node.start_mark
            )
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise yaml.composer.ComposerError(
                    None, None, "an alias refers to a value that contains it", child.start_mark
                )
            if id(child) not in sizes:
                stack.append((child, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []
