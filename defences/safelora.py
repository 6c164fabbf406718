"""SafeLoRA (Hsu et al., "Safe LoRA: the Silver Lining of Reducing Safety Risks when Finetuning Large
Language Models", NeurIPS 2024): after a LoRA fine-tune, project each layer's LoRA update onto the
safety-aligned subspace wherever the update has drifted away from it. Training-free and data-free.

For every target Linear i of the model:

- V_i = W_aligned_i - W_unaligned_i, the "alignment matrix" [out, in];
- C_i = V_i V_i^T / ||V_i||_F, the paper's projection (||V||_F, not its square, as in the paper and the
  authors' code: C is a scaled projection; the cosine below does not see the scale);
- the attacker's update Delta W_i = B_i A_i (peft's lora_B [out, r] times lora_A [r, in]; the LoRA
  scaling multiplies both sides and drops out of the cosine);
- if cos(C_i Delta W_i, Delta W_i) (both flattened) <= tau, B_i <- C_i B_i, so Delta W_i <- C_i Delta W_i;
  otherwise the layer is left exactly as the attacker trained it.

Layer selection: ``threshold`` (cos <= tau; the authors' default tau = 0.5, "<=" as their code) or
``number`` (the ``num_layers`` lowest cosines, ties included, as the code's default mode with 10).
C B is computed as V (V^T B) / ||V||_F, so no [out, out] matrix is formed.

What a user must provide: ``unaligned_model``, the unaligned twin of the model under attack (e.g.
Llama-2-7b for Llama-2-7b-chat): a local directory with config.json and safetensors weights, or a hub
id; ``aligned_model`` defaults to the run's model itself (the model that is attacked). Both must have
the run model's architecture. The offline world has no unaligned twin of the embedded
SmolLM2-135M-Instruct (its base, SmolLM2-135M, is not bundled), so here SafeLoRA runs only on a pair the
user supplies; the tests build a tiny one (a tiny random Llama and a perturbed copy).

How it hooks in: SafeLoRA acts on the attacker's adapter, so it is a ``during_attack`` defence (the
fine-tuning-API threat model: the provider post-processes the adapter it trained), as security vectors:

- defend: loads the unaligned (and, if named, the aligned) model, stores V_i of every target Linear in
  the stage's work dir as safetensors (never pickle) and returns None: the weights before the attack
  are the run's model, unchanged;
- attack: on the attack's first forward, a pre-hook checks that the model carries LoRA layers and that
  each has a V_i. A full-parameter attack is refused there, before its first optimizer step: the
  projection is defined for a low-rank LoRA update only. On a clean exit every LoRA layer is projected
  (or left) by the rule above, in place, so the stored attacked adapter is the projected one. An
  adapter the attack merged (``lora`` with merge=True) is handled too: the change scale (C B - B) A is
  added to the merged weight.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from safetensors.torch import load_file, save_file

from harness.api import (
    HarnessError,
    LoadedModel,
    Params,
    StageContext,
    Trained,
    decoder_parts,
    defences,
    load_model,
    model_fingerprint,
    unwrap,
)

log = logging.getLogger(__name__)

SUBSPACE_FILE = "safelora_subspace.safetensors"
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _check_ref(ref: str | None) -> str | None:
    """A path-like reference must be an existing directory (hub ids are checked when loaded)."""
    if ref is None:
        return ref
    if not ref.strip():
        raise ValueError("give a model directory or hub id, not an empty string")
    path = Path(ref).expanduser()
    path_like = ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or path.exists()
    if path_like and not (path / "config.json").is_file():
        raise ValueError(f"{ref!r} is not a model directory with config.json and safetensors weights")
    return ref


class SafeLoRAParams(Params):
    """The authors' defaults (released code: threshold 0.5, 10 layers in 'number' mode)."""

    unaligned_model: str = Field(
        description="REQUIRED: the unaligned twin of the run's model (local directory or hub id), e.g. the "
                    "base model of a chat model"
    )
    aligned_model: str | None = Field(None, description="the aligned model; None: the run's model (the one attacked)")
    select: Literal["threshold", "number"] = Field(
        "threshold", description="project layers with cos <= threshold, or the num_layers lowest cosines"
    )
    threshold: float = Field(0.5, ge=-1, le=1, description="tau: project where cos(C dW, dW) <= tau (paper code: 0.5)")
    num_layers: int = Field(10, ge=1, description="layers projected in 'number' mode (paper code: 10)")
    targets: list[str] = Field(list(DEFAULT_TARGETS), min_length=1,
                               description="Linear module names with an alignment matrix (cover the attack's)")

    @field_validator("unaligned_model", "aligned_model")
    @classmethod
    def _model_ref(cls, value: str | None) -> str | None:
        return _check_ref(value)


