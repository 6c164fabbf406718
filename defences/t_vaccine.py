"""T-Vaccine (Liu, Lin, Huang, Mo, Mu, Shen 2024, "Targeted Vaccine: Safety Alignment for Large Language
Models against Harmful Fine-Tuning via Layer-wise Perturbation", arXiv:2410.09760).

Vaccine (defences/vaccine.py) perturbs the attention outputs of every layer; T-Vaccine perturbs only
the safety-critical layers and trains only those, which its paper finds both safer and cheaper:

1. every ``probability_steps`` (K) optimizer steps: one batch of ``harmful_batch_size`` harmful examples
   ((harmful prompt, harmful answer), cycled through a pool of ``harmful_samples``) is back-propagated;
   layer l's harmful gradient norm n_l is the L2 norm of the harmful loss's gradient w.r.t. layer l's
   attention output (its "hidden embedding", where the perturbation goes), and its sampling
   probability is p_l = n_l / sum_j n_j;
2. every ``resample_steps`` (J) optimizer steps: ``num_layers`` (gamma) distinct layers drawn with
   probabilities p (without replacement, seeded);
3. every step, Vaccine's perturbation-aware alignment restricted to the drawn layers: pass 1 gives the
   gradients g_l of the alignment loss (SFT on (harmful prompt, refusal)) w.r.t. the drawn layers'
   attention outputs; eps_l = rho * g_l / ||g|| with ||g|| the L2 norm over the drawn layers only;
   pass 2 adds eps_l to those outputs and is back-propagated. Only the drawn layers' attention blocks
   are trained in that step: every other weight (other layers, every MLP, embeddings, final norm, head)
   is frozen for the step, so it gets no gradient and the optimizer leaves it unchanged.

Defaults are the released code's (its alignment script and trainer): gamma = 8 layers (Llama-2-7B has
32), J = 20, K = 200, a pool of 200 harmful samples measured one example at a time, rho = 3 (its README's
example; the paper sweeps rho). "Layer" there means a decoder layer's attention module, for the norms,
the perturbation and what is trained; so here. Deviations, named: like Vaccine here, the attention
blocks' full weights are trained (the paper trains LoRA adapters on them, lr 1e-3, 20 epochs) with
RepNoise's optimisation settings (PAPER.md §4); the harmful pool is the harmful side of the same pairs
(the paper: BeaverTails harmful samples), cycled in order; the released code's extra activation of layer
i-1 for models deeper than 26 layers (tied to its patched model code) is not reproduced; the norm of
the perturbation is floored at the smallest normal float instead of adding 1e-7. The layer draw uses its
own seeded generator, so the run's other randomness is unchanged by it. Refuses gradient checkpointing
for the reason Vaccine does.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from pydantic import Field

from harness.api import (
    HarnessError,
    LoadedModel,
    PairSFTSettings,
    StageContext,
    Trained,
    attention_modules,
    attention_output_grads,
    causal_lm_loss,
    collate_sft,
    cpu_pair_sizes,
    decoder_parts,
    defences,
    encode_sft,
    fine_tune,
    forward_hooks,
    main_output,
    pair_side,
    unwrap,
)


class TVaccineParams(PairSFTSettings):
    rho: float = Field(3.0, gt=0, description="L2 norm of the perturbation over the drawn layers' attention "
                                              "outputs (released script's example: 3)")
    num_layers: int = Field(8, ge=1, description="gamma: layers drawn and perturbed/trained at a time (released: 8)")
    resample_steps: int = Field(20, ge=1, description="J: optimizer steps between layer draws (released: 20)")
    probability_steps: int = Field(200, ge=1, description="K: optimizer steps between harmful gradient-norm "
                                                          "measurements (released: 200)")
    harmful_samples: int = Field(200, ge=1, description="harmful pairs the norms are measured on (released: 200)")
    harmful_batch_size: int = Field(1, ge=1, description="harmful examples per measurement (released code: 1)")


# --- the criterion -------------------------------------------------------------------------------


def layer_gradient_norms(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """n_l = ||d CE(batch) / d attention output of layer l||, in float32, for every decoder layer. Uses
    ``torch.autograd.grad`` w.r.t. the activations: no ``.grad`` of the model is touched."""
    _, grads = attention_output_grads(model, lambda m: causal_lm_loss(m, batch), "T-Vaccine")
    return torch.stack([g.float().norm() for g in grads]).detach()


def layer_probabilities(norms: torch.Tensor) -> torch.Tensor:
    """p_l = n_l / sum n (uniform if every norm is zero)."""
    norms = norms.double()
    total = norms.sum()
    return norms / total if total > 0 else torch.full_like(norms, 1.0 / len(norms))


def draw_layers(probabilities: torch.Tensor, count: int, generator: torch.Generator) -> list[int]:
    """``count`` distinct layer indices drawn with ``probabilities`` (without replacement), sorted. Layers of
    probability 0 are taken only when fewer than ``count`` have a positive one (then uniformly among them)."""
    positive = [i for i, p in enumerate(probabilities.tolist()) if p > 0]
    if len(positive) >= count:
        return sorted(torch.multinomial(probabilities.float(), count, replacement=False, generator=generator).tolist())
    zero = [i for i in range(len(probabilities)) if i not in positive]
    fill = torch.randperm(len(zero), generator=generator)[: count - len(positive)].tolist()
    return sorted(positive + [zero[i] for i in fill])


# --- the perturbed alignment loss ----------------------------------------------------------------


@contextmanager
def only_trainable(model: torch.nn.Module, keep: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Within the block, only the weights of ``keep`` that were trainable still are; flags restored after.
    A graph built inside carries no gradient path to the others, so its backward leaves them at None."""
    kept = {id(p) for module in keep for p in module.parameters()}
    changed = [p for p in model.parameters() if p.requires_grad and id(p) not in kept]
    try:
        for p in changed:
            p.requires_grad_(False)
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)


