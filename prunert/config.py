"""One frozen config object per concern; every default lives here."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from prunert.errors import ConfigError

DEFAULT_OPSET = 20
# ONNX default-domain opsets an export may target: torch.onnx's dynamo exporter builds at 18 (TORCHLIB_OPSET)
# and converts up to 23 (its ONNX_MAX_OPSET).
MIN_OPSET, MAX_OPSET = 18, 23
# TensorRT's ONNX parser takes TopK only with K <= 3840 (deploy-facts.md); trt_supported_ops.json records the same.
TRT_MAX_TOPK = 3840
SCHEMA_VERSION = 3  # 2: text.max_batch, source.revision; 3: variants (fp16/bf16/int8/fp8 graphs), engines
READABLE_SCHEMA_VERSIONS = (2, 3)  # a schema-2 manifest reads as one with no variants and no engines

# Name scope of the selection op in the exported vision graph (graphs.Selection): precision conversion
# and quantization find the op's nodes by it and keep them in fp32 (argmax decisions are precision-sensitive).
SELECTION_SCOPE = "selection"

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8", "int4")
FLOAT_PRECISIONS = ("fp16", "bf16")  # prunert.export.precision: cast weights, fp32 islands
QUANTIZED_PRECISIONS = ("int8", "fp8")  # prunert.calibration: explicit Q/DQ from a calibration set
WEIGHT_ONLY_PRECISIONS = ("int4",)  # prunert.calibration.weight_only: block-wise int4 decoder weights, fp32 activations
GRAPH_NAMES = ("vision", "decoder")  # graph roles, as flags name them
TENSORRT_GRAPHS = GRAPH_NAMES  # the graphs TensorRT builds and check-trt checks (decoder_fused is ONNX Runtime's own form)
FUSED_DECODER = "decoder_fused"  # the decoder role's ONNX Runtime form (contrib fused ops, in-place KV); "decoder" is the standard-op form
# `export --dtype`: the dtype of the top-level graphs' weights (the torch model is loaded in it; graph I/O stays float32).
# bf16 is not among them: ONNX Runtime's CPU provider has no bf16 MatMul, so a bf16 graph could be neither
# validated nor run on the CPU (`prunert convert --precision bf16` makes the TensorRT variant instead).
EXPORT_DTYPES = ("fp32", "fp16")


EPSILON_FLOORS = ("affine", "clip")  # ResPruneConfig.epsilon_floor

# ResPrune's and CDPruner's greedy form (--gram-max-n; prunert.pruning_ops.common.uses_gram): while the largest N
# the vision graph accepts is <= this, the greedy reads rows of the N x N Gram (kernel) matrix built once,
# O(N^2 d); above it, each of the K steps computes the picked token's row from the features, O(K N d) in all.
# Measured (bench/bench_selection.py -> bench/results/selection.json; docs/resolution.md "Selection at large N"; ORT
# CPU, 1 thread, K = 64, d = 4096, median of 5 interleaved rounds): rows / Gram time, ResPrune | CDPruner, was
# 1.26 | 1.29 at N = 128 and 1.17 | 1.06 at 256 (Gram faster), 0.72 .. 1.24 alternating over 384 .. 1024 (within
# the run's noise: probe max/min 1.57), and below 1 from 1536 on in every cell (0.79 | 0.78 at 1536, 0.23 | 0.26 at
# 4096). 1024 = the largest N at which the Gram form measured faster, for both methods (the report's
# "largest_gram_faster"). Not measured on a GPU, where the Gram matmul is cheap: there, measure and pass --gram-max-n.
GRAM_MAX_N = 1024


@dataclass(frozen=True)
class ResPruneConfig:
    """ResPrune: greedy residual-energy selection weighted by text relevance r^alpha.

    alpha:      exponent of the relevance weight (0 = pure subspace reconstruction).
    relevance:  how token-to-text cosines are pooled over content words: "max" or "mean".
    epsilon:    floor of the min-max normalised relevance, so r in [epsilon, 1].
    tau:        a token's residual energy counts as 0 once below tau * its initial energy.
    normalize:  L2-normalise tokens before selection (alpha=2 then equals greedy DPP MAP).
    gram_max_n: the greedy's form (GRAM_MAX_N): the N x N Gram while the graph's largest N is <= gram_max_n,
                else each step's row from the features (O(K N d)); the same kept sets either way. 0: always the
                rows; a value >= N: always the Gram.
    epsilon_floor: how epsilon bounds r (docs/methods.md, ResPrune): "affine" (default; what every artifact
                exported before this option computes, so manifests without it keep their meaning) maps min-max
                onto [epsilon, 1] as epsilon + (1 - epsilon) * minmax; "clip" is max(minmax, epsilon), plain
                min-max wherever it is >= epsilon.
    """

    alpha: float = 1.0
    relevance: str = "max"
    epsilon: float = 1e-3
    tau: float = 1e-4
    normalize: bool = False
    epsilon_floor: str = "affine"
    gram_max_n: int = GRAM_MAX_N

    def __post_init__(self) -> None:
        check_finite(self, "resprune ")
        if self.alpha < 0:
            raise ConfigError(f"resprune alpha: got {self.alpha}, expected >= 0")
        _check_gram_max_n("resprune", self.gram_max_n)
        if self.epsilon_floor not in EPSILON_FLOORS:
            raise ConfigError(f"resprune epsilon_floor: got {self.epsilon_floor!r}, expected one of {list(EPSILON_FLOORS)}")
        _check_relevance_params("resprune", self.relevance, self.epsilon, self.tau)


def _check_gram_max_n(method: str, gram_max_n: int) -> None:
    if isinstance(gram_max_n, bool) or not isinstance(gram_max_n, int) or gram_max_n < 0:
        raise ConfigError(f"{method} gram_max_n: got {gram_max_n!r}, expected an integer >= 0")


def _check_relevance_params(method: str, relevance: str, epsilon: float, tau: float) -> None:
    if relevance not in ("max", "mean"):
        raise ConfigError(f"{method} relevance: got {relevance!r}, expected 'max' or 'mean'")
    if not 0 < epsilon <= 1:
        raise ConfigError(f"{method} epsilon: got {epsilon}, expected 0 < epsilon <= 1")
    if not 0 <= tau < 1:
        raise ConfigError(f"{method} tau: got {tau}, expected 0 <= tau < 1")


@dataclass(frozen=True)
class UniformConfig:
    """Evenly spaced raster indices; no parameters."""


@dataclass(frozen=True)
class RandomConfig:
    """Seeded uniform random subset (the seed is baked into the exported graph)."""

    seed: int = 0

    def __post_init__(self) -> None:
        check_seed("random seed", self.seed)


@dataclass(frozen=True)
class ClsAttentionConfig:
    """FasterVLM: top-K by head-averaged [CLS]->patch attention of the feature layer; no parameters."""


@dataclass(frozen=True)
class VisionZipConfig:
    """VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged by key similarity.

    contextual_fraction: share of K given to contextual (merged) tokens; 10/64 gives the published
    splits 54+10 (K=64), 108+20 (K=128), 162+30 (K=192).
    key_heads:           average patch_keys over this many equal head slices before the cosine; 1 = the
                         full key vector, 16 = VisionZip's code on CLIP ViT-L/14 (keys averaged over heads).
    """

    contextual_fraction: float = 10 / 64
    key_heads: int = 1

    def __post_init__(self) -> None:
        check_finite(self, "visionzip ")
        if not 0 <= self.contextual_fraction <= 1:
            raise ConfigError(f"visionzip contextual_fraction: got {self.contextual_fraction}, expected 0 <= fraction <= 1")
        if self.key_heads < 1:
            raise ConfigError(f"visionzip key_heads: got {self.key_heads}, expected >= 1")


@dataclass(frozen=True)
class DivPruneConfig:
    """DivPrune: max-min diversity on projector outputs with distance 1 - cosine; no parameters."""


@dataclass(frozen=True)
class CDPrunerConfig:
    """CDPruner: greedy DPP MAP with kernel diag(r) G diag(r), G the cosine Gram of projector outputs,
    r the same LLM-space text relevance as ResPrune's (min-max normalised to [epsilon, 1]).

    epsilon:    floor of the min-max normalised relevance, so r in [epsilon, 1].
    relevance:  how token-to-text cosines are pooled over content words: "max" or "mean".
    tau:        a token's marginal gain counts as 0 once below tau * its initial gain L_ii (rank exhausted).
    gram_max_n: the greedy's form, as ResPruneConfig's (GRAM_MAX_N): the N x N kernel, or its rows from the features.
    """

    epsilon: float = 1e-3
    relevance: str = "max"
    tau: float = 1e-4
    gram_max_n: int = GRAM_MAX_N

    def __post_init__(self) -> None:
        check_finite(self, "cdpruner ")
        _check_relevance_params("cdpruner", self.relevance, self.epsilon, self.tau)
        _check_gram_max_n("cdpruner", self.gram_max_n)


@dataclass(frozen=True)
class NoPruningConfig:
    """The unpruned baseline ("none"): every visual token is kept; no parameters."""


@dataclass(frozen=True)
class TileBudgetConfig:
    """HERO-style split of K over any-resolution tiles (prunert.pruning_ops.tile_budgets, used by
    per-tile selection, prunert.pruning_ops.tiled).

    thumbnail_share: fraction of K the global thumbnail keeps; text_weight: blend of text relevance
    into the tile saliency; temperature: of the softmax over tile-vs-global [CLS] cosines.
    """

    thumbnail_share: float = 0.25
    text_weight: float = 0.5
    temperature: float = 0.1

    def __post_init__(self) -> None:
        check_finite(self)
        if not 0 <= self.thumbnail_share <= 1:
            raise ConfigError(f"thumbnail_share: got {self.thumbnail_share}, expected 0..1")
        if not 0 <= self.text_weight <= 1:
            raise ConfigError(f"text_weight: got {self.text_weight}, expected 0..1")
        if self.temperature <= 0:
            raise ConfigError(f"temperature: got {self.temperature}, expected > 0")


@dataclass(frozen=True)
class BudgetConfig:
    """How many visual tokens survive, which method picks them, and that method's parameters.

    params: the method's own frozen config (ResPruneConfig for "resprune", ...); None = its defaults.
    """

    budget: int = 64
    method: str = "resprune"
    params: Any = None

    def __post_init__(self) -> None:
        if self.params is None:
            from prunert.pruning_ops import method_spec

            object.__setattr__(self, "params", method_spec(self.method).config_type())
        check_finite(self.params, f"{self.method} ")  # a method config without its own __post_init__ too

    @property
    def keeps_all(self) -> bool:
        """The method is the unpruned baseline (the registry's MethodSpec.keeps_all): K = N, every token kept."""
        from prunert.pruning_ops import method_spec

        return method_spec(self.method).keeps_all

    def validate_against(self, num_visual_tokens: int) -> None:
        if self.keeps_all:
            if self.budget != num_visual_tokens:
                raise ConfigError(f"budget: got {self.budget} with --method {self.method}, expected {num_visual_tokens} (all visual tokens)")
            return
        if not 0 < self.budget < num_visual_tokens:
            raise ConfigError(
                f"budget: got {self.budget}, expected 1 <= budget < {num_visual_tokens} "
                f"(the model's number of visual tokens)"
            )


@dataclass(frozen=True)
class ExportConfig:
    """Graph-level export settings. Sizes are the largest the artifact will accept."""

    opset: int = DEFAULT_OPSET
    max_text_tokens: int = 64  # content-word rows fed to the selection graph
    max_prompt_tokens: int = 256  # text tokens of one prompt, placeholder included
    max_new_tokens: int = 256  # decode steps the artifact is sized for
    max_batch: int = 8
    export_batch: int = 2  # example batch used for tracing: never 1
    # Larger graphs store weights beside the .onnx: every reader then loads the graph without them (an inline graph is
    # read whole, parsed, and copied again by each checker and by ONNX Runtime: 3x its weights during export).
    external_data_threshold_bytes: int = 1 << 28
    dtype: str | None = None  # --dtype (EXPORT_DTYPES); None: the checkpoint's own (hf_loading.checkpoint_dtype)

    def __post_init__(self) -> None:
        if self.dtype == "bf16":
            raise ConfigError(f"--dtype: got 'bf16', expected one of {list(EXPORT_DTYPES)} (ONNX Runtime's CPU provider has no bf16 "
                              "MatMul to validate or run a bf16 graph; export at fp16 or fp32, then `prunert convert --precision bf16`)")
        if self.dtype is not None:
            check_precision(self.dtype, EXPORT_DTYPES, "--dtype")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ConfigError(f"--opset: got {self.opset}, expected {MIN_OPSET}..{MAX_OPSET} (the ONNX opsets torch.onnx exports)")
        for name in ("max_text_tokens", "max_prompt_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: got {getattr(self, name)}, expected >= 1")
        if self.export_batch < 2:
            raise ConfigError(f"export_batch: got {self.export_batch}, expected >= 2 (a traced batch of 1 is baked in)")
        if self.max_batch < self.export_batch:
            raise ConfigError(f"--max-batch: got {self.max_batch}, expected >= {self.export_batch} (the batch the graphs are traced with)")

    def max_sequence(self, budget: int) -> int:
        """Longest decoder sequence: a full prompt whose placeholder became K visual tokens, plus generation."""
        return self.max_prompt_tokens - 1 + budget + self.max_new_tokens


@dataclass(frozen=True)
class PixelRange:
    """`export --min-pixels / --max-pixels`: the pixel-count range of a dynamic-resolution image processor (Qwen2.5-VL's
    smart_resize; the adapter's fit_pixel_range takes it or refuses it). None: the checkpoint's own value."""

    min_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name.replace('_', '-')}: got {value!r}, expected a pixel count >= 1")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ConfigError(f"--min-pixels / --max-pixels: got {self.min_pixels} > {self.max_pixels}, expected min <= max")

    @property
    def given(self) -> bool:
        return self.min_pixels is not None or self.max_pixels is not None


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings for the runtime pipeline. temperature == 0 means greedy."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_finite(self)
        check_seed("seed", self.seed)
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: got {self.max_new_tokens}, expected >= 1")
        if self.temperature < 0:
            raise ConfigError(f"temperature: got {self.temperature}, expected >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: got {self.top_p}, expected 0 < top_p <= 1")


