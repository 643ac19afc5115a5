"""YAML loading that remembers where every key and value came from.

Spec errors must name the file, line and column of the offending key or value. PyYAML's
composer keeps a mark on every node; :func:`load_with_positions` builds the plain Python
data as usual and, beside it, an index from *paths* (tuples of mapping keys and list
indices, the same shape as a pydantic error's ``loc``) to positions.

The loader refuses, while composing and before anything is built, what would take minutes and
gigabytes to build: aliases that expand the document by more than :data:`MAX_ALIAS_NODES`
nodes (an "anchor bomb": a 1 KB file of nested anchors can expand to 10^9 values), an alias to
the collection that contains it, and nesting deeper than :data:`MAX_DEPTH`. Text that is not
YAML at all (control characters, e.g. a binary file that happens to decode as UTF-8) is refused
with its line and column.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

Path_ = tuple[Any, ...]

MAX_ALIAS_NODES = 10_000  # nodes that aliases may add to a document, in all (a spec uses a few dozen)
MAX_DEPTH = 200  # nested collections; the composer, the constructor and the index recurse


@dataclass(frozen=True)
class Position:
    """A 1-based line and column in a file."""

    line: int
    column: int

    @classmethod
    def from_mark(cls, mark: yaml.Mark) -> "Position":
        return cls(mark.line + 1, mark.column + 1)


@dataclass
class Located:
    """Where a path's key (None for the document and list items) and value start."""

    key: Position | None
    value: Position


@dataclass
class PositionIndex:
    """Maps data paths to positions; finds the nearest known position for any path."""

    entries: dict[Path_, Located] = field(default_factory=dict)

    def nearest(self, path: Path_) -> tuple[Path_, Located | None]:
        """The longest prefix of ``path`` that the document has, and its position."""
        path = tuple(path)
        for n in range(len(path), -1, -1):
            hit = self.entries.get(path[:n])
            if hit is not None:
                return path[:n], hit
        return (), None


@dataclass
class DuplicateKey:
    path: Path_
    first: Position
    again: Position


class YamlSyntaxError(ValueError):
    """The text is not valid YAML; carries the position of the problem."""

    def __init__(self, message: str, position: Position | None):
        super().__init__(message)
        self.position = position


def _scalar_key(node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return node.value
    return f"<{node.id}>"


def _index(node: yaml.Node, path: Path_, index: PositionIndex, dups: list[DuplicateKey]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, Position] = {}
        for key_node, value_node in node.value:
            key = _scalar_key(key_node)
            key_pos = Position.from_mark(key_node.start_mark)
            if key == "<<" and key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key in seen:
                dups.append(DuplicateKey(path + (key,), seen[key], key_pos))
            seen[key] = key_pos
            child = path + (key,)
            index.entries[child] = Located(key_pos, Position.from_mark(value_node.start_mark))
            _index(value_node, child, index, dups)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            child = path + (i,)
            index.entries[child] = Located(None, Position.from_mark(item.start_mark))
            _index(item, child, index, dups)


def _line_column(text: str, offset: int) -> Position:
    """The 1-based position of character ``offset`` of ``text``."""
    line = text.count("\n", 0, offset) + 1
    return Position(line, offset - (text.rfind("\n", 0, offset) + 1) + 1)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, composing with a count of the nodes each node expands to.

    An alias reuses its anchor's node, so composing stays linear in the text; what explodes is
    building (and indexing) the expanded document. Each node's expanded size is known once it is
    composed, so each alias adds its target's size to a running total, refused past the bound at
    the alias that crosses it.
    """

    def __init__(self, text: str):
        super().__init__(text)
        self._sizes: dict[int, int] = {}  # id(node) -> nodes it expands to (itself included)
        self._aliased = 0  # nodes that aliases have added so far
        self._depth = 0

    def compose_node(self, parent, index):  # noqa: D401 - PyYAML's hook
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None and id(target) not in self._sizes:
                raise yaml.composer.ComposerError(
                    None, None,
                    f"alias *{event.anchor} refers to the collection that contains it (a recursive structure, "
                    "which a spec cannot be); expected an alias to a value defined before it", event.start_mark)
            node = super().compose_node(parent, index)  # an undefined alias raises PyYAML's error
            self._aliased += self._sizes[id(node)]
            if self._aliased > MAX_ALIAS_NODES:
                raise yaml.composer.ComposerError(
                    None, None,
                    f"aliases expand too far: with alias *{event.anchor} the aliases expand the document by more "
                    f"than {MAX_ALIAS_NODES:,} values (an anchor bomb?); expected a few aliases of small values: "
                    "write the values out, or alias fewer nested anchors", event.start_mark)
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"collections nested more than {MAX_DEPTH} deep; expected a spec's few levels "
                "(is this the right file?)", event.start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        size = 1
        if isinstance(node, yaml.SequenceNode):
            size += sum(self._sizes[id(item)] for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            size += sum(self._sizes[id(k)] + self._sizes[id(v)] for k, v in node.value)
        self._sizes[id(node)] = size
        return node


# YAML 1.2 exponents (1e-4, 1.0e300, 5E3): PyYAML follows YAML 1.1, whose floats need a dot and a
# signed exponent, and reads the rest as strings; a spec's numbers are never strings
# (base.reject_bool_numbers refuses a quoted "0.5").
_BoundedLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def load_with_positions(text: str, filename: str = "<spec>") -> tuple[Any, PositionIndex, list[DuplicateKey]]:
    """Parse YAML ``text``: the data, the position index, and any duplicate keys found.

    Raises :class:`YamlSyntaxError` for invalid YAML, for characters YAML does not allow (not
    YAML text), and for aliases that expand too far (see :class:`_BoundedLoader`).
    """
    try:
        loader = _BoundedLoader(text)  # checks every character: a binary file fails here
    except yaml.reader.ReaderError as exc:
        where = _line_column(text, exc.position) if isinstance(exc.position, int) else None
        character = exc.character if isinstance(exc.character, int) else ord(exc.character or "\0")
        raise YamlSyntaxError(
            f"the file is not UTF-8 YAML text: it has the control character #x{character:04x}, which YAML does "
            "not allow; expected a YAML spec saved as UTF-8 text (is this the right file?)", where) from None
    loader.name = filename
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        context = exc.context or ""
        if context and exc.context_mark is not None and exc.context_mark is not mark:
            start = Position.from_mark(exc.context_mark)
            context += f" that starts at line {start.line}, column {start.column}"
        parts = [p for p in (context, exc.problem) if p]
        raise YamlSyntaxError(": ".join(parts) or "invalid YAML", Position.from_mark(mark) if mark else None) from None
    except yaml.YAMLError as exc:  # pragma: no cover - unmarked errors are rare
        raise YamlSyntaxError(str(exc), None) from None
    finally:
        loader.dispose()
    index = PositionIndex()
    dups: list[DuplicateKey] = []
    if node is not None:
        index.entries[()] = Located(None, Position.from_mark(node.start_mark))
        _index(node, (), index, dups)
    return data, index, dups
