"""The front gateway keeps serving while the network's DNS falls silent (#16).

Why: right after a `podman kill`, the container network's DNS (aardvark-dns) answered no name
for ~10-40 s, the live nodes' names too. The front used to look its agents' names up again every
2 s inside the calls, so every call to a live node waited on that lookup: in CI rehearsals 6 and 8
the failover scenario (d) got 378 and 437 x 503 `overloaded` from the front's own loop-lag
shedding after the stall released its calls at once (p50 9.3 s). Here a second front, from the
same image, resolves through a DNS server the test controls (tests/cluster/dnsserver.py), which
goes silent under steady load: every call must still be served, by the addresses the front
already knew."""

from __future__ import annotations

import asyncio
from collections import Counter

from cluster import Cluster
from dnsserver import DnsServer
from test_cluster import _error_code, _steady_load, deploy_everywhere, steady_spec

RATE = 100
DURATION_S = 8.0
MUTE_AT_S = 1.0  # the front's lookups then go unanswered for the rest of the load


def test_front_serves_through_a_dns_outage(cluster: Cluster):
    c = cluster
    fn = "dns-outage"
    deploy_everywhere(c, steady_spec(fn))
    # the DNS server knows every container of the cluster by its name, as aardvark-dns does
    dns = DnsServer.start(c, {b.name: b.ip for b in c.boxes.values()})
    front = c.start_gateway("front-dns", extra=["--dns", dns.ip])
    try:
        c.wait_healthy("front-dns")
        assert c.client("front-dns").invoke(fn, b"{}", "application/json").status == 200
        before = dns.dropped
        outcomes = asyncio.run(
            _steady_load(front.url, fn, dns.mute, rate=RATE, duration_s=DURATION_S, at_s=MUTE_AT_S)
        )
        dropped = dns.dropped - before
        dns.answer()
        failed = [o for o in outcomes if o.status != 200]
        report = {
            "requests": len(outcomes),
            "failed": len(failed),
            "failed_errors": dict(Counter(_error_code(o.error) for o in failed)),
            "served_by": dict(Counter(o.node for o in outcomes)),
            "dns_queries_unanswered": dropped,
        }
        print(f"\n[cluster] front through a DNS outage: {report}")
        assert len(outcomes) == int(RATE * DURATION_S)  # every request ended (none hung)
        # the outage was real: the front asked, again and again, and got no answer
        assert dropped > 0, report
        # ...and no call noticed: each served by a node, none failed, shed or lost
        assert not failed and all(o.node for o in outcomes), f"{report}\n{c.logs('front-dns')}"
        assert "unreachable" not in c.logs("front-dns", tail=None)
    finally:
        dns.answer()
        c.remove("front-dns")
        c.remove("dns")
