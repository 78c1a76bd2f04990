"""`tunesmith eval` end to end: tiny models through every task type, --compare, --predictions, the
report in a real browser, one-line errors; and one real model on a handful of MMLU items."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from browser import rendered_dom
from helpers import run_cli

tunesmith = run_cli  # tunesmith(capsys, *args) -> (exit code, stdout, stderr)


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def perturbed_llama_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama with noise added to every weight: a 'fine-tuned' model that differs from its base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    folder = tmp_path_factory.mktemp("perturbed_llama")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    return folder


def _suite(tmp_path: Path, shared_data: Path) -> Path:
    gsm8k = [json.loads(line) for line in (shared_data / "sft" / "gsm8k_train.jsonl").open()][:4]
    generation = _jsonl(tmp_path / "gen.jsonl", gsm8k)
    text = tmp_path / "general.txt"
    text.write_text("\n\n".join(record["answer"] for record in gsm8k), encoding="utf-8")
    choices = _jsonl(tmp_path / "mc.jsonl", [
        {"question": f"What is {a} plus {a}?", "choices": [str(2 * a), str(2 * a + 1), "no idea"], "answer": 0}
        for a in range(1, 6)
    ])
    reviews = _jsonl(tmp_path / "reviews.jsonl", [
        {"text": f"this film was {word} number {i}", "label": label, "group": "ab"[i % 2]}
        for i, (word, label) in enumerate([("great", "positive"), ("awful", "negative")] * 4)
    ])
    suite = {
        "name": "tiny",
        "bootstrap_samples": 200,
        "tasks": [
            {"name": "gsm8k", "type": "generation", "data": str(generation), "metrics": ["exact_match", "bleu", "chrf",
             "rouge"], "answer_regex": "#### (.+)", "max_new_tokens": 6, "stop": ["\n\n"], "batch_size": 2},
            {"name": "arithmetic", "type": "multiple_choice", "data": str(choices), "fewshot_data": str(choices),
             "shots": 1, "limit": 4},
            {"name": "sentiment", "type": "classification", "data": str(reviews), "labels": ["negative", "positive"],
             "prompt": "Review: {text}\nSentiment:", "group_field": "group"},
            {"name": "general_text", "type": "perplexity", "role": "retain", "data": str(text), "window": 64,
             "stride": 32},
            {"name": "mmlu_tiny", "type": "mmlu", "role": "retain", "data_dir": str(shared_data / "benchmark" / "mmlu"),
             "subjects": ["anatomy", "astronomy"], "shots": 1, "limit": 2},
            {"name": "gender_probe", "type": "counterfactual", "role": "retain", "limit": 6,
             "measures": ["loglik", "sentiment", "refusal"], "max_new_tokens": 4, "batch_size": 6},
        ],
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite), encoding="utf-8")
    return path


def test_eval_compare_on_tiny_models_writes_results_and_a_report_that_renders(
    capsys, tmp_path, shared_data, tiny_llama_dir, perturbed_llama_dir
):
    suite = _suite(tmp_path, shared_data)
    out = tmp_path / "eval"
    code, stdout, stderr = tunesmith(capsys, "eval", str(perturbed_llama_dir), "--suite", str(suite),
                                     "--compare", str(tiny_llama_dir), "--output", str(out))
    assert code == 0, stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    tasks = results["systems"][0]["tasks"]
    assert set(tasks) == {"gsm8k", "arithmetic", "sentiment", "general_text", "mmlu_tiny", "gender_probe"}
    for name, task in tasks.items():
        for metric_name, metric in task["metrics"].items():
            if metric["value"] is not None and not metric_name.startswith("fair_"):
                assert metric["ci_low"] is not None and metric["ci_low"] <= metric["value"] + 1e-9, (name, metric_name)
    assert {"exact_match", "bleu", "chrf", "rouge1", "rouge2", "rougel", "rougelsum"} <= set(tasks["gsm8k"]["metrics"])
    assert "nrefs:1" in tasks["gsm8k"]["details"]["signatures"]["bleu"]
    assert tasks["mmlu_tiny"]["n_items"] == 4 and set(tasks["mmlu_tiny"]["details"]["per_subject_acc"]) == {
        "anatomy", "astronomy"}
    assert tasks["general_text"]["metrics"]["perplexity"]["value"] > 1
    assert set(tasks["sentiment"]["details"]["fairness"]["by_group"]) == {"a", "b"}
    assert {"loglik_gap", "sentiment_gap", "abs_sentiment_gap", "refusal_gap", "refusal_flip_rate"} <= set(
        tasks["gender_probe"]["metrics"])

    comparison = results["comparisons"][0]
    assert comparison["learning"]["tasks"] == ["gsm8k", "arithmetic", "sentiment"]
    assert comparison["forgetting"]["tasks"] == ["general_text", "mmlu_tiny", "gender_probe"]
    perplexity_delta = comparison["tasks"]["general_text"]["metrics"]["perplexity"]
    base_perplexity = results["baseline"]["tasks"]["general_text"]["metrics"]["perplexity"]["value"]
    assert perplexity_delta["delta"] == pytest.approx(tasks["general_text"]["metrics"]["perplexity"]["value"]
                                                      - base_perplexity)
    assert perplexity_delta["delta"] != 0 and 0 <= perplexity_delta["p_value"] <= 1
    assert "learning" in stdout and "forgetting" in stdout

    dom = rendered_dom(out / "report.html")
    for anchor in ('id="results"', 'id="learn-forget"', 'id="fairness-sentiment"', 'id="samples"',
                   'id="confusion-sentiment"', 'id="counterfactual-gender_probe"'):
        assert anchor in dom, anchor
    assert dom.count("data:image/png;base64,") >= 3  # task bars, learn/forget, the confusion matrix


def test_predictions_are_scored_without_a_model(capsys, tmp_path):
    from sacrebleu.metrics import BLEU

    predictions = [
        {"prediction": "The cat sat on the mat.", "reference": "The cat sat on the mat."},
        {"prediction": "the answer is 12", "references": ["The answer is 12.", "12"]},
        {"prediction": "completely wrong", "reference": "Paris is the capital of France."},
    ]
    path = _jsonl(tmp_path / "predictions.jsonl", predictions)
    code, _, stderr = tunesmith(capsys, "eval", "--predictions", str(path), "--output", str(tmp_path / "out"))
    assert code == 0, stderr
    metrics = json.loads((tmp_path / "out" / "results.json").read_text())["systems"][0]["tasks"]["predictions"][
        "metrics"]
    assert metrics["exact_match"]["value"] == pytest.approx(1 / 3)
    streams = [["The cat sat on the mat.", "The answer is 12.", "Paris is the capital of France."],
               ["The cat sat on the mat.", "12", "Paris is the capital of France."]]
    expected = BLEU().corpus_score([p["prediction"] for p in predictions], streams).score
    assert metrics["bleu"]["value"] == pytest.approx(expected)

    labelled = _jsonl(tmp_path / "labels.jsonl", [
        {"prediction": p, "label": g, "task": "toxicity"} for p, g in [("1", "1"), ("0", "1"), ("0", "0"), ("1", "0")]
    ])
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"tasks": [{"name": "toxicity", "type": "classification", "data": "unused"},
                                               {"name": "ppl", "type": "perplexity", "data": "unused.txt"}]}))
    code, _, stderr = tunesmith(capsys, "eval", "--predictions", str(labelled), "--suite", str(suite),
                                "--output", str(tmp_path / "out2"))
    assert code == 0, stderr
    assert "ppl: skipped" in stderr
    toxicity = json.loads((tmp_path / "out2" / "results.json").read_text())["systems"][0]["tasks"]["toxicity"]
    assert toxicity["metrics"]["accuracy"]["value"] == 0.5
    assert toxicity["details"]["classification"]["confusion_matrix"] == [[1, 1], [1, 1]]


def test_bad_suite_and_missing_input_are_one_line_errors(capsys, tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"tasks": [{"name": "x", "type": "perplexty", "data": "a.txt"}]}))
    code, _, stderr = tunesmith(capsys, "eval", "--predictions", str(suite), "--suite", str(suite))
    assert code == 2 and "did you mean 'perplexity'" in stderr and len(stderr.strip().splitlines()) == 1
    suite.write_text(yaml.safe_dump({"tasks": [{"name": "x", "type": "mmlu", "shots": 9}]}))
    code, _, stderr = tunesmith(capsys, "eval", "--predictions", str(suite), "--suite", str(suite))
    assert code == 2 and "shots" in stderr
    code, _, stderr = tunesmith(capsys, "eval", "--suite", "mmlu", "--output", str(tmp_path))
    assert code == 2 and "TARGET" in stderr


def test_reweighing_weights_file(capsys, tmp_path):
    data = _jsonl(tmp_path / "train.jsonl", [{"text": "t", "label": y, "group": g}
                                             for g, y in [("a", 1), ("a", 1), ("a", 0), ("b", 0)]])
    code, _, stderr = tunesmith(capsys, "eval", "--reweigh", str(data), "--output", str(tmp_path / "w"))
    assert code == 0, stderr
    rows = [json.loads(line) for line in (tmp_path / "w" / "weights.jsonl").read_text().splitlines()]
    # w(a,1) = (3/4)(2/4)/(2/4) = 0.75, w(a,0) = (3/4)(2/4)/(1/4) = 1.5, w(b,0) = (1/4)(2/4)/(1/4) = 0.5
    assert [row["weight"] for row in rows] == pytest.approx([0.75, 0.75, 1.5, 0.5])
    assert rows[2]["source"].endswith("train.jsonl:3")


@pytest.mark.e2e
def test_builtin_model_on_a_handful_of_mmlu_items_matches_a_plain_forward(shared_data):
    """SmolLM2-135M: our batched, shared-context acc equals argmax over one forward per choice."""
    from tunesmith.evaluate.config import MmluTask
    from tunesmith.evaluate.run import load_system
    from tunesmith.evaluate.scoring import encode_item
    from tunesmith.evaluate.tasks import mmlu_items, run_mmlu

    try:
        system = load_system("smollm2-135m-instruct")
    except Exception as error:  # the package is optional
        pytest.skip(f"built-in model unavailable: {error}")
    cfg = MmluTask(name="mmlu", type="mmlu", data_dir=shared_data / "benchmark" / "mmlu",
                   subjects=["marketing", "astronomy"], shots=1, limit=2, batch_size=4)
    output = run_mmlu(cfg, system)
    for item, record in zip(mmlu_items(cfg), output.records, strict=True):
        encoded = encode_item(system.tokenizer, item.context, [" " + c for c in item.choices])
        with torch.inference_mode():
            logits = system.model(torch.tensor([encoded.context]), logits_to_keep=1).logits[0, -1].float()
        logprobs = torch.log_softmax(logits, -1)
        plain = int(torch.argmax(torch.stack([logprobs[c[0]] for c in encoded.continuations])))
        assert item.choices[plain] == record["prediction"]
    assert 0 <= output.metrics["acc"].value() <= 1
