"""TAR: Tampering Attack Resistance (Tamirisa et al., "Tamper-Resistant Safeguards for Open-Weight LLMs",
2024, arXiv 2408.00761; ICLR 2025). Adversarial meta-learning: the defence simulates fine-tuning attacks
and trains the weights so that the safeguard survives them, while a retain loss keeps capability.

One outer step (Algorithm 1 of the paper, as its released code runs it):

1. snapshot theta; for each of ``num_tasks`` sampled attacks: a fresh AdamW adversary (torch defaults,
   lr drawn from ``inner_lrs``) takes ``inner_steps`` = K steps of next-token SFT on harmful data (the
   harmful side of the pairs); after its step k (k = 0..K-1) the tamper-resistance loss L_TR is
   evaluated at the attacked weights theta'_k on the held-out batch x_tr and its gradient is added to a
   buffer with weight tr_scale * w_k / num_tasks, w_k = exp(schedule_lambda * (k - (K-1))) (the code's
   weighting schedule; 1/K without it); then theta is restored and the adversary's state dropped;
2. the outer gradient is retain_scale * grad L_retain(theta) plus the buffer, and the shared training
   loop's optimizer steps on it.

First-order approximation (the paper's, and its code's): d theta'_k / d theta is taken as the identity,
so L_TR's gradient at theta'_k is applied to theta directly; no second-order term, no graph through the
inner loop. The inner loop runs in place on the model (snapshot and restore), so it costs one parameter
copy, one gradient buffer and the adversary's AdamW state, all released before the outer backward.

Tamper-resistance loss: the paper designs one per setting (its appendix C.3): negative entropy for
weaponization-knowledge restriction, and for harmful request refusal the DPO loss (beta 0.1) with the
refusal chosen and the harmful answer rejected. This harness's attacks fine-tune on harmful QA, which is
the refusal setting, so ``tr_loss="dpo"`` is the default; the reference log-probabilities are those of
the model before TAR (the code precomputes them), computed once here. ``max_entropy`` is the other
option (the next-token entropy over the harmful answer positions is maximised).

Retain loss: next-token CE on benign instruction data (``retain``; the paper uses general instruction
data, this harness's offline world has SST-2 in Alpaca format). The paper's representation-engineering
retain term is not used in its DPO run and is not implemented. Initial safeguard (optional,
``initial_safeguard_steps``): the code's Random Mapping, run before TAR on the same data: retain CE plus
mean over all hidden states of 1 - |cos(h, r[token])| on the harmful sequences' real tokens, r a fixed
random vector per token id.

Defaults are the released code's DPO run (run_tar_dpo.sh): outer lr 6e-5, batch 4, 8 inner steps,
2 attacks per step, adversary lr from {2e-6, 2e-5, 4e-5}, L_TR scale 0.1, retain scale 1, weighting
schedule lambda 0.0625, unbounded (no lower bound on L_TR). Not implemented: the code's other adversary
mixtures (benign or switching data), learning-rate warm-up inside the adversary, the inner-loop
subsampling trick (its default, 1, computes L_TR at every inner step, as here).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from harness.api import (
    LoadedModel,
    PairDefenceSettings,
    Params,
    StageContext,
    Trained,
    TrainSettings,
    causal_lm_loss,
    collate_pairs,
    collate_sft,
    cpu_pair_sizes,
    defences,
    encode_pair,
    encode_sft,
    position_mask,
    train,
    unwrap,
)


class RetainData(Params):
    """The retain loss's data: a QA set (checked as one before the first stage)."""

    dataset: str = Field("sst2-alpaca", description="QA data set of benign instructions")
    num_samples: int | None = Field(None, ge=1, description="examples drawn (seeded); None: as many as pairs")


