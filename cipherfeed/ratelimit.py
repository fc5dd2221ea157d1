"""Token buckets by name (an owner, a key): ``rate`` requests per second, bursts up to ``burst``.

Memory is bounded: beyond ``max_buckets`` the least recently used bucket is forgotten (it comes
back full, which errs towards allowing; the bound is what matters under a flood of new names).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from cipherfeed.errors import rate_limited


class TokenBuckets:
    def __init__(self, rate: float, burst: int, max_buckets: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limit needs a positive rate and a burst of at least 1")
        self.rate = rate
        self.burst = float(burst)
        self.max_buckets = max_buckets
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # name -> (tokens, at)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)

    def take(self, name: str, what: str = "requests") -> None:
        """Spends one token of ``name``'s bucket, or RESOURCE_EXHAUSTED / RATE_LIMITED saying when
        one is back (a google.rpc.RetryInfo)."""
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.pop(name, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens < 1.0:
                self._buckets[name] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
                raise rate_limited(f"too many {what}: at most {self.rate:g}/s (burst {self.burst:g})", wait)
            self._buckets[name] = (tokens - 1.0, now)
            while len(self._buckets) > self.max_buckets:
                self._buckets.popitem(last=False)
