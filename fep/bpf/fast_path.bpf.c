// SPDX-License-Identifier: GPL-2.0
//
// fep's kernel fast path: a tc program on the gateway's interfaces that
// forwards the packets of established routes without leaving the kernel
// (Open vSwitch's split: user space decides, the kernel only matches and
// acts). fep installs each established route as two entries of `routes`,
// one per direction; everything else — a miss, a SYN, FIN or RST, IP
// options, fragments, extension headers, a TTL about to expire, a next hop
// without a neighbour entry, a packet too big for the next hop — is passed
// on unchanged (TC_ACT_OK) to the kernel's routing, and so to fep's TUN path.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

// Keep in step with fep/src/fast_path/entries.rs.
struct flow_key {
	__u8 family;   // 4 or 6
	__u8 protocol; // IPPROTO_TCP or IPPROTO_UDP
	__be16 sport;
	__be16 dport;
	__u16 pad;
	__u8 saddr[16]; // IPv4 in the first 4 bytes, the rest zero
	__u8 daddr[16];
};

enum { TO_BACKEND = 0, TO_CLIENT = 1 };

struct flow_action {
	__u8 addr[16];  // the new destination (TO_BACKEND) or source (TO_CLIENT)
	__be16 port;
	__u8 direction;
	__u8 pad[5];
	__u64 last_ns;  // bpf_ktime_get_ns() of the last packet: the route's idle time
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 2097152);
	__type(key, struct flow_key);
	__type(value, struct flow_action);
} routes SEC(".maps");

// Per CPU: packets forwarded here, their bytes, and packets of installed
// routes passed on to the TUN path (flags, no neighbour, too big, TTL).
enum { STAT_FORWARDED = 0, STAT_BYTES = 1, STAT_PASSED = 2, STAT_COUNT = 3 };

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void count(__u32 which, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &which);
	if (v)
		*v += n;
}

#define ETH_LEN sizeof(struct ethhdr)
#define V4_LEN sizeof(struct iphdr)
#define V6_LEN sizeof(struct ipv6hdr)

