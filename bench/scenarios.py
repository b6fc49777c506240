"""What sits in the container's path in each throughput scenario: nothing, a trivial tc
program, our program (counting, or with non-matching rules), iptables rules, an nftables set."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import time
from collections.abc import Iterator

from agent.datapath import Datapath, detach
from agent.datapath.attach import attach
from agent.datapath.maps import pinned_flow_table_size
from agent.datapath.program import load_cached_build
from agent.policy import POLICY_ALLOW, POLICY_DROP, LpmEntry
from bench.bpf_stats import ONE_HASHED_SLOT_PER_FLOW, ONE_SLOT_PER_FLOW, TRIVIAL, BenchProgram, BenchSource
from bench.environment import IPTABLES_HOOK_CHAIN, NETWORK_BRIDGE, NFT_TABLE, sh

# Rule contents only, never a destination: shared address space (RFC 6598).
NON_MATCHING = ipaddress.IPv4Network("100.64.0.0/10")
BENCH_SLOT = 4242  # policy slot of the client's veth; the rule store is not involved
BASELINE = "no program"
CONTROL = "no program (control)"


def non_matching_addresses(count: int) -> list[ipaddress.IPv4Address]:
    first = int(NON_MATCHING.network_address)
    return [ipaddress.IPv4Address(first + n) for n in range(count)]


class Scenario:
    """One configuration of the packet path. load() once (rules can be slow to write),
    setup()/teardown() around each turn, unload() at the end."""

    kind = "baseline"

    def __init__(self, rules: int = 0, name: str = BASELINE):
        self.rules = rules
        self.name = name

    def load(self) -> None:
        pass

    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    def unload(self) -> None:
        pass


class EgressTop(Scenario):
    """Our program on the client's veth; with rules, the veth is tagged as having policy
    and the trie holds exactly `rules` non-matching /32s (half block, half allow) for
    its slot, so every packet pays the three LPM lookups."""

    kind = "egress-top"

    def __init__(self, datapath: Datapath, ifindex: int, rules: int):
        super().__init__(rules, f"egress-top, {rules:,} rules" if rules else "egress-top counting")
        self.datapath, self.ifindex = datapath, ifindex
        self.entries = [
            (entry.key_bytes(), entry.value_bytes())
            for entry in (
                LpmEntry(4, BENCH_SLOT, 0, 0, address.packed, 32, n + 1, (POLICY_DROP, POLICY_ALLOW)[n % 2])
                for n, address in enumerate(non_matching_addresses(rules))
            )
        ]
        self.policy_write_seconds: list[float] = []
        self.program_fd = -1  # the load setup() attached

    def setup(self) -> None:
        if self.rules:
            started = time.perf_counter()
            self.datapath.sync_policy(self.entries)  # only this scenario's rules: a trie of `rules`
            self.policy_write_seconds.append(time.perf_counter() - started)
        self.datapath.set_endpoint(self.ifindex, BENCH_SLOT, has_policy=bool(self.rules))
        self.program_fd = fresh_load(self.datapath)
        attach(self.ifindex, self.program_fd)

    def teardown(self) -> None:
        detach(self.ifindex)
        os.close(self.program_fd)
        self.datapath.set_endpoint(self.ifindex, BENCH_SLOT, has_policy=False)

    def unload(self) -> None:
        self.datapath.sync_policy([])


def fresh_load(datapath: Datapath) -> int:
    """Our program loaded again from the program cache (its pinned maps shared): an fd of
    ours, the caller's to close. Each load puts the JIT image somewhere new, and where it
    lands moves its cost per packet by up to 15% (six loads of one build side by side, 1,000
    flows: 2.48-2.84x the trivial program); a turn per load makes the rounds' median that of a
    host's loads, not of the one this run happened to get."""
    fd = load_cached_build(pinned_flow_table_size(datapath.pin_dir) or 0, datapath.pin_dir)
    return fd if fd is not None else os.dup(datapath.program_fd)


