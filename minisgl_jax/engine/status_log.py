"""The engine's periodic one-line status for operators, while it has work."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class StatusLog:
    """One line every `interval_s` while busy: load, KV use, throughput since the last line, cache hits."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.tokens = 0  # generated since the last line
        self._last = time.perf_counter()

    def maybe_log(self, busy: bool, stats: Callable[[], dict[str, float | int]]) -> None:
        now = time.perf_counter()
        elapsed = now - self._last
        if elapsed < self.interval_s or not busy:
            return
        s = stats()
        used = 1 - s["kv_pages_free"] / max(1, s["kv_pages_total"])
        hit = s["cache_hit_tokens"] / max(1, s["prompt_tokens"])
        logger.info(
            "running %d, queued %d, KV %.0f%% used (%d cached pages), %.0f tok/s, cache hit %.0f%%, "
            "evicted pages %d, retractions %d",
            s["num_running"], s["num_waiting"], 100 * used, s["kv_pages_cached"],
            self.tokens / elapsed, 100 * hit, s["num_evicted_pages"], s["num_retractions"],
        )
        self._last, self.tokens = now, 0
