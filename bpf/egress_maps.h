/* Every map key and value egress-top shares between the datapath and user space.
 *
 * Traffic direction: every counter here is about a container's *egress*, which enters
 * the host on the tc ingress hook of its host-side veth.
 *
 * The maps (bpf/egress.c), all pinned; who writes them:
 *   flows             LRU hash flow_key -> flow_stats (shared, atomic adds): datapath, on a
 *                     flow_cache miss, a write-back, and every packet the cache does not take
 *   flow_cache        array, mmap-able, FLOW_CACHE_SETS flow_cache_set per CPU: datapath, every
 *                     forwarded IPv4 packet (user space adds it to flows when reading)
 *   ifindex_counters  per-CPU hash ifindex -> ifindex_counters: datapath (veths without a
 *                     veth_counters slot, and counts moved out of one)
 *   veth_counters     array, mmap-able, VETH_COUNTER_SLOTS veth_counters per CPU: datapath,
 *                     every packet
 *   endpoints         hash ifindex -> endpoint_info: user space (which container, has rules)
 *   policy_lpm        LPM trie policy_lpm_key -> policy_rule: user space
 *   slot_rule_kinds   hash slot -> RULE_KIND_* bits: user space (which lookups can match)
 *   rule_stats        per-CPU hash rule_id -> rule_stats: datapath, on a rule match
 *   flow_shares       hash ifindex -> flow_share: datapath, when a flow is created
 *   datapath_stats    per-CPU array of STAT_* counters: datapath
 *   datapath_config   array[1] datapath_config, mmap-able: user space, field by field
 *   moved_flows       ring buffer of flow_key: datapath writes, one user-space reader
 *
 * agent/datapath/maps.py (and agent/policy.py for the policy trie) mirror these
 * layouts with struct formats and numpy dtypes; tests/datapath/test_struct_layout.py
 * compares them with what the C compiler lays out. Change both together and bump
 * EGRESS_TOP_LAYOUT with LAYOUT_VERSION (the pin directory name carries it, because
 * BPF_TABLE_PINNED reuses an existing pin without checking its layout).
 */
#ifndef EGRESS_MAPS_H
#define EGRESS_MAPS_H

#define EGRESS_TOP_LAYOUT 10

/* One flow out of one container interface. Ports are host byte order so user
 * space reads them without swapping; for ICMP/ICMPv6 src_port holds the type and
 * dst_port the code, so "ping" and "unreachable" stay distinct flows. */
struct flow_key {
	__u32 ifindex;       /* host-side veth the packet entered: names the container */
	__u8  family;        /* 4 or 6 */
	__u8  proto;         /* IP protocol number (after IPv6 extension headers); for an
	                      * unparsed packet the last next-header value read */
	__u16 src_port;
	__u16 dst_port;
	__u16 pad;
	__u8  src_addr[16];  /* IPv4 uses the first 4 bytes, the rest stays zero */
	__u8  dst_addr[16];
};

/* The aggregate flow of a veth past its flow share (see struct flow_share): family 0
 * (no real flow has it) and proto 0xff, ports and addresses zero. Every packet of a
 * flow the container could not create is counted here, so its bytes are never lost. */
#define OVERFLOW_FAMILY 0
#define OVERFLOW_PROTO 0xff

/* Cumulative per-flow counters. bytes/packets count every packet the container
 * sent, including the ones we dropped, so a blocked flow still shows what the
 * container attempted; dropped_* count the ones we dropped. bytes are IP bytes
 * (IP header included, L2 header excluded), like conntrack accounting.
 *
 * The flows map is a plain (shared) LRU hash, the counters added atomically, so they
 * stay exact when CPUs race. It used to be per-CPU; measured side by side on a real veth
 * the shared one is ~10% cheaper per packet on a hot flow (its value sits in the hash
 * element: no pointer chase to a per-CPU copy) and no dearer over 1,000 flows, and user
 * space reads one copy per flow instead of one per CPU. first_seen_ns is set by the CPU
 * that created the entry; last_seen_ns, rule_id, verdict and epoch are plain stores
 * (the last packet's). */
