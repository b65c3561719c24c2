"""ResPrune and CDPruner on bad numbers (methods.md, ResPrune "Bad numbers"): ONNX Runtime, torch eager and the
NumPy reference keep the same index SETS, and the output contract (K distinct ascending indices in [0, N),
tokens gathered bit for bit) holds, on

  * visual tokens with a NaN or +-inf entry (one, several, all of them): a zero token, never kept while another
    token has energy left;
  * unmasked text rows with a NaN or +-inf entry: not a content word (as if masked);
  * text rows of extreme magnitude (|t| ~ 1e19 .. 1e30 and 1e-23 .. 1e-35 at D = 32, where fp32 squares overflow /
    underflow): the same kept set as the unscaled text (cosines are scale-free; each text row has a range guard).

Before the rule, ORT returned non-ascending indices with TopK-tie filler, torch picked token 0 at every step and
the reference returned one index for K = 8 on a NaN token; huge / tiny text flattened or distorted r in fp32.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from prunert.config import CDPrunerConfig, ResPruneConfig  # noqa: E402
from prunert.pruning_ops import cdpruner as cd  # noqa: E402
from prunert.pruning_ops import reference  # noqa: E402
from prunert.pruning_ops.resprune import resprune_op, resprune_select  # noqa: E402

import op_graph as og  # noqa: E402
from op_graph import TextCase as Case  # noqa: E402

N, D, K = 48, 32, 8
INPUTS = ("tokens", "text", "text_mask")
BAD = (np.nan, np.inf, -np.inf)

# name -> (op, budget, config, NumPy reference, torch select)
OPS = {
    "resprune": (resprune_op, K, ResPruneConfig(), reference.resprune, resprune_select),
    "resprune_norm_mean_a2": (resprune_op, K, ResPruneConfig(normalize=True, relevance="mean", alpha=2.0), reference.resprune, resprune_select),
    "resprune_clip": (resprune_op, K, ResPruneConfig(epsilon_floor="clip", alpha=2.0), reference.resprune, resprune_select),
    "cdpruner": (cd.cdpruner_op, K, CDPrunerConfig(), cd.cdpruner, cd.cdpruner_select),
}


# ----------------------------------------------------------------------------------------- inputs


def _text(rng):
    return og.random_text(rng, D)


def kind_one_bad_entry(rng):  # one entry of one token is NaN / +inf / -inf
    x = rng.standard_normal((N, D))
    x[rng.integers(N), rng.integers(D)] = rng.choice(BAD)
    return x, *_text(rng)


def kind_bad_tokens(rng):  # 1..10 tokens with bad entries, some whole rows
    x = rng.standard_normal((N, D))
    for i in rng.choice(N, int(rng.integers(1, 11)), replace=False):
        x[i, rng.integers(0, D, int(rng.integers(1, D)))] = rng.choice(BAD)
    return x, *_text(rng)


def kind_bad_first_token(rng):  # token 0, the lowest index every tie goes to, is NaN
    x = rng.standard_normal((N, D))
    x[0] = np.nan
    return x, *_text(rng)


def kind_bad_and_huge_tokens(rng):  # bad tokens next to tokens near fp32's limit (the range guard sees only finite ones)
    x = rng.standard_normal((N, D)) * 1e30
    x[rng.integers(0, N, 4)] = np.inf
    return x, *_text(rng)


def kind_bad_low_rank(rng):  # rank 3 < K: after 3 picks the rest go by index, bad tokens among them as zero tokens
    x = rng.standard_normal((N, 3)) @ rng.standard_normal((3, D))
    x[[1, 5, 9]] = np.nan
    return x, *_text(rng)


def kind_bad_text_row(rng):  # one unmasked text row with a bad entry
    x = rng.standard_normal((N, D))
    text, mask = _text(rng)
    text = np.concatenate([text, rng.standard_normal((1, D))])
    text[-1, rng.integers(D)] = rng.choice(BAD)
    return x, text, np.ones(len(text), np.int64)


def kind_all_text_bad(rng):  # every content word non-finite: no content words, r = 1
    x = rng.standard_normal((N, D))
    text, mask = _text(rng)
    text[:, 0] = rng.choice(BAD)
    return x, text, mask


def kind_huge_text(rng):  # |t| ~ 1e19 .. 1e30: fp32 sums of squares overflow at D = 32
    text, mask = _text(rng)
    return rng.standard_normal((N, D)), text * 10 ** rng.uniform(19, 30, (len(mask), 1)), mask


def kind_tiny_text(rng):  # |t| ~ 1e-23 .. 1e-35: fp32 squares underflow to 0
    text, mask = _text(rng)
    return rng.standard_normal((N, D)), text * 10 ** -rng.uniform(23, 35, (len(mask), 1)), mask


def kind_mixed_text_scales(rng):  # one huge, one tiny, one ordinary row
    x = rng.standard_normal((N, D))
    text = rng.standard_normal((3, D)) * np.array([[1e25], [1e-28], [1.0]])
    return x, text, np.ones(3, np.int64)


KINDS = og.kinds_in(globals())
TOKEN_KINDS = ("one_bad_entry", "bad_tokens", "bad_first_token", "bad_and_huge_tokens", "bad_low_rank")


def cases(kind: str, count: int = 4, stream: int = 30) -> list[Case]:
    out = []
    for rng in og.case_rngs(KINDS, kind, count, stream):
        x, text, mask = KINDS[kind](rng)
        with np.errstate(over="ignore"):  # 1e30-scale rows cast to fp32 stay finite; inf stays inf
            out.append(Case(x.astype(np.float32), text.astype(np.float32), np.asarray(mask, np.int64)))
    return out


def ref_sets(name: str, batch: list[Case]) -> list[np.ndarray]:
    _, budget, cfg, ref, _ = OPS[name]
    with np.errstate(invalid="ignore", over="ignore"):
        return [ref(c.tokens, c.text, c.mask, budget, cfg) for c in batch]


# ----------------------------------------------------------------------------------------- ORT and torch vs reference


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, og.Exported]:
    out = tmp_path_factory.mktemp("nonfinite_onnx")
    return {name: og.export_selection(out / f"{name}.onnx", op, budget, cfg, INPUTS, n=N, d=D) for name, (op, budget, cfg, _, _) in OPS.items()}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("name", list(OPS))
def test_ort_keeps_the_reference_set(graphs: dict[str, og.Exported], name: str, kind: str) -> None:
    batch = cases(kind)
    tokens, text, mask = og.stack_text(batch)
    indices, kept = graphs[name].run(tokens, text, mask)
    og.assert_valid_indices(indices, len(batch), K, N)
    np.testing.assert_array_equal(kept, np.take_along_axis(tokens, indices[:, :, None], axis=1))  # NaN == NaN here
    og.assert_same_sets(indices, ref_sets(name, batch), f"ORT {name}/{kind}")


@pytest.mark.parametrize("name", list(OPS))
def test_torch_keeps_the_reference_set(name: str) -> None:
    """Every kind in one batch (text padded to the longest)."""
    _, budget, cfg, _, select = OPS[name]
    batch = [c for kind in sorted(KINDS) for c in cases(kind, 2, stream=31)]
    tokens, text, mask = og.stack_text(batch)
    indices = select(torch.from_numpy(tokens), torch.from_numpy(text), torch.from_numpy(mask), budget, cfg).numpy()
    og.assert_valid_indices(indices, len(batch), budget, N)
    og.assert_same_sets(indices, ref_sets(name, batch), f"torch {name}")


# ----------------------------------------------------------------------------------------- the rule itself


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("kind", TOKEN_KINDS)
def test_a_non_finite_token_is_a_zero_token(name: str, kind: str) -> None:
    _, budget, cfg, ref, _ = OPS[name]
    for case in cases(kind):
        bad = ~np.isfinite(case.tokens).all(axis=1)
        zeroed = np.where(bad[:, None], 0.0, case.tokens)
        with np.errstate(invalid="ignore", over="ignore"):
            kept = ref(case.tokens, case.text, case.mask, budget, cfg)
        assert len(kept) == budget and kept.tolist() == sorted(set(kept.tolist()))
        assert kept.tolist() == ref(zeroed, case.text, case.mask, budget, cfg).tolist()


@pytest.mark.parametrize("name", list(OPS))
def test_a_non_finite_token_is_never_kept_while_others_have_energy(name: str) -> None:
    """Full-rank finite tokens (K = 8 < D = 32): no bad token is kept, on any backend."""
    batch = cases("bad_tokens", 6, stream=32) + cases("bad_first_token", 2, stream=32)
    for case, kept in zip(batch, ref_sets(name, batch)):
        assert not (set(kept.tolist()) & set(np.flatnonzero(~np.isfinite(case.tokens).all(axis=1)).tolist()))


def test_every_token_non_finite_keeps_the_first_k() -> None:
    tokens = np.full((2, N, D), np.nan, np.float32)
    text, mask = np.ones((2, 3, D), np.float32), np.ones((2, 3), np.int64)
    for name, (_, budget, cfg, ref, select) in OPS.items():
        with np.errstate(invalid="ignore"):
            assert ref(tokens[0], text[0], mask[0], budget, cfg).tolist() == list(range(budget)), name
        got = select(torch.from_numpy(tokens), torch.from_numpy(text), torch.from_numpy(mask), budget, cfg).numpy()
        assert got.tolist() == [list(range(budget))] * 2, name


@pytest.mark.parametrize("name", list(OPS))
def test_a_non_finite_text_row_is_masked(name: str) -> None:
    _, budget, cfg, ref, _ = OPS[name]
    for case in cases("bad_text_row") + cases("all_text_bad"):
        finite = np.isfinite(case.text).all(axis=1)
        want = ref(case.tokens, case.text, np.where(finite, case.mask, 0), budget, cfg)
        with np.errstate(invalid="ignore"):
            assert ref(case.tokens, case.text, case.mask, budget, cfg).tolist() == want.tolist()


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("kind", ["huge_text", "tiny_text", "mixed_text_scales"])
def test_text_scale_changes_nothing(graphs: dict[str, og.Exported], name: str, kind: str) -> None:
    """Every backend keeps the set of the text rows scaled to unit peak (fp32 squares of |t| ~ 1e19 overflow, of
    1e-23 underflow: without its own guard the text made r flat or wrong in ORT and torch)."""
    _, budget, cfg, ref, select = OPS[name]
    batch = cases(kind, 4, stream=33)
    unit = [Case(c.tokens, (c.text / np.abs(c.text).max(axis=1, keepdims=True)).astype(np.float32), c.mask) for c in batch]
    want = [ref(c.tokens, c.text, c.mask, budget, cfg) for c in unit]
    tokens, text, mask = og.stack_text(batch)
    og.assert_same_sets(graphs[name].run(tokens, text, mask)[0], want, f"ORT {name}/{kind}")
    got = select(torch.from_numpy(tokens), torch.from_numpy(text), torch.from_numpy(mask), budget, cfg).numpy()
    og.assert_same_sets(got, want, f"torch {name}/{kind}")
    og.assert_same_sets(np.stack([ref(c.tokens, c.text, c.mask, budget, cfg) for c in batch]), want, f"reference {name}/{kind}")


def test_the_graphs_stay_tensorrt_clean(graphs: dict[str, og.Exported], tmp_path) -> None:
    """The guards use Abs / Less / ReduceMin / Where only (no IsNaN / IsInf): trt_check finds nothing."""
    from prunert.export.trt_check import TrtCheckConfig, check_trt

    for name, g in graphs.items():
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(g.model.SerializeToString())
        assert not check_trt(path, TrtCheckConfig()), name


# ----------------------------------------------------------------------------------------- the per-tile op


def _tiled_image(rng: np.random.Generator, bad: str) -> dict[str, np.ndarray]:
    """Thumbnail + 4 tiles of 16 tokens (D = 8, llava-next-tiny's layout), all valid, with one kind of bad number."""
    t, n, d = 5, 16, 8
    tokens, text = rng.standard_normal((t, n, d)), rng.standard_normal((3, d))
    if bad == "tokens":
        tokens.reshape(t * n, d)[rng.choice(t * n, 6, replace=False), rng.integers(0, d, 6)] = rng.choice(BAD, 6)
    elif bad == "text_row":
        text[1, 2] = rng.choice(BAD)
    else:  # huge / tiny text rows
        text *= np.array([[1e25], [1e-28], [3e20]])
    return {
        "tokens": tokens.astype(np.float32),
        "tile_cls": rng.standard_normal((t, 6)).astype(np.float32),
        "tile_mask": np.ones(t, np.int64),
        "token_mask": np.ones((t, n), np.int64),
        "text": text.astype(np.float32),
        "text_mask": np.ones(3, np.int64),
    }


@pytest.mark.parametrize("bad", ["tokens", "text_row", "text_scale"])
def test_tiled_resprune_follows_the_same_rules(bad: str) -> None:
    """The per-tile op runs ResPrune's loop and relevance (common.greedy_order, resprune.pooled_cosine): on bad
    numbers torch keeps the reference's per-tile picks, and a bad token is never kept (K = 12 of 80)."""
    from prunert.config import BudgetConfig, TileBudgetConfig
    from prunert.pruning_ops import tiled

    rng = np.random.default_rng([34, len(bad)])
    images = [_tiled_image(rng, bad) for _ in range(4)]
    budget, tiles = BudgetConfig(budget=12, params=ResPruneConfig()), TileBudgetConfig()
    batch = {name: torch.from_numpy(np.stack([image[name] for image in images])) for name in images[0]}
    with torch.no_grad():
        kept_tokens, kept = tiled.tiled_select(batch, budget, tiles)
    og.assert_valid_indices(kept.numpy(), len(images), 12, 80)
    for b, image in enumerate(images):
        counts = np.bincount(kept[b].numpy() // 16, minlength=5)
        with np.errstate(invalid="ignore", over="ignore"):
            want, _ = tiled.tiled_reference(image, 12, budget.params, tiles, budgets=counts)
        og.assert_same_sets(kept[b : b + 1].numpy(), [want], f"tiled {bad} image {b}")
        bad_tokens = np.flatnonzero(~np.isfinite(image["tokens"].reshape(80, 8)).all(axis=1))
        assert not set(bad_tokens.tolist()) & set(want.tolist())
    if bad == "text_scale":  # the scale of the text rows changes nothing
        unit = [{**image, "text": (image["text"] / np.abs(image["text"]).max(axis=1, keepdims=True)).astype(np.float32)} for image in images]
        batch = {name: torch.from_numpy(np.stack([image[name] for image in unit])) for name in unit[0]}
        with torch.no_grad():
            np.testing.assert_array_equal(tiled.tiled_select(batch, budget, tiles)[1].numpy(), kept.numpy())
