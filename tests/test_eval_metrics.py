"""Our metrics equal the reference implementations on the same inputs (sacrebleu, rouge-score,
scikit-learn, fairlearn), and the bootstrap machinery behaves."""

from __future__ import annotations

import numpy as np
import pytest

from tunesmith.evaluate.config import GenerationTask
from tunesmith.evaluate.fairness import group_fairness, reweighing_weights
from tunesmith.evaluate.metrics import TEXT_METRICS, classification_metrics, classification_report, split_sentences
from tunesmith.evaluate.stats import bootstrap_ci, mean_stats, paired_bootstrap
from tunesmith.evaluate.tasks import ChoiceItem, choice_metrics, cut_at_stop

HYPOTHESES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog",
    "It is raining cats and dogs today in London.",
    "Nothing matches here at all",
    "the the the the",
]
REFERENCES = [
    ["The cat is sitting on the mat.", "A cat sat on the mat."],
    ["The quick brown fox jumped over the lazy dog."],
    ["Today it rains heavily in London.", "It is pouring in London today.", "London is wet today."],
    ["Completely different words"],
    ["the cat"],
]
CFG = GenerationTask(name="t", type="generation", data="-")


def test_bleu_and_chrf_equal_sacrebleu_with_multiple_references():
    from sacrebleu.metrics import BLEU, CHRF

    # sacrebleu takes reference streams; items with fewer references repeat their last one.
    streams = [[refs[min(i, len(refs) - 1)] for refs in REFERENCES] for i in range(3)]
    ours_bleu = TEXT_METRICS.get("bleu")(HYPOTHESES, REFERENCES, CFG)["bleu"].value()
    ours_chrf = TEXT_METRICS.get("chrf")(HYPOTHESES, REFERENCES, CFG)["chrf"].value()
    assert ours_bleu == pytest.approx(BLEU().corpus_score(HYPOTHESES, streams).score, abs=1e-9)
    assert ours_chrf == pytest.approx(CHRF().corpus_score(HYPOTHESES, streams).score, abs=1e-9)
    # Single reference: no padding involved at all.
    single = [[refs[0]] for refs in REFERENCES]
    assert TEXT_METRICS.get("bleu")(HYPOTHESES, single, CFG)["bleu"].value() == pytest.approx(
        BLEU().corpus_score(HYPOTHESES, [[r[0] for r in single]]).score, abs=1e-9)
    assert ours_bleu > 0  # the check above is not 0 == 0


def test_rouge_equals_rouge_score_mean_of_best_reference():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"])
    ours = TEXT_METRICS.get("rouge")(HYPOTHESES, REFERENCES, CFG)
    for name, key in [("rouge1", "rouge1"), ("rouge2", "rouge2"), ("rougeL", "rougel"), ("rougeLsum", "rougelsum")]:
        pairs = zip(HYPOTHESES, REFERENCES, strict=True)
        expected = np.mean([scorer.score_multi(refs, hyp)[name].fmeasure for hyp, refs in pairs])
        assert ours[key].value() == pytest.approx(expected, abs=1e-12)
    assert 0 < ours["rouge1"].value() < 1


SUMMARIES = [
    "The council approved the budget on Monday. Dr. Lee voted against it! Taxes will rise next year.",
    "Storms hit the coast. Thousands lost power.\nRepairs could take a week.",
]
SUMMARY_REFERENCES = [
    ["Taxes will rise next year. The council passed the budget on Monday, with Dr. Lee against."],
    ["Thousands lost power when storms hit the coast. Repairs may take a week.", "A storm cut power."],
]
# The same texts with one sentence per line, written out by hand (not by the splitter under test).
SUMMARIES_BY_LINE = [
    "The council approved the budget on Monday.\nDr. Lee voted against it!\nTaxes will rise next year.",
    "Storms hit the coast.\nThousands lost power.\nRepairs could take a week.",
]
SUMMARY_REFERENCES_BY_LINE = [
    ["Taxes will rise next year.\nThe council passed the budget on Monday, with Dr. Lee against."],
    ["Thousands lost power when storms hit the coast.\nRepairs may take a week.", "A storm cut power."],
]


