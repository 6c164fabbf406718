"""Generation throughput: batched HF backend vs one prompt at a time (and vLLM where installed).

Same prompts, same greedy settings, one process, one run, so the ratio is meaningful on a noisy
machine. Prints tokens/s per backend and the ratio to the per-prompt baseline.

    python benchmarks/generation.py --model smollm2-135m-instruct --prompts 32 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import time

from harness.data import DataAccess
from harness.generation import GenerationSettings, HFBackend
from harness.models import load_model
from harness.paths import resolve_data_dir
from harness.tokenization import format_prompt


def count_new_tokens(tokenizer, outputs: list[str]) -> int:
    return sum(len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outputs)


def timed(backend, loaded, prompts, settings) -> tuple[float, int, list[str]]:
    start = time.perf_counter()
    outputs = backend.generate(loaded, prompts, settings)
    return time.perf_counter() - start, count_new_tokens(loaded.tokenizer, outputs), outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    data = DataAccess(resolve_data_dir(), "advbench", seed=0)
    prompts = [format_prompt(loaded.tokenizer, p.prompt, "chat") for p in data.eval_prompts(args.prompts)]
    backend = HFBackend()
    HFBackend().generate(loaded, prompts[:2], GenerationSettings(max_new_tokens=4, batch_size=2))  # warm-up

    rows = []
    seconds, tokens, single = timed(backend, loaded, prompts,
                                    GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=1))
    rows.append(("hf, one prompt at a time", seconds, tokens))
    seconds, tokens, batched = timed(backend, loaded, prompts,
                                     GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size))
    rows.append((f"hf, batched ({args.batch_size})", seconds, tokens))
    agree = sum(a == b for a, b in zip(single, batched)) / len(prompts)

    baseline = rows[0][2] / rows[0][1]
    print(f"model={args.model} prompts={len(prompts)} max_new_tokens={args.max_new_tokens} device={loaded.device}")
    for name, seconds, tokens in rows:
        rate = tokens / seconds
        print(f"{name:32s} {seconds:8.2f}s {tokens:6d} tokens {rate:8.1f} tok/s  ×{rate / baseline:.2f}")
    print(f"greedy outputs identical between batched and single: {agree:.0%}")


if __name__ == "__main__":
    main()
