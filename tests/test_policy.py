"""agent/policy/: parsing, matching semantics, compilation to LPM entries, the store."""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import socket
import stat
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.errors import EXIT_STORE, EXIT_USAGE, UserError
from agent.policy import (
    POLICY_ALLOW,
    POLICY_DROP,
    Action,
    LpmEntry,
    Protocol,
    Resolver,
    Rule,
    RuleStore,
    default_state_dir,
    lpm_entries,
    parse_dest,
    refresh_names,
    resolve,
    winning_rule,
)

TCP, UDP, ICMP, ICMPV6, GRE, SCTP = 6, 17, 1, 58, 47, 132
T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
T1 = datetime(2024, 5, 1, 12, 5, 0, tzinfo=UTC)


def fake_resolver(answers: dict[str, list[str] | OSError]) -> Resolver:
    """getaddrinfo stand-in: names not in answers fail the test instead of reaching DNS."""

    def resolver(host: str, port: None) -> list[tuple[Any, ...]]:
        answer = answers[host]
        if isinstance(answer, OSError):
            raise answer
        records = [
            (socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, 0))
            for address in answer
        ]
        return records * 2  # getaddrinfo repeats each address once per socket type

    return resolver


NOT_FOUND = socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def make_rule(
    rule_id: int,
    dest: str,
    action: Action = "block",
    *,
    port: int | None = None,
    proto: Protocol = "any",
    container: str = "web",
    addresses: Sequence[str] = (),
) -> Rule:
    normalised, kind = parse_dest(dest)
    return Rule(
        rule_id=rule_id,
        container=container,
        dest=normalised,
        dest_kind=kind,
        port=port,
        proto=proto,
        action=action,
        added_at="2024-05-01T12:00:00Z",
        addresses=tuple(addresses) or (normalised,),
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_error(error: UserError, exit_code: int, *fragments: str) -> None:
    message = str(error)
    assert error.exit_code == exit_code
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.fixture
def store(tmp_path: Path) -> RuleStore:
    return RuleStore(tmp_path / "state")


@pytest.fixture
def populated(store: RuleStore) -> RuleStore:
    store.add("web", "198.51.100.0/24", action="block", port=443, proto="tcp", now=T0)
    store.add("web", "2001:db8::/32", action="allow", now=T0)
    return store


# --- parsing and validation ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("198.51.100.7", ("198.51.100.7/32", "cidr")),
        (" 198.51.100.7 ", ("198.51.100.7/32", "cidr")),
        ("198.51.100.0/24", ("198.51.100.0/24", "cidr")),
        ("10.0.0.0/255.0.0.0", ("10.0.0.0/8", "cidr")),
        ("0.0.0.0/0", ("0.0.0.0/0", "cidr")),
        ("2001:DB8::7", ("2001:db8::7/128", "cidr")),
        ("2001:db8:0:0::/32", ("2001:db8::/32", "cidr")),
        ("::/0", ("::/0", "cidr")),
        # IPv4-mapped: IPv4 on the wire, so stored as IPv4; NAT64 and ::/80 are real IPv6
        ("::ffff:198.51.100.7", ("198.51.100.7/32", "cidr")),
        ("::FFFF:c633:6407", ("198.51.100.7/32", "cidr")),
        ("::ffff:198.51.100.0/120", ("198.51.100.0/24", "cidr")),
        ("::ffff:0:0/96", ("0.0.0.0/0", "cidr")),
        ("64:ff9b::c633:6407", ("64:ff9b::c633:6407/128", "cidr")),
        ("::/80", ("::/80", "cidr")),
        ("Api.Example.COM.", ("api.example.com", "name")),
        ("1e100.net", ("1e100.net", "name")),
        ("localhost", ("localhost", "name")),
    ],
)
def test_parse_dest_normalises(text: str, expected: tuple[str, str]) -> None:
    assert parse_dest(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "it is empty"),
        ("10.0.0.0/33", "'33' is not a valid netmask"),
        ("1.2.3.999", "Octet 999 (> 255)"),
        ("010.0.0.1", "Leading zeros"),
        ("2001:db8::g", "Only hex digits"),
        ("fe80::1%eth0", "cannot match an IPv6 zone index"),
        ("example.com/24", "a prefix length needs an IP address"),
        ("http://example.com", "that is a URL; give its host name alone"),
        ("under_score.example.com", "label 'under_score'"),
        ("-dash.example.com", "label '-dash'"),
        ("a..example.com", "empty label"),
        ("x" * 64 + ".com", "longer than 63 characters"),
        (".".join(["abcdefghi"] * 26), "at most 253 characters"),
        ("münchen.de", "label 'münchen'"),
        ("host.123", "last label is all digits"),
    ],
)
def test_parse_dest_rejects(text: str, fragment: str) -> None:
    with pytest.raises(UserError) as caught:
        parse_dest(text)
    assert_one_line_error(caught.value, EXIT_USAGE, fragment, "use an address", "a CIDR", "a host name")