def _rouge_score_mean(predictions, references, rouge_type):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer([rouge_type])
    return float(np.mean([scorer.score_multi(refs, prediction)[rouge_type].fmeasure
                          for prediction, refs in zip(predictions, references, strict=True)]))


def test_rouge_lsum_sentences_equals_rouge_score_on_one_sentence_per_line():
    by_sentence = GenerationTask(name="t", type="generation", data="-", rouge_lsum_split="sentences")
    ours = TEXT_METRICS.get("rouge")(SUMMARIES, SUMMARY_REFERENCES, by_sentence)
    expected = _rouge_score_mean(SUMMARIES_BY_LINE, SUMMARY_REFERENCES_BY_LINE, "rougeLsum")
    assert ours["rougelsum"].value() == pytest.approx(expected, abs=1e-12)
    # The default keeps rouge-score's own reading of the raw strings (lines as sentences) ...
    default = TEXT_METRICS.get("rouge")(SUMMARIES, SUMMARY_REFERENCES, CFG)
    assert default["rougelsum"].value() == pytest.approx(
        _rouge_score_mean(SUMMARIES, SUMMARY_REFERENCES, "rougeLsum"), abs=1e-12)
    # ... which differs on these texts, so the check above is not the default passing twice.
    assert abs(default["rougelsum"].value() - ours["rougelsum"].value()) > 0.01
    for name in ("rouge1", "rouge2", "rougel"):  # line breaks are spaces to rouge-score's tokenizer
        assert ours[name].value() == pytest.approx(default[name].value(), abs=1e-12)


@pytest.mark.parametrize(("text", "sentences"), [
    ("It rained. Then it stopped! Did it? Yes.", ["It rained.", "Then it stopped!", "Did it?", "Yes."]),
    ('Dr. Smith met J. Doe at 3.5 p.m. today. He said "Stop." Then he left.',
     ["Dr. Smith met J. Doe at 3.5 p.m. today.", 'He said "Stop."', "Then he left."]),
    ("First line\nSecond line. Third (part) one.", ["First line", "Second line.", "Third (part) one."]),
    ("U.S. troops left. e.g. lower case never starts one.", ["U.S. troops left. e.g. lower case never starts one."]),
    ("  \n\n ", []),
])
def test_split_sentences_on_end_marks_before_a_capital(text, sentences):
    assert split_sentences(text) == sentences


def test_rouge_lsum_split_rejects_unknown_values_naming_the_key():
    from tunesmith.errors import ConfigError
    from tunesmith.evaluate.config import validate_suite

    task = {"name": "summaries", "type": "generation", "data": "-", "metrics": ["rouge"], "rouge_lsum_split": "nltk"}
    with pytest.raises(ConfigError, match=r"tasks\[0\] \(summaries\)\.rouge_lsum_split"):
        validate_suite({"name": "s", "tasks": [task]})


def test_exact_match_with_gsm8k_answer_regex_and_stop_strings():
    cfg = GenerationTask(name="g", type="generation", data="-", answer_regex=r"#### (.+)")
    predictions = ["She sold 48 + 24 = 72.\n#### 72", "#### 10", "I think 5"]
    references = [["Natalia sold 48/2 = 24 clips.\n#### 72"], ["#### 11"], ["#### 5"]]
    stats = TEXT_METRICS.get("exact_match")(predictions, references, cfg)["exact_match"]
    assert stats.stats[:, 0].tolist() == [1.0, 0.0, 0.0]
    assert cut_at_stop("answer: 4\nQuestion: next", ["\nQuestion:", "###"]) == "answer: 4"


def test_classification_metrics_equal_scikit_learn_including_absent_classes():
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 4, 60)
    y_true[y_true == 3] = 2  # class 3 ("d") occurs in neither y_true nor y_pred: sklearn leaves it out of macro F1
    y_pred = np.where(rng.random(60) < 0.6, y_true, rng.integers(0, 2, 60))
    ours = classification_metrics(y_true, y_pred, 4)
    reference = classification_report(y_true, y_pred, ["a", "b", "c", "d"])
    for name in ("accuracy", "f1_macro", "f1_micro"):
        assert ours[name].value() == pytest.approx(reference[name], abs=1e-12)
    assert np.array(reference["confusion_matrix"]).sum() == 60 and reference["per_class"]["d"]["support"] == 0