class TARParams(PairDefenceSettings):
    """The released code's DPO (harmful request refusal) run; its 100 outer steps are num_pairs / batch_size."""

    lr: float = Field(6e-5, gt=0, description="outer (defender) learning rate (code's DPO run: 6e-5)")
    optimizer: Literal["adam", "adamw"] = Field("adamw", description="outer optimizer (code: AdamW)")
    batch_size: int = Field(4, ge=1, description="pairs per outer step: the held-out TR batch x_tr (code: 4)")
    tr_loss: Literal["dpo", "max_entropy"] = Field(
        "dpo", description="tamper-resistance loss: DPO for refusal (harmful QA; default) or max entropy"
    )
    inner_steps: int = Field(8, description="K, steps of each simulated attack (code's DPO run: 8)")
    num_tasks: int = Field(2, ge=1, description="simulated attacks per outer step (code's DPO run: 2)")
    inner_lrs: list[float] = Field([2e-6, 2e-5, 4e-5], min_length=1,
                                   description="adversary learning rates, one drawn per attack")
    inner_batch_size: int | None = Field(None, ge=1, description="harmful examples per attack step; None: batch_size")
    tr_scale: float = Field(0.1, ge=0, description="weight of the tamper-resistance gradient (code's DPO run: 0.1)")
    retain_scale: float = Field(1.0, ge=0, description="weight of the retain loss (lambda; code: 1)")
    weighting_schedule: bool = Field(True, description="weight L_TR at inner step k by exp(lambda (k - K + 1)); "
                                                       "False: 1/K")
    schedule_lambda: float = Field(0.0625, ge=0, description="lambda of the weighting schedule (code: 0.0625)")
    dpo_beta: float = Field(0.1, gt=0, description="DPO temperature (code: 0.1)")
    retain: RetainData = Field(default_factory=RetainData,
                               description="the retain loss's benign instruction data (QA)")
    initial_safeguard_steps: int = Field(0, ge=0, description="Random Mapping steps before TAR (0: none)")

    @field_validator("inner_steps")
    @classmethod
    def _some_inner_steps(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"TAR needs at least one simulated attack step (inner_steps >= 1), got {value}: "
                             "with none there is no attack to resist; use safety-sft for refusal training alone")
        return value

    @field_validator("inner_lrs")
    @classmethod
    def _positive_lrs(cls, value: list[float]) -> list[float]:
        if any(not lr > 0 for lr in value):
            raise ValueError(f"every adversary learning rate must be > 0, got {value}")
        return value

    def train_settings(self) -> TrainSettings:
        return TrainSettings.model_validate(self.model_dump(include=set(TrainSettings.model_fields)))


# --- the tamper-resistance losses -----------------------------------------------------------------


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """At least float32 for the softmax (bf16 upcast, float64 kept)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def answer_mask(batch: dict[str, torch.Tensor], side: str) -> torch.Tensor:
    """[B, T] real tokens of ``side`` from the first position where the two sides differ (its answer,
    less any prefix both answers share, which cancels in every chosen-minus-rejected difference)."""
    started = position_mask(batch["harmful_input_ids"], batch["harmless_input_ids"]).long().cumsum(1) > 0
    return started & batch[f"{side}_attention_mask"].bool()


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(refusal | prompt), log p(harmful answer | prompt)) per pair, summed over answer tokens."""
    out = []
    for side in ("harmless", "harmful"):
        ids = batch[f"{side}_input_ids"]
        logits = model(input_ids=ids, attention_mask=batch[f"{side}_attention_mask"]).logits[:, :-1]
        token_logps = torch.gather(F.log_softmax(_upcast(logits), -1), 2, ids[:, 1:, None]).squeeze(2)
        out.append((token_logps * answer_mask(batch, side)[:, 1:]).sum(1))
    return out[0], out[1]


def dpo_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], beta: float) -> torch.Tensor:
    """Mean DPO loss, refusal chosen and harmful answer rejected, against the batch's reference log-probs."""
    chosen, rejected = sequence_logps(model, batch)
    margin = (chosen - rejected) - (batch["ref_chosen"] - batch["ref_rejected"])
    return -F.logsigmoid(beta * margin).mean()


def max_entropy_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Minus the mean next-token entropy at the positions that predict the harmful answer."""
    ids = batch["harmful_input_ids"]
    logits = model(input_ids=ids, attention_mask=batch["harmful_attention_mask"]).logits[:, :-1]
    logits = _upcast(logits)
    entropy = -(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1)
    mask = answer_mask(batch, "harmful")[:, 1:]
    return -(entropy * mask).sum() / mask.sum().clamp_min(1)


def tamper_resistance_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], params: TARParams) -> torch.Tensor:
    return dpo_loss(model, batch, params.dpo_beta) if params.tr_loss == "dpo" else max_entropy_loss(model, batch)


# --- the inner loop ---------------------------------------------------------------------------------


def schedule_weight(step: int, steps: int, params: TARParams) -> float:
    """w_k of the code's weighting schedule (the last step weighs 1), or 1/K."""
    return math.exp(params.schedule_lambda * (step - (steps - 1))) if params.weighting_schedule else 1.0 / steps