def check_finite(config: Any, prefix: str = "") -> None:
    """Every float field of the dataclass `config` is finite: NaN slips through every range check (all
    comparisons are False) and inf through one-sided ones. Used by each config's __post_init__."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{f.name}: got {value}, expected a finite number")


def check_seed(where: str, seed: int) -> None:
    """A seed for np.random.default_rng: a non-negative integer."""
    if seed < 0:
        raise ConfigError(f"{where}: got {seed}, expected an integer >= 0")


FRESH_SEED_BITS = 31  # fresh seeds are 0 .. 2**31 - 1: short enough to retype


def fresh_seed() -> int:
    """A new GenerationConfig.seed from the OS's randomness (secrets): what a sampled run without a seed uses, printed
    so it can be repeated (`prunert run` says `seed: N (pass --seed N to repeat)`)."""
    import secrets

    return secrets.randbits(FRESH_SEED_BITS)


def seed_for(seed: int | None, temperature: float) -> int:
    """The seed a served request runs with: its own; without one, a fresh one when it samples (temperature > 0),
    else GenerationConfig's (greedy decoding draws nothing)."""
    if seed is not None:
        return seed
    return fresh_seed() if temperature > 0 else GenerationConfig().seed


MAX_PANEL_SCALE = 16  # `prunert visualize --scale`: a 336 px crop becomes 5376 px square (~90 MB of RGB per panel)


