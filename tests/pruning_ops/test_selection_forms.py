"""The two forms of ResPrune's and CDPruner's greedy (prunert.pruning_ops.common.kernel_rows) and the rule that
picks one per export (config.GRAM_MAX_N, the methods' gram_max_n; common.uses_gram):

  Gram form  the N x N Gram (CDPruner: kernel) matrix once, O(N^2 d), then one row of it per step;
  rows form  each step computes the picked token's row from the features, X x_j, O(N d) per step, O(K N d) in all.

The >= 200 random inputs per form against the NumPy references are in test_resprune.py / test_cdpruner.py (and the
per-tile op's in test_tiled.py). Here: which form an exported graph holds, as the rule says, for a static N and for
a symbolic one (its upper bound), both TensorRT-clean; the two forms keep the same sets in ORT and torch (also at
a realistic size); the parameter's validation, its CLI flag and its manifest record.
"""

from __future__ import annotations

import collections
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from prunert import pruning_ops  # noqa: E402
from prunert.config import GRAM_MAX_N, BudgetConfig, CDPrunerConfig, ResPruneConfig  # noqa: E402
from prunert.errors import ConfigError  # noqa: E402
from prunert.export.trt_check import TrtCheckConfig, check_trt  # noqa: E402
from prunert.pruning_ops import cdpruner as cd  # noqa: E402
from prunert.pruning_ops import reference  # noqa: E402
from prunert.pruning_ops.common import largest_n, uses_gram  # noqa: E402
from prunert.pruning_ops.resprune import resprune_op, resprune_select  # noqa: E402

import op_graph as og  # noqa: E402

N, D = 48, 8
INPUTS = ("tokens", "text", "text_mask")
OPS = {"resprune": (resprune_op, ResPruneConfig()), "cdpruner": (cd.cdpruner_op, CDPrunerConfig())}
REFERENCES = {"resprune": reference.resprune, "cdpruner": cd.cdpruner}
SELECT = {"resprune": resprune_select, "cdpruner": cd.cdpruner_select}
KINDS = og.text_kinds(N, D)


def form(model) -> str:
    """The form an exported greedy holds: "rows" when its Loop body gathers the picked token's features
    (GatherElements), "gram" when it reads a row of the N x N matrix through a one-hot mat-mul (no gather)."""
    (loop,) = [node for node in model.graph.node if node.op_type == "Loop"]
    body = next(attr.g for attr in loop.attribute if attr.name == "body")
    ops = collections.Counter(node.op_type for node in og.all_nodes(body))
    return "rows" if ops["GatherElements"] else "gram"


def cases(count: int, budget: int, stream: int) -> list[og.TextCase]:
    return [c for kind in sorted(KINDS) for c in og.make_text_cases(KINDS, kind, count, budget, stream)]


def assert_reference_sets(method: str, graph: og.Exported, batch: list[og.TextCase], label: str) -> None:
    indices, kept = graph.run(*og.stack_text(batch))
    og.assert_valid(indices, kept, og.stack_text(batch)[0], graph.budget)
    og.assert_same_sets(indices, [REFERENCES[method](c.tokens, c.text, c.mask, graph.budget, graph.cfg) for c in batch], label)


# ----------------------------------------------------------------------------------------- the rule


def test_rule_on_a_static_n() -> None:
    """The Gram while N <= gram_max_n, the rows above; 0 means always the rows."""
    assert largest_n(576) == 576
    assert uses_gram(576, 576) and uses_gram(575, 576)
    assert not uses_gram(577, 576)
    assert not uses_gram(1, 0)
    assert ResPruneConfig().gram_max_n == CDPrunerConfig().gram_max_n == GRAM_MAX_N  # the one measured constant


@pytest.mark.parametrize("method", sorted(OPS))
def test_export_holds_the_form_the_rule_picks(tmp_path, method: str) -> None:
    """At N = 48: gram_max_n = 48 exports the Gram form, 47 the rows form, and the default follows GRAM_MAX_N;
    every graph keeps the reference's sets."""
    op, base = OPS[method]
    batch = cases(1, 8, stream=30)
    for gram_max_n, want in ((N, "gram"), (N - 1, "rows"), (GRAM_MAX_N, "gram" if N <= GRAM_MAX_N else "rows")):
        cfg = replace(base, gram_max_n=gram_max_n)
        graph = og.export_selection(tmp_path / f"{gram_max_n}.onnx", op, 8, cfg, INPUTS, n=N, d=D)
        assert form(graph.model) == want, gram_max_n
        assert_reference_sets(method, graph, batch, f"{method} gram_max_n={gram_max_n}")


@pytest.mark.parametrize("method", sorted(OPS))
def test_symbolic_n_is_ruled_by_its_upper_bound(tmp_path, method: str) -> None:
    """One graph over N in [8, 300] (Qwen2.5-VL's symbolic N): the rule reads the dim's upper bound (300), without
    specialising N; both forms TensorRT-clean, N symbolic, the reference's sets at every N of the range."""
    op, base = OPS[method]
    for gram_max_n, want in ((300, "gram"), (299, "rows")):
        path = tmp_path / f"symbolic_{gram_max_n}.onnx"
        graph = og.export_selection(path, op, 7, replace(base, gram_max_n=gram_max_n), INPUTS, n=40, d=D, n_range=(8, 300))
        assert form(graph.model) == want, gram_max_n
        assert not check_trt(path, TrtCheckConfig())
        assert og.dims(graph.model.graph.input[0])[1] == "n"
        for n in (8, 41, 300):
            kinds = og.text_kinds(n, D)
            batch = [c for kind in ("gaussian", "duplicates", "low_rank") for c in og.make_text_cases(kinds, kind, 1, 7, stream=n)]
            assert_reference_sets(method, graph, batch, f"{method} {want} N={n}")