def test_acc_and_acc_norm_follow_lm_eval_on_hand_built_logprobs():
    # Choice 1 has the highest summed log-prob; per character, the long choice 2 wins.
    items = [ChoiceItem("Q", ["no", "yes", "a much longer answer"], answer=2)]
    metrics, records = choice_metrics(items, [[-5.0, -2.0, -4.0]])
    assert metrics["acc"].value() == 0.0 and records[0]["prediction"] == "yes"
    assert metrics["acc_norm"].value() == 1.0  # -4/20 = -0.2 > -2/3 > -5/2
    # Ties go to the first choice, as numpy's argmax (and lm-eval) do.
    tied, _ = choice_metrics([ChoiceItem("Q", ["x", "y"], answer=0)], [[-1.0, -1.0]])
    assert tied["acc"].value() == 1.0


def test_group_fairness_equals_hand_computation_and_fairlearn():
    # group a: y_true 1,1,0,0  y_pred 1,0,1,0 -> TPR 1/2, FPR 1/2, selection 2/4, accuracy 2/4
    # group b: y_true 1,1,0,0  y_pred 1,1,0,0 -> TPR 1,   FPR 0,   selection 2/4, accuracy 1
    # group c: y_true 1,0      y_pred 0,0     -> TPR 0,   FPR 0,   selection 0,   accuracy 1/2
    gold = np.array([1, 1, 0, 0, 1, 1, 0, 0, 1, 0])
    predicted = np.array([1, 0, 1, 0, 1, 1, 0, 0, 0, 0])
    groups = list("aaaabbbbcc")
    details, metrics = group_fairness(gold, predicted, groups, positive=1)
    by_group = details["by_group"]
    assert by_group["a"]["tpr"] == 0.5 and by_group["a"]["fpr"] == 0.5 and by_group["c"]["selection_rate"] == 0
    assert by_group["b"]["accuracy"] == 1.0 and by_group["c"]["count"] == 2
    hand = {
        "demographic_parity_difference": 0.5 - 0.0,
        "demographic_parity_ratio": 0.0 / 0.5,
        "equal_opportunity_difference": 1.0 - 0.0,
        "equalized_odds_difference": max(1.0 - 0.0, 0.5 - 0.0),
        "accuracy_difference": 1.0 - 0.5,
    }
    for name, value in hand.items():
        assert details["overall"][name] == pytest.approx(value), name  # fairlearn
        assert metrics[f"fair_{name}"].value() == pytest.approx(value), name  # our bootstrap statistics


def test_reweighing_makes_group_and_label_independent():
    groups = ["a"] * 6 + ["b"] * 4
    labels = ["1", "1", "1", "1", "0", "0", "1", "0", "0", "0"]
    weights = reweighing_weights(groups, labels)
    # w(a,1) = P(a)P(1)/P(a,1) = 0.6*0.5/0.4 = 0.75; w(b,1) = 0.4*0.5/0.1 = 2.0
    assert weights[0] == pytest.approx(0.75) and weights[6] == pytest.approx(2.0)
    assert weights.mean() == pytest.approx(1.0)
    for group in "ab":  # weighted positive rate is the same in both groups: 0.5
        mask = np.array(groups) == group
        positive = np.array(labels) == "1"
        assert (weights[mask & positive].sum() / weights[mask].sum()) == pytest.approx(0.5)


def test_bootstrap_ci_and_paired_test():
    rng = np.random.default_rng(0)
    correct = (rng.random(400) < 0.7).astype(float)
    low, high = bootstrap_ci(mean_stats(correct), 1000, seed=0)
    p = correct.mean()
    normal_half_width = 1.96 * np.sqrt(p * (1 - p) / len(correct))  # the bootstrap should agree with the normal CI
    assert low < p < high and abs((high - low) / 2 - normal_half_width) < 0.005
    same = paired_bootstrap(mean_stats(correct), mean_stats(correct), 500)
    assert same["delta"] == 0 and same["p_value"] == 1.0
    better = np.maximum(correct, (rng.random(400) < 0.5).astype(float))  # strictly more items right
    result = paired_bootstrap(mean_stats(better), mean_stats(correct), 1000)
    assert result["delta"] > 0 and result["ci_low"] > 0 and result["p_value"] < 0.01
