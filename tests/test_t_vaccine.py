"""T-Vaccine (defences/t_vaccine.py) on the real tiny-llama: the layer criterion is the harmful gradient
norm computed by hand, the draw follows it, and only the drawn layers are perturbed and trained."""

from __future__ import annotations

import copy

import pytest
import torch

from defences.t_vaccine import (
    TVaccineParams,
    draw_layers,
    layer_gradient_norms,
    layer_probabilities,
    t_vaccine,
    targeted_perturbed_loss,
)
from harness.context import StageContext
from harness.data.readers import DataAccess
from harness.data.tokenization import collate_sft, encode_sft
from harness.errors import HarnessError
from harness.models.loading import LoadedModel
from harness.train.sft import causal_lm_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def batch_of(base: LoadedModel, data: DataAccess, side: str, n: int = 3) -> dict[str, torch.Tensor]:
    examples = [encode_sft(base.tokenizer, p.prompt, getattr(p, side), "chat", 40, False)
                for p in data.pairs("jbb-pairs", n=n)]
    return collate_sft(examples, base.tokenizer.eos_token_id, mask_padding=True)


def ctx_for(tmp_path, data) -> StageContext:
    return StageContext(seed=0, device="cpu", dtype="float32", data=data, cache_dir=tmp_path, workdir=tmp_path,
                        prompt_format="chat")


def test_layer_norms_are_the_harmful_gradient_norms_by_hand(base, data):
    model = copy.deepcopy(base.model).train()
    harmful = batch_of(base, data, "harmful", 2)
    norms = layer_gradient_norms(model, harmful)
    assert all(p.grad is None for p in model.parameters())  # measured without touching .grad

    # By hand: keep each attention block's output, back-propagate, take each output's gradient norm.
    outputs: list[torch.Tensor] = []

    def keep(module, args, output):
        output[0].retain_grad()
        outputs.append(output[0])

    handles = [layer.self_attn.register_forward_hook(keep) for layer in model.model.layers]
    causal_lm_loss(model, harmful).backward()
    for h in handles:
        h.remove()
    by_hand = torch.stack([o.grad.norm() for o in outputs])
    assert len(norms) == 2 and torch.allclose(norms, by_hand, rtol=1e-5) and (by_hand > 0).all()
    probabilities = layer_probabilities(norms)
    assert probabilities.sum().item() == pytest.approx(1.0)
    assert probabilities[0].item() == pytest.approx((by_hand[0] / by_hand.sum()).item(), rel=1e-5)


def test_the_draw_follows_the_probabilities():
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    draws = [draw_layers(probabilities, 1, generator)[0] for _ in range(4000)]
    frequencies = [draws.count(i) / len(draws) for i in range(3)]
    assert frequencies == pytest.approx([0.1, 0.6, 0.3], abs=0.03)
    two = [draw_layers(probabilities, 2, generator) for _ in range(200)]
    assert all(len(set(d)) == 2 and d == sorted(d) for d in two)  # distinct, without replacement
    # A layer with no harmful gradient is drawn only when too few others have one.
    assert all(draw_layers(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), 1, generator) == [1] for _ in range(50))
    assert draw_layers(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), 3, generator) == [0, 1, 2]


def test_only_the_drawn_layer_is_perturbed_and_trained(base, data):
    model = copy.deepcopy(base.model).train()
    batch = batch_of(base, data, "harmless")
    rho = 3.0
    attention = [layer.self_attn for layer in model.model.layers]
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    handles = [m.register_forward_hook(lambda mod, a, out, i=i: seen[i].append(out[0].detach().clone()))
               for i, m in enumerate(attention)]
    try:
        loss, terms = targeted_perturbed_loss(model, batch, [1], rho=rho)
    finally:
        for h in handles:
            h.remove()
    # Our hooks run before the perturbing hook, so they see each pass's unperturbed outputs: layer 0's are equal
    # in both passes (nothing upstream changed), while the perturbation on layer 1 is what the terms report.
    assert len(seen[0]) == len(seen[1]) == 2
    assert torch.equal(seen[0][0], seen[0][1])
    assert terms["perturbation_norm"].item() == pytest.approx(rho, rel=1e-5)

    # By hand: eps = rho * g / ||g|| with g the clean loss's gradient w.r.t. layer 1's attention output.
    hand = copy.deepcopy(base.model).train()
    out: list[torch.Tensor] = []
    h = hand.model.layers[1].self_attn.register_forward_hook(lambda m, a, o: out.append(o[0]))
    clean = causal_lm_loss(hand, batch)
    h.remove()
    (g,) = torch.autograd.grad(clean, out)
    eps = rho * g / g.norm()
    h = hand.model.layers[1].self_attn.register_forward_hook(lambda m, a, o: (o[0] + eps, *o[1:]))
    perturbed = causal_lm_loss(hand, batch)
    h.remove()
    assert terms["clean_loss"].item() == pytest.approx(clean.item(), rel=1e-6)
    assert loss.item() == pytest.approx(perturbed.item(), rel=1e-5)
    assert loss.item() != pytest.approx(clean.item(), rel=1e-4)

    # Backward reaches layer 1's attention weights only; every flag is as before.
    loss.backward()
    trained = {id(p) for p in model.model.layers[1].self_attn.parameters()}
    for name, p in model.named_parameters():
        assert p.requires_grad, name
        assert (p.grad is not None) == (id(p) in trained), name


def test_the_recipe_draws_and_trains_only_drawn_layers(base, data, tmp_path):
    model = LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.ref, base.fingerprint)
    params = TVaccineParams(num_pairs=8, batch_size=4, max_length=40, lr=1e-3, warmup_ratio=0.0, schedule="constant",
                            num_layers=1, resample_steps=1, probability_steps=1, harmful_samples=6)
    trained = t_vaccine(model, params, ctx_for(tmp_path, data))
    draws = trained.report["t_vaccine_draws"]
    assert [d["step"] for d in draws] == [0, 1] and all(len(d["layers"]) == 1 for d in draws)
    assert trained.report["t_vaccine_training"]["harmful_samples"] == 6
    drawn = {d["layers"][0] for d in draws}
    for i, (layer, before) in enumerate(zip(model.model.model.layers, base.model.model.layers)):
        attention_moved = [not torch.equal(p, q) for p, q in zip(layer.self_attn.parameters(),
                                                                  before.self_attn.parameters())]
        assert any(attention_moved) == (i in drawn), i
        assert all(torch.equal(p, q) for p, q in zip(layer.mlp.parameters(), before.mlp.parameters())), i
    for name in ("embed_tokens", "norm"):
        assert torch.equal(getattr(model.model.model, name).weight, getattr(base.model.model, name).weight)


def test_more_layers_than_the_model_has_is_refused_before_training(base, data, tmp_path):
    model = LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.ref, base.fingerprint)
    with pytest.raises(HarnessError, match=r"num_layers=8, but the model has 2 decoder layers"):
        t_vaccine(model, TVaccineParams(num_pairs=4), ctx_for(tmp_path, data))
    assert all(torch.equal(p, q) for p, q in zip(model.model.parameters(), base.model.parameters()))
