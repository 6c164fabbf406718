"""RepNoise against PAPER.md §3: a direct full-logits transcription, hand computations, ablations,
layer freezing, hook hygiene and divergence reporting. Tiny random Llamas keep it to seconds."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from defences import repnoise as recipe
from defences.repnoise import RepNoiseParams, frozen_layers, parse_layer_range, repnoise, repnoise_loss
from harness.context import StageContext
from harness.data.records import Pair
from harness.data.tokenization import collate_pairs
from harness.errors import ConfigError, HarnessError, TrainingDivergedError
from harness.models.activations import capture_activations, decoder_parts
from harness.models.loading import LoadedModel
from harness.registry import defences

sys.path.insert(0, str(Path(__file__).parent))  # the reference module, whatever pytest's import mode
from repnoise_reference import ref_masked_ce, reference_loss  # noqa: E402

VOCAB = 97
EOS = 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=EOS,
        pad_token_id=EOS,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype)


def pair_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Three pairs with a shared prompt, answers of different lengths, EOS-terminated and EOS-padded."""
    g = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    examples = []
    for prompt_len, harmful_len, harmless_len in ((4, 6, 3), (5, 2, 5), (3, 4, 4)):
        prompt = tokens(prompt_len)
        examples.append({
            "harmful": prompt + tokens(harmful_len) + [EOS],
            "harmless": prompt + tokens(harmless_len) + [EOS],
        })
    return collate_pairs(examples, pad_id=EOS)


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def loss_and_grads(fn, model, batch, params, seed=0, **kwargs):
    model.zero_grad(set_to_none=True)
    total, terms = fn(model, batch, params, torch.Generator().manual_seed(seed), **kwargs)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total.detach(), {k: v.detach() for k, v in terms.items()}, grads


CONFIGS = {
    "default": {},
    "no-mask": {"mask": False},
    "unmasked-retain": {"retain_mask": False},
    "final-layer-ascent": {"layerwise_ascent": False},
    "no-noise": {"noise": False},
    "no-ascent": {"ascent": False},
    "alpha-beta": {"alpha": 0.5, "beta": 0.3},
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_fast_path_matches_reference_values_and_gradients_float64(config):
    model, batch = tiny_llama(dtype=torch.float64), pair_batch()
    params = RepNoiseParams(**CONFIGS[config])
    fast = loss_and_grads(repnoise_loss, model, batch, params, chunk_rows=5)
    ref = loss_and_grads(reference_loss, model, batch, params)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-9, atol=1e-10)
    assert fast[1].keys() == ref[1].keys()
    for name in ref[1]:
        torch.testing.assert_close(fast[1][name], ref[1][name].to(fast[1][name].dtype), rtol=1e-9, atol=1e-10)
    assert fast[2].keys() == ref[2].keys()
    for name in ref[2]:
        torch.testing.assert_close(fast[2][name], ref[2][name], rtol=1e-7, atol=1e-9, msg=name)


def test_fast_path_matches_reference_in_float32_with_a_large_beta():
    # beta = 1 so the noise gradient is not drowned by the others
    model, batch = tiny_llama(seed=3), pair_batch(seed=3)
    params = RepNoiseParams(beta=1.0)
    fast = loss_and_grads(repnoise_loss, model, batch, params)
    ref = loss_and_grads(reference_loss, model, batch, params)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-5)
    for name in ref[2]:
        torch.testing.assert_close(fast[2][name], ref[2][name], rtol=1e-3, atol=1e-5, msg=name)


def test_bfloat16_model_gives_float32_terms_close_to_the_float32_model():
    model, batch = tiny_llama(seed=4), pair_batch(seed=4)
    with torch.no_grad():
        _, full = repnoise_loss(model, batch, RepNoiseParams(), torch.Generator().manual_seed(0))
        _, half = repnoise_loss(model.to(torch.bfloat16), batch, RepNoiseParams(), torch.Generator().manual_seed(0))
    for name in full:
        assert half[name].dtype == torch.float32
        assert half[name].item() == pytest.approx(full[name].item(), rel=0.03), name


