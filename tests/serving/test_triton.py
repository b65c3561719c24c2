"""`prunert serve ART --triton` for real: the Triton server (PyTriton, in its own numpy-1 environment) started as a
subprocess on 127.0.0.1, spoken to with tritonclient HTTP and gRPC from this (numpy 2) environment.

PyTriton pins numpy < 2, so the [triton] extra lives in a virtual environment of its own: `triton_python` builds it
once per machine (in the user's prunert cache, keyed by the requirements: pyproject's dependencies + its [triton]
extra) and the server runs this checkout from it (PYTHONPATH). PRUNERT_TRITON_PYTHON names a prebuilt interpreter
instead. Every server is killed at the end (its process group), every client call has a timeout.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import fcntl
import hashlib
import importlib.util
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest

from prunert.config import GenerationConfig

REPO = Path(__file__).resolve().parents[2]
USER_CACHE = Path(os.environ.get("PRUNERT_CACHE") or "~/.cache/prunert").expanduser()  # read before conftest moves it
IMAGES = [REPO / "examples" / "images" / name for name in ("astronaut.jpg", "coffee.jpg", "chelsea.jpg")]
PROMPTS = ["<image>\nWhat is in the picture?", "<image> a cat?", "<image>\nDescribe the large object on the left."]
MAX_TOKENS = 16
MODEL, STREAM_MODEL = "prunert", "prunert_stream"
TIMEOUT_S = 60.0  # any one client call
START_S = 300.0  # the server's start: PyTriton copies tritonserver and loads five Python-backend stubs


def triton_requirements() -> list[str]:
    """What the Triton environment installs: prunert's own dependencies and its [triton] extra, from pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extra = project.get("optional-dependencies", {}).get("triton")
    if not extra:
        pytest.fail("pyproject.toml has no [triton] extra (nvidia-pytriton and its numpy < 2 pin)")
    return [*project["dependencies"], *extra]


def test_default_install_is_unaffected_by_the_triton_extra() -> None:
    """numpy < 2 and PyTriton are the [triton] extra's alone: this (the default + test) environment keeps numpy 2 and
    has no pytriton, and no other requirement list names either."""
    from packaging.requirements import Requirement

    assert int(np.__version__.split(".")[0]) >= 2, np.__version__
    assert importlib.util.find_spec("pytriton") is None, "pytriton is installed in the default environment"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lists = {"dependencies": project["dependencies"], **project.get("optional-dependencies", {})}
    assert "triton" in lists, "pyproject.toml has no [triton] extra"
    for name, requirements in lists.items():
        parsed = [Requirement(r) for r in requirements]
        if name == "triton":
            assert {"nvidia-pytriton", "numpy"} <= {r.name for r in parsed}, requirements
            continue
        assert "nvidia-pytriton" not in {r.name for r in parsed}, (name, requirements)
        assert all(r.specifier.contains("2.0.0") for r in parsed if r.name == "numpy"), (name, requirements)