def check_panel_scale(scale: int | None) -> int | None:
    """--scale: None (automatic) or an integer zoom 1..MAX_PANEL_SCALE; beyond it the PNG takes gigabytes."""
    if scale is not None and not 1 <= scale <= MAX_PANEL_SCALE:
        raise ConfigError(f"--scale: got {scale}, expected an integer 1..{MAX_PANEL_SCALE}")
    return scale


def check_precision(precision: str, allowed: tuple[str, ...] = PRECISIONS, flag: str = "--precision") -> str:
    if precision not in allowed:
        raise ConfigError(f"{flag}: got {precision!r}, expected one of {list(allowed)}")
    return precision


GRAPH_ROLES = {"vision": "vision", "decoder": "decoder", FUSED_DECODER: "decoder"}  # graph name -> its role (GRAPH_NAMES)


def role_precisions(role: str) -> tuple[str, ...]:
    """The precisions graph role `role` may run at: PRECISIONS, less the weight-only (decoder-only) ones for the vision role."""
    return PRECISIONS if role == "decoder" else tuple(p for p in PRECISIONS if p not in WEIGHT_ONLY_PRECISIONS)


@dataclass(frozen=True)
class GraphPrecisions:
    """The precision each graph role runs at: `--precision fp16` (every graph) or `--precision vision=fp16,decoder=int4`
    (a role not named stays fp32). Graph g of role r runs manifest.graph_spec(g, precisions.of(g)); a variant's
    graph that it leaves in fp32 points at the top-level fp32 file, as with one precision."""

    vision: str = "fp32"
    decoder: str = "fp32"

    def __post_init__(self) -> None:
        for role in GRAPH_NAMES:
            precision = getattr(self, role)
            if precision in PRECISIONS and precision not in role_precisions(role):  # int4 for vision
                raise ConfigError(f"--precision {role}: got {precision!r}, a decoder-only (weight-only) precision; "
                                  f"expected one of {list(role_precisions(role))}")
            check_precision(precision, role_precisions(role), flag=f"--precision {role}")

    @classmethod
    def uniform(cls, precision: str) -> "GraphPrecisions":
        """Every role at `precision`; a decoder-only precision (int4) leaves vision at fp32 (its variant's vision graph is fp32)."""
        check_precision(precision)
        return cls(vision=precision if precision in role_precisions("vision") else "fp32", decoder=precision)

    @classmethod
    def parse(cls, text: "str | GraphPrecisions") -> "GraphPrecisions":
        """`fp16` or `vision=fp16,decoder=int4` (roles GRAPH_NAMES, each at most once); bad text is one ConfigError line."""
        if isinstance(text, GraphPrecisions):
            return text
        if "=" not in text:
            return cls.uniform(check_precision(text.strip()))
        expected = f"expected a precision ({' | '.join(PRECISIONS)}) or ROLE=PRECISION pairs for roles {list(GRAPH_NAMES)}, e.g. vision=fp16,decoder=int4"
        given: dict[str, str] = {}
        for part in text.split(","):
            role, sep, precision = (s.strip() for s in part.partition("="))
            if not sep or not role or not precision:
                raise ConfigError(f"--precision: got {text!r}: {part.strip()!r} is not ROLE=PRECISION; {expected}")
            if role not in GRAPH_NAMES:
                raise ConfigError(f"--precision: got {text!r}: unknown graph role {role!r}; {expected}")
            if role in given:
                raise ConfigError(f"--precision: got {text!r}: role {role!r} given twice; {expected}")
            given[role] = precision
        return cls(**given)

    def of(self, graph: str) -> str:
        """The precision graph `graph` runs at (decoder_fused: the decoder role's)."""
        if graph not in GRAPH_ROLES:
            raise ConfigError(f"graph {graph!r}: unknown, expected one of {list(GRAPH_ROLES)}")
        return getattr(self, GRAPH_ROLES[graph])

    @property
    def is_uniform(self) -> bool:
        return self == GraphPrecisions.uniform(self.decoder)

    @property
    def label(self) -> str:
        """Compact form for reports and benchmark output: `fp16` when uniform, else `vision=fp16,decoder=int4`."""
        if self.is_uniform:
            return self.decoder
        return ",".join(f"{role}={getattr(self, role)}" for role in GRAPH_NAMES)

    def groups(self, roles: tuple[str, ...] = GRAPH_NAMES) -> dict[str, tuple[str, ...]]:
        """precision -> the roles (of `roles`) that run at it, in GRAPH_NAMES order: one engine build per precision."""
        out: dict[str, tuple[str, ...]] = {}
        for role in (r for r in GRAPH_NAMES if r in roles):
            out[getattr(self, role)] = out.get(getattr(self, role), ()) + (role,)
        return out


