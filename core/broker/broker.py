"""The embedded broker: sessions by client id, routing through the topic trie, retained messages, wills,
shared subscriptions and $SYS (MQTT 5.0 §4).

Everything here is synchronous and pure: callers pass ``now`` (monotonic seconds) and the adapter calls
:meth:`Broker.handle_timeouts` periodically for will delays and session expiry. The publish path is a few
dict lookups per subscriber and no task or future (DESIGN §6).
"""

from __future__ import annotations

import logging
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from core import __version__
from core.auth.access import AccessControl
from core.broker.metrics import BrokerMetrics
from core.broker.retain import RetainStore
from core.broker.session import NEVER_EXPIRES, Session
from core.broker.types import ClientInfo, DeliverySink, Message, Subscription, Will
from core.config import BrokerConfig
from core.logging import client_fields
from core.mqtt.numbers import ReasonCode
from core.topics import SharedFilter, TopicTrie, parse_shared, validate_filter

__all__ = ["Broker", "SharedGroup"]

log = logging.getLogger("mqgate.broker")

_ROUTE_CACHE_MAX = 65536
_NO_ROUTE: tuple[list[dict[object, tuple[Session, Subscription]]], list[dict[object, SharedGroup]]] = ([], [])


@dataclass(slots=True, eq=False)
class SharedGroup:
    """The members of one ``$share/{group}/{filter}`` and the dispatch state of its strategy (§4.8.2)."""

    name: str
    topic_filter: str
    members: dict[str, tuple[Session, Subscription]] = field(default_factory=dict)
    next_index: int = 0
    sticky: str | None = None


Route = tuple[list[dict[object, tuple[Session, Subscription]]], list[dict[object, SharedGroup]]]


