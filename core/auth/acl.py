"""Topic authorisation: EMQX-style rules from the config, mosquitto ``acl_file`` entries, topic rewrite.

Pure: a client (user name, client id, peer host), an action (``publish`` or ``subscribe``) and a topic or
filter in; allow, deny or no decision out.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from core.config import AclRuleConfig, RewriteRuleConfig
from core.errors import ConfigError
from core.topics import filter_matches, parse_shared

__all__ = [
    "PUBLISH",
    "SUBSCRIBE",
    "AclFile",
    "AclRule",
    "Rewriter",
    "Who",
    "covers",
    "load_acl_file",
    "parse_acl_file",
    "rules_from_config",
    "topic_applies",
]

PUBLISH = "publish"
SUBSCRIBE = "subscribe"
_IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Who:
    """The identity an ACL decision is about."""

    client_id: str
    username: str | None
    host: str


def covers(acl_filter: str, requested: str, action: str) -> bool:
    """Whether a rule's filter applies: a published topic matches it, or a subscription filter lies inside it
    (``+`` in the subscription only under ``+`` or ``#`` of the rule, ``#`` only under ``#``)."""
    if action == PUBLISH:
        return filter_matches(acl_filter, requested)
    if requested.startswith("$") and acl_filter[:1] in ("+", "#"):
        return False
    rule = acl_filter.split("/")
    sub = requested.split("/")
    for index, level in enumerate(rule):
        if level == "#":
            return True
        if index >= len(sub):
            return False
        wanted = sub[index]
        if level == "+":
            if wanted == "#":
                return False
        elif level != wanted:
            return False
    return len(rule) == len(sub)


def _expand(template: str, who: Who) -> str | None:
    """``%u``/``%c`` substituted; None when the value is missing or holds a wildcard or separator."""
    if "%u" in template:
        name = who.username
        if not name or any(c in name for c in "+#/"):
            return None
        template = template.replace("%u", name)
    if "%c" in template:
        if any(c in who.client_id for c in "+#/"):
            return None
        template = template.replace("%c", who.client_id)
    return template


def topic_applies(template: str, who: Who, requested: str, action: str) -> bool:
    if template.startswith("eq "):
        return template[3:] == requested
    expanded = _expand(template, who)
    return expanded is not None and covers(expanded, requested, action)


@dataclass(frozen=True, slots=True)
class AclRule:
    """``[[acl.rules]]``: first match wins."""

    allow: bool
    actions: frozenset[str]
    topics: tuple[str, ...]
    username: str = ""
    clientid: str = ""
    network: _IpNetwork | None = None

    def decide(self, who: Who, action: str, requested: str) -> bool | None:
        if action not in self.actions:
            return None
        if self.username and who.username != self.username:
            return None
        if self.clientid and who.client_id != self.clientid:
            return None
        if self.network is not None:
            try:
                if ipaddress.ip_address(who.host) not in self.network:
                    return None
            except ValueError:
                return None
        if any(topic_applies(t, who, requested, action) for t in self.topics):
            return self.allow
        return None


def _actions(action: str) -> frozenset[str]:
    return frozenset((PUBLISH, SUBSCRIBE)) if action == "all" else frozenset((action,))


def rules_from_config(rules: Iterable[AclRuleConfig]) -> list[AclRule]:
    return [
        AclRule(
            r.permission == "allow",
            _actions(r.action),
            tuple(r.topics),
            r.username,
            r.clientid,
            ipaddress.ip_network(r.ipaddress, strict=False) if r.ipaddress else None,
        )
        for r in rules
    ]


@dataclass(slots=True)
class _FileEntries:
    read: list[str] = field(default_factory=list)
    write: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)

    def add(self, access: str, topic: str) -> None:
        if access in ("read", "readwrite"):
            self.read.append(topic)
        if access in ("write", "readwrite"):
            self.write.append(topic)
        if access == "deny":
            self.deny.append(topic)


