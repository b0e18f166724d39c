"""The Architecture interface every RAG method implements, and the context it is built with.

An architecture is a class with metadata (`name`, `family`, `finetune`: MLflow tags), an `Options`
model (a subclass of `ArchitectureOptions`, validated from params.yaml), and four methods:

- `train(meter) -> dict | None`: fit whatever the method fits (nothing by default), writing
  versioned artifacts into `self.artifact_dir`; `needs_training()` says whether that is still to do.
- `answer(questions, meter) -> DataFrame`: predictions for QA questions. The default retrieves
  with `passages_for_questions` (none: closed book), builds the shared prompt
  (`ragops.architectures.prompts`), scores the gold answer and generates greedily from that one
  prompt forward. A method that answers differently (an ensemble, reflection tokens) overrides it.
- `score_documents(docs, meter) -> DataFrame`: per-document NLL for the `lm` task. The default is
  the plain LM over sliding windows.

Every method charges what it spends to the `CostMeter` it is given (tokens by kind, FLOPs,
retrieval calls). Module top level stays light: torch, transformers and the retrieval stack are
imported only when an architecture is built and used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from ragops.config import DEFAULT_MODEL, ArchitectureOptions
from ragops.errors import RagopsError
from ragops.pipeline import code_fingerprint
from ragops.retrieval.types import Passage, Retriever

if TYPE_CHECKING:
    import pandas as pd

    from ragops.config import Config
    from ragops.cost import CostMeter
    from ragops.lm.model import CausalLM
    from ragops.paths import Workspace
    from ragops.training.loop import TrainRun

Family = Literal["baseline", "black-box", "white-box"]
FineTune = Literal["none", "retriever", "lm", "joint"]

QA_BATCH = 32  # questions per LM call (and per progress-bar step)
RETRIEVER_DIR = "retriever"  # a trained architecture's tuned retriever: query_encoder/, index/
#: Package-relative sources every architecture's results depend on (see `Architecture.code_paths`):
#: the interface, the shared mechanisms, the prompt format, the LM layer and the retrieval stack.
INFERENCE_CODE = ("architectures/base.py", "architectures/shared.py", "architectures/prompts.py", "lm", "retrieval")
#: ... and, for an architecture that fine-tunes something, the training substrate.
TRAINING_CODE = ("training",)
LM_DOC_BATCH = 8  # held-out documents per LM call in the plain-LM path


def lm_path(ws: Workspace, config: Config) -> Path | str:
    """Where the LM is loaded from: the prepared folder for "default", else `lm.model` itself."""
    if config.lm.model == DEFAULT_MODEL:
        if not (ws.lm_dir / "config.json").exists():
            raise RagopsError(f"{ws.lm_dir}: no prepared language model (run the prepare_lm stage first)")
        return ws.lm_dir
    from ragops.resources import check_model_spec

    check_model_spec("lm.model", config.lm.model)
    return config.lm.model


@dataclass
class ArchitectureContext:
    """What an architecture is built with: workspace, config, its artifact dir, the LM and retrievers (lazy).

    `lm` and `retrievers` may be given ready-made (tests, sweeps that reuse one LM); otherwise the
    LM is loaded from `lm_path(ws, config)` and a retriever from `ragops.retrieval` on first use.
    """

    ws: Workspace
    config: Config
    artifact_dir: Path
    progress: bool = True
    lm_override: CausalLM | None = None
    retrievers: dict[str, Retriever] = field(default_factory=dict)

    @property
    def lm(self) -> CausalLM:
        if self.lm_override is None:
            from ragops.lm.model import CausalLM

            self.lm_override = CausalLM.from_config(self.config.lm, lm_path(self.ws, self.config))
        return self.lm_override

    def retriever(self, kind: str) -> Retriever:
        """The retriever of `kind`; a trained architecture's own tuned retriever (artifact_dir/retriever)
        when it has one, so evaluation retrieves with what training produced."""
        if kind not in self.retrievers:
            from ragops.retrieval.retriever import load_retriever

            trained = self.artifact_dir / RETRIEVER_DIR
            trained_dir = trained if (trained / "index" / "meta.json").exists() else None
            self.retrievers[kind] = load_retriever(self.ws, self.config, kind, trained_dir=trained_dir)
        return self.retrievers[kind]


class Architecture:
    name: ClassVar[str] = "architecture"
    family: ClassVar[Family] = "baseline"
    finetune: ClassVar[FineTune] = "none"
    Options: ClassVar[type[ArchitectureOptions]] = ArchitectureOptions

    def __init__(self, ctx: ArchitectureContext, options: ArchitectureOptions | None = None) -> None:
        self.ctx = ctx
        if options is None:
            configured = ctx.config.architectures.get(self.name)
            options = configured if isinstance(configured, self.Options) else self.Options.model_validate(configured or {})
        self.options = options
        self.info: dict[str, Any] = {}  # anything worth recording in the evaluation's info.json

    # --- metadata ---------------------------------------------------------------------------------------
    @classmethod
    def tags(cls) -> dict[str, str]:
        return {"architecture": cls.name, "family": cls.family, "finetune": cls.finetune}

    @property
    def lm(self) -> CausalLM:
        return self.ctx.lm

    @property
    def artifact_dir(self) -> Path:
        return self.ctx.artifact_dir

    @property
    def progress(self) -> bool:
        return self.ctx.progress

    def param_counts(self) -> tuple[int, int]:
        """(total, trainable) parameters used at inference; trainable = those `train` changed (as
        recorded in the trained manifest)."""
        manifest = self.trained_manifest() if self.finetune != "none" else None
        trainable = int((manifest or {}).get("info", {}).get("trainable_params", 0))
        return self.lm.n_params + int((manifest or {}).get("info", {}).get("extra_params", 0)), trainable

    # --- training -----------------------------------------------------------------------------------------
    MANIFEST: ClassVar[str] = "manifest.json"
    #: Source files (relative to the ragops package) the results also depend on, beyond
    #: `INFERENCE_CODE`, `TRAINING_CODE` and the modules of the class and its bases.
    code_deps: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def code_paths(cls) -> list[str]:
        """Package-relative source files whose change must retrain this architecture (and, with the
        evaluation harness, re-evaluate it): the modules of its class and of the architectures it
        builds on (an REPLUG LSR change does not touch REPLUG; a REPLUG change touches both), the
        shared mechanisms, the LM layer, the retrieval stack, the training substrate when it trains,
        and what it declares in `code_deps`. The train/evaluate fingerprints and dvc.yaml use this list."""
        own = {
            klass.__module__.split(".", 1)[1].replace(".", "/") + ".py"
            for klass in cls.__mro__
            if klass.__module__.startswith("ragops.architectures.") and klass.__module__ != __name__
        }
        trains = TRAINING_CODE if cls.finetune != "none" else ()
        return sorted({*INFERENCE_CODE, *trains, *own, *cls.code_deps})

    def training_settings(self) -> dict[str, Any]:
        """Everything the trained artifacts depend on, as a nested dict: options, LM, encoder,
        seed, the index and benchmark they were trained against, and the code. A checkpoint
        records these and is refused when one differs (naming it)."""
        from ragops.io import path_hash, text_hash

        ws, config = self.ctx.ws, self.ctx.config
        index_meta = ws.index_dir / "meta.json"
        return {
            "architecture": self.name,
            "options": self.options.model_dump(mode="json"),
            "lm": config.section("lm"),
            "encoder": config.embed.model,
            "seed": config.seed,
            "benchmark": {"questions": path_hash(ws.questions) if ws.questions.exists() else None,
                          "split": config.section("benchmark")},
            "index": text_hash(index_meta.read_text()) if index_meta.exists() else None,
            "code": code_fingerprint(self.code_paths()),
        }

    def training_fingerprint(self) -> str:
        from ragops.io import json_hash

        return json_hash(self.training_settings())

    def trained_manifest(self) -> dict[str, Any] | None:
        """The manifest of the artifacts in `artifact_dir` (None when there are none)."""
        from ragops.io import read_json

        path = self.artifact_dir / self.MANIFEST
        return read_json(path) if path.exists() else None

    def needs_training(self) -> bool:
        """True for a method that fine-tunes something and has no complete artifacts for the current settings."""
        if self.finetune == "none":
            return False
        manifest = self.trained_manifest()
        return manifest is None or manifest.get("fingerprint") != self.training_fingerprint() or bool(manifest.get("truncated"))

    def train(self, run: TrainRun) -> dict[str, Any] | None:  # noqa: ARG002
        """Fit the method (usually: build a `TrainingTask` and call `run.train(task, options)`) and
        write its artifacts into `artifact_dir` (see `save_artifacts`). Nothing to train by default."""
        return None

    def save_artifacts(self, write: Any, *, truncated: bool = False) -> dict[str, Any]:
        """Write trained artifacts atomically: `write(tmp_dir) -> info` fills a temporary folder that
        replaces `artifact_dir` whole, with a manifest (fingerprint, version, info) that
        `needs_training` and evaluation read. Returns the manifest."""
        from ragops.io import atomic_dir, write_json

        previous = self.trained_manifest()
        with atomic_dir(self.artifact_dir) as tmp:
            info = write(tmp) or {}
            manifest = {
                "architecture": self.name,
                "fingerprint": self.training_fingerprint(),
                "version": int(previous.get("version", 0)) + 1 if previous else 1,
                "truncated": truncated,
                "info": info,
            }
            write_json(tmp / self.MANIFEST, manifest)
        return manifest

    def trained_retriever_dir(self) -> Path | None:
        """Where this architecture's trained retriever lives, when it has one."""
        path = self.artifact_dir / RETRIEVER_DIR
        return path if (path / "index" / "meta.json").exists() else None

    # --- retrieval ---------------------------------------------------------------------------------------
    def retrieve(
        self, retriever: Retriever, queries: list[str], k: int, meter: CostMeter, exclude_doc_ids: list[set[str]] | None = None
    ) -> list[list[Passage]]:
        """Search and charge `retrieval_calls` (one per query)."""
        if not queries:
            return []
        result = retriever.search(list(queries), k, exclude_doc_ids=exclude_doc_ids)
        meter.add(retrieval_calls=len(queries))
        return result.passages()

    def passages_for_questions(self, questions: pd.DataFrame, meter: CostMeter) -> list[list[Passage]]:  # noqa: ARG002
        """Passages to show the LM for each question, best first. None by default (closed book)."""
        return [[] for _ in range(len(questions))]

    # --- QA ----------------------------------------------------------------------------------------------------
    def qa_progress_label(self, questions: pd.DataFrame) -> str:
        """`<architecture> <task>: questions` for the QA progress bar."""
        tasks = sorted(set(questions["task"])) if "task" in questions.columns and len(questions) else []
        return f"{self.name} {'/'.join(tasks)}: questions" if tasks else f"{self.name}: questions"

    def fit_passages(self, question: str, passages: Sequence[Passage], reserve: int) -> tuple[list[Passage], list[str]]:
        """The passages (and their texts) that fit the LM window before the question, best first.

        A passage that does not fit whole is cut to the room left if at least 32 tokens remain;
        the rest are dropped (recorded as not shown).
        """
        from ragops.architectures.prompts import format_passage, qa_prompt

        lm = self.lm
        room = lm.max_length - reserve - lm.count_tokens(qa_prompt(question, (), lm.chat_formatter)) - 2
        shown, texts = [], []
        for passage in passages:
            ids = lm.encode(format_passage(passage.text))
            if len(ids) <= room:
                shown.append(passage)
                texts.append(passage.text)
                room -= len(ids)
                continue
            if room >= 32:
                shown.append(passage)
                texts.append(lm.decode(ids[: room - 2]))
            break
        return shown, texts

    def answer(self, questions: pd.DataFrame, meter: CostMeter) -> pd.DataFrame:
        """Predictions for `questions` (columns qid, question, answer, ...): one row per question.

        Output columns: qid, prediction, gold_nll, gold_tokens, retrieved_doc_ids,
        retrieved_scores, shown_doc_ids, tokens_prompt, tokens_retrieved, tokens_generated.
        The gold answer is only scored (its NLL given the prompt), never shown.
        """
        import pandas as pd

        from ragops.architectures.prompts import STOP, answer_continuation, clean_prediction, passages_block, qa_prompt

        lm = self.lm
        chat = lm.chat_formatter
        max_new = self.ctx.config.eval.max_new_tokens
        rows: list[dict[str, Any]] = []
        bar = _progress(self.progress, len(questions), self.qa_progress_label(questions))
        for start in range(0, len(questions), QA_BATCH):
            batch = questions.iloc[start : start + QA_BATCH]
            retrieved = self.passages_for_questions(batch, meter)
            prompts, conts, extra = [], [], []
            for (_, q), passages in zip(batch.iterrows(), retrieved, strict=True):
                cont = lm.encode(answer_continuation(str(q["answer"]), chat=chat is not None))
                shown, texts = self.fit_passages(str(q["question"]), passages, reserve=max(max_new, len(cont)))
                prompt = lm.encode(qa_prompt(str(q["question"]), texts, chat))
                n_retrieved = lm.count_tokens(passages_block(texts)) if texts else 0
                prompts.append(prompt)
                conts.append(cont)
                extra.append((passages, shown, len(prompt) - n_retrieved, n_retrieved))
            with lm.charged_to(meter):
                scores, texts_out = lm.score_and_generate_ids(prompts, conts, max_new_tokens=max_new, stop=STOP)
            for (_, q), lp, text, (passages, shown, n_prompt, n_retrieved) in zip(batch.iterrows(), scores, texts_out, extra, strict=True):
                meter.add(tokens_prompt=n_prompt, tokens_retrieved=n_retrieved, questions=1, examples=1)
                rows.append(
                    {
                        "qid": q["qid"],
                        "prediction": clean_prediction(text),
                        "gold_nll": float(-lp.mean()) if len(lp) else math.nan,
                        "gold_tokens": len(lp),
                        "retrieved_doc_ids": [p.doc_id for p in passages],
                        "retrieved_scores": [p.score for p in passages],
                        "shown_doc_ids": [p.doc_id for p in shown],
                        "tokens_prompt": n_prompt,
                        "tokens_retrieved": n_retrieved,
                        "tokens_generated": lm.count_tokens(text),
                    }
                )
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        return pd.DataFrame(rows)

    # --- language modelling --------------------------------------------------------------------------------
    def score_documents(self, docs: pd.DataFrame, meter: CostMeter) -> pd.DataFrame:
        """Per-document NLL of held-out `docs` (doc_id, title, text) under the plain LM, in the
        windows of `CausalLM.document_windows` (each begins with the start token of `lm.start_token`;
        without one, a document's first token is not scored: `n_tokens` counts scored tokens).

        Output columns: doc_id, nll_sum, n_tokens, n_words, retrieved_doc_ids, retrieved_scores,
        tokens_prompt, tokens_retrieved, tokens_scored, retrieval_calls.
        """
        import pandas as pd

        from ragops.architectures.prompts import document_text

        lm = self.lm
        rows = []
        bar = _progress(self.progress, len(docs), f"{self.name}: documents")
        for start in range(0, len(docs), LM_DOC_BATCH):
            batch = docs.iloc[start : start + LM_DOC_BATCH]
            texts = [document_text(d["title"], d["text"]) for _, d in batch.iterrows()]
            contexts, targets, owners = [], [], []
            for owner, ids in enumerate(lm.encode_batch(texts)):
                for context, target in lm.document_windows(ids):  # the start-token convention (lm.start_token)
                    contexts.append(context)
                    targets.append(target)
                    owners.append(owner)
            with lm.charged_to(meter):
                scored = lm.score_ids(contexts, targets)
            sums = np.zeros(len(batch))
            counts = np.zeros(len(batch), dtype=int)
            prompt_tokens = np.zeros(len(batch), dtype=int)
            for owner, context, lp in zip(owners, contexts, scored, strict=True):
                sums[owner] -= float(lp.sum())
                counts[owner] += len(lp)
                prompt_tokens[owner] += len(context)
            for i, ((_, d), text) in enumerate(zip(batch.iterrows(), texts, strict=True)):
                meter.add(tokens_prompt=int(prompt_tokens[i]), examples=1)
                rows.append(
                    {
                        "doc_id": d["doc_id"],
                        "nll_sum": float(sums[i]),
                        "n_tokens": int(counts[i]),
                        "n_words": len(text.split()),
                        "retrieved_doc_ids": [],
                        "retrieved_scores": [],
                        "tokens_prompt": int(prompt_tokens[i]),
                        "tokens_retrieved": 0,
                        "tokens_scored": int(counts[i]),
                        "retrieval_calls": 0,
                    }
                )
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        return pd.DataFrame(rows)


def _progress(enabled: bool, total: int, desc: str):
    if not enabled or total <= 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item")
