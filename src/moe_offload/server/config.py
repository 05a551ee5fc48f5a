"""Server settings: one frozen dataclass; `moe-offload serve` reads its flag defaults from it.

Kept apart from the app so that the CLI can read these defaults without importing FastAPI.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"          # loopback: reachable from this machine only
    port: int = 8000
    api_key: str | None = None       # when set, every endpoint but /health needs `Authorization: Bearer KEY`
    max_batch: int = 8               # sequences decoded together (RuntimeConfig.max_batch of the served engine)
    max_queue: int = 64              # requests waiting for the engine before new ones get 429
    max_body_bytes: int = 1 << 20    # larger request bodies get 413
    body_timeout: float = 30.0       # seconds to receive a whole request body; a slower client gets 408

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port {self.port} is not a TCP port; use 0-65535")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("--api-key is empty; give a key, or leave the flag out to serve without one")
        if self.max_batch < 1:
            raise UserError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.max_queue < 1:
            raise UserError(f"--max-queue must be at least 1, got {self.max_queue}")
        if self.max_body_bytes < 1024:
            raise UserError(f"--max-body-bytes must be at least 1024, got {self.max_body_bytes}")
        if not self.body_timeout > 0:
            raise UserError(f"--body-timeout must be above 0 seconds, got {self.body_timeout}")
