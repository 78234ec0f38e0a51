"""The SCEP server's counters as OpenMetrics families (docs/metrics.md), registered with the daemon's metrics
registry when both the SCEP server and the metrics listener run. Read at scrape time from the responder's plain
counters: nothing is formatted on the request path."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.scep.responder import ScepResponder

NAMESPACE = "birthline"


class ScepCollector(Collector):
    def __init__(self, responder: ScepResponder) -> None:
        self.responder = responder

    def collect(self) -> Iterable[Metric]:
        answers = CounterMetricFamily(f"{NAMESPACE}_scep_pki_operations", "SCEP PKIOperations by their answer",
                                      labels=["outcome"])  # fmt: skip
        for outcome, n in sorted(self.responder.stats.items()):
            answers.add_metric([outcome], n)
        yield answers
        admission = CounterMetricFamily(f"{NAMESPACE}_scep_admission", "SCEP PKIOperations by what their peer's"
                                        " budget and the shared one made of them (docs/scep.md)",
                                        labels=["outcome"])  # fmt: skip
        for outcome, n in sorted(self.responder.admission.stats.items()):
            admission.add_metric([outcome], n)
        yield admission