@pytest.mark.parametrize(
    ("text", "suggestion"),
    [
        ("198.51.100.7/24", "use the network 198.51.100.0/24, or 198.51.100.7 for that one address"),
        ("2001:db8::7/32", "use the network 2001:db8::/32, or 2001:db8::7 for that one address"),
    ],
)
def test_parse_dest_suggests_the_network_when_host_bits_are_set(text: str, suggestion: str) -> None:
    with pytest.raises(UserError) as caught:
        parse_dest(text)
    assert_one_line_error(
        caught.value, EXIT_USAGE, f"invalid destination {text!r}: host bits are set", suggestion
    )


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"port": 0}, "port 0 is out of range: use 1-65535"),
        ({"port": 65536}, "port 65536 is out of range"),
        ({"port": 53, "proto": "icmp"}, "a port needs protocol tcp, udp or any"),
        ({"proto": "sctp"}, "unknown protocol 'sctp': use tcp, udp, icmp"),
        ({"action": "deny"}, "unknown action 'deny'"),
        ({"container": "my web"}, "invalid container name 'my web'"),
        ({"container": ""}, "invalid container name ''"),
        ({"dest": "198.51.100.7/24"}, "host bits are set"),
        ({"dest": "not a host"}, "invalid destination 'not a host'"),
        ({"dest": "gone.example.com"}, "cannot resolve gone.example.com: Name or service not known"),
    ],
)
def test_bad_add_is_refused_and_leaves_the_store_alone(
    populated: RuleStore, fields: dict[str, Any], fragment: str
) -> None:
    before = digest(populated.path)
    request = {"container": "web", "dest": "198.51.100.7", "action": "block"} | fields
    with pytest.raises(UserError) as caught:
        populated.add(**request, resolver=fake_resolver({"gone.example.com": NOT_FOUND}))
    assert_one_line_error(caught.value, EXIT_USAGE, fragment)
    assert digest(populated.path) == before


def test_remove_of_a_missing_rule_lists_the_containers_rules(populated: RuleStore) -> None:
    before = digest(populated.path)
    with pytest.raises(UserError) as caught:
        populated.remove("web", "198.51.100.0/24", port=443)  # the rule is tcp/443, not tcp+udp
    assert_one_line_error(
        caught.value,
        EXIT_USAGE,
        "no rule for web matches 198.51.100.0/24 tcp+udp/443",
        "web has: block 198.51.100.0/24 tcp/443, allow 2001:db8::/32 any",
    )
    with pytest.raises(UserError) as caught:
        populated.remove("db", "198.51.100.7", proto="bogus")
    assert_one_line_error(caught.value, EXIT_USAGE, "unknown protocol 'bogus'")
    with pytest.raises(UserError) as caught:
        populated.remove("db", "198.51.100.7")
    assert_one_line_error(caught.value, EXIT_USAGE, "db has no rules")
    assert digest(populated.path) == before


# --- matching semantics -------------------------------------------------------------


def test_no_rule_matching_means_allowed() -> None:
    rules = [make_rule(1, "198.51.100.0/24")]
    assert winning_rule([], "198.51.100.7", TCP, 443) is None
    assert winning_rule(rules, "198.18.113.1", TCP, 443) is None
    assert winning_rule(rules, "2001:db8::1", TCP, 443) is None  # a v4 rule never matches v6


