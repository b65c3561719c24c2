"""Shared fixtures: a per-session synthetic-checkpoint cache and ONE exported tiny artifact.

The artifact is exported once per session (~15-30 s); tests that tamper with an artifact copy it
first (`artifact_copy`), never modify the shared one. Helpers are fixtures (`tiny_settings`,
`error_line`, `cli_subprocess`, `python_without`), so test modules never import this file.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = "synthetic:llava-tiny"
TINY_BUDGET = 16
TINY_MAX_PROMPT = 48
TINY_MAX_NEW = 16
TINY_N = 100  # visual tokens of llava-tiny (140 / 14) ** 2


TINY_SETTINGS = {
    "model": TINY,
    "budget": TINY_BUDGET,
    "max_prompt_tokens": TINY_MAX_PROMPT,
    "max_new_tokens": TINY_MAX_NEW,
    "num_visual_tokens": TINY_N,
}


@pytest.fixture(scope="session")
def tiny_settings() -> dict:
    """What `tiny_artifact` was exported with."""
    return dict(TINY_SETTINGS)


@pytest.fixture(scope="session")
def error_line():
    """assert_one_error_line(stderr, *needles) -> the line."""
    return assert_one_error_line


@pytest.fixture
def prunert_main(capsys):
    """prunert_main(*args) -> (exit code, stdout, stderr) of `prunert ARGS` run in-process (cli.main)."""
    from prunert import cli

    def main(*args) -> tuple[int, str, str]:
        code = cli.main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return main


@pytest.fixture(scope="session")
def edit_manifest():
    """edit_manifest(artifact, change): change(data) applied to the artifact's manifest.json (hashes left as they were)."""
    return rewrite_manifest


def rewrite_manifest(artifact: Path, change) -> None:
    from prunert.manifest import MANIFEST_NAME

    path = artifact / MANIFEST_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="session")
def cli_subprocess():
    """run_cli(*args) -> CompletedProcess of `python -m prunert.cli ARGS`."""
    return run_cli


# Installed before anything else is imported: any import of a blocked package (or a submodule) raises
# ImportError, as on an edge device where it is not installed.
_IMPORT_BLOCKER = """
import sys

BLOCKED = {blocked!r}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked in this test (runtime must not need it)")
        return None

sys.meta_path.insert(0, Blocker())

def assert_no_heavy_modules():
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not heavy, heavy
"""


def run_python_without(code: str, *args: object, blocked: tuple[str, ...] = ("torch", "transformers")) -> subprocess.CompletedProcess:
    """`python -c CODE ARGS` with `blocked` packages unimportable; CODE may call assert_no_heavy_modules()."""
    source = _IMPORT_BLOCKER.format(blocked=tuple(blocked)) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", source, *map(str, args)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="session")
def python_without():
    """run_python_without(code, *args, blocked=("torch", "transformers")) -> CompletedProcess."""
    return run_python_without


@pytest.fixture(scope="session", autouse=True)
def prunert_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PRUNERT_CACHE -> a session temp dir, before anything builds a synthetic checkpoint.

    `synthetic_checkpoint` reads the variable at call time (`$PRUNERT_CACHE/synthetic/...`), and
    subprocesses inherit it.
    """
    cache = tmp_path_factory.mktemp("prunert-cache")
    previous = os.environ.get("PRUNERT_CACHE")
    os.environ["PRUNERT_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("PRUNERT_CACHE", None)
    else:
        os.environ["PRUNERT_CACHE"] = previous


FAKE_TRT = REPO / "tests" / "engines" / "test_engine_fake_backend.py"


def fake_trt_backend():
    """The CPU stand-in for tensorrt + cuda-python (tests/engines/test_engine_fake_backend.py), loaded by path."""
    return module_from_path("prunert_tests_fake_trt_backend", FAKE_TRT)


def module_from_path(name: str, path: Path):
    """The module at `path` (a test helper or a bench/ script), imported once as `name`."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def load_module():
    """load_module(name, path) -> the module at path, imported once (module_from_path)."""
    return module_from_path


@pytest.fixture
def fake_trt(monkeypatch, tmp_path: Path):
    """Fake tensorrt 10.3 + cuda-python (sm 8.7) in sys.modules and a fresh machine cache: -> (trt, cudart)."""
    monkeypatch.setenv("PRUNERT_CACHE", str(tmp_path / "machine-cache"))
    installed = fake_trt_backend().install(monkeypatch)
    for name in ("tensorrt", "cuda", "cuda.bindings", "cuda.bindings.runtime"):  # torch._dynamo find_spec()s tensorrt
        sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
    return installed


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory, prunert_cache: Path) -> Path:
    """synthetic:llava-tiny exported once, K=16, max 48 prompt tokens, 16 new tokens. Read-only!"""
    from prunert.config import BudgetConfig, ExportConfig
    from prunert.export.pipeline import export_artifact

    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    export_artifact(
        TINY,
        out,
        BudgetConfig(budget=TINY_BUDGET),
        ExportConfig(max_prompt_tokens=TINY_MAX_PROMPT, max_new_tokens=TINY_MAX_NEW),
        log=lambda message: None,
    )
    return out


