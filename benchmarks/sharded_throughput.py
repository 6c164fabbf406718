"""Training throughput of sharded (FSDP2, data-parallel) runs against one process, same global batch.

Each configuration runs in freshly spawned processes: N ranks with (cores / N) torch threads each, every
rank joined to a gloo (CPU) or NCCL (GPU) group, training the model with the harness's own sharded step
(``harness.distributed.step.ShardedStep``, the path ``harness run --nproc N`` takes) on the causal-LM loss.
One process uses the plain single-process step. The global batch (examples × tokens) is the same for
every N; tokens/s counts every token of the global batch per optimizer step, median over the timed steps
after warm-up. The load average before and after is printed: on a shared machine it colours everything.

    python benchmarks/sharded_throughput.py --model smollm2-135m-instruct --nproc 1,2 --batch 8 --seq-len 128
    python benchmarks/sharded_throughput.py --model tiny-llama --steps 2 --warmup 1     # seconds, a smoke run
    python benchmarks/sharded_throughput.py --loss repnoise --nproc 1,2w,2              # RepNoise

``--loss repnoise`` trains RepNoise's loss on random (prompt, harmful, harmless) pairs; a count with ``w``
(``2w``) runs that many ranks the way an unmarked loss runs, every rank on the whole micro-batch (sharded
only), the baseline for its data-parallel mode.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--nproc", default="1,2", help="comma-separated process counts to compare; 2w: 2 ranks, "
                                                  "every rank on the whole batch")
    p.add_argument("--loss", default="sft", choices=["sft", "repnoise"])
    p.add_argument("--batch", type=int, default=8, help="global batch: examples per optimizer step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per example")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (Adam state, allocator)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the ranks")
    return p.parse_args(argv)


def _batch(vocab: int, args: argparse.Namespace, device):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (args.batch, args.seq_len), generator=g)
    if args.loss == "repnoise":  # pairs sharing the first half (the prompt), different answers after it
        other = ids.clone()
        other[:, args.seq_len // 2:] = torch.randint(3, vocab, (args.batch, args.seq_len - args.seq_len // 2),
                                                     generator=g)
        ones = torch.ones_like(ids).to(device)
        return {"harmful_input_ids": ids.to(device), "harmless_input_ids": other.to(device),
                "harmful_attention_mask": ones, "harmless_attention_mask": ones.clone()}
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": ids.clone().to(device)}


def _loss_fn(args: argparse.Namespace, whole_batch: bool):
    """The loss under test; ``whole_batch`` hides RepNoise's data-parallel mark (every rank, whole batch)."""
    from functools import partial

    import torch

    from harness.train.sft import causal_lm_loss

    if args.loss == "sft":
        return causal_lm_loss
    from defences.repnoise import RepNoiseParams, repnoise_loss

    loss = partial(repnoise_loss, params=RepNoiseParams(), generator=torch.Generator().manual_seed(0))
    return (lambda model, batch: loss(model, batch)) if whole_batch else loss


def _rank(rank: int, size: int, port: int, args: argparse.Namespace, out: str, whole_batch: bool = False) -> None:
    import contextlib

    import torch

    from harness.models.loading import load_model

    loss_fn = _loss_fn(args, whole_batch)
    torch.set_num_threads(max(1, args.cores // size))
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if size > 1:
        from harness.distributed.world import joined

        world_context = joined(rank, size, rank, device)
    else:
        world_context = contextlib.nullcontext()
    with world_context as world:
        model = load_model(args.model, device=str(device), dtype="float32").model
        batch = _batch(model.config.vocab_size, args, device)
        model.train()
        if world is None:
            params = list(model.parameters())

            def step_loss() -> torch.Tensor:
                output = loss_fn(model, batch)
                return output[0] if isinstance(output, tuple) else output
        else:
            from harness.distributed.step import ShardedStep

            sharded = ShardedStep(model, loss_fn, world, list(model.parameters()), fp32_optimizer=False)
            assert sharded.data_parallel != whole_batch
            params = sharded.parameters

            def step_loss() -> torch.Tensor:
                return sharded.forward(batch)[0]
        optimizer = torch.optim.AdamW(params, lr=1e-6)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        times = []
        for index in range(args.warmup + args.steps):
            sync()
            started = time.perf_counter()
            step_loss().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            if index >= args.warmup:
                times.append(time.perf_counter() - started)
        if rank == 0:
            Path(out).write_text(json.dumps({"nproc": f"{size}{'w' if whole_batch else ''}",
                                             "threads_per_rank": torch.get_num_threads(),
                                             "seconds": statistics.median(times), "times": times}))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(args: argparse.Namespace, count: str) -> dict:
    import torch.multiprocessing as mp

    nproc, whole_batch = int(count.rstrip("w")), count.endswith("w")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.start_processes(_rank, args=(nproc, _free_port(), args, out, whole_batch), nprocs=nproc,
                           start_method="spawn")
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    counts = [n.strip() for n in args.nproc.split(",")]
    load_before = os.getloadavg()
    results = [measure(args, n) for n in counts]
    load_after = os.getloadavg()
    tokens = args.batch * args.seq_len
    base = tokens / results[0]["seconds"]
    print(f"loss={args.loss} model={args.model} device={args.device} global batch {args.batch}×{args.seq_len} tokens, "
          f"{args.steps} timed steps (+{args.warmup}), {args.cores} cores, load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (1-min)")
    print(f"{'processes':>9} {'threads/rank':>12} {'s/step':>8} {'tokens/s':>9} {'speed-up':>8}")
    for r in results:
        rate = tokens / r["seconds"]
        print(f"{r['nproc']:>9} {r['threads_per_rank']:>12} {r['seconds']:>8.2f} {rate:>9.1f} {rate / base:>7.2f}x")
    print(json.dumps({"settings": vars(args), "load_before": load_before, "load_after": load_after,
                      "results": results}))


if __name__ == "__main__":
    main()
