/* egress-top datapath: runs on the tc ingress hook of each container's host-side
 * veth, which is where the container's *egress* enters the host.
 *
 * Built by BCC (agent/datapath/loader.py, in a short-lived child) with these -D values:
 *   FLOW_TABLE_SIZE, POLICY_TABLE_SIZE, PIN_FLOWS, PIN_ENDPOINTS, PIN_POLICY,
 *   PIN_RULE_STATS, PIN_IFINDEX_COUNTERS, PIN_DATAPATH_STATS, PIN_DATAPATH_CONFIG,
 *   PIN_SLOT_RULE_KINDS, PIN_VETH_COUNTERS, PIN_FLOW_SHARES, PIN_MOVED_FLOWS, PIN_FLOW_CACHE
 * Every map is pinned so enforcement and counters outlive the process that loaded
 * the program (the tc filter keeps the program itself alive).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

/* The IPv4 protocol numbers (IANA's, fixed), not <uapi/linux/in.h>: under BCC's kernel
 * include paths it pulls in the kernel's socket headers, parsed in each of BCC's three
 * passes, which doubled the compile (1.1 s -> 0.55 s CPU without it; the same
 * instructions). The IPv6 ones come with ipv6.h (in6.h). */
#define IPPROTO_ICMP 1
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define IPPROTO_AH 51
#define IPPROTO_SCTP 132

#include "egress_maps.h"

/* The per-veth counters the datapath writes on every packet are per-CPU (each CPU its own
 * slots of veth_counters, below): no atomics, no shared cache lines. The flow table is not
 * (struct flow_stats says why): atomic adds. */
