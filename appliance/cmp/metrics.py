"""The CMP server's counters as OpenMetrics families (docs/metrics.md), registered with the daemon's metrics
registry when both the CMP server and the metrics listener run. Read at scrape time from the responder's plain
counters: nothing is formatted on the request path."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.cmp.responder import CmpResponder

NAMESPACE = "birthline"


class CmpCollector(Collector):
    def __init__(self, responder: CmpResponder) -> None:
        self.responder = responder

    def collect(self) -> Iterable[Metric]:
        refused = CounterMetricFamily(f"{NAMESPACE}_cmp_refused", "CMP messages answered with an error message"
                                      " (failed their checks), by label, body type and failInfo",
                                      labels=["label", "body", "fail_info"])  # fmt: skip
        for (label, body, fail), n in sorted(self.responder.refusals.items()):
            refused.add_metric([label, body, fail], n)
        yield refused
        admission = CounterMetricFamily(f"{NAMESPACE}_cmp_admission", "CMP requests by what their peer's budget"
                                        " and the shared one made of them (docs/cmp.md)",
                                        labels=["outcome"])  # fmt: skip
        for outcome, n in sorted(self.responder.admission.stats.items()):
            admission.add_metric([outcome], n)
        yield admission