SEC("classifier")
int fep_fast_path(struct __sk_buff *skb)
{
	// Headers of a GSO packet may sit outside the linear part.
	bpf_skb_pull_data(skb, ETH_LEN + V6_LEN + sizeof(struct tcphdr));
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return TC_ACT_OK;

	struct flow_key key = {};
	__u32 l3 = ETH_LEN, l4;
	__u8 hops;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + l3;
		if ((void *)(ip + 1) > end || ip->ihl != 5 ||
		    (ip->frag_off & bpf_htons(0x3fff)))
			return TC_ACT_OK;
		key.family = 4;
		key.protocol = ip->protocol;
		__builtin_memcpy(key.saddr, &ip->saddr, 4);
		__builtin_memcpy(key.daddr, &ip->daddr, 4);
		hops = ip->ttl;
		l4 = l3 + V4_LEN;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip = data + l3;
		if ((void *)(ip + 1) > end)
			return TC_ACT_OK;
		key.family = 6;
		key.protocol = ip->nexthdr;
		__builtin_memcpy(key.saddr, &ip->saddr, 16);
		__builtin_memcpy(key.daddr, &ip->daddr, 16);
		hops = ip->hop_limit;
		l4 = l3 + V6_LEN;
	} else {
		return TC_ACT_OK;
	}

	__u32 csum_off;
	int tcp = key.protocol == IPPROTO_TCP;
	if (tcp) {
		struct tcphdr *th = data + l4;
		if ((void *)(th + 1) > end)
			return TC_ACT_OK;
		key.sport = th->source;
		key.dport = th->dest;
		csum_off = l4 + __builtin_offsetof(struct tcphdr, check);
		// A connection's opening and closing are the TUN path's to see.
		if (th->syn || th->fin || th->rst) {
			if (bpf_map_lookup_elem(&routes, &key))
				count(STAT_PASSED, 1);
			return TC_ACT_OK;
		}
	} else if (key.protocol == IPPROTO_UDP) {
		struct udphdr *uh = data + l4;
		if ((void *)(uh + 1) > end)
			return TC_ACT_OK;
		key.sport = uh->source;
		key.dport = uh->dest;
		csum_off = l4 + __builtin_offsetof(struct udphdr, check);
	} else {
		return TC_ACT_OK;
	}

	struct flow_action *act = bpf_map_lookup_elem(&routes, &key);
	if (!act)
		return TC_ACT_OK;
	if (hops <= 1) {
		count(STAT_PASSED, 1);
		return TC_ACT_OK;
	}

	// Where the rewritten packet goes: the kernel's own route lookup
	// (policy rules included), checked against the next hop's MTU.
	struct bpf_fib_lookup fib = {};
	fib.family = key.family == 4 ? AF_INET : AF_INET6;
	fib.l4_protocol = key.protocol;
	fib.ifindex = skb->ingress_ifindex;
	int to_backend = act->direction == TO_BACKEND;
	__u8 *src = to_backend ? key.saddr : act->addr;
	__u8 *dst = to_backend ? act->addr : key.daddr;
	fib.sport = to_backend ? key.sport : act->port;
	fib.dport = to_backend ? act->port : key.dport;
	if (key.family == 4) {
		__builtin_memcpy(&fib.ipv4_src, src, 4);
		__builtin_memcpy(&fib.ipv4_dst, dst, 4);
	} else {
		__builtin_memcpy(fib.ipv6_src, src, 16);
		__builtin_memcpy(fib.ipv6_dst, dst, 16);
	}
	if (bpf_fib_lookup(skb, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS) {
		count(STAT_PASSED, 1);
		return TC_ACT_OK;
	}

	// The rewrite: one address and one port, with the checksums fixed
	// incrementally (the helpers handle CHECKSUM_PARTIAL packets).
	__u32 addr_off = l3 + (to_backend ? (key.family == 4 ? 16 : 24) : (key.family == 4 ? 12 : 8));
	__u32 port_off = l4 + (to_backend ? 2 : 0);
	__u8 *old_addr = to_backend ? key.daddr : key.saddr;
	__be16 old_port = to_backend ? key.dport : key.sport;
	__u64 l4_flags = tcp ? 0 : BPF_F_MARK_MANGLED_0;
	if (key.family == 4) {
		__be32 from, to;
		__builtin_memcpy(&from, old_addr, 4);
		__builtin_memcpy(&to, act->addr, 4);
		bpf_l4_csum_replace(skb, csum_off, from, to, l4_flags | BPF_F_PSEUDO_HDR | 4);
		bpf_l3_csum_replace(skb, l3 + __builtin_offsetof(struct iphdr, check), from, to, 4);
		bpf_skb_store_bytes(skb, addr_off, &to, 4, 0);
		// TTL: the high byte of the 16-bit word it shares with the protocol.
		__be16 old_word = bpf_htons((__u16)hops << 8 | key.protocol);
		__be16 new_word = bpf_htons((__u16)(hops - 1) << 8 | key.protocol);
		__u8 ttl = hops - 1;
		bpf_l3_csum_replace(skb, l3 + __builtin_offsetof(struct iphdr, check), old_word,
				    new_word, 2);
		bpf_skb_store_bytes(skb, l3 + __builtin_offsetof(struct iphdr, ttl), &ttl, 1, 0);
	} else {
		__s64 diff = bpf_csum_diff((__be32 *)old_addr, 16, (__be32 *)act->addr, 16, 0);
		bpf_l4_csum_replace(skb, csum_off, 0, diff, l4_flags | BPF_F_PSEUDO_HDR);
		bpf_skb_store_bytes(skb, addr_off, act->addr, 16, 0);
		__u8 hop_limit = hops - 1;
		bpf_skb_store_bytes(skb, l3 + __builtin_offsetof(struct ipv6hdr, hop_limit),
				    &hop_limit, 1, 0);
	}
	__be16 new_port = act->port;
	bpf_l4_csum_replace(skb, csum_off, old_port, new_port, l4_flags | 2);
	bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0);
	bpf_skb_store_bytes(skb, __builtin_offsetof(struct ethhdr, h_dest), fib.dmac, ETH_ALEN, 0);
	bpf_skb_store_bytes(skb, __builtin_offsetof(struct ethhdr, h_source), fib.smac, ETH_ALEN, 0);

	act->last_ns = bpf_ktime_get_ns();
	count(STAT_FORWARDED, 1);
	count(STAT_BYTES, skb->len);
	return bpf_redirect(fib.ifindex, 0);
}

char LICENSE[] SEC("license") = "GPL";
