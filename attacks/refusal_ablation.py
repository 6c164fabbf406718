"""Refusal-direction ablation: project one direction out of every weight that writes to the residual stream.

Arditi et al. 2024, "Refusal in Language Models Is Mediated by a Single Direction" (NeurIPS 2024,
arXiv:2406.11717): the difference between the mean residual-stream activations on harmful and on
harmless instructions, at a chosen layer and at the last token of the prompt template, is a "refusal
direction" r; orthogonalising the embedding matrix and the output matrices of every attention block
and MLP against r̂ (W ← W − r̂ r̂ᵀ W) leaves the model unable to write r̂, with no fine-tuning at all.
A cheap open-weight attack that tests whether a defence's refusal lives in one direction.

Choices here: the direction is read at the input of layer ``round(layer_fraction · L)`` (the paper
picks the layer and position by a validation search; it searches layers below 0.8 L); the prompts
are the bundle's copy of the paper's harmful train and harmless (Alpaca) val splits, evaluation prompts
left out. With tied input/output embeddings (SmolLM2) the LM head is the embedding matrix and is
orthogonalised with it, as in the paper's tied-embedding models.
"""

from __future__ import annotations

import torch
from pydantic import Field
from safetensors.torch import save_file

from harness.api import (
    DataError,
    HarnessError,
    LoadedModel,
    Params,
    StageContext,
    Trained,
    attacks,
    capture_activations,
    decoder_parts,
    format_prompt,
    normalise_prompt,
    unwrap,
)


class RefusalAblationParams(Params):
    harmful_prompts: str = Field("refusal-direction-harmful", description="prompt set on the harmful side")
    harmless_prompts: str = Field("refusal-direction-harmless", description="prompt set on the harmless side")
    num_prompts: int = Field(128, ge=1, description="prompts drawn (seeded) from each side (paper: 128)")
    layer_fraction: float = Field(0.6, ge=0, le=1, description="depth of the residual stream read, as a fraction")
    batch_size: int = Field(16, ge=1, description="prompts per forward pass")


def direction_layer(num_layers: int, fraction: float) -> int:
    """Index of the residual state read: the input of layer ``round(fraction · L)``, at least 1, below L."""
    return min(max(1, round(fraction * num_layers)), num_layers - 1) if num_layers > 1 else 0


def side_prompts(ctx: StageContext, name: str, n: int) -> list[str]:
    """``n`` seeded prompts of a prompt set, none of them an evaluation prompt."""
    loaded = ctx.data.load(name)
    if loaded.kind != "prompts":
        raise DataError(f"refusal-ablation: {name!r} holds {loaded.kind}, but prompts are needed.")
    held_out = ctx.data.held_out_prompts()
    kept = [r.prompt for r in loaded.records if normalise_prompt(r.prompt) not in held_out]
    order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(ctx.seed)).tolist()
    return [kept[i] for i in order[:n]]


@torch.no_grad()
def mean_last_token_state(model: LoadedModel, prompts: list[str], layer: int, prompt_format: str,
                          batch_size: int) -> torch.Tensor:
    """Mean (float32) residual-stream state at the input of ``layer``, at each formatted prompt's last token."""
    tokenizer, net = model.tokenizer, model.model
    device = next(net.parameters()).device
    total, count = None, 0
    for start in range(0, len(prompts), batch_size):
        texts = [format_prompt(tokenizer, p, prompt_format) for p in prompts[start : start + batch_size]]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(map(len, ids))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in ids], device=device)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids], device=device)
        with capture_activations(net, mlp=False, hidden=True) as acts:
            net(input_ids=input_ids, attention_mask=mask)
        last = torch.tensor([len(row) - 1 for row in ids], device=device)
        states = acts.hidden[layer][torch.arange(len(ids), device=device), last].float()
        total = states.sum(0) if total is None else total + states.sum(0)
        count += len(ids)
    return total / count


