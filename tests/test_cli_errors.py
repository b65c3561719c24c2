"""Bad numbers on every command, a full disk, a read-only directory and Ctrl-C at start-up: one
`prunert: error:` line (or `prunert: interrupted`), exit 2 (130), no traceback, nothing written.

The limits live in prunert/config.py's dataclasses (ConfigError); these tests drive them through the CLI.
"""

from __future__ import annotations

import errno
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest

from prunert import cli, pruning_ops

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "examples" / "images" / "astronaut.jpg"
PROMPT = "<image>\nWhat is in the picture?"
MISSING = "/nonexistent/prunert-artifact"  # flags are checked before the artifact is opened


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def no_export(monkeypatch):
    """export_artifact must not be reached: a bad flag is refused before the checkpoint loads."""
    from prunert.export import pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("export_artifact called despite a bad flag")

    monkeypatch.setattr(pipeline, "export_artifact", refuse)


# ---------------------------------------------------------------------------------------- export flags


def _float_method_flags() -> list[tuple[str, str]]:
    """(method, flag) for every float field of every method's config dataclass."""
    found = []
    for method in pruning_ops.methods():
        for f in fields(pruning_ops.method_spec(method).config_type):
            if isinstance(f.default, float):
                found.append((method, f.name))
    return found


FLOAT_FLAGS = _float_method_flags()


def test_the_method_configs_have_float_parameters() -> None:
    assert ("resprune", "alpha") in FLOAT_FLAGS and ("visionzip", "contextual_fraction") in FLOAT_FLAGS


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("method, name", FLOAT_FLAGS)
def test_export_rejects_non_finite_method_parameters(error_line, prunert_main, no_export, tmp_path: Path, method: str, name: str, value: str) -> None:
    out = tmp_path / "out"
    code, _, err = prunert_main("export", "--model", "synthetic:llava-tiny", "--method", method, f"--{name.replace('_', '-')}={value}", "--out", out)
    assert code == 2
    error_line(err, name, "got")
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--max-batch", "0"], "--max-batch: got 0"),
        (["--max-batch", "1"], "--max-batch: got 1"),  # Dim(min=1, max=1) is a torch AssertionError at trace time
        (["--opset", "99"], "--opset: got 99"),
        (["--opset", "17"], "--opset: got 17"),  # fails after the whole vision export today
        (["--opset", "0"], "--opset: got 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens: got 0"),
        (["--max-prompt-tokens", "-4"], "--max-prompt-tokens: got -4"),
        (["--method", "random", "--seed", "-1"], "random seed: got -1"),
        (["--alpha", "-1"], "alpha: got -1"),
    ],
)
def test_export_rejects_bad_numeric_flags_before_loading(error_line, prunert_main, no_export, tmp_path: Path, flags: list[str], needle: str) -> None:
    out = tmp_path / "out"
    code, _, err = prunert_main("export", "--model", "synthetic:llava-tiny", *flags, "--out", out)
    assert code == 2
    error_line(err, needle)
    assert not out.exists()


def test_config_limits_are_in_the_dataclasses() -> None:
    from prunert.config import MAX_OPSET, MIN_OPSET, EngineBuildConfig, ExportConfig, GenerationConfig, ResPruneConfig
    from prunert.errors import ConfigError

    ExportConfig(opset=MIN_OPSET), ExportConfig(opset=MAX_OPSET)
    for bad in ({"opset": MAX_OPSET + 1}, {"max_batch": 0}):
        with pytest.raises(ConfigError):
            ExportConfig(**bad)
    for bad in ({"temperature": math.nan}, {"seed": -1}):
        with pytest.raises(ConfigError):
            GenerationConfig(**bad)
    with pytest.raises(ConfigError, match="alpha"):
        ResPruneConfig(alpha=math.inf)
    assert EngineBuildConfig.workspace_from_gib(0.5) == 1 << 29
    with pytest.raises(ConfigError, match="--workspace-gb"):
        EngineBuildConfig.workspace_from_gib(math.nan)


# ---------------------------------------------------------------------------------------- other commands


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--temperature", "nan"], "temperature: got nan"),  # numpy "Probabilities contain NaN" today
        (["--temperature", "inf"], "temperature: got inf"),  # ran today, sampling uniformly
        (["--seed", "-3"], "seed: got -3"),  # numpy "expected non-negative integer" today
        (["--top-p", "nan"], "top_p: got nan"),
        (["--max-new-tokens", "-1"], "max_new_tokens: got -1"),
    ],
)
def test_run_rejects_bad_numbers(error_line, prunert_main, tiny_artifact: Path, flags: list[str], needle: str) -> None:
    code, _, err = prunert_main("run", tiny_artifact, "--image", PHOTO, "--prompt", PROMPT, "--temperature", "1", *flags)
    assert code == 2
    error_line(err, needle)


@pytest.mark.parametrize(
    "command, needle",
    [
        (["build", MISSING, "--workspace-gb", "nan"], "--workspace-gb: got nan"),  # ValueError traceback today
        (["build", MISSING, "--workspace-gb", "inf"], "--workspace-gb: got inf"),  # OverflowError traceback today
        (["build", MISSING, "--workspace-gb", "0"], "--workspace-gb: got 0"),
        (["build", MISSING, "--max-batch", "0"], "--max-batch: got 0"),
        (["build", MISSING, "--max-seq", "-1"], "--max-seq: got -1"),
        (["build", MISSING, "--opt-level", "9"], "optimization_level: got 9"),
        (["parity", MISSING, "--image", PHOTO, "--prompt", PROMPT, "--greedy-tokens", "0"], "--greedy-tokens: got 0"),
        (["parity", MISSING, "--image", PHOTO, "--prompt", PROMPT, "--greedy-tokens", "-2"], "--greedy-tokens: got -2"),
    ],
)
def test_bad_numbers_on_other_commands(error_line, prunert_main, command: list[str], needle: str) -> None:
    code, _, err = prunert_main(*command)
    assert code == 2
    error_line(err, needle)


