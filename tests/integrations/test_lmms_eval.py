"""The lmms-eval backend (prunert.integrations.lmms_eval): lmms-eval itself, installed, runs `--model prunert` on the
tiny artifact over a local task written from a generated shapes set (no download), and its answers are prunert's own
greedy answers; loglikelihood equals a one-pass prefill over context + continuation.

Skipped only when lmms_eval is not importable (CI installs the `lmms` extra: README, "lmms-eval").
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prunert.errors import ConfigError
from prunert.evaluation.runner import question_prompt
from prunert.evaluation.scoring import exact_match
from prunert.integrations.lmms_eval_tasks import DEFAULT_TASK, TEMPLATE, write_task

needs_lmms = pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None,
                                reason="lmms-eval is not installed (the `lmms` extra; README, lmms-eval)")

REPO = Path(__file__).resolve().parents[2]
COUNT = 8
MAX_NEW = 8  # the task template's max_new_tokens
UNTIL = "\n"  # and its stop string


@pytest.fixture(scope="module")
def shapes_jsonl(tmp_path_factory) -> Path:
    from prunert.shapes.dataset import write_eval_set

    return write_eval_set(tmp_path_factory.mktemp("shapes") / "set", COUNT, seed=3)


def prunert_answers(artifact: Path, jsonl: Path) -> list[str]:
    """What prunert's own runtime answers, greedy, one record at a time: the task's prompt, tokens, stop string."""
    from prunert.config import GenerationConfig
    from prunert.runtime import VLMPipeline

    pipe = VLMPipeline(artifact)
    answers = []
    for line in jsonl.read_text().splitlines():
        record = json.loads(line)
        prompt = question_prompt(pipe.manifest.text.placeholder, record["question"])
        text = pipe.generate([jsonl.parent / record["image"]], [prompt], GenerationConfig(max_new_tokens=MAX_NEW))[0].text
        answers.append(text.split(UNTIL)[0].strip())
    return answers


def with_predictions_accepted(jsonl: Path, answers: list[str], out: Path) -> list[bool]:
    """A copy of the set where every even record also accepts prunert's own answer (so the metric is not all 0);
    -> each record's expected correctness under prunert eval's exact match."""
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    for index, row in enumerate(rows):
        row["image"] = str(jsonl.parent / row["image"])
        row["answers"] = [row["answer"], answers[index]] if index % 2 == 0 else [row["answer"]]
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return [exact_match(answer, row["answers"]) for answer, row in zip(answers, rows)]


def run_lmms_eval(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m lmms_eval eval ARGS`, offline. cwd is a temp dir and PYTHONPATH is left alone: a stale
    prunert.egg-info in the repo root would shadow the installed entry points."""
    env = dict(os.environ, HF_HOME=str(cwd / "hf"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "lmms_eval", "eval", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@needs_lmms
def test_lmms_eval_cli_runs_the_prunert_model_offline(tiny_artifact: Path, shapes_jsonl: Path, tmp_path: Path):
    answers = prunert_answers(tiny_artifact, shapes_jsonl)
    data = tmp_path / "questions.jsonl"
    expected = with_predictions_accepted(shapes_jsonl, answers, data)
    task_dir, out = tmp_path / "task", tmp_path / "out"
    write_task(data, task_dir)
    proc = run_lmms_eval("--model", "prunert", "--model_args", f"artifact={tiny_artifact},threads=1", "--tasks", DEFAULT_TASK,
                         "--include_path", str(task_dir), "--limit", str(COUNT), "--output_path", str(out), "--log_samples",
                         cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = list(out.rglob("*_results.json"))
    assert len(results) == 1, (proc.stdout[-3000:], proc.stderr[-3000:])  # lmms-eval exits 0 even when the run failed
    report = json.loads(results[0].read_text())
    assert report["n-samples"][DEFAULT_TASK]["effective"] == COUNT
    assert report["results"][DEFAULT_TASK]["exact_match,none"] == pytest.approx(sum(expected) / COUNT)
    assert 0 < sum(expected) < COUNT
    (samples_file,) = out.rglob(f"*_samples_{DEFAULT_TASK}.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [s["filtered_resps"] for s in samples] == answers  # lmms-eval's answers are prunert's own
    assert [bool(s["exact_match"]) for s in samples] == expected


MC_TASK = "prunert_shapes_yes_no"


def yes_no_task(task_dir: Path) -> Path:
    """A multiple_choice task (loglikelihood requests) over the task's records: the shipped settings, yes/no choices."""
    path = task_dir / f"{MC_TASK}.yaml"
    data = task_dir / f"{MC_TASK}.jsonl"
    path.write_text("\n".join([f"task: {MC_TASK}", f"include: {json.dumps(str(TEMPLATE))}", "output_type: multiple_choice",
                                 'doc_to_choice: ["yes", "no"]', "process_results: null", "metric_list:", "  - metric: acc",
                                 "dataset_kwargs:", "  data_files:", f"    test: {json.dumps(str(data))}", ""]))
    return data


@needs_lmms
def test_lmms_eval_cli_multiple_choice_scores_by_loglikelihood(tiny_artifact: Path, shapes_jsonl: Path, model, tmp_path: Path):
    task_dir, out = tmp_path / "task", tmp_path / "out"
    write_task(shapes_jsonl, task_dir)
    rows = [row for row in map(json.loads, (task_dir / f"{DEFAULT_TASK}.jsonl").read_text().splitlines()) if row["category"] == "exists"]
    yes_no_task(task_dir).write_text("".join(json.dumps(row) + "\n" for row in rows))
    proc = run_lmms_eval("--model", "prunert", "--model_args", f"artifact={tiny_artifact},threads=1", "--tasks", MC_TASK,
                         "--include_path", str(task_dir), "--output_path", str(out), "--log_samples", cwd=tmp_path)
    results = list(out.rglob("*_results.json"))
    assert proc.returncode == 0 and len(results) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    (samples_file,) = out.rglob(f"*_samples_{MC_TASK}.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    want = []
    for row, sample in zip(rows, samples):
        lls = [reference_loglikelihood(model, row, f" {choice}")[0] for choice in ("yes", "no")]
        got = [float(resp[0]) for resp in sample["filtered_resps"]]  # one (loss, is_greedy) per choice
        assert got == pytest.approx(lls, abs=1e-3)
        want.append(float(int(np.argmin(lls)) == ("yes", "no").index(row["answer"])))  # lmms-eval: lowest loss wins
        assert sample["acc"] == want[-1]
    report = json.loads(results[0].read_text())
    assert report["n-samples"][MC_TASK]["effective"] == len(rows) > 0
    assert report["results"][MC_TASK]["acc,none"] == pytest.approx(sum(want) / len(rows))


# ---- in process: the model class against lmms-eval's own Instance ----------------------------------------------------
@pytest.fixture(scope="module")
def model(tiny_artifact: Path):
    from prunert.integrations.lmms_eval import PrunertLMMS

    return PrunertLMMS.create_from_arg_string(f"artifact={tiny_artifact},threads=1", {"batch_size": 2, "device": None})


def instances(model, kind: str, docs: list[dict], option) -> list:
    from lmms_eval.api.instance import Instance

    model.task_dict = {"t": {"test": docs}}
    visual = lambda doc: [doc["image"]]  # noqa: E731
    return [Instance(kind, (doc["question"], option, visual, i, "t", "test"), 0, {"task": "t", "doc_id": i, "repeats": 1})
            for i, doc in enumerate(docs)]


def shapes_docs(jsonl: Path, count: int) -> list[dict]:
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()[:count]]
    return [dict(row, image=str(jsonl.parent / row["image"])) for row in rows]


@needs_lmms
def test_generate_until_batches_keep_order_and_cut_at_until(model, shapes_jsonl: Path, tiny_artifact: Path):
    docs = shapes_docs(shapes_jsonl, 3)
    requests = instances(model, "generate_until", docs, {"max_new_tokens": MAX_NEW, "until": [UNTIL], "do_sample": False})
    got = model.generate_until(requests)  # batch_size 2: one batch of 2, one of 1
    assert [text.strip() for text in got] == prunert_answers(tiny_artifact, shapes_jsonl)[:3]


@needs_lmms
def test_a_context_that_places_the_image_itself_is_kept(model, shapes_jsonl: Path, tiny_artifact: Path):
    docs = [dict(doc, question=f"<image>\n{doc['question']}") for doc in shapes_docs(shapes_jsonl, 2)]
    got = model.generate_until(instances(model, "generate_until", docs, {"max_new_tokens": MAX_NEW, "until": [UNTIL]}))
    assert [text.strip() for text in got] == prunert_answers(tiny_artifact, shapes_jsonl)[:2]


def scored(responses: list) -> list[tuple[float, bool]]:
    """What lmms-eval's evaluator makes of loglikelihood responses (unwrap_generation_output): (loss, is_greedy)."""
    from lmms_eval.api.instance import unwrap_generation_output

    pairs = [unwrap_generation_output(response)[0] for response in responses]
    assert all(isinstance(p, tuple) and isinstance(p[0], float) and isinstance(p[1], bool) for p in pairs), pairs
    return pairs


def reference_loglikelihood(model, doc: dict, continuation: str) -> tuple[float, bool]:
    """One prefill over context + continuation (no KV-cache stepping): the mean negative log-probability of the
    continuation's tokens (read at the position before each), as lmms-eval's models report it, and is_greedy."""
    from prunert.runtime.text import encode_prompt

    pipe, text = model.pipe, model.pipe.manifest.text
    prompt = question_prompt(text.placeholder, doc["question"])
    (context,) = pipe.tokenize([prompt])
    whole = encode_prompt(pipe.artifact.tokenizer, prompt, text.placeholder, pipe.artifact.special_ids,
                          text.prompt_template + continuation).ids
    assert whole[: len(context)] == context
    tokens = whole[len(context):]
    logits = pipe.prefill([whole], pipe.encode_images([doc["image"]], [prompt])).logits[0].astype(np.float64)  # [L, V]
    rows = logits[logits.shape[0] - len(tokens) - 1 : -1]  # [n, V]: the position before each continuation token
    top = rows.max(axis=1, keepdims=True)
    logprobs = rows - (top + np.log(np.exp(rows - top).sum(axis=1, keepdims=True)))
    return -float(sum(logprobs[i, t] for i, t in enumerate(tokens))) / len(tokens), bool(all(rows[i].argmax() == t for i, t in enumerate(tokens)))


@needs_lmms
@pytest.mark.parametrize("continuation", [" yes", " no", " purple circle"])
def test_loglikelihood_equals_one_pass_prefill(model, shapes_jsonl: Path, continuation: str):
    docs = shapes_docs(shapes_jsonl, 2)
    got = scored(model.loglikelihood(instances(model, "loglikelihood", docs, continuation)))
    for doc, (loss, greedy) in zip(docs, got):
        want, want_greedy = reference_loglikelihood(model, doc, continuation)
        assert loss == pytest.approx(want, abs=1e-3)
        assert loss > 0 and greedy == want_greedy


@needs_lmms
def test_loglikelihood_takes_doc_to_target(model, shapes_jsonl: Path):
    docs = shapes_docs(shapes_jsonl, 1)
    by_target = scored(model.loglikelihood(instances(model, "loglikelihood", docs, lambda doc: " " + doc["answer"])))
    by_string = scored(model.loglikelihood(instances(model, "loglikelihood", docs, " " + docs[0]["answer"])))
    assert by_target == by_string


@needs_lmms
def test_multi_round_and_imageless_requests_say_why(model, shapes_jsonl: Path):
    from lmms_eval.api.instance import Instance

    with pytest.raises(NotImplementedError, match="one turn"):
        model.generate_until_multi_round(instances(model, "generate_until_multi_round", shapes_docs(shapes_jsonl, 1), {}))
    unconditional = Instance("loglikelihood", ("", " yes"), 0, {"task": "t", "doc_id": 0, "repeats": 1})
    with pytest.raises(NotImplementedError, match="one image per prompt"):
        model.loglikelihood([unconditional])


@needs_lmms
def test_two_visuals_are_refused(model, shapes_jsonl: Path):
    from lmms_eval.api.instance import Instance

    docs = shapes_docs(shapes_jsonl, 1)
    model.task_dict = {"t": {"test": docs}}
    two = Instance("generate_until", ("q", {}, lambda doc: [doc["image"]] * 2, 0, "t", "test"), 0, {"task": "t", "doc_id": 0, "repeats": 1})
    with pytest.raises(Exception, match="got 2 visuals, expected exactly one image"):
        model.generate_until([two])


@needs_lmms
@pytest.mark.parametrize("args, needle", [("", "missing artifact=DIR"), ("artifact=/x,threads=-1", "threads=-1"),
                                          ("artifact=/x,precision=fp7", "fp7")])
def test_bad_model_args_are_one_clear_error(args: str, needle: str):
    from prunert.integrations.lmms_eval import PrunertLMMS

    with pytest.raises(ConfigError, match=needle):
        PrunertLMMS.create_from_arg_string(args, {"batch_size": 1})


@needs_lmms
def test_batch_size_auto_is_refused(tiny_artifact: Path):
    from prunert.integrations.lmms_eval import PrunertLMMS

    with pytest.raises(ConfigError, match="--batch_size auto"):
        PrunertLMMS.create_from_arg_string(f"artifact={tiny_artifact}", {"batch_size": "auto"})


# ---- the task writer (no lmms-eval needed, but tested here beside its task) -------------------------------------------
def test_write_task_names_the_bad_line(tmp_path: Path, shapes_jsonl: Path):
    data = tmp_path / "q.jsonl"
    data.write_text(shapes_jsonl.read_text().splitlines()[0].replace('"images/', f'"{shapes_jsonl.parent}/images/') + "\n{oops\n")
    with pytest.raises(ConfigError, match="q.jsonl line 2: not valid JSON"):
        write_task(data, tmp_path / "task")
    assert not (tmp_path / "task").exists()


def test_write_task_refuses_existing_files(tmp_path: Path, shapes_jsonl: Path):
    task_dir = tmp_path / "task"
    task_dir.mkdir()
    (task_dir / f"{DEFAULT_TASK}.yaml").write_text("mine\n")
    with pytest.raises(ConfigError, match="already exists"):
        write_task(shapes_jsonl, task_dir)
    assert (task_dir / f"{DEFAULT_TASK}.yaml").read_text() == "mine\n"
    path = write_task(shapes_jsonl, task_dir, overwrite=True)
    rows = [json.loads(line) for line in (task_dir / f"{DEFAULT_TASK}.jsonl").read_text().splitlines()]
    assert len(rows) == COUNT and all(Path(row["image"]).is_absolute() and Path(row["image"]).is_file() for row in rows)
    assert f"include: {json.dumps(str(REPO / 'prunert/integrations/lmms_eval_tasks/shapes/_default_template_yaml'))}" in path.read_text()


def test_write_task_cli_error_is_one_line(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "prunert.integrations.lmms_eval_tasks", "--data", str(tmp_path / "none.jsonl"),
                           "--out", str(tmp_path / "t")], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("prunert: error: --data") and len(proc.stderr.splitlines()) == 1


def test_only_the_integration_module_imports_lmms_eval():
    importers = []
    for path in sorted((REPO / "prunert").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name.split(".")[0] == "lmms_eval" for name in names):
                importers.append(path.relative_to(REPO).as_posix())
    assert sorted(set(importers)) == ["prunert/integrations/lmms_eval.py"]
