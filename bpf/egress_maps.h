/* Every map key and value egress-top shares between the datapath and user space.
 *
 * agent/datapath.py mirrors these layouts with ctypes/numpy dtypes; change both
 * together and bump EGRESS_TOP_LAYOUT (the pin directory name carries it, because
 * BPF_TABLE_PINNED reuses an existing pin without checking its layout).
 */
#ifndef EGRESS_MAPS_H
#define EGRESS_MAPS_H

#define EGRESS_TOP_LAYOUT 1

/* One flow out of one container interface. Ports are host byte order so user
 * space reads them without swapping; for ICMP/ICMPv6 src_port holds the type and
 * dst_port the code, so "ping" and "unreachable" stay distinct flows. */
struct flow_key {
	__u32 ifindex;       /* host-side veth the packet entered: names the container */
	__u8  family;        /* 4 or 6 */
	__u8  proto;         /* IP protocol number (after IPv6 extension headers) */
	__u16 src_port;
	__u16 dst_port;
	__u16 pad;
	__u8  src_addr[16];  /* IPv4 uses the first 4 bytes, the rest stays zero */
	__u8  dst_addr[16];
};

/* Cumulative per-flow counters. bytes/packets count every packet the container
 * sent, including the ones we dropped, so a blocked flow still shows what the
 * container attempted; dropped_* count the ones we dropped. bytes are IP bytes
 * (IP header included, L2 header excluded), like conntrack accounting. */
struct flow_stats {
	__u64 bytes;
	__u64 packets;
	__u64 first_seen_ns;  /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 last_seen_ns;
	__u64 dropped_bytes;
	__u64 dropped_packets;
	__u32 rule_id;        /* rule that decided the last packet, 0 if none matched */
	__u32 verdict;        /* enum verdict of the last packet */
};

enum verdict {
	VERDICT_FORWARDED = 0,
	VERDICT_DROPPED = 1,
};

/* What the agent tells the datapath about a veth. A veth with no entry is still
 * counted (we attach on the link event, before Docker reports the container),
 * but no policy applies to it yet. */
struct endpoint_info {
	__u32 slot;   /* stable per container *name*: survives restarts, unlike ifindex */
	__u32 flags;  /* ENDPOINT_F_* */
};

#define ENDPOINT_F_POLICY 1  /* the container has rules: do the LPM lookups */

/* Policy: one LPM trie for every container and both families. The slot,
 * protocol, family and port come first and are always matched in full
 * (prefixlen >= POLICY_KEY_FIXED_BITS), so each container effectively has its own
 * trie per family without a map-in-map, and ::/0 never matches IPv4. A rule with
 * no protocol or port is stored with proto 0 / port 0. */
struct policy_lpm_key {
	__u32 prefixlen;  /* POLICY_KEY_FIXED_BITS + address prefix length */
	__u32 slot;
	__u8  proto;
	__u8  family;     /* 4 or 6 */
	__u16 port;       /* destination port, host byte order */
	__u8  addr[16];   /* IPv4 in the first 4 bytes, as in flow_key */
};

#define POLICY_KEY_FIXED_BITS 64  /* slot(32) + proto(8) + family(8) + port(16) */

struct policy_rule {
	__u32 rule_id;      /* index into rule_stats, never 0 */
	__u8  action;       /* enum policy_action */
	__u8  addr_prefixlen;  /* copied from the key: the datapath compares matches */
	__u16 pad;
};

enum policy_action {
	POLICY_ALLOW = 0,
	POLICY_DROP = 1,
};

/* Hits per rule, for egress-rules. */
struct rule_stats {
	__u64 packets;
	__u64 bytes;
	__u64 last_hit_ns;
};

/* Per-veth counters for what is not a flow. */
struct ifindex_counters {
	__u64 non_ip_packets;   /* ARP, VLAN-tagged, anything not IPv4/IPv6: counted, never parsed */
	__u64 non_ip_bytes;
	__u64 dropped_packets;  /* dropped by policy */
	__u64 dropped_bytes;
};

/* Global counters, index into the datapath_stats per-CPU array. */
enum datapath_stat {
	STAT_FLOWS_CREATED = 0,   /* minus live flows = flows the LRU evicted */
	STAT_FLOW_UPDATE_FAILED = 1,
	STAT_MAX = 2,
};

#endif
