"""Retained messages (MQTT 5.0 §3.3.1.3) in a topic tree: a filter finds its matches by walking it."""

from __future__ import annotations

from core.broker.types import Message

__all__ = ["RetainStore"]


class _Level:
    __slots__ = ("children", "message")

    def __init__(self) -> None:
        self.children: dict[str, _Level] = {}
        self.message: Message | None = None


class RetainStore:
    """At most ``max_messages`` retained messages (0 = no bound); an empty payload deletes."""

    __slots__ = ("_count", "_root", "max_messages")

    def __init__(self, max_messages: int = 0) -> None:
        self._root = _Level()
        self._count = 0
        self.max_messages = max_messages

    def __len__(self) -> int:
        return self._count

    def store(self, message: Message) -> bool:
        """Keep ``message`` as the topic's retained message, or delete it if the payload is empty.
        False when the store is full and the topic is new."""
        if not message.payload:
            self.delete(message.topic)
            return True
        node = self._root
        path = message.topic.split("/")
        for level in path:
            child = node.children.get(level)
            if child is None:
                if self.max_messages and self._count >= self.max_messages:
                    return False
                child = node.children[level] = _Level()
            node = child
        if node.message is None:
            if self.max_messages and self._count >= self.max_messages:
                return False
            self._count += 1
        node.message = message
        return True

    def delete(self, topic: str) -> bool:
        trail: list[tuple[_Level, str]] = []
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                return False
            trail.append((node, level))
            node = child
        if node.message is None:
            return False
        node.message = None
        self._count -= 1
        for parent, level in reversed(trail):
            child = parent.children[level]
            if child.message is not None or child.children:
                break
            del parent.children[level]
        return True

    def get(self, topic: str) -> Message | None:
        node: _Level | None = self._root
        for level in topic.split("/"):
            node = node.children.get(level) if node is not None else None
        return node.message if node is not None else None

    def match(self, topic_filter: str, now: float) -> list[Message]:
        """Retained messages whose topic matches ``topic_filter``; expired ones are removed (§3.3.2.3.3)."""
        levels = topic_filter.split("/")
        found: list[Message] = []
        stack: list[tuple[_Level, int]] = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            if depth == len(levels):
                if node.message is not None:
                    found.append(node.message)
                continue
            level = levels[depth]
            if level == "#":
                self._collect(node, found, skip_dollar=depth == 0)
            elif level == "+":
                for name, child in node.children.items():
                    if not (depth == 0 and name.startswith("$")):
                        stack.append((child, depth + 1))
            else:
                exact = node.children.get(level)
                if exact is not None:
                    stack.append((exact, depth + 1))
        expired = [m for m in found if m.expires_at is not None and m.expires_at <= now]
        for message in expired:
            self.delete(message.topic)
        return [m for m in found if m.expires_at is None or m.expires_at > now] if expired else found

    def all(self) -> list[Message]:
        found: list[Message] = []
        self._collect(self._root, found, skip_dollar=False)
        return found

    @staticmethod
    def _collect(start: _Level, found: list[Message], *, skip_dollar: bool) -> None:
        """``#`` matches the parent level too (§4.7.1.2)."""
        if start.message is not None:
            found.append(start.message)
        stack = [
            child for name, child in start.children.items() if not (skip_dollar and name.startswith("$"))
        ]
        while stack:
            node = stack.pop()
            if node.message is not None:
                found.append(node.message)
            stack.extend(node.children.values())