def test_longest_prefix_wins_and_allow_opens_a_hole_in_a_blocked_cidr() -> None:
    rules = [make_rule(1, "10.0.0.0/8"), make_rule(2, "10.1.0.0/16", "allow"), make_rule(3, "10.1.2.3")]
    assert winning_rule(rules, "10.9.9.9", UDP, 53).rule_id == 1
    assert winning_rule(rules, "10.1.9.9", UDP, 53).rule_id == 2
    assert winning_rule(rules, "10.1.2.3", UDP, 53).rule_id == 3


def test_port_beats_protocol_beats_neither_at_the_same_prefix() -> None:
    rules = [
        make_rule(1, "198.18.113.0/24", port=443, proto="tcp"),
        make_rule(2, "198.18.113.0/24", "allow", proto="tcp"),
        make_rule(3, "198.18.113.0/24"),
    ]
    for order in (rules, rules[::-1]):  # specificity, not age, decides here
        assert winning_rule(order, "198.18.113.5", TCP, 443).rule_id == 1
        assert winning_rule(order, "198.18.113.5", TCP, 80).rule_id == 2
        assert winning_rule(order, "198.18.113.5", UDP, 443).rule_id == 3
        assert winning_rule(order, "198.18.113.5", ICMP, None).rule_id == 3


def test_a_longer_prefix_beats_a_port() -> None:
    rules = [make_rule(1, "10.0.0.0/8", "allow", port=443, proto="tcp"), make_rule(2, "10.1.2.3")]
    assert winning_rule(rules, "10.1.2.3", TCP, 443).rule_id == 2


def test_block_everything_plus_allows_is_an_allow_list() -> None:
    rules = [
        make_rule(1, "0.0.0.0/0"),
        make_rule(2, "::/0"),
        make_rule(3, "198.51.100.7", "allow", port=443, proto="tcp"),
        make_rule(4, "2001:db8::53", "allow", port=53),
    ]
    assert winning_rule(rules, "198.51.100.7", TCP, 443).action == "allow"
    assert winning_rule(rules, "198.51.100.7", TCP, 80).action == "block"
    assert winning_rule(rules, "8.8.8.8", UDP, 53).action == "block"
    assert winning_rule(rules, "2001:db8::53", UDP, 53).action == "allow"
    assert winning_rule(rules, "2001:db8::53", TCP, 53).action == "allow"  # any + port: tcp and udp
    assert winning_rule(rules, "2001:db8::53", ICMPV6, None).action == "block"
    assert winning_rule(rules, "2001:4860::8888", UDP, 53).rule_id == 2


def test_icmp_means_icmpv6_for_ipv6_destinations() -> None:
    rules = [make_rule(1, "0.0.0.0/0", proto="icmp"), make_rule(2, "::/0", proto="icmp")]
    assert winning_rule(rules, "198.19.2.1", ICMP, None).rule_id == 1
    assert winning_rule(rules, "2001:db8::1", ICMPV6, None).rule_id == 2
    assert winning_rule(rules, "2001:db8::1", ICMP, None) is None
    assert winning_rule(rules, "198.19.2.1", GRE, None) is None


def test_a_port_rule_needs_a_port_carrying_packet() -> None:
    rules = [make_rule(1, "0.0.0.0/0", port=53)]
    assert winning_rule(rules, "198.19.2.1", UDP, 53).rule_id == 1
    assert winning_rule(rules, "198.19.2.1", UDP, 54) is None
    assert winning_rule(rules, "198.19.2.1", GRE, None) is None


def test_equal_specificity_goes_to_the_later_rule() -> None:
    any_port = make_rule(1, "198.18.113.0/24", port=53)
    udp_port = make_rule(2, "198.18.113.0/24", "allow", port=53, proto="udp")
    assert winning_rule([any_port, udp_port], "198.18.113.9", UDP, 53) == udp_port
    assert winning_rule([udp_port, any_port], "198.18.113.9", UDP, 53) == any_port
    assert winning_rule([any_port, udp_port], "198.18.113.9", TCP, 53) == any_port
    by_name = make_rule(3, "api.example.com", "allow", addresses=["198.18.113.9/32"])
    by_address = make_rule(4, "198.18.113.9")
    assert winning_rule([by_name, by_address], "198.18.113.9", TCP, 80) == by_address
    assert winning_rule([by_address, by_name], "198.18.113.9", TCP, 80) == by_name


