"""Train `synthetic:llava-shapes` deterministically on CPU, staged as LLaVA is trained (torch).

1. vision tower alone, on a per-patch objective: the (colour, shape) class of the object under every patch
   (or background) and a flag on the patch holding each object's centre;
2. projector + decoder on the four question templates, tower frozen (its features computed once);
3. a short joint fine-tune of everything, the per-patch objective kept as an auxiliary.
A fixed seed, fixed thread count and deterministic algorithms give the same state dict on a rerun with the same
torch (`state_dict_sha256`).
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from prunert.config import check_finite, check_seed
from prunert.errors import ConfigError
from prunert.shapes.model import PRESET, build_shapes_tokenizer, prompt
from prunert.shapes.pool import NUM_PATCH_CLASSES, ScenePool, build_pool
from prunert.shapes.scenes import TEMPLATES, ask

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    pool_scenes: int = 8000
    threads: int = 2
    tower_steps: int = 600
    tower_batch: int = 32
    tower_lr: float = 2e-3
    qa_steps: int = 1500
    qa_scenes: int = 16  # scenes per QA batch; every template that applies is asked of each (<= 4 questions)
    qa_lr: float = 2e-3
    joint_steps: int = 200
    joint_scenes: int = 8
    joint_lr: float = 3e-4
    warmup_steps: int = 50
    center_weight: float = 1.0  # weight of the centre-flag loss beside the patch-class loss
    aux_weight: float = 0.5  # per-patch loss kept during the joint stage

    def __post_init__(self) -> None:
        check_finite(self, "TrainConfig.")
        check_seed("TrainConfig.seed", self.seed)
        for name in ("pool_scenes", "threads", "tower_batch", "qa_scenes", "joint_scenes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name}: got {getattr(self, name)}, expected >= 1")


@dataclass
class Batch:
    rows: list[int]  # [Q] index of each question's scene in the batch
    suffixes: list[list[int]]  # [Q] token ids after <image>: question, ASSISTANT:, answer, EOS
    targets: list[int]  # [Q] how many trailing ids of each suffix are predicted (answer + EOS)


class QATokens:
    """Token ids of prompt(question) split at <image>, plus the answer and EOS (cached per string)."""

    def __init__(self, tokenizer: Any, image_id: int, eos_id: int):
        self.tokenizer, self.image_id, self.eos_id = tokenizer, image_id, eos_id
        ids = tokenizer.encode(prompt("x")).ids
        self.prefix = ids[: ids.index(image_id)]  # BOS "USER" ":" " "
        self._cache: dict[tuple[str, str], tuple[list[int], int]] = {}

    def suffix(self, question: str, answer: str) -> tuple[list[int], int]:
        key = (question, answer)
        if key not in self._cache:
            ids = self.tokenizer.encode(prompt(question)).ids
            after = ids[ids.index(self.image_id) + 1 :]
            answer_ids = self.tokenizer.encode(f" {answer}", add_special_tokens=False).ids
            self._cache[key] = (after + answer_ids + [self.eos_id], len(answer_ids) + 1)
        return self._cache[key]


def sample_batch(pool: ScenePool, scenes: np.ndarray, tokens: QATokens, rng: np.random.Generator) -> Batch:
    batch = Batch([], [], [])
    for row, index in enumerate(scenes):
        for template in TEMPLATES:
            question = ask(pool.scenes[index], template, rng, want_yes=bool(rng.integers(2)))
            if question is None:
                continue
            suffix, targets = tokens.suffix(question.question, question.answer)
            batch.rows.append(row)
            batch.suffixes.append(suffix)
            batch.targets.append(targets)
    return batch


def qa_logits(model: Any, visual: torch.Tensor, batch: Batch, tokens: QATokens, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [T, V], target ids [T]) at every answer / EOS position of the batch. The prefix and visual tokens
    run once per scene; each question continues from its scene's KV cache."""
    import torch
    from transformers import DynamicCache

    lm, head = model.model.language_model, model.lm_head
    embed = lm.embed_tokens
    prefix = embed(torch.tensor(tokens.prefix))[None].expand(visual.shape[0], -1, -1)  # [S, Lp, D]
    cache = DynamicCache(config=lm.config)
    lm(inputs_embeds=torch.cat([prefix, visual], dim=1), past_key_values=cache, use_cache=True)  # [S, Lp+N, D]
    cache.batch_select_indices(torch.tensor(batch.rows))
    length = max(len(s) for s in batch.suffixes)
    ids = torch.full((len(batch.suffixes), length), pad_id, dtype=torch.long)  # [Q, L], right padded
    rows, cols, targets = [], [], []
    for q, (suffix, count) in enumerate(zip(batch.suffixes, batch.targets)):
        ids[q, : len(suffix)] = torch.tensor(suffix)
        for position in range(len(suffix) - count - 1, len(suffix) - 1):  # position predicts suffix[position + 1]
            rows.append(q)
            cols.append(position)
            targets.append(suffix[position + 1])
    hidden = lm(inputs_embeds=embed(ids), past_key_values=cache, use_cache=True).last_hidden_state  # [Q, L, D]
    return head(hidden[torch.tensor(rows), torch.tensor(cols)]), torch.tensor(targets)  # [T, V], [T]