def simulated_attack_grads(
    model: torch.nn.Module,
    tr_batch: dict[str, torch.Tensor],
    attacks: Sequence[tuple[float, Sequence[dict[str, torch.Tensor]]]],
    params: TARParams,
) -> tuple[dict[torch.nn.Parameter, torch.Tensor], dict[str, float]]:
    """First-order tamper-resistance gradient of ``attacks`` = [(adversary lr, K SFT batches)]: the sum over
    attacks and steps of tr_scale * w_k / len(attacks) * grad L_TR(theta'_k). The model's weights, grads and
    training flags are as before on return (also on error); the adversaries' optimizers are gone. Stats: the
    mean L_TR and adversary loss over all attacked steps (unweighted)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    snapshot = [p.detach().clone() for p in trainable]
    buffer = [torch.zeros_like(p) for p in trainable]
    saved_grads = [p.grad for p in trainable]
    stats = {"tr_loss": 0.0, "adversary_loss": 0.0}
    try:
        for lr, batches in attacks:
            adversary = torch.optim.AdamW(trainable, lr=lr)
            for k, batch in enumerate(batches):
                for p in trainable:
                    p.grad = None
                adversary_loss = causal_lm_loss(model, batch)
                adversary_loss.backward()
                adversary.step()
                for p in trainable:
                    p.grad = None
                weight = params.tr_scale * schedule_weight(k, len(batches), params) / len(attacks)
                tr = tamper_resistance_loss(model, tr_batch, params)
                grads = torch.autograd.grad(tr, trainable, allow_unused=True)
                for acc, g in zip(buffer, grads):
                    if g is not None:
                        acc.add_(g, alpha=weight)
                stats["tr_loss"] += float(tr.detach()) / (len(batches) * len(attacks))
                stats["adversary_loss"] += float(adversary_loss.detach()) / (len(batches) * len(attacks))
            del adversary
            with torch.no_grad():
                for p, theta in zip(trainable, snapshot):
                    p.copy_(theta)
    finally:
        with torch.no_grad():
            for p, theta, grad in zip(trainable, snapshot, saved_grads):
                p.copy_(theta)
                p.grad = grad
    return dict(zip(trainable, buffer)), stats


def with_extra_gradient(loss: torch.Tensor, grads: dict[torch.nn.Parameter, torch.Tensor]) -> torch.Tensor:
    """``loss`` with the same value whose gradient w.r.t. each parameter p is grad(loss) + grads[p]."""
    linear = sum((p * g).sum() for p, g in grads.items())
    return loss + (linear - linear.detach())


# --- one outer step ---------------------------------------------------------------------------------


@dataclass
class TARStreams:
    """The data an outer step draws besides its pair batch: retain batches and adversary batches, cycled."""

    retain: Iterator[dict[str, torch.Tensor]]
    adversary: Iterator[dict[str, torch.Tensor]]
    rng: random.Random
    device: Any = None
    log: list[dict[str, float]] = field(default_factory=list)

    def next(self, stream: Iterator[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) if self.device is not None else v for k, v in next(stream).items()}


def tar_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, params: TARParams, streams: TARStreams
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The outer objective of one step: retain_scale * L_retain at theta, plus (as gradient) the first-order
    tamper-resistance gradient of ``num_tasks`` simulated attacks on the pair batch x_tr."""
    attacks = [(streams.rng.choice(params.inner_lrs), [streams.next(streams.adversary)
                                                        for _ in range(params.inner_steps)])
               for _ in range(params.num_tasks)]
    grads, stats = simulated_attack_grads(model, batch, attacks, params)
    retain = causal_lm_loss(model, streams.next(streams.retain))
    total = with_extra_gradient(params.retain_scale * retain, grads)
    return total, {"retain": retain.detach(), "tr_loss": stats["tr_loss"], "adversary_loss": stats["adversary_loss"]}