@pytest.mark.parametrize(
    "command, needle",
    [
        (["convert", "{a}", "--precision", "fp16", "--max-samples", "0"], "max_samples: got 0"),
        (["calibrate", "{a}", "--precision", "int8", "--max-samples", "-1"], "max_samples: got -1"),
        (["visualize", "{a}", "--image", str(PHOTO), "--prompt", PROMPT, "--out", "{a}/v.png", "--scale", "0"], "--scale: got 0"),
        # 9.5 GB resident within a minute today, and still drawing
        (["visualize", "{a}", "--image", str(PHOTO), "--prompt", PROMPT, "--out", "{a}/v.png", "--scale", "100000"], "--scale: got 100000"),
        (["check-trt", "{a}", "--max-topk", "0"], "max_topk: got 0"),
        (["check-trt", "{a}", "--max-opset", "-1"], "opset range"),
    ],
)
def test_bad_numbers_leave_the_artifact_untouched(error_line, prunert_main, artifact_copy: Path, command: list[str], needle: str) -> None:
    before = _snapshot(artifact_copy)
    code, _, err = prunert_main(*(part.format(a=artifact_copy) for part in command))
    assert code == 2
    error_line(err, needle)
    assert _snapshot(artifact_copy) == before


# ---------------------------------------------------------------------------------------- the machine's errors


def test_disk_full_during_convert_is_one_line_and_commits_nothing(error_line, prunert_main, monkeypatch, artifact_copy: Path) -> None:
    import onnx

    def full_disk(model, path, *args, **kwargs):  # a write() that fails part-way carries no filename
        Path(path).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    before = _snapshot(artifact_copy)
    monkeypatch.setattr(onnx, "save_model", full_disk)
    code, _, err = prunert_main("convert", artifact_copy, "--precision", "fp16", "--no-auto-islands")
    assert code == 2
    error_line(err, str(artifact_copy), "No space left on device", "ENOSPC")
    assert _snapshot(artifact_copy) == before  # ArtifactUpdate aborted: no staged file, manifest unchanged
    assert not (artifact_copy / ".staging").exists()


@pytest.mark.parametrize("number", [errno.EACCES, errno.EROFS, errno.EPERM])
def test_permission_errors_name_the_path(error_line, prunert_main, monkeypatch, tmp_path: Path, number: int) -> None:
    target = tmp_path / "locked" / "v.png"

    def refuse(args):  # the command's writer, e.g. PIL's save into a directory this user cannot write
        raise OSError(number, os.strerror(number), str(target))

    monkeypatch.setattr(cli, "_visualize", refuse)
    code, _, err = prunert_main("visualize", MISSING, "--image", PHOTO, "--prompt", PROMPT, "--out", target)
    assert code == 2
    error_line(err, str(target), os.strerror(number))


def test_other_os_errors_are_not_hidden(capsys, monkeypatch) -> None:
    def bug(args):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(cli, "_visualize", bug)
    with pytest.raises(OSError):
        cli.main(["visualize", MISSING, "--image", str(PHOTO), "--prompt", PROMPT, "--out", "x.png"])


# ---------------------------------------------------------------------------------------- Ctrl-C at start-up


def test_ctrl_c_while_building_the_parser_exits_130(prunert_main, monkeypatch) -> None:
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(pruning_ops, "methods", interrupted)  # build_parser lists the methods
    try:
        code, _, err = prunert_main("inspect", MISSING)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main()")
    assert code == 130
    assert err.strip() == "prunert: interrupted"


# A sitecustomize that raises KeyboardInterrupt when `module` is first imported: Ctrl-C while that import
# runs, the same for the console script, `python -m prunert` and `python -m prunert.cli`.
_INTERRUPT_ON_IMPORT = """
import sys

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, Interrupt())
"""


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("prunert")
    return [str(script)] if script.is_file() else [sys.executable, "-c", "import sys; from prunert.cli import main; sys.exit(main())"]


@pytest.mark.parametrize(
    "entry, module",
    [(entry, module) for entry in ("console-script", "-m prunert") for module in ("prunert.pruning_ops", "prunert.config")]
    + [("-m prunert", "prunert.cli")],  # the console script's own `from prunert.cli import main` is not prunert's code
)
def test_ctrl_c_during_startup_imports_exits_130(tmp_path: Path, entry: str, module: str) -> None:
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(_INTERRUPT_ON_IMPORT.format(module=module)))
    command = _console_script() if entry == "console-script" else [sys.executable, "-m", "prunert"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([*command, "inspect", MISSING], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip() == "prunert: interrupted", result.stderr


def test_a_real_sigint_during_export_exits_130(tmp_path: Path) -> None:
    """SIGINT once `python -m prunert export` says it is loading: exit 130, one line, nothing at --out."""
    import signal

    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "prunert", "export", "--model", "synthetic:llava-tiny", "--budget", "16", "--out", str(out)],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().startswith("loading"), "export did not start"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "prunert: interrupted", err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
