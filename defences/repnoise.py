"""RepNoise: Representation Noising (Rosati et al., NeurIPS 2024), PAPER.md §2-4.

For a batch of B (prompt, harmful answer, harmless answer) pairs through a model with L layers:

    loss = S + beta * N - alpha * log(G)

- S, retain: masked next-token CE on the harmless side;
- N, noise: mean over layers of MMD(masked harmful MLP output of layer i, masked Gaussian noise);
- G, ascent: (c_final + sum_{j=0..L} c_j) / (L + 1) + 1 (L + 2 terms over L + 1, as in the paper),
  with c_final the masked CE of the final logits on the harmful side and c_j that of
  lm_head(final_norm(h_j)) for the L+1 pre-norm hidden states (embeddings, then each layer's output).

The mask is ``harmful_ids != harmless_ids`` (see ``harness.train.losses.position_mask``). One forward pass
runs over harmful and harmless sequences stacked along the batch; the LM head is applied only at
masked target positions, in chunks with gradients formed on the fly (``harness.train.losses.head_ce_sums``),
so no [B, T, V] logits exist. final_norm(h_L) *is* the final hidden state, so c_L equals c_final:
it is computed once and counted twice.

Released code (issue 17): the authors' code departs from the paper in five places, each a flag here,
off by default (the paper's intent) and all on in the preset ``repnoise@released-code``: targets with
id 0 dropped; logits zeroed by the mask at t while targets follow the mask at t+1 (the first target of
each masked stretch scores log V with no gradient, in S, c_final and every c_j); the last hidden state
final-normed twice; the final-layer ablation's G without the +1; the mask ablation with unmasked noise
and the plain LM loss for S and c_final (per-layer terms still position-masked).

Sharded training (``--nproc``) splits each micro-batch's rows over the ranks: target counts, the noise
MMD (over the gathered rows of every rank, with the same noise draw) and log(G) are whole-batch quantities
through ``harness.api.global_batch``, which leaves them untouched in a single process.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator

import torch
from pydantic import Field, SerializerFunctionWrapHandler, field_validator, model_serializer

from harness.api import (
    ConfigError,
    HarnessError,
    LoadedModel,
    PairDefenceSettings,
    StageContext,
    Targets,
    Trained,
    TrainSettings,
    capture_activations,
    collate_pairs,
    cpu_pair_sizes,
    decoder_parts,
    defences,
    encode_pair,
    global_batch,
    head_ce_sums,
    mmd,
    position_mask,
    shift_targets,
    train,
)

# Every released-code flag on: the authors' code literally (issue 17).
RELEASED_CODE = {"drop_target_id_0": True, "mask_offset": True, "double_final_norm": True,
                 "ascent_without_one": True, "unmasked_as_released": True}


_LAYER_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


class RepNoiseParams(PairDefenceSettings):
    """Paper defaults for Llama-2-7b-chat (PAPER.md §4); other models need a grid search over lr, alpha, beta."""

    lr: float = Field(2e-5, gt=0, description="peak learning rate (paper: 2e-5; 4e-5 already breaks the defence)")
    alpha: float = Field(1.0, ge=0, description="weight of the layer-wise ascent term -log(G)")
    beta: float = Field(0.001, ge=0, description="weight of the noise term N (MMD to Gaussian noise)")
    max_length: int = Field(128, ge=2, description="tokens per side (prompt + answer), truncated")
    retain_mask: bool = Field(
        True, description="S on masked tokens only, as the code does; False: on every real harmless token (Algorithm 1)"
    )
    noise: bool = Field(True, description="ablation: False drops the noise term N")
    ascent: bool = Field(True, description="ablation: False drops the ascent term -log(G)")
    mask: bool = Field(True, description="ablation: False scores every real (non-padding) token of each side")
    layerwise_ascent: bool = Field(True, description="ablation: False uses the final layer only, G = c_final + 1")
    freeze_layers: str | None = Field(None, description="inclusive decoder-layer range kept frozen, e.g. '0-10'")
    # The authors' released code where it departs from the paper (issue 17); all off: the paper's intent.
    # The preset repnoise@released-code turns every one on.
    drop_target_id_0: bool = Field(False, description="released code: CE targets whose token id is 0 are dropped")
    mask_offset: bool = Field(
        False, description="released code: logits zeroed by the mask at t, targets chosen by the mask at t+1: the "
                           "first target of each masked stretch scores log V with no gradient (S, c_final, every c_j)"
    )
    double_final_norm: bool = Field(False, description="released code: c_L norms the already-normed last state again")
    ascent_without_one: bool = Field(
        False, description="released code, with layerwise_ascent=False: G = c_final, without the +1"
    )
    unmasked_as_released: bool = Field(
        False, description="released code, with mask=False: noise unmasked (padding included), S and c_final the "
                           "plain LM loss over all positions, per-layer c_j still position-masked"
    )

    @field_validator("freeze_layers")
    @classmethod
    def _check_layer_range(cls, value: str | None) -> str | None:
        if value is not None:
            parse_layer_range(value)
        return value

    def train_settings(self) -> TrainSettings:
        return TrainSettings.model_validate(self.model_dump(include=set(TrainSettings.model_fields)))

    @model_serializer(mode="wrap")
    def _omit_released_flags_when_off(self, handler: SerializerFunctionWrapHandler) -> Any:
        """The released-code flags, off, are left out of dumps (after TrainSettings' own omissions), so the
        RepNoise stage keys (a hash of the params) made before the flags existed stay valid."""
        inherited = [s.func for s in TrainSettings.__pydantic_decorators__.model_serializers.values()]
        data = inherited[0](self, handler) if inherited else handler(self)
        if isinstance(data, dict):
            for name in RELEASED_CODE:
                if data.get(name) is False:
                    del data[name]
        return data


def parse_layer_range(spec: str) -> range:
    """'3' -> layer 3; '0-10' -> layers 0..10 inclusive."""
    match = _LAYER_RANGE.match(spec)
    if not match:
        raise ValueError(f"freeze_layers must look like '0-10' (inclusive) or '5'; got {spec!r}")
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    if last < first:
        raise ValueError(f"freeze_layers range {spec!r} ends before it starts")
    return range(first, last + 1)


# --- the loss -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossMasks:
    """Boolean [B, T] masks of one batch (target-position convention of harness.train.losses)."""

    noise: torch.Tensor  # harmful positions whose MLP outputs are compared with noise
    retain: torch.Tensor  # S targets (harmless side)
    final: torch.Tensor  # c_final targets (harmful side)
    layers: torch.Tensor  # c_j targets of the layer-wise ascent (harmful side)
    plain_lm: bool = False  # S and c_final are the plain LM loss (released code's mask ablation)


def loss_masks(batch: dict[str, torch.Tensor], params: RepNoiseParams) -> LossMasks:
    """The paper's position mask, or (mask=False) each side's real tokens; retain_mask=False: all real tokens.

    ``unmasked_as_released`` (with mask=False): every position, padding included, for the noise, S and
    c_final, and the position mask for the per-layer terms, as the authors' ablation code does."""
    harmful_real = batch["harmful_attention_mask"].bool()
    harmless_real = batch["harmless_attention_mask"].bool()
    differ = position_mask(batch["harmful_input_ids"], batch["harmless_input_ids"])
    if params.mask:
        return LossMasks(noise=differ, retain=differ if params.retain_mask else harmless_real, final=differ,
                         layers=differ)
    if params.unmasked_as_released:
        everywhere = torch.ones_like(differ)
        return LossMasks(noise=everywhere, retain=everywhere, final=everywhere, layers=differ, plain_lm=True)
    return LossMasks(noise=harmful_real, retain=harmless_real, final=harmful_real, layers=harmful_real)


@dataclass(frozen=True)
class CeTargets:
    """The targets one masked CE term scores through the LM head, and its constant part."""

    scored: Targets  # predicted from the model's rows
    count: int  # targets in the mean: scored + zeroed, over the whole batch (every rank's rows when split)
    zeroed: int  # mask_offset: targets scored from all-zero logits (CE = log V each, no gradient), in these rows


def ce_targets(ids: torch.Tensor, mask: torch.Tensor, params: RepNoiseParams, plain_lm: bool = False) -> CeTargets:
    """Targets of one CE term: ``mask`` at the target position (harness.train.losses), then the released
    code's quirks where asked: id-0 targets dropped; targets whose predicting position is outside the
    mask scored from zeroed logits. ``plain_lm``: the plain LM loss, which has neither quirk."""
    targets = shift_targets(ids, mask)
    if plain_lm or not (params.drop_target_id_0 or params.mask_offset):
        return CeTargets(targets, global_batch.total_count(len(targets)), 0)
    keep = torch.ones_like(targets.ids, dtype=torch.bool)
    if params.drop_target_id_0:
        keep &= targets.ids != 0
    zeroed = 0
    if params.mask_offset:
        from_masked = mask.bool()[targets.batch, targets.position]
        zeroed = int((keep & ~from_masked).sum())
        keep &= from_masked
    scored = targets.select(keep)
    return CeTargets(scored, global_batch.total_count(len(scored) + zeroed), zeroed)


def noise_term(
    activation: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """MMD between one layer's masked harmful activations [B, T, d] and masked N(0, 1) noise. When the rows
    are split over ranks, ``mask`` is already the whole batch's and the activations are gathered here: each
    rank draws the same noise for all rows."""
    activation = global_batch.gather_rows(activation)
    keep = mask[..., None]
    noise = torch.randn(activation.shape, generator=generator, device=activation.device, dtype=torch.float32)
    return mmd(activation * keep.to(activation.dtype), noise * keep)


@global_batch.data_parallel_loss
def repnoise_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    params: RepNoiseParams,
    generator: torch.Generator | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its terms for one batch of pairs (noise drawn from ``generator``, layer 0 first)."""
    harmful_ids, harmless_ids = batch["harmful_input_ids"], batch["harmless_input_ids"]
    b, t = harmful_ids.shape
    masks = loss_masks(batch, params)
    parts = decoder_parts(model)
    use_hidden = params.ascent and params.layerwise_ascent

    # One forward over both sides. The noise MMD of each layer is computed inside its hook, so
    # the full MLP outputs are not kept beyond what autograd needs.
    noise_mask = global_batch.gather_rows(masks.noise) if params.noise else masks.noise  # once, not per layer
    per_layer_noise = partial(_layer_noise, b=b, mask=noise_mask, generator=generator)
    with capture_activations(model, mlp=params.noise, hidden=use_hidden, mlp_transform=per_layer_noise) as acts:
        final = parts.decoder(
            input_ids=torch.cat([harmful_ids, harmless_ids]),
            attention_mask=torch.cat([batch["harmful_attention_mask"], batch["harmless_attention_mask"]]),
            use_cache=False,
        ).last_hidden_state
    acts.check_complete()

    # Every CE term is a weighted sum of per-token CEs through the LM head, and all of them go
    # through it in one chunked pass: S = mean over the retain rows; A = c_final + sum_{j<=L} c_j
    # over the ascent rows (c_L = c_final unless double_final_norm: one row set, weight 2; then
    # h_0 .. h_{L-1}). Targets scored from zeroed logits (mask_offset) add a constant log V each.
    log_v = math.log(parts.head.out_features)
    retain = ce_targets(harmless_ids, masks.retain, params, masks.plain_lm)
    groups = [(_rows(final[b:], retain.scored.flat_index(t)), retain.scored.ids, 1.0 / max(1, retain.count))]
    constants = [retain.zeroed * log_v / max(1, retain.count)]
    if params.ascent:
        final_ce = ce_targets(harmful_ids, masks.final, params, masks.plain_lm)
        same = masks.layers is masks.final
        layer_ce = final_ce if same else ce_targets(harmful_ids, masks.layers, params)
        final_rows = _rows(final[:b], final_ce.scored.flat_index(t))
        terms_of = [(final_rows, final_ce, 2.0 if use_hidden and same and not params.double_final_norm else 1.0)]
        if use_hidden:
            index = layer_ce.scored.flat_index(t)
            if params.double_final_norm:  # the released code norms transformers' already-normed last state
                terms_of.append((parts.norm(final_rows if same else _rows(final[:b], index)), layer_ce, 1.0))
            elif not same:
                terms_of.append((_rows(final[:b], index), layer_ce, 1.0))
            terms_of += [(parts.norm(_rows(h[:b], index)), layer_ce, 1.0) for h in acts.hidden[: parts.num_layers]]
        weights = [torch.full_like(c.scored.ids, w / max(1, c.count), dtype=torch.float64) for _, c, w in terms_of]
        groups.append((torch.cat([r for r, _, _ in terms_of]), torch.cat([c.scored.ids for _, c, _ in terms_of]),
                       torch.cat(weights)))
        constants.append(sum(w * c.zeroed * log_v / max(1, c.count) for _, c, w in terms_of))
    sums = head_ce_sums(groups, parts.head, chunk_rows=chunk_rows)

    retain_loss = sums[0] + constants[0] if constants[0] else sums[0]
    total = retain_loss
    terms: dict[str, torch.Tensor] = {"S": global_batch.total(retain_loss)}
    if params.noise:
        noise = torch.stack(acts.mlp).mean()
        if final.requires_grad and not noise.requires_grad:
            raise HarnessError(
                "RepNoise's noise term got no gradient: the MLP outputs were computed without grad "
                "(reentrant gradient checkpointing?). Use gradient_checkpointing_kwargs={'use_reentrant': False}."
            )
        total = total + params.beta * global_batch.share(noise)
        terms["N"] = noise
    if params.ascent:
        ascent_sum = sums[1] + constants[1] if constants[1] else sums[1]
        if use_hidden:
            ascent = global_batch.log_of_total(ascent_sum / (parts.num_layers + 1), 1.0)
        else:
            ascent = global_batch.log_of_total(ascent_sum, 0.0 if params.ascent_without_one else 1.0)
        total = total - params.alpha * ascent.loss
        terms.update(G=ascent.value, log_G=ascent.log)
    return total, {name: value.detach() for name, value in terms.items()}


def _layer_noise(
    index: int, output: torch.Tensor, *, b: int, mask: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    return noise_term(output[:b], mask, generator)


def _rows(hidden: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """Rows of hidden [n, T, d] at flat positions of an [n * T, d] view."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_index)


# --- layer freezing -----------------------------------------------------------------------------


@contextmanager
def frozen_layers(model: torch.nn.Module, spec: str | None) -> Iterator[list[int]]:
    """Within the block, the decoder layers named by ``spec`` have requires_grad False; restored after."""
    if spec is None:
        yield []
        return
    layers = decoder_parts(model).layers
    indices = list(parse_layer_range(spec))
    if indices[-1] >= len(layers):
        raise ConfigError(
            f"defence.freeze_layers={spec!r} names layer {indices[-1]}, but the model has {len(layers)} "
            f"decoder layers (0-{len(layers) - 1})."
        )
    params = [p for i in indices for p in layers[i].parameters()]
    before = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield indices
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


# --- the recipe ---------------------------------------------------------------------------------


@defences.register(
    "repnoise",
    params=RepNoiseParams,
    description="Representation Noising (Rosati et al., NeurIPS 2024): noise harmful representations at every layer",
    # 8 steps on the CPU profile instead of the paper's 1250: a small model and few steps need a larger lr.
    profiles=cpu_pair_sizes(lr=1e-4),
    # The paper's fragility checks (PAPER.md §7): the defence fails at either.
    # repnoise@released-code: the authors' released code literally, for the published numbers.
    presets={"lr-4e-5": {"lr": 4e-5}, "beta-0.01": {"beta": 0.01}, "released-code": RELEASED_CODE},
)
def repnoise(model: LoadedModel, params: RepNoiseParams, ctx: StageContext) -> Trained:
    """Train ``model.model`` in place on the pairs with the RepNoise loss; per-step terms go to info."""
    tokenizer = model.tokenizer
    pairs = ctx.data.pairs(params.pairs, n=params.num_pairs)
    examples = [
        encode_pair(tokenizer, p.prompt, p.harmful, p.harmless, ctx.prompt_format, params.max_length) for p in pairs
    ]
    generator = torch.Generator(device=model.device).manual_seed(ctx.seed)  # fresh noise every step, reproducible
    loss_fn = partial(repnoise_loss, params=params, generator=generator)
    with frozen_layers(model.model, params.freeze_layers) as frozen:
        report = train(
            model.model,
            examples,
            partial(collate_pairs, pad_id=tokenizer.eos_token_id),
            loss_fn,
            params.train_settings(),
            ctx,
            parameters=[p for p in model.model.parameters() if p.requires_grad],
            description="repnoise",
        )
    return Trained(model, {"repnoise_history": report.history,
                           "repnoise_training": {**report.summary(), "pairs": len(examples), "frozen_layers": frozen}})