def targeted_perturbed_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], selected: Sequence[int], *, rho: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pass-2 SFT loss with eps_l = rho * g_l / ||g|| added to the attention outputs of the ``selected``
    layers only, built with every weight but those attention blocks' frozen; terms: ``clean_loss`` and
    ``perturbation_norm``."""
    if getattr(unwrap(model), "is_gradient_checkpointing", False):
        raise HarnessError("T-Vaccine cannot run with gradient checkpointing (the perturbation would be lost).")
    every = attention_modules(model, "T-Vaccine")
    attention = [every[i] for i in selected]
    outputs: list[torch.Tensor | None] = [None] * len(attention)

    def capture(i: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            outputs[i] = main_output(output)

        return hook

    def perturb(i: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            if isinstance(output, tuple):
                return (output[0] + perturbations[i], *output[1:])
            return output + perturbations[i]

        return hook

    with only_trainable(model, attention):
        with forward_hooks((m, capture(i)) for i, m in enumerate(attention)):
            clean = causal_lm_loss(model, batch)
        if any(o is None or not o.requires_grad for o in outputs):
            raise HarnessError("T-Vaccine: a drawn layer's attention output was not reached or carries no gradient.")
        grads = torch.autograd.grad(clean, outputs)
        norm = torch.sqrt(sum(g.float().pow(2).sum() for g in grads))
        scale = rho / norm.clamp_min(torch.finfo(torch.float32).tiny)
        perturbations = [(g.float() * scale).to(g.dtype) for g in grads]
        with forward_hooks((m, perturb(i)) for i, m in enumerate(attention)):
            perturbed = causal_lm_loss(model, batch)
    applied = torch.sqrt(sum(e.float().pow(2).sum() for e in perturbations))
    return perturbed, {"clean_loss": clean.detach(), "perturbation_norm": applied}


class TargetedVaccine:
    """The loss function of the training loop: keeps the step count, the layer probabilities and the draw."""

    def __init__(self, params: TVaccineParams, harmful: list[dict[str, list[int]]], pad_id: int, seed: int) -> None:
        if not harmful:
            raise HarnessError("T-Vaccine: no harmful examples to measure the layers' gradient norms on.")
        self.params = params
        self.harmful = harmful
        self.pad_id = pad_id
        self.next_harmful = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.micro_batches = 0
        self.probabilities: torch.Tensor | None = None
        self.selected: list[int] = []
        self.draws: list[dict[str, Any]] = []  # step, probabilities (when measured) and layers, for the report

    def harmful_batch(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The next ``harmful_batch_size`` examples of the pool, cycled in order."""
        rows = [self.harmful[(self.next_harmful + i) % len(self.harmful)]
                for i in range(self.params.harmful_batch_size)]
        self.next_harmful = (self.next_harmful + len(rows)) % len(self.harmful)
        return {k: v.to(device) for k, v in collate_sft(rows, self.pad_id, self.params.mask_padding).items()}

    def _refresh(self, model: torch.nn.Module, step: int) -> None:
        if step % self.params.probability_steps == 0 or self.probabilities is None:
            batch = self.harmful_batch(next(model.parameters()).device)
            self.probabilities = layer_probabilities(layer_gradient_norms(model, batch))
        if step % self.params.resample_steps == 0 or not self.selected:
            self.selected = draw_layers(self.probabilities, self.params.num_layers, self.generator)
            self.draws.append({"step": step, "layers": self.selected,
                               "probabilities": [round(p, 6) for p in self.probabilities.tolist()]})

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        step, first = divmod(self.micro_batches, self.params.grad_accum)
        self.micro_batches += 1
        if first == 0:
            self._refresh(model, step)
        return targeted_perturbed_loss(model, batch, self.selected, rho=self.params.rho)