# --- compilation to LPM entries -----------------------------------------------------


def traffic_of(entries: Iterable[LpmEntry]) -> list[tuple[int, int, int]]:
    return [(entry.family, entry.proto, entry.port) for entry in entries]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (make_rule(1, "198.51.100.7"), [(4, 0, 0)]),
        (make_rule(1, "198.51.100.7", proto="tcp"), [(4, TCP, 0)]),
        (make_rule(1, "198.51.100.7", proto="udp", port=53), [(4, UDP, 53)]),
        (make_rule(1, "198.51.100.7", port=53), [(4, TCP, 53), (4, UDP, 53)]),
        (make_rule(1, "198.51.100.7", proto="icmp"), [(4, ICMP, 0)]),
        (make_rule(1, "2001:db8::/32", proto="icmp"), [(6, ICMPV6, 0)]),
        (make_rule(1, "2001:db8::/32", port=443), [(6, TCP, 443), (6, UDP, 443)]),
        (
            make_rule(1, "dual.example.com", proto="icmp", addresses=["198.19.2.1/32", "2001:db8::1/128"]),
            [(4, ICMP, 0), (6, ICMPV6, 0)],
        ),
    ],
)
def test_lpm_entries_for_each_rule_shape(rule: Rule, expected: list[tuple[int, int, int]]) -> None:
    entries = lpm_entries([rule], {"web": 5})
    assert traffic_of(entries) == expected
    prefixes = {(network.network_address.packed, network.prefixlen) for network in rule.networks}
    for entry in entries:
        assert (entry.slot, entry.rule_id, entry.action) == (5, 1, POLICY_DROP)
        assert (entry.addr, entry.addr_prefixlen) in prefixes


def test_lpm_entries_actions_slots_and_collisions() -> None:
    rules = [
        make_rule(1, "198.18.113.0/24", port=53),
        make_rule(2, "198.18.113.0/24", "allow", port=53, proto="udp"),
        make_rule(3, "198.18.113.0/24", "allow", port=53, proto="udp", container="db"),
    ]
    entries = lpm_entries(rules, {"web": 1, "db": 2})
    assert [(e.slot, e.proto, e.rule_id, e.action) for e in entries] == [
        (1, TCP, 1, POLICY_DROP),
        (1, UDP, 2, POLICY_ALLOW),  # rule 2 took over rule 1's udp key
        (2, UDP, 3, POLICY_ALLOW),
    ]


# --- store --------------------------------------------------------------------------


def test_add_persists_a_readable_document(store: RuleStore) -> None:
    rule, replaced = store.add("/web", "198.51.100.7", action="block", port=443, proto="TCP", now=T0)
    assert not replaced
    assert rule == Rule(
        rule_id=1,
        container="web",
        dest="198.51.100.7/32",
        dest_kind="cidr",
        port=443,
        proto="tcp",
        action="block",
        added_at="2024-05-01T12:00:00Z",
        addresses=("198.51.100.7/32",),
    )
    assert RuleStore(store.state_dir).rules() == [rule]
    assert RuleStore(store.state_dir).slots() == {"web": 1}
    text = store.path.read_text()
    document = json.loads(text)
    assert text == json.dumps(document, indent=2, sort_keys=True) + "\n"
    assert (document["version"], document["next_rule_id"], document["slots"]) == (1, 2, {"web": 1})


def test_readers_of_a_missing_store_see_no_rules_and_create_nothing(store: RuleStore) -> None:
    assert store.rules() == []
    assert store.slots() == {}
    assert not store.state_dir.exists()