struct flow_stats {
	__u64 bytes;
	__u64 packets;
	__u64 first_seen_ns;  /* CLOCK_MONOTONIC_COARSE: CLOCK_MONOTONIC, a tick or two behind */
	__u64 last_seen_ns;
	__u64 dropped_bytes;
	__u64 dropped_packets;
	__u32 rule_id;        /* rule that decided the last packet, 0 if none matched */
	__u32 verdict;        /* enum verdict of the last packet */
	/* datapath_config.epoch when the flow last moved: the first packet of an epoch
	 * writes the key to the moved_flows ring buffer. Not atomic: two CPUs racing on
	 * a flow's first packet of an epoch may both announce it (user space deduplicates). */
	__u32 epoch;
	__u32 pad;
};

/* The per-CPU flow cache in front of the flows table. Why: over 1,000 flows the LRU
 * table's bucket array (1 MB) and preallocated elements (~11 MB, 4 KB vmalloc pages) cost
 * several cold cache lines and TLB misses a packet, and its counters take atomic adds; a
 * forwarded IPv4 packet whose flow sits in this CPU's cache touches one compact 128 KB
 * region and takes no atomics. Measured (bench/per_packet.py's traffic, 1,000 flows): the
 * cost follows the region's size more than anything, so it is small and dense, and has
 * ways enough (8) that 1,000 flows rarely fight over a set.
 *
 * Eight-way set-associative, FLOW_CACHE_SETS sets per CPU, the set found by a hash of the
 * IPv4 5-tuple and ifindex. The sets live in one plain array, CPU c's at
 * [c * FLOW_CACHE_SETS, (c + 1) * FLOW_CACHE_SETS) (POSSIBLE_CPUS, the possible CPUs, is
 * given by the loader), not in a per-CPU array: that one reaches each element through a
 * table of per-CPU pointers, one more dependent load a packet, and allocates each set on
 * its own. Measured side by side: 0.07-0.18x of the trivial program less per packet over
 * 1,000 flows. Each CPU still writes only its own sets.
 *
 * Only forwarded IPv4 packets of a parsed flow are cached (drops, IPv6, unparsed and
 * overflow packets go to the table as before). A miss counts
 * the packet in the table, then installs the flow in the set's first free way, or its
 * last way when none is free (so flows in the other ways stay: flows that fight over a
 * full set do not all keep missing), writing back what the evicted flow had cached.
 *
 * A cache entry's bytes and packets are what its flow counted since it was cached or
 * last written back; the flow's total is its flows entry plus each CPU's cache entry
 * (agent/datapath/flow_cache.py adds them). Counts are written back to flows on
 * eviction and on the flow's first packet of an epoch (which also refreshes the LRU
 * entry, so a hot cached flow is not evicted from the table as idle), and each
 * write-back announces the flow in moved_flows. A write-back makes seq odd, zeroes the
 * entry's counts, adds them to flows with atomics, and makes seq even again, as does a
 * new flow taking a way: a reader that sees a way's seq change between two reads of the
 * cache reads that way's flows again, so a write-back racing a read is neither missed
 * nor counted twice. Sound where stores become visible in program order (x86-64, TSO):
 * elsewhere the cache is compiled out (CACHE_FLOWS in bpf/egress.c). */