class Trivial(Scenario):
    """`return TC_ACT_OK` where our program goes: the floor a tc program costs."""

    kind = "trivial"
    source: BenchSource = TRIVIAL

    def __init__(self, ifindex: int, name: str = "trivial tc program"):
        super().__init__(0, name)
        self.ifindex = ifindex
        self.program: BenchProgram | None = None

    def load(self) -> None:
        self.program = BenchProgram(self.source)

    def setup(self) -> None:
        assert self.program is not None
        self.program.attach(self.ifindex)

    def teardown(self) -> None:
        BenchProgram.detach(self.ifindex)

    def unload(self) -> None:
        if self.program is not None:
            self.program.close()


class OneSlotPerFlow(Trivial):
    """One 64-byte per-CPU counter per flow, found by the destination port: the floor of
    counting flows (bench/bpf_stats.py ONE_SLOT_PER_FLOW says why)."""

    kind = "one slot per flow"
    source = ONE_SLOT_PER_FLOW

    def __init__(self, ifindex: int):
        super().__init__(ifindex, "one counter slot per flow")


class OneHashedSlotPerFlow(Trivial):
    """The same slot found by a hash of the destination port: the floor of counting flows
    found by hashing (bench/bpf_stats.py ONE_HASHED_SLOT_PER_FLOW)."""

    kind = "one hashed slot per flow"
    source = ONE_HASHED_SLOT_PER_FLOW

    def __init__(self, ifindex: int):
        super().__init__(ifindex, "one hashed counter slot per flow")


class Iptables(Scenario):
    """`rules` non-matching rules (half DROP, half ACCEPT) in a chain of our own, jumped to
    from DOCKER-USER for the container bridge's traffic: what a firewall-based tool does."""

    kind = "iptables"

    def __init__(self, rules: int):
        super().__init__(rules, f"iptables, {rules:,} rules")
        self.chain = f"ettb-r{rules}"

    def load(self) -> None:
        targets = ("DROP", "ACCEPT")
        lines = [
            "*filter",
            f":{self.chain} - [0:0]",
            *(
                f"-A {self.chain} -d {address}/32 -j {targets[n % 2]}"
                for n, address in enumerate(non_matching_addresses(self.rules))
            ),
            "COMMIT",
            "",
        ]
        sh("iptables-restore", "--noflush", stdin="\n".join(lines), timeout=600)

    def setup(self) -> None:
        sh("iptables", "-I", IPTABLES_HOOK_CHAIN, "1", "-i", NETWORK_BRIDGE, "-j", self.chain)

    def teardown(self) -> None:
        # by position (by value, iptables-nft would fetch the whole 100k-rule ruleset)
        first = sh("iptables", "-S", IPTABLES_HOOK_CHAIN, "1")
        if f"-j {self.chain}" in first:
            sh("iptables", "-D", IPTABLES_HOOK_CHAIN, "1")

    def unload(self) -> None:
        sh("iptables", "-F", self.chain)
        sh("iptables", "-X", self.chain)


class NftSet(Scenario):
    """`rules` addresses in an nftables set, one rule `ip daddr @set drop` in a chain on
    the forward hook: the way to do it with the kernel's own firewall."""

    kind = "nftables"

    def __init__(self, rules: int):
        super().__init__(rules, f"nftables set, {rules:,} elements")
        self.set = f"r{rules}"

    def load(self) -> None:
        elements = ", ".join(map(str, non_matching_addresses(self.rules)))
        body = f"elements = {{ {elements} }}" if elements else ""
        sh(
            "nft",
            "-f",
            "-",
            stdin=f"table inet {NFT_TABLE} {{\n set {self.set} {{ type ipv4_addr; {body} }}\n}}\n",
        )

    def setup(self) -> None:
        sh(
            "nft",
            "-f",
            "-",
            stdin=f"add chain inet {NFT_TABLE} forward {{ type filter hook forward priority 0; }}\n"
            f"add rule inet {NFT_TABLE} forward ip daddr @{self.set} drop\n",
        )

    def teardown(self) -> None:
        sh("nft", "delete", "chain", "inet", NFT_TABLE, "forward")

    def unload(self) -> None:
        sh("nft", "delete", "set", "inet", NFT_TABLE, self.set)


@contextlib.contextmanager
def loaded(scenarios: list[Scenario]) -> Iterator[None]:
    """Every scenario's rules written once, removed at the end whatever happens."""
    try:
        for scenario in scenarios:
            scenario.load()
        yield
    finally:
        for scenario in scenarios:
            with contextlib.suppress(Exception):
                scenario.unload()
