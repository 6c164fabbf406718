"""RepNoise's loss transcribed directly from PAPER.md §3: the yardstick for the fast path.

Written like the paper's released code (two forwards, full [B, T, V] logits for the final layer and
every hidden state, explicit pairwise-difference MMD), minus its quirks (labels with id 0 dropped,
logits zeroed at unmasked predicting positions, hooks never removed, final norm applied twice).
Used by tests/test_repnoise.py and, as the "unoptimised" row, by benchmarks/repnoise_step.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.train.losses import MMD_BANDWIDTH_FACTORS


def ref_masked_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token CE averaged over target positions t >= 1 where mask[t] = 1."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    weights = mask[:, 1:].flatten().to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum()


def ref_mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    z = torch.cat([x, y]).to(torch.promote_types(x.dtype, torch.float32))
    n = z.shape[0]
    d2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    m = d2.detach().sum() / (n * n - n)
    k = sum(torch.exp(-d2 / (m * f)) for f in MMD_BANDWIDTH_FACTORS)
    b = x.shape[0]
    return (k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b]).mean()


def reference_loss(model, batch, params, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Total and terms for one batch; ``params`` is a RepNoiseParams; noise drawn layer 0 first."""
    harmful, harmless = batch["harmful_input_ids"], batch["harmless_input_ids"]
    harmful_attn, harmless_attn = batch["harmful_attention_mask"], batch["harmless_attention_mask"]
    L = model.config.num_hidden_layers
    if params.mask:
        m_harmful = m_harmless = harmful != harmless
    else:
        m_harmful, m_harmless = harmful_attn.bool(), harmless_attn.bool()
    m_retain = m_harmless if params.retain_mask else harmless_attn.bool()

    mlp_out: dict[int, torch.Tensor] = {}
    handles = [
        model.model.layers[i].mlp.register_forward_hook(lambda mod, a, out, i=i: mlp_out.__setitem__(i, out))
        for i in range(L)
    ]
    try:
        out = model(harmful, attention_mask=harmful_attn, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    harmless_out = model(harmless, attention_mask=harmless_attn)

    S = ref_masked_ce(harmless_out.logits, harmless, m_retain)
    total, terms = S, {"S": S}
    if params.noise:
        keep = m_harmful[..., None]
        B = harmful.shape[0]
        noise_terms = []
        for i in range(L):
            act = mlp_out[i] * keep
            noise = torch.randn(act.shape, generator=generator, device=act.device, dtype=torch.float32) * keep
            noise_terms.append(ref_mmd(act.reshape(B, -1), noise.reshape(B, -1)))
        N = sum(noise_terms) / L
        total = total + params.beta * N
        terms["N"] = N
    if params.ascent:
        c0 = ref_masked_ce(out.logits, harmful, m_harmful)
        if params.layerwise_ascent:
            hs = out.hidden_states
            assert len(hs) == L + 1
            cs = [ref_masked_ce(model.lm_head(model.model.norm(h)), harmful, m_harmful) for h in hs[:L]]
            # transformers 5.19 hands back hidden_states[L] with the final norm already applied.
            cs.append(ref_masked_ce(model.lm_head(hs[L]), harmful, m_harmful))
            G = (c0 + sum(cs)) / (L + 1) + 1
        else:
            G = c0 + 1
        total = total - params.alpha * torch.log(G)
        terms.update(G=G, log_G=torch.log(G))
    return total, terms
