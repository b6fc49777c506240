"""Which rules are in force, as a pure function of rules, inventory and what the kernel
holds (the system tests read the real tc filters and maps), and how the screen says it."""

from __future__ import annotations

from agent.enforcement_state import enforcement_states, not_enforced
from agent.model import Container, Endpoint, Inventory, Snapshot, TableFill
from agent.plain import enforcement_warning, format_plain
from agent.policy import Rule
from agent.tui import HostInfo, ViewState, _header


def rule(rule_id: int, container: str) -> Rule:
    return Rule(
        rule_id,
        container,
        "198.18.0.7/32",
        "cidr",
        None,
        "any",
        "block",
        "2024-05-01T12:00:00Z",
        ("198.18.0.7/32",),
    )


def endpoint(ifindex: int, network: str = "net1") -> Endpoint:
    return Endpoint(
        ifindex=ifindex, veth=f"veth{ifindex}", network=network, bridge="br0", ipv4=None, ipv6=None
    )


INVENTORY = Inventory(
    containers=(
        Container(id="a" * 64, name="web", image="i", endpoints=(endpoint(10), endpoint(11, "net2"))),
        Container(
            id="b" * 64,
            name="host1",
            image="i",
            unobservable_reason="host network: its traffic crosses no veth",
        ),
        Container(id="c" * 64, name="sidecar", image="i", netns_owner="web"),
    )
)


def test_each_container_with_rules_gets_its_live_state() -> None:
    rules = [rule(1, "web"), rule(2, "web"), rule(3, "host1"), rule(4, "sidecar"), rule(5, "later")]
    states = enforcement_states(rules, INVENTORY, filtered={10, 11}, tagged={10, 11})
    assert {name: state.text for name, state in states.items()} == {
        "web": "enforced on 2 veths",
        "host1": "container running but NOT enforced: host network: its traffic crosses no veth",
        "sidecar": "container running but NOT enforced: shares the network namespace of web (counted there)",
        "later": "pending: no such container running",
    }
    assert not_enforced(states) == ["host1", "sidecar"]


def test_a_veth_without_filter_or_tag_is_not_enforced() -> None:
    for filtered, tagged in (({10}, {10, 11}), ({10, 11}, {11})):
        state = enforcement_states([rule(1, "web")], INVENTORY, filtered, tagged)["web"]
        assert (state.state, state.enforced_veths, state.text) == (
            "not-enforced",
            1,
            "container running but NOT enforced on 1 of 2 veths",
        )


def test_the_header_warns_while_a_container_is_not_enforced() -> None:
    quiet = Snapshot(time=0.0, interval=1.0, stats=(), unobservable=(), table=TableFill(0, 1024, 0))
    assert enforcement_warning(quiet) is None and "WARNING" not in format_plain(quiet)
    loud = Snapshot(
        time=0.0, interval=1.0, stats=(), unobservable=(), table=TableFill(0, 1024, 0), not_enforced=("web",)
    )
    assert format_plain(loud).splitlines()[1] == "WARNING: rules NOT enforced for web (see egress-rules)"
    header = _header(loud, ViewState(), HostInfo("h", "k"))
    warning = "WARNING: rules NOT enforced for web (see egress-rules)"
    start = header.plain.index(warning)
    assert any(span.start <= start < span.end and "red" in str(span.style) for span in header.spans)