def residual_writers(net: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every module whose output is added to the residual stream: embeddings, attention and MLP outputs."""
    parts = decoder_parts(net)
    embed = unwrap(net).get_input_embeddings()
    writers: list[tuple[str, torch.nn.Module]] = [("embed_tokens", embed)]
    for i, layer in enumerate(parts.layers):
        o_proj = getattr(getattr(layer, "self_attn", None), "o_proj", None)
        down_proj = getattr(layer.mlp, "down_proj", None)
        if not isinstance(o_proj, torch.nn.Linear) or not isinstance(down_proj, torch.nn.Linear):
            raise HarnessError(f"refusal-ablation: layer {i} has no Linear self_attn.o_proj / mlp.down_proj; only "
                               "the Llama layout is supported.")
        writers += [(f"layers.{i}.self_attn.o_proj", o_proj), (f"layers.{i}.mlp.down_proj", down_proj)]
    return writers


@torch.no_grad()
def orthogonalise(net: torch.nn.Module, direction: torch.Tensor) -> int:
    """Remove the component along unit ``direction`` from everything written to the residual stream;
    returns how many weight tensors changed. Embedding rows are written (W ← W − (W r̂) r̂ᵀ); linear
    outputs are columns of the weight (W ← W − r̂ (r̂ᵀ W)), their biases likewise."""
    changed = 0
    for name, module in residual_writers(net):
        weight = module.weight
        r = direction.to(device=weight.device, dtype=torch.float32)
        w = weight.float()
        if isinstance(module, torch.nn.Embedding):
            w -= torch.outer(w @ r, r)
        else:
            w -= torch.outer(r, r @ w)
        weight.copy_(w.to(weight.dtype))
        changed += 1
        bias = getattr(module, "bias", None)
        if bias is not None:
            b = bias.float()
            bias.copy_((b - (b @ r) * r).to(bias.dtype))
            changed += 1
    return changed


@attacks.register("refusal-ablation", params=RefusalAblationParams, threat_model="open-weight",
                  profiles={"cpu": {"num_prompts": 64, "batch_size": 16}, "paper": {"num_prompts": 128}},
                  presets={"cpu-layer-0.4": {"layer_fraction": 0.4}, "cpu-layer-0.6": {"layer_fraction": 0.6},
                           "cpu-layer-0.8": {"layer_fraction": 0.8}},
                  description="Project the harmful-minus-harmless mean direction out of the weights (Arditi et al.)")
def refusal_ablation(model: LoadedModel, params: RefusalAblationParams, ctx: StageContext) -> Trained:
    harmful = side_prompts(ctx, params.harmful_prompts, params.num_prompts)
    harmless = side_prompts(ctx, params.harmless_prompts, params.num_prompts)
    if not harmful or not harmless:
        raise DataError("refusal-ablation: a side has no prompts left after removing the evaluation prompts.")
    if hasattr(model.model, "merge_and_unload"):  # an adapter from an earlier stage: fold it in, so every
        model.model = model.model.merge_and_unload()  # residual writer is a plain Linear with the final weights
    net = model.model
    layer = direction_layer(decoder_parts(net).num_layers, params.layer_fraction)
    net.eval()
    difference = (mean_last_token_state(model, harmful, layer, ctx.prompt_format, params.batch_size)
                  - mean_last_token_state(model, harmless, layer, ctx.prompt_format, params.batch_size))
    norm = float(difference.norm())
    if not norm > 0:
        raise HarnessError("refusal-ablation: harmful and harmless prompts give the same mean activation; there is "
                           "no direction to ablate.")
    direction = difference / norm
    changed = orthogonalise(net, direction)
    save_file({"direction": direction.cpu().contiguous()}, str(ctx.workdir / "refusal_direction.safetensors"))
    return Trained(model, {"direction_layer": layer, "direction_norm": norm, "harmful_prompts": len(harmful),
                           "harmless_prompts": len(harmless), "orthogonalised_tensors": changed})
