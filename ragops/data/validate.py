"""Great Expectations 1.x gates for the corpus and chunk tables.

Each call builds a fresh ephemeral GX context (suite and definition names are unique per context),
runs one suite over the whole DataFrame and condenses the result into a `ValidationReport` whose
`summary` is one line naming every failed expectation and how many rows (or checks) failed it.
GX is imported lazily (about 5 s) so importing ragops stays fast.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ragops.config import ValidateConfig
from ragops.errors import ValidationFailed

LEFTOVER_HTML = r"<\s*(?:script|style|div|span|p|br|a|html|body)\b"
NON_BLANK = r"\S"


@dataclass
class ValidationReport:
    success: bool
    failures: list[tuple[str, int]] = field(default_factory=list)  # ("expect_x(column)", unexpected count)
    summary: str = ""
    result: dict[str, Any] = field(default_factory=dict)  # the full GX result, JSON-serialisable

    def raise_if_failed(self) -> None:
        if not self.success:
            raise ValidationFailed(self.summary)


def _gx():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import great_expectations.expectations as gxe

    # GX pins this module's logger to INFO at import; its "temporary docs site" lines are noise.
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    return gx, gxe


def _corpus_expectations(gxe, cfg: ValidateConfig) -> list:
    return [
        gxe.ExpectColumnValuesToNotBeNull(column="doc_id"),
        gxe.ExpectColumnValuesToBeUnique(column="doc_id"),
        gxe.ExpectColumnValuesToNotBeNull(column="title"),
        gxe.ExpectColumnValuesToNotBeNull(column="text"),
        gxe.ExpectColumnValuesToMatchRegex(column="text", regex=NON_BLANK),
        gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=cfg.min_chars, max_value=cfg.max_chars),
        gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=LEFTOVER_HTML),
        gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows),
    ]


def _chunk_expectations(gxe, cfg: ValidateConfig) -> list:
    return [
        gxe.ExpectColumnValuesToNotBeNull(column="chunk_id"),
        gxe.ExpectColumnValuesToBeUnique(column="chunk_id"),
        gxe.ExpectColumnValuesToNotBeNull(column="doc_id"),
        gxe.ExpectColumnValuesToNotBeNull(column="text"),
        gxe.ExpectColumnValuesToMatchRegex(column="text", regex=NON_BLANK),
        gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=cfg.chunk_min_chars, max_value=cfg.chunk_max_chars),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["doc_id", "position"]),
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
    ]


def _label(config) -> str:
    kwargs = config.kwargs
    if kwargs.get("column") is not None:
        return f"{config.type}({kwargs['column']})"
    if kwargs.get("column_list"):
        return f"{config.type}({', '.join(kwargs['column_list'])})"
    return config.type


def _error_message(result) -> str | None:
    info = result.exception_info or {}
    if info.get("raised_exception"):
        return info.get("exception_message")
    for value in info.values():  # keyed by metric id when a metric failed to compute
        if isinstance(value, dict) and value.get("raised_exception"):
            return value.get("exception_message")
    return None


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _run(name: str, df: pd.DataFrame, expectations: list) -> ValidationReport:
    gx, _ = _gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch = context.data_sources.add_pandas(name).add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
    suite = context.suites.add(gx.ExpectationSuite(name=f"{name}_suite"))
    for expectation in expectations:
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=f"{name}_validation", data=batch, suite=suite))
    outcome = definition.run(batch_parameters={"dataframe": df}, result_format="SUMMARY")

    # GX returns results in its own order; report failures in the order the suite lists them.
    position = {_label(e.configuration): i for i, e in enumerate(expectations)}
    ordered = sorted(outcome.results, key=lambda r: position.get(_label(r.expectation_config), len(position)))
    failures: list[tuple[str, int]] = []
    parts: list[str] = []
    for result in ordered:
        if result.success:
            continue
        label = _label(result.expectation_config)
        count = result.result.get("unexpected_count")
        error = _error_message(result)
        if count is None or error:
            failures.append((label, 1))
            parts.append(f"{label} on 1 check" + (f" ({error})" if error else ""))
        else:
            failures.append((label, int(count)))
            parts.append(f"{label} on {_plural(int(count), 'row')}")
    if outcome.success:
        summary = f"{name} validation passed: {_plural(len(expectations), 'expectation')} on {_plural(len(df), 'row')}"
    else:
        summary = f"{name} validation failed: " + "; ".join(parts)
    return ValidationReport(success=bool(outcome.success), failures=failures, summary=summary, result=outcome.to_json_dict())


def validate_corpus(df: pd.DataFrame, cfg: ValidateConfig) -> ValidationReport:
    """doc_id not null and unique; title and text not null; text non-blank, min_chars..max_chars long,
    free of leftover HTML tags; at least cfg.min_rows rows."""
    _, gxe = _gx()
    return _run("corpus", df, _corpus_expectations(gxe, cfg))


def validate_chunks(df: pd.DataFrame, cfg: ValidateConfig) -> ValidationReport:
    """chunk_id not null and unique; doc_id and text not null; text non-blank and
    chunk_min_chars..chunk_max_chars long; (doc_id, position) unique; at least one row."""
    _, gxe = _gx()
    return _run("chunks", df, _chunk_expectations(gxe, cfg))


def validate_questions(df: pd.DataFrame) -> ValidationReport:
    """The user's questions (`ragops.data.questions`): qid not null and unique; question and answer
    not null and non-blank; every row's answers a non-empty list; at least one row."""
    _, gxe = _gx()
    # Scalar columns only (GX works on them); the answers list as its length.
    table = df[["qid", "question", "answer"]].assign(n_answers=[len(a) for a in df["answers"]])
    return _run("questions", table, [
        gxe.ExpectColumnValuesToNotBeNull(column="qid"),
        gxe.ExpectColumnValuesToBeUnique(column="qid"),
        gxe.ExpectColumnValuesToNotBeNull(column="question"),
        gxe.ExpectColumnValuesToMatchRegex(column="question", regex=NON_BLANK),
        gxe.ExpectColumnValuesToNotBeNull(column="answer"),
        gxe.ExpectColumnValuesToMatchRegex(column="answer", regex=NON_BLANK),
        gxe.ExpectColumnValuesToBeBetween(column="n_answers", min_value=1),
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
    ])
