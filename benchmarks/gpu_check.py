"""One-command GPU check: the measurements no CPU run can make, in one table, within 10 minutes on one GPU.

Parts (each a child process with its own time limit, so one failure or hang does not cost the others):
  repnoise-step  benchmarks/repnoise_step.py on the Llama-2-7B shape in bf16: time and peak memory of a
                 RepNoise step against an SFT step and against the straightforward reference loss, and
                 the matmul-FLOP floor of the time ratio (targets: time <= 1.10x the floor, peak <= 1.15x SFT)
  generation     benchmarks/generation.py: batched HF generation vs vLLM (where importable), 300 prompts x
                 50 new tokens, tokens/s
  pipeline       `harness run --profile paper` on a randomly initialised ~1B Llama (SmolLM2 tokenizer), a few
                 optimizer steps per stage (RepNoise, full-parameter attack), harmfulness evaluated before
                 and after; wall time, peak memory and the stage times from results.json

  --cpu-smoke    the same three parts at toy sizes on the CPU (tiny shapes, a few prompts): tests the check
                 itself, not the GPU.
  --dry-run      print the commands and exit.

Usage: benchmarks/gpu_check.sh [--cpu-smoke | --dry-run] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable

# ~1.07B parameters with the SmolLM2 tokenizer (49152 tokens, tied): Llama-3.2-1B's body.
ONE_B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, tie_word_embeddings=True)
TOY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, tie_word_embeddings=True)


@dataclass
class Part:
    name: str
    command: list[str]
    timeout: int
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (metric, value, note)
    status: str = "not run"
    seconds: float = 0.0
    log: str = ""


def sizes(smoke: bool) -> dict:
    if smoke:
        return {"device": "cpu", "dtype": "float32", "shape": "tiny", "pairs": "2", "seq": "32", "steps": "1",
                "prompts": "4", "new_tokens": "4", "model_shape": TOY, "pipeline_pairs": 8, "pipeline_samples": 8,
                "eval_prompts": 4, "max_new": 4}
    return {"device": "cuda", "dtype": "bfloat16", "shape": "llama-7b", "pairs": "4", "seq": "256", "steps": "5",
            "prompts": "300", "new_tokens": "50", "model_shape": ONE_B, "pipeline_pairs": 32, "pipeline_samples": 32,
            "eval_prompts": 100, "max_new": 50}


def vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def plan(smoke: bool, workdir: Path) -> list[Part]:
    s = sizes(smoke)
    step = [PY, str(ROOT / "benchmarks/repnoise_step.py"), "--model", s["shape"], "--device", s["device"],
            "--dtype", s["dtype"], "--batch-pairs", s["pairs"], "--seq-len", s["seq"], "--steps", s["steps"],
            "--warmup", "1"]
    generation = [PY, str(ROOT / "benchmarks/generation.py"), "--model",
                  "tiny-llama" if smoke else "smollm2-135m-instruct", "--device", s["device"], "--dtype", s["dtype"],
                  "--prompts", s["prompts"], "--max-new-tokens", s["new_tokens"], "--batch-size", "64",
                  "--skip-single", *(["--vllm"] if vllm_importable() and not smoke else [])]
    model_dir = workdir / "random-1b"
    sets = {
        "defence.num_pairs": s["pipeline_pairs"], "defence.batch_size": 8, "attack.num_samples": s["pipeline_samples"],
        "attack.batch_size": 4, "evaluate.harmfulness.num_prompts": s["eval_prompts"],
        "evaluate.harmfulness.generation.max_new_tokens": s["max_new"],
        # the keyword judge: the trained default judge's build would take minutes of this check's ten
        "evaluate.harmfulness.judges": "[{name: refusal-keywords}]",
    }
    pipeline = [PY, str(Path(__file__).resolve()), "--make-model", str(model_dir), *(["--cpu-smoke"] if smoke else []),
                "&&", str(Path(PY).with_name("harness")), "run", "--model", str(model_dir), "--profile", "paper",
                "--defence", "repnoise", "--attack", "full-ft", "--no-reference", "--evaluate", "harmfulness",
                "--device", s["device"], "--dtype", s["dtype"], "--cache-dir", str(workdir / "cache"),
                "--output-dir", str(workdir / "runs"), *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    return [Part("repnoise-step", step, 60 if smoke else 240), Part("generation", generation, 120 if smoke else 150),
            Part("pipeline", pipeline, 240)]


def make_model(directory: Path, smoke: bool) -> None:
    """A randomly initialised Llama with the SmolLM2 tokenizer, saved as safetensors (a model reference)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from harness.models.loading import _tokenizer_dir, default_asset_dir

    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir(default_asset_dir()))
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                         max_position_embeddings=2048, **sizes(smoke)["model_shape"])
    torch.manual_seed(0)
    device = "cpu" if smoke or not torch.cuda.is_available() else "cuda"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.float32 if smoke else torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    print(f"random model: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters in {directory}")


