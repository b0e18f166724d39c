"""`run_architecture`: the one entry point the stage layer calls to train and evaluate an architecture."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from ragops.architectures import registry
from ragops.architectures.base import Architecture, ArchitectureContext
from ragops.errors import RagopsError
from ragops.evaluation.data import check_workspace_leakage, eval_tasks, load_heldout, load_questions, load_train_answers
from ragops.evaluation.harness import evaluate_lm, evaluate_qa, predictions_frame
from ragops.architectures.prompts import qa_prompt

if TYPE_CHECKING:
    from ragops.config import Config
    from ragops.cost import CostMeter
    from ragops.lm.model import CausalLM
    from ragops.paths import Workspace


@dataclass
class EvalResult:
    metrics: dict[str, float]  # `<task>/<metric>` and `_ci_low` / `_ci_high` (no cost keys: those are the meters')
    predictions: pd.DataFrame  # one row per question / held-out document (harness.PREDICTION_COLUMNS)
    info: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable details (counts, settings, timings)


def build_architecture(
    name: str,
    ws: Workspace,
    config: Config,
    *,
    progress: bool = True,
    lm: CausalLM | None = None,
    retrievers: dict[str, Any] | None = None,
    options: Any = None,
) -> Architecture:
    """An architecture instance with its context (LM and retrievers loaded lazily unless given)."""
    cls = registry.resolve(name, config.architectures.get(name))
    if options is None:
        options = config.architectures[name] if name in config.architectures else cls.Options()
    ctx = ArchitectureContext(ws, config, ws.architecture_dir(name), progress=progress, lm_override=lm, retrievers=dict(retrievers or {}))
    return cls(ctx, options)


def run_architecture(
    name: str,
    ws: Workspace,
    config: Config,
    *,
    infer_meter: CostMeter,
    progress: bool = True,
    lm: CausalLM | None = None,
    retrievers: dict[str, Any] | None = None,
) -> EvalResult:
    """Evaluate `name` (trained beforehand when it trains) on every task of `config.eval.tasks` (`eval_tasks`: auto = what the split built).

    Questions come from `questions.parquet` (split `config.eval.split`, first `max_questions` per
    task by qid) and held-out documents from `heldout.parquet` (the split's half, first
    `max_lm_docs` by doc_id; no held-out id may be in the chunk table). A trained architecture
    must have been trained (the train stage) for the current settings. `infer_meter` must not be
    entered yet: evaluation runs inside it, with token, FLOP and retrieval counters and the
    parameter counts. `lm`/`retrievers` may be passed
    ready-made (tests, benchmarks); otherwise they are loaded from the workspace.
    """
    eval_config = config.eval
    arch = build_architecture(name, ws, config, progress=progress, lm=lm, retrievers=retrievers)
    tasks = eval_tasks(ws, eval_config)
    questions = load_questions(ws, tasks, eval_config.split, eval_config.max_questions)
    docs = load_heldout(ws, eval_config.split, eval_config.max_lm_docs) if "lm" in tasks else None
    if docs is not None:
        check_workspace_leakage(ws)
    train_answers = load_train_answers(ws) if len(questions) else frozenset()

    if arch.needs_training():
        raise RagopsError(f"{arch.artifact_dir}: '{name}' is not trained for the current settings (run: ragops train {name})")
    train_info = (arch.trained_manifest() or {}).get("info")

    metrics: dict[str, float] = {}
    parts: list[pd.DataFrame] = []
    seconds: dict[str, float] = {}
    with infer_meter:
        lm_before = arch.lm.counters.snapshot()
        for task in tasks:
            start = time.perf_counter()
            # Each kind of task is metered on its own: QA per 1,000 questions, lm per 1,000 tokens.
            if task == "lm":
                with infer_meter.part("lm", "tokens") as part:
                    task_metrics, table = evaluate_lm(arch, docs, infer_meter, eval_config, config.seed)
                    part.units += float(table["n_tokens"].sum())
            else:
                subset = questions[questions["task"] == task]
                with infer_meter.part("qa", "questions") as part:
                    task_metrics, table = evaluate_qa(arch, task, subset, infer_meter, eval_config, config.seed, train_answers)
                    part.units += len(table)
            metrics.update(task_metrics)
            parts.append(table)
            seconds[task] = round(time.perf_counter() - start, 3)
        lm_spent = arch.lm.counters.since(lm_before)
    total, trainable = arch.param_counts()
    infer_meter.set_params(total, trainable)

    predictions = predictions_frame(parts)
    lm_model = arch.lm
    qa_rows = predictions[predictions["task"] != "lm"]
    shows_passages = bool(len(qa_rows) and qa_rows["shown_doc_ids"].map(len).gt(0).any())
    prompt = qa_prompt("{question}", ["{passage}"] if shows_passages else [], lm_model.chat_formatter) if len(qa_rows) else None
    info = {
        **arch.tags(),
        "options": arch.options.model_dump(mode="json"),
        "tasks": tasks,
        "split": eval_config.split,
        "examples": {task: int((predictions["task"] == task).sum()) for task in tasks},
        "seconds": seconds,
        # The prompt as this architecture used it: a {passage} slot only if it showed passages.
        "prompt": prompt,
        "conventions": conventions(config, lm_model, prompt),
        "lm": {
            "path": lm_model.name,
            "params": lm_model.n_params,
            "layers": lm_model.n_layers,
            "d_model": lm_model.d_model,
            "max_length": lm_model.max_length,
            "device": str(lm_model.device),
            "counters": lm_spent,
        },
        "train": train_info,
        "architecture_info": arch.info,
    }
    return EvalResult(metrics=metrics, predictions=predictions, info=info)


def conventions(config: Config, lm: CausalLM, prompt: str | None) -> dict[str, Any]:
    """What changes the numbers without being an option of the architecture, recorded as MLflow
    params with every evaluation: the prompt form, how passages are laid out, the LM's and the
    encoder's real names, the LM's quantisation and precision and the token held-out text is scored after."""
    from ragops.architectures.prompts import format_passage
    from ragops.lm.prepare import describe_lm
    from ragops.resources import encoder_name

    lm_name, quantisation = describe_lm(lm.name, lm.model.config)
    return {
        "prompt.format": "chat" if lm.chat_formatter is not None else "raw",
        "prompt.template": prompt,
        "prompt.passage_format": format_passage("{passage}"),
        "prompt.passage_order": "best last (nearest the question)",
        "lm.name": lm_name,
        "lm.quantisation": quantisation,
        "lm.document_start": lm.document_start_text,
        "lm.resolved_precision": lm.precision,  # lm.precision (`auto`) as resolved on the machine that evaluated
        "encoder.name": encoder_name(config.embed.model),
    }