def test_ascent_term_matches_hand_computation():
    model, batch = tiny_llama(dtype=torch.float64), pair_batch()
    harmful, harmless = batch["harmful_input_ids"], batch["harmless_input_ids"]
    L = model.config.num_hidden_layers
    with torch.no_grad():
        out = model(harmful, attention_mask=batch["harmful_attention_mask"], output_hidden_states=True)
        pre_norm = list(out.hidden_states[:L])
        with capture_activations(model, mlp=False) as acts:
            model.model(input_ids=harmful, attention_mask=batch["harmful_attention_mask"])
        pre_norm.append(acts.hidden[L])
        logits_per_state = [out.logits] + [model.lm_head(model.model.norm(h)) for h in pre_norm]

        def ce(logits):  # loop over (row, target t) with ids differing, t >= 1
            values = [
                -torch.log_softmax(logits[b, t - 1], -1)[harmful[b, t]].item()
                for b in range(harmful.shape[0])
                for t in range(1, harmful.shape[1])
                if harmful[b, t] != harmless[b, t]
            ]
            return sum(values) / len(values)

        expected = sum(ce(lg) for lg in logits_per_state) / (L + 1) + 1  # L + 2 terms over L + 1
        _, terms = repnoise_loss(model, batch, RepNoiseParams(), torch.Generator().manual_seed(0))
    assert terms["G"].item() == pytest.approx(expected, rel=1e-10)
    assert terms["log_G"].item() == pytest.approx(math.log(expected), rel=1e-10)


def test_each_ablation_flag_removes_exactly_its_term():
    model, batch = tiny_llama(dtype=torch.float64), pair_batch()

    def run(**flags):
        params = RepNoiseParams(alpha=0.7, beta=0.2, **flags)
        with torch.no_grad():
            return repnoise_loss(model, batch, params, torch.Generator().manual_seed(0))

    total, t = run()
    assert total.item() == pytest.approx((t["S"] + 0.2 * t["N"] - 0.7 * t["log_G"]).item(), rel=1e-12)
    no_noise, tn = run(noise=False)
    assert "N" not in tn and no_noise.item() == pytest.approx((t["S"] - 0.7 * t["log_G"]).item(), rel=1e-12)
    no_ascent, ta = run(ascent=False)
    assert "G" not in ta and no_ascent.item() == pytest.approx((t["S"] + 0.2 * t["N"]).item(), rel=1e-12)
    neither, _ = run(noise=False, ascent=False)
    assert neither.item() == pytest.approx(t["S"].item(), rel=1e-12)
    # layer-wise off: G is the final layer's CE + 1, S and N unchanged
    with torch.no_grad():
        logits = model(batch["harmful_input_ids"], attention_mask=batch["harmful_attention_mask"]).logits
    final_only, tf = run(layerwise_ascent=False)
    assert tf["G"].item() == pytest.approx(
        ref_masked_ce(
            logits, batch["harmful_input_ids"], batch["harmful_input_ids"] != batch["harmless_input_ids"]
        ).item() + 1,
        rel=1e-10,
    )
    assert (tf["S"], tf["N"]) == (t["S"], t["N"])


def test_mask_off_scores_every_real_token_of_each_side():
    model, batch = tiny_llama(dtype=torch.float64), pair_batch()
    with torch.no_grad():
        _, terms = repnoise_loss(model, batch, RepNoiseParams(mask=False), torch.Generator().manual_seed(0))
        logits = model(batch["harmless_input_ids"], attention_mask=batch["harmless_attention_mask"]).logits
    expected = ref_masked_ce(logits, batch["harmless_input_ids"], batch["harmless_attention_mask"])
    assert terms["S"].item() == pytest.approx(expected.item(), rel=1e-10)


def test_transformers_last_hidden_state_is_already_normed_and_capture_is_pre_norm():
    model, batch = tiny_llama(), pair_batch()
    ids, attn = batch["harmful_input_ids"], batch["harmful_attention_mask"]
    with torch.no_grad():
        out = model(ids, attention_mask=attn, output_hidden_states=True)
        with capture_activations(model) as acts:
            last = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
    L = model.config.num_hidden_layers
    assert len(acts.hidden) == L + 1 and len(acts.mlp) == L
    for j in range(L):
        torch.testing.assert_close(acts.hidden[j], out.hidden_states[j])
    torch.testing.assert_close(model.model.norm(acts.hidden[L]), out.hidden_states[L])  # HF's last is normed
    torch.testing.assert_close(out.hidden_states[L], last)
    assert not torch.allclose(model.model.norm(out.hidden_states[L]), last)  # norming it again would differ


