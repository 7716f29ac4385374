"""Model sources, architecture reading, the offline Qwen2.5 tokenizer and loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from verif.model.loading import (
    LoadedModel,
    ModelSource,
    Arch,
    decoder_layers,
    load_model,
    o_projs,
    read_arch,
    resolve_dtype,
    resolve_source,
)

MISSION_IDS = {
    " Yes": 7414, "Yes": 9454, " yes": 9834, "yes": 9693,
    " No": 2308, "No": 2753, " no": 902, "no": 2152,
}
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------- resolve_source


def test_resolve_folder(seed_model_dir):
    src = resolve_source(str(seed_model_dir))
    assert src == ModelSource(str(seed_model_dir), "dir", str(seed_model_dir))
    assert src.name == Path(seed_model_dir).name


def test_resolve_packaged():
    src = resolve_source("packaged:smollm2-135m")
    assert src.kind == "gguf"
    assert src.gguf_file == SMOL_GGUF
    assert (Path(src.location) / SMOL_GGUF).is_file()
    assert src.name == "smollm2-135m"


def test_resolve_gguf_file():
    packaged = resolve_source("packaged:smollm2-135m")
    path = str(Path(packaged.location) / SMOL_GGUF)
    src = resolve_source(path)
    assert src.kind == "gguf"
    assert src.location == packaged.location
    assert src.gguf_file == SMOL_GGUF
    assert src.name == SMOL_GGUF


def test_resolve_gguf_file_relative(tmp_path, monkeypatch):
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")  # resolve_source classifies, it reads nothing
    monkeypatch.chdir(tmp_path)
    src = resolve_source("tiny.gguf")
    assert (src.kind, src.gguf_file, Path(src.location).resolve()) == ("gguf", "tiny.gguf", tmp_path.resolve())


@pytest.mark.parametrize("hub_id", ["Qwen/Qwen2.5-3B", "Jiayi-Pan/Tiny-Zero_R1", "org/model.v2"])
def test_resolve_hub_id_without_network(hub_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = resolve_source(hub_id)
    assert src == ModelSource(hub_id, "hub", hub_id)
    assert src.name == hub_id


@pytest.mark.parametrize(
    "spec", ["/nonexistent/verif/model", "./no_such_model", "~/no_such_model_dir_xyz", "missing.gguf", "a/b/c", "just-a-name"]
)
def test_resolve_missing_path(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        resolve_source(spec)
    msg = str(err.value)
    assert repr(spec) in msg
    for valid in ("config.json", ".gguf", "hub id", "packaged:smollm2-135m"):
        assert valid in msg


def test_resolve_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json") as err:
        resolve_source(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_resolve_unknown_packaged():
    with pytest.raises(ValueError) as err:
        resolve_source("packaged:gpt-17")
    msg = str(err.value)
    assert "'gpt-17'" in msg
    assert "packaged:smollm2-135m" in msg


@pytest.mark.parametrize("spec", ["", "   ", None])
def test_resolve_empty(spec):
    with pytest.raises(ValueError, match="non-empty"):
        resolve_source(spec)


# ---------------------------------------------------------------- read_arch


def test_read_arch_seed(seed_model_dir):
    arch = read_arch(resolve_source(str(seed_model_dir)))
    assert arch == Arch(
        family="qwen2", n_layers=36, n_heads=16, n_kv_heads=2, head_dim=8, hidden_size=128,
        intermediate_size=256, vocab_size=151936, tie_word_embeddings=True,
    )


def test_read_arch_smollm2():
    arch = read_arch(resolve_source("packaged:smollm2-135m"))
    assert arch.family == "llama"
    assert (arch.n_layers, arch.n_heads, arch.n_kv_heads, arch.head_dim) == (30, 9, 3, 64)
    assert arch.hidden_size == 576
    assert arch.vocab_size == 49152


def test_read_arch_unsupported_family(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_head=2, n_embd=8).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as err:
        read_arch(resolve_source(str(tmp_path)))
    msg = str(err.value)
    assert "'gpt2'" in msg and "not supported" in msg
    for family in ("qwen2", "llama", "mistral"):
        assert family in msg


def test_read_arch_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises((OSError, ValueError)) as err:
        read_arch(resolve_source(str(tmp_path)))
    assert str(tmp_path) in str(err.value)


def test_read_arch_matches_loaded(seed_model):
    assert read_arch(seed_model.source) == seed_model.arch


def test_config_is_read_once_per_file_version_and_handed_out_as_a_copy(seed_model_dir, tmp_path, monkeypatch):
    import json

    import transformers

    from verif.model import loading

    (tmp_path / "config.json").write_text((Path(seed_model_dir) / "config.json").read_text())
    want = read_arch(resolve_source(str(seed_model_dir)))
    reads = []
    real = transformers.AutoConfig.from_pretrained
    monkeypatch.setattr(loading.AutoConfig, "from_pretrained", lambda *a, **k: reads.append(a) or real(*a, **k))
    src = resolve_source(str(tmp_path))
    arch, length = read_arch(src), loading.read_context_length(src)
    assert len(reads) == 1 and arch == want
    mine = loading.read_config(src)
    mine.max_position_embeddings = 3  # a caller's change stays its own
    assert loading.read_context_length(src) == length and len(reads) == 1
    # a rewritten config is read again (another size, so the version differs even within one mtime tick)
    before = (tmp_path / "config.json").read_text()
    cfg = json.loads(before)
    cfg["max_position_embeddings"] = 12345
    after = json.dumps(cfg, indent=4)
    (tmp_path / "config.json").write_text(after if len(after) != len(before) else after + "\n")
    assert loading.read_context_length(src) == 12345 and len(reads) == 2


# ---------------------------------------------------------------- tokenizer


def test_qwen25_tokenizer_mission_ids(qwen_tokenizer):
    tok = qwen_tokenizer
    for text, tid in MISSION_IDS.items():
        assert tok.encode(text, add_special_tokens=False) == [tid], text
    assert len(tok) == 151643 + 3
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert tok.eos_token_id == tok.pad_token_id == 151643


def test_seed_model_tokenizer_round_trip(seed_model, qwen_tokenizer):
    tok = seed_model.tokenizer
    for text, tid in MISSION_IDS.items():
        assert tok.encode(text, add_special_tokens=False) == [tid], text
    text = "The User's attempt is 79 - 60 + 17 = 19 + 17 = 36. Therefore, the final answer is"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == qwen_tokenizer.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_qwen25_tokenizer_nfc(qwen_tokenizer):
    tok = qwen_tokenizer
    decomposed = "e\u0301"  # e + combining acute
    assert tok.encode(decomposed, add_special_tokens=False) == tok.encode("\u00e9", add_special_tokens=False)


# ---------------------------------------------------------------- loading


def test_loaded_seed_model(seed_model):
    assert isinstance(seed_model, LoadedModel)
    model = seed_model.model
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert next(model.parameters()).device.type == "cpu"
    assert seed_model.tokenizer.padding_side == "left"
    assert seed_model.tokenizer.pad_token_id is not None
    assert seed_model.source.kind == "dir"
    assert len(decoder_layers(model)) == 36
    projs = o_projs(model)
    assert len(projs) == 36
    assert all(p.bias is None and tuple(p.weight.shape) == (128, 128) for p in projs)


def test_loaded_smollm2(smollm2):
    assert smollm2.name == "smollm2-135m"
    assert smollm2.arch.n_layers == 30 and smollm2.arch.n_heads == 9
    assert not smollm2.model.training
    assert next(smollm2.model.parameters()).dtype == torch.float32
    assert smollm2.tokenizer.padding_side == "left"
    assert smollm2.tokenizer.pad_token_id is not None
    assert all(p.bias is None for p in o_projs(smollm2.model))


def test_load_hub_id_offline_names_the_id(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.chdir(tmp_path)
    hub_id = "nonexistent-org/verif-sweep-no-such-model"
    with pytest.raises(OSError) as err:
        load_model(hub_id, dtype="float32", device="cpu")
    assert hub_id in str(err.value)


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert resolve_dtype("float32", "cuda") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="'fp8'"):
        resolve_dtype("fp8", "cpu")