#define FLOW_CACHE_SETS 256
#define FLOW_CACHE_WAYS 8
struct flow_cache_entry {
	__u32 ifindex;   /* 0: free */
	__u32 src_addr;  /* network order, as in flow_key */
	__u32 dst_addr;
	__u16 src_port;  /* host order, as in flow_key */
	__u16 dst_port;
	__u8  proto;
	__u8  pad8;
	__u16 seq;       /* odd while a write-back or a new flow is under way; +2 for each */
	/* datapath_config.endpoints_generation when the flow's packets were last judged: while
	 * it is current (every write to endpoints, slot_rule_kinds, the policy trie or the
	 * hold flag changes it, before the write returns), a hit takes the verdict cached
	 * here, forwarded by rule_id, without looking up the endpoint or the policy: it is
	 * counted in the veth's totals and here, and nothing else (counted_as_cached in
	 * bpf/egress.c). A flow judged to be dropped is never cached. */
	__u32 generation;
	__u32 epoch;     /* datapath_config.epoch the flow was last announced in */
	__u32 rule_id;   /* of its last packet (forwarded: by an allow rule, or by none: 0) */
	__u64 bytes;     /* counted here since the last write-back */
	__u64 packets;
	__u64 first_seen_ns;  /* its flows entry's, copied when cached (a write-back re-creates
	                       * the entry with it if the LRU evicted the entry meanwhile) */
	__u64 last_seen_ns;
};
struct flow_cache_set {
	struct flow_cache_entry way[FLOW_CACHE_WAYS];
};

/* What happened to a packet the container sent. Every verdict but FORWARDED is
 * counted in dropped_* of its flow. */
enum verdict {
	VERDICT_FORWARDED = 0,
	VERDICT_DROPPED = 1,           /* a block rule matched */
	/* The container has rules but its transport header could not be reached
	 * (extension chain longer than we follow, a first fragment without it, a
	 * truncated or malformed header): judging it by a guess would let a container
	 * walk around its own port rules, so it fails closed. Its flow has ports 0. */
	VERDICT_DROPPED_UNPARSED = 2,
	/* The veth has no endpoints entry yet and the agent asked to hold unknown veths
	 * (CONFIG_F_HOLD_UNKNOWN): the container may have rules we cannot look up yet. */
	VERDICT_HELD = 3,
};

/* What the agent tells the datapath about a veth. A veth with no entry is still
 * counted (we attach on the link event, before Docker reports the container),
 * but no policy applies to it yet, unless CONFIG_F_HOLD_UNKNOWN holds it closed. */
struct endpoint_info {
	__u32 slot;   /* stable per container *name*: survives restarts, unlike ifindex */
	__u32 flags;  /* ENDPOINT_F_* */
};

#define ENDPOINT_F_POLICY 1  /* the container has rules: do the LPM lookups */

/* Which of the three LPM lookups of policy_match can match for a slot: the kinds
 * of rule it has. In the slot_rule_kinds map (slot -> RULE_KIND_* bits), written by
 * Maps.sync_policy: widened before new trie entries are written, narrowed only
 * after stale ones are deleted, so a lookup is skipped only when nothing could
 * match it. A slot with no entry gets all three lookups (fail closed). */
#define RULE_KIND_PORT 1   /* proto + port */
#define RULE_KIND_PROTO 2  /* proto, any port */
#define RULE_KIND_ANY 4    /* any proto, any port */

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

/* Hits per rule, for egress-rules: per-CPU (user space sums, last_hit_ns the max). */
struct rule_stats {
	__u64 packets;
	__u64 bytes;
	__u64 last_hit_ns;
};

/* Per-veth counters of the container's egress (packets entering the host from the
 * veth) that flows do not show, or show only in part, and the veth's exact totals,
 * whatever the flow table evicts. Per-CPU (user space sums). Bytes are IP bytes,
 * except non_ip_bytes which are frame bytes. */
struct ifindex_counters {
	/* Totals: every IPv4/IPv6 packet the veth sent, counted before anything else can
	 * fail, so they stay exact when the flow table is full (a noisy neighbour). First,
	 * so that with struct veth_counters' head they share the cache line each packet writes. */
	__u64 packets;
	__u64 bytes;
	__u64 non_ip_packets;   /* ARP, VLAN-tagged, anything not IPv4/IPv6: counted, never parsed */
	__u64 non_ip_bytes;
	__u64 dropped_packets;  /* dropped by a block rule */
	__u64 dropped_bytes;
	/* IPv4/IPv6 packets whose transport header the parser could not reach, on any
	 * veth: passed where the container has no rules, dropped where it has. A packet
	 * with a truncated IP header is counted only here (it has no addresses, so no flow). */
	__u64 unparsed_packets;
	__u64 unparsed_bytes;
	__u64 unparsed_dropped_packets;  /* the part of unparsed_* dropped: VERDICT_DROPPED_UNPARSED */
	__u64 unparsed_dropped_bytes;
	__u64 held_packets;     /* IP packets dropped while the veth was unknown: VERDICT_HELD */
	__u64 held_bytes;
	/* The part of the totals counted in the veth's overflow flow (OVERFLOW_PROTO)
	 * because the veth had used its flow share of the epoch. */
	__u64 overflow_packets;
	__u64 overflow_bytes;
};

