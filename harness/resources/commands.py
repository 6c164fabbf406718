"""CLI bodies: `harness cache ls | du | prune` and `harness memory` (kept here so harness/cli.py stays a list)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from harness.errors import HarnessError
from harness.terminal import plain, print_error, state

console = Console(stderr=True)
cache_app = typer.Typer(no_args_is_help=True, help="The stage cache: list it, measure it, prune it.")
CACHE_DIR = typer.Option(Path(".harness-cache"), "--cache-dir", envvar="HARNESS_CACHE_DIR", help="stage cache")


def _fail(exc: BaseException) -> None:
    if state["debug"]:
        raise exc
    print_error(console, exc)
    raise typer.Exit(code=2)


def _size(value: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def _age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.1f}{unit}"
    return f"{seconds:.0f}s"


@cache_app.command("ls")
def cache_ls(cache_dir: Path = CACHE_DIR,
             kind: Optional[str] = typer.Option(None, "--kind", help="defend, attack or evaluate")) -> None:
    """Every stored stage: key, kind, plugin, size, age, weights (kept, dropped, alias) and whether a live
    process holds it."""
    from harness.resources.cache_admin import list_stages

    try:
        table = Table(title=f"stages in {plain(cache_dir)}")
        for column in ("key", "kind", "plugin", "size", "age", "weights", "held", "parent"):
            table.add_column(column, no_wrap=column in ("key", "parent"))
        now = time.time()
        for entry in list_stages(cache_dir):
            if kind and entry.kind != kind:
                continue
            table.add_row(*map(plain, (entry.key, entry.kind if entry.complete else "incomplete", entry.plugin,
                                       _size(entry.size), _age(entry.age_seconds(now)), entry.weights,
                                       "yes" if entry.held else "", entry.parent or "")))
        Console().print(table)
    except HarnessError as exc:
        _fail(exc)


@cache_app.command("du")
def cache_du(cache_dir: Path = CACHE_DIR) -> None:
    """Bytes by stage kind and by the cache's other folders (judges, ...), and the free space left."""
    from harness.resources.cache_admin import usage
    from harness.resources.disk import free_bytes

    try:
        table = Table(title=f"disk use of {plain(cache_dir)}")
        table.add_column("part")
        table.add_column("size", justify="right")
        totals = usage(cache_dir)
        for name, size in totals.items():
            table.add_row(plain(name), _size(size))
        table.add_row("[bold]total[/]", f"[bold]{_size(sum(totals.values()))}[/]")
        table.add_row("free on its file system", _size(free_bytes(cache_dir)))
        Console().print(table)
    except HarnessError as exc:
        _fail(exc)


@cache_app.command("prune")
def cache_prune(
    cache_dir: Path = CACHE_DIR,
    older_than: Optional[str] = typer.Option(None, "--older-than", help="stages created before this age: 12h, 7d"),
    kinds: list[str] = typer.Option([], "--kind", help="defend, attack or evaluate (repeatable)"),
    larger_than: Optional[str] = typer.Option(None, "--larger-than", help="stages at least this big: 500MB, 2GB"),
    include_defended: bool = typer.Option(False, "--include-defended", help="also prune defended models"),
    weights_only: bool = typer.Option(False, "--weights-only",
                                      help="drop model weights, keep results and manifests (recreated when needed)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="say what would go, remove nothing"),
) -> None:
    """Remove stages matching every given criterion. Defended models stay unless --include-defended; a stage
    a live process holds is never touched."""
    from harness.resources.cache_admin import parse_age, parse_size, prune

    try:
        report = prune(cache_dir, older_than=parse_age(older_than) if older_than else None, kinds=tuple(kinds),
                       larger_than=parse_size(larger_than) if larger_than else None,
                       include_defended=include_defended, weights_only=weights_only, dry_run=dry_run)
        verb = "would free" if dry_run else "freed"
        for entry in report.removed:
            console.print(f"{'would remove' if dry_run else 'removed'} {plain(entry.key)} ({plain(entry.kind)} "
                          f"{plain(entry.plugin)}, {_size(entry.size)})")
        for entry in report.dropped:
            console.print(f"{'would drop' if dry_run else 'dropped'} the weights of {plain(entry.key)} "
                          f"({plain(entry.kind)} {plain(entry.plugin)})")
        for entry in report.held:
            console.print(f"[yellow]skipped[/] {plain(entry.key)}: a live process holds it")
        if report.kept_defended:
            console.print(f"kept {report.kept_defended} defended model stage(s) (--include-defended prunes them)")
        console.print(f"{verb} {_size(report.freed)}")
    except HarnessError as exc:
        _fail(exc)


def memory(
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m",
                              help="model reference or a named shape: llama-2-7b, llama-2-13b, llama-3-8b, "
                                   "llama-3-70b, smollm2-135m"),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    seq_len: int = typer.Option(256, "--seq-len", min=1),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adam, adamw, sgd, sgd-momentum"),
    dtype: str = typer.Option("float32", "--dtype", help="weights: float32, bfloat16 or float16"),
    fp32_optimizer: bool = typer.Option(False, "--fp32-optimizer", help="bf16 weights: float32 state + master copy"),
    checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", min=1, help="LoRA on every linear module"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="FSDP shards (devices)"),
    stage: str = typer.Option("sft", "--stage", help="sft (attacks, SFT defences) or repnoise"),
    device: str = typer.Option("cpu", "--device", help="whose free memory to compare with (cpu, cuda:N)"),
    device_memory: Optional[float] = typer.Option(None, "--device-memory", help="GiB per device to plan for"),
) -> None:
    """Estimate one training stage's memory per device; exit 2 with the options that would fit if it does not."""
    from harness.resources.memory import OPTIMIZER_STATES, TrainingPlan, check_fits, estimate, gib, shape_for_ref
    from harness.resources.memory import device_memory as probe

    try:
        shape = shape_for_ref(model)
        if shape is None:
            raise HarnessError(f"No config for {model!r} here (offline?); give a local model directory or a named "
                               "shape such as llama-2-7b.")
        widths = {"float32": 4, "bfloat16": 2, "float16": 2}
        if dtype not in widths:
            raise HarnessError(f"--dtype {dtype!r}: choose float32, bfloat16 or float16.")
        if stage not in ("sft", "repnoise"):
            raise HarnessError(f"--stage {stage!r}: choose sft or repnoise.")
        if optimizer not in OPTIMIZER_STATES:
            raise HarnessError(f"--optimizer {optimizer!r}: choose {', '.join(OPTIMIZER_STATES)}.")
        fp32_state = fp32_optimizer and widths[dtype] < 4
        plan = TrainingPlan(batch_size=batch_size, seq_len=seq_len, weight_bytes=widths[dtype], optimizer=optimizer,
                            state_bytes=4 if fp32_state else None, master_weights=fp32_state,
                            checkpointing=checkpointing, lora_rank=lora_rank, shards=nproc,
                            stage=stage)  # type: ignore[arg-type]
        table = Table(title=f"{plain(model)}: {shape.params / 1e9:.3g}B parameters, per device")
        table.add_column("part")
        table.add_column("memory", justify="right")
        for name, value in estimate(shape, plan).parts.items():
            table.add_row(name, gib(value))
        table.add_row("[bold]total[/]", f"[bold]{gib(estimate(shape, plan).total)}[/]")
        Console().print(table)
        available = probe(device_memory, device)
        check_fits(shape, plan, available, f"Training {model} ({batch_size}×{seq_len} tokens)")
        console.print(f"[green]fits[/]: {gib(available)} available")
    except HarnessError as exc:
        _fail(exc)
