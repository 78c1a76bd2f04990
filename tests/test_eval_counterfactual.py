"""Counterfactual probes: the shipped sentiment lexicon and refusal patterns on known strings, and the
three gaps (log-likelihood, sentiment, refusal) with CIs on a tiny model whose answers are known."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith.errors import ConfigError
from tunesmith.evaluate import tasks as eval_tasks
from tunesmith.evaluate.config import CounterfactualTask, validate_suite
from tunesmith.evaluate.counterfactual import SentimentLexicon, compile_refusal_patterns, is_refusal
from tunesmith.evaluate.stats import bootstrap_ci
from tunesmith.evaluate.tasks import System, run_counterfactual


def test_lexicon_scores_words_and_flips_negated_ones():
    lexicon = SentimentLexicon.shipped()
    assert lexicon.score("She is a brilliant and kind doctor.") == 1.0
    assert lexicon.score("He was lazy, rude and selfish.") == -1.0
    assert lexicon.score("The applicant was brilliant but lazy.") == 0.0
    assert lexicon.score("The doctor walked to the station.") == 0.0  # no lexicon word: neutral
    assert lexicon.score("He is not helpful.") == -1.0
    assert lexicon.score("She isn\u2019t lazy at all.") == 1.0  # "n't" negates, curly apostrophe too
    assert lexicon.score("Never was he kind, and he was rude.") == -1.0


def test_shipped_refusal_patterns_flag_refusals_only():
    patterns = compile_refusal_patterns(None, "refusal_patterns")
    refusals = [
        "I'm sorry, but I can't help with that request.",
        "I cannot provide a joke about that group.",
        "As an AI language model, I do not make judgements about people.",
        "I must respectfully decline.",
        "I\u2019m not comfortable writing that.",
        "That would be inappropriate, since it stereotypes people.",
    ]
    answers = [
        "Sure! Why did the doctor carry a red pen? In case she wanted to draw blood.",
        "The manager met every deadline and helped the team grow.",
        "Yes, the bank should give the loan if the customer can repay it.",
    ]
    assert [is_refusal(text, patterns) for text in refusals] == [True] * len(refusals)
    assert [is_refusal(text, patterns) for text in answers] == [False] * len(answers)


def test_a_bad_refusal_pattern_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match=r"tasks\[0\] \(probe\)\.refusal_patterns.*regular expression"):
        validate_suite({"tasks": [{"name": "probe", "type": "counterfactual", "measures": ["refusal"],
                                   "refusal_patterns": ["I (cannot"]}]})
    with pytest.raises(ConfigError, match="measures"):
        validate_suite({"tasks": [{"name": "probe", "type": "counterfactual", "measures": ["toxicity"]}]})


@pytest.fixture(scope="module")
def tiny_system(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    return System("tiny", "causal_lm", model, AutoTokenizer.from_pretrained(tiny_llama_dir))


def test_three_gaps_with_known_answers(tiny_system, monkeypatch):
    """The model answers warmly about `alpha` and refuses, coldly, about `beta`: sentiment gap +2,
    refusal gap -1, one flip per case; the loglik gap is the two sentences' log-probability difference."""

    def answers(cfg, system, prompts):
        assert cfg.max_new_tokens == 7 and cfg.system_prompt == "Be brief."
        return ["A wonderful, kind person." if "alpha" in prompt else "I'm sorry, but I cannot help. They are lazy."
                for prompt in prompts]

    monkeypatch.setattr(eval_tasks, "_generate_sorted", answers)
    cfg = CounterfactualTask(name="probe", type="counterfactual", pairs=[("alpha", "beta"), ("beta", "alpha")],
                             templates=["The {term} cook."], prompts=["Tell me about the {term} doctor.",
                                                                       "Describe the {term} pilot."],
                             measures=["loglik", "sentiment", "refusal"], max_new_tokens=7, system_prompt="Be brief.")
    output = run_counterfactual(cfg, tiny_system)

    metrics = {name: stats.value() for name, stats in output.metrics.items()}
    assert metrics["sentiment_gap"] == 0.0 and metrics["abs_sentiment_gap"] == 2.0  # +2 and -2 cancel
    assert metrics["refusal_gap"] == 0.0 and metrics["refusal_flip_rate"] == 1.0 and metrics["refusal_rate"] == 0.5
    per_pair = output.details["per_pair_mean_gap"]
    assert per_pair["alpha / beta"]["sentiment_gap"] == 2.0 and per_pair["alpha / beta"]["refusal_gap"] == -1.0
    assert per_pair["beta / alpha"]["sentiment_gap"] == -2.0 and per_pair["beta / alpha"]["refusal_gap"] == 1.0
    # loglik: the two cases are the same sentence pair swapped, so the gaps are opposite.
    loglik = output.metrics["loglik_gap"].stats[:, 0]
    assert loglik[0] == pytest.approx(-loglik[1]) and loglik[0] != 0
    assert metrics["abs_loglik_gap"] == pytest.approx(abs(loglik[0]))
    assert output.primary == "abs_loglik_gap"
    # Every metric has a CI; a gap that is the same on every case has a zero-width one.
    assert bootstrap_ci(output.metrics["abs_sentiment_gap"], 200) == (2.0, 2.0)
    low, high = bootstrap_ci(output.metrics["sentiment_gap"], 200)
    assert low == -2.0 and high == 2.0
    generated = [record for record in output.records if record["measure"] == "sentiment+refusal"]
    assert len(generated) == 4 and generated[0]["refused"] == [False, True]
    assert generated[0]["sentiment"] == [1.0, -1.0]


def test_sentiment_from_a_named_classifier_is_two_p_positive_minus_one(tiny_system, tiny_bert_dir, tmp_path,
                                                                      monkeypatch):
    from transformers import BertForSequenceClassification

    folder = tmp_path / "sentiment_classifier"
    torch.manual_seed(0)
    classifier = BertForSequenceClassification.from_pretrained(
        tiny_bert_dir, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    classifier.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(folder)

    texts = {"alpha": "The cook was great.", "beta": "The cook was late again."}
    monkeypatch.setattr(eval_tasks, "_generate_sorted", lambda cfg, system, prompts: [
        texts["alpha" if "alpha" in prompt else "beta"] for prompt in prompts])
    cfg = CounterfactualTask(name="probe", type="counterfactual", pairs=[("alpha", "beta")],
                             prompts=["About the {term} cook."], measures=["sentiment"], sentiment_model=str(folder))
    output = run_counterfactual(cfg, tiny_system)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = BertForSequenceClassification.from_pretrained(folder).eval()
    with torch.inference_mode():
        probabilities = model(**tokenizer(list(texts.values()), return_tensors="pt", padding=True)).logits.softmax(-1)
    expected = [2 * float(p) - 1 for p in probabilities[:, 1]]
    assert output.records[0]["sentiment"] == pytest.approx(expected, abs=1e-5)
    assert output.metrics["sentiment_gap"].value() == pytest.approx(expected[0] - expected[1], abs=1e-5)
    assert output.primary == "abs_sentiment_gap" and output.details["sentiment_scorer"] == str(folder)

    cfg_bad = cfg.model_copy(update={"sentiment_positive_label": "happy"})
    with pytest.raises(ConfigError, match="sentiment_positive_label.*'happy'"):
        run_counterfactual(cfg_bad, tiny_system)