def test_captured_mlp_output_is_before_the_residual_add():
    model, batch = tiny_llama(), pair_batch()
    with torch.no_grad(), capture_activations(model) as acts:
        model.model(input_ids=batch["harmful_input_ids"], attention_mask=batch["harmful_attention_mask"])
    for i, layer in enumerate(model.model.layers):
        after_attention = acts.hidden[i + 1] - acts.mlp[i]  # the residual stream the MLP was added to
        torch.testing.assert_close(layer.mlp(layer.post_attention_layernorm(after_attention)), acts.mlp[i])


def test_hooks_do_not_leak_after_steps_or_exceptions():
    model, batch = tiny_llama(), pair_batch()
    before = hook_count(model)
    for _ in range(3):
        total, _ = repnoise_loss(model, batch, RepNoiseParams(), torch.Generator().manual_seed(0))
        total.backward()
    assert hook_count(model) == before

    with pytest.raises(IndexError):
        with capture_activations(model):
            assert hook_count(model) > before  # hooks exist only inside
            model.model(input_ids=torch.full((1, 3), VOCAB + 5))  # out-of-range token: embedding raises
    assert hook_count(model) == before

    def failing(index, output):
        raise RuntimeError("boom in hook")

    with pytest.raises(RuntimeError, match="boom"):
        with capture_activations(model, mlp_transform=failing):
            model.model(input_ids=batch["harmful_input_ids"])
    assert hook_count(model) == before


def test_works_through_gradient_checkpointing_and_peft():
    model, batch = tiny_llama(dtype=torch.float64), pair_batch()
    model.train()
    plain = loss_and_grads(repnoise_loss, model, batch, RepNoiseParams())
    model.gradient_checkpointing_enable()
    ckpt = loss_and_grads(repnoise_loss, model, batch, RepNoiseParams())
    torch.testing.assert_close(plain[0], ckpt[0])
    for name in plain[2]:
        torch.testing.assert_close(plain[2][name], ckpt[2][name], msg=name)
    model.gradient_checkpointing_disable()

    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["down_proj", "q_proj"]))
    total, terms = repnoise_loss(wrapped, batch, RepNoiseParams(), torch.Generator().manual_seed(0))
    total.backward()
    lora_grads = [p.grad for n, p in wrapped.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    torch.testing.assert_close(total.detach(), plain[0])  # LoRA B starts at 0: same function


# --- the recipe ---------------------------------------------------------------------------------


class CharTokenizer:
    """Enough of a tokenizer for encode_pair in question-answer format."""

    eos_token_id = EOS
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [3 + ord(c) % (VOCAB - 3) for c in text]}


class FakeData:
    def __init__(self, pairs: list[Pair]) -> None:
        self.items = pairs
        self.requests: list[tuple[str, int | None]] = []

    def pairs(self, name: str, n: int | None = None) -> list[Pair]:
        self.requests.append((name, n))
        return self.items[:n] if n else list(self.items)


PAIRS = [
    Pair(f"How do I do bad thing {i}?", f"Step one: gather {i} tools, then go.", "I can't help with that.")
    for i in range(8)
]


def make_ctx(tmp_path, pairs=PAIRS, seed=0) -> StageContext:
    return StageContext(
        seed=seed, device="cpu", dtype="float32", data=FakeData(pairs), cache_dir=tmp_path,
        workdir=tmp_path, prompt_format="question-answer",
    )


def loaded(model: torch.nn.Module) -> LoadedModel:
    return LoadedModel(model, CharTokenizer(), ref="tiny-test", fingerprint="test")


def test_plugin_is_registered_with_paper_defaults():
    plugin = defences._plugins["repnoise"]
    assert plugin.fn is repnoise and plugin.params_model is RepNoiseParams
    p = RepNoiseParams()
    assert (p.alpha, p.beta, p.lr, p.batch_size, p.epochs, p.max_length) == (1.0, 0.001, 2e-5, 8, 1, 128)
    assert (p.optimizer, p.weight_decay, p.schedule, p.warmup_ratio) == ("adam", 0.0, "cosine", 0.1)
    assert (p.pairs, p.num_pairs, p.retain_mask, p.freeze_layers) == ("jbb-pairs", None, True, None)
    settings = p.train_settings()
    assert (settings.lr, settings.optimizer, settings.batch_size) == (2e-5, "adam", 8)


