"""Run directories, generation, chat, comparison and export, on the tiny Llama.

The adapter run is made by hand with peft (as the training loop would write it), and every
tunesmith result is checked against what plain peft / transformers give for the same folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tunesmith.errors import ModelError
from tunesmith.export import export_merged
from tunesmith.inference import chat, compare, generate
from tunesmith.models import load_run


def _write_config(run_dir: Path, model_name: str, task: str, method: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"model": {"name": model_name}, "task": task, "method": {"name": method}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")


def _random_lora(model, task_type: str):
    """A LoRA whose update is not zero (peft initialises B = 0, which would make every check trivial)."""
    peft_model = get_peft_model(model, LoraConfig(task_type=task_type, r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(1)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    return peft_model


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny_llama_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "lora_run"
    _write_config(run_dir, str(tiny_llama_dir), "sft", "lora")
    peft_model = _random_lora(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), "CAUSAL_LM")
    peft_model.save_pretrained(run_dir / "adapter")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(run_dir / "adapter")
    return run_dir


@pytest.fixture(scope="module")
def plain_peft_model(adapter_run, tiny_llama_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    return PeftModel.from_pretrained(base, adapter_run / "adapter").eval()


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_adapter_records_the_local_base_folder(adapter_run, tiny_llama_dir):
    recorded = json.loads((adapter_run / "adapter" / "adapter_config.json").read_text())
    assert Path(recorded["base_model_name_or_path"]) == tiny_llama_dir


def test_load_run_of_an_adapter_generates_like_plain_peft(adapter_run, plain_peft_model):
    model, tokenizer = load_run(adapter_run, device="cpu")
    assert isinstance(model, PeftModel) and not model.training
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 plus 4?"}], tokenize=False, add_generation_prompt=True
    )
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    settings = {"max_new_tokens": 12, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    with torch.no_grad():
        ours = model.generate(input_ids=input_ids, **settings)
        reference = plain_peft_model.generate(input_ids=input_ids, **settings)
    assert torch.equal(ours, reference)
    assert generate(model, tokenizer, ["What is 3 plus 4?"], max_new_tokens=12) == generate(
        plain_peft_model, tokenizer, ["What is 3 plus 4?"], max_new_tokens=12
    )


def test_load_run_base_ignores_the_adapter(adapter_run, tiny_model_and_tokenizer):
    base, _ = load_run(adapter_run, base=True, device="cpu")
    reference, _ = tiny_model_and_tokenizer
    input_ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids).logits, reference(input_ids).logits)


def test_load_run_of_a_full_classifier(tmp_path, tiny_bert_dir):
    run_dir = tmp_path / "full_run"
    _write_config(run_dir, str(tiny_bert_dir), "classify", "full")
    labels = ["negative", "positive"]
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert_dir, num_labels=2, id2label=dict(enumerate(labels)), label2id={"negative": 0, "positive": 1}
    )
    model.save_pretrained(run_dir / "model")
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(run_dir / "model")
    (run_dir / "labels.json").write_text(json.dumps(labels))

    loaded, tokenizer = load_run(run_dir, device="cpu")
    batch = tokenizer(["great film"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits)
    assert loaded.config.id2label == {0: "negative", 1: "positive"}

    exported = export_merged(run_dir, tmp_path / "exported")
    assert json.loads((exported / "labels.json").read_text()) == labels
    assert AutoModelForSequenceClassification.from_pretrained(exported).config.num_labels == 2


def test_load_run_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(ModelError, match="not a run directory"):
        load_run(tmp_path)
    _write_config(tmp_path, "minilm-l6", "classify", "full")
    with pytest.raises(ModelError, match="no model/ or adapter/"):
        load_run(tmp_path)


def test_export_merged_loads_in_plain_transformers_with_the_adapter_logits(adapter_run, plain_peft_model, tmp_path):
    out_dir = export_merged(adapter_run, tmp_path / "merged")
    assert (out_dir / "model.safetensors").is_file() and not (out_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(adapter_run / "adapter").chat_template
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, plain_peft_model(input_ids).logits, rtol=1e-4, atol=1e-4)


def test_export_refuses_a_non_empty_output_folder(adapter_run, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file.txt").write_text("mine")
    with pytest.raises(ModelError, match="taken"):
        export_merged(adapter_run, tmp_path / "taken")


def test_generate_returns_one_string_per_prompt_within_max_new_tokens(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    prompts = ["What is 2 plus 2?", "Natalia sold clips to 48 of her friends in April. How many?", "Hi"]
    answers = generate(model, tokenizer, prompts, max_new_tokens=5, system_prompt="Be brief.")
    assert len(answers) == 3 and all(isinstance(answer, str) for answer in answers)
    assert all(len(tokenizer(answer, add_special_tokens=False).input_ids) <= 5 for answer in answers)
    assert tokenizer.padding_side == "right"  # restored after left-padded generation


def test_batched_generation_equals_one_by_one(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    prompts = ["What is 2 plus 2?", "A much longer question about the clips that Natalia sold in April?"]
    batched = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=2)
    assert batched == [generate(model, tokenizer, [prompt], max_new_tokens=8)[0] for prompt in prompts]


def test_sampling_runs(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    torch.manual_seed(0)
    assert len(generate(model, tokenizer, ["Hi"], max_new_tokens=4, temperature=0.8, top_p=0.9)) == 1


def test_chat_streams_keeps_history_and_ends_on_exit(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    lines = iter(["What is 2 plus 2?", "", "And 3 plus 3?", "/exit", "never read"])
    written: list[str] = []
    history = chat(model, tokenizer, max_new_tokens=6, read=lambda prompt: next(lines), write=written.append)
    assert [message["role"] for message in history] == ["user", "assistant", "user", "assistant"]
    assert history[2]["content"] == "And 3 plus 3?"
    assert next(lines) == "never read"
    # The streamed text is the answer kept in the history.
    assert "".join(written).count("model> ") == 2
    assert history[1]["content"] in "".join(written)


def test_chat_ends_on_ctrl_d(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer

    def end_of_input(prompt: str) -> str:
        raise EOFError

    assert chat(model, tokenizer, read=end_of_input, write=lambda text: None) == []


def test_compare_uses_the_disabled_adapter_as_the_base(adapter_run, tiny_model_and_tokenizer):
    model, tokenizer = load_run(adapter_run, device="cpu")
    base_model, _ = tiny_model_and_tokenizer
    prompts = ["What is 2 plus 2?", "Hi"]
    pairs = compare(model, tokenizer, prompts, max_new_tokens=6)
    assert [pair.prompt for pair in pairs] == prompts
    assert any(pair.tuned != pair.base for pair in pairs)  # the adapter changes the answers
    assert [pair.base for pair in pairs] == generate(base_model, tokenizer, prompts, max_new_tokens=6)
    assert [pair.tuned for pair in pairs] == generate(model, tokenizer, prompts, max_new_tokens=6)
    assert compare(model, tokenizer, prompts, base_model=base_model, max_new_tokens=6) == pairs
