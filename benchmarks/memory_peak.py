"""Measure one training stage's peak memory and compare it with harness.resources.memory's estimate.

Runs a few steps of the harness's own training loop (``harness.train.loop.train``) on random token batches of
the requested shape, SFT (next-token CE) or RepNoise (its real loss), full-parameter or LoRA, with or
without gradient checkpointing, and prints one JSON line:

    {"measured": bytes above the loaded model, "estimated": the estimate's total minus the weights, "ratio": ...}

On CUDA the measurement is ``torch.cuda.max_memory_allocated`` above the allocation after loading; on the CPU it
is the peak resident set size (VmHWM, reset through /proc/self/clear_refs) above the resident size after
loading, with glibc told to serve every large block by mmap so freed tensors leave the resident set. Run it
in a fresh process (the test does): ``python benchmarks/memory_peak.py --model tiny-llama --batch 4 --seq 64``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # must be set before the process starts: re-exec once
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from harness.context import StageContext  # noqa: E402
from harness.models.loading import load_model, resolve_dtype  # noqa: E402
from harness.resources.memory import ModelShape, estimate, plan_for_params  # noqa: E402
from harness.train.loop import TrainSettings, train  # noqa: E402
from harness.train.sft import causal_lm_loss  # noqa: E402


def _rss(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _batches(vocab: int, args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(args.batch * args.steps):
        ids = torch.randint(3, vocab, (args.seq,), generator=generator)
        if args.stage == "repnoise":  # answers differ from the refusal after the first quarter
            other = ids.clone()
            other[args.seq // 4:] = torch.randint(3, vocab, (args.seq - args.seq // 4,), generator=generator)
            ones = torch.ones(args.seq, dtype=torch.long)
            examples.append({"harmful_input_ids": ids, "harmless_input_ids": other,
                             "harmful_attention_mask": ones, "harmless_attention_mask": ones})
        else:
            examples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--stage", choices=("sft", "repnoise"), default="sft")
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--lora-rank", type=int, default=None)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model = loaded.model
    shape = ModelShape.from_config(model.config.to_dict())
    settings = TrainSettings(lr=1e-5, batch_size=args.batch, optimizer=args.optimizer, warmup_ratio=0.0)
    if args.stage == "repnoise":
        from defences.repnoise import RepNoiseParams, repnoise_loss

        params = RepNoiseParams(batch_size=args.batch, max_length=args.seq, optimizer=args.optimizer)
        loss_fn = lambda m, b: repnoise_loss(m, b, params)  # noqa: E731
    else:
        loss_fn = causal_lm_loss
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=16, task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]))
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    examples = _batches(shape.vocab, args)
    ctx = StageContext(seed=0, device=args.device, dtype=args.dtype, data=None, cache_dir=Path("."),
                       workdir=Path("."), console=Console(quiet=True))

    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}

    device = torch.device(args.device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = _rss("VmRSS")
        if not _reset_peak():
            raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs); run on Linux >= 4.0")
    train(model, examples, collate, loss_fn, settings, ctx, description="measure")
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss("VmHWM")
    weight_bytes = torch.empty((), dtype=resolve_dtype(args.dtype, device)).element_size()
    plan_params = settings if args.stage == "sft" else params
    plan = plan_for_params(plan_params, args.stage, weight_bytes).but(
        seq_len=args.seq, lora_rank=args.lora_rank, checkpointing=args.checkpointing)
    parts = estimate(shape, plan).parts
    estimated = sum(v for k, v in parts.items() if k != "weights")
    measured = peak - baseline
    print(json.dumps({"model": args.model, "stage": args.stage, "batch": args.batch, "seq": args.seq,
                      "lora_rank": args.lora_rank, "checkpointing": args.checkpointing,
                      "measured": measured, "estimated": estimated, "ratio": round(estimated / measured, 3),
                      "parts": parts}))


if __name__ == "__main__":
    main()