@dataclass(frozen=True)
class RuntimeConfig:
    """How every ONNX Runtime session of a run uses the CPU (`--threads N`, `--spin`, `--no-huge-pages`).

    threads:    intra-op threads of each session; 0 = ONNX Runtime's default (one per physical core).
    spinning:   let idle worker threads busy-wait for the next op. Off by default: a spinning pool burns whole
                cores between ops and slows everything else on a shared machine (or a second session of its own).
    huge_pages: back a CPU session's weights and the runtime's KV cache with transparent huge pages (Linux; a hint
                that does nothing elsewhere, prunert.runtime.huge_pages). A decode step streams every weight, and
                fewer page walks made it 4-15% faster on the llava-1.5-shaped fp32 decoder (against the same session
                without them: README, "Huge pages").
    """

    threads: int = 0
    spinning: bool = False
    huge_pages: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ConfigError(f"--threads: got {self.threads}, expected >= 0 (0: ONNX Runtime's default)")

    def session_config(self) -> dict[str, str]:
        """The SessionOptions config entries these settings mean (ONNX Runtime's onnxruntime_session_options_config_keys.h)."""
        spin = "1" if self.spinning else "0"
        return {"session.intra_op.allow_spinning": spin, "session.inter_op.allow_spinning": spin}

    def record(self) -> dict[str, Any]:
        """What a report records about the run's environment."""
        return {"threads": self.threads, "spinning": self.spinning, "huge_pages": self.huge_pages}


