"""Topic names, topic filters and the subscription trie (MQTT 5.0 §4.7, §4.8.2).

The trie maps filters to values (subscribers). :meth:`TopicTrie.match` walks it once per topic level, so
the cost of a lookup grows with the topic's depth and the number of matching filters, never with the
number of subscriptions.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = [
    "SharedFilter",
    "TopicTrie",
    "filter_matches",
    "parse_shared",
    "validate_filter",
    "validate_topic",
]

V = TypeVar("V")


def validate_topic(topic: str, max_levels: int = 128) -> str | None:
    """Return why ``topic`` is not a valid topic name for PUBLISH, or None (§4.7.3)."""
    if not topic:
        return "empty topic name"
    if "+" in topic or "#" in topic:
        return "wildcard in a topic name"
    if "\x00" in topic:
        return "U+0000 in a topic name"
    if len(topic.encode()) > 65535:
        return "topic name longer than 65535 bytes"
    if topic.count("/") >= max_levels:
        return f"topic name deeper than {max_levels} levels"
    return None


def validate_filter(topic_filter: str, max_levels: int = 128) -> str | None:
    """Return why ``topic_filter`` is not a valid topic filter, or None (§4.7.1)."""
    if not topic_filter:
        return "empty topic filter"
    if "\x00" in topic_filter:
        return "U+0000 in a topic filter"
    levels = topic_filter.split("/")
    if len(levels) > max_levels:
        return f"topic filter deeper than {max_levels} levels"
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):
            return "'#' must be the whole last level"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


class SharedFilter:
    """A parsed ``$share/{group}/{filter}`` or ``$queue/{filter}`` subscription (§4.8.2)."""

    __slots__ = ("group", "topic_filter")

    def __init__(self, group: str, topic_filter: str) -> None:
        self.group = group
        self.topic_filter = topic_filter


def parse_shared(topic_filter: str) -> SharedFilter | str | None:
    """``SharedFilter`` for a shared subscription, None for an ordinary one, or the reason it is invalid.

    ``$queue/f`` is EMQX's alias of ``$share/$queue/f``.
    """
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) < 3 or not parts[1] or not parts[2]:
            return "a shared subscription needs $share/{group}/{filter}"
        if "+" in parts[1] or "#" in parts[1]:
            return "a share name must not contain wildcards"
        return SharedFilter(parts[1], parts[2])
    if topic_filter.startswith("$queue/"):
        rest = topic_filter[len("$queue/") :]
        return SharedFilter("$queue", rest) if rest else "a $queue subscription needs a filter"
    return None


def filter_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` (one pair; the broker uses the trie instead)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for index, level in enumerate(f_levels):
        if level == "#":
            return True
        if index >= len(t_levels) or (level != "+" and level != t_levels[index]):
            return False
    return len(f_levels) == len(t_levels)


class _Node(Generic[V]):
    __slots__ = ("children", "values")

    def __init__(self) -> None:
        self.children: dict[str, _Node[V]] = {}
        self.values: dict[object, V] = {}


class TopicTrie(Generic[V]):
    """Filters to ``{key: value}`` maps; ``match(topic)`` yields the values of every matching filter."""

    __slots__ = ("_count", "_root")

    def __init__(self) -> None:
        self._root: _Node[V] = _Node()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, topic_filter: str, key: object, value: V) -> bool:
        """Store ``value`` under ``key`` for ``topic_filter``; True when the key was new there."""
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        is_new = key not in node.values
        node.values[key] = value
        self._count += is_new
        return is_new

    def remove(self, topic_filter: str, key: object) -> bool:
        """Remove ``key`` from ``topic_filter``; prunes empty branches. True when it was there."""
        path: list[tuple[_Node[V], str]] = []
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        if key not in node.values:
            return False
        del node.values[key]
        self._count -= 1
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.values or child.children:
                break
            del parent.children[level]
        return True

    def get(self, topic_filter: str) -> dict[object, V]:
        """The values stored exactly under ``topic_filter`` (not a match)."""
        node: _Node[V] | None = self._root
        for level in topic_filter.split("/"):
            node = node.children.get(level) if node is not None else None
        return node.values if node is not None else {}

    def match(self, topic: str) -> list[dict[object, V]]:
        """The value maps of every filter matching ``topic`` ('$' topics skip leading wildcards, §4.7.2)."""
        levels = topic.split("/")
        found: list[dict[object, V]] = []
        last = len(levels)
        stack: list[tuple[_Node[V], int]] = [(self._root, 0)]
        dollar = topic.startswith("$")
        while stack:
            node, depth = stack.pop()
            children = node.children
            if not children:
                continue
            wild_ok = depth or not dollar
            if wild_ok:
                multi = children.get("#")
                if multi is not None and multi.values:
                    found.append(multi.values)
            if depth == last:
                continue
            exact = children.get(levels[depth])
            if exact is not None:
                if depth + 1 == last:
                    if exact.values:
                        found.append(exact.values)
                    # "a/#" also matches "a" (§4.7.1.2)
                    multi = exact.children.get("#")
                    if multi is not None and multi.values:
                        found.append(multi.values)
                else:
                    stack.append((exact, depth + 1))
            if wild_ok:
                single = children.get("+")
                if single is not None:
                    if depth + 1 == last:
                        if single.values:
                            found.append(single.values)
                        multi = single.children.get("#")
                        if multi is not None and multi.values:
                            found.append(multi.values)
                    else:
                        stack.append((single, depth + 1))
        return found

    def items(self) -> Iterator[tuple[str, object, V]]:
        """Every ``(filter, key, value)``, for listings."""
        stack: list[tuple[_Node[V], str]] = [(self._root, "")]
        while stack:
            node, prefix = stack.pop()
            for key, value in node.values.items():
                yield prefix, key, value
            for level, child in node.children.items():
                stack.append((child, f"{prefix}/{level}" if node is not self._root else level))