def test_state_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EGRESS_TOP_STATE_DIR", str(tmp_path))
    assert RuleStore().path == tmp_path / "rules.json"
    monkeypatch.delenv("EGRESS_TOP_STATE_DIR")
    assert default_state_dir() == Path("/var/lib/egress-top")


def test_re_adding_a_rule_replaces_its_action_and_makes_it_newest(populated: RuleStore) -> None:
    first, _ = populated.add("web", "198.51.100.0/24", action="block", port=443, proto="tcp")
    rule, replaced = populated.add("web", "198.51.100.0/24", action="allow", port=443, proto="tcp", now=T1)
    assert replaced
    assert (rule.rule_id, rule.action, rule.added_at) == (first.rule_id, "allow", "2024-05-01T12:05:00Z")
    assert [r.rule_id for r in populated.rules()] == [2, 1]
    assert populated.rules()[-1] == rule


def test_remove_matches_the_key_whatever_the_action(populated: RuleStore) -> None:
    removed = populated.remove("web", "2001:DB8::/32")
    assert (removed.rule_id, removed.action) == (2, "allow")
    assert [rule.rule_id for rule in populated.rules()] == [1]


def test_rule_ids_are_never_reused_and_slots_are_freed(populated: RuleStore) -> None:
    populated.add("db", "198.19.2.1", action="block")
    removed = populated.remove_all("web")
    assert [rule.rule_id for rule in removed] == [1, 2]
    assert [rule.container for rule in populated.rules()] == ["db"]
    assert populated.slots() == {"db": 2}  # no rule names web: its slot is freed
    assert populated.remove_all("web") == []
    rule, _ = populated.add("cache", "198.19.2.2", action="block")
    assert rule.rule_id == 4
    assert populated.slots() == {"db": 2, "cache": 3}
    web_again, _ = populated.add("web", "198.19.2.3", action="block")
    assert (web_again.rule_id, populated.slots()["web"]) == (5, 4)
    assert populated.rules("cache") == [rule]
    populated.remove("cache", "198.19.2.2")
    assert populated.slots() == {"db": 2, "web": 4}


def test_sync_pending_tracks_which_containers_exist(store: RuleStore) -> None:
    store.add("web", "198.19.2.1", action="block", pending=True)
    store.add("db", "198.19.2.1", action="block")
    flipped = store.sync_pending({"web"})
    assert {(rule.container, rule.pending) for rule in flipped} == {("web", False), ("db", True)}
    before = digest(store.path)
    assert store.sync_pending({"web"}) == []
    assert digest(store.path) == before