/* Where a veth's counters live: the array veth_counters, CPU c's slots at
 * [c * VETH_COUNTER_SLOTS, (c + 1) * VETH_COUNTER_SLOTS), indexed by
 * ifindex % VETH_COUNTER_SLOTS there, holds the copy of the veth that claimed the slot on
 * that CPU (an inlined array lookup, no hashing); a veth whose slot another veth holds
 * uses the per-CPU hash ifindex_counters instead. A claim held by a veth with no
 * endpoints entry (gone, or not tagged yet) is taken over by the next veth that needs
 * the slot, after its counts are added to its hash entry, so nothing is lost. User
 * space sums both maps per ifindex. */
#define VETH_COUNTER_SLOTS 1024
struct veth_counters {
	__u32 ifindex;  /* the claimant on this CPU, 0 when free */
	/* The claimant's endpoints entry and slot_rule_kinds, as read while
	 * datapath_config.endpoints_generation was cached_generation (0: nothing cached). */
	__u32 cached_generation;
	__u32 cached_slot;
	__u32 cached_flags;   /* its ENDPOINT_F_* | ENDPOINT_CACHED_KNOWN when it had an entry */
	__u32 cached_rule_kinds;
	__u32 pad;
	struct ifindex_counters counters;
};
#define ENDPOINT_CACHED_KNOWN (1u << 31)

/* How many flows a veth created in the current epoch (map flow_shares, shared, keyed
 * by ifindex): past datapath_config.flow_share, new flows go to its overflow flow,
 * so one container cannot push everyone else's flows out of the LRU table. Written
 * only when a flow is created; the check and the increment are not one atomic step,
 * so racing CPUs may overshoot the share by a few. */
struct flow_share {
	__u32 epoch;
	__u32 created;
};

/* Settings user space gives the datapath: one element, index 0, in an array. */
struct datapath_config {
	__u32 flags;  /* CONFIG_F_* */
	__u32 epoch;  /* bumped by the agent at each read: see flow_stats.epoch */
	__u32 flow_share;  /* flows one veth may create per epoch; 0: FLOW_TABLE_SIZE / 8 */
	/* A new value (never 0) after every write to endpoints, slot_rule_kinds, the policy
	 * trie or flags: the copies cached in veth_counters and the verdicts cached in the
	 * flow cache from an older one are read and judged again. */
	__u32 endpoints_generation;
};

/* Drop IP packets from veths that have no endpoints entry, until the agent has told
 * us whose they are (fail closed from a container's first packet). Non-IP frames
 * (ARP) still pass, so neighbour resolution is not delayed by a retransmit timer. */
#define CONFIG_F_HOLD_UNKNOWN 1

/* Global counters, index into the datapath_stats per-CPU array. */
enum datapath_stat {
	STAT_FLOWS_CREATED = 0,   /* minus live flows = flows the LRU evicted */
	STAT_FLOW_UPDATE_FAILED = 1,
	STAT_MOVED_LOST = 2,      /* moved_flows ring buffer full: user space must read everything */
	STAT_MAX = 3,
};

/* moved_flows: a BPF ring buffer of struct flow_key records, one each time a flow's
 * entry first moves in an epoch (not before the first bump: epoch 0 is
 * silent). The agent bumps the epoch, reads the keys and looks up just those flows;
 * STAT_MOVED_LOST growing means some were lost and a full read is due. */
#define MOVED_FLOWS_BYTES (1 << 22)

#endif
