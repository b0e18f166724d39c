"""`ragops report`: the recommendation logic on hand-made tables, and the report itself (an
offline HTML page and Markdown) from real evaluation outputs, through the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ragops.compare.analysis import Constraints, mission_group, recommend
from ragops.paths import Workspace
from ragops.params import resolve

RAGOPS = [str(Path(sys.executable).with_name("ragops"))]

# Eight architectures the way the mission lays them out; numbers made up by hand.
#   name            family      finetune   describe/f1  train wall s  ms/question  USD/1k questions
EIGHT = pd.DataFrame(
    [
        ("closed_book", "baseline", "none", 0.16, 0.0, 140.0, 0.002),
        ("incontext_ralm", "black-box", "none", 0.26, 0.0, 470.0, 0.007),
        ("replug", "black-box", "none", 0.27, 0.0, 900.0, 0.013),
        ("replug_lsr", "black-box", "retriever", 0.30, 1800.0, 900.0, 0.013),
        ("aar", "black-box", "retriever", 0.29, 1200.0, 480.0, 0.007),
        ("retro", "white-box", "lm", 0.33, 5400.0, 300.0, 0.005),
        ("self_rag", "white-box", "lm", 0.31, 7200.0, 700.0, 0.010),
        ("atlas", "white-box", "joint", 0.36, 14400.0, 520.0, 0.008),
    ],
    columns=["architecture", "family", "finetune", "describe/f1", "train/wall_s", "inference/qa/wall_s_per_1k_questions",
             "inference/qa/cost_usd_per_1k_questions"],
)


def paired(*rows):
    """Hand-made paired intervals (a − b on describe/f1): (a, b, ci_low, ci_high)."""
    return pd.DataFrame([{"a": a, "b": b, "metric": "describe/f1", "diff": (lo + hi) / 2, "ci_low": lo, "ci_high": hi,
                          "a_value": 0.0, "b_value": 0.0, "n": 400, "a_better": 0, "b_better": 0, "significant": lo > 0 or hi < 0}
                         for a, b, lo, hi in rows])


# every pair separated (no ties), unless a test says otherwise
SEPARATED = paired(*[(a, b, 0.01, 0.05) for i, a in enumerate(EIGHT.sort_values("describe/f1", ascending=False)["architecture"])
                     for b in list(EIGHT.sort_values("describe/f1", ascending=False)["architecture"])[i + 1:]])


def test_no_constraints_the_best_significant_architecture():
    rec = recommend(EIGHT, Constraints(), "describe/f1", paired=SEPARATED)
    assert rec.architecture == "atlas" and rec.excluded == {}
    assert "significant" in rec.reason and "retro" in rec.reason  # the runner-up it beat


def test_black_box_only_excludes_every_method_that_changes_the_lm():
    rec = recommend(EIGHT, Constraints(black_box_only=True), "describe/f1", paired=SEPARATED)
    assert rec.architecture == "replug_lsr"
    assert set(rec.excluded) == {"retro", "self_rag", "atlas"}
    assert "fine-tunes the LM" in rec.excluded["retro"] and "together with the retriever" in rec.excluded["atlas"]
    assert "excluded by your constraints" in rec.reason


def test_training_and_latency_budgets():
    rec = recommend(EIGHT, Constraints(max_train_hours=1.0), "describe/f1", paired=SEPARATED)
    # replug_lsr (0.5 h) and aar (0.33 h) fit; retro (1.5 h), self_rag (2 h), atlas (4 h) do not
    assert set(rec.excluded) == {"retro", "self_rag", "atlas"} and rec.architecture == "replug_lsr"
    assert rec.excluded["atlas"] == "trains for 4 h, over the 1 h budget"
    rec = recommend(EIGHT, Constraints(max_train_hours=1.0, max_latency_ms=500), "describe/f1", paired=SEPARATED)
    assert rec.architecture == "aar" and "answers in 900 ms per question" in rec.excluded["replug_lsr"]
    rec = recommend(EIGHT, Constraints(max_latency_ms=100), "describe/f1", paired=SEPARATED)
    assert rec.architecture is None and rec.reason == "no architecture meets the constraints" and len(rec.excluded) == 8


def test_an_insignificant_lead_goes_to_the_cheaper_architecture():
    # black-box only: replug_lsr (0.30) leads aar (0.29) but the paired interval includes 0; aar is cheaper per question
    tied = pd.concat([SEPARATED[~((SEPARATED["a"] == "replug_lsr") & (SEPARATED["b"] == "aar"))],
                      paired(("replug_lsr", "aar", -0.01, 0.03))])
    rec = recommend(EIGHT, Constraints(black_box_only=True), "describe/f1", paired=tied)
    assert rec.architecture == "aar" and rec.decision.best == "replug_lsr"
    assert "not significant" in rec.reason and "cheaper" in rec.reason


def test_families_come_from_the_tags():
    groups = [mission_group(f, t) for f, t in zip(EIGHT["family"], EIGHT["finetune"], strict=True)]
    assert groups == ["closed book", "black-box, no fine-tuning", "black-box, no fine-tuning", "black-box, retriever fine-tuned",
                      "black-box, retriever fine-tuned", "white-box, LM fine-tuned", "white-box, LM fine-tuned", "white-box, co-trained"]
    assert mission_group("hybrid", "something") == "other"


def test_report_from_evaluation_outputs(tmp_path, mlflow_store):
    """The compare stage writes report.html (offline, every family shown) and report.md; `ragops
    report` with constraints writes its own, logged to MLflow; a bad metric is one line, exit 1."""
    import mlflow

    from ragops import stages
    from tests.compare_fixtures import two_architectures

    ws = Workspace(tmp_path)
    two_architectures(ws)
    config = resolve({"tracking": {"experiment": "report-test"}})
    stages.compare(ws, config)
    page = (ws.compare_dir / "report.html").read_text()
    assert "cdn.jsdelivr.net" not in page and "<script src=" not in page and "vegaEmbed('#pareto-inference'" in page
    for family in ("closed book", "black-box, no fine-tuning", "black-box, retriever fine-tuned", "white-box, LM fine-tuned",
                   "white-box, co-trained"):
        assert family in page
    assert "(none evaluated yet)" in page  # the families without an architecture yet are still shown
    markdown = (ws.compare_dir / "report.md").read_text()
    assert "**incontext_ralm**" in markdown and "significant" in markdown and "![quality vs inference cost](pareto-inference.png)" in markdown
    assert "| incontext_ralm | closed_book | describe/f1 |" in markdown  # the paired comparison vs the baseline

    (tmp_path / "params.yaml").write_text("profile: default\ntracking: {experiment: report-test}\n")
    run = subprocess.run([*RAGOPS, "-w", str(tmp_path), "report", "--max-latency-ms", "200"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "recommended: closed_book" in run.stdout and "excluded incontext_ralm: answers in 450 ms per question" in run.stdout
    assert (ws.report_dir / "report.html").exists() and (ws.report_dir / "pareto-inference.png").exists()
    assert "**closed_book**" in (ws.report_dir / "report.md").read_text()
    runs = mlflow.MlflowClient(mlflow_store).search_runs([mlflow.get_experiment_by_name("report-test").experiment_id],
                                                        "tags.`ragops.kind` = 'report'")
    assert len(runs) == 1 and "report/report.html" in {a.path for a in mlflow.MlflowClient(mlflow_store).list_artifacts(runs[0].info.run_id, "report")}

    from ragops.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^report metric 'describe/bleu': not reported by any architecture \(reported: describe/em"):
        stages.report(ws, config, metric="describe/bleu")
    # another metric and constraint: perplexity, black-box only (closed book is not white-box: allowed)
    ppl = stages.report(ws, config, metric="lm/token_ppl", black_box_only=True).summary["recommendation"]
    assert ppl["architecture"] == "incontext_ralm" and ppl["metric"] == "lm/token_ppl" and ppl["excluded"] == {}


def test_eight_architectures_render_in_their_families_without_code_changes(tmp_path):
    from ragops.compare.report import render_markdown, report_sections

    df = EIGHT.assign(group=[mission_group(f, t) for f, t in zip(EIGHT["family"], EIGHT["finetune"], strict=True)])
    rec = recommend(df, Constraints(black_box_only=True), "describe/f1", paired=SEPARATED)
    sections = report_sections(df, {"pareto": {}, "paired_vs_baseline": []}, rec)
    rows = [(r["family"], r["architecture"]) for r in sections["families"]]
    assert rows == [
        ("closed book", "closed_book"), ("black-box, no fine-tuning", "incontext_ralm"), ("black-box, no fine-tuning", "replug"),
        ("black-box, retriever fine-tuned", "replug_lsr"), ("black-box, retriever fine-tuned", "aar"),
        ("white-box, LM fine-tuned", "retro"), ("white-box, LM fine-tuned", "self_rag"), ("white-box, co-trained", "atlas"),
    ]
    atlas = sections["families"][-1]
    assert atlas["training (wall)"] == "4 h" and atlas["latency (ms / question)"] == "520"
    assert sections["families"][0]["training (wall)"] == "0 (trains nothing)"
    markdown = render_markdown(sections)
    assert "**replug_lsr**" in markdown and "- atlas: white-box: it trains the LM together with the retriever" in markdown