# ---- the Triton environment and the server --------------------------------------------------------------------
@pytest.fixture(scope="session")
def triton_python() -> Path:
    """The python of an environment with the [triton] extra (numpy < 2) and prunert's runtime dependencies."""
    given = os.environ.get("PRUNERT_TRITON_PYTHON")
    if given:
        return Path(given)
    requirements = triton_requirements()
    key = hashlib.sha256("\n".join([sys.version, *requirements]).encode()).hexdigest()[:12]
    env = USER_CACHE / "triton-env" / key
    env.parent.mkdir(parents=True, exist_ok=True)
    with open(env.parent / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per machine, however many sessions start at once
        if not (env / "complete").exists():
            build_env(env, requirements)
    return env / "bin" / "python"


def build_env(env: Path, requirements: list[str]) -> None:
    subprocess.run(["rm", "-rf", str(env)], check=True)
    steps = [[sys.executable, "-m", "venv", str(env)],
             [str(env / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=900)
        if done.returncode:
            pytest.skip(f"the [triton] environment cannot be built on this machine ({' '.join(step[:4])} ...): "
                        f"{(done.stderr or done.stdout)[-1500:]}")
    check = "import numpy, onnxruntime, tokenizers, PIL, pytriton; assert int(numpy.__version__.split('.')[0]) < 2"
    subprocess.run([str(env / "bin" / "python"), "-c", check], check=True, timeout=120)
    (env / "complete").write_text("\n".join(requirements))


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under `directory`: (size, mtime_ns, sha256)."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _die_with_parent() -> None:
    """(in the child) SIGTERM when the test process dies, however it dies: tritonserver follows its parent likewise."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Server:
    """A `prunert serve ART --triton` subprocess (its own process group) and clients for it."""

    def __init__(self, python: Path, artifact: Path, log: Path, *flags: str):
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.log = log
        self.clients: list = []
        command = [str(python), "-m", "prunert.cli", "serve", str(artifact), "--triton", "--host", "127.0.0.1",
                   "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                   "--metrics-port", str(self.metrics_port), *flags]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode} before it was ready:\n{self.log_tail()}")
            try:  # each model: /v2/health/ready is true before PyTriton has loaded any
                for model in (MODEL, STREAM_MODEL):
                    urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/models/{model}/ready", timeout=5).close()
                return
            except OSError:  # refused, or 400 (HTTPError) while a model is not loaded yet
                pass
            time.sleep(0.5)
        pytest.fail(f"the server was not ready within {START_S:.0f} s:\n{self.log_tail()}")

    def http(self):
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(f"127.0.0.1:{self.http_port}", connection_timeout=TIMEOUT_S,
                                                  network_timeout=TIMEOUT_S)
        self.clients.append(client)
        return client

    def grpc(self):
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{self.grpc_port}")
        self.clients.append(client)
        return client

    def close_clients(self) -> None:
        """Close every client's connections (tritonserver's shutdown waits for open HTTP connections)."""
        for client in self.clients:
            client.close()
        self.clients.clear()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=TIMEOUT_S) as r:
            return r.read().decode()

    def kill(self) -> None:
        """SIGTERM, then SIGKILL to the whole group (tritonserver and the backend stubs) whatever is left."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def served_artifact(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A copy of the tiny artifact to serve, and its snapshot (the server must never write into it)."""
    copy = tmp_path_factory.mktemp("served") / "artifact"
    subprocess.run(["cp", "-a", str(tiny_artifact), str(copy)], check=True)
    return copy, snapshot(copy)


@pytest.fixture(scope="module")
def server(triton_python: Path, served_artifact, tmp_path_factory: pytest.TempPathFactory):
    import tritonclient.grpc, tritonclient.http  # noqa: F401 - the test extra's clients (numpy 2): an error, not a skip
    running = Server(triton_python, served_artifact[0], tmp_path_factory.mktemp("triton-log") / "serve.log")
    try:
        running.wait_ready()
        yield running
    finally:
        running.kill()


@pytest.fixture(scope="module")
def expected(tiny_pipeline) -> list[tuple[str, list[int], str]]:
    """Each (image, prompt) run alone through VLMPipeline.generate, greedy: (text, kept indices, finish)."""
    answers = []
    for image, prompt in zip(IMAGES, PROMPTS):
        (g,) = tiny_pipeline.generate([image], [prompt], GenerationConfig(max_new_tokens=MAX_TOKENS))
        answers.append((g.text, [int(i) for i in g.kept_indices], "stop" if g.finish_reason == "eos" else "length"))
    return answers


# ---- clients ---------------------------------------------------------------------------------------------------
def infer_inputs(client_module, images: list[bytes], prompts: list[bytes], batched: bool = True, **params):
    """KServe v2 inputs for len(prompts) rows ([B, 1]; unbatched: [1]); params: max_tokens=..., temperature=..."""
    shape = [len(prompts), 1] if batched else [1]
    dtypes = {"max_tokens": ("INT32", np.int32), "temperature": ("FP32", np.float32), "top_p": ("FP32", np.float32),
              "seed": ("INT64", np.int64)}
    tensors = [("image", "BYTES", np.array(images, dtype=np.object_)), ("prompt", "BYTES", np.array(prompts, dtype=np.object_))]
    tensors += [(name, dtypes[name][0], np.array([value] * len(prompts), dtypes[name][1])) for name, value in params.items()]
    inputs = []
    for name, datatype, value in tensors:
        tensor = client_module.InferInput(name, shape, datatype)
        tensor.set_data_from_numpy(value.reshape(shape))
        inputs.append(tensor)
    return inputs


def rows_of(result) -> list[tuple[str, list[int], str, str]]:
    """A batched model's response -> per row (text, kept indices without the -1 padding, finish_reason, error)."""
    text, kept = result.as_numpy("text"), result.as_numpy("kept_indices")
    finish, error = result.as_numpy("finish_reason"), result.as_numpy("error")
    return [(text[b, 0].decode(), [int(i) for i in kept[b] if i >= 0], finish[b, 0].decode(), error[b, 0].decode())
            for b in range(text.shape[0])]


def ask(client, client_module, index: int) -> tuple[str, list[int], str, str]:
    inputs = infer_inputs(client_module, [IMAGES[index].read_bytes()], [PROMPTS[index].encode()], max_tokens=MAX_TOKENS)
    kwargs = {"client_timeout": TIMEOUT_S} if client_module.__name__.endswith("grpc") else {}
    (row,) = rows_of(client.infer(MODEL, inputs, **kwargs))
    return row


# ---- the tests -------------------------------------------------------------------------------------------------
def test_health_readiness_and_model_metadata(server) -> None:
    import grpc as grpcio  # Kubernetes' native gRPC probe speaks grpc.health.v1

    http, grpc = server.http(), server.grpc()
    assert http.is_server_live() and http.is_server_ready()
    assert grpc.is_server_live() and grpc.is_server_ready()
    for name in (MODEL, STREAM_MODEL):
        assert http.is_model_ready(name) and grpc.is_model_ready(name)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v2/health/live", timeout=TIMEOUT_S) as r:
        assert r.status == 200
    metadata = http.get_model_metadata(MODEL)
    assert {(t["name"], t["datatype"]) for t in metadata["inputs"]} == {
        ("image", "BYTES"), ("prompt", "BYTES"), ("max_tokens", "INT32"), ("temperature", "FP32"), ("top_p", "FP32"),
        ("seed", "INT64")}
    assert {(t["name"], t["datatype"]) for t in metadata["outputs"]} == {
        ("text", "BYTES"), ("kept_indices", "INT64"), ("finish_reason", "BYTES"), ("error", "BYTES")}
    config = http.get_model_config(MODEL)
    assert "dynamic_batching" in config and config["max_batch_size"] >= 1, config
    stream_config = grpc.get_model_config(STREAM_MODEL, as_json=True)["config"]
    assert stream_config["model_transaction_policy"]["decoupled"] is True, stream_config
    with grpcio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=bytes, response_deserializer=bytes)
        assert check(b"", timeout=TIMEOUT_S) == b"\x08\x01"  # HealthCheckResponse(status=SERVING)


def test_http_and_grpc_answer_as_the_pipeline_alone(server, expected) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    http, grpc = server.http(), server.grpc()
    for index, (text, kept, finish) in enumerate(expected):
        assert ask(http, httpclient, index) == (text, kept, finish, "")
        assert ask(grpc, grpcclient, index) == (text, kept, finish, "")


def test_a_request_may_carry_several_rows(server, expected) -> None:
    import tritonclient.http as httpclient

    inputs = infer_inputs(httpclient, [p.read_bytes() for p in IMAGES], [p.encode() for p in PROMPTS], max_tokens=MAX_TOKENS)
    rows = rows_of(server.http().infer(MODEL, inputs))
    assert rows == [(text, kept, finish, "") for text, kept, finish in expected]


def test_concurrent_requests_are_batched_and_answer_as_alone(server, expected) -> None:
    """16 requests released together over HTTP and gRPC: each answers as the pipeline alone, and Triton's dynamic
    batcher ran them in fewer executes than requests."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    def count(text: str, metric: str) -> float:
        line = next(l for l in text.splitlines() if l.startswith(f'{metric}{{model="{MODEL}"'))
        return float(line.rsplit(" ", 1)[1])

    before = server.metrics()
    requests, barrier = 16, threading.Barrier(16, timeout=TIMEOUT_S)

    def one(i: int):
        module = grpcclient if i % 2 else httpclient
        client = server.grpc() if i % 2 else server.http()
        barrier.wait()
        return i % len(PROMPTS), ask(client, module, i % len(PROMPTS))

    with concurrent.futures.ThreadPoolExecutor(requests) as pool:
        answers = list(pool.map(one, range(requests), timeout=4 * TIMEOUT_S))
    for index, answer in answers:
        assert answer == (*expected[index], "")
    after = server.metrics()
    done = count(after, "nv_inference_request_success") - count(before, "nv_inference_request_success")
    executes = count(after, "nv_inference_exec_count") - count(before, "nv_inference_exec_count")
    assert done == requests and executes < requests, (done, executes)


def test_grpc_streams_the_answer_in_pieces(server, expected) -> None:
    import queue

    import tritonclient.grpc as grpcclient

    client, responses = server.grpc(), queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)), stream_timeout=TIMEOUT_S)
    try:
        index = 0
        inputs = infer_inputs(grpcclient, [IMAGES[index].read_bytes()], [PROMPTS[index].encode()], batched=False,
                              max_tokens=MAX_TOKENS)
        client.async_stream_infer(STREAM_MODEL, inputs, enable_empty_final_response=True)
        pieces, final = [], None
        while final is None:
            result, error = responses.get(timeout=TIMEOUT_S)
            assert error is None, error
            if result.get_response().parameters["triton_final_response"].bool_param:
                final = pieces[-1] if pieces else None
                break
            pieces.append((result.as_numpy("text")[0].decode(), result.as_numpy("finish_reason")[0].decode(),
                           result.as_numpy("kept_indices").tolist(), result.as_numpy("error")[0].decode()))
    finally:
        client.stop_stream()
    text, kept, finish = expected[index]
    assert len(pieces) > 1, pieces  # streamed, not one answer at the end
    assert "".join(p[0] for p in pieces) == text
    assert all(p[1] == "" and p[2] == [-1] for p in pieces[:-1]), pieces  # -1: padding, no index yet
    assert final[1:] == (finish, kept, "")


def test_the_streaming_model_is_refused_over_http(server) -> None:
    """Triton serves a decoupled model over gRPC streams only: HTTP /infer answers with its own error."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    inputs = infer_inputs(httpclient, [IMAGES[0].read_bytes()], [PROMPTS[0].encode()], batched=False)
    with pytest.raises(InferenceServerException, match="decoupled"):
        server.http().infer(STREAM_MODEL, inputs)


def png_bomb(side: int) -> bytes:
    """A PNG whose header declares side x side pixels (the data: a few rows only)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(bytes(side + 1)) for _ in range(4)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


@pytest.mark.parametrize("image, prompt, needles", [
    (b"this is not an image", PROMPTS[0].encode(), ("image", "not a recognised image")),
    (png_bomb(20_000), PROMPTS[0].encode(), ("image", "pixels")),
    (b"", PROMPTS[0].encode(), ("image", "no data")),
    (None, b"\xff\xfe not utf-8 <image>", ("prompt", "UTF-8")),
    (None, b"<image> <image> two images", ("prompt", "placeholder")),
])
def test_a_bad_row_gets_its_error_and_its_batchmate_its_answer(server, expected, image, prompt, needles) -> None:
    """A bad image or prompt beside a good row, in one request: the bad row's error names the input, the good row is
    answered, and the server goes on answering."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    bad_image = IMAGES[1].read_bytes() if image is None else image
    inputs = infer_inputs(httpclient, [bad_image, IMAGES[0].read_bytes()], [prompt, PROMPTS[0].encode()],
                          max_tokens=MAX_TOKENS)
    bad, good = rows_of(server.http().infer(MODEL, inputs))
    assert bad[0] == "" and bad[1] == [] and bad[2] == "error", bad
    assert all(needle in bad[3] for needle in needles), bad
    assert "Traceback" not in bad[3]
    assert good == (*expected[0], "")
    assert ask(server.grpc(), grpcclient, 1) == (*expected[1], "")  # the server goes on


def test_bad_generation_parameters_name_the_input(server) -> None:
    import tritonclient.http as httpclient

    for params, needle in (({"max_tokens": 0}, "max_tokens"), ({"top_p": 0.0}, "top_p"), ({"temperature": -1.0}, "temperature"),
                           ({"seed": -3}, "seed")):
        inputs = infer_inputs(httpclient, [IMAGES[0].read_bytes()], [PROMPTS[0].encode()], **params)
        ((text, kept, finish, error),) = rows_of(server.http().infer(MODEL, inputs))
        assert finish == "error" and error.startswith(needle), (params, error)


def test_sampling_with_a_seed_answers_as_the_pipeline_alone(server, tiny_pipeline) -> None:
    import tritonclient.grpc as grpcclient

    config = GenerationConfig(max_new_tokens=MAX_TOKENS, temperature=1.0, top_p=0.5, seed=7)  # exact in FP32
    (alone,) = tiny_pipeline.generate([IMAGES[2]], [PROMPTS[2]], config)
    inputs = infer_inputs(grpcclient, [IMAGES[2].read_bytes()], [PROMPTS[2].encode()], max_tokens=MAX_TOKENS,
                          temperature=1.0, top_p=0.5, seed=7)  # exact in FP32
    for _ in range(2):
        ((text, _, _, error),) = rows_of(server.grpc().infer(MODEL, inputs, client_timeout=TIMEOUT_S))
        assert (text, error) == (alone.text, "")


def test_sigterm_stops_the_server_and_the_artifact_is_untouched(server, served_artifact) -> None:
    """Last in this module: SIGTERM ends the server (exit 0) and tritonserver with it; the artifact it served,
    read-only to it, is byte for byte and timestamp for timestamp what it was, with no file added."""
    server.close_clients()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=90) == 0, server.log_tail()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v2/health/live", timeout=5)
    artifact, before = served_artifact
    assert snapshot(artifact) == before


