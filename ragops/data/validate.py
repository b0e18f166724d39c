"""Great Expectations 1.x gates for the corpus and chunk tables.

Each call builds a fresh ephemeral GX context (suite and definition names are unique per context),
runs one suite over the whole DataFrame and condenses the result into a `ValidationReport` whose
`summary` is one line naming every failed expectation, how many rows failed it, the limit, up to
`validate.examples` offending documents (id and file), and how to proceed (the file to fix or the
params.yaml key to change). GX is imported lazily (about 5 s) so importing ragops stays fast.

A valid document is defined once, by `ingest` (`min_chars`/`max_chars`): ingest skips any other
with one line, and this gate checks the same limits, so a short file never stops a whole run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ragops.config import IngestConfig, ValidateConfig
from ragops.errors import ValidationFailed

LEFTOVER_HTML = r"<\s*(?:script|style|div|span|p|br|a|html|body)\b"
NON_BLANK = r"\S"
# Rows whose text was extracted from an HTML or Markdown file: ingest consumed their markup, so a tag
# still in the text was content (an escaped example on the page, a Markdown code block), not leftover markup.
NOT_FROM_MARKUP = 'source.str.contains("[.](?:html?|md)$", case=False, regex=True) == False'


@dataclass
class Check:
    """One expectation with what a user needs when it fails: the limit it enforces and how to proceed."""

    expectation: Any
    limit: str = ""  # e.g. "at least 20 characters (ingest.min_chars)"
    hint: str = ""  # e.g. "fix or remove those files, or set validate.leftover_html: false"


@dataclass
class ValidationReport:
    success: bool
    failures: list[tuple[str, int]] = field(default_factory=list)  # ("expect_x(column)", unexpected count)
    summary: str = ""
    result: dict[str, Any] = field(default_factory=dict)  # the full GX result, JSON-serialisable
    # label -> up to `examples` offending rows, each "doc_id" or "doc_id (path)"
    offenders: dict[str, list[str]] = field(default_factory=dict)

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


def _corpus_checks(gxe, cfg: ValidateConfig, limits: IngestConfig) -> list[Check]:
    fix = "fix or remove those files and re-run ragops ingest"
    checks = [
        Check(gxe.ExpectColumnValuesToNotBeNull(column="doc_id"), "every document has an id", fix),
        Check(gxe.ExpectColumnValuesToBeUnique(column="doc_id"), "ids are unique", fix),
        Check(gxe.ExpectColumnValuesToNotBeNull(column="title"), "every document has a title", fix),
        Check(gxe.ExpectColumnValuesToNotBeNull(column="text"), "every document has a text", fix),
        Check(gxe.ExpectColumnValuesToMatchRegex(column="text", regex=NON_BLANK), "text is not blank", fix),
        Check(
            gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=limits.min_chars, max_value=limits.max_chars),
            f"text {limits.min_chars:,} to {limits.max_chars:,} characters (ingest.min_chars, ingest.max_chars)",
            "re-run ragops ingest (it skips documents outside these limits) or change ingest.min_chars/max_chars",
        ),
    ]
    if cfg.leftover_html:
        checks.append(Check(
            gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=LEFTOVER_HTML, row_condition=NOT_FROM_MARKUP, condition_parser="pandas"),
            "no HTML tags (<div>, <p>, <body>, ...) in the text of files other than .html/.md",
            "strip the markup from those files (or name them .html), or set validate.leftover_html: false if the markup is content",
        ))
    checks.append(Check(
        gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows),
        f"at least {cfg.min_rows:,} documents (validate.min_rows)",
        "add documents, or lower validate.min_rows",
    ))
    return checks


def _chunk_checks(gxe, cfg: ValidateConfig) -> list[Check]:
    bug = "a chunking bug: report it with the offending documents"
    return [
        Check(gxe.ExpectColumnValuesToNotBeNull(column="chunk_id"), "every chunk has an id", bug),
        Check(gxe.ExpectColumnValuesToBeUnique(column="chunk_id"), "chunk ids are unique", bug),
        Check(gxe.ExpectColumnValuesToNotBeNull(column="doc_id"), "every chunk names its document", bug),
        Check(gxe.ExpectColumnValuesToNotBeNull(column="text"), "every chunk has a text", bug),
        Check(gxe.ExpectColumnValuesToMatchRegex(column="text", regex=NON_BLANK), "chunk text is not blank", bug),
        Check(
            gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=cfg.chunk_min_chars, max_value=cfg.chunk_max_chars),
            f"chunk text {cfg.chunk_min_chars:,} to {cfg.chunk_max_chars:,} characters (validate.chunk_min_chars, validate.chunk_max_chars)",
            "change validate.chunk_min_chars/chunk_max_chars or chunk.size",
        ),
        Check(gxe.ExpectCompoundColumnsToBeUnique(column_list=["doc_id", "position"]), "one chunk per (document, position)", bug),
        Check(gxe.ExpectTableRowCountToBeBetween(min_value=1), "at least 1 chunk", "check the corpus: nothing was indexed"),
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


def _where(row: dict[str, Any] | int) -> str:
    """An offending row as a user finds it: its id (a file's id is `file:<path>`), else with its title."""
    if not isinstance(row, dict):  # a table without id columns: GX gives the row number
        return f"row {row}"
    ident = next((str(row[key]) for key in ("chunk_id", "doc_id", "qid") if key in row), "?")
    title = row.get("title")
    if not ident.startswith("file:") and isinstance(title, str) and title:
        return f"{ident} '{title[:60]}'"
    return ident


def _run(name: str, df: pd.DataFrame, checks: list, examples: int = 3) -> ValidationReport:
    """Run `checks` (Check, or a bare GX expectation) over `df`; the one-line summary names each
    failed expectation, its row count, its limit, up to `examples` offending rows and a hint."""
    gx, _ = _gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    checks = [c if isinstance(c, Check) else Check(c) for c in checks]
    index_columns = [c for c in ("chunk_id", "doc_id", "qid", "title") if c in df.columns]
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch = context.data_sources.add_pandas(name).add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
    suite = context.suites.add(gx.ExpectationSuite(name=f"{name}_suite"))
    for check in checks:
        suite.add_expectation(check.expectation)
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=f"{name}_validation", data=batch, suite=suite))
    result_format: dict[str, Any] = {"result_format": "SUMMARY", "partial_unexpected_count": max(examples, 20)}
    if index_columns:
        result_format["unexpected_index_column_names"] = index_columns
    outcome = definition.run(batch_parameters={"dataframe": df}, result_format=result_format)

    # GX returns results in its own order; report failures in the order the suite lists them.
    by_label = {_label(c.expectation.configuration): c for c in checks}
    position = {label: i for i, label in enumerate(by_label)}
    ordered = sorted(outcome.results, key=lambda r: position.get(_label(r.expectation_config), len(position)))
    failures: list[tuple[str, int]] = []
    offenders: dict[str, list[str]] = {}
    parts: list[str] = []
    for result in ordered:
        if result.success:
            continue
        label = _label(result.expectation_config)
        check = by_label.get(label, Check(None))
        count = result.result.get("unexpected_count")
        error = _error_message(result)
        if count is None or error:
            failures.append((label, 1))
            part = f"{label} on 1 check" + (f" ({error})" if error else "")
            if label == "expect_table_row_count_to_be_between":
                part += f" ({_plural(len(df), 'row')})"
        else:
            failures.append((label, int(count)))
            part = f"{label} on {_plural(int(count), 'row')}"
            rows = [_where(row) for row in (result.result.get("partial_unexpected_index_list") or [])[:examples]]
            if rows:
                offenders[label] = rows
                part += ": " + ", ".join(rows) + (", ..." if int(count) > len(rows) else "")
        if check.limit:
            part += f" [wanted: {check.limit}]"
        if check.hint:
            part += f" -> {check.hint}"
        parts.append(part)
    if outcome.success:
        summary = f"{name} validation passed: {_plural(len(checks), 'expectation')} on {_plural(len(df), 'row')}"
    else:
        summary = f"{name} validation failed: " + "; ".join(parts)
    return ValidationReport(
        success=bool(outcome.success), failures=failures, summary=summary, result=outcome.to_json_dict(), offenders=offenders,
    )


def validate_corpus(df: pd.DataFrame, cfg: ValidateConfig, limits: IngestConfig | None = None) -> ValidationReport:
    """doc_id not null and unique; title and text not null; text non-blank, within ingest's
    min_chars..max_chars (`limits`), free of leftover HTML tags outside HTML/Markdown files (unless
    validate.leftover_html is false); at least cfg.min_rows rows."""
    _, gxe = _gx()
    return _run("corpus", df, _corpus_checks(gxe, cfg, limits or IngestConfig()), cfg.examples)


def validate_chunks(df: pd.DataFrame, cfg: ValidateConfig) -> ValidationReport:
    """chunk_id not null and unique; doc_id and text not null; text non-blank and
    chunk_min_chars..chunk_max_chars long; (doc_id, position) unique; at least one row."""
    _, gxe = _gx()
    return _run("chunks", df, _chunk_checks(gxe, cfg), cfg.examples)


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
