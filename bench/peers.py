"""The agent's measured cost beside what operators report for the agents they compare it with.

The peers' figures are not measured here: they are what their users and maintainers
reported on their own hosts and workloads (each row names where), so the comparison is
of orders of magnitude, not of ratios. Ours come from the recorded run's agent phase.
"""

from __future__ import annotations

from bench.markdown import DASH, Data, section, table

# agent, memory, CPU, where it was reported
PEER_REPORTS = (
    (
        "Cilium agent (per node)",
        f"330{DASH}430 MiB just after start; 1.5{DASH}3 GB with 21,000 policies",
        f"5{DASH}12 millicores idle",
        "https://github.com/cilium/cilium/issues/28772, https://github.com/cilium/cilium/issues/32940",
    ),
    (
        "Coroot node agent",
        "OOM at its 1 GiB default limit; 45 GiB seen without a limit",
        "~200 millicores (issue 11's figure)",
        "https://github.com/coroot/coroot-node-agent/issues/11, https://github.com/coroot/coroot-node-agent/issues/195",
    ),
    (
        "Falco",
        f"40{DASH}700 MB (issue 11's figure); up to 7 GB reported",
        "single-threaded hot path, up to one core",
        "https://github.com/falcosecurity/falco/issues/1482, https://github.com/falcosecurity/falco-website/pull/1114",
    ),
    (
        "bcc tcptop (a live view, no enforcement)",
        f"BCC and LLVM stay resident: our own agent held 188{DASH}214 MB that way (issue 11)",
        "13% of a core at 100,000 events/s (issue 11's figure)",
        "https://github.com/iovisor/bcc/blob/master/tools/tcptop.py",
    ),
    (
        "node_exporter (the bar operators hold agents to)",
        "tens of MB",
        "well under 1% of a core",
        "issue 11",
    ),
)


def peers_section(agent: Data) -> list[str]:
    real, idle = agent["real"], agent["idle"]
    ours = (
        f"egress-agent, this run: {agent['containers']} containers, "
        f"{agent['real_flows']['in_table']:,} flows, {agent['flows_moving_per_second']:,} moving a second",
        f"{real['VmRSS_mb']['max']:.0f} MB VmRSS (empty table: {idle['VmRSS_mb']['max']:.0f} MB)",
        f"{real['cpu_percent_of_one_core']:.1f}% of one core = {10 * real['cpu_percent_of_one_core']:.0f} "
        f"millicores (empty table: {idle['cpu_percent_of_one_core']:.1f}%)",
        "measured here: `sudo .venv/bin/python -m bench --only agent`",
    )
    lines = section(
        "The agent beside its peers",
        "Ours is measured in this run; the peers' figures are what their users and maintainers "
        "reported on their own hosts (the links), not measured here: read them as orders of magnitude.",
    )
    return lines + table(["agent", "memory", "CPU", "source"], [list(ours), *map(list, PEER_REPORTS)])