def tower_features(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] -> [B, N, Dv]: the hidden state LLaVA reads, [CLS] dropped (strategy "default")."""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def state_dict_sha256(model: Any) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Progress:
    """One tqdm bar over all stages on stderr (the stage and last loss in its postfix)."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="training llava-shapes", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True, mininterval=1.0)

    def step(self, stage: str, loss: float) -> None:
        self.bar.set_postfix_str(f"{stage} loss {loss:.3f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


@dataclass
class TrainResult:
    model: Any
    tokenizer: Any
    sha256: str
    seconds: float
    losses: dict[str, float]  # stage -> mean loss over its last 50 steps


class Trainer:
    def __init__(self, cfg: TrainConfig, progress: bool = True):
        import torch

        from prunert.adapters.llava.host import ImagePreprocessConfig
        from prunert.adapters.llava.synthetic import build_model
        from prunert.adapters.llava.tokenizer_builder import EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN

        self.cfg = cfg
        self.tokenizer = build_shapes_tokenizer()
        self.model = build_model(PRESET, self.tokenizer).train()
        self.tokens = QATokens(self.tokenizer, self.tokenizer.token_to_id(IMAGE_TOKEN), self.tokenizer.token_to_id(EOS_TOKEN))
        self.pad_id = self.tokenizer.token_to_id(PAD_TOKEN)
        self.image_cfg = ImagePreprocessConfig.clip_defaults(PRESET.image_size)
        self.grid = PRESET.image_size // PRESET.patch_size
        generator = torch.Generator().manual_seed(cfg.seed + 1)
        hidden = PRESET.vision_hidden
        self.patch_head = torch.nn.Linear(hidden, NUM_PATCH_CLASSES + 1)  # classes + the centre flag
        with torch.no_grad():
            self.patch_head.weight.normal_(0.0, hidden ** -0.5, generator=generator)
            self.patch_head.bias.zero_()
        self.rng = np.random.default_rng([3, cfg.seed])
        self.progress = Progress(cfg.tower_steps + cfg.qa_steps + cfg.joint_steps, progress)
        self.losses: dict[str, float] = {}

    def pixels(self, pool: ScenePool, index: np.ndarray) -> torch.Tensor:
        import torch

        return torch.from_numpy(pool.pixel_values(index, self.image_cfg))  # [B, 3, S, S]

    def patch_loss(self, features: torch.Tensor, pool: ScenePool, index: np.ndarray) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        out = self.patch_head(features)  # [B, N, C + 1]
        labels = torch.from_numpy(pool.labels[index])  # [B, N]
        centers = torch.from_numpy(pool.centers[index])  # [B, N]
        classes = F.cross_entropy(out[..., :-1].reshape(-1, NUM_PATCH_CLASSES), labels.reshape(-1))
        return classes + self.cfg.center_weight * F.binary_cross_entropy_with_logits(out[..., -1], centers)

    def qa_loss(self, visual: torch.Tensor, pool: ScenePool, index: np.ndarray) -> torch.Tensor:
        import torch.nn.functional as F

        batch = sample_batch(pool, index, self.tokens, self.rng)
        logits, targets = qa_logits(self.model, visual, batch, self.tokens, self.pad_id)
        return F.cross_entropy(logits, targets)

    def run_stage(self, name: str, params: list, steps: int, peak_lr: float, loss_fn) -> None:
        import torch

        if steps == 0:
            return
        optimizer = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.01, betas=(0.9, 0.98))
        recent: list[float] = []
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, peak_lr, self.cfg.warmup_steps)
            loss = loss_fn()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            recent = (recent + [float(loss)])[-50:]
            self.progress.step(name, recent[-1])
        self.losses[name] = sum(recent) / len(recent)

    def train(self) -> TrainResult:
        import torch

        start = time.perf_counter()
        cfg, model = self.cfg, self.model
        with _deterministic(cfg.threads, cfg.seed):
            pool = build_pool(cfg.pool_scenes, cfg.seed, self.image_cfg, self.grid)
            tower = list(model.model.vision_tower.parameters())
            head = list(self.patch_head.parameters())

            def tower_loss() -> torch.Tensor:
                index = self.rng.integers(len(pool.scenes), size=cfg.tower_batch)
                return self.patch_loss(tower_features(model, self.pixels(pool, index)), pool, index)

            self.run_stage("tower", tower + head, cfg.tower_steps, cfg.tower_lr, tower_loss)
            features = self.cached_features(pool)  # [P, N, Dv], tower frozen
            decoder = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower")]

            def frozen_loss() -> torch.Tensor:
                index = self.rng.integers(len(pool.scenes), size=cfg.qa_scenes)
                return self.qa_loss(model.model.multi_modal_projector(features[index]), pool, index)

            self.run_stage("qa", decoder, cfg.qa_steps, cfg.qa_lr, frozen_loss)

            def joint_loss() -> torch.Tensor:
                index = self.rng.integers(len(pool.scenes), size=cfg.joint_scenes)
                feats = tower_features(model, self.pixels(pool, index))
                qa = self.qa_loss(model.model.multi_modal_projector(feats), pool, index)
                return qa + cfg.aux_weight * self.patch_loss(feats, pool, index)

            self.run_stage("joint", tower + head + decoder, cfg.joint_steps, cfg.joint_lr, joint_loss)
        self.progress.close()
        model.eval()
        return TrainResult(model, self.tokenizer, state_dict_sha256(model), time.perf_counter() - start, dict(self.losses))

    def cached_features(self, pool: ScenePool, chunk: int = 64) -> torch.Tensor:
        import torch

        with torch.no_grad():
            parts = [tower_features(self.model, self.pixels(pool, np.arange(i, min(i + chunk, len(pool.scenes)))))
                     for i in range(0, len(pool.scenes), chunk)]
        return torch.cat(parts)  # [P, N, Dv]


class _deterministic:
    """Fixed threads, seeded torch RNG and deterministic kernels for the block; the caller's settings restored."""

    def __init__(self, threads: int, seed: int):
        self.threads, self.seed = threads, seed

    def __enter__(self) -> None:
        import torch

        self.saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
        self.fork = torch.random.fork_rng(devices=[])
        self.fork.__enter__()
        torch.manual_seed(self.seed)
        torch.set_num_threads(self.threads)
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.set_num_threads(self.saved[0])
        torch.use_deterministic_algorithms(self.saved[1])
        self.fork.__exit__(*exc)