# The cache a user's session has (read before prunert_cache points PRUNERT_CACHE at a temp dir): the trained
# synthetic:llava-shapes lives there, so a test session trains it at most once per machine, never per session.
USER_CACHE = Path(os.environ.get("PRUNERT_CACHE") or "~/.cache/prunert").expanduser()


@pytest.fixture(scope="session")
def shapes_checkpoint() -> Path:
    """The trained synthetic:llava-shapes directory (trained into the user's cache on first use, minutes). Read-only!"""
    from prunert.adapters.llava.synthetic import synthetic_checkpoint

    return synthetic_checkpoint("llava-shapes", cache_dir=USER_CACHE / "synthetic")


@pytest.fixture(scope="session")
def tiny_checkpoint(prunert_cache: Path) -> Path:
    """The cached synthetic llava-tiny Hugging Face directory."""
    from prunert.adapters.llava.synthetic import synthetic_checkpoint

    return synthetic_checkpoint("llava-tiny")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_artifact: Path):
    from prunert.runtime import VLMPipeline

    return VLMPipeline(tiny_artifact)


@pytest.fixture
def artifact_copy(tiny_artifact: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny artifact, free to tamper with."""
    copy = tmp_path / "artifact"
    shutil.copytree(tiny_artifact, copy)
    return copy


def run_cli(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """`python -m prunert.cli ARGS` in a subprocess (cwd = repo root)."""
    return subprocess.run(
        [sys.executable, "-m", "prunert.cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=subprocess_env(),
        **kwargs,
    )


def subprocess_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])))


def assert_one_error_line(stderr: str, *needles: str) -> str:
    """stderr holds exactly one line, `prunert: error: ...`, with every needle, and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("prunert: error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="session")
def greedy_steps():
    """session, embedding table, prefill (embeds, mask, positions) -> (logits per call, the session's cache, final mask):
    a prefill then `steps` greedy decode steps through DecoderSession.run (the sessions' tests compare two of them)."""
    import numpy as np

    def run(session, table, embeds, mask, positions, steps: int = 4):
        session.reset(embeds.shape[0])
        logits = [session.run(embeds, mask, positions)]
        positions = positions[:, -1:]
        for _ in range(steps):
            token = logits[-1][:, -1].argmax(-1)
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
            positions = positions + 1
            logits.append(session.run(np.asarray(table[token], np.float32)[:, None], mask, positions))
        return logits, session.present(), mask

    return run


# Several images per prompt (issue 14): the two families that take them, exported once per session (max_batch 2, so
# a batch of two-image prompts needs two vision calls of a batched graph).
NEXT_TINY, NEXT_BUDGET = "synthetic:llava-next-tiny", 12
QWEN_TINY, QWEN_BUDGET = "synthetic:qwen2.5-vl-tiny", 16


def _export_tiny(tmp_path_factory: pytest.TempPathFactory, model: str, budget: int, name: str) -> Path:
    from prunert.config import BudgetConfig, ExportConfig
    from prunert.export.pipeline import export_artifact

    out = tmp_path_factory.mktemp("artifacts") / name
    export_artifact(model, out, BudgetConfig(budget=budget), ExportConfig(max_prompt_tokens=64, max_new_tokens=16, max_batch=2),
                    log=lambda message: None)
    return out


@pytest.fixture(scope="session")
def next_tiny_artifact(tmp_path_factory: pytest.TempPathFactory, prunert_cache: Path) -> Path:
    """synthetic:llava-next-tiny exported once, K=12 per image, 64 prompt tokens, 16 new tokens, max batch 2. Read-only!"""
    return _export_tiny(tmp_path_factory, NEXT_TINY, NEXT_BUDGET, "next-tiny")


@pytest.fixture(scope="session")
def qwen_tiny_artifact(tmp_path_factory: pytest.TempPathFactory, prunert_cache: Path) -> Path:
    """synthetic:qwen2.5-vl-tiny exported once, K=16 per image, 64 prompt tokens, 16 new tokens, max batch 2. Read-only!"""
    return _export_tiny(tmp_path_factory, QWEN_TINY, QWEN_BUDGET, "qwen-tiny")