BPF_TABLE_PINNED("lru_hash", struct flow_key, struct flow_stats, flows, FLOW_TABLE_SIZE, PIN_FLOWS);
BPF_TABLE_PINNED("hash", __u32, struct endpoint_info, endpoints, 4096, PIN_ENDPOINTS);
BPF_TABLE_PINNED("lpm_trie", struct policy_lpm_key, struct policy_rule, policy_lpm,
		 POLICY_TABLE_SIZE, PIN_POLICY, BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", __u32, __u32, slot_rule_kinds, 4096, PIN_SLOT_RULE_KINDS);
BPF_TABLE_PINNED("percpu_hash", __u32, struct rule_stats, rule_stats, POLICY_TABLE_SIZE, PIN_RULE_STATS);
BPF_TABLE_PINNED("percpu_hash", __u32, struct ifindex_counters, ifindex_counters, 4096, PIN_IFINDEX_COUNTERS);
BPF_TABLE_PINNED("hash", __u32, struct flow_share, flow_shares, 4096, PIN_FLOW_SHARES);
#ifndef POSSIBLE_CPUS
#error "POSSIBLE_CPUS (the possible CPUs) must be given: agent/datapath/loader.py does"
#endif
/* Plain arrays with a region per CPU ([cpu * per-CPU entries, ...), each CPU writing only
 * its own: a per-CPU array reaches an element through a table of per-CPU pointers, one more
 * dependent load a packet (struct flow_cache_set measures it), and cannot be mapped.
 * Mappable, so the agent copies them with one memcpy a read instead of a batch lookup
 * (the flow cache's 256 KB for two CPUs: 188 -> 12 us, read twice a refresh). */
BPF_TABLE_PINNED("array", __u32, struct veth_counters, veth_counters, POSSIBLE_CPUS * VETH_COUNTER_SLOTS,
		 PIN_VETH_COUNTERS, BPF_F_MMAPABLE);
BPF_TABLE_PINNED("array", __u32, struct flow_cache_set, flow_cache, POSSIBLE_CPUS * FLOW_CACHE_SETS,
		 PIN_FLOW_CACHE, BPF_F_MMAPABLE);
BPF_TABLE_PINNED("percpu_array", __u32, __u64, datapath_stats, STAT_MAX, PIN_DATAPATH_STATS);
/* Mappable: user space writes each field in place (a 4-byte store), so the agent bumping
 * the epoch can never undo another process setting the flags, as a whole-value update could. */
BPF_TABLE_PINNED("array", __u32, struct datapath_config, datapath_config, 1, PIN_DATAPATH_CONFIG,
		 BPF_F_MMAPABLE);

/* BPF_RINGBUF_OUTPUT with a pin: BCC pins a map whose section names a path after ':'. */
struct moved_flows_table_t {
	int key;
	__u32 leaf;
	int (*ringbuf_output)(void *, __u64, __u64);
	void *(*ringbuf_reserve)(__u64);
	void (*ringbuf_discard)(void *, __u64);
	void (*ringbuf_submit)(void *, __u64);
	__u32 max_entries;
};
__attribute__((section("maps/ringbuf:" PIN_MOVED_FLOWS)))
struct moved_flows_table_t moved_flows = {.max_entries = MOVED_FLOWS_BYTES};

/* IPv6 extension headers we step over to find the transport header: the ones the
 * receiving Linux stack steps over (ipv6_ext_hdr()). RFC 8200's recommended chain
 * (hop-by-hop, destination options, routing, fragment, AH, destination options) has
 * six; a longer chain is unparsed (see enum verdict). */
#define MAX_IPV6_EXT_HEADERS 6
#define IPV6_FRAG_OFFSET_MASK 0xfff8
#define IPV4_FRAG_OFFSET_MASK 0x1fff

/* How far the parser got. Only PARSE_OK gives a flow key policy can judge. */
enum parse_result {
	PARSE_OK = 0,
	PARSE_UNPARSED = 1,       /* addresses and (as far as known) proto read, transport header not */
	PARSE_NO_IP_HEADER = 2,   /* IPv4/IPv6 ethertype, but the IP header is truncated */
	PARSE_NOT_IP = 3,
};

/* Rank of a match at equal address prefix: port beats protocol beats neither. */
#define RANK_ANY 0
#define RANK_PROTO 1
#define RANK_PORT 2

/* Timestamps are CLOCK_MONOTONIC_COARSE (bpf_ktime_get_coarse_ns, see now_ns): the same
 * clock as CLOCK_MONOTONIC, behind it by up to the last timekeeping update (a tick or two,
 * one more from now_ns's cache), for a fraction of a precise read's cost (~35 ns per packet
 * here). User space allows for it (flow_maps.COARSE_CLOCK_SLACK_NS). */

/* The coarse clock read once per jiffy per CPU: jiffies64 is a plain load, a coarse
 * clock read is not (measured ~25 ns less per packet). Private to the program: nobody
 * else reads it, so it is not pinned. */
struct clock_cache {
	__u64 jiffies;
	__u64 ns;
};
BPF_PERCPU_ARRAY(clock_cache, struct clock_cache, 1);

static __always_inline __u64 now_ns(void)
{
	__u32 zero = 0;
	struct clock_cache *cached = clock_cache.lookup(&zero);
	__u64 jiffies = bpf_jiffies64();
	if (cached && cached->jiffies == jiffies)
		return cached->ns;
	__u64 ns = bpf_ktime_get_coarse_ns();
	if (cached) {
		cached->jiffies = jiffies;
		cached->ns = ns;
	}
	return ns;
}

static __always_inline void stat_inc(__u32 index)
{
	__u64 *value = datapath_stats.lookup(&index);
	if (value)
		*value += 1;  /* per-CPU slot: no atomics needed */
}

/* Headers sit in the skb's linear part nearly always: read them there (direct packet
 * access, no helper call), and through bpf_skb_load_bytes only when they do not.
 *
 * The copy is typed as 4-byte words: copied as bytes (what clang does for a void
 * pointer, whose alignment it must take as 1) the 20-byte IPv4 header alone was 80 JIT
 * instructions on every IPv4 packet (the JIT image), as words 10. `to` must be 4-byte aligned
 * (the verifier checks every stack access for it, so a wrong caller fails to load, it
 * never misreads). The packet need not be: x86-64 and arm64 load unaligned words, and
 * where the kernel cannot, the verifier refuses the program at load. */
#define MAX_DIRECT_OFFSET 1024  /* the verifier needs a bound on a variable offset */
#define WORD_ALIGNED __attribute__((aligned(4)))
static __always_inline int load_bytes(struct __sk_buff *skb, __u32 off, void *to, const __u32 len)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	if (off < MAX_DIRECT_OFFSET && data + off + len <= data_end) {
		__builtin_memcpy((__u32 *)to, (const __u32 *)(data + off), len);
		return 0;
	}
	return bpf_skb_load_bytes(skb, off, to, len);
}

static __always_inline int has_ports(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
}

/* Reads ports (or ICMP type/code) at l4_off. They must lie inside the IP packet
 * (ip_end), not just the frame: bytes past the IP length are padding the receiver
 * trims, and a container could put a harmless-looking port there. */