@dataclass(frozen=True)
class PrecisionConfig:
    """fp16/bf16 conversion of an artifact's fp32 graphs into strongly typed graphs (prunert.export.precision).

    fp32_op_types:      op types that stay fp32 islands (LayerNorm after attention overflows in fp16).
    fp32_node_patterns: fnmatch patterns on node names or name scopes kept in fp32, e.g.
                        "*encoder.layers.23.mlp.fc2*" for a late MLP down-projection.
    keep_selection_fp32: the selection op (SELECTION_SCOPE) stays fp32; its argmax decisions are precision-sensitive.
    auto_islands:       run the fp32 graph on sample inputs and keep every node whose output magnitude
                        exceeds overflow_fraction * the target type's largest finite value in fp32.
    """

    precision: str = "fp16"
    fp32_op_types: tuple[str, ...] = ("LayerNormalization",)
    fp32_node_patterns: tuple[str, ...] = ()
    keep_selection_fp32: bool = True
    auto_islands: bool = True
    overflow_fraction: float = 0.25

    def __post_init__(self) -> None:
        check_finite(self)
        check_precision(self.precision, FLOAT_PRECISIONS)
        if not 0 < self.overflow_fraction <= 1:
            raise ConfigError(f"overflow_fraction: got {self.overflow_fraction}, expected 0 < fraction <= 1")


