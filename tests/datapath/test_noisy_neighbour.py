"""A noisy neighbour cannot erase anyone's accounting (issue 11).

The compiled datapath (private pins) runs by BPF_PROG_TEST_RUN on two veths of a netns
of our own, standing in for two containers' veths: A sends 1,000 datagrams
to one address while B sprays eight times more distinct flows than the flow table
holds. A's totals are exact, A's flow survives with every packet, and B's flows past
its share land, exactly counted, in B's overflow flow. The control lifts B's share:
then B's spray evicts A's flow, and only the totals still know what A sent.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from private_datapath import ip_bytes, on_one_cpu, private_datapath, udp_frame, veths
from prog_run import TC_ACT_UNSPEC, Program, skb_context

from agent.datapath import Datapath, EndpointTotals
from agent.datapath.maps import OVERFLOW_FAMILY, OVERFLOW_PROTO

pytestmark = pytest.mark.system

TABLE = 1024
SHARE = TABLE // 8  # the default share: datapath_config.flow_share 0
A_PACKETS = 1000
B_FLOWS = 8 * TABLE
A_FRAME = udp_frame("198.18.0.2", "198.51.100.7", 40000, 9444)


def b_frame(n: int) -> bytes:
    return udp_frame("198.18.0.3", f"198.51.100.{n // 60000 + 1}", 41000, n % 60000 + 1, payload_bytes=8)


@pytest.fixture
def datapath() -> Iterator[Datapath]:
    with private_datapath(TABLE) as loaded:
        yield loaded


def send(datapath: Datapath, a: int, b: int) -> None:
    """A's datagrams, then B's spray, then A's again and B's again: A's flow is the
    oldest in the table each time B sprays."""
    program_a = Program(datapath.program_fd, skb_context(a))
    program_b = Program(datapath.program_fd, skb_context(b))
    for half in range(2):
        assert all(program_a.run(A_FRAME) == TC_ACT_UNSPEC for _ in range(A_PACKETS // 2))
        spray = range(half * B_FLOWS // 2, (half + 1) * B_FLOWS // 2)
        assert all(program_b.run(b_frame(n)) == TC_ACT_UNSPEC for n in spray)


def flows_of(datapath: Datapath, ifindex: int) -> dict[tuple[int, int, int], tuple[int, int]]:
    """(family, proto, dst_port) -> (packets, bytes) of one veth's flows."""
    read = datapath.read_flows()
    return {
        (int(key["family"]), int(key["proto"]), int(key["dst_port"])): (
            int(stats["packets"]),
            int(stats["bytes"]),
        )
        for key, stats in zip(read.keys, read.stats, strict=True)
        if int(key["ifindex"]) == ifindex
    }


def test_a_noisy_neighbour_cannot_erase_anyones_accounting(datapath: Datapath) -> None:
    b_bytes = ip_bytes(b_frame(0))
    with veths(2) as (a, b), on_one_cpu():
        datapath.set_endpoint(a, 1, has_policy=False)
        datapath.set_endpoint(b, 2, has_policy=False)
        send(datapath, a, b)

    totals = datapath.read_endpoint_totals()
    assert totals[a] == EndpointTotals(A_PACKETS, A_PACKETS * ip_bytes(A_FRAME), 0, 0, 0, 0)
    overflowed = B_FLOWS - SHARE
    assert totals[b] == EndpointTotals(B_FLOWS, B_FLOWS * b_bytes, 0, 0, overflowed, overflowed * b_bytes)
    assert flows_of(datapath, a) == {(4, 17, 9444): (A_PACKETS, A_PACKETS * ip_bytes(A_FRAME))}
    b_flows = flows_of(datapath, b)
    assert b_flows.pop((OVERFLOW_FAMILY, OVERFLOW_PROTO, 0)) == (overflowed, overflowed * b_bytes)
    assert len(b_flows) == SHARE and all(counted == (1, b_bytes) for counted in b_flows.values())
    assert datapath.flows_created() == 1 + SHARE + 1  # A's, B's share, B's overflow flow: no eviction


def test_control_without_a_share_the_spray_evicts_the_quiet_flow(datapath: Datapath) -> None:
    """Proves the test above can fail: the flow table alone loses A's record."""
    datapath.set_flow_share(10 * B_FLOWS)
    with veths(2) as (a, b), on_one_cpu():
        datapath.set_endpoint(a, 1, has_policy=False)
        datapath.set_endpoint(b, 2, has_policy=False)
        send(datapath, a, b)

    a_flow = flows_of(datapath, a).get((4, 17, 9444), (0, 0))
    assert a_flow[0] < A_PACKETS  # evicted (or re-created after the first spray with half)
    assert datapath.read_endpoint_totals()[a].packets == A_PACKETS  # the totals still know
    assert datapath.read_endpoint_totals()[b].overflow_packets == 0
