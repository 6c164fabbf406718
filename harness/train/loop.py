"""The one training loop shared by defences and attacks.

A recipe supplies examples, a collate function and a loss function; this module owns the
optimizer, cosine schedule with warm-up, gradient accumulation, seeded batch order, progress,
NaN/inf detection and compute accounting.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import torch
from pydantic import Field, SerializerFunctionWrapHandler, model_serializer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from harness.context import StageContext
from harness.errors import HarnessError, TrainingDivergedError
from harness.registry import Params

LossOutput = torch.Tensor | tuple[torch.Tensor, dict[str, Any]]
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], LossOutput]


@dataclass
class TrainingRun:
    """What an interceptor (``intercept_training``) sees of a ``train`` call it joins."""

    model: torch.nn.Module
    parameters: list[torch.nn.Parameter]  # what the optimizer updates
    total_steps: int  # optimizer steps of the run
    grad_accum: int
    description: str
    step: int = 0  # the optimizer step (0-based) the current micro-batch belongs to


# (run, loss_fn) -> the loss_fn the run uses instead; active within ``intercept_training`` blocks.
Interceptor = Callable[[TrainingRun, LossFn], LossFn]
_INTERCEPTORS: ContextVar[tuple[Interceptor, ...]] = ContextVar("harness_training_interceptors", default=())


@contextmanager
def intercept_training(interceptor: Interceptor) -> Iterator[None]:
    """Within the block, every ``train`` call (e.g. an attack's, which a defence cannot pass arguments to)
    wraps its loss function with ``interceptor``: how a fine-tuning-stage defence such as Lisa changes
    the steps of a training loop it does not own. Outside the block, ``train`` is as before."""
    token = _INTERCEPTORS.set((*_INTERCEPTORS.get(), interceptor))
    try:
        yield
    finally:
        _INTERCEPTORS.reset(token)


class TrainSettings(Params):
    """Optimisation settings every recipe shares (each recipe sets its own paper defaults)."""

    lr: float = Field(3e-5, gt=0, description="peak learning rate")
    epochs: int = Field(1, ge=1, description="passes over the training examples")
    batch_size: int = Field(4, ge=1, description="examples per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adamw", description="Adam, AdamW or plain SGD")
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="fraction of steps with linear warm-up")
    schedule: Literal["cosine", "constant", "linear"] = Field("cosine",
                                                        description="learning-rate schedule after warm-up")
    max_grad_norm: float | None = Field(None, gt=0, description="clip gradients to this norm (None: no clipping)")
    gradient_checkpointing: bool = Field(
        False, description="recompute layer activations in backward (non-reentrant: forward hooks keep working)")
    fp32_optimizer: bool = Field(
        False, description="bf16/fp16 weights: keep a float32 master copy and float32 optimizer state")

    @model_serializer(mode="wrap")
    def _omit_default_memory_options(self, handler: SerializerFunctionWrapHandler) -> Any:
        """Memory options at their defaults are left out of dumps, so stage keys (a hash of the params)
        made before these options existed stay valid; set, they are in the key like any param."""
        data = handler(self)
        if isinstance(data, dict):
            for name in MEMORY_OPTIONS:
                if name in data and data[name] is False:
                    del data[name]
        return data


MEMORY_OPTIONS = ("gradient_checkpointing", "fp32_optimizer")


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
    if settings.optimizer == "sgd":  # plain SGD (no momentum): the attacker-side variation of Qi et al. 2024
        return torch.optim.SGD(list(params), lr=settings.lr, weight_decay=settings.weight_decay)
    cls = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    return cls(list(params), lr=settings.lr, weight_decay=settings.weight_decay)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up to 1, then cosine or linear decay to 0 (or constant)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
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


class MasterWeights:
    """float32 copies of low-precision weights: the optimizer (and its state) works on these, and the
    model's weights are rounded from them after every step."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.model_params = params
        self.params = [torch.nn.Parameter(p.detach().float().clone()) for p in params]

    def take_grads(self) -> None:
        for master, param in zip(self.params, self.model_params):
            master.grad = None if param.grad is None else param.grad.float()
            param.grad = None

    @torch.no_grad()
    def write_back(self) -> None:
        for master, param in zip(self.params, self.model_params):
            param.copy_(master)


@contextmanager
def _checkpointing(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Non-reentrant gradient checkpointing for the block (reentrant would cut forward hooks' gradients)."""
    from harness.models.activations import unwrap

    base = unwrap(model)
    if not enabled or getattr(base, "is_gradient_checkpointing", False):
        yield
        return
    if not hasattr(base, "gradient_checkpointing_enable"):
        from harness.errors import ConfigError

        raise ConfigError(f"gradient_checkpointing: {type(base).__name__} does not support it; set it to false.")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        base.gradient_checkpointing_disable()


def _sharded_step(model: torch.nn.Module, loss_fn: LossFn, trainable: list[torch.nn.Parameter],
                  settings: TrainSettings, intercepted: bool) -> Any:
    """The sharded-training driver when this process is one rank of several, else None."""
    from harness.distributed.world import current

    world = current()
    if world is None or world.size == 1:
        return None
    if intercepted:
        raise HarnessError("A defence that intercepts the attack's training loop (intercept_training) steers the "
                           "model's own parameters, not a sharded copy: run this cell without --nproc.")
    from harness.distributed.step import ShardedStep

    return ShardedStep(model, loss_fn, world, trainable, settings.fp32_optimizer)


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
    with _checkpointing(model, settings.gradient_checkpointing):
        return _train(model, examples, collate, loss_fn, settings, ctx, trainable, description)


def _train(
    model: torch.nn.Module,
    examples: Sequence[Any],
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    loss_fn: LossFn,
    settings: TrainSettings,
    ctx: StageContext,
    trainable: list[torch.nn.Parameter],
    description: str,
) -> TrainReport:
    batches = batch_order(len(examples), settings.batch_size, settings.epochs, ctx.seed)
    total_steps = math.ceil(len(batches) / settings.grad_accum)
    warmup = int(settings.warmup_ratio * total_steps)
    run = TrainingRun(model, trainable, total_steps, settings.grad_accum, description)
    for interceptor in _INTERCEPTORS.get():
        loss_fn = interceptor(run, loss_fn)
    sharded = _sharded_step(model, loss_fn, trainable, settings, intercepted=bool(_INTERCEPTORS.get()))
    if sharded is not None:  # train the sharded twin; its weights come back into ``model`` at the end
        trainable = sharded.parameters
    master = MasterWeights(trainable) if settings.fp32_optimizer and sharded is None else None
    optimizer = make_optimizer(master.params if master else trainable, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, settings.schedule)
    )
    device = sharded.world.device if sharded is not None else next(model.parameters()).device
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
            run.step = index // settings.grad_accum
            if sharded is None:
                output = loss_fn(model, batch)
                loss, terms = output if isinstance(output, tuple) else (output, {})
                values = _to_floats(loss, terms)
            else:  # the global batch's loss, whichever rows this rank computed
                loss, terms, global_loss, global_terms = sharded.forward(batch)
                values = _to_floats(global_loss, global_terms)
            step = report.steps + 1
            _check_finite(step, values)
            (loss / settings.grad_accum).backward()
            report.micro_batches += 1
            for name, value in values.items():
                accumulated[name] = accumulated.get(name, 0.0) + value / settings.grad_accum
            if (index + 1) % settings.grad_accum and index + 1 != len(batches):
                continue
            if master is not None:
                master.take_grads()
            if settings.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(master.params if master else trainable, settings.max_grad_norm)
            record = {"step": step, "lr": scheduler.get_last_lr()[0], **accumulated}
            optimizer.step()
            if master is not None:
                master.write_back()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            report.steps = step
            report.history.append(record)
            shown = " ".join(f"{k}={v:.4g}" for k, v in accumulated.items())
            progress.update(task, advance=1, status=shown)
            accumulated = {}
    if sharded is not None:
        sharded.finish()
        ctx.add_stat("split_micro_batches", sharded.split_micro_batches)
    model.eval()
    report.wall_seconds = time.perf_counter() - start
    ctx.add_stat("train_tokens", report.tokens)
    ctx.add_stat("train_steps", report.steps)
    ctx.add_stat("train_seconds", report.wall_seconds)
    return report
