
import pytest
import torch

from harness.errors import HarnessError
from harness.models.loading import TINY_MODEL, load_model, load_saved, model_fingerprint, resolve_dtype, save_model


def test_tiny_llama_is_small_deterministic_and_has_a_chat_tokenizer():
    a = load_model(TINY_MODEL, device="cpu")
    b = load_model(TINY_MODEL, device="cpu")
    n_params = sum(p.numel() for p in a.model.parameters())
    assert n_params < 1_000_000
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert a.tokenizer.chat_template and a.tokenizer.pad_token is not None
    assert a.fingerprint == model_fingerprint(TINY_MODEL)


def test_saved_model_is_safetensors_and_reloads_identically(tmp_path):
    loaded = load_model(TINY_MODEL, device="cpu")
    save_model(loaded, tmp_path / "m")
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert "model.safetensors" in names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    again = load_saved(tmp_path / "m", device="cpu")
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(loaded.model(input_ids=ids).logits, again.model(input_ids=ids).logits)
    assert again.fingerprint == model_fingerprint(str(tmp_path / "m"))


def test_pickled_checkpoints_are_never_loaded(tmp_path, monkeypatch):
    loaded = load_model(TINY_MODEL, device="cpu")
    target = tmp_path / "p"
    loaded.model.config.save_pretrained(target)
    loaded.tokenizer.save_pretrained(target)
    torch.save(loaded.model.state_dict(), target / "pytorch_model.bin")  # a pickle, no safetensors

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load (unpickling) must never be called")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(HarnessError, match="safetensors"):
        load_model(str(target), device="cpu")


def test_dtype_and_device_choices():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(HarnessError):
        resolve_dtype("float8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(HarnessError, match="no CUDA GPU"):
            load_model(TINY_MODEL, device="cuda")


def test_a_file_reference_gets_a_clear_error(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(HarnessError, match="is a file"):
        load_model(str(path))