@dataclass(frozen=True)
class CalibrationConfig:
    """Explicit (Q/DQ) quantization of an artifact's graphs from a calibration set (prunert.calibration).

    The quantizer is ONNX Runtime's static QDQ quantizer (it ships with the runtime's onnxruntime; ModelOpt's
    ONNX path would need onnxruntime-gpu, which cannot live beside it), recorded as the variant's tool.
    Symmetric int8 with per-channel weights and per-tensor activations, or FP8 E4M3. Only op_types are
    quantized (quantizing every op wrecks the [CLS] ranking); the selection op always stays fp32.
    """

    precision: str = "int8"
    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    graphs: tuple[str, ...] = GRAPH_NAMES
    method: str = "minmax"  # activation range: "minmax", "percentile", "entropy"
    max_samples: int = 32

    def __post_init__(self) -> None:
        check_precision(self.precision, QUANTIZED_PRECISIONS)
        if self.method not in ("minmax", "percentile", "entropy"):
            raise ConfigError(f"--calibration-method: got {self.method!r}, expected 'minmax', 'percentile' or 'entropy'")
        unknown = sorted(set(self.graphs) - set(GRAPH_NAMES))
        if unknown or not self.graphs:
            raise ConfigError(f"graphs: got {list(self.graphs)}, expected a non-empty subset of {list(GRAPH_NAMES)}")
        if self.max_samples < 1:
            raise ConfigError(f"max_samples: got {self.max_samples}, expected >= 1")


WEIGHT_ONLY_ALGOS = ("rtn", "awq", "gptq")  # WeightOnlyConfig.algo
WEIGHT_ONLY_BLOCK_SIZES = (32, 64, 128)
WEIGHT_ONLY_LM_HEAD = ("int4", "fp32")