def run_part(part: Part) -> None:
    shell = " ".join(a if a == "&&" else _quote(a) for a in part.command)
    started = time.perf_counter()
    try:
        done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=part.timeout,
                              cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        part.log = done.stdout + done.stderr
        part.status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
    except subprocess.TimeoutExpired as exc:
        part.log = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        part.status = f"timed out after {part.timeout}s"
    part.seconds = time.perf_counter() - started


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def parse_repnoise_step(log: str) -> list[tuple[str, str, str]]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from repnoise_step import flop_ratio

    lines = [line for line in log.splitlines() if line.startswith('{"settings"')]
    if not lines:
        return []
    results = json.loads(lines[-1])["results"]
    sft, rows = results.get("sft"), []
    floor = flop_ratio(next(iter(results.values())))
    for name, r in results.items():
        rows.append((f"{name} time/step", f"{r['seconds'] * 1000:.1f} ms", ""))
        rows.append((f"{name} peak memory", f"{r['peak_bytes'] / 2**30:.2f} GiB", ""))
    if sft and "repnoise" in results:
        time_ratio = results["repnoise"]["seconds"] / sft["seconds"]
        peak_ratio = results["repnoise"]["peak_bytes"] / sft["peak_bytes"]
        rows.append(("repnoise/sft time", f"{time_ratio:.2f}x", f"floor {floor:.2f}x; target <= {1.10 * floor:.2f}x "
                     f"({'met' if time_ratio <= 1.10 * floor else 'missed'})"))
        rows.append(("repnoise/sft peak", f"{peak_ratio:.2f}x",
                     f"target <= 1.15x ({'met' if peak_ratio <= 1.15 else 'missed'})"))
    if sft and "reference" in results:
        reference = results["reference"]
        rows.append(("reference/sft time", f"{reference['seconds'] / sft['seconds']:.2f}x", "straightforward loss"))
        rows.append(("reference/sft peak", f"{reference['peak_bytes'] / sft['peak_bytes']:.2f}x", ""))
    return rows


GENERATION_ROW = re.compile(
    r"^(?P<name>\S.*?)\s+(?P<seconds>[\d.]+)s\s+(?P<tokens>\d+) tokens\s+(?P<rate>[\d.]+) tok/s")


def parse_generation(log: str) -> list[tuple[str, str, str]]:
    rows = []
    for line in log.splitlines():
        match = GENERATION_ROW.match(line)
        if match:
            rows.append((match["name"].strip(), f"{float(match['rate']):.0f} tok/s",
                         f"{match['tokens']} tokens in {match['seconds']}s"))
        elif line.startswith(("vllm engine start", "greedy outputs identical")):
            rows.append((line.split(":")[0], line.split(":")[-1].strip(), ""))
    if not vllm_importable():
        rows.append(("vllm", "not importable", "pip install 'harmful-ft-harness[vllm]' to compare"))
    return rows


def parse_pipeline(log: str, workdir: Path) -> list[tuple[str, str, str]]:
    found = sorted((workdir / "runs").glob("*/results.json"))
    if not found:
        return []
    results = json.loads(found[-1].read_text())
    rows = []
    for label, stage in results.get("stages", {}).items():
        stats = stage.get("stats", {})
        rows.append((f"{label} ({stage.get('plugin')})", f"{stats.get('wall_seconds', 0):.1f} s",
                     f"{stats.get('train_steps', '?')} steps, peak {stats.get('peak_memory_mb', 0) / 1024:.1f} GiB"))
    harm = results.get("summary", {}).get("branches", {}).get("defended", {})
    for when in ("pre_attack", "post_attack"):
        h = harm.get(when, {}).get("harmfulness")
        if h:
            rows.append((f"harmfulness {when}", f"{h['mean']:.3f}", f"n={h['n']} ({h['judge']})"))
    return rows


def table(parts: list[Part], smoke: bool) -> str:
    lines = [f"GPU check ({'CPU smoke run: toy sizes, not a GPU measurement' if smoke else 'one GPU'})",
             f"{'part':<14} {'metric':<34} {'value':>16}  note"]
    for part in parts:
        lines.append(f"{part.name:<14} {'status':<34} {part.status:>16}  {part.seconds:.0f}s")
        for metric, value, note in part.rows:
            lines.append(f"{'':<14} {metric:<34} {value:>16}  {note}")
    return "\n".join(lines)


def gpu_description() -> str:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU: checks the check")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument("--out", type=Path, help="directory for the logs, the table and gpu_check.json")
    p.add_argument("--only", help="comma-separated parts to run (repnoise-step, generation, pipeline)")
    p.add_argument("--make-model", type=Path, help=argparse.SUPPRESS)  # internal: the pipeline part's model
    args = p.parse_args(argv)
    if args.make_model:
        make_model(args.make_model, args.cpu_smoke)
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="gpu-check-")) if args.out is None else args.out
    workdir.mkdir(parents=True, exist_ok=True)
    parts = plan(args.cpu_smoke, workdir)
    if args.only:
        wanted = set(args.only.split(","))
        parts = [part for part in parts if part.name in wanted]
    if args.dry_run:
        for part in parts:
            print(f"# {part.name} (limit {part.timeout}s)\n{' '.join(part.command)}")
        return 0
    if not args.cpu_smoke and gpu_description() == "no CUDA device":
        print("No CUDA device is visible: run on a GPU machine, or use --cpu-smoke to test the check itself.")
        return 2
    print(f"device: {'cpu (smoke)' if args.cpu_smoke else gpu_description()}; logs in {workdir}", flush=True)
    for part in parts:
        print(f"running {part.name} (limit {part.timeout}s)…", flush=True)
        run_part(part)
        (workdir / f"{part.name}.log").write_text(part.log)
        if part.name == "repnoise-step":
            part.rows = parse_repnoise_step(part.log)
        elif part.name == "generation":
            part.rows = parse_generation(part.log)
        else:
            part.rows = parse_pipeline(part.log, workdir)
        if part.status != "ok":
            part.rows.append(("last log line", (part.log.strip().splitlines() or ["(none)"])[-1][:60], ""))
    rendered = table(parts, args.cpu_smoke)
    print(rendered)
    (workdir / "table.txt").write_text(rendered + "\n")
    (workdir / "gpu_check.json").write_text(json.dumps(
        {"device": "cpu-smoke" if args.cpu_smoke else gpu_description(),
         "parts": [{"name": x.name, "status": x.status, "seconds": x.seconds, "rows": x.rows} for x in parts]},
        indent=2))
    return 0 if all(part.status == "ok" for part in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
