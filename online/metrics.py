"""Prometheus text-format metrics of one scorer process (no client library needed).

Thread-safe: gunicorn's threads and the Flask dev server may update concurrently. Each
worker process exports its own series; Prometheus sums them across scrape targets.
"""
from __future__ import annotations

import bisect
import threading
from collections import defaultdict

from .bus.kafka_decoder import fallbacks as kafka_decoder_fallbacks

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = defaultdict(int)  # (endpoint, status) -> count
        self.latency_counts = defaultdict(lambda: [0] * (len(LATENCY_BUCKETS) + 1))
        self.latency_sum = defaultdict(float)
        self.candidates_scored = 0
        self.degraded = defaultdict(int)  # reason -> count
        self.events_accepted = 0
        self.model_version = "none"
        self.model_reloads = defaultdict(int)   # outcome (loaded | failed) -> count (model.follow_current)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.latency_counts[endpoint][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self.latency_sum[endpoint] += seconds

    def add(self, *, candidates: int = 0, events: int = 0, degraded: str | None = None,
            model_reloaded: bool = False, model_reload_failed: bool = False) -> None:
        with self._lock:
            self.candidates_scored += candidates
            self.events_accepted += events
            if degraded:
                self.degraded[degraded] += 1
            if model_reloaded:
                self.model_reloads["loaded"] += 1
            if model_reload_failed:
                self.model_reloads["failed"] += 1

    def render(self) -> str:
        decoder_fallbacks = kafka_decoder_fallbacks()
        with self._lock:
            lines = [
                "# HELP stratarank_requests_total HTTP requests by endpoint and status.",
                "# TYPE stratarank_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'stratarank_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            lines += [
                "# HELP stratarank_request_seconds Request latency.",
                "# TYPE stratarank_request_seconds histogram",
            ]
            for endpoint, counts in sorted(self.latency_counts.items()):
                cumulative = 0
                for bound, count in zip(LATENCY_BUCKETS + (float("inf"),), counts):
                    cumulative += count
                    le = "+Inf" if bound == float("inf") else f"{bound:g}"
                    lines.append(f'stratarank_request_seconds_bucket{{endpoint="{endpoint}",le="{le}"}} {cumulative}')
                lines.append(f'stratarank_request_seconds_sum{{endpoint="{endpoint}"}} {self.latency_sum[endpoint]:.6f}')
                lines.append(f'stratarank_request_seconds_count{{endpoint="{endpoint}"}} {cumulative}')
            lines += [
                "# HELP stratarank_candidates_scored_total Candidates scored by /v1/rank.",
                "# TYPE stratarank_candidates_scored_total counter",
                f"stratarank_candidates_scored_total {self.candidates_scored}",
                "# HELP stratarank_events_accepted_total Feedback events accepted by /v1/events.",
                "# TYPE stratarank_events_accepted_total counter",
                f"stratarank_events_accepted_total {self.events_accepted}",
                "# HELP stratarank_degraded_responses_total Responses served without the primary model, by cause.",
                "# TYPE stratarank_degraded_responses_total counter",
            ]
            for reason, n in sorted(self.degraded.items()):
                lines.append(f'stratarank_degraded_responses_total{{reason="{reason}"}} {n}')
            lines += [
                "# HELP stratarank_model_info The model version being served.",
                "# TYPE stratarank_model_info gauge",
                f'stratarank_model_info{{version="{self.model_version}"}} 1',
                "# HELP stratarank_model_reloads_total New current versions this worker loaded (or failed to).",
                "# TYPE stratarank_model_reloads_total counter",
                *(f'stratarank_model_reloads_total{{outcome="{k}"}} {n}' for k, n in sorted(self.model_reloads.items())),
                "# HELP stratarank_kafka_decoder_fallbacks_total Kafka consumers reading with kafka-python's stock "
                "record decoder (about 3x slower) instead of the fast one, by cause: version (kafka-python is not "
                "2.3.x), private_api (something the fast one relies on is missing).",
                "# TYPE stratarank_kafka_decoder_fallbacks_total counter",
            ]
            for reason, n in sorted(decoder_fallbacks.items()):
                lines.append(f'stratarank_kafka_decoder_fallbacks_total{{reason="{reason}"}} {n}')
        return "\n".join(lines) + "\n"
