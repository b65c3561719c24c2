"""The runtime path runs where torch and transformers cannot be imported: `import prunert.runtime`,
VLMPipeline end to end on the exported tiny artifact, and `prunert run` / `prunert inspect`."""

from __future__ import annotations

from prunert.config import SCHEMA_VERSION

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PHOTO = REPO / "examples" / "images" / "astronaut.jpg"
PROMPT = "<image>\nWhat is in the picture?"

def test_blocker_blocks(python_without) -> None:
    result = python_without(
        """
        for name in ("torch", "transformers", "torch.nn"):
            try:
                __import__(name)
            except ImportError:
                pass
            else:
                raise SystemExit(f"{name} imported despite the blocker")
        assert_no_heavy_modules()
        print("blocked")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "blocked"


def test_pipeline_end_to_end_without_torch(python_without, tiny_artifact: Path) -> None:
    result = python_without(
        """
        import prunert.runtime
        from prunert.config import GenerationConfig
        from prunert.runtime import VLMPipeline

        artifact, photo, prompt = sys.argv[1:4]
        pipe = VLMPipeline(artifact)
        pieces = []
        result = pipe.generate([photo], [prompt], GenerationConfig(max_new_tokens=8), on_token=lambda r, t, s: pieces.append(s))[0]
        assert len(result.token_ids) >= 1 and "".join(pieces) == result.text
        assert len(result.kept_indices) == pipe.manifest.budget.budget
        assert_no_heavy_modules()
        print("ANSWER:" + repr(result.text))
        print("TOKENS:" + ",".join(map(str, result.token_ids)))
        """,
        tiny_artifact,
        PHOTO,
        PROMPT,
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    assert lines["ANSWER"].strip("'\"").strip(), result.stdout
    assert len(lines["TOKENS"].split(",")) >= 1


def test_cli_run_and_inspect_without_torch(python_without, tiny_artifact: Path) -> None:
    result = python_without(
        """
        from prunert import cli

        artifact, photo, prompt = sys.argv[1:4]
        run_code = cli.main(["run", artifact, "--image", photo, "--prompt", prompt, "--max-new-tokens", "6", "--no-stream"])
        assert_no_heavy_modules()
        inspect_code = cli.main(["inspect", artifact])
        json_code = cli.main(["inspect", artifact, "--json"])
        chat_code = cli.main(["run", artifact, "--image", photo, "--prompt", "no placeholder", "--max-new-tokens", "2"])  # chat template
        bad_code = cli.main(["run", artifact, "--image", photo, "--prompt", "<image> twice <image>"])
        assert_no_heavy_modules()
        print(f"CODES {run_code} {inspect_code} {json_code} {chat_code} {bad_code}")
        """,
        tiny_artifact,
        PHOTO,
        PROMPT,
    )
    assert result.returncode == 0, result.stderr
    assert "CODES 0 0 0 0 2" in result.stdout, result.stdout + result.stderr
    assert "kept 16/100 visual tokens (resprune)" in result.stderr
    assert "K=16 of N=100" in result.stdout  # the inspect table
    assert f'"schema_version": {SCHEMA_VERSION}' in result.stdout  # inspect --json
    assert "prunert: error: prompt '<image> twice <image>'" in result.stderr
    assert "Traceback" not in result.stderr


def test_serving_without_torch(python_without, tiny_artifact: Path) -> None:
    """prunert.serving (engine, HTTP server, OpenAI protocol, `prunert serve`, the Triton model) stays torch-free."""
    result = python_without(
        """
        import prunert.serving.cli, prunert.serving.openai_api, prunert.serving.triton
        from prunert.runtime import VLMPipeline
        from prunert.serving.config import EngineConfig
        from prunert.serving.engine import Engine
        from prunert.serving.http_server import HttpServer, make_server

        engine = Engine(VLMPipeline(sys.argv[1]), EngineConfig()).start()
        make_server(HttpServer(engine))  # the app and its uvicorn server over the running engine
        engine.shutdown(0)
        assert_no_heavy_modules()
        print("ok")
        """,
        tiny_artifact,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
