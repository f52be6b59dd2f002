"""Prometheus text-format metrics of the service, kept by hand (no client library): counters and histograms
behind one lock, rendered by :meth:`Metrics.render`."""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SCORE_BUCKETS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
NORMALIZED_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class Histogram:
    """Cumulative buckets, sum and count of observed values."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> Iterable[str]:
        sep = "," if labels else ""
        for bound, count in zip(self.buckets, self.counts):
            yield f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {count}'
        yield f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}'
        suffix = f"{{{labels}}}" if labels else ""
        yield f"{name}_sum{suffix} {self.total:.6g}"
        yield f"{name}_count{suffix} {self.count}"


def escape(value: str) -> str:
    """A label value as the text format needs it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """What ``GET /metrics`` reports: requests by endpoint and status, request latency by endpoint, images
    scored and flagged, image and normalised scores, feedback updates, and the model being served."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.images_scored = 0
        self.images_flagged = 0
        self.scores = Histogram(SCORE_BUCKETS)
        self.normalized = Histogram(NORMALIZED_BUCKETS)
        self.feedback_updates = 0
        self.feedback_failures = 0

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def scored(self, score: float, is_anomalous: bool | None, normalized: float | None) -> None:
        with self._lock:
            self.images_scored += 1
            self.images_flagged += bool(is_anomalous)
            if math.isfinite(score):
                self.scores.observe(score)
            if normalized is not None:
                self.normalized.observe(normalized)

    def update(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self.feedback_updates += 1
            else:
                self.feedback_failures += 1

    def render(self, model_id: str | None) -> str:
        with self._lock:
            out = [
                "# HELP patchcore_requests_total HTTP requests by endpoint and status code.",
                "# TYPE patchcore_requests_total counter",
            ]
            for (endpoint, status), count in sorted(self.requests.items()):
                out.append(f'patchcore_requests_total{{endpoint="{escape(endpoint)}",status="{status}"}} {count}')
            out += [
                "# HELP patchcore_request_duration_seconds Request latency by endpoint.",
                "# TYPE patchcore_request_duration_seconds histogram",
            ]
            for endpoint, histogram in sorted(self.latency.items()):
                out += histogram.lines("patchcore_request_duration_seconds", f'endpoint="{escape(endpoint)}"')
            out += [
                "# HELP patchcore_images_scored_total Images scored.",
                "# TYPE patchcore_images_scored_total counter",
                f"patchcore_images_scored_total {self.images_scored}",
                "# HELP patchcore_images_flagged_total Images scored at or above the threshold.",
                "# TYPE patchcore_images_flagged_total counter",
                f"patchcore_images_flagged_total {self.images_flagged}",
                "# HELP patchcore_image_score Raw image anomaly scores.",
                "# TYPE patchcore_image_score histogram",
                *self.scores.lines("patchcore_image_score"),
                "# HELP patchcore_normalized_score Normalised image scores (0.5 at the threshold).",
                "# TYPE patchcore_normalized_score histogram",
                *self.normalized.lines("patchcore_normalized_score"),
                "# HELP patchcore_feedback_updates_total Model updates from operator feedback (ok or failed).",
                "# TYPE patchcore_feedback_updates_total counter",
                f'patchcore_feedback_updates_total{{result="ok"}} {self.feedback_updates}',
                f'patchcore_feedback_updates_total{{result="failed"}} {self.feedback_failures}',
                "# HELP patchcore_model_info The model being served (its id is the SHA-256 of its file).",
                "# TYPE patchcore_model_info gauge",
            ]
            if model_id is not None:
                out.append(f'patchcore_model_info{{model_id="{escape(model_id)}"}} 1')
            return "\n".join(out) + "\n"
