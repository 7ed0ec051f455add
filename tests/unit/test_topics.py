"""Tests for core.topics: validation, shared subscriptions, matching and the trie (MQTT 5.0 §4.7, §4.8.2)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.topics import SharedFilter, TopicTrie, filter_matches, parse_shared, validate_filter, validate_topic

# --- validation


@pytest.mark.parametrize(
    "topic",
    [
        "a",
        "a/b",
        "/",
        "/a",
        "a/",
        "a//b",
        "//",
        "$SYS/broker/uptime",
        "Accounts payable",
        "\u00e9/\u6f22\u5b57",
        "$",
    ],
)
def test_valid_topic_names(topic: str) -> None:
    assert validate_topic(topic) is None


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("", "empty"),
        ("a/+", "wildcard"),
        ("a/#", "wildcard"),
        ("+", "wildcard"),
        ("#", "wildcard"),
        ("a+b", "wildcard"),
        ("sport/tennis#", "wildcard"),
        ("a\x00b", "U+0000"),  # §4.7.3; MQTT-SN and CoAP topics reach the broker without the MQTT codec
        ("x" * 65536, "65535"),
        ("\u00e9" * 32768, "65535"),  # 65536 bytes in UTF-8: the limit counts bytes, not characters
        ("/".join(["a"] * 129), "128"),
    ],
    ids=lambda v: v[:20] if isinstance(v, str) else v,
)
def test_invalid_topic_names_say_why(topic: str, reason: str) -> None:
    why = validate_topic(topic)
    assert why is not None and reason in why


def test_topic_depth_limit_counts_levels() -> None:
    assert validate_topic("/".join(["a"] * 128)) is None
    assert validate_topic("a/b/c", max_levels=3) is None
    assert validate_topic("a/b/c/d", max_levels=3) is not None
    assert validate_topic("x" * 65535) is None


@pytest.mark.parametrize(
    "topic_filter",
    [
        "#",
        "+",
        "a",
        "a/#",
        "a/+",
        "+/+",
        "/+",
        "+/#",
        "a/+/b/#",
        "sport/tennis/player1/#",
        "$SYS/#",
        "$SYS/monitor/+",
        "a//b",
        "/",
        "$share/g/a/#",
    ],
)
def test_valid_topic_filters(topic_filter: str) -> None:
    assert validate_filter(topic_filter) is None


@pytest.mark.parametrize(
    ("topic_filter", "reason"),
    [
        ("", "empty"),
        ("a/#/b", "'#'"),
        ("#/a", "'#'"),
        ("a#", "'#'"),
        ("a/b#", "'#'"),
        ("sport/tennis#", "'#'"),
        ("##", "'#'"),
        ("a+", "'+'"),
        ("+a/b", "'+'"),
        ("a/+b", "'+'"),
        ("sport+", "'+'"),
        ("++", "'+'"),
        ("a/\x00", "U+0000"),
        ("/".join(["a"] * 129), "128"),
    ],
    ids=lambda v: v[:20] if isinstance(v, str) else v,
)
def test_invalid_topic_filters_say_why(topic_filter: str, reason: str) -> None:
    why = validate_filter(topic_filter)
    assert why is not None and reason in why


def test_filter_depth_limit_counts_levels() -> None:
    assert validate_filter("/".join(["+"] * 127 + ["#"])) is None
    assert validate_filter("a/+/#", max_levels=3) is None
    assert validate_filter("a/+/b/#", max_levels=3) is not None


# --- shared subscriptions (§4.8.2)


@pytest.mark.parametrize(
    ("topic_filter", "group", "inner"),
    [
        ("$share/g/a/b", "g", "a/b"),
        ("$share/consumer1/sport/tennis/+", "consumer1", "sport/tennis/+"),
        ("$share/g/#", "g", "#"),
        ("$share/g//a", "g", "/a"),
        ("$share/g/$SYS/#", "g", "$SYS/#"),
        ("$queue/a/b", "$queue", "a/b"),
        ("$queue/#", "$queue", "#"),
    ],
)
def test_parse_shared_splits_group_and_filter(topic_filter: str, group: str, inner: str) -> None:
    shared = parse_shared(topic_filter)
    assert isinstance(shared, SharedFilter)
    assert (shared.group, shared.topic_filter) == (group, inner)


@pytest.mark.parametrize(
    "topic_filter",
    [
        "$share/g",
        "$share/g/",
        "$share//a",
        "$share/",
        "$share/g+/a",
        "$share/+/a",
        "$share/#/a",
        "$share/a#/b",
        "$queue/",
    ],
)
def test_parse_shared_rejects_malformed_shared_filters(topic_filter: str) -> None:
    assert isinstance(parse_shared(topic_filter), str)


@pytest.mark.parametrize(
    "topic_filter", ["a/b", "#", "$SYS/#", "$share", "$queue", "$sharex/g/a", "a/$share/g/b"]
)
def test_parse_shared_leaves_ordinary_filters_alone(topic_filter: str) -> None:
    assert parse_shared(topic_filter) is None


# --- matching: the spec's examples (§4.7.1.2, §4.7.1.3, §4.7.2)

SPEC_EXAMPLES = [
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/tennis/player1/#", "sport/tennis/player2", False),
    ("sport/#", "sport", True),
    ("a/#", "a", True),
    ("a/#", "ab", False),
    ("#", "sport/tennis/player1", True),
    ("#", "/", True),
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+/tennis/#", "sport/tennis/player1", True),
    ("+/tennis/#", "sport/tennis", True),
    ("a/+/#", "a", False),
    ("a/+/#", "a/b", True),
    ("ACCOUNTS", "Accounts", False),
    ("Accounts payable", "Accounts payable", True),
    ("a//b", "a//b", True),
    ("a/+/b", "a//b", True),
    ("a/b", "a/b/c", False),
    ("a/b/c", "a/b", False),
    # topics starting with $ are not matched by a leading wildcard (§4.7.2)
    ("#", "$SYS/monitor/Clients", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("+", "$SYS", False),
    ("#", "$", False),
    ("#", "a/$SYS", True),
    ("a/+", "a/$x", True),
    ("+/#", "$share/x", False),
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), SPEC_EXAMPLES)
def test_filter_matches_spec_examples(topic_filter: str, topic: str, expected: bool) -> None:
    assert filter_matches(topic_filter, topic) is expected


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), SPEC_EXAMPLES)
def test_trie_matches_spec_examples(topic_filter: str, topic: str, expected: bool) -> None:
    trie: TopicTrie[str] = TopicTrie()
    trie.add(topic_filter, "client", topic_filter)
    assert trie.match(topic) == ([{"client": topic_filter}] if expected else [])


# --- the trie


def _matched(trie: TopicTrie[str], topic: str) -> list[tuple[str, object]]:
    return [(value, key) for values in trie.match(topic) for key, value in values.items()]


def test_trie_add_counts_each_key_once_per_filter() -> None:
    trie: TopicTrie[str] = TopicTrie()
    assert len(trie) == 0
    assert trie.add("a/b", "c1", "qos0") is True
    assert trie.add("a/b", "c1", "qos1") is False  # replaced, not added
    assert trie.add("a/b", "c2", "qos0") is True
    assert trie.add("a/+", "c1", "qos2") is True
    assert len(trie) == 3
    assert trie.get("a/b") == {"c1": "qos1", "c2": "qos0"}
    assert trie.get("a/+") == {"c1": "qos2"}
    assert trie.get("a") == {}
    assert trie.get("a/b/c") == {}
    assert trie.get("x") == {}


def test_trie_match_returns_every_matching_filter_once() -> None:
    trie: TopicTrie[str] = TopicTrie()
    for topic_filter in [
        "#",
        "a/#",
        "a/+",
        "a/b",
        "+/b",
        "+/+",
        "a/b/#",
        "a/+/#",
        "+/#",
        "a/c",
        "b/#",
        "a/b/c",
    ]:
        trie.add(topic_filter, "k", topic_filter)
    assert sorted(_matched(trie, "a/b")) == sorted(
        (f, "k") for f in ["#", "a/#", "a/+", "a/b", "+/b", "+/+", "a/b/#", "a/+/#", "+/#"]
    )
    assert sorted(_matched(trie, "a")) == sorted((f, "k") for f in ["#", "a/#", "+/#"])
    assert sorted(_matched(trie, "$a/b")) == []


def test_trie_dollar_topics_skip_leading_wildcards_only() -> None:
    trie: TopicTrie[str] = TopicTrie()
    for topic_filter in ["#", "+/monitor/Clients", "$SYS/#", "$SYS/monitor/+", "$SYS/+/Clients"]:
        trie.add(topic_filter, "k", topic_filter)
    assert sorted(v for v, _ in _matched(trie, "$SYS/monitor/Clients")) == [
        "$SYS/#",
        "$SYS/+/Clients",
        "$SYS/monitor/+",
    ]
    assert sorted(v for v, _ in _matched(trie, "$SYS")) == ["$SYS/#"]


def test_trie_remove_prunes_empty_branches_and_keeps_the_rest() -> None:
    trie: TopicTrie[str] = TopicTrie()
    trie.add("a/b/c", "k1", "v1")
    trie.add("a/b", "k2", "v2")
    trie.add("a/b/c", "k3", "v3")
    assert trie.remove("a/b/c", "nobody") is False
    assert trie.remove("a/x", "k1") is False
    assert trie.remove("a/b/c/d", "k1") is False
    assert trie.remove("a", "k2") is False  # an inner node with no value for the key
    assert len(trie) == 3
    assert trie.remove("a/b/c", "k1") is True
    assert trie.remove("a/b/c", "k1") is False
    assert len(trie) == 2
    assert _matched(trie, "a/b/c") == [("v3", "k3")]
    assert trie.remove("a/b/c", "k3") is True
    assert _matched(trie, "a/b/c") == []
    assert _matched(trie, "a/b") == [("v2", "k2")]
    assert "c" not in trie._root.children["a"].children["b"].children  # pruned up to the node still in use
    assert trie.remove("a/b", "k2") is True
    assert len(trie) == 0
    assert trie._root.children == {}  # every branch pruned
    assert list(trie.items()) == []


def test_trie_items_lists_every_filter_key_and_value() -> None:
    trie: TopicTrie[int] = TopicTrie()
    entries = {
        ("#", "a", 1),
        ("a/b", "a", 2),
        ("a/b", "b", 3),
        ("/x", "c", 4),
        ("a//+", "d", 5),
        ("$SYS/#", "e", 6),
    }
    for topic_filter, key, value in entries:
        trie.add(topic_filter, key, value)
    assert set(trie.items()) == entries
    assert len(trie) == len(entries)


# --- property: the trie agrees with filter_matches and with a reference written from the spec

_LEVELS = ["a", "b", "$x", ""]
_topics = st.lists(st.sampled_from(_LEVELS), min_size=1, max_size=4).map("/".join).filter(bool)
_filters = st.one_of(
    st.just("#"),
    st.tuples(
        st.lists(st.sampled_from([*_LEVELS, "+"]), min_size=1, max_size=4),
        st.booleans(),
    ).map(lambda t: "/".join(t[0] + (["#"] if t[1] else []))),
).filter(bool)


def _reference_match(topic_filter: str, topic: str) -> bool:
    """§4.7: '+' is one whole level, a trailing '#' any number of levels (zero included), no '$' match."""
    f_levels, t_levels = topic_filter.split("/"), topic.split("/")
    if topic.startswith("$") and f_levels[0] in ("+", "#"):
        return False
    if f_levels[-1] == "#":
        head = f_levels[:-1]
        return len(t_levels) >= len(head) and all(f in ("+", t) for f, t in zip(head, t_levels, strict=False))
    return len(f_levels) == len(t_levels) and all(
        f in ("+", t) for f, t in zip(f_levels, t_levels, strict=True)
    )


@settings(max_examples=300, deadline=None, database=None)
@given(
    subs=st.lists(st.tuples(_filters, st.sampled_from(["k1", "k2"])), max_size=12),
    removed=st.lists(st.integers(0, 11), max_size=6),
    topics=st.lists(_topics, min_size=1, max_size=6),
)
def test_trie_match_gives_exactly_the_matching_filters(
    subs: list[tuple[str, str]], removed: list[int], topics: list[str]
) -> None:
    assert all(validate_filter(f) is None for f, _ in subs)
    trie: TopicTrie[str] = TopicTrie()
    present: set[tuple[str, str]] = set()
    for topic_filter, key in subs:
        assert trie.add(topic_filter, key, topic_filter) is ((topic_filter, key) not in present)
        present.add((topic_filter, key))
    for index in removed:
        if index < len(subs):
            assert trie.remove(*subs[index]) is (subs[index] in present)
            present.discard(subs[index])
    assert len(trie) == len(present)
    assert set(trie.items()) == {(f, k, f) for f, k in present}
    for topic in topics:
        found = _matched(trie, topic)
        assert len(found) == len(set(found)), f"a filter matched twice for {topic!r}: {found}"
        expected = {(f, k) for f, k in present if filter_matches(f, topic)}
        assert set(found) == expected, topic
        assert expected == {(f, k) for f, k in present if _reference_match(f, topic)}, topic
    for topic_filter, key in present:
        assert trie.remove(topic_filter, key) is True
    assert len(trie) == 0
    assert trie._root.children == {}
