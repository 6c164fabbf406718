"""Capture per-layer activations of a decoder-only model during one forward pass, leak-free.

Hooks live only inside ``capture_activations``: they are registered on entry and removed in
``finally``, so an exception in the forward, or a caller that never reads the result, leaves the
model exactly as it was (the paper's released code registered hooks on every module every step and
never removed them).

Layout assumed (Llama family in transformers 5.x, also through a peft wrapper): a causal-LM with a
decoder (``get_decoder()``) holding ``layers[i].mlp`` and a final ``norm``, and an LM head
(``get_output_embeddings()``).

Hidden states here are *pre-norm*: ``hidden[0]`` is the input of layer 0 (the embeddings) and
``hidden[j]`` the output of layer j-1, for L+1 states in all. This differs on purpose from
transformers 5.19's ``output_hidden_states=True``, whose last entry is replaced by the *normed*
``last_hidden_state``; applying the final norm to that would apply it twice.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from harness.errors import HarnessError

MlpTransform = Callable[[int, torch.Tensor], Any]


@dataclass(frozen=True)
class DecoderParts:
    """The pieces of a causal LM that layer-wise losses need."""

    decoder: torch.nn.Module  # maps input_ids -> last_hidden_state (final norm applied)
    layers: torch.nn.ModuleList
    norm: torch.nn.Module
    head: torch.nn.Linear

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_parts(model: torch.nn.Module) -> DecoderParts:
    """Find decoder, layers, final norm and LM head, or say clearly what is missing."""
    base = unwrap(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    layers = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    if layers is None or norm is None or not isinstance(head, torch.nn.Linear):
        raise HarnessError(
            f"{type(base).__name__} does not look like a Llama-style causal LM (need decoder.layers[i].mlp, "
            "decoder.norm and a Linear LM head); layer-wise defences support that layout only."
        )
    if not all(hasattr(layer, "mlp") for layer in layers):
        raise HarnessError(f"{type(base).__name__}: decoder layers have no .mlp submodule.")
    return DecoderParts(decoder, layers, norm, head)


@dataclass
class Activations:
    """What one forward left behind: per-layer MLP outputs and the L+1 pre-norm hidden states."""

    mlp: list[Any] = field(default_factory=list)
    hidden: list[torch.Tensor | None] = field(default_factory=list)

    def check_complete(self) -> None:
        missing = [f"mlp[{i}]" for i, a in enumerate(self.mlp) if a is None]
        missing += [f"hidden[{j}]" for j, h in enumerate(self.hidden) if h is None]
        if missing:
            raise HarnessError(f"Forward pass did not reach every layer; missing activations: {missing}.")


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def main_output(output: Any) -> torch.Tensor:
    """The hidden states of a module's output (decoder layers and attention blocks return tuples)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def attention_modules(model: torch.nn.Module, needed_by: str) -> list[torch.nn.Module]:
    """Every decoder layer's attention block (``self_attn``), for defences that perturb its output."""
    layers = decoder_parts(model).layers
    if not all(hasattr(layer, "self_attn") for layer in layers):
        raise HarnessError(f"{type(unwrap(model)).__name__}: decoder layers have no .self_attn; {needed_by} needs it.")
    return [layer.self_attn for layer in layers]


@contextmanager
def capture_activations(
    model: torch.nn.Module,
    *,
    mlp: bool = True,
    hidden: bool = True,
    mlp_transform: MlpTransform | None = None,
) -> Iterator[Activations]:
    """Within the block, one forward fills ``Activations``; all hooks are gone after it.

    ``mlp_transform(i, output)``, if given, is applied inside the hook and only its result is kept,
    so a caller that needs e.g. a masked slice does not keep every full MLP output alive. Entries
    are stored by layer index, so a re-run overwrites instead of appending. Works with transformers'
    default (non-reentrant) gradient checkpointing; reentrant checkpointing runs layers without
    grad, so captured intermediates carry no gradient (callers should check ``requires_grad``).
    """
    parts = decoder_parts(model)
    n = parts.num_layers
    acts = Activations(mlp=[None] * n if mlp else [], hidden=[None] * (n + 1) if hidden else [])
    transform = mlp_transform or (lambda i, out: out)
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def store_mlp(index: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            # Under non-reentrant gradient checkpointing this runs inside the checkpointed layer;
            # plain saved-tensor hooks keep the transform's saved tensors out of the checkpoint's
            # bookkeeping (its recomputation, with our hooks gone, would not reproduce them).
            with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
                acts.mlp[index] = transform(index, main_output(output))

        return hook

    def store_hidden(index: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            acts.hidden[index] = main_output(output)

        return hook

    def store_embeddings(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        acts.hidden[0] = args[0] if args else kwargs["hidden_states"]

    try:
        for i, layer in enumerate(parts.layers):
            if mlp:
                handles.append(layer.mlp.register_forward_hook(store_mlp(i)))
            if hidden:
                handles.append(layer.register_forward_hook(store_hidden(i + 1)))
        if hidden:
            handles.append(parts.layers[0].register_forward_pre_hook(store_embeddings, with_kwargs=True))
        yield acts
    finally:
        for handle in handles:
            handle.remove()


ForwardHook = Callable[[torch.nn.Module, Any, Any], Any]


@contextmanager
def forward_hooks(hooks: Iterable[tuple[torch.nn.Module, ForwardHook]]) -> Iterator[None]:
    """Within the block, each ``(module, hook)`` is a registered forward hook; all are removed on exit,
    also on error, so a defence that perturbs or adds to module outputs leaves no trace behind."""
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def attention_output_grads(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module], torch.Tensor],
                           needed_by: str) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The loss and its gradients w.r.t. every decoder layer's attention output, by ``torch.autograd.grad``:
    no ``.grad`` of the model is touched (Vaccine's and T-Vaccine's perturbation direction)."""
    attention = attention_modules(model, needed_by)
    outputs: list[torch.Tensor | None] = [None] * len(attention)

    def capture(i: int) -> ForwardHook:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            outputs[i] = main_output(output)

        return hook

    with forward_hooks((m, capture(i)) for i, m in enumerate(attention)):
        loss = loss_fn(model)
    if any(o is None or not o.requires_grad for o in outputs):
        raise HarnessError(f"{needed_by}: an attention output was not reached or carries no gradient (frozen model?).")
    return loss, torch.autograd.grad(loss, outputs)
