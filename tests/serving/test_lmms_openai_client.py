"""lmms-eval's own OpenAI-compatible client (`--model openai`, alias `openai_compatible`) against `prunert serve`, on a
local shapes task (no download): several requests in flight at once, and every answer is the one the same chat
gives through VLMPipeline alone — serving under load does not change what an evaluation sees."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from prunert.config import GenerationConfig
from prunert.integrations.lmms_eval_tasks import DEFAULT_TASK, write_task

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None,
                                reason="lmms-eval is not installed (the `lmms` extra; README, lmms-eval)")
COUNT = 8
MAX_NEW = 8  # the task template's max_new_tokens


def test_lmms_eval_openai_client_gets_the_pipelines_answers(server, tiny_pipeline, tmp_path: Path) -> None:
    from prunert.shapes.dataset import write_eval_set

    data = write_eval_set(tmp_path / "set", COUNT, seed=5)
    task_dir, out = tmp_path / "task", tmp_path / "out"
    write_task(data, task_dir)
    model_id = Path(tiny_pipeline.artifact.directory).name
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OPENAI_API_KEY="unused", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    args = ["--model", "openai", "--model_args", f"model_version={model_id},base_url={server.url}/v1,num_concurrent=4,max_retries=1,timeout=60",
            "--tasks", DEFAULT_TASK, "--include_path", str(task_dir), "--limit", str(COUNT), "--output_path", str(out), "--log_samples"]
    proc = subprocess.run([sys.executable, "-m", "lmms_eval", "eval", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (samples_file,) = out.rglob(f"*_samples_{DEFAULT_TASK}.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert len(samples) == COUNT
    rows = [json.loads(line) for line in (task_dir / f"{DEFAULT_TASK}.jsonl").read_text().splitlines()]
    for sample in samples:
        row = rows[sample["doc_id"]]
        messages = [{"role": "user", "content": [{"type": "text", "text": sample["input"]}, {"type": "image"}]}]  # as the client sends
        image = Image.open(row["image"]).convert("RGB")
        alone = tiny_pipeline.chat(messages, image, GenerationConfig(max_new_tokens=MAX_NEW)).text
        response = sample.get("resps", sample["filtered_resps"])  # the log leaves resps out where filtering kept it as it was
        assert response == alone, (sample["doc_id"], response, alone)
        assert sample["token_counts"][0]["output_tokens"] == MAX_NEW
    assert server.finished().get("length", 0) + server.finished().get("stop", 0) >= COUNT