def test_a_full_queue_refuses_the_surplus_rows_by_name(triton_python: Path, served_artifact, expected,
                                                      tmp_path: Path) -> None:
    """One decode row and one queue place (--max-batch 1 --max-queue 1), 16 requests at once: each is answered as alone
    or refused with an error saying the queue is full (none lost, none a Triton error), and the server answers after;
    then Ctrl-C stops it (130)."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    full = Server(triton_python, served_artifact[0], tmp_path / "serve.log", "--max-batch", "1", "--max-queue", "1")
    try:
        full.wait_ready()
        barrier = threading.Barrier(16, timeout=TIMEOUT_S)

        def one(i: int):
            client = full.http()
            barrier.wait()
            return i % len(PROMPTS), ask(client, httpclient, i % len(PROMPTS))

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(one, range(16), timeout=4 * TIMEOUT_S))
        refused = [answer for _, answer in answers if answer[2] == "error"]
        assert all(answer[:3] == ("", [], "error") and "queue is full" in answer[3] for answer in refused), refused
        assert all(answer == (*expected[index], "") for index, answer in answers if answer[2] != "error"), answers
        assert 0 < len(refused) < 16, answers
        assert ask(full.grpc(), grpcclient, 0) == (*expected[0], "")
        full.close_clients()
        full.process.send_signal(signal.SIGINT)  # Ctrl-C: the same shutdown, exit 130
        assert full.process.wait(timeout=90) == 130, full.log_tail()
        assert full.log_tail().rstrip().endswith("prunert: interrupted"), full.log_tail()
    finally:
        full.close_clients()
        full.kill()


def test_triton_without_pytriton_is_one_error_line(cli_subprocess, error_line, tiny_artifact: Path) -> None:
    """In the default environment (no PyTriton) --triton says how to get it, in one line, exit 2."""
    ports = [str(port) for port in free_ports(3)]
    done = cli_subprocess("serve", tiny_artifact, "--triton", "--http-port", ports[0], "--grpc-port", ports[1],
                          "--metrics-port", ports[2])
    assert done.returncode == 2, done.stderr
    error_line(done.stderr, "--triton", "PyTriton", "prunert[triton]")


@pytest.mark.parametrize("flag", ["--http-port", "--grpc-port", "--metrics-port"])
def test_a_port_in_use_is_one_error_line(cli_subprocess, error_line, tiny_artifact: Path, flag: str) -> None:
    """A port something listens on is refused before Triton starts (it would exit, and PyTriton wait for it)."""
    ports = dict(zip(["--http-port", "--grpc-port", "--metrics-port"], free_ports(3)))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[flag]))
        taken.listen()
        done = cli_subprocess("serve", tiny_artifact, "--triton", "--host", "127.0.0.1",
                              *(item for pair in ports.items() for item in map(str, pair)))
    assert done.returncode == 2, done.stderr
    error_line(done.stderr, f"{flag} {ports[flag]}", "expected a free port")


def test_triton_ports_must_differ(cli_subprocess, error_line, tiny_artifact: Path) -> None:
    done = cli_subprocess("serve", tiny_artifact, "--triton", "--http-port", "18000", "--grpc-port", "18000")
    assert done.returncode == 2, done.stderr
    error_line(done.stderr, "--http-port", "--grpc-port", "different")
