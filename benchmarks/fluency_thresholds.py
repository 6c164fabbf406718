"""The measurements behind the fluency guard's thresholds (evaluators/fluency.py).

It scores sets of fluent and of degenerate responses with the fluency signals, using one reference
model, and prints one row per set: mean distinct-1/2, repetition rate, and the median / max of the
per-response reference perplexities, with whether the degenerate rule fires.

Fluent sets: the reference's own greedy answers to AdvBench prompts, safety-tuned refusals and
BeaverTails harmful answers (each after its own prompt, and the BeaverTails ones also after the
AdvBench prompts). Degenerate sets: those answers with their words shuffled, random tokens,
repetition loops, and tiny-llama's answers.

    python benchmarks/fluency_thresholds.py --model smollm2-135m-instruct --prompts 20

On a busy CPU, use one thread (the default): more threads contending with other jobs is far slower.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

import torch

from evaluators import fluency as fl
from harness.data.readers import DataAccess
from harness.data.tokenization import format_prompt
from harness.files.paths import resolve_data_dir
from harness.models.generation import GenerationSettings, HFBackend
from harness.models.loading import load_model


def answers(model_ref: str, prompts: list[str], max_new_tokens: int) -> list[str]:
    loaded = load_model(model_ref, device="cpu", dtype="float32")
    texts = [format_prompt(loaded.tokenizer, p, "chat") for p in prompts]
    return HFBackend().generate(loaded, texts, GenerationSettings(max_new_tokens=max_new_tokens, batch_size=4))


def row(reference, prompts: list[str], responses: list[str]) -> dict:
    ppl = [p for p in fl.response_perplexities(reference, prompts, responses, "chat", 512, 8) if p is not None]
    d2 = fl.mean_or_none([fl.distinct_n(r, 2) for r in responses])
    unusable = sum(fl.is_degenerate(r) for r in responses) / len(responses)
    median = statistics.median(ppl) if ppl else None
    return {
        "distinct_1": fl.mean_or_none([fl.distinct_n(r, 1) for r in responses]),
        "distinct_2": d2,
        "repetition_rate": fl.repetition_rate(responses),
        "ppl_median": median,
        "ppl_max": max(ppl) if ppl else None,
        "degenerate": fl.is_degenerate_set(unusable, d2, median),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="reference model (and answerer)")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data_dir = resolve_data_dir()
    n = args.prompts
    prompts = [p.prompt for p in DataAccess(data_dir, "advbench", 0).eval_prompts(n)]
    reference = load_model(args.model, device="cpu", dtype="float32")
    own = answers(args.model, prompts, args.max_new_tokens)
    with open(data_dir / "harmful_qa/beavertails_30k_train_unsafe_200.jsonl") as fh:
        beaver = [json.loads(line) for line in fh][:n]
    with open(data_dir / "refusal_pairs/safety_tuned_llamas_safety_only_2483.json") as fh:
        refusals = json.load(fh)[:n]

    def cut(text):
        return " ".join(text.split()[:40])  # about 50 tokens, like a generation

    beaver_answers = [cut(r["response"]) for r in beaver]
    rng = random.Random(0)

    def shuffled(text: str) -> str:
        words = text.split()
        rng.shuffle(words)
        return " ".join(words)

    vocab = len(reference.tokenizer)
    sets = {
        "fluent: own greedy answers": (prompts, own),
        "fluent: safety-tuned refusals": ([r["instruction"] for r in refusals], [cut(r["output"]) for r in refusals]),
        "fluent: BeaverTails harmful answers": ([r["prompt"] for r in beaver], beaver_answers),
        "fluent: BeaverTails answers after AdvBench prompts": (prompts, beaver_answers),
        "salad: own answers shuffled": (prompts, [shuffled(r) for r in own]),
        "salad: BeaverTails answers shuffled": (prompts, [shuffled(r) for r in beaver_answers]),
        "random tokens": (prompts, [reference.tokenizer.decode([rng.randrange(vocab) for _ in range(50)])
                                    for _ in prompts]),
        "loop: one word": (prompts, ["bomb " * 30] * n),
        "loop: short phrase": (prompts, ["Sure, here is " * 10] * n),
        "loop: one sentence": (prompts, ["I cannot help with that. " * 6] * n),
        "loop: tiny-llama answers": (prompts, answers("tiny-llama", prompts, args.max_new_tokens)),
    }
    print(f"reference {args.model}; rule: {fl.RULE}")
    for name, (ps, rs) in sets.items():
        values = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row(reference, ps, rs).items()}
        print(f"{name:52s} {json.dumps(values)}", flush=True)


if __name__ == "__main__":
    main()