@dataclass(frozen=True)
class WeightOnlyConfig:
    """Int4 weight-only quantization of the decoder role's MatMul weights (`prunert quantize`).

    Symmetric int4 ([-8, 7], no zero point: TensorRT's DequantizeLayer takes zero points of 0 only), one
    fp32 scale per block of block_size input rows (K) per output column. The same int4 numbers become
    com.microsoft MatMulNBits (ONNX Runtime) and opset-21 block DequantizeLinear -> MatMul (TensorRT).
    Defaults follow ONNX Runtime GenAI's model builder for int4: block 32, symmetric, every MatMul
    including lm_head, accuracy_level 4 (int8 activations inside MatMulNBits) on CPU.

    algo:           "rtn" (round to nearest), "awq" (activation-aware per-input-channel scales from the
                    calibration set, grid-searched exponent per group of matmuls sharing an input) or "gptq"
                    (rounding errors pushed onto the rows not yet quantized through the inverse Hessian X^T X)
    lm_head:        "int4" (the builder's default) or "fp32"; the embedding table is the runtime's fp32 file
    accuracy_level: MatMulNBits' minimum activation precision: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
    awq_grid:       exponents tried, alpha in {0, 1/grid, ..., (grid-1)/grid} (alpha 0 is RTN)
    sample_rows:    calibration activation rows kept per matmul input (AWQ's error search, GPTQ's Hessian)
    gptq_damp:      GPTQ's damping, a fraction of the Hessian's mean diagonal added to it
    """

    precision: str = "int4"
    algo: str = "rtn"
    block_size: int = 32
    graphs: tuple[str, ...] = ("decoder",)
    lm_head: str = "int4"
    accuracy_level: int = 4
    awq_grid: int = 20
    sample_rows: int = 512
    gptq_damp: float = 0.01
    max_samples: int = 32

    def __post_init__(self) -> None:
        check_precision(self.precision, WEIGHT_ONLY_PRECISIONS, "--weights")
        if self.algo not in WEIGHT_ONLY_ALGOS:
            raise ConfigError(f"--algo: got {self.algo!r}, expected one of {list(WEIGHT_ONLY_ALGOS)}")
        if self.block_size not in WEIGHT_ONLY_BLOCK_SIZES:
            raise ConfigError(f"--block-size: got {self.block_size}, expected one of {list(WEIGHT_ONLY_BLOCK_SIZES)}")
        if tuple(self.graphs) != ("decoder",):
            raise ConfigError(f"--graphs: got {list(self.graphs)}, expected ['decoder']: int4 is weight-only for the decoder role "
                              "(the vision graph stays fp32 so the selection stays exact; use convert/calibrate for it)")
        if self.lm_head not in WEIGHT_ONLY_LM_HEAD:
            raise ConfigError(f"--lm-head: got {self.lm_head!r}, expected one of {list(WEIGHT_ONLY_LM_HEAD)}")
        if not 0 <= self.accuracy_level <= 4:
            raise ConfigError(f"accuracy_level: got {self.accuracy_level}, expected 0..4")
        check_finite(self)
        if not 0 < self.gptq_damp <= 1:
            raise ConfigError(f"gptq_damp: got {self.gptq_damp}, expected 0 < damp <= 1")
        for name in ("awq_grid", "sample_rows", "max_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: got {getattr(self, name)}, expected >= 1")


@dataclass(frozen=True)
class EngineBuildConfig:
    """TensorRT engine build settings (prunert.engines). Sizes default to the manifest's maxima.

    The network is always strongly typed: precision comes from the graph variant, never builder flags.
    """

    precision: str = "fp32"
    max_batch: int | None = None  # None: the manifest's text.max_batch
    max_seq: int | None = None  # None: the manifest's text.max_sequence
    opt_batch: int = 1
    workspace_bytes: int = 4 << 30
    optimization_level: int = 3  # TensorRT builder optimization level 0..5
    graphs: tuple[str, ...] = GRAPH_NAMES

    def __post_init__(self) -> None:
        check_precision(self.precision)
        for name, value in (("--max-batch", self.max_batch), ("--max-seq", self.max_seq)):
            if value is not None and value < 1:
                raise ConfigError(f"{name}: got {value}, expected >= 1")
        if not 0 <= self.optimization_level <= 5:
            raise ConfigError(f"optimization_level: got {self.optimization_level}, expected 0..5")
        if self.workspace_bytes < 1:
            raise ConfigError(f"workspace_bytes: got {self.workspace_bytes}, expected >= 1")
        unknown = sorted(set(self.graphs) - set(GRAPH_NAMES))
        if unknown or not self.graphs:
            raise ConfigError(f"graphs: got {list(self.graphs)}, expected a non-empty subset of {list(GRAPH_NAMES)}")

    @staticmethod
    def workspace_from_gib(gib: float) -> int:
        """--workspace-gb as the workspace_bytes field: a finite number of GiB > 0."""
        if not (math.isfinite(gib) and gib > 0):
            raise ConfigError(f"--workspace-gb: got {gib}, expected a finite number > 0")
        return int(gib * (1 << 30))


