"""Shared fixtures: tiny models built from configs (2 layers, hidden 64) and a small real tokenizer.

The tokenizer is a byte-level BPE trained here on GSM8K text from ../shared/data, with a ChatML
template, so tests exercise real chat formatting and masking without loading a real model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# The suite checks logic on the CPU, where float32 is the default and kernels are deterministic: on a
# GPU machine `train.mixed_precision: auto` would train in bf16 and tolerances written for float32
# would not hold. TUNESMITH_TEST_CUDA=1 keeps the GPU visible, for the CUDA tests (`-k cuda`).
if os.environ.get("TUNESMITH_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _gsm8k_lines(limit: int = 400) -> list[str]:
    lines = []
    with open(SHARED_DATA / "sft" / "gsm8k_train.jsonl", encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if index >= limit:
                break
            record = json.loads(line)
            lines += [record["question"], record["answer"]]
    return lines


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab ~512) with ChatML special tokens and template, saved to disk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_gsm8k_lines(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",  # like SmolLM2: pad == eos, the case that must not break stopping
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A 2-layer, hidden-64 Llama causal LM with the tiny tokenizer, saved as a local HF folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tiny_llama_dir):
    """The tiny Llama with every weight perturbed: same tokenizer, clearly different distributions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * (parameter.std() + 0.02))
    folder = tmp_path_factory.mktemp("tiny_teacher")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A 2-layer, hidden-64 BERT encoder (no head: the classify task creates one) with the tiny tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = BertModel(config)
    folder = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_moe_dirs(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    """Two 2-layer, hidden-64 mixtures of experts with the tiny tokenizer, by architecture: Qwen3-MoE (8 experts
    of width 32, 2 per token; norms on the queries and keys) and Qwen2-MoE (the same, beside a shared expert of
    width 48 whose output a sigmoid gate scales)."""
    from transformers import AutoTokenizer, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                 tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
    folders = {}
    for name, model_class, config in [
        ("qwen3_moe", Qwen3MoeForCausalLM, Qwen3MoeConfig(**shape)),
        ("qwen2_moe", Qwen2MoeForCausalLM, Qwen2MoeConfig(**shape, shared_expert_intermediate_size=48)),
    ]:
        torch.manual_seed(0)
        folders[name] = tmp_path_factory.mktemp(f"tiny_{name}")
        model_class(config).save_pretrained(folders[name], safe_serialization=True)
        tokenizer.save_pretrained(folders[name])
    return folders


@pytest.fixture(scope="session")
def bf16_llama_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama saved in bfloat16, as large models ship."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("bf16_llama")
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    return folder


@pytest.fixture
def one_process_group():
    """A gloo process group of one process, for FSDP (`fully_shard`) inside the test process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29549", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
