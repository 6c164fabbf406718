"""Security Vectors (Zhou et al. 2024; PAPER.md §5): a LoRA-style adapter trained to *fit* the
harmful data, kept active and frozen while the attacker fine-tunes, and switched off for evaluation.

Why it works: with the adapter on, the harmful data is already "learnt", so the attacker's loss
is low and the base weights receive little gradient towards harm; evaluation then runs without
the adapter. This is only a defence when the defender controls the fine-tuning (the
fine-tuning-API threat model), which the pipeline provides through the ``during_attack`` hook:

- defend: base weights frozen (restored after), adapter A [r, in], B [out, r] on every target
  Linear trained with the next-token loss on (prompt, harmful answer) of the pairs; the tensors are
  written to ``ctx.workdir/security_vector.safetensors`` (never pickle) and the defence returns
  None, so the stored "defended" model is the base model, as in the paper's pre-attack row;
- attack: ``during_attack`` loads the file and keeps the adapter active (frozen) for the whole
  attack call; on exit every hook is removed, so the saved and evaluated attacked model is the
  attacker's weights alone.

The adapter is implemented as forward hooks adding ``dropout(x) @ A^T @ B^T * alpha / r`` to each
target Linear's output, not with peft: a hook on the original Linear keeps firing when a LoRA
attack wraps the model with peft (the Linear becomes its ``base_layer``), it adds no parameters
to the model (nothing extra is trained, saved or counted), and it composes with full fine-tuning
too. Dropout follows the Linear's train/eval mode, as peft's LoRA dropout does. The adapter is kept
in float32 whatever the model's dtype.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from harness.api import (
    HarnessError,
    LoadedModel,
    PairSFTSettings,
    StageContext,
    Trained,
    cpu_pair_sizes,
    defences,
    fine_tune,
    forward_hooks,
    pair_side,
    unwrap,
)

VECTOR_FILE = "security_vector.safetensors"
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class SecurityVectorParams(PairSFTSettings):
    lr: float = Field(1e-3, gt=0, description="adapter learning rate (paper: 1e-3)")
    rank: int = Field(8, ge=1, description="adapter rank r (paper: 8)")
    alpha: float = Field(32, gt=0, description="adapter scaling alpha; the update is scaled by alpha / r (paper: 32)")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the adapter's input in train mode (paper: 0.1)")
    targets: list[str] = Field(
        list(DEFAULT_TARGETS), min_length=1, description="Linear module names that get the adapter"
    )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# --- the adapter as hooks -------------------------------------------------------------------------


def _target_linear(model: torch.nn.Module, name: str) -> torch.nn.Linear:
    """The Linear named ``name`` in the unwrapped model; under peft, the LoRA layer's ``base_layer``."""
    try:
        module = unwrap(model).get_submodule(name)
    except AttributeError:
        raise HarnessError(f"Security vector names module {name!r}, which this model does not have.") from None
    module = getattr(module, "base_layer", module)
    if not isinstance(module, torch.nn.Linear):
        raise HarnessError(f"Security vector target {name!r} is a {type(module).__name__}, not a Linear layer.")
    return module


def _adapter_hook(a: torch.Tensor, b: torch.Tensor, scale: float, dropout: float) -> Any:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = F.dropout(args[0].to(a.dtype), dropout, training=module.training)
        return output + (F.linear(F.linear(x, a), b) * scale).to(output.dtype)

    return hook


def _split(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    modules = sorted({key.rsplit(".", 1)[0] for key in tensors})
    try:
        return {name: (tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]) for name in modules}
    except KeyError as exc:
        raise HarnessError(f"Security vector is missing tensor {exc.args[0]!r}.") from None


