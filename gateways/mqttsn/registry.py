"""Topic ids per client (MQTT-SN 1.2 §7.3): registered names both ways, predefined ids, short names (§6.7)."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["TopicRegistry"]


class TopicRegistry:
    """One client's topic-id table, bounded by ``max_topics``; predefined ids are shared and read-only.

    Registered ids start above the highest predefined id, so that an id never means two topics.
    """

    __slots__ = ("_by_id", "_by_name", "_next", "max_topics", "predefined", "predefined_ids")

    def __init__(self, predefined: Mapping[int, str], max_topics: int) -> None:
        self.predefined = predefined
        self.predefined_ids = {name: topic_id for topic_id, name in predefined.items()}
        self.max_topics = max_topics
        self._by_id: dict[int, str] = {}
        self._by_name: dict[str, int] = {}
        self._next = max(predefined, default=0) + 1

    def __len__(self) -> int:
        return len(self._by_id)

    def register(self, name: str) -> int | None:
        """The id for ``name``, registering it if new; None when the table is full."""
        topic_id = self._by_name.get(name)
        if topic_id is not None:
            return topic_id
        if len(self._by_id) >= self.max_topics or self._next > 0xFFFE:
            return None
        topic_id = self._next
        self._next += 1
        self._by_id[topic_id] = name
        self._by_name[name] = topic_id
        return topic_id

    def registered_id(self, name: str) -> int | None:
        return self._by_name.get(name)

    def name_of(self, topic_id: int) -> str | None:
        """The topic a NORMAL id stands for (a predefined id is accepted there too, as paho clients send)."""
        return self._by_id.get(topic_id) or self.predefined.get(topic_id)

    def forget(self, topic_id: int) -> None:
        """Drop a registration the client lost (PUBACK rc 0x02, §6.10), so it is registered again."""
        name = self._by_id.pop(topic_id, None)
        if name is not None:
            del self._by_name[name]

    def clear(self) -> None:
        self._by_id.clear()
        self._by_name.clear()
        self._next = max(self.predefined, default=0) + 1