def test_a_failed_write_leaves_the_old_file_and_no_debris(
    populated: RuleStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = digest(populated.path)

    def failing_replace(source: str, target: Path) -> None:
        raise OSError(28, "No space left on device", str(target))

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(UserError) as caught:
        populated.add("web", "198.19.2.1", action="block")
    assert_one_line_error(caught.value, EXIT_STORE, "No space left on device")
    assert digest(populated.path) == before
    assert sorted(p.name for p in populated.state_dir.iterdir()) == ["rules.json", "rules.lock"]


def test_a_write_syncs_the_file_then_the_directory(store: RuleStore, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[bool] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    store.add("web", "198.19.2.1", action="block")
    assert synced == [False, True]


def add_in_child(state_dir: Path, index: int, barrier: Any) -> None:
    barrier.wait(timeout=30)
    RuleStore(state_dir).add(f"c{index % 3}", f"10.0.0.{index}", action="block")


def test_parallel_adds_all_land(store: RuleStore) -> None:
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(10)
    children = [
        context.Process(target=add_in_child, args=(store.state_dir, index, barrier)) for index in range(10)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
    assert [child.exitcode for child in children] == [0] * 10
    rules = store.rules()
    assert sorted(rule.dest for rule in rules) == sorted(f"10.0.0.{index}/32" for index in range(10))
    assert sorted(rule.rule_id for rule in rules) == list(range(1, 11))
    assert sorted(store.slots().values()) == [1, 2, 3]
    assert sorted(p.name for p in store.state_dir.iterdir()) == ["rules.json", "rules.lock"]


def test_a_held_lock_times_out_with_a_store_error(populated: RuleStore) -> None:
    impatient = RuleStore(populated.state_dir, lock_timeout=0.1)
    with open(populated.lock_path) as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(UserError) as caught:
            impatient.add("web", "198.19.2.1", action="block")
        # the holder is this process: the fixture's last write recorded our pid in the lock file
        assert_one_line_error(caught.value, EXIT_STORE, f"locked by pid {os.getpid()}", str(populated.path))
        with pytest.raises(UserError) as caught:  # bad input is refused before waiting for the lock
            RuleStore(populated.state_dir, lock_timeout=60).add("web", "198.19.2.1", action="block", port=0)
        assert caught.value.exit_code == EXIT_USAGE
        with pytest.raises(UserError):
            impatient.rules()
        fcntl.flock(holder, fcntl.LOCK_SH)  # readers share
        assert len(impatient.rules()) == 2


def rule_document(**changes: Any) -> dict[str, Any]:
    rule = {
        "rule_id": 1,
        "container": "web",
        "dest": "198.51.100.7/32",
        "dest_kind": "cidr",
        "port": None,
        "proto": "any",
        "action": "block",
        "added_at": "2024-05-01T12:00:00Z",
        "addresses": ["198.51.100.7/32"],
        "resolved_at": None,
        "pending": False,
    }
    return rule | changes


def store_document(*rules: dict[str, Any], **changes: Any) -> str:
    document = {"version": 1, "next_rule_id": 9, "slots": {"web": 1}, "rules": list(rules)} | changes
    return json.dumps(document)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b'{"version": 1, "rules": [', "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[]", "not a JSON object"),
        (store_document(version=2).encode(), "format version 2 is newer"),
        (store_document(version="1").encode(), "format version '1', expected 1"),
        (store_document(extra=True).encode(), "top-level fields"),
        (store_document(next_rule_id=0).encode(), "next_rule_id 0"),
        (store_document(slots={"web": 1, "db": 1}).encode(), "share a slot"),
        (store_document(rules={}).encode(), "rules is not a list"),
        (store_document({"rule_id": 1}).encode(), "exactly the fields"),
        (store_document(rule_document(port="443")).encode(), "rule 1: port is '443'"),
        (store_document(rule_document(port=True, proto="tcp")).encode(), "rule 1: port is True"),
        (store_document(rule_document(port=99999, proto="tcp")).encode(), "rule 1: port 99999"),
        (store_document(rule_document(dest="198.51.100.7/24")).encode(), "rule 1: invalid destination"),
        (store_document(rule_document(dest="Example.com", dest_kind="name")).encode(), "normal form"),
        (store_document(rule_document(addresses=[])).encode(), "do not fit"),
        (store_document(rule_document(container="db")).encode(), "container db has no slot"),
        (store_document(rule_document(rule_id=9)).encode(), "not below next_rule_id"),
        (store_document(rule_document(), rule_document(rule_id=2)).encode(), "rules 1 and 2 collide"),
    ],
)
def test_a_corrupt_store_is_refused_and_left_alone(store: RuleStore, content: bytes, fragment: str) -> None:
    store.state_dir.mkdir()
    store.path.write_bytes(content)
    for operation in (
        lambda: store.add("web", "198.19.2.1", action="block"),
        lambda: store.remove_all("web"),
        store.rules,
    ):
        with pytest.raises(UserError) as caught:
            operation()
        assert_one_line_error(caught.value, EXIT_STORE, f"rule store {store.path}", fragment, "move it aside")
    assert store.path.read_bytes() == content
    assert sorted(p.name for p in store.state_dir.iterdir()) == ["rules.json", "rules.lock"]


def test_a_valid_hand_written_store_loads(store: RuleStore) -> None:
    store.state_dir.mkdir()
    store.path.write_text(store_document(rule_document()))
    assert store.rules() == [make_rule(1, "198.51.100.7")]


# --- name resolution ----------------------------------------------------------------


