"""Settings of `prunert serve` (one frozen dataclass each, defaults here only; the CLI's flags are made from them)."""

from __future__ import annotations

from dataclasses import dataclass

from prunert.errors import ConfigError


@dataclass(frozen=True)
class EngineConfig:
    """The scheduler behind every server (prunert.serving.engine.Engine).

    max_batch:  rows decoding together; 0 = the artifact's exported max_batch (the most it allows).
    max_queue:  requests waiting for a row; one more is refused (HTTP 429 with Retry-After).
    drain_s:    on shutdown (SIGTERM), how long in-flight requests may run before they are cancelled.
    """

    max_batch: int = 0
    max_queue: int = 64
    drain_s: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.max_batch, bool) or self.max_batch < 0:
            raise ConfigError(f"--max-batch: got {self.max_batch}, expected >= 1 (or 0: the artifact's max_batch)")
        if isinstance(self.max_queue, bool) or self.max_queue < 1:
            raise ConfigError(f"--max-queue: got {self.max_queue}, expected >= 1")
        if not self.drain_s >= 0:
            raise ConfigError(f"--drain-s: got {self.drain_s}, expected >= 0 seconds")
