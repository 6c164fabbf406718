"""RepNoise's released-code flags (issue 17): each changes exactly what it should, and all of them
together (the preset repnoise@released-code) equal the authors' released loss, transcribed here."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from defences.repnoise import RELEASED_CODE, RepNoiseParams, repnoise_loss
from harness.data.tokenization import collate_pairs
from harness.run.presets import preset_params

sys.path.insert(0, str(Path(__file__).parent))
from repnoise_reference import ref_mmd  # noqa: E402
from test_repnoise import EOS, VOCAB, loss_and_grads, pair_batch, tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FLAGS = list(RELEASED_CODE)


def zero_id_batch() -> dict[str, torch.Tensor]:
    """Pairs whose answers hold token id 0 at masked target positions (and one prompt token 0)."""
    examples = [
        {"harmful": [5, 6, 7, 0, 9, 10, EOS], "harmless": [5, 6, 7, 11, 0, EOS]},
        {"harmful": [0, 12, 13, 14, 0, 0, 15, EOS], "harmless": [0, 12, 16, 17, EOS]},
        {"harmful": [20, 21, 22, 23, EOS], "harmless": [20, 21, 30, 0, 31, 32, EOS]},
    ]
    return collate_pairs(examples, pad_id=EOS)


# --- the authors' released loss, transcribed (representation_noising/loss.py) --------------------


def released_masked_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    shift_logits = logits[..., :-1, :] * mask[..., :-1, None].to(logits.dtype)
    shift_labels = labels[..., 1:] * mask[..., 1:].long()
    shift_labels = shift_labels.masked_fill(shift_labels == 0, -100)
    return F.cross_entropy(shift_logits.reshape(-1, logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100)


def released_loss(model, batch, beta: float, alpha: float, generator: torch.Generator) -> torch.Tensor:
    harmful, harmless = batch["harmful_input_ids"], batch["harmless_input_ids"]
    mlp: dict[int, torch.Tensor] = {}
    layers = model.model.layers
    handles = [layers[i].mlp.register_forward_hook(lambda m, a, o, i=i: mlp.__setitem__(i, o))
               for i in range(len(layers))]
    try:
        out = model(harmful, attention_mask=batch["harmful_attention_mask"], output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    mask = harmful != harmless
    noise = 0
    for i in range(len(layers)):
        keep = mask[..., None].to(mlp[i].dtype)
        hidden = mlp[i] * keep
        gaussian = torch.randn(hidden.shape, generator=generator, dtype=torch.float32) * keep
        noise = noise + ref_mmd(hidden.reshape(hidden.shape[0], -1), gaussian.reshape(gaussian.shape[0], -1))
    noise = noise / len(layers)
    harmful_loss = released_masked_ce(out.logits, harmful, mask)
    harmless_out = model(harmless, attention_mask=batch["harmless_attention_mask"])
    harmless_loss = released_masked_ce(harmless_out.logits, harmless, mask)
    for h in out.hidden_states:  # the last one is already normed by transformers: normed twice here
        harmful_loss = harmful_loss + released_masked_ce(model.lm_head(model.model.norm(h)), harmful, mask)
    harmful_loss = harmful_loss / len(out.hidden_states) + 1
    return harmless_loss + beta * noise - alpha * torch.log(harmful_loss)


def test_preset_turns_every_flag_on_and_defaults_keep_the_paper():
    assert preset_params("defences", "repnoise", "released-code") == {flag: True for flag in FLAGS}
    assert not any(getattr(RepNoiseParams(), flag) for flag in FLAGS)


@pytest.mark.parametrize("make_batch", [pair_batch, zero_id_batch])
def test_released_preset_equals_the_released_code_values_and_gradients(make_batch):
    model, batch = tiny_llama(dtype=torch.float64), make_batch()
    with torch.no_grad():  # a final norm with a real weight, so that norming twice shows
        model.model.norm.weight.uniform_(0.2, 3.0, generator=torch.Generator().manual_seed(1))
    params = RepNoiseParams(**RELEASED_CODE, beta=0.5)
    fast = loss_and_grads(repnoise_loss, model, batch, params, chunk_rows=5)
    model.zero_grad(set_to_none=True)
    ref = released_loss(model, batch, params.beta, params.alpha, torch.Generator().manual_seed(0))
    ref.backward()
    torch.testing.assert_close(fast[0], ref.detach(), rtol=1e-9, atol=1e-10)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fast[2][name], p.grad, rtol=1e-7, atol=1e-9, msg=name)


# --- one flag at a time ---------------------------------------------------------------------------


def per_target_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B, T-1] CE of the target at t+1 predicted at t."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")


def terms(batch, params, model=None):
    model = model or tiny_llama(dtype=torch.float64)
    return loss_and_grads(repnoise_loss, model, batch, params)


def changed(a: dict, b: dict) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_drop_target_id_0_changes_nothing_without_id_0_and_drops_exactly_those_targets():
    base, flag = RepNoiseParams(noise=False, ascent=False), RepNoiseParams(noise=False, ascent=False,
                                                                          drop_target_id_0=True)
    clean = pair_batch()
    assert not (clean["harmful_input_ids"] == 0).any() and not (clean["harmless_input_ids"] == 0).any()
    a, b = terms(clean, base), terms(clean, flag)
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[2][k], b[2][k]) for k in a[2])

    batch, model = zero_id_batch(), tiny_llama(dtype=torch.float64)
    harmful, harmless = batch["harmful_input_ids"], batch["harmless_input_ids"]
    with torch.no_grad():
        ce = per_target_ce(model(harmless, attention_mask=batch["harmless_attention_mask"]).logits, harmless)
    targets = (harmful != harmless)[:, 1:]
    zero = harmless[:, 1:] == 0
    assert (targets & zero).sum() == 2  # two id-0 targets on the harmless side are in the mask
    expected_all = ce[targets].mean()
    expected_kept = ce[targets & ~zero].mean()
    with torch.no_grad():
        s_base = repnoise_loss(model, batch, base)[1]["S"]
        s_flag = repnoise_loss(model, batch, flag)[1]["S"]
    torch.testing.assert_close(s_base, expected_all, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_flag, expected_kept, rtol=1e-12, atol=1e-12)
    # the difference is exactly the dropped terms: n_all * S_all - sum(dropped) = n_kept * S_kept
    dropped = ce[targets & zero].sum()
    torch.testing.assert_close(targets.sum() * s_base - dropped, (targets & ~zero).sum() * s_flag)


def test_mask_offset_scores_the_first_target_of_each_stretch_as_log_v_with_no_gradient():
    batch, model = pair_batch(), tiny_llama(dtype=torch.float64)
    harmful, harmless = batch["harmful_input_ids"], batch["harmless_input_ids"]
    flag = RepNoiseParams(noise=False, ascent=False, mask_offset=True)
    mask = harmful != harmless
    targets = mask[:, 1:]
    first = targets & ~mask[:, :-1]  # predicted from a position outside the mask
    assert first.sum() >= 3  # at least one stretch per pair
    model.zero_grad(set_to_none=True)
    ce = per_target_ce(model(harmless, attention_mask=batch["harmless_attention_mask"]).logits, harmless)
    hand = (ce[targets & ~first].sum() + int(first.sum()) * math.log(VOCAB)) / int(targets.sum())
    hand.backward()
    hand_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    total, got, grads = loss_and_grads(repnoise_loss, model, batch, flag)
    torch.testing.assert_close(got["S"], hand.detach(), rtol=1e-12, atol=1e-12)
    for name, grad in hand_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)
    # all-zero logits: CE = log V exactly
    zero_logits = torch.zeros(1, VOCAB, dtype=torch.float64)
    assert F.cross_entropy(zero_logits, torch.tensor([5])).item() == pytest.approx(math.log(VOCAB), abs=1e-12)
    # with ascent on, every CE term changes; the noise term does not
    full_base, full_flag = terms(batch, RepNoiseParams(beta=1.0)), terms(batch, RepNoiseParams(beta=1.0,
                                                                                               mask_offset=True))
    assert changed(full_base[1], full_flag[1]) == {"S", "G", "log_G"}


def test_double_final_norm_changes_only_c_L():
    batch, model = pair_batch(), tiny_llama(dtype=torch.float64)
    with torch.no_grad():  # a fresh RMSNorm (weight 1) is idempotent up to eps: give it a real weight
        model.model.norm.weight.uniform_(0.2, 3.0, generator=torch.Generator().manual_seed(1))
    harmful = batch["harmful_input_ids"]
    params = RepNoiseParams(noise=False)
    base = terms(batch, params, model)
    flag = terms(batch, params.model_copy(update={"double_final_norm": True}), model)
    assert changed(base[1], flag[1]) == {"G", "log_G"}
    mask = harmful != batch["harmless_input_ids"]
    L = model.config.num_hidden_layers
    with torch.no_grad():
        out = model(harmful, attention_mask=batch["harmful_attention_mask"], output_hidden_states=True)
        c_final = per_target_ce(out.logits, harmful)[mask[:, 1:]].mean()
        normed_twice = model.lm_head(model.model.norm(out.hidden_states[L]))
        c_twice = per_target_ce(normed_twice, harmful)[mask[:, 1:]].mean()
    torch.testing.assert_close(flag[1]["G"] - base[1]["G"], (c_twice - c_final) / (L + 1), rtol=1e-9, atol=1e-12)
    assert abs(float(c_twice - c_final)) > 1e-3


def test_ascent_without_one_drops_the_one_only_in_the_final_layer_ablation():
    batch = pair_batch()
    final_only = RepNoiseParams(noise=False, layerwise_ascent=False)
    base, flag = terms(batch, final_only), terms(batch, final_only.model_copy(update={"ascent_without_one": True}))
    assert changed(base[1], flag[1]) == {"G", "log_G"}
    torch.testing.assert_close(flag[1]["G"], base[1]["G"] - 1.0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flag[1]["log_G"], torch.log(base[1]["G"] - 1.0), rtol=1e-12, atol=1e-12)
    layerwise = RepNoiseParams(noise=False)
    a, b = terms(batch, layerwise), terms(batch, layerwise.model_copy(update={"ascent_without_one": True}))
    assert not changed(a[1], b[1])


def test_unmasked_as_released_noise_unmasked_plain_lm_loss_and_masked_layer_terms():
    batch, model = pair_batch(), tiny_llama(dtype=torch.float64)
    harmful, harmless = batch["harmful_input_ids"], batch["harmless_input_ids"]
    params = RepNoiseParams(mask=False, unmasked_as_released=True, beta=1.0)
    _, got, _ = terms(batch, params, model)
    L = model.config.num_hidden_layers
    mlp: dict[int, torch.Tensor] = {}
    handles = [model.model.layers[i].mlp.register_forward_hook(lambda m, a, o, i=i: mlp.__setitem__(i, o))
               for i in range(L)]
    with torch.no_grad():
        out = model(harmful, attention_mask=batch["harmful_attention_mask"], output_hidden_states=True)
        for h in handles:
            h.remove()
        harmless_logits = model(harmless, attention_mask=batch["harmless_attention_mask"]).logits
        g = torch.Generator().manual_seed(0)
        noise = sum(ref_mmd(mlp[i].reshape(3, -1), torch.randn(mlp[i].shape, generator=g,
                                                               dtype=torch.float32).reshape(3, -1))
                    for i in range(L)) / L
        s = per_target_ce(harmless_logits, harmless).mean()  # every position, padding included
        c_final = per_target_ce(out.logits, harmful).mean()
        mask = (harmful != harmless)[:, 1:]
        c_layers = [per_target_ce(model.lm_head(model.model.norm(h)), harmful)[mask].mean()
                    for h in out.hidden_states[:L]]
        c_last = per_target_ce(out.logits, harmful)[mask].mean()
        g_hand = (c_final + sum(c_layers) + c_last) / (L + 1) + 1
    torch.testing.assert_close(got["N"], noise.to(got["N"].dtype), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got["S"], s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["G"], g_hand, rtol=1e-12, atol=1e-12)
    # differs from today's mask ablation in N, S and G; with the mask on it changes nothing
    today = terms(batch, RepNoiseParams(mask=False, beta=1.0), model)[1]
    assert changed(today, got) == {"N", "S", "G", "log_G"}
    a = terms(batch, RepNoiseParams(beta=1.0), model)[1]
    b = terms(batch, RepNoiseParams(beta=1.0, unmasked_as_released=True), model)[1]
    assert not changed(a, b)


def test_flags_off_leave_the_params_dump_and_so_the_stage_keys_as_before():
    before_issue_17 = {"alpha", "ascent", "batch_size", "beta", "epochs", "freeze_layers", "grad_accum",
                       "layerwise_ascent", "lr", "mask", "max_grad_norm", "max_length", "noise", "num_pairs",
                       "optimizer", "pairs", "retain_mask", "schedule", "warmup_ratio", "weight_decay"}
    assert set(RepNoiseParams().model_dump(mode="json")) == before_issue_17
    on = RepNoiseParams(**RELEASED_CODE).model_dump(mode="json")
    assert set(on) == before_issue_17 | set(FLAGS) and all(on[f] is True for f in FLAGS)
