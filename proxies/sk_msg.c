// Hearth per-node descriptor router: an SK_MSG verdict program on a SOCKHASH.
//
// Every instance's data socket (one end of a loopback TCP pair) is in `sock_hash`,
// keyed by its u32 endpoint id. When an instance sends a 64-byte descriptor (or up to
// MAX_FRAMES of them for one destination in one message), this program reads the
// destination id (bytes 0..3) and each payload length (bytes 16..23), counts descriptors
// and payload bytes per destination in `dst_stats`, and redirects the message straight into
// the destination socket's ingress queue: no proxy process is woken up.
//
// `src` (bytes 4..7) is what a receiver trusts to know who sent a descriptor, so the program
// overwrites it in every descriptor of the message with the endpoint id the daemon registered
// for the sending socket (`src_of`, socket-local storage): an instance cannot forge it. A
// socket the daemon did not register has no identity and its messages are dropped. So is a
// message that is not 1..MAX_FRAMES whole descriptors: the program stamps at most MAX_FRAMES,
// and the receiver frames its stream in 64-byte steps, so any other size would deliver bytes
// nobody stamped (a forged src in a later descriptor, or the receiver's framing shifted).
//
// A destination that is not registered (not in `endpoints`) is counted in `unrouted` and
// passed (SK_PASS) to the socket's TCP peer, which the proxy daemon holds: the daemon answers
// with an ERROR descriptor (status UNKNOWN_DST), the same semantics as the AF_UNIX fallback.
// Compiled by bcc; MAX_ENDPOINTS is set by the loader (-DMAX_ENDPOINTS=...).
#include <uapi/linux/bpf.h>

#ifndef MAX_ENDPOINTS
#define MAX_ENDPOINTS 65536
#endif
#ifndef MAX_FRAMES
#define MAX_FRAMES 64  /* descriptors per message; senders never put more in one (MAX_FRAMES) */
#endif

struct dst_stat {
    u64 msgs;
    u64 bytes;
};

BPF_SOCKHASH(sock_hash, u32, MAX_ENDPOINTS);
BPF_HASH(endpoints, u32, u8, MAX_ENDPOINTS);
BPF_SK_STORAGE(src_of, u32);  /* per socket: the endpoint id the daemon registered it as */
BPF_HASH(dst_stats, u32, struct dst_stat, MAX_ENDPOINTS);
BPF_ARRAY(unrouted, u64, 1);

int sk_msg_prog(struct sk_msg_md *msg)
{
    /* A message is one descriptor, or up to MAX_FRAMES of them for the same destination sent
     * together (one sendmsg under load): make it linear, route it by the first descriptor,
     * stamp and count every descriptor and the payload bytes each names. Senders never put
     * more than MAX_FRAMES in one message (Endpoint.send_frame, AsyncEndpoint.send_many). */
    u32 size = msg->size;
    if (size < 64 || size > MAX_FRAMES * 64 || size % 64)
        return SK_DROP;  /* not whole descriptors, or more than we stamp */
    /* no-op when the message is already linear (one small sendmsg); only constant offsets
     * from `data` below, so CAP_BPF + CAP_NET_ADMIN are enough for the verifier */
    bpf_msg_pull_data(msg, 0, size, 0);
    void *data = (void *)(long)msg->data;
    void *end = (void *)(long)msg->data_end;
    if (data + 64 > end)
        return SK_DROP;
    u32 dst = *(u32 *)data;
    struct bpf_sock *sk = msg->sk;
    if (!sk)
        return SK_DROP;
    u32 *me = src_of.sk_storage_get(sk, 0, 0);
    if (!me)
        return SK_DROP;  /* no identity: only sockets the daemon registered may send */
    u32 src = *me;

    u64 frames = 0, bytes = 0;
#pragma unroll
    for (int i = 0; i < MAX_FRAMES; i++) {
        if (data + (i + 1) * 64 > end)
            break;
        frames += 1;
        bytes += *(u64 *)(data + i * 64 + 16);
        *(u32 *)(data + i * 64 + 4) = src;  /* stamped, never taken from the sender's bytes */
    }
    /* every byte delivered was stamped (also when bpf_msg_pull_data could not linearize) */
    if (frames * 64 != msg->size)
        return SK_DROP;
    if (!endpoints.lookup(&dst)) {
        int zero = 0;
        u64 *u = unrouted.lookup(&zero);
        if (u)
            __sync_fetch_and_add(u, 1);
        return SK_PASS;
    }
    struct dst_stat init = {};
    struct dst_stat *s = dst_stats.lookup_or_try_init(&dst, &init);
    if (s) {
        __sync_fetch_and_add(&s->msgs, frames);
        __sync_fetch_and_add(&s->bytes, bytes);
    }
    return sock_hash.msg_redirect_hash(msg, &dst, BPF_F_INGRESS);
}
