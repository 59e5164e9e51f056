"""The server's state as stress.py judges it: Prometheus metrics, drained and idle, KV pages in balance."""

from __future__ import annotations

import asyncio
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families


async def read_metrics(client: httpx.AsyncClient, base_url: str, headers: dict[str, str]) -> dict[str, float]:
    """Every sample, keyed as Prometheus writes it: name, or name{label="value",...}."""
    response = await client.get(base_url.rstrip("/") + "/metrics", headers=headers)
    response.raise_for_status()
    values = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def idle(m: dict[str, float]) -> bool:
    return m.get("minisgl_num_running_requests") == 0 and m.get("minisgl_num_waiting_requests") == 0


def pages_balance(m: dict[str, float]) -> bool:
    parts = [m.get(k) for k in ("minisgl_kv_pages_free", "minisgl_kv_cached_pages", "minisgl_kv_pages_total")]
    return None not in parts and parts[0] + parts[1] == parts[2]


async def drain(client: httpx.AsyncClient, base_url: str, headers: dict[str, str],
                timeout_s: float) -> dict[str, float]:
    """Metrics once the server is idle with its pages in balance, or the last ones after timeout_s.

    The figures come with the scheduler's heartbeat, so a hang-up that has just been aborted may still
    show as running: the checks are read when all settle, not at the first idle reading.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            m = await read_metrics(client, base_url, headers)
        except httpx.HTTPError:  # a server that died or hangs: the checks below then fail
            m = {}
        settled = idle(m) and pages_balance(m) and m.get("minisgl_kv_invariant_ok", 1) == 1
        if settled or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.25)


def increase(before: dict[str, float], after: dict[str, float], name: str) -> float | None:
    """Growth of a gauge that totals since start; None when the server does not report it."""
    return after[name] - before.get(name, 0.0) if name in after else None


def increases(before: dict[str, float], after: dict[str, float], prefix: str) -> dict[str, float]:
    """Growth of every labelled series of a counter, keyed by its labels."""
    return {k[len(prefix) + 1:-1]: v - before.get(k, 0.0) for k, v in after.items() if k.startswith(prefix + "{")}
