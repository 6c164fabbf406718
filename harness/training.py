"""The one training loop shared by defences and attacks.

A recipe supplies examples, a collate function and a loss function; this module owns the
optimizer, cosine schedule with warm-up, gradient accumulation, seeded batch order, progress,
NaN/inf detection and compute accounting.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from pydantic import Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from harness.context import StageContext
from harness.errors import TrainingDivergedError
from harness.registry import Params

LossOutput = torch.Tensor | tuple[torch.Tensor, dict[str, Any]]
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], LossOutput]


class TrainSettings(Params):
    """Optimisation settings every recipe shares (each recipe sets its own paper defaults)."""

    lr: float = Field(3e-5, gt=0, description="peak learning rate")
    epochs: int = Field(1, ge=1, description="passes over the training examples")
    batch_size: int = Field(4, ge=1, description="examples per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    optimizer: Literal["adam", "adamw"] = Field("adamw", description="Adam or AdamW")
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="fraction of steps with linear warm-up")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="learning-rate schedule after warm-up")
    max_grad_norm: float | None = Field(None, gt=0, description="clip gradients to this norm (None: no clipping)")


@dataclass
class TrainReport:
    steps: int = 0
    micro_batches: int = 0
    tokens: int = 0
    wall_seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def first_loss(self) -> float:
        return self.history[0]["loss"] if self.history else math.nan

    @property
    def last_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else math.nan

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "micro_batches": self.micro_batches,
            "tokens": self.tokens,
            "wall_seconds": round(self.wall_seconds, 2),
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
        }


def batch_order(n_examples: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Seeded shuffle per epoch, cut into batches (the last may be smaller)."""
    rng = random.Random(seed)
    batches = []
    for _ in range(epochs):
        order = list(range(n_examples))
        rng.shuffle(order)
        batches.extend(order[i : i + batch_size] for i in range(0, n_examples, batch_size))
    return batches


def make_optimizer(params: Iterable[torch.nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    return cls(list(params), lr=settings.lr, weight_decay=settings.weight_decay)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up to 1, then cosine decay to 0 (or constant)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _to_floats(loss: torch.Tensor, terms: dict[str, Any]) -> dict[str, float]:
    """The loss and its terms as floats, with one device-to-host transfer (one GPU sync per micro-batch)."""
    named = {"loss": loss, **terms}
    tensors = {k: v for k, v in named.items() if isinstance(v, torch.Tensor)}
    floats = dict(zip(tensors, torch.stack([v.detach().float().reshape(()) for v in tensors.values()]).tolist()))
    return {k: floats[k] if k in floats else float(v) for k, v in named.items()}


def _check_finite(step: int, values: dict[str, float]) -> None:
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        shown = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
        raise TrainingDivergedError(
            f"Training diverged at optimizer step {step}: {', '.join(bad)} not finite ({shown}). "
            "Lower the learning rate, check the data, or use float32."
        )


def _count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a collated batch, counted before it moves to the device."""
    return int(sum(int(v.sum()) for k, v in batch.items() if k.endswith("attention_mask")))


def train(
    model: torch.nn.Module,
    examples: Sequence[Any],
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    loss_fn: LossFn,
    settings: TrainSettings,
    ctx: StageContext,
    *,
    parameters: Iterable[torch.nn.Parameter] | None = None,
    description: str = "training",
) -> TrainReport:
    """Run the optimisation; returns per-step history (loss and any named loss terms)."""
    if not examples:
        raise TrainingDivergedError(f"{description}: no training examples.")
    trainable = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
    optimizer = make_optimizer(trainable, settings)
    batches = batch_order(len(examples), settings.batch_size, settings.epochs, ctx.seed)
    total_steps = math.ceil(len(batches) / settings.grad_accum)
    warmup = int(settings.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, settings.schedule)
    )
    device = next(model.parameters()).device
    report = TrainReport()
    torch.manual_seed(ctx.seed)
    model.train()
    start = time.perf_counter()
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=ctx.console, transient=False) as progress:
        task = progress.add_task(description, total=total_steps, status="")
        accumulated: dict[str, float] = {}
        optimizer.zero_grad(set_to_none=True)
        for index, batch_indices in enumerate(batches):
            collated = collate([examples[i] for i in batch_indices])
            report.tokens += _count_tokens(collated)
            batch = {k: v.to(device, non_blocking=True) for k, v in collated.items()}
            output = loss_fn(model, batch)
            loss, terms = output if isinstance(output, tuple) else (output, {})
            step = report.steps + 1
            values = _to_floats(loss, terms)
            _check_finite(step, values)
            (loss / settings.grad_accum).backward()
            report.micro_batches += 1
            for name, value in values.items():
                accumulated[name] = accumulated.get(name, 0.0) + value / settings.grad_accum
            if (index + 1) % settings.grad_accum and index + 1 != len(batches):
                continue
            if settings.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
            record = {"step": step, "lr": scheduler.get_last_lr()[0], **accumulated}
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            report.steps = step
            report.history.append(record)
            shown = " ".join(f"{k}={v:.4g}" for k, v in accumulated.items())
            progress.update(task, advance=1, status=shown)
            accumulated = {}
    model.eval()
    report.wall_seconds = time.perf_counter() - start
    ctx.add_stat("train_tokens", report.tokens)
    ctx.add_stat("train_steps", report.steps)
    ctx.add_stat("train_seconds", report.wall_seconds)
    return report
