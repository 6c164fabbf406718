"""Cost of one RepNoise optimizer step against one plain SFT step over the same 2B sequences.

Rows, each on the same model shape and the same token batch (B synthetic pairs, shared prompt,
harmful answer filling the sequence, harmless answer about half as long, EOS-padded):
  sft        harness.train.sft.causal_lm_loss on the 2B sequences stacked (full logits, padding ignored)
  repnoise   defences.repnoise.repnoise_loss (one forward, LM head only at masked positions, chunked)
  reference  tests/repnoise_reference.py: PAPER.md §3 transcribed (two forwards, L+2 full logit
             tensors, explicit pairwise MMD), i.e. what a straightforward port costs
A step is zero_grad + loss + backward + Adam step. Time: median over --steps timed steps after
--warmup untimed ones (the warm-up also allocates Adam's state).

Every row runs in its own child process so that one row's memory cannot colour another's.
Peak memory:
  cuda  torch.cuda.max_memory_allocated over the timed steps (stats reset after warm-up): tensors
        only, allocator cache excluded.
  cpu   the process's resident-set high-water mark (VmHWM in /proc/self/status) over the timed
        steps, reset after warm-up by writing 5 to /proc/self/clear_refs (Linux >= 4.0). The child
        runs with a fixed glibc mmap threshold (MALLOC_MMAP_THRESHOLD_) so large tensors are
        returned to the OS when freed instead of lingering in the heap. Includes everything the
        process holds (weights, Adam state, Python, libraries).
"peak" is the whole-process/allocated peak during a step; "step" is that peak minus what was
resident when the step began (weights + Adam state, gradients freed), i.e. the step's own memory.
The last line gives the matmul-FLOP floor of the time ratio for the shape and mask: exact RepNoise
projects K + (L+1)K masked rows through the LM head where SFT projects 2BT, so models whose head is
a large share of their FLOPs (small models, big vocabularies) cannot get near 1x.

Usage: python benchmarks/repnoise_step.py --model smollm2-135m --device cpu --batch-pairs 2 --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

ROWS = ("sft", "repnoise", "reference")
# Random-init shapes (Llama family); smollm2-135m loads the embedded weights instead.
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096),
    "smollm2-135m-random": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
}
EMBEDDED = "smollm2-135m"
EOS = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=EMBEDDED, choices=[EMBEDDED, *SHAPES])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-pairs", type=int, default=2, help="B: pairs per step (2B sequences)")
    p.add_argument("--seq-len", type=int, default=128, help="T: tokens per sequence")
    p.add_argument("--prompt-frac", type=float, default=0.25, help="share of T taken by the common prompt")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row before timing")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    return p.parse_args(argv)


# --- one row (child process) --------------------------------------------------------------------


def build_model(args: argparse.Namespace):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, args.dtype)
    if args.model == EMBEDDED:
        from harness.models.loading import EMBEDDED_MODEL, load_model

        return load_model(EMBEDDED_MODEL, device=args.device, dtype=args.dtype).model
    config = LlamaConfig(max_position_embeddings=max(2048, args.seq_len), eos_token_id=EOS, pad_token_id=EOS,
                         **SHAPES[args.model])
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no float32 copy of a 7B model
    try:
        with torch.device(args.device):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)


def build_batch(args: argparse.Namespace, vocab: int, device: str) -> dict:
    """Same tokens in every row: prompt shared, harmful answer to the end, harmless answer half as long."""
    import torch

    from harness.data.tokenization import collate_pairs

    g = torch.Generator().manual_seed(1234)
    prompt_len = max(1, int(args.prompt_frac * args.seq_len))
    answer_len = args.seq_len - prompt_len - 1
    examples = []
    for _ in range(args.batch_pairs):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
        harmful = torch.randint(3, vocab, (answer_len,), generator=g).tolist()
        harmless = torch.randint(3, vocab, (max(1, answer_len // 2),), generator=g).tolist()
        examples.append({"harmful": prompt + harmful + [EOS], "harmless": prompt + harmless + [EOS]})
    return {k: v.to(device) for k, v in collate_pairs(examples, pad_id=EOS).items()}


def make_loss(row: str):
    import torch

    from defences.repnoise import RepNoiseParams, repnoise_loss
    from harness.data.tokenization import IGNORE_INDEX
    from harness.train.sft import causal_lm_loss

    params = RepNoiseParams()
    if row == "sft":
        def sft(model, batch, generator):
            ids = torch.cat([batch["harmful_input_ids"], batch["harmless_input_ids"]])
            attention = torch.cat([batch["harmful_attention_mask"], batch["harmless_attention_mask"]])
            labels = ids.masked_fill(attention == 0, IGNORE_INDEX)
            return causal_lm_loss(model, {"input_ids": ids, "attention_mask": attention, "labels": labels})
        return sft
    if row == "repnoise":
        return lambda model, batch, generator: repnoise_loss(model, batch, params, generator)[0]
    from repnoise_reference import reference_loss

    return lambda model, batch, generator: reference_loss(model, batch, params, generator)[0]


class Memory:
    """Peak memory of a phase: CUDA allocator stats, or the process RSS high-water mark on CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def current(self) -> int:
        import torch

        if self.cuda:
            return torch.cuda.memory_allocated()
        return _status_kib("VmRSS") * 1024

    def reset_peak(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _status_kib("VmHWM") * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_row(args: argparse.Namespace) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    model.train()
    batch = build_batch(args, model.config.vocab_size, args.device)
    loss_fn = make_loss(args.row)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-7)
    generator = torch.Generator(device=args.device).manual_seed(0)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    memory = Memory(args.device)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch, generator)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    optimizer.zero_grad(set_to_none=True)
    times, peaks, starts = [], [], []
    for _ in range(args.steps):
        sync()
        starts.append(memory.current())
        memory.reset_peak()
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
        peaks.append(memory.peak())
    harmful, harmless = batch["harmful_input_ids"], batch["harmless_input_ids"]
    masked_targets = int((harmful != harmless)[:, 1:].sum())
    return {
        "row": args.row,
        "seconds": statistics.median(times),
        "peak_bytes": max(peaks),
        "step_bytes": max(p - s for p, s in zip(peaks, starts)),
        "loss": loss,
        "masked_fraction": float((harmful != harmless).float().mean()),
        "layers": model.config.num_hidden_layers,
        "vocab": model.config.vocab_size,
        "hidden": model.config.hidden_size,
        "layer_params": sum(p.numel() for p in model.model.layers.parameters()),
        "tokens": int(harmful.numel() + harmless.numel()),
        "masked_targets": masked_targets,
    }


