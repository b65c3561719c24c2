"""Settings of `prunert serve` (one frozen dataclass each, defaults here only; the CLI's flags are made from them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class HttpConfig:
    """`prunert serve`'s OpenAI-compatible HTTP server (prunert.serving.http_server).

    host, port:       where it listens (port 0: any free port, printed when it starts).
    max_body_mb:      a larger request body is refused with 413 before it is parsed (its rest is read and dropped).
    allow_image_dir:  image_url parts may name local files under this directory; None: only data: URIs.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_body_mb: float = 20.0
    allow_image_dir: Path | None = None

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise ConfigError(f"--port: got {self.port}, expected a TCP port 0..65535 (0: any free port)")
        if not 0 < self.max_body_mb < 1 << 20:
            raise ConfigError(f"--max-body-mb: got {self.max_body_mb}, expected a positive number of megabytes")
        if self.allow_image_dir is not None and not Path(self.allow_image_dir).is_dir():
            raise ConfigError(f"--allow-image-dir '{self.allow_image_dir}': not a directory, expected an existing directory of images")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))


@dataclass(frozen=True)
class TritonConfig:
    """`prunert serve --triton`: the engine as Triton models (prunert.serving.triton), through PyTriton.

    http_port, grpc_port, metrics_port:  Triton's KServe v2 HTTP and gRPC ports and its Prometheus port (Triton's
                        defaults); each binds --host.
    max_queue_delay_us: how long Triton's dynamic batcher holds a request for others to batch it with (microseconds).
    instances:          executes of the batched model in flight at once: each holds one of Triton's batches until its
                        answers are done, so a second batch joins the engine's running decode batch instead of waiting.
    """

    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_queue_delay_us: int = 2000
    instances: int = 4

    def __post_init__(self) -> None:
        ports = {"--http-port": self.http_port, "--grpc-port": self.grpc_port, "--metrics-port": self.metrics_port}
        for flag, port in ports.items():
            if isinstance(port, bool) or not 1 <= port <= 65535:
                raise ConfigError(f"{flag}: got {port}, expected a TCP port 1..65535")
        if len(set(ports.values())) < len(ports):
            raise ConfigError(f"--http-port, --grpc-port, --metrics-port: got {', '.join(map(str, ports.values()))}, "
                              "expected three different ports")
        if self.max_queue_delay_us < 0:
            raise ConfigError(f"max_queue_delay_us: got {self.max_queue_delay_us}, expected >= 0")
        if self.instances < 1:
            raise ConfigError(f"instances: got {self.instances}, expected >= 1")
