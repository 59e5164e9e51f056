"""What a router (sglang-router) asks of each server behind it: /server_info and /model_info when it
registers the server, and /get_load for its load-aware policies (power_of_two).

The field names are SGLang's, because those are what the router reads: it names the server's model
by served_model_name (else model_path) and fills in that name for requests that give none. The older
/get_server_info and /get_model_info names answer the same, for routers that still ask those.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI
from minisgl_jax.server.client import EngineClient


@dataclass(frozen=True)
class ModelCard:
    """The model behind this server, as the launcher knows it (model_type and architectures are
    those of the model's config.json, when it is on this host)."""

    model_path: str = ""
    tokenizer_path: str = ""
    tp_size: int = 1
    model_type: str | None = None
    architectures: tuple[str, ...] = ()


class WorkerInfo:
    """The routes a router reads; none of them is gated on readiness (the router asks /health first)."""

    def __init__(self, client: EngineClient, served_model_name: str, card: ModelCard) -> None:
        self.client, self.served_model_name, self.card = client, served_model_name, card
        try:
            self.version = version("minisgl-jax")
        except PackageNotFoundError:  # run from a checkout that is not installed
            self.version = "unknown"

    def install(self, app: FastAPI) -> None:
        for paths, endpoint in ((("/server_info", "/get_server_info"), self.server_info),
                                (("/model_info", "/get_model_info"), self.model_info),
                                (("/get_load",), self.load)):
            for path in paths:
                app.add_api_route(path, endpoint, methods=["GET"])

    async def server_info(self) -> dict[str, Any]:
        """The server's name, model and sizes; the sizes are None while the model loads."""
        ready = self.client.ready
        return {
            "served_model_name": self.served_model_name,
            "model_path": self.card.model_path,
            "tokenizer_path": self.card.tokenizer_path,
            "tp_size": self.card.tp_size,
            "dp_size": 1,  # one scheduler per server; replicas are separate servers behind the router
            "version": self.version,
            "max_running_requests": ready.max_running_requests if ready else None,
            "max_total_tokens": ready.kv_tokens if ready else None,
            "context_length": ready.max_model_len if ready else None,
        }

    async def model_info(self) -> dict[str, Any]:
        return {
            "model_path": self.card.model_path,
            "tokenizer_path": self.card.tokenizer_path,
            "served_model_name": self.served_model_name,
            "is_generation": True,
            "model_type": self.card.model_type,
            "architectures": list(self.card.architectures),
        }

    async def load(self) -> list[dict[str, int]]:
        """One entry (one scheduler): requests running and waiting, and the KV tokens that running
        requests hold. The router sums num_tokens over the entries as this server's load."""
        stats, ready = self.client.stats, self.client.ready
        if stats is None or ready is None:
            return [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]
        held_pages = stats.kv_pages_total - stats.kv_pages_free - stats.kv_pages_cached
        return [{"dp_rank": 0, "num_reqs": stats.num_running + stats.num_waiting,
                 "num_waiting_reqs": stats.num_waiting, "num_tokens": held_pages * ready.page_size}]
