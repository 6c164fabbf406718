"""Random (PAPER.md §5, Table 1's lower bound): the same architecture with freshly initialised weights.

Not a defence one would deploy: the row shows what "no harmful capability at all" scores (a model
that cannot be made harmful by a short attack, because it cannot produce coherent text), the
floor against which a defence's post-attack harm is read.

A fresh model is built from a copy of the config with the architecture's own initialisation
(``type(model)._from_config``, i.e. transformers' ``_init_weights``: normal(0, initializer_range)
Linear and embedding weights, unit norms) and its weights are copied into the loaded model in
place, keeping dtype, device, tied weights, config and tokenizer. Re-running ``_init_weights`` on
the loaded model instead would be a no-op in transformers 5.x: weights loaded from a checkpoint are
flagged as initialised and skipped. The generator is seeded from ``ctx.seed`` mixed with this
plugin's name, on the CPU, so the weights are the same on any device and never coincide with a
tiny-llama base built with the same seed.
"""

from __future__ import annotations

import copy

import torch

from harness.api import LoadedModel, NoParams, StageContext, Trained, defences, stable_hash, unwrap


def init_seed(seed: int) -> int:
    return int(stable_hash({"defence": "random-init", "seed": seed}), 16) % (2**63)


@defences.register("random-init", params=NoParams,
                   description="Random: re-initialise every weight of the same architecture (the paper's lower bound)")
def random_init(model: LoadedModel, params: NoParams, ctx: StageContext) -> Trained:
    """Replace every weight of ``model.model`` with a seeded fresh initialisation, in place."""
    base = unwrap(model.model)
    dtype = model.dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed(ctx.seed))
        fresh = type(base)._from_config(copy.deepcopy(base.config), dtype=dtype)  # CPU, the seeded generator
    with torch.no_grad():
        base.load_state_dict(fresh.state_dict())
    del fresh
    return Trained(model, {"random_init": {"seed": ctx.seed, "init_seed": init_seed(ctx.seed)}})