class Broker:
    """The core broker. ``node_name`` names it in $SYS topics."""

    def __init__(
        self,
        config: BrokerConfig,
        *,
        rng: random.Random | None = None,
        node_name: str = "mqgate@localhost",
        started_at: float = 0.0,
        access: AccessControl | None = None,
    ) -> None:
        self.config = config
        self.access = access if access is not None else AccessControl()
        self.rng = rng or random.Random()
        self.node_name = node_name
        self.started_at = started_at
        self.metrics = BrokerMetrics()
        self.sessions: dict[str, Session] = {}
        self.retained = RetainStore(config.max_retained_messages)
        self._subs: TopicTrie[tuple[Session, Subscription]] = TopicTrie()
        self._shared: TopicTrie[SharedGroup] = TopicTrie()
        self._routes: dict[str, Route] = {}
        self._expiring: set[str] = set()
        self._pick: Callable[[SharedGroup, Message], tuple[Session, Subscription]] = getattr(
            self, "_pick_" + config.shared_subscription_strategy
        )

    # --- sessions

    def open_session(
        self,
        client: ClientInfo,
        *,
        clean_start: bool,
        expiry: int,
        will: Will | None,
        sink: DeliverySink,
        max_inflight: int,
        now: float,
    ) -> tuple[Session, bool]:
        """Attach ``sink`` to the session of ``client.client_id``; returns it and whether it was present.

        A session already attached to another connection is taken over (§3.1.4): that connection is
        kicked with 0x8E and its will published unless delayed and the session continues.
        """
        client_id = client.client_id
        session = self.sessions.get(client_id)
        if session is not None and session.sink is not None:
            old_sink = session.sink
            self.metrics.sessions_taken_over += 1
            log.info(
                "client %s (%s) takes over the session from another connection",
                client_id,
                client.peer,
                extra=client_fields(client_id, client.peer, client.protocol),
            )
            # Clean Start 1 ends the session, so a delayed will is due now (§3.1.3.2).
            self.connection_lost(session, publish_will=True, now=now, takeover=not clean_start)
            old_sink.kick(ReasonCode.SESSION_TAKEN_OVER)
            session = self.sessions.get(client_id)
        present = session is not None and not clean_start
        if session is not None and clean_start:
            self._end_session(session, now)
            session = None
        if session is None:
            session = Session(
                client,
                max_inflight=max_inflight,
                max_queue=self.config.max_mqueue_len,
                queue_qos0=self.config.mqueue_store_qos0,
                metrics=self.metrics,
            )
            self.sessions[client_id] = session
        else:
            session.client = client
        self._expiring.discard(client_id)
        session.expiry_interval = min(expiry, self.config.max_session_expiry)
        session.will = will
        session.attach(sink, max_inflight, now)
        self.metrics.connections_total += 1
        return session, present

    def connection_lost(
        self, session: Session, *, publish_will: bool, now: float, takeover: bool = False
    ) -> None:
        """The connection of ``session`` ended; ``publish_will`` unless it sent DISCONNECT 0x00 (§3.1.2.5)."""
        if self.sessions.get(session.client_id) is not session:
            return
        session.detach()
        for group, message in session.take_shared_unacked():
            self._redispatch(group, message, session, now)
        will = session.will
        if will is not None:
            if not publish_will:
                session.will = None
            elif will.delay and session.expiry_interval and not takeover:
                session.will_at = now + min(will.delay, session.expiry_interval)
                self._expiring.add(session.client_id)
            elif will.delay and takeover:
                session.will = None  # the session continues within the will delay: no will (§3.1.3.2)
            else:
                self._publish_will(session, now)
        if session.expiry_interval == 0:
            if not takeover:
                self._end_session(session, now)
        elif session.expiry_interval != NEVER_EXPIRES:
            session.expires_at = now + session.expiry_interval
            self._expiring.add(session.client_id)

    def _publish_will(self, session: Session, now: float) -> None:
        will = session.will
        session.will = None
        session.will_at = None
        if will is None:
            return
        topic, allowed = self.access.check_publish(session.client, will.topic)
        if not allowed:
            self.access.stats.wills_denied += 1
            log.info(
                "the will of %s to %s is not authorised, dropped",
                session.client_id,
                will.topic,
                extra=client_fields(session.client_id, session.client.peer, session.client.protocol),
            )
            return
        metrics = self.metrics
        metrics.wills_published += 1
        metrics.messages_published += 1
        log.info(
            "publishing the will of %s to %s",
            session.client_id,
            topic,
            extra=client_fields(session.client_id, session.client.peer, session.client.protocol),
        )
        expiry = will.properties.message_expiry_interval
        message = Message(
            topic,
            will.payload,
            will.qos,
            will.retain,
            session.client_id,
            will.properties,
            now + expiry if expiry else None,
        )
        if not self._fan_out(message):
            metrics.dropped_no_subscribers += 1

    def _end_session(self, session: Session, now: float) -> None:
        if session.will is not None and session.will_at is not None:
            self._publish_will(session, now)
        for topic_filter in list(session.subscriptions):
            self._remove_subscription(session, topic_filter)
        if session.sink is None:
            for group, message in session.take_shared_unacked():
                self._redispatch(group, message, session, now)
        self._expiring.discard(session.client_id)
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
            self.access.client_gone(session.client)

    def discard_session(self, client_id: str, now: float) -> bool:
        """End a session administratively (its connection, if any, is kicked with 0x98)."""
        session = self.sessions.get(client_id)
        if session is None:
            return False
        if session.sink is not None:
            sink = session.sink
            self.connection_lost(session, publish_will=True, now=now)
            sink.kick(ReasonCode.ADMINISTRATIVE_ACTION)
        if client_id in self.sessions:
            self._end_session(session, now)
        return True

    def handle_timeouts(self, now: float) -> None:
        """Publish wills whose delay passed and end sessions whose expiry passed (§3.1.2.11, §3.1.3.2)."""
        for client_id in list(self._expiring):
            session = self.sessions.get(client_id)
            if session is None or session.sink is not None:
                self._expiring.discard(client_id)
                continue
            if session.will_at is not None and session.will_at <= now:
                self._publish_will(session, now)
            if session.expires_at is not None and session.expires_at <= now:
                log.info(
                    "session of %s expired",
                    client_id,
                    extra=client_fields(session.client_id, session.client.peer, session.client.protocol),
                )
                self._end_session(session, now)
            elif session.will_at is None and session.expires_at is None:
                self._expiring.discard(client_id)

    def shutdown(self, now: float) -> None:
        """Publish every will still waiting for its delay: the process is going away."""
        for client_id in list(self._expiring):
            session = self.sessions.get(client_id)
            if session is not None and session.will_at is not None:
                self._publish_will(session, now)

    # --- subscriptions

    def check_filter(self, topic_filter: str) -> int:
        """The SUBACK reason code for a filter that cannot be subscribed, or 0 (§3.9.3)."""
        shared = parse_shared(topic_filter)
        if isinstance(shared, str):
            return ReasonCode.TOPIC_FILTER_INVALID
        if isinstance(shared, SharedFilter):
            if not self.config.shared_subscription:
                return ReasonCode.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED
            topic_filter = shared.topic_filter
        if validate_filter(topic_filter, self.config.max_topic_levels) is not None:
            return ReasonCode.TOPIC_FILTER_INVALID
        if not self.config.wildcard_subscription and ("+" in topic_filter or "#" in topic_filter):
            return ReasonCode.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED
        return 0

    def subscribe(self, session: Session, sub: Subscription, now: float) -> tuple[int, list[Message]]:
        """Add or replace a subscription. Returns the granted QoS or a reason code >= 0x80 (§3.8.4), and the
        retained messages to deliver by its retain handling; the caller delivers them after its SUBACK."""
        code = self.check_filter(sub.topic_filter)
        if code:
            return code, []
        topic_filter, allowed = self.access.check_subscribe(session.client, sub.topic_filter)
        if not allowed:
            log.debug(
                "client %s may not subscribe to %s",
                session.client_id,
                topic_filter,
                extra=client_fields(session.client_id, session.client.peer, session.client.protocol),
            )
            return ReasonCode.NOT_AUTHORIZED, []
        if topic_filter != sub.topic_filter:
            code = self.check_filter(topic_filter)
            if code:
                return code, []
            sub = replace(sub, topic_filter=topic_filter)
        shared = parse_shared(sub.topic_filter)
        existed = sub.topic_filter in session.subscriptions
        if isinstance(shared, SharedFilter):
            sub = Subscription(
                sub.topic_filter,
                sub.qos,
                sub.no_local,
                sub.retain_as_published,
                sub.retain_handling,
                sub.subscription_id,
                shared.group,
            )
            key = (shared.group, shared.topic_filter)
            groups = self._shared.get(shared.topic_filter)
            group = groups.get(key)
            if group is None:
                group = SharedGroup(shared.group, shared.topic_filter)
                self._shared.add(shared.topic_filter, key, group)
            if not group.members:
                group.next_index = self.rng.randrange(1 << 30)
            group.members[session.client_id] = (session, sub)
        else:
            self._subs.add(sub.topic_filter, session.client_id, (session, sub))
        session.subscriptions[sub.topic_filter] = sub
        self._routes.clear()
        if shared is None and (sub.retain_handling == 0 or (sub.retain_handling == 1 and not existed)):
            return sub.qos, self.retained.match(sub.topic_filter, now)
        return sub.qos, []

    def unsubscribe(self, session: Session, topic_filter: str) -> bool:
        """Remove a subscription; False when there was none (v5 UNSUBACK 0x11)."""
        topic_filter = self.access.rewrite_filter(topic_filter)
        if topic_filter not in session.subscriptions:
            return False
        self._remove_subscription(session, topic_filter)
        return True

    def _remove_subscription(self, session: Session, topic_filter: str) -> None:
        sub = session.subscriptions.pop(topic_filter)
        self._routes.clear()
        shared = parse_shared(topic_filter)
        if isinstance(shared, SharedFilter):
            key = (shared.group, shared.topic_filter)
            group = self._shared.get(shared.topic_filter).get(key)
            if group is not None:
                group.members.pop(session.client_id, None)
                if group.sticky == session.client_id:
                    group.sticky = None
                if not group.members:
                    self._shared.remove(shared.topic_filter, key)
        else:
            self._subs.remove(sub.topic_filter, session.client_id)

    def subscription_count(self) -> int:
        return sum(len(s.subscriptions) for s in self.sessions.values())

    # --- publishing

    def publish(self, message: Message, now: float) -> int:
        """Route ``message`` to every matching subscription; returns how many matched.

        A message of a client (its ``sender`` has a session) is counted by the client's protocol and its
        QoS; one of mqgate itself (the API, alarms) only as published.
        """
        metrics = self.metrics
        origin = self.sessions.get(message.sender)
        if origin is not None:
            origin.count_received(message)
        metrics.messages_published += 1
        count = self._fan_out(message)
        if not count:
            metrics.dropped_no_subscribers += 1
        return count

    def _fan_out(self, message: Message) -> int:
        """Store a retained message and deliver to every matching subscription; returns how many matched."""
        if message.retain and not self.retained.store(message):
            self.metrics.retained_rejected_full += 1
        topic = message.topic
        route = self._routes.get(topic)
        if route is None:
            route = self._route(topic)
        normal, shared = route
        count = 0
        for subscribers in normal:
            for session, sub in subscribers.values():
                if sub.no_local and session.client.client_id == message.sender:
                    continue
                session.deliver(message, sub)
                count += 1
        for groups in shared:
            for group in groups.values():
                if group.members:
                    session, sub = self._pick(group, message)
                    session.deliver(message, sub, group)
                    count += 1
        return count

    def _route(self, topic: str) -> Route:
        normal = self._subs.match(topic)
        shared = self._shared.match(topic) if len(self._shared) else []
        route: Route = (normal, shared) if normal or shared else _NO_ROUTE
        if len(self._routes) >= _ROUTE_CACHE_MAX:
            self._routes.clear()
        self._routes[topic] = route
        return route

    def _redispatch(self, group: object, message: Message, lost: Session, now: float) -> None:
        """A shared-subscription message its member did not acknowledge goes to another member (§4.8.2)."""
        assert isinstance(group, SharedGroup)
        others = {cid: m for cid, m in group.members.items() if m[0] is not lost}
        if not others:
            return
        online = [m for m in others.values() if m[0].online]
        session, sub = self.rng.choice(online or list(others.values()))
        session.deliver(message, sub, group)

    # Shared-subscription strategies (EMQX: random, round_robin, sticky, hash_clientid, hash_topic).
    # Members that are online are preferred; an all-offline group queues to one of its sessions.

    @staticmethod
    def _candidates(group: SharedGroup) -> list[tuple[Session, Subscription]]:
        members = list(group.members.values())
        online = [m for m in members if m[0].online]
        return online or members

    def _pick_random(self, group: SharedGroup, message: Message) -> tuple[Session, Subscription]:
        return self.rng.choice(self._candidates(group))

    def _pick_round_robin(self, group: SharedGroup, message: Message) -> tuple[Session, Subscription]:
        candidates = self._candidates(group)
        group.next_index += 1
        return candidates[group.next_index % len(candidates)]

    def _pick_sticky(self, group: SharedGroup, message: Message) -> tuple[Session, Subscription]:
        if group.sticky is not None:
            member = group.members.get(group.sticky)
            if member is not None and member[0].online:
                return member
        member = self.rng.choice(self._candidates(group))
        group.sticky = member[0].client_id
        return member

    def _pick_hash_clientid(self, group: SharedGroup, message: Message) -> tuple[Session, Subscription]:
        candidates = self._candidates(group)
        return candidates[zlib.crc32(message.sender.encode()) % len(candidates)]

    def _pick_hash_topic(self, group: SharedGroup, message: Message) -> tuple[Session, Subscription]:
        candidates = self._candidates(group)
        return candidates[zlib.crc32(message.topic.encode()) % len(candidates)]

    # --- $SYS

    def publish_sys(self, now: float) -> None:
        """Publish the $SYS/brokers/{node}/... topics (retained, like mosquitto's $SYS tree), with message
        totals per protocol under ``messages/{received,sent,redelivered}/{protocol}``. They are not counted
        as published or dropped messages: the figures they carry stay what the clients did."""
        m = self.metrics
        sessions = self.sessions.values()
        connected = sum(1 for s in sessions if s.sink is not None)
        base = f"$SYS/brokers/{self.node_name}/"
        values = {
            "version": f"mqgate {__version__}",
            "uptime": str(int(now - self.started_at)),
            "clients/connected": str(connected),
            "clients/asleep": str(sum(1 for s in sessions if s.sink is not None and s.parked)),
            "clients/total": str(len(self.sessions)),
            "clients/disconnected": str(len(self.sessions) - connected),
            "subscriptions/count": str(self.subscription_count()),
            "retained/count": str(len(self.retained)),
            "messages/received": str(m.messages_received),
            "messages/sent": str(m.messages_sent),
            "messages/dropped": str(m.messages_dropped),
            "messages/queued": str(sum(len(s.queue) for s in sessions)),
            "bytes/received": str(m.bytes_received),
            "bytes/sent": str(m.bytes_sent),
            "packets/received": str(m.packets_received),
            "packets/sent": str(m.packets_sent),
        }
        for direction, table in (("received", m.received), ("sent", m.sent), ("redelivered", m.redelivered)):
            for protocol, total in m.by_protocol(table).items():
                values[f"messages/{direction}/{protocol}"] = str(total)
        for name, value in values.items():
            self._fan_out(Message(base + name, value.encode(), 0, True, ""))
