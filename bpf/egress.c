/* egress-top datapath: runs on the tc ingress hook of each container's host-side
 * veth, which is where the container's *egress* enters the host.
 *
 * Built by BCC (agent/datapath.py) with these -D values:
 *   FLOW_TABLE_SIZE, POLICY_TABLE_SIZE, PIN_FLOWS, PIN_ENDPOINTS, PIN_POLICY,
 *   PIN_RULE_STATS, PIN_IFINDEX_COUNTERS, PIN_DATAPATH_STATS
 * Every map is pinned so enforcement and counters outlive the process that loaded
 * the program (the tc filter keeps the program itself alive).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

#include "egress_maps.h"

BPF_TABLE_PINNED("lru_hash", struct flow_key, struct flow_stats, flows, FLOW_TABLE_SIZE, PIN_FLOWS);
BPF_TABLE_PINNED("hash", __u32, struct endpoint_info, endpoints, 4096, PIN_ENDPOINTS);
BPF_TABLE_PINNED("lpm_trie", struct policy_lpm_key, struct policy_rule, policy_lpm,
		 POLICY_TABLE_SIZE, PIN_POLICY, BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", __u32, struct rule_stats, rule_stats, POLICY_TABLE_SIZE, PIN_RULE_STATS);
BPF_TABLE_PINNED("hash", __u32, struct ifindex_counters, ifindex_counters, 4096, PIN_IFINDEX_COUNTERS);
BPF_TABLE_PINNED("percpu_array", __u32, __u64, datapath_stats, STAT_MAX, PIN_DATAPATH_STATS);

/* IPv6 extension headers we step over to find the transport header. Six covers
 * every sane chain (hop-by-hop, routing, fragment, destination options, AH). */
#define MAX_IPV6_EXT_HEADERS 6
#define IPV6_FRAG_OFFSET_MASK 0xfff8
#define IPV4_FRAG_OFFSET_MASK 0x1fff

/* Rank of a match at equal address prefix: port beats protocol beats neither. */
#define RANK_ANY 0
#define RANK_PROTO 1
#define RANK_PORT 2

static __always_inline void stat_inc(__u32 index)
{
	__u64 *value = datapath_stats.lookup(&index);
	if (value)
		*value += 1;  /* per-CPU slot: no atomics needed */
}

static __always_inline int has_ports(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
}

/* Reads ports (or ICMP type/code) at l4_off; a non-first fragment has none. */
static __always_inline void load_l4(struct __sk_buff *skb, struct flow_key *key, __u32 l4_off)
{
	if (has_ports(key->proto)) {
		__be16 ports[2];
		if (bpf_skb_load_bytes(skb, l4_off, ports, sizeof(ports)) == 0) {
			key->src_port = bpf_ntohs(ports[0]);
			key->dst_port = bpf_ntohs(ports[1]);
		}
	} else if (key->proto == IPPROTO_ICMP || key->proto == IPPROTO_ICMPV6) {
		__u8 type_code[2];
		if (bpf_skb_load_bytes(skb, l4_off, type_code, sizeof(type_code)) == 0) {
			key->src_port = type_code[0];
			key->dst_port = type_code[1];
		}
	}
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, struct flow_key *key)
{
	struct iphdr ip;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return -1;
	key->family = 4;
	key->proto = ip.protocol;
	__builtin_memcpy(key->src_addr, &ip.saddr, 4);
	__builtin_memcpy(key->dst_addr, &ip.daddr, 4);
	if ((bpf_ntohs(ip.frag_off) & IPV4_FRAG_OFFSET_MASK) == 0)
		load_l4(skb, key, ETH_HLEN + ip.ihl * 4);
	return 0;
}

static __always_inline int parse_ipv6(struct __sk_buff *skb, struct flow_key *key)
{
	struct ipv6hdr ip6;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
		return -1;
	key->family = 6;
	__builtin_memcpy(key->src_addr, &ip6.saddr, 16);
	__builtin_memcpy(key->dst_addr, &ip6.daddr, 16);

	__u8 next = ip6.nexthdr;
	__u32 off = ETH_HLEN + sizeof(ip6);
#pragma unroll
	for (int i = 0; i < MAX_IPV6_EXT_HEADERS; i++) {
		__u8 ext[4];
		if (next != IPPROTO_HOPOPTS && next != IPPROTO_ROUTING && next != IPPROTO_DSTOPTS &&
		    next != IPPROTO_FRAGMENT && next != IPPROTO_AH)
			break;
		if (bpf_skb_load_bytes(skb, off, ext, sizeof(ext)) < 0)
			break;
		if (next == IPPROTO_FRAGMENT) {
			__u16 frag = ((__u16)ext[2] << 8) | ext[3];
			next = ext[0];
			off += 8;
			if (frag & IPV6_FRAG_OFFSET_MASK) {
				key->proto = next;  /* later fragment: protocol known, ports are not */
				return 0;
			}
			continue;
		}
		/* AH counts its length in 4-byte units minus 2, the others in 8-byte units minus 1 */
		off += next == IPPROTO_AH ? ((__u32)ext[1] + 2) * 4 : ((__u32)ext[1] + 1) * 8;
		next = ext[0];
	}
	key->proto = next;
	load_l4(skb, key, off);
	return 0;
}