@dataclass(frozen=True)
class ParityTolerances:
    """Per-output tolerances for parity, in one place. `for_precision` gives each precision's bar.

    A check with a None bound is not applied at that precision (elementwise max-abs is meaningless
    for fp16/int8 logits; cosine and set overlap carry the comparison there).
    """

    pixels_max_abs: float = 1e-4
    kept_min_overlap: float = 1.0  # |ours ∩ reference| / K
    tokens_max_abs: float | None = 1e-3
    tokens_min_cosine: float = 0.99999
    logits_max_abs: float | None = 1e-3
    logits_min_cosine: float = 0.99999
    tie_margin: float = 1e-3  # a greedy divergence after a top-2 margin at most this is a TIE, not a FAIL
    greedy_tokens: int = 8
    logits_max_kl: float | None = None  # KL(softmax reference || softmax ours) of the last prefill logits, nats; None: reported only

    def __post_init__(self) -> None:
        check_finite(self)
        if self.greedy_tokens < 1:
            raise ConfigError(f"--greedy-tokens: got {self.greedy_tokens}, expected >= 1")

    @classmethod
    def for_precision(cls, precision: str, greedy_tokens: int = 8) -> "ParityTolerances":
        check_precision(precision)
        return cls(greedy_tokens=greedy_tokens, **PRECISION_TOLERANCES[precision])

    @classmethod
    def for_precisions(cls, precisions: GraphPrecisions, greedy_tokens: int = 8) -> "ParityTolerances":
        """Per-graph precision: the vision-stage bars (VISION_STAGE_BARS: pixels, kept indices, kept tokens) from the
        vision precision's PRECISION_TOLERANCES; every other bar (logits, KL, greedy tie margin) the looser of the two
        precisions' (the decoder reads the vision graph's tokens: an fp16 tower moves fp32 logits past fp32's bars).
        Uniform precisions are exactly for_precision's."""
        if precisions.is_uniform:
            return cls.for_precision(precisions.decoder, greedy_tokens)
        vision, decoder = (cls.for_precision(p, greedy_tokens) for p in (precisions.vision, precisions.decoder))
        bars = {f.name: getattr(vision, f.name) if f.name in VISION_STAGE_BARS else _looser(f.name, getattr(vision, f.name), getattr(decoder, f.name))
                for f in fields(cls) if f.name != "greedy_tokens"}
        return cls(greedy_tokens=greedy_tokens, **bars)


def _looser(name: str, a: Any, b: Any) -> Any:
    """The looser of two values of a ParityTolerances bar: a *_max_* bar's larger (None: not checked, the loosest),
    a *_min_* bar's smaller, the larger tie margin."""
    if "_min_" in name:
        return min(a, b)
    return None if a is None or b is None else max(a, b)


# ParityTolerances fields judged on the vision graph's outputs; the rest judge the decoder's (for_precisions).
VISION_STAGE_BARS = ("pixels_max_abs", "kept_min_overlap", "tokens_max_abs", "tokens_min_cosine")


# The bars per precision (docs/deploy.md explains them). fp16/bf16 follow the issue: kept-index overlap
# >= 0.98 and logits cosine >= 0.999. int8/fp8 are looser by design and documented, never loosened silently.
PRECISION_TOLERANCES: dict[str, dict[str, Any]] = {
    "fp32": {},
    "fp16": {"kept_min_overlap": 0.98, "tokens_max_abs": None, "tokens_min_cosine": 0.999,
             "logits_max_abs": None, "logits_min_cosine": 0.999, "tie_margin": 0.05},
    "bf16": {"kept_min_overlap": 0.95, "tokens_max_abs": None, "tokens_min_cosine": 0.995,
             "logits_max_abs": None, "logits_min_cosine": 0.995, "tie_margin": 0.25},
    "int8": {"kept_min_overlap": 0.90, "tokens_max_abs": None, "tokens_min_cosine": 0.98,
             "logits_max_abs": None, "logits_min_cosine": 0.98, "tie_margin": 0.5},
    "fp8": {"kept_min_overlap": 0.90, "tokens_max_abs": None, "tokens_min_cosine": 0.98,
            "logits_max_abs": None, "logits_min_cosine": 0.98, "tie_margin": 0.5},
    # int4 weight-only: the vision graph (and so the selection) stays fp32, so kept indices and tokens keep the
    # fp32 bars; the decoder's logits are judged by cosine and KL, greedy divergences by a wide tie margin. KL 0.1:
    # the worst last-position KL measured on held-out shapes prompts was 0.091 (AWQ; RTN 0.006, GPTQ 0.026,
    # docs/deploy.md); a packing or scale error gives KL > 1.
    "int4": {"logits_max_abs": None, "logits_min_cosine": 0.98, "logits_max_kl": 0.1, "tie_margin": 0.5},
}
