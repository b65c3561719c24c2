"""`prunert serve ARTIFACT`: the artifact behind an OpenAI-compatible HTTP API (prunert.serving.http_server), or with
--triton as Triton models (prunert.serving.triton), both over one Engine (continuous batching). Torch-free."""

from __future__ import annotations

import argparse
import ctypes
import logging
from pathlib import Path

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD = 64 << 10  # bytes


def add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `serve` subcommand on prunert's parser (prunert.cli.build_parser)."""
    from prunert.cli import _add_backend_flags
    from prunert.serving.config import EngineConfig, HttpConfig
    from prunert.serving.triton import add_triton_flags

    engine, http = EngineConfig(), HttpConfig()
    p = sub.add_parser("serve", help="serve an artifact over an OpenAI-compatible HTTP API (/v1/chat/completions; "
                       "needs prunert[serve]) or, with --triton, as Triton models (no torch needed)")
    p.add_argument("artifact", type=Path, help="artifact directory (`prunert export`); its directory name is the model id")
    p.add_argument("--host", default=http.host, help="address to listen on (default: %(default)s; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=http.port, help="TCP port (default: %(default)s; 0: any free port, printed at start)")
    _add_backend_flags(p)
    p.add_argument("--max-batch", type=int, default=engine.max_batch,
                   help="requests decoding together (default %(default)s: the artifact's exported max_batch, also the ceiling)")
    p.add_argument("--max-queue", type=int, default=engine.max_queue,
                   help="requests waiting for a decode row; one more gets 429 with Retry-After (default: %(default)s)")
    p.add_argument("--max-body-mb", type=float, default=http.max_body_mb,
                   help="largest request body in MiB; a larger one gets 413 (default: %(default)s)")
    p.add_argument("--drain-s", type=float, default=engine.drain_s,
                   help="on SIGTERM: seconds in-flight requests may run before they are cut (default: %(default)s)")
    p.add_argument("--allow-image-dir", type=Path, default=http.allow_image_dir, metavar="DIR",
                   help="let image_url parts name local files under DIR (default: none, only data:image/...;base64, URIs; "
                        "http(s) URLs are never fetched)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact's files (seconds on multi-GB artifacts)")
    add_triton_flags(p)  # --triton, --http-port, --grpc-port, --metrics-port
    p.set_defaults(func=serve)
    return p


def serve(args: argparse.Namespace) -> int:
    """Check every setting (and bind the port) before loading the artifact, start the engine, then serve until
    SIGTERM (-> 0) or Ctrl-C (130)."""
    from prunert.cli import runtime_config
    from prunert.runtime import Artifact, VLMPipeline
    from prunert.serving.config import EngineConfig, HttpConfig
    from prunert.serving.engine import Engine

    engine_config = EngineConfig(max_batch=args.max_batch, max_queue=args.max_queue, drain_s=args.drain_s)
    http_config = HttpConfig(host=args.host, port=args.port, max_body_mb=args.max_body_mb, allow_image_dir=args.allow_image_dir)
    logging.basicConfig(level=logging.WARNING, format="prunert serve: %(levelname)s %(name)s: %(message)s")

    def started() -> Engine:
        steady_malloc()
        artifact = Artifact(args.artifact, verify_hashes=not args.no_verify)
        return Engine(VLMPipeline(artifact, args.backend, args.precision, runtime_config(args)), engine_config).start()

    if args.triton:
        from prunert.serving.triton import serve_triton

        return serve_triton(args, started())
    from prunert.serving.http_server import bind, serve_http  # BackendUnavailableError without the [serve] extra

    sock = bind(http_config)  # a port in use fails before the artifact loads
    try:
        return serve_http(started(), http_config, sock)
    finally:
        sock.close()


def steady_malloc() -> None:
    """A server allocates and frees per-request buffers (bodies, decoded images, logits) for days. glibc serves those
    under its dynamic mmap threshold from heaps it seldom returns, so RSS climbs in steps and wanders (+-10% between
    idle moments over 2,400 requests of the tiny artifact, 150-190 MB); a fixed threshold of 64 KiB maps each large
    buffer on its own and unmaps it when freed (idle RSS 107-109 MB throughout, the same throughput). Not glibc (macOS,
    musl): its allocator's own policy stands."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