@dataclass(slots=True)
class AclFile:
    """A mosquitto ``acl_file``: ``topic`` lines before any ``user`` line are for anonymous clients,
    ``user NAME`` starts a user's lines, ``pattern`` lines (``%u``, ``%c``) apply to every client. ``deny``
    entries win; then any matching read (subscribe) or write (publish) entry allows; else no decision."""

    anonymous: _FileEntries = field(default_factory=_FileEntries)
    users: dict[str, _FileEntries] = field(default_factory=dict)
    patterns: _FileEntries = field(default_factory=_FileEntries)

    def decide(self, who: Who, action: str, requested: str) -> bool | None:
        own = self.users.get(who.username) if who.username else self.anonymous
        groups = [own] if own is not None else []
        for entries in groups:
            if any(covers(t, requested, action) for t in entries.deny):
                return False
        if any(topic_applies(t, who, requested, action) for t in self.patterns.deny):
            return False
        allowed = [e.write if action == PUBLISH else e.read for e in groups]
        if any(covers(t, requested, action) for topics in allowed for t in topics):
            return True
        pattern_topics = self.patterns.write if action == PUBLISH else self.patterns.read
        if any(topic_applies(t, who, requested, action) for t in pattern_topics):
            return True
        return None


def parse_acl_file(text: str, source: str = "acl file") -> AclFile:
    acl = AclFile()
    current = acl.anonymous
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        rest = rest.strip()
        if keyword == "user":
            if not rest:
                raise ConfigError(f"{source}:{number}: user needs a name")
            current = acl.users.setdefault(rest, _FileEntries())
            continue
        if keyword not in ("topic", "pattern"):
            raise ConfigError(f"{source}:{number}: expected user, topic or pattern, got {keyword!r}")
        access, _, topic = rest.partition(" ")
        if access not in ("read", "write", "readwrite", "deny"):
            access, topic = "readwrite", rest
        topic = topic.strip()
        if not topic:
            raise ConfigError(f"{source}:{number}: {keyword} needs a topic filter")
        (acl.patterns if keyword == "pattern" else current).add(access, topic)
    return acl


def load_acl_file(path: str) -> AclFile:
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as exc:
        raise ConfigError(f"acl.file: cannot read {path}: {exc.strerror or exc}") from None
    return parse_acl_file(text, path)


_DOLLAR = re.compile(r"\$(\d)")


def _substitute(dest: str, groups: tuple[str | Any, ...]) -> str:
    """``dest`` with ``$N`` replaced by capture group N (empty when absent)."""

    def group(m: re.Match[str]) -> str:
        index = int(m[1])
        return str(groups[index - 1] or "") if 0 < index <= len(groups) else ""

    return _DOLLAR.sub(group, dest)


@dataclass(frozen=True, slots=True)
class _Rewrite:
    actions: frozenset[str]
    source: str
    regex: re.Pattern[str]
    dest: str


class Rewriter:
    """``[[rewrite]]`` rules (EMQX ``emqx_mod_rewrite``): the first rule whose source filter matches the
    topic decides; when its regex matches, the topic becomes ``dest`` with ``$N`` replaced by group N."""

    def __init__(self, rules: Iterable[RewriteRuleConfig]) -> None:
        rules = list(rules)
        for index, r in enumerate(rules):
            if not r.dest or (r.action != SUBSCRIBE and ("+" in r.dest or "#" in r.dest)):
                raise ConfigError(f"rewrite[{index}].dest: {r.dest!r} is not a topic name a publish can use")
        self.rules = [_Rewrite(_actions(r.action), r.source, re.compile(r.regex), r.dest) for r in rules]

    def rewrite(self, action: str, topic: str) -> str:
        shared = parse_shared(topic) if action == SUBSCRIBE else None
        if shared is not None and not isinstance(shared, str):
            inner = self._rewrite(action, shared.topic_filter)
            if inner == shared.topic_filter:
                return topic
            prefix = "$queue/" if shared.group == "$queue" and topic.startswith("$queue/") else ""
            return prefix + inner if prefix else f"$share/{shared.group}/{inner}"
        return self._rewrite(action, topic)

    def _rewrite(self, action: str, topic: str) -> str:
        for rule in self.rules:
            if action not in rule.actions or not covers(rule.source, topic, action):
                continue
            match = rule.regex.match(topic)
            if match is None:
                return topic
            return _substitute(rule.dest, match.groups())
        return topic