def cycle(examples: Sequence[Any], batch_size: int, collate: Any, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Seeded shuffled batches, reshuffled on every pass, forever."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, max(1, len(order) - batch_size + 1), batch_size):  # full batches only
            yield collate([examples[i] for i in order[start:start + batch_size]])


# --- the initial safeguard: Random Mapping ----------------------------------------------------------


def random_mapping_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, table: torch.Tensor, streams: TARStreams
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Retain CE plus mean over hidden states of 1 - |cos(h, table[token])| on the harmful side's real tokens."""
    ids, real = batch["harmful_input_ids"], batch["harmful_attention_mask"].bool()
    hidden = model(input_ids=ids, attention_mask=batch["harmful_attention_mask"], output_hidden_states=True)
    target = table[ids[real]]
    mapping = torch.stack([(1 - F.cosine_similarity(h[real].float(), target, dim=-1).abs()).mean()
                           for h in hidden.hidden_states]).mean()
    retain = causal_lm_loss(model, streams.next(streams.retain))
    return retain + mapping, {"retain": retain.detach(), "mapping": mapping.detach()}


# --- the recipe -------------------------------------------------------------------------------------


def reference_logps(model: torch.nn.Module, examples: list[dict[str, Any]], pad_id: int, batch_size: int) -> None:
    """Store each pair's DPO reference log-probs (the model before TAR) in the example, no gradient."""
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
            chosen, rejected = sequence_logps(model, batch)
            for e, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
                e["ref_chosen"], e["ref_rejected"] = c, r


def collate_with_reference(examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    batch = collate_pairs(examples, pad_id)
    if "ref_chosen" in examples[0]:
        batch["ref_chosen"] = torch.tensor([e["ref_chosen"] for e in examples], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([e["ref_rejected"] for e in examples], dtype=torch.float32)
    return batch


@defences.register(
    "tar", params=TARParams,
    # A step costs num_tasks * inner_steps adversary and TR passes: the CPU size keeps one attack of 4 steps,
    # its learning rate drawn from the ends of the CPU attack grid (3e-5 .. 8e-5).
    profiles={"cpu": {**cpu_pair_sizes(lr=1e-4)["cpu"], "inner_steps": 4, "num_tasks": 1,
                      "inner_lrs": [3e-5, 8e-5]}},
    presets={"max-entropy": {"tr_loss": "max_entropy"},  # the weaponization setting's L_TR
             "random-mapping": {"initial_safeguard_steps": 8}},  # with the paper's initial safeguard
    description="TAR: adversarial meta-learning against simulated fine-tuning attacks (first-order), "
                "DPO tamper-resistance loss plus retain loss",
)
def tar(model: LoadedModel, params: TARParams, ctx: StageContext) -> Trained:
    """Optionally Random Mapping, then TAR's outer loop on the pairs, in place."""
    tokenizer = model.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = ctx.data.pairs(params.pairs, n=params.num_pairs)
    retain_records = ctx.data.qa(params.retain.dataset, n=params.retain.num_samples or len(pairs))
    examples = [encode_pair(tokenizer, p.prompt, p.harmful, p.harmless, ctx.prompt_format, params.max_length)
                for p in pairs]
    sft = partial(collate_sft, pad_id=pad_id, mask_padding=True)
    harmful = [encode_sft(tokenizer, p.prompt, p.harmful, ctx.prompt_format, params.max_length, False) for p in pairs]
    retain = [encode_sft(tokenizer, r.prompt, r.response, ctx.prompt_format, params.max_length, False)
              for r in retain_records]
    inner_batch = params.inner_batch_size or params.batch_size
    streams = TARStreams(retain=cycle(retain, params.batch_size, sft, ctx.seed),
                         adversary=cycle(harmful, inner_batch, sft, ctx.seed + 1),
                         rng=random.Random(ctx.seed), device=model.device)
    info: dict[str, Any] = {}
    if params.initial_safeguard_steps:
        base = unwrap(model.model)
        generator = torch.Generator().manual_seed(ctx.seed)
        table = torch.randn(base.config.vocab_size, base.config.hidden_size, generator=generator).to(model.device)
        rm_examples = [examples[i % len(examples)] for i in range(params.initial_safeguard_steps * params.batch_size)]
        report = train(model.model, rm_examples, partial(collate_pairs, pad_id=pad_id),
                       partial(random_mapping_loss, table=table, streams=streams), params.train_settings(), ctx,
                       description="tar: random mapping")
        info["tar_random_mapping"] = report.summary()
    if params.tr_loss == "dpo":
        reference_logps(model.model, examples, pad_id, params.batch_size)
    report = train(model.model, examples, partial(collate_with_reference, pad_id=pad_id),
                   partial(tar_loss, params=params, streams=streams), params.train_settings(), ctx,
                   description="tar")
    info.update(tar_history=report.history, tar_training={**report.summary(), "pairs": len(examples),
                                                          "retain_examples": len(retain)})
    return Trained(model, info)