@contextmanager
def security_vector_active(
    model: torch.nn.Module, tensors: dict[str, torch.Tensor], scale: float, dropout: float
) -> Iterator[None]:
    """Within the block, every ``{name}.lora_A`` / ``{name}.lora_B`` pair adds its low-rank update to
    the Linear ``name``; on exit (also on error) the hooks are gone and the model is as before.
    Whether the tensors train is up to their ``requires_grad``; this changes no flag of the model."""
    hooks = []
    for name, (a, b) in _split(tensors).items():
        linear = _target_linear(model, name)
        if a.shape[1] != linear.in_features or b.shape[0] != linear.out_features or a.shape[0] != b.shape[1]:
            raise HarnessError(
                f"Security vector for {name!r} has shapes A {tuple(a.shape)}, B {tuple(b.shape)}, which do not "
                f"fit a Linear({linear.in_features} -> {linear.out_features}): trained for another model?"
            )
        hooks.append((linear, _adapter_hook(a, b, scale, dropout)))
    with forward_hooks(hooks):
        yield


def new_vector(model: torch.nn.Module, params: SecurityVectorParams, seed: int) -> dict[str, torch.Tensor]:
    """Trainable float32 adapter tensors, initialised as LoRA is: A uniform(+-1/sqrt(in)), B zero
    (so the adapter starts as the identity change), drawn on the CPU so the seed fixes them anywhere."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in unwrap(model).named_modules():
        if name.rsplit(".", 1)[-1] not in params.targets or not isinstance(module, torch.nn.Linear):
            continue
        bound = 1.0 / math.sqrt(module.in_features)
        a = torch.empty(params.rank, module.in_features).uniform_(-bound, bound, generator=generator)
        tensors[f"{name}.lora_A"] = a.to(device).requires_grad_()
        tensors[f"{name}.lora_B"] = torch.zeros(module.out_features, params.rank, device=device).requires_grad_()
    if not tensors:
        raise HarnessError(f"No Linear module of the model is named any of {params.targets} (defence.targets).")
    return tensors


@contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def load_vector(path: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The stored adapter (safetensors only), frozen, on ``device``."""
    if not path.is_file():
        raise HarnessError(
            f"Security vectors: {path} is missing. The defend stage writes it; clear that stage from the cache "
            "and run again."
        )
    return {k: v.requires_grad_(False) for k, v in load_file(path, device=str(device)).items()}


def stored_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


# --- the recipe -----------------------------------------------------------------------------------


@contextmanager
def during_attack(model: LoadedModel, params: SecurityVectorParams, artefacts: Path) -> Iterator[None]:
    """Pipeline hook around the attack: the stored adapter is active and frozen inside, gone after."""
    tensors = load_vector(Path(artefacts) / VECTOR_FILE, model.device)
    with security_vector_active(model.model, tensors, params.scale, params.dropout):
        yield


@defences.register("security-vectors", params=SecurityVectorParams, during_attack=during_attack,
                   profiles=cpu_pair_sizes(lr=1e-3),
                   description="Security Vectors: a frozen adapter fitted to harmful data is active during the "
                               "attack and off for evaluation (fine-tuning-API threat model)")
def security_vectors(model: LoadedModel, params: SecurityVectorParams, ctx: StageContext) -> Trained:
    """Fit the adapter to (prompt, harmful answer) with the base frozen; save it; base weights unchanged."""
    tensors = new_vector(model.model, params, ctx.seed)
    records = pair_side(ctx, params, "harmful")
    with _frozen(model.model), security_vector_active(model.model, tensors, params.scale, params.dropout):
        report = fine_tune(model.model, model.tokenizer, records, params, ctx, "security-vectors",
                           parameters=list(tensors.values()))
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "harness-security-vector", "rank": str(params.rank), "alpha": str(params.alpha),
                "dropout": str(params.dropout), "targets": ",".join(params.targets)}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(ctx.workdir / VECTOR_FILE),
              metadata=metadata)
    # Base weights unchanged (model None): the pre-attack evaluation is of the base model, as in the paper.
    return Trained(None, {"security_vector_training": {**report.summary(), "pairs": len(records),
                                                       "tensors": len(tensors)}})