# --- the alignment matrices ------------------------------------------------------------------------


def _target_linears(model: torch.nn.Module, targets: list[str]) -> dict[str, torch.nn.Linear]:
    return {name: module for name, module in unwrap(model).named_modules()
            if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear)}


def alignment_matrices(
    aligned: torch.nn.Module, unaligned: torch.nn.Module, targets: list[str]
) -> dict[str, torch.Tensor]:
    """V = W_aligned - W_unaligned (float32, CPU) for every target Linear, by module name."""
    ours, theirs = _target_linears(aligned, targets), _target_linears(unaligned, targets)
    if not ours:
        raise HarnessError(f"SafeLoRA: no Linear module of the model is named any of {targets} (defence.targets).")
    vectors = {}
    for name, linear in ours.items():
        other = theirs.get(name)
        if other is None or other.weight.shape != linear.weight.shape:
            found = "missing" if other is None else f"of shape {tuple(other.weight.shape)}"
            raise HarnessError(f"SafeLoRA: the unaligned model's {name} is {found}, the aligned one's is "
                               f"{tuple(linear.weight.shape)}: the two models must share one architecture.")
        v = linear.weight.detach().float().cpu() - other.weight.detach().float().cpu()
        if not torch.any(v):
            raise HarnessError(f"SafeLoRA: aligned and unaligned weights of {name} are identical, so there is no "
                               "alignment direction. Is defence.unaligned_model really the unaligned twin?")
        vectors[name] = v.contiguous()
    return vectors


# --- the projection --------------------------------------------------------------------------------


