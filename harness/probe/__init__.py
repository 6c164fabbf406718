"""``harness probe``: the paper's depth analysis (PAPER.md §1) as a command, for any cached run.

Per layer, for the base, defended and attacked models of a run: linear-probe accuracy on harmful vs
harmless prompts, the logit lens on harmful vs harmless continuations, the weight change between
stages and the MMD of harmful activations to Gaussian noise. One module per job:

- ``params``: what a probe is configured by (part of its cache key);
- ``data``: the probe's prompts and pairs, disjoint from the run's training and evaluation data;
- ``features``: activations of one model (via :mod:`harness.models.activations`);
- ``linear``, ``lens``, ``weights``, ``noise``: the four measurements;
- ``stages``: a run directory → its cached model stages; ``analysis``: one stage's cached result;
- ``report``: probe.json and the tests between stages; ``view``: the terminal table; ``command``: the CLI.
"""