def test_resolve_returns_every_address_sorted_and_deduplicated() -> None:
    resolver = fake_resolver(
        {
            "api.example.com": [
                "2001:db8::2",
                "198.51.100.9",
                "198.51.100.10",
                "fe80::1%eth0",
                "::ffff:198.51.100.9",
            ]
        }
    )
    assert resolve("api.example.com", resolver) == (
        "198.51.100.9/32",
        "198.51.100.10/32",
        "2001:db8::2/128",
        "fe80::1/128",
    )


def test_an_ipv4_mapped_destination_is_stored_and_compiled_as_ipv4(store: RuleStore) -> None:
    rule, replaced = store.add("web", "::ffff:198.51.100.7", action="block", port=9444, proto="udp")
    assert (replaced, rule.dest, rule.addresses) == (False, "198.51.100.7/32", ("198.51.100.7/32",))
    assert store.rules("web") == [rule]
    assert json.loads(store.path.read_text())["rules"][0]["dest"] == "198.51.100.7/32"
    (entry,) = lpm_entries(store.rules(), store.slots())
    assert (entry.family, entry.addr, entry.addr_prefixlen, entry.port) == (
        4,
        bytes([198, 51, 100, 7]),
        32,
        9444,
    )
    assert winning_rule(store.rules(), "198.51.100.7", UDP, 9444) == rule
    # either spelling names the same rule
    assert store.add("web", "198.51.100.7", action="allow", port=9444, proto="udp")[1] is True
    assert store.remove("web", "::ffff:198.51.100.7", port=9444, proto="udp").rule_id == rule.rule_id


@pytest.mark.parametrize(
    ("answer", "fragment"),
    [
        (NOT_FOUND, "cannot resolve api.example.com: Name or service not known"),
        ([], "cannot resolve api.example.com: no A or AAAA records"),
    ],
)
def test_resolve_failures(answer: list[str] | OSError, fragment: str) -> None:
    with pytest.raises(UserError) as caught:
        resolve("api.example.com", fake_resolver({"api.example.com": answer}))
    assert_one_line_error(caught.value, EXIT_USAGE, fragment)


def test_a_name_rule_keeps_what_the_name_resolved_to(store: RuleStore) -> None:
    resolver = fake_resolver({"api.example.com": ["198.51.100.9", "2001:db8::9"]})
    rule, _ = store.add("web", "API.example.com", action="block", resolver=resolver, now=T0)
    assert (rule.dest, rule.dest_kind) == ("api.example.com", "name")
    assert rule.addresses == ("198.51.100.9/32", "2001:db8::9/128")
    assert rule.resolved_at == "2024-05-01T12:00:00Z"
    assert store.rules() == [rule]


def test_refresh_picks_up_new_addresses_and_keeps_old_ones_on_failure(store: RuleStore) -> None:
    resolver = fake_resolver({"api.example.com": ["198.51.100.9"], "cdn.example.com": ["198.18.113.5"]})
    api_web, _ = store.add("web", "api.example.com", action="block", resolver=resolver, now=T0)
    api_db, _ = store.add("db", "api.example.com", action="allow", resolver=resolver, now=T0)
    cdn, _ = store.add("web", "cdn.example.com", action="block", resolver=resolver, now=T0)
    literal, _ = store.add("web", "198.19.2.1", action="block", now=T0)

    moved = fake_resolver(
        {"api.example.com": ["198.51.100.10", "198.51.100.9"], "cdn.example.com": NOT_FOUND}
    )
    result = refresh_names(store, moved, T1)

    assert [rule.rule_id for rule in result.changed] == [api_web.rule_id, api_db.rule_id]
    assert all(rule.addresses == ("198.51.100.9/32", "198.51.100.10/32") for rule in result.changed)
    assert result.failed == {"cdn.example.com": "cannot resolve cdn.example.com: Name or service not known"}
    after = {rule.rule_id: rule for rule in store.rules()}
    assert after[api_web.rule_id] == result.changed[0]
    assert after[api_web.rule_id].resolved_at == "2024-05-01T12:05:00Z"
    assert after[cdn.rule_id] == cdn  # old addresses and resolved_at kept
    assert after[literal.rule_id] == literal

    unchanged = refresh_names(store, moved, T1)
    assert unchanged.changed == []