static __always_inline int load_l4(struct __sk_buff *skb, struct flow_key *key, __u32 l4_off, __u32 ip_end)
{
	if (l4_off > ip_end)
		return PARSE_UNPARSED;  /* IPv4 options or an extension header cut short */
	if (has_ports(key->proto)) {
		__be16 ports[2] WORD_ALIGNED;
		if (l4_off + sizeof(ports) > ip_end || load_bytes(skb, l4_off, ports, sizeof(ports)) < 0)
			return PARSE_UNPARSED;
		key->src_port = bpf_ntohs(ports[0]);
		key->dst_port = bpf_ntohs(ports[1]);
	} else if (key->proto == IPPROTO_ICMP || key->proto == IPPROTO_ICMPV6) {
		__u8 type_code[2] WORD_ALIGNED;
		if (l4_off + sizeof(type_code) > ip_end ||
		    load_bytes(skb, l4_off, type_code, sizeof(type_code)) < 0)
			return PARSE_UNPARSED;
		key->src_port = type_code[0];
		key->dst_port = type_code[1];
	}
	return PARSE_OK;  /* other protocols: nothing past the IP header is judged */
}

/* End of the IP packet in the frame: its IP length, cut at the frame's end. A length
 * of 0 is a GSO super-packet past 64 KiB (BIG TCP): the frame is the packet. (A
 * receiver drops any other packet of length 0, so nothing hides behind it.) */