/* Keeps the more specific of the current best and a new match (see agent/policy.py). */
static __always_inline void prefer(struct policy_rule **best, int *best_rank, struct policy_rule *match, int rank)
{
	if (!match)
		return;
	if (!*best || match->addr_prefixlen > (*best)->addr_prefixlen ||
	    (match->addr_prefixlen == (*best)->addr_prefixlen && rank > *best_rank)) {
		*best = match;
		*best_rank = rank;
	}
}

/* Three lookups, never a loop over rules: (proto, port), (proto, any), (any, any).
 * Each LPM lookup already returns the longest address prefix for that pair. */
static __always_inline struct policy_rule *policy_match(struct flow_key *key, __u32 slot)
{
	struct policy_lpm_key pk = {};
	struct policy_rule *best = 0;
	int best_rank = RANK_ANY;

	pk.prefixlen = POLICY_KEY_FIXED_BITS + (key->family == 4 ? 32 : 128);
	pk.slot = slot;
	pk.family = key->family;
	__builtin_memcpy(pk.addr, key->dst_addr, 16);
	pk.proto = key->proto;
	if (has_ports(key->proto) && key->dst_port) {
		pk.port = key->dst_port;
		prefer(&best, &best_rank, policy_lpm.lookup(&pk), RANK_PORT);
	}
	pk.port = 0;
	prefer(&best, &best_rank, policy_lpm.lookup(&pk), RANK_PROTO);
	pk.proto = 0;
	prefer(&best, &best_rank, policy_lpm.lookup(&pk), RANK_ANY);
	return best;
}

static __always_inline void count_rule_hit(__u32 rule_id, __u64 bytes, __u64 packets, __u64 now)
{
	struct rule_stats zero = {};
	struct rule_stats *hits = rule_stats.lookup_or_try_init(&rule_id, &zero);
	if (!hits)
		return;
	__sync_fetch_and_add(&hits->packets, packets);
	__sync_fetch_and_add(&hits->bytes, bytes);
	hits->last_hit_ns = now;
}

static __always_inline struct ifindex_counters *counters_of(__u32 ifindex)
{
	struct ifindex_counters zero = {};
	return ifindex_counters.lookup_or_try_init(&ifindex, &zero);
}

static __always_inline void count_flow(struct flow_key *key, __u64 bytes, __u64 packets, __u64 now,
				       __u32 rule_id, __u32 verdict)
{
	struct flow_stats *st = flows.lookup(key);
	if (!st) {
		struct flow_stats fresh = {};
		fresh.first_seen_ns = now;
		/* NOEXIST: another CPU may have created it meanwhile, then we just add to it */
		if (flows.insert(key, &fresh) == 0)
			stat_inc(STAT_FLOWS_CREATED);
		st = flows.lookup(key);
		if (!st) {
			stat_inc(STAT_FLOW_UPDATE_FAILED);
			return;
		}
	}
	__sync_fetch_and_add(&st->bytes, bytes);
	__sync_fetch_and_add(&st->packets, packets);
	st->last_seen_ns = now;
	st->rule_id = rule_id;
	st->verdict = verdict;
	if (verdict == VERDICT_DROPPED) {
		__sync_fetch_and_add(&st->dropped_bytes, bytes);
		__sync_fetch_and_add(&st->dropped_packets, packets);
	}
}

int egress_top_ingress(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	/* A GSO super-packet stands for gso_segs wire packets. */
	__u64 packets = skb->gso_segs > 1 ? skb->gso_segs : 1;
	struct flow_key key = {};
	key.ifindex = ifindex;

	int parsed = -1;
	if (skb->protocol == bpf_htons(ETH_P_IP))
		parsed = parse_ipv4(skb, &key);
	else if (skb->protocol == bpf_htons(ETH_P_IPV6))
		parsed = parse_ipv6(skb, &key);
	if (parsed < 0) {
		/* ARP, VLAN-tagged frames, truncated headers: counted, never judged */
		struct ifindex_counters *c = counters_of(ifindex);
		if (c) {
			__sync_fetch_and_add(&c->non_ip_packets, packets);
			__sync_fetch_and_add(&c->non_ip_bytes, skb->len);
		}
		return TC_ACT_UNSPEC;
	}

	__u64 bytes = skb->len > ETH_HLEN ? skb->len - ETH_HLEN : 0;
	__u64 now = bpf_ktime_get_ns();
	__u32 rule_id = 0;
	__u32 verdict = VERDICT_FORWARDED;

	struct endpoint_info *ep = endpoints.lookup(&ifindex);
	if (ep && (ep->flags & ENDPOINT_F_POLICY)) {
		struct policy_rule *rule = policy_match(&key, ep->slot);
		if (rule) {
			rule_id = rule->rule_id;
			if (rule->action == POLICY_DROP)
				verdict = VERDICT_DROPPED;
			count_rule_hit(rule_id, bytes, packets, now);
		}
	}

	count_flow(&key, bytes, packets, now, rule_id, verdict);
	if (verdict == VERDICT_DROPPED) {
		struct ifindex_counters *c = counters_of(ifindex);
		if (c) {
			__sync_fetch_and_add(&c->dropped_packets, packets);
			__sync_fetch_and_add(&c->dropped_bytes, bytes);
		}
		return TC_ACT_SHOT;
	}
	/* UNSPEC, not OK: other classifiers on this hook still see the packet */
	return TC_ACT_UNSPEC;
}
