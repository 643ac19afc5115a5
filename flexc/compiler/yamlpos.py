"""YAML loading that remembers where every key and value came from.

Spec errors must name the file, line and column of the offending key or value. PyYAML's
composer keeps a mark on every node; :func:`load_with_positions` builds the plain Python
data as usual and, beside it, an index from *paths* (tuples of mapping keys and list
indices, the same shape as a pydantic error's ``loc``) to positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

Path_ = tuple[Any, ...]


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


def load_with_positions(text: str, filename: str = "<spec>") -> tuple[Any, PositionIndex, list[DuplicateKey]]:
    """Parse YAML ``text``: the data, the position index, and any duplicate keys found."""
    loader = yaml.SafeLoader(text)
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
