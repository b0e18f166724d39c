"""ragops.compare against a real MLflow SQLite store: two logged architecture runs under a parent."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ragops.compare import comparison_table, format_table, higher_is_better, pareto_front, pick_champion
from ragops.compare.plots import plot_pareto
from ragops.ops.mlflow_compare import collect_runs
from ragops.params import resolve
from ragops.paths import Workspace

EXPERIMENT = "compare-test"

from tests.server_fixtures import FAKE_ARCHITECTURES as RUNS  # noqa: E402  (two real-looking architecture runs)


def _config(**overrides):
    return resolve({"tracking": {"experiment": EXPERIMENT}, **overrides})


def _log_pipeline(ws, config, runs, *, failed: str | None = None) -> str:
    from ragops.tracking import pipeline_run, tracked_run

    with pipeline_run(ws, config) as parent:
        for name, spec in runs.items():
            with tracked_run(ws, config, name, kind="architecture", parent_run_id=parent.run_id,
                             tags={"architecture": name, **spec["tags"]}) as run:
                run.log_metrics(spec["metrics"])
        if failed:
            with pytest.raises(RuntimeError):
                with tracked_run(ws, config, failed, kind="architecture", parent_run_id=parent.run_id,
                                 tags={"architecture": failed, "family": "white-box", "finetune": "lm"}) as run:
                    run.log_metrics({"describe/f1": 0.99})
                    raise RuntimeError("boom")
    return parent.run_id


@pytest.fixture
def logged(tmp_path, mlflow_store):
    ws = Workspace(tmp_path)
    config = _config()
    # An older pipeline run with different numbers: must not be picked.
    old = {"closed_book": {"tags": RUNS["closed_book"]["tags"], "metrics": {**RUNS["closed_book"]["metrics"], "describe/f1": 0.01}}}
    _log_pipeline(ws, config, old)
    parent = _log_pipeline(ws, config, RUNS, failed="broken_arch")
    return ws, config, parent


def test_collect_runs_latest_parent(logged):
    ws, config, parent = logged
    df = collect_runs(EXPERIMENT)
    assert df.attrs["parent_run_id"] == parent
    assert df.attrs["source"] == "parent"
    assert list(df["architecture"]) == ["closed_book", "incontext_ralm"]  # the FAILED run is left out
    assert set(df["family"]) == {"baseline", "black-box"}
    assert df.set_index("architecture").loc["closed_book", "describe/f1"] == pytest.approx(0.20)
    assert (df["parent_run_id"] == parent).all()
    # An explicit parent gives the same rows.
    assert list(collect_runs(EXPERIMENT, parent)["run_id"]) == list(df["run_id"])


def test_collect_runs_falls_back_to_latest_per_architecture(logged):
    """A pipeline run whose architecture stages were skipped (unchanged) has no architecture children."""
    from ragops.tracking import pipeline_run

    ws, config, parent = logged
    with pipeline_run(ws, config) as empty_parent:
        pass
    df = collect_runs(EXPERIMENT, empty_parent.run_id)
    assert df.attrs["source"] == "latest-per-architecture"
    assert list(df["architecture"]) == ["closed_book", "incontext_ralm"]
    assert df.set_index("architecture").loc["closed_book", "describe/f1"] == pytest.approx(0.20)
    with pytest.raises(Exception, match="does not exist"):
        collect_runs("no-such-experiment")


def test_comparison_table_and_pareto(logged):
    df = collect_runs(EXPERIMENT)
    table = comparison_table(df)
    cols = list(table.columns)
    assert cols[:3] == ["architecture", "family", "finetune"]
    # Tasks in order, each metric followed by its CI; cost columns after the quality ones.
    assert cols.index("describe/f1") < cols.index("describe/f1_ci_low") < cols.index("describe/f1_ci_high") < cols.index("identify/em") < cols.index("lm/token_ppl")
    assert cols.index("lm/token_ppl") < cols.index("train/wall_s") < cols.index("inference/qa/cost_usd_per_1k_questions")
    shown = {row["architecture"]: row for row in format_table(table)}
    assert shown["incontext_ralm"]["describe/f1"] == "0.450 [0.380, 0.520]"

    front = pareto_front(df, "describe/f1", "inference/qa/cost_usd_per_1k_questions")
    assert list(front["architecture"]) == ["closed_book", "incontext_ralm"]  # cheaper vs better: both on the front
    # Perplexity is minimised: incontext_ralm is better *and*... more expensive, so both stay.
    assert not higher_is_better("lm/token_ppl") and higher_is_better("describe/f1")
    dominated = df.copy()
    dominated.loc[dominated["architecture"] == "closed_book", "inference/qa/cost_usd_per_1k_questions"] = 0.5
    assert list(pareto_front(dominated, "describe/f1", "inference/qa/cost_usd_per_1k_questions")["architecture"]) == ["incontext_ralm"]
    assert pick_champion(df, "describe/f1", "max")["architecture"] == "incontext_ralm"
    assert pick_champion(df, "lm/token_ppl", "min")["architecture"] == "incontext_ralm"
    assert pick_champion(df, "identify/em", "min")["architecture"] == "closed_book"


def test_plot_pareto_three_families(tmp_path):
    df = pd.DataFrame([
        {"architecture": "closed_book", "family": "baseline", "finetune": "none", "q": 0.2, "q_ci_low": 0.1, "q_ci_high": 0.3, "c": 1.0},
        {"architecture": "incontext_ralm", "family": "black-box", "finetune": "none", "q": 0.5, "q_ci_low": 0.4, "q_ci_high": 0.6, "c": 3.0},
        {"architecture": "retro_lite", "family": "white-box", "finetune": "joint", "q": 0.4, "q_ci_low": 0.3, "q_ci_high": 0.5, "c": 5.0},
    ])
    out = plot_pareto(df, "q", "c", tmp_path / "p.png", tmp_path / "p.html")
    assert out["front"] == ["closed_book", "incontext_ralm"]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (tmp_path / "p.html").read_text()
    for family in ("baseline", "black-box", "white-box"):
        assert family in html
    assert "retro_lite" in html and "step-after" in html  # the front line
    # Interactive offline: the Vega runtime is embedded, no script is fetched from a CDN.
    assert "cdn.jsdelivr.net" not in html and "vegaEmbed" in html


def test_compare_stage_reads_the_evaluation_outputs_and_registers_the_champion(tmp_path, mlflow_store):
    import mlflow

    from ragops import stages
    from tests.compare_fixtures import two_architectures

    ws, config = Workspace(tmp_path), _config()
    preds = two_architectures(ws)
    outcome = stages.compare(ws, config)  # an empty MLflow store: no experiment, no runs, no model yet
    summary = outcome.summary
    assert not outcome.skipped and summary["architectures"] == ["closed_book", "incontext_ralm"]
    assert [row["architecture"] for row in summary["table"]] == ["closed_book", "incontext_ralm"]
    assert summary["pareto"]["inference"] == {"cost_metric": "inference/qa/cost_usd_per_1k_questions", "front": ["closed_book", "incontext_ralm"]}
    # both train nothing (cost exactly 0): the better one alone is on the training-cost front
    assert summary["pareto"]["train"] == {"cost_metric": "train/cost_usd", "front": ["incontext_ralm"]}
    for name in ("comparison.csv", "comparison.json", "paired.csv", "summary.json", "pareto-inference.png", "pareto-inference.html",
                 "pareto-train.png", "pareto-train.html"):
        assert (ws.compare_dir / name).stat().st_size > 0, name
    # paired vs the baseline: the mean per-question F1 difference, computed here directly
    vs_base = {row["metric"]: row for row in summary["paired_vs_baseline"]}
    ralm_qa = preds["incontext_ralm"].query("task == 'describe'")
    closed_qa = preds["closed_book"].query("task == 'describe'")
    assert vs_base["describe/f1"]["a"] == "incontext_ralm" and vs_base["describe/f1"]["b"] == "closed_book"
    assert vs_base["describe/f1"]["diff"] == pytest.approx(float(np.mean(ralm_qa["f1"].to_numpy() - closed_qa["f1"].to_numpy())))
    assert vs_base["describe/f1"]["n"] == 40 and vs_base["describe/f1"]["significant"]
    assert vs_base["lm/token_ppl"]["diff"] < 0 and vs_base["lm/token_ppl"]["a_better"] == 12
    champion = summary["champion"]
    assert champion["architecture"] == "incontext_ralm" and "significant" in champion["reason"]

    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(config.champion.registered_model, config.champion.alias)
    assert version.tags["architecture"] == "incontext_ralm" and version.tags["metric"] == "describe/f1"
    from ragops.ops.champion import load_card

    card = load_card(f"models:/{config.champion.registered_model}@{config.champion.alias}")
    assert card["architecture"] == "incontext_ralm" and card["family"] == "black-box"
    assert card["metrics"]["describe/f1"] == pytest.approx(summary["table"][1]["describe/f1"])
    assert card["options"]["retriever"] == config.architectures["incontext_ralm"].retriever

    # unchanged inputs: skipped, same files; forced: byte-identical files and no new model version
    files = {p.name: p.read_bytes() for p in ws.compare_dir.iterdir()}
    assert stages.compare(ws, config).skipped
    again = stages.compare(ws, config, force=True)
    assert not again.skipped and {p.name: p.read_bytes() for p in ws.compare_dir.iterdir()} == files
    assert client.get_model_version_by_alias(config.champion.registered_model, config.champion.alias).version == version.version
    assert not any(str(tmp_path) in text.decode(errors="ignore") for name, text in files.items() if name.endswith((".json", ".csv")))


def test_compare_without_results_names_the_missing_file(tmp_path, mlflow_store):
    from ragops import stages
    from ragops.errors import RagopsError

    with pytest.raises(RagopsError, match=r"metrics/closed_book\.json.*missing input of stage 'compare'"):
        stages.compare(Workspace(tmp_path), _config())


def test_analysis_imports_neither_mlflow_nor_matplotlib():
    import subprocess
    import sys

    code = "import sys, ragops.compare, ragops.compare.analysis; print(sorted(m for m in ('mlflow', 'matplotlib', 'altair') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_registering_the_champion_leaves_mlflow_global_state_alone(tmp_path, mlflow_store):
    import mlflow

    from ragops.ops.mlflow_compare import register_champion

    other = f"sqlite:///{tmp_path / 'other.db'}"
    client = mlflow.MlflowClient(other)
    experiment = client.create_experiment("elsewhere", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(experiment)
    before = (mlflow.get_tracking_uri(), mlflow.active_run())
    card = {"architecture": "closed_book", "family": "baseline", "metrics": {"describe/f1": 0.2}}
    first = register_champion(card, run_id=run.info.run_id, registered_model="m", alias="champion", tracking_uri=other)
    assert (mlflow.get_tracking_uri(), mlflow.active_run()) == before == (mlflow_store, None)
    assert first["new_version"] and client.get_model_version_by_alias("m", "champion").version == int(first["version"])
    # the project's store was not written to
    assert mlflow.MlflowClient(mlflow_store).search_registered_models() == []
    again = register_champion(card, run_id=run.info.run_id, registered_model="m", alias="champion", tracking_uri=other)
    assert again["version"] == first["version"] and not again["new_version"]
    changed = register_champion({**card, "metrics": {"describe/f1": 0.3}}, run_id=run.info.run_id, registered_model="m",
                                alias="champion", tracking_uri=other)
    assert int(changed["version"]) == int(first["version"]) + 1


def _paired_rows(*rows):
    """Hand-made paired differences: (a, b, metric, diff, ci_low, ci_high)."""
    return pd.DataFrame([{"a": a, "b": b, "metric": m, "diff": d, "ci_low": lo, "ci_high": hi, "a_value": 0.0, "b_value": 0.0,
                          "a_better": 0, "b_better": 0, "significant": lo > 0 or hi < 0} for a, b, m, d, lo, hi in rows])


CANDIDATES = pd.DataFrame([
    {"architecture": "cheap", "family": "black-box", "describe/f1": 0.40, "inference/qa/cost_usd_per_1k_questions": 1.0},
    {"architecture": "pricey", "family": "white-box", "describe/f1": 0.42, "inference/qa/cost_usd_per_1k_questions": 5.0},
    {"architecture": "weak", "family": "baseline", "describe/f1": 0.10, "inference/qa/cost_usd_per_1k_questions": 0.1},
])


def test_champion_rule_a_lead_counts_only_when_the_paired_interval_excludes_zero():
    from ragops.compare.analysis import decide_champion

    # pricey leads cheap by 0.02 but the paired CI [-0.01, 0.05] includes 0: the cheaper of the two wins
    tied = _paired_rows(("pricey", "cheap", "describe/f1", 0.02, -0.01, 0.05), ("pricey", "weak", "describe/f1", 0.32, 0.28, 0.36))
    decision = decide_champion(CANDIDATES, "describe/f1", "max", paired=tied)
    assert decision.architecture == "cheap" and decision.best == "pricey"
    assert decision.contenders == ["pricey", "cheap"]
    assert "not significant" in decision.reason and "cheaper" in decision.reason
    # the same numbers with a significant lead: the best point estimate wins
    separated = _paired_rows(("pricey", "cheap", "describe/f1", 0.02, 0.01, 0.03), ("pricey", "weak", "describe/f1", 0.32, 0.28, 0.36))
    decision = decide_champion(CANDIDATES, "describe/f1", "max", paired=separated)
    assert decision.architecture == "pricey" and decision.contenders == ["pricey"] and "significant" in decision.reason
    # a row stored the other way round (cheap - pricey) is read negated
    reversed_rows = _paired_rows(("cheap", "pricey", "describe/f1", -0.02, -0.03, -0.01), ("weak", "pricey", "describe/f1", -0.32, -0.36, -0.28))
    assert decide_champion(CANDIDATES, "describe/f1", "max", paired=reversed_rows).architecture == "pricey"
    # rule `point` ignores the intervals
    assert decide_champion(CANDIDATES, "describe/f1", "max", rule="point", paired=tied).architecture == "pricey"
    # without paired data the point estimates decide
    assert decide_champion(CANDIDATES, "describe/f1", "max", paired=None).architecture == "pricey"
    # the tie-break cost is configurable: by training cost pricey is the cheaper one
    with_train = CANDIDATES.assign(**{"train/cost_usd": [3.0, 0.0, 0.0]})
    assert decide_champion(with_train, "describe/f1", "max", paired=tied, cost_metric="train/cost_usd").architecture == "pricey"


def test_champion_rule_for_a_lower_is_better_metric():
    from ragops.compare.analysis import decide_champion

    table = pd.DataFrame([
        {"architecture": "a", "lm/token_ppl": 14.0, "inference/lm/cost_usd_per_1k_tokens": 3.0},
        {"architecture": "b", "lm/token_ppl": 14.7, "inference/lm/cost_usd_per_1k_tokens": 1.0},
    ])
    significant = _paired_rows(("a", "b", "lm/token_ppl", -0.68, -1.04, -0.44))
    decision = decide_champion(table, "lm/token_ppl", "min", paired=significant)
    assert decision.architecture == "a" and "-0.68 [-1.04, -0.44]" in decision.reason
    overlapping = _paired_rows(("a", "b", "lm/token_ppl", -0.68, -1.5, 0.1))
    decision = decide_champion(table, "lm/token_ppl", "min", paired=overlapping)
    assert decision.architecture == "b" and decision.cost_metric == "inference/lm/cost_usd_per_1k_tokens"


def test_training_cost_axis_keeps_methods_that_train_nothing(tmp_path):
    from ragops.compare.plots import axis_scale

    assert axis_scale([0.0, 0.0, 50.0, 3000.0]) == ("symlog", 50.0)  # log beyond 50, zeros still drawn
    assert axis_scale([1.0, 1000.0]) == ("log", None)
    assert axis_scale([0.0, 2.0, 3.0]) == ("linear", None)
    assert axis_scale([0.0, 0.0]) == ("linear", None)
    df = pd.DataFrame([
        {"architecture": "closed_book", "family": "baseline", "finetune": "none", "q": 0.2, "train/cost_usd": 0.0},
        {"architecture": "incontext_ralm", "family": "black-box", "finetune": "none", "q": 0.3, "train/cost_usd": 0.0},
        {"architecture": "replug_lsr", "family": "black-box", "finetune": "retriever", "q": 0.35, "train/cost_usd": 40.0},
        {"architecture": "atlas", "family": "white-box", "finetune": "joint", "q": 0.5, "train/cost_usd": 9000.0},
    ])
    out = plot_pareto(df, "q", "train/cost_usd", tmp_path / "t.png", tmp_path / "t.html")
    # the two no-training methods cost the same (0): the better one dominates, the other is not "cheaper to train"
    assert out["front"] == ["incontext_ralm", "replug_lsr", "atlas"] and out["scale"] == "symlog"
    html = (tmp_path / "t.html").read_text()
    assert '"type": "symlog"' in html and "closed_book" in html
    for group in ("closed book", "black-box, no fine-tuning", "black-box, retriever fine-tuned", "white-box, co-trained"):
        assert group in html


def test_architectures_without_results_are_named_not_compared(tmp_path, mlflow_store):
    """Only closed_book and incontext_ralm were evaluated (e.g. a flow run on those two): the others
    enabled in params.yaml are named in the comparison's messages, and the two are compared."""
    from ragops import stages
    from tests.compare_fixtures import two_architectures

    ws = Workspace(tmp_path)
    two_architectures(ws)
    config = _config(architectures={"closed_book": {}, "incontext_ralm": {}, "replug": {}})
    summary = stages.compare(ws, config).summary
    assert summary["architectures"] == ["closed_book", "incontext_ralm"] and summary["not_evaluated"] == ["replug"]
    assert summary["messages"][0] == "no evaluation results for replug: not compared (run: ragops evaluate replug)"