def project_b(v: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """C B with C = V V^T / ||V||_F, computed as V (V^T B) / ||V||_F."""
    return v @ (v.t() @ b) / torch.linalg.matrix_norm(v)


def update_cosine(v: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """cos(C B A, B A) of the flattened matrices (0 for a zero update)."""
    delta = (b @ a).flatten()
    projected = (project_b(v, b) @ a).flatten()
    return float(F.cosine_similarity(projected, delta, dim=0))


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """peft LoRA layers of the model, by the name of the Linear they wrap."""
    return {name: module for name, module in unwrap(model).named_modules()
            if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) and len(module.lora_A)}


def project_lora(
    layers: dict[str, torch.nn.Module], subspace: dict[str, torch.Tensor], params: SafeLoRAParams
) -> dict[str, Any]:
    """Apply the projection rule to every adapter of every layer in place; returns what it did."""
    cosines: dict[tuple[str, str], float] = {}
    for name, layer in layers.items():
        v = subspace[name].to(layer.lora_B[next(iter(layer.lora_B))].weight.device)
        for adapter in layer.lora_A:
            cosines[name, adapter] = update_cosine(v, _weight(layer.lora_B[adapter]), _weight(layer.lora_A[adapter]))
    finite = [c for c in cosines.values() if math.isfinite(c)]
    if params.select == "number":
        cut = sorted(finite)[min(params.num_layers, len(finite)) - 1] if finite else -math.inf
    else:
        cut = params.threshold
    projected = []
    with torch.no_grad():
        for (name, adapter), cos in cosines.items():
            if not cos <= cut:
                continue
            layer = layers[name]
            lora_b = layer.lora_B[adapter].weight
            b, a = _weight(layer.lora_B[adapter]), _weight(layer.lora_A[adapter])
            new_b = project_b(subspace[name].to(b.device), b)
            if adapter in getattr(layer, "merged_adapters", []):  # already folded into the base weight
                base = layer.get_base_layer().weight
                base.add_((layer.scaling[adapter] * (new_b - b) @ a).to(base.dtype))
            lora_b.copy_(new_b.to(lora_b.dtype))
            projected.append(f"{name}[{adapter}]")
    report = {"select": params.select, "cut": cut, "layers": len(cosines), "projected": len(projected),
              "cosines": {f"{n}[{a}]": round(c, 6) for (n, a), c in cosines.items()}}
    log.info("SafeLoRA projected %d of %d LoRA layers (cos <= %.4g).", len(projected), len(cosines), cut)
    return report


def _weight(module: torch.nn.Module) -> torch.Tensor:
    return module.weight.detach().float()


# --- the recipe ------------------------------------------------------------------------------------


def load_subspace(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise HarnessError(f"SafeLoRA: {path} is missing. The defend stage writes it; clear that stage from the "
                           "cache and run again.")
    return load_file(path, device="cpu")


@contextmanager
def during_attack(model: LoadedModel, params: SafeLoRAParams, artefacts: Path) -> Iterator[None]:
    """Pipeline hook around the attack: check for LoRA at its first forward; project on a clean exit."""
    subspace = load_subspace(Path(artefacts) / SUBSPACE_FILE)
    seen: dict[str, torch.nn.Module] = {}

    def check_first_forward(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        if seen:
            return
        layers = lora_layers(model.model)
        if not layers:
            raise HarnessError(
                "SafeLoRA projects a LoRA update, but this attack trains the model's own weights (a full-parameter "
                "attack). Use a LoRA attack (e.g. --attack lora) with SafeLoRA, or another defence."
            )
        missing = sorted(set(layers) - set(subspace))
        if missing:
            raise HarnessError(f"SafeLoRA has no alignment matrix for the attack's LoRA layers {missing[:3]}...: "
                               "add their module names to defence.targets.")
        seen.update(layers)

    handle = decoder_parts(model.model).decoder.register_forward_pre_hook(check_first_forward, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
    layers = seen or lora_layers(model.model)
    if not layers:
        raise HarnessError("SafeLoRA: the attack left no LoRA layers to project (and ran no forward pass).")
    project_lora(layers, subspace, params)


def _depends_on(params: SafeLoRAParams) -> dict[str, str | None]:
    """The models' contents, not just their paths, go into the stage key."""
    return {"unaligned": model_fingerprint(params.unaligned_model),
            "aligned": model_fingerprint(params.aligned_model) if params.aligned_model else None}


# Training-free: the same size on every profile (an empty cpu size says so to the sweep's size check).
@defences.register("safelora", params=SafeLoRAParams, during_attack=during_attack, depends_on=_depends_on,
                   profiles={"cpu": {}},
                   description="SafeLoRA: project LoRA updates onto the aligned-minus-unaligned subspace where "
                               "their cosine is at most tau (needs the model's unaligned twin)")
def safelora(model: LoadedModel, params: SafeLoRAParams, ctx: StageContext) -> Trained:
    """Store V = W_aligned - W_unaligned per target Linear; the run's weights are unchanged."""
    unaligned = load_model(params.unaligned_model, device="cpu", dtype="float32")
    aligned = load_model(params.aligned_model, device="cpu", dtype="float32").model if params.aligned_model \
        else model.model
    subspace = alignment_matrices(aligned, unaligned.model, params.targets)
    del unaligned
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    save_file(subspace, str(ctx.workdir / SUBSPACE_FILE),
              metadata={"format": "harness-safelora-subspace", "targets": ",".join(params.targets)})
    return Trained(None, {"safelora_subspace": {"modules": len(subspace),
                                                "elements": sum(v.numel() for v in subspace.values())}})