def flop_ratio(r: dict) -> float:
    """Matmul-FLOP floor of RepNoise / SFT (attention scores ignored): body FLOPs are the same; the
    LM head runs over 2BT rows in SFT, over K + (L+1) K masked rows in RepNoise (K masked targets)."""
    head = r["hidden"] * r["vocab"]
    body = r["layer_params"] * r["tokens"]
    repnoise_rows = r["masked_targets"] * (r["layers"] + 2)
    return (body + head * repnoise_rows) / (body + head * r["tokens"])


# --- the driver (parent process) ----------------------------------------------------------------


def run_child(argv: list[str], row: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    done = subprocess.run(
        [sys.executable, __file__, *argv, "--row", row], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(f"row {row} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.row:
        print(json.dumps(run_row(args)))
        return
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    results = {row: run_child(argv, row) for row in rows}
    print(
        f"model={args.model} device={args.device} dtype={args.dtype} B={args.batch_pairs} pairs "
        f"({2 * args.batch_pairs} sequences) T={args.seq_len} steps={args.steps} (+{args.warmup} warm-up) "
        f"L={next(iter(results.values()))['layers']} V={next(iter(results.values()))['vocab']} "
        f"harmful/harmless differ at {next(iter(results.values()))['masked_fraction']:.0%} of positions"
    )
    base = results.get("sft")
    print(f"{'row':<10} {'time/step':>10} {'peak':>10} {'step mem':>10} {'x time':>7} {'x peak':>7} {'x step':>7}")
    for row, r in results.items():
        ratios = (
            f"{r['seconds'] / base['seconds']:>7.2f} {r['peak_bytes'] / base['peak_bytes']:>7.2f} "
            f"{r['step_bytes'] / base['step_bytes']:>7.2f}"
            if base else ""
        )
        print(f"{row:<10} {r['seconds'] * 1000:>8.1f}ms {r['peak_bytes'] / 2**20:>8.0f}Mi "
              f"{r['step_bytes'] / 2**20:>8.0f}Mi {ratios}")
    first = next(iter(results.values()))
    print(f"matmul-FLOP floor of repnoise/sft for this shape and mask: {flop_ratio(first):.2f}x")
    print(json.dumps({"settings": vars(args), "results": results}))


if __name__ == "__main__":
    main()