# CPU: the shared 8-step pair size; J and K scaled down with the paper's K = 10 J kept roughly (4 draws, 2
# measurements in 8 steps), the harmful pool the 32 pairs' harmful side. gamma = 8 of SmolLM2's 30 layers is
# about the paper's 8 of 32.
CPU = {**cpu_pair_sizes(lr=1e-4)["cpu"], "resample_steps": 2, "probability_steps": 4, "harmful_samples": 32}


@defences.register("t-vaccine", params=TVaccineParams, profiles={"cpu": CPU},
                   description="T-Vaccine: Vaccine's perturbation on, and training of, only the layers drawn by "
                               "their harmful gradient norm")
def t_vaccine(model: LoadedModel, params: TVaccineParams, ctx: StageContext) -> Trained:
    """Train ``model.model`` in place on (prompt, refusal) of the pairs, a few drawn layers at a time."""
    n_layers = len(decoder_parts(model.model).layers)
    if params.num_layers > n_layers:
        raise HarnessError(f"T-Vaccine: defence.num_layers={params.num_layers}, but the model has {n_layers} "
                           f"decoder layers. Set defence.num_layers to at most {n_layers}.")
    tokenizer: Any = model.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    harmful = [encode_sft(tokenizer, r.prompt, r.response, ctx.prompt_format, params.max_length, params.mask_prompt)
               for r in pair_side(ctx, params, "harmful")[: params.harmful_samples]]
    loss = TargetedVaccine(params, harmful, pad_id, ctx.seed)
    records = pair_side(ctx, params, "harmless")
    report = fine_tune(model.model, model.tokenizer, records, params, ctx, "t-vaccine", loss_fn=loss)
    return Trained(model, {"t_vaccine_history": report.history, "t_vaccine_draws": loss.draws,
                           "t_vaccine_training": {**report.summary(), "pairs": len(records),
                                                  "harmful_samples": len(harmful), "rho": params.rho,
                                                  "num_layers": params.num_layers}})
