"""What crossed the network, on /metrics."""

from __future__ import annotations

from hearth.cluster.link import LinkStats


class LinkCollector:
    """The link's counters on /metrics: bytes this node moved to and from other nodes, and the
    request payload bytes and calls it sent per function (what crossed the network, and why)."""

    def __init__(self, stats: LinkStats):
        self.stats = stats

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        s = self.stats
        b = CounterMetricFamily(
            "hearth_cluster_link_bytes",
            "Payload bytes over agent-to-agent links",
            labels=["direction"],
        )
        b.add_metric(["sent"], float(s.sent_bytes))
        b.add_metric(["received"], float(s.received_bytes))
        yield b
        f = CounterMetricFamily(
            "hearth_cluster_forwarded_bytes",
            "Request payload bytes this node forwarded to other nodes, per function",
            labels=["function"],
        )
        c = CounterMetricFamily(
            "hearth_cluster_forwarded_calls",
            "Invocations this node forwarded to other nodes, per function",
            labels=["function"],
        )
        for fn, n in s.sent_by_function.items():
            f.add_metric([fn], float(n))
            c.add_metric([fn], float(s.calls_by_function.get(fn, 0)))
        yield f
        yield c