@pytest.mark.parametrize("method", sorted(OPS))
def test_rows_form_is_tensorrt_clean_with_a_static_n(tmp_path, method: str) -> None:
    op, base = OPS[method]
    path = tmp_path / "rows.onnx"
    og.export_selection(path, op, 8, replace(base, gram_max_n=0), INPUTS, n=N, d=D)
    assert not check_trt(path, TrtCheckConfig())


# ----------------------------------------------------------------------------------------- the forms agree


@pytest.mark.parametrize("method", sorted(OPS))
def test_forms_agree_in_torch_eager(method: str) -> None:
    """Four inputs of every shared kind (degenerate ones included), K = 8 and N - 1: the same indices in both forms."""
    _, base = OPS[method]
    for budget in (8, N - 1):
        batch = cases(4, budget, stream=31)
        tokens, text, mask = (torch.from_numpy(a) for a in og.stack_text(batch))
        gram = SELECT[method](tokens, text, mask, budget, replace(base, gram_max_n=N)).numpy()
        rows = SELECT[method](tokens, text, mask, budget, replace(base, gram_max_n=0)).numpy()
        np.testing.assert_array_equal(gram, rows)


REAL_N, REAL_D, REAL_K = 576, 1024, 64


def _real_cases() -> list[og.TextCase]:
    """Near-orthogonal tokens (hundreds of scores within ~1e-3), letterbox duplicates, with and without text."""
    out = []
    for seed in range(4):
        rng = np.random.default_rng([32, seed])
        x = rng.standard_normal((REAL_N, REAL_D)) * 0.05
        if seed % 2:
            x[rng.integers(0, REAL_N, 150)] = x[3]
        text = rng.standard_normal((6, REAL_D)) * 0.02
        out.append(og.TextCase(x.astype(np.float32), text.astype(np.float32), np.full(6, int(seed < 2), np.int64)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(OPS))
def test_forms_agree_in_onnxruntime_at_a_realistic_size(tmp_path, method: str) -> None:
    """N = 576, d = 1024, K = 64 (ResPrune normalize=True, alpha=2: the hardest ties): both exported forms keep the
    reference's sets."""
    op, base = OPS[method]
    base = replace(base, normalize=True, alpha=2.0) if method == "resprune" else base
    batch = _real_cases()
    for gram_max_n in (REAL_N, 0):
        graph = og.export_selection(tmp_path / f"{gram_max_n}.onnx", op, REAL_K, replace(base, gram_max_n=gram_max_n), INPUTS,
                                    n=REAL_N, d=REAL_D)
        assert form(graph.model) == ("gram" if gram_max_n else "rows")
        assert_reference_sets(method, graph, batch, f"{method} gram_max_n={gram_max_n}")


# ----------------------------------------------------------------------------------------- config, flag, manifest


@pytest.mark.parametrize("config", [ResPruneConfig, CDPrunerConfig])
@pytest.mark.parametrize("value", [-1, 1.5, True, "64"])
def test_bad_gram_max_n_raises(config: type, value: object) -> None:
    with pytest.raises(ConfigError, match="gram_max_n"):
        config(gram_max_n=value)


def test_manifest_records_the_rule_and_old_manifests_load() -> None:
    """The manifest's method params record gram_max_n (with N, the form an export holds); params written before it
    existed load with the default (either form keeps the same sets)."""
    for method in ("resprune", "cdpruner"):
        params = pruning_ops.method_params(BudgetConfig(budget=8, method=method))
        assert params["gram_max_n"] == GRAM_MAX_N
        old = {name: value for name, value in params.items() if name != "gram_max_n"}
        assert pruning_ops.config_from_params(method, old, 8).params.gram_max_n == GRAM_MAX_N
        assert pruning_ops.config_from_params(method, {**old, "gram_max_n": 0}, 8).params.gram_max_n == 0


def test_cli_flag_gram_max_n() -> None:
    from prunert.cli import build_parser

    args = build_parser().parse_args(["export", "--model", "synthetic:llava-tiny", "--out", "x", "--gram-max-n", "0"])
    assert args.gram_max_n == 0
    assert build_parser().parse_args(["export", "--model", "synthetic:llava-tiny", "--out", "x"]).gram_max_n is None


@pytest.fixture
def no_export(monkeypatch):
    from prunert.export import pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("export_artifact called despite a bad flag")

    monkeypatch.setattr(pipeline, "export_artifact", refuse)


@pytest.mark.parametrize("method", ["resprune", "cdpruner"])
def test_cli_rejects_a_negative_gram_max_n(error_line, prunert_main, no_export, tmp_path, method: str) -> None:
    out = tmp_path / "out"
    code, _, err = prunert_main("export", "--model", "synthetic:llava-tiny", "--method", method, "--gram-max-n", "-1", "--out", out)
    assert code == 2
    error_line(err, "gram_max_n: got -1")
    assert not out.exists()