static __always_inline __u32 ip_end_of(struct __sk_buff *skb, __u32 ip_len)
{
	__u32 end = ETH_HLEN + ip_len;
	return ip_len && end < skb->len ? end : skb->len;
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, struct flow_key *key)
{
	struct iphdr ip;
	if (load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return PARSE_NO_IP_HEADER;
	key->family = 4;
	key->proto = ip.protocol;
	__builtin_memcpy(key->src_addr, &ip.saddr, 4);
	__builtin_memcpy(key->dst_addr, &ip.daddr, 4);
	__u32 header_len = ip.ihl * 4;
	__u32 ip_len = bpf_ntohs(ip.tot_len);
	if (header_len < sizeof(ip) || (ip_len && ip_len < header_len))
		return PARSE_UNPARSED;  /* the receiver drops it too, but we cannot find its payload */
	/* A later fragment has no transport header: judged by the rules without a port.
	 * The datagram is only reassembled with its first fragment, which carries the
	 * ports and is judged by them (or dropped unparsed without them). */
	if (bpf_ntohs(ip.frag_off) & IPV4_FRAG_OFFSET_MASK)
		return PARSE_OK;
	return load_l4(skb, key, ETH_HLEN + header_len, ip_end_of(skb, ip_len));
}

static __always_inline int is_ipv6_ext_header(__u8 next)
{
	return next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS ||
	       next == IPPROTO_FRAGMENT || next == IPPROTO_AH;
}

static __always_inline int parse_ipv6(struct __sk_buff *skb, struct flow_key *key)
{
	struct ipv6hdr ip6;
	if (load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
		return PARSE_NO_IP_HEADER;
	key->family = 6;
	__builtin_memcpy(key->src_addr, &ip6.saddr, 16);
	__builtin_memcpy(key->dst_addr, &ip6.daddr, 16);
	__u32 payload_len = bpf_ntohs(ip6.payload_len);
	__u32 ip_end = ip_end_of(skb, payload_len ? sizeof(ip6) + payload_len : 0);

	__u8 next = ip6.nexthdr;
	__u32 off = ETH_HLEN + sizeof(ip6);
#pragma unroll
	for (int i = 0; i < MAX_IPV6_EXT_HEADERS; i++) {
		if (!is_ipv6_ext_header(next))
			break;
		/* next header, length, and the fragment header's offset field */
		__u8 ext[4] WORD_ALIGNED;
		key->proto = next;
		if (off + 8 > ip_end || load_bytes(skb, off, ext, sizeof(ext)) < 0)
			return PARSE_UNPARSED;  /* chain cut short: a first fragment without its transport header lands here */
		if (next == IPPROTO_FRAGMENT) {
			next = ext[0];
			off += 8;
			if ((((__u16)ext[2] << 8) | ext[3]) & IPV6_FRAG_OFFSET_MASK) {
				key->proto = next;  /* later fragment: see parse_ipv4 */
				return PARSE_OK;
			}
			continue;
		}
		/* AH counts its length in 4-byte units minus 2, the others in 8-byte units minus 1 */
		off += next == IPPROTO_AH ? ((__u32)ext[1] + 2) * 4 : ((__u32)ext[1] + 1) * 8;
		next = ext[0];
	}
	key->proto = next;
	if (is_ipv6_ext_header(next))
		return PARSE_UNPARSED;  /* longer chain than we follow */
	return load_l4(skb, key, off, ip_end);
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

/* At most three lookups, never a loop over rules: (proto, port), (proto, any), (any, any),
 * each only when the slot has a rule of that kind. Each LPM lookup already returns the
 * longest address prefix for that pair. */
static __always_inline struct policy_rule *policy_match(struct flow_key *key, __u32 slot, __u32 kinds)
{
	struct policy_lpm_key pk = {};
	struct policy_rule *best = 0;
	int best_rank = RANK_ANY;

	pk.prefixlen = POLICY_KEY_FIXED_BITS + (key->family == 4 ? 32 : 128);
	pk.slot = slot;
	pk.family = key->family;
	__builtin_memcpy(pk.addr, key->dst_addr, 16);
	pk.proto = key->proto;
	if ((kinds & RULE_KIND_PORT) && has_ports(key->proto) && key->dst_port) {
		pk.port = key->dst_port;
		prefer(&best, &best_rank, policy_lpm.lookup(&pk), RANK_PORT);
	}
	pk.port = 0;
	if (kinds & RULE_KIND_PROTO)
		prefer(&best, &best_rank, policy_lpm.lookup(&pk), RANK_PROTO);
	pk.proto = 0;
	if (kinds & RULE_KIND_ANY)
		prefer(&best, &best_rank, policy_lpm.lookup(&pk), RANK_ANY);
	return best;
}

static __always_inline void add_counters(struct ifindex_counters *to, struct ifindex_counters *from)
{
	__u64 *dst = (__u64 *)to, *src = (__u64 *)from;
#pragma unroll
	for (int i = 0; i < sizeof(*to) / sizeof(__u64); i++)
		dst[i] += src[i];
}

/* The endpoint cache in veth_counters is sound where stores become visible in program
 * order and loads are not reordered with loads (x86-64, TSO): user space writes a map
 * entry, then the generation; we read the generation, then the entry. Elsewhere BPF has
 * no acquire load we could rely on here, so the cache is compiled out. */
#if defined(__x86_64__)
#define CACHE_ENDPOINTS 1
#else
#define CACHE_ENDPOINTS 0
#endif

/* What the datapath needs to know of a veth, each packet. */
struct veth {
	struct ifindex_counters *counters;  /* this CPU's copy, 0 if no map had room */
	struct veth_counters *cache;        /* its veth_counters slot, when it holds one */
	__u32 known;                        /* it has an endpoints entry */
	__u32 slot;
	__u32 flags;
	__u32 rule_kinds;
};

/* This CPU's veth_counters slot of the veth, whichever veth holds it now (0 past
 * POSSIBLE_CPUS, which cannot be: counters_of then counts in the hash). */
static __always_inline struct veth_counters *veth_slot(__u32 ifindex)
{
	__u32 index = bpf_get_smp_processor_id() * VETH_COUNTER_SLOTS + ifindex % VETH_COUNTER_SLOTS;
	return veth_counters.lookup(&index);
}

/* This CPU's counters of the veth (struct veth_counters explains where they live). */
static __always_inline void counters_of(__u32 ifindex, struct veth *v)
{
	struct veth_counters *slot = veth_slot(ifindex);
	struct ifindex_counters zero = {};
	v->cache = 0;
	v->counters = 0;
	if (!slot) {
		v->counters = ifindex_counters.lookup_or_try_init(&ifindex, &zero);
		return;
	}
	if (slot->ifindex == ifindex) {
		v->cache = slot;
		v->counters = &slot->counters;
		return;
	}
	if (slot->ifindex != 0) {
		__u32 holder = slot->ifindex;
		struct ifindex_counters *moved = 0;
		if (!endpoints.lookup(&holder))
			moved = ifindex_counters.lookup_or_try_init(&holder, &zero);
		if (!moved) {  /* held by a live veth: ours go to the hash */
			v->counters = ifindex_counters.lookup_or_try_init(&ifindex, &zero);
			return;
		}
		add_counters(moved, &slot->counters);
		__builtin_memset(&slot->counters, 0, sizeof(slot->counters));
	}
	slot->ifindex = ifindex;
	slot->cached_generation = 0;
	v->cache = slot;
	v->counters = &slot->counters;
}

/* The veth's endpoints entry and its slot's rule kinds: from the per-CPU cache while the
 * generation it was read at is current, else from the maps (and cached again). The
 * generation (read by the caller) comes before the maps, so a copy is never newer than it. */
static __always_inline void endpoint_of(__u32 ifindex, __u32 generation, struct veth *v)
{
	struct veth_counters *cache = v->cache;
	if (CACHE_ENDPOINTS && cache && generation && cache->cached_generation == generation) {
		v->known = cache->cached_flags & ENDPOINT_CACHED_KNOWN;
		v->flags = cache->cached_flags & ~ENDPOINT_CACHED_KNOWN;
		v->slot = cache->cached_slot;
		v->rule_kinds = cache->cached_rule_kinds;
		return;
	}
	struct endpoint_info *ep = endpoints.lookup(&ifindex);
	v->known = ep != 0;
	v->slot = ep ? ep->slot : 0;
	v->flags = ep ? ep->flags : 0;
	v->rule_kinds = RULE_KIND_PORT | RULE_KIND_PROTO | RULE_KIND_ANY;  /* fail closed */
	if (v->flags & ENDPOINT_F_POLICY) {
		__u32 slot = v->slot;
		__u32 *kinds = slot_rule_kinds.lookup(&slot);
		if (kinds)
			v->rule_kinds = *kinds;
	}
	if (CACHE_ENDPOINTS && cache) {
		cache->cached_slot = v->slot;
		cache->cached_flags = v->flags | (v->known ? ENDPOINT_CACHED_KNOWN : 0);
		cache->cached_rule_kinds = v->rule_kinds;
		cache->cached_generation = generation;
	}
}

static __always_inline void count_rule_hit(__u32 rule_id, __u64 bytes, __u64 packets, __u64 now)
{
	struct rule_stats zero = {};
	struct rule_stats *hits = rule_stats.lookup_or_try_init(&rule_id, &zero);
	if (!hits)
		return;
	hits->packets += packets;  /* per-CPU copy */
	hits->bytes += bytes;
	hits->last_hit_ns = now;
}

/* May this veth create one more flow in this epoch? (struct flow_share) */
static __always_inline int within_flow_share(__u32 ifindex, struct datapath_config *config)
{
	__u32 share = config && config->flow_share ? config->flow_share : FLOW_TABLE_SIZE / 8;
	__u32 epoch = config ? config->epoch : 0;
	struct flow_share zero = {};
	struct flow_share *used = flow_shares.lookup_or_try_init(&ifindex, &zero);
	if (!used)
		return 1;  /* the totals stay exact either way */
	if (used->epoch != epoch) {
		used->epoch = epoch;
		used->created = 0;
	}
	if (used->created >= share)
		return 0;
	__sync_fetch_and_add(&used->created, 1);
	return 1;
}

/* A new flows entry for the key, first seen at first_seen_ns (0 if the table has no room). */
static __always_inline struct flow_stats *created_flow(struct flow_key *key, __u64 first_seen_ns)
{
	struct flow_stats fresh = {};
	fresh.first_seen_ns = first_seen_ns;
	/* NOEXIST: another CPU may have created it meanwhile, then we just add to it */
	if (flows.insert(key, &fresh) == 0)
		stat_inc(STAT_FLOWS_CREATED);
	struct flow_stats *st = flows.lookup(key);
	if (!st)
		stat_inc(STAT_FLOW_UPDATE_FAILED);
	return st;
}

/* The flow's counters, created on first sight; past the veth's flow share, its overflow
 * flow's instead (and key becomes that flow's). */
static __always_inline struct flow_stats *flow_of(struct flow_key *key, struct ifindex_counters *c,
						   struct datapath_config *config, __u64 bytes, __u64 packets)
{
	struct flow_stats *st = flows.lookup(key);
	if (st)
		return st;
	if (!within_flow_share(key->ifindex, config)) {
		if (c) {
			c->overflow_packets += packets;
			c->overflow_bytes += bytes;
		}
		__u32 ifindex = key->ifindex;
		__builtin_memset(key, 0, sizeof(*key));
		key->ifindex = ifindex;
		key->family = OVERFLOW_FAMILY;
		key->proto = OVERFLOW_PROTO;
		st = flows.lookup(key);
		if (st)
			return st;
	}
	return created_flow(key, now_ns());
}

static __always_inline void announce_moved(struct flow_key *key)
{
	if (moved_flows.ringbuf_output(key, sizeof(*key), 0) < 0)
		stat_inc(STAT_MOVED_LOST);
}

/* Adds a flow's counts to its flows entry (atomic adds: the entry is shared by the CPUs),
 * and announces the flow in moved_flows the first time it moves in an epoch. */
static __always_inline void add_to_flow(struct flow_stats *st, struct flow_key *key, __u32 epoch, __u64 bytes,
					__u64 packets, __u32 verdict)
{
	__sync_fetch_and_add(&st->bytes, bytes);
	__sync_fetch_and_add(&st->packets, packets);
	if (verdict != VERDICT_FORWARDED) {
		__sync_fetch_and_add(&st->dropped_bytes, bytes);
		__sync_fetch_and_add(&st->dropped_packets, packets);
	}
	if (st->epoch != epoch) {
		st->epoch = epoch;
		announce_moved(key);
	}
}

/* The flow cache (struct flow_cache_set says why and how) relies on the order in which
 * other CPUs see our stores, as the endpoint cache does. */
#define CACHE_FLOWS CACHE_ENDPOINTS
#define compiler_barrier() asm volatile("" ::: "memory")

/* The first 16 bytes of a flow_cache_entry for a key, read as two u64s to compare. */
struct flow_cache_tag {
	__u32 ifindex;
	__u32 src_addr;
	__u32 dst_addr;
	__u16 src_port;
	__u16 dst_port;
};

static __always_inline int same_flow(struct flow_cache_entry *entry, struct flow_cache_tag *tag, __u8 proto)
{
	__u64 *mine = (__u64 *)entry, *wanted = (__u64 *)tag;
	return mine[0] == wanted[0] && mine[1] == wanted[1] && entry->proto == proto;
}

/* Multiplicative hashing of the 5-tuple and veth: destination ports that count up (one
 * socket to many services) spread over the sets. */
static __always_inline __u32 flow_cache_set_of(struct flow_cache_tag *tag, __u8 proto)
{
	__u32 h = tag->ifindex * 0x9e3779b1u;
	h = (h ^ tag->src_addr) * 0x85ebca6bu;
	h = (h ^ tag->dst_addr) * 0xc2b2ae35u;
	h = (h ^ (((__u32)tag->src_port << 16) | tag->dst_port) ^ ((__u32)proto << 8)) * 0x9e3779b1u;
	return (h >> 16) % FLOW_CACHE_SETS;
}

/* Moves an entry's counts into its flows entry (re-created with its first_seen if the LRU
 * evicted it) and announces the flow. Returns 0, leaving the entry as it was, when the
 * table has no room for it. */
static __always_inline int write_back(struct flow_cache_entry *entry, __u32 epoch)
{
	struct flow_key key = {};
	key.ifindex = entry->ifindex;
	key.family = 4;
	key.proto = entry->proto;
	key.src_port = entry->src_port;
	key.dst_port = entry->dst_port;
	__builtin_memcpy(key.src_addr, &entry->src_addr, 4);
	__builtin_memcpy(key.dst_addr, &entry->dst_addr, 4);
	struct flow_stats *st = flows.lookup(&key);
	if (!st)
		st = created_flow(&key, entry->first_seen_ns);
	if (!st)
		return 0;
	__u64 bytes = entry->bytes, packets = entry->packets;
	/* Odd seq, counts out of the entry, then into the table: a reader that read the table
	 * before our adds and the entry after they left it sees seq changed. */
	entry->seq += 1;
	entry->bytes = 0;
	entry->packets = 0;
	entry->epoch = epoch;
	compiler_barrier();
	if (entry->last_seen_ns >= st->last_seen_ns) {
		st->last_seen_ns = entry->last_seen_ns;
		st->rule_id = entry->rule_id;
		st->verdict = VERDICT_FORWARDED;
	}
	st->epoch = epoch;
	add_to_flow(st, &key, epoch, bytes, packets, VERDICT_FORWARDED);
	announce_moved(&key);  /* whatever the epoch: a write-back during a read must be read again */
	compiler_barrier();
	entry->seq += 1;
	return 1;
}

/* Where a packet's flow is in this CPU's flow cache, or may go. */
struct cached_flow {
	struct flow_cache_entry *entry;   /* its entry; 0 when it is not cached */
	struct flow_cache_entry *victim;  /* when it is not, the way it may take */
};

/* Which way of a set holds a flow, and which way a new one takes, as found by find_cached:
 * stored and loaded again so that the verifier takes them as any value below
 * FLOW_CACHE_WAYS. Found by branches on constants, a pointer per way would have it verify
 * the rest of the program once for each (10x the load time). Private: not pinned. */
struct flow_cache_probe {
	__u32 hit;     /* FLOW_CACHE_WAYS when no way holds the flow */
	__u32 victim;  /* the first free way, else the last */
};
BPF_PERCPU_ARRAY(flow_cache_probe, struct flow_cache_probe, 1);

static __always_inline void find_cached(struct flow_key *key, struct cached_flow *found)
{
	struct flow_cache_tag tag = {};
	tag.ifindex = key->ifindex;
	__builtin_memcpy(&tag.src_addr, key->src_addr, 4);
	__builtin_memcpy(&tag.dst_addr, key->dst_addr, 4);
	tag.src_port = key->src_port;
	tag.dst_port = key->dst_port;
	__u32 index = bpf_get_smp_processor_id() * FLOW_CACHE_SETS + flow_cache_set_of(&tag, key->proto), zero = 0;
	struct flow_cache_set *set = flow_cache.lookup(&index);  /* 0 past POSSIBLE_CPUS: not cached */
	struct flow_cache_probe *probe = flow_cache_probe.lookup(&zero);
	if (!set || !probe)
		return;
	__u32 hit = FLOW_CACHE_WAYS, victim = FLOW_CACHE_WAYS - 1;
#pragma unroll
	for (int way = 0; way < FLOW_CACHE_WAYS; way++) {
		if (same_flow(&set->way[way], &tag, key->proto)) {
			hit = way;
			break;
		}
	}
	if (hit == FLOW_CACHE_WAYS) {
#pragma unroll
		for (int way = FLOW_CACHE_WAYS - 2; way >= 0; way--)
			if (!set->way[way].ifindex)
				victim = way;
	}
	probe->hit = hit;
	probe->victim = victim;
	hit = *(volatile __u32 *)&probe->hit;
	victim = *(volatile __u32 *)&probe->victim;
	if (hit < FLOW_CACHE_WAYS)
		found->entry = &set->way[hit];
	else if (victim < FLOW_CACHE_WAYS)
		found->victim = &set->way[victim];
}

/* May the packet take its cached flow's verdict (forwarded, by the entry's rule_id) instead
 * of the policy lookups? Only while nothing the verdict depends on was written since. */
static __always_inline int verdict_cached(struct cached_flow *found, __u32 generation)
{
	return CACHE_FLOWS && found->entry && generation && found->entry->generation == generation;
}

/* Puts a flow the table just counted into a cache way, after writing back the flow the
 * way held. */
static __always_inline void cache_flow(struct flow_cache_entry *entry, struct flow_key *key, struct flow_stats *st,
				       __u32 epoch, __u32 generation)
{
	if (entry->ifindex && (entry->packets || entry->bytes) && !write_back(entry, epoch))
		return;
	entry->seq += 1;  /* a new key: a reader that saw the old one reads this one again */
	compiler_barrier();
	entry->ifindex = key->ifindex;
	__builtin_memcpy(&entry->src_addr, key->src_addr, 4);
	__builtin_memcpy(&entry->dst_addr, key->dst_addr, 4);
	entry->src_port = key->src_port;
	entry->dst_port = key->dst_port;
	entry->proto = key->proto;
	entry->epoch = epoch;  /* the table announced it in this epoch */
	entry->generation = generation;
	entry->rule_id = st->rule_id;
	entry->bytes = 0;
	entry->packets = 0;
	entry->first_seen_ns = st->first_seen_ns;
	entry->last_seen_ns = st->last_seen_ns;
	compiler_barrier();
	entry->seq += 1;
}

/* Counts a packet in its flow's cache entry (this CPU's: no atomics); the flow's first
 * packet of an epoch writes the entry back, which announces the flow. */
static __always_inline void count_in_entry(struct flow_cache_entry *entry, __u32 epoch, __u64 bytes,
					   __u64 packets, __u64 now)
{
	entry->bytes += bytes;
	entry->packets += packets;
	entry->last_seen_ns = now;
	if (entry->epoch != epoch)
		write_back(entry, epoch);
}

/* The fast path, taken before anything else is looked up: a packet whose flow this CPU
 * caches with a verdict of the current generation, from a veth that holds its
 * veth_counters slot here, needs nothing else. Its verdict (forwarded, by rule_id) and
 * everything it was judged by (the endpoint, hold-unknown, the rules) are as they were
 * when the verdict was cached, or the generation would have changed. Counted in the veth's
 * totals and the entry at once, as the table path counts. 1 when the packet is counted. */
static __always_inline int counted_as_cached(struct cached_flow *found, __u32 ifindex, struct datapath_config *config,
					     __u32 generation, __u64 bytes, __u64 packets)
{
	if (!config || !verdict_cached(found, generation))
		return 0;
	struct veth_counters *slot = veth_slot(ifindex);
	if (!slot || slot->ifindex != ifindex)
		return 0;  /* its counters are elsewhere: counters_of finds them */
	slot->counters.packets += packets;
	slot->counters.bytes += bytes;
	__u64 now = now_ns();
	if (found->entry->rule_id)
		count_rule_hit(found->entry->rule_id, bytes, packets, now);
	count_in_entry(found->entry, config->epoch, bytes, packets, now);
	return 1;
}

/* Counts the packet in its flow: in its cache entry when it is forwarded and cached
 * (its verdict was judged again: the generation changed), else in the table (and then
 * caches it, when it was forwarded and found a way). */
static __always_inline void count_flow(struct flow_key *key, struct ifindex_counters *c,
				       struct datapath_config *config, __u64 bytes, __u64 packets,
				       __u32 rule_id, __u32 verdict, struct cached_flow *found, __u32 generation)
{
	__u32 epoch = config ? config->epoch : 0;
	if (CACHE_FLOWS && found && found->entry && verdict == VERDICT_FORWARDED) {
		found->entry->rule_id = rule_id;  /* before a write-back, which copies it */
		found->entry->generation = generation;
		count_in_entry(found->entry, epoch, bytes, packets, now_ns());
		return;
	}
	struct flow_stats *st = flow_of(key, c, config, bytes, packets);
	if (!st)
		return;
	/* Plain stores: the last writer wins, as for the last packet's verdict. */
	st->last_seen_ns = now_ns();
	st->rule_id = rule_id;
	st->verdict = verdict;
	add_to_flow(st, key, epoch, bytes, packets, verdict);
	if (CACHE_FLOWS && found && found->victim && verdict == VERDICT_FORWARDED &&
	    key->family == 4)  /* not turned into the overflow flow */
		cache_flow(found->victim, key, st, epoch, generation);
}

/* A packet that is not judged by the rules: held (unknown veth) or unparsed. Counted
 * per veth here; as a flow by the caller, when its addresses are known. */
static __always_inline void count_unjudged(struct ifindex_counters *c, __u64 bytes, __u64 packets, __u32 verdict)
{
	if (!c)
		return;
	if (verdict == VERDICT_HELD) {
		c->held_packets += packets;
		c->held_bytes += bytes;
		return;
	}
	c->unparsed_packets += packets;
	c->unparsed_bytes += bytes;
	if (verdict == VERDICT_DROPPED_UNPARSED) {
		c->unparsed_dropped_packets += packets;
		c->unparsed_dropped_bytes += bytes;
	}
}

int egress_top_ingress(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	/* A GSO super-packet stands for gso_segs wire packets. */
	__u64 packets = skb->gso_segs > 1 ? skb->gso_segs : 1;
	__u64 bytes = skb->len > ETH_HLEN ? skb->len - ETH_HLEN : 0;  /* IP bytes */
	struct flow_key key = {};
	key.ifindex = ifindex;

	int parsed = PARSE_NOT_IP;
	if (skb->protocol == bpf_htons(ETH_P_IP))
		parsed = parse_ipv4(skb, &key);
	else if (skb->protocol == bpf_htons(ETH_P_IPV6))
		parsed = parse_ipv6(skb, &key);

	__u32 index = 0;
	struct datapath_config *config = datapath_config.lookup(&index);  /* an array: inlined */
	/* Read once, before any map it stands for: the endpoint, the rule kinds and the
	 * verdict cached in the flow cache are all taken as of this generation. */
	__u32 generation = config ? config->endpoints_generation : 0;
	struct cached_flow found = {};
	if (CACHE_FLOWS && parsed == PARSE_OK && key.family == 4) {
		find_cached(&key, &found);
		if (counted_as_cached(&found, ifindex, config, generation, bytes, packets))
			return TC_ACT_UNSPEC;
	}

	struct veth v;
	counters_of(ifindex, &v);
	struct ifindex_counters *c = v.counters;
	if (parsed == PARSE_NOT_IP) {
		/* ARP, VLAN-tagged frames: counted, never judged */
		if (c) {
			c->non_ip_packets += packets;
			c->non_ip_bytes += skb->len;
		}
		return TC_ACT_UNSPEC;
	}

	if (c) {
		c->packets += packets;
		c->bytes += bytes;
	}
	endpoint_of(ifindex, generation, &v);
	int enforced = v.flags & ENDPOINT_F_POLICY;
	__u32 rule_id = 0;
	__u32 verdict = VERDICT_FORWARDED;
	if (!v.known && config && (config->flags & CONFIG_F_HOLD_UNKNOWN)) {
		verdict = VERDICT_HELD;
		count_unjudged(c, bytes, packets, verdict);
	} else if (parsed != PARSE_OK) {
		verdict = enforced ? VERDICT_DROPPED_UNPARSED : VERDICT_FORWARDED;
		count_unjudged(c, bytes, packets, verdict);
	} else if (enforced) {
		if (verdict_cached(&found, generation)) {
			rule_id = found.entry->rule_id;
		} else {
			struct policy_rule *rule = policy_match(&key, v.slot, v.rule_kinds);
			if (rule) {
				rule_id = rule->rule_id;
				if (rule->action == POLICY_DROP)
					verdict = VERDICT_DROPPED;
			}
		}
		if (rule_id)
			count_rule_hit(rule_id, bytes, packets, now_ns());
	}

	/* An unparsed key has ports 0: load_l4 fills them only once they are read. A held or
	 * unparsed packet found no cache way (find_cached runs for parsed packets only) or is
	 * not forwarded: count_flow counts it in the table. */
	if (parsed != PARSE_NO_IP_HEADER)
		count_flow(&key, c, config, bytes, packets, rule_id, verdict, &found, generation);
	if (verdict == VERDICT_DROPPED && c) {
		c->dropped_packets += packets;
		c->dropped_bytes += bytes;
	}
	/* UNSPEC, not OK: other classifiers on this hook still see the packet */
	return verdict == VERDICT_FORWARDED ? TC_ACT_UNSPEC : TC_ACT_SHOT;
}
