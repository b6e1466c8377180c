"""Per-client token buckets: ``rate`` tokens per second up to ``burst``; one token per request."""
from __future__ import annotations

import threading
import time


class TokenBuckets:
    def __init__(self, rate: float, burst: float, clock=time.monotonic, max_clients: int = 100_000):
        self.rate, self.burst, self.clock = float(rate), float(burst), clock
        self.max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """0.0 when the request may proceed, else the seconds until a token is available."""
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                if len(self._buckets) >= self.max_clients and client not in self._buckets:
                    self._buckets.clear()  # bounded memory: idle clients start full again
                self._buckets[client] = (tokens - 1.0, now)
                return 0.0
            self._buckets[client] = (tokens, now)
            return (1.0 - tokens) / self.rate