def test_training_records_every_term_and_lowers_the_objective(tmp_path):
    model = tiny_llama()
    ctx = make_ctx(tmp_path)
    params = RepNoiseParams(lr=1e-2, batch_size=4, epochs=6, num_pairs=8, warmup_ratio=0.0, schedule="constant")
    out = repnoise(loaded(model), params, ctx)
    assert ctx.data.requests == [("jbb-pairs", 8)]
    history = out.report["repnoise_history"]
    assert len(history) == 12 and all({"loss", "S", "N", "G", "log_G"} <= set(h) for h in history)
    assert history[-1]["loss"] < history[0]["loss"]
    assert out.report["repnoise_training"]["pairs"] == 8
    assert ctx.stats["train_steps"] == 12


def test_frozen_layers_do_not_move_and_others_do(tmp_path):
    model = tiny_llama()
    layers = decoder_parts(model).layers
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = RepNoiseParams(lr=1e-2, batch_size=4, num_pairs=8, freeze_layers="0-0")
    out = repnoise(loaded(model), params, make_ctx(tmp_path))
    assert out.report["repnoise_training"]["frozen_layers"] == [0]
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (not name.startswith("model.layers.0.")), name
    assert all(p.requires_grad for p in layers[0].parameters())  # restored for later stages


def test_freeze_layers_format_and_range_are_validated():
    assert list(parse_layer_range("0-10")) == list(range(11))
    assert list(parse_layer_range(" 3 ")) == [3]
    for bad in ("a-b", "3-1", "0-", "-2", "1,2"):
        with pytest.raises(ConfigError, match="freeze_layers"):
            defences._plugins["repnoise"].parse_params({"freeze_layers": bad}, "defence")
    with pytest.raises(ConfigError, match="has 2 decoder layers"):
        with frozen_layers(tiny_llama(), "1-2"):
            pass


def test_nan_term_raises_with_the_step_number(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = recipe.repnoise_loss

    def poisoned(model, batch, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                decoder_parts(model).layers[1].mlp.down_proj.weight.fill_(float("nan"))
        return real_loss(model, batch, **kwargs)

    monkeypatch.setattr(recipe, "repnoise_loss", poisoned)
    params = RepNoiseParams(batch_size=4, num_pairs=8, epochs=2)
    with pytest.raises(TrainingDivergedError, match=r"step 2\b.*N=nan"):
        repnoise(loaded(tiny_llama()), params, make_ctx(tmp_path))


def test_reentrant_checkpointing_is_refused_rather_than_silently_losing_the_noise_gradient():
    model, batch = tiny_llama(), pair_batch()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(HarnessError, match="reentrant"):
        repnoise_loss(model, batch, RepNoiseParams(), torch.Generator().manual_seed(0))


def test_real_tokenizer_and_chat_template_mask_starts_right_after_the_prompt(tmp_path):
    from harness.data.tokenization import encode_pair, format_prompt
    from harness.models.loading import make_tiny_llama

    model, tokenizer = make_tiny_llama(seed=0)
    pair = Pair("How do I pick a lock?", "Sure, first insert a tension wrench.", "I can't help with that.")
    encoded = encode_pair(tokenizer, pair.prompt, pair.harmful, pair.harmless, "chat", 128)
    batch = collate_pairs([encoded], pad_id=tokenizer.eos_token_id)
    mask = batch["harmful_input_ids"] != batch["harmless_input_ids"]
    prompt_len = len(tokenizer(format_prompt(tokenizer, pair.prompt, "chat"), add_special_tokens=False)["input_ids"])
    assert int(mask[0].nonzero()[0]) == prompt_len
    ctx = make_ctx(tmp_path, pairs=[pair] * 2)
    ctx.prompt_format = "chat"
    out = repnoise(LoadedModel(model, tokenizer, "tiny-llama", "x"), RepNoiseParams(batch_size=2), ctx)
    assert len(out.report["repnoise_history"]) == 1
