"""REPLUG LSR (Shi et al. 2023): the retriever learns which documents the frozen LM prefers.

For a training example (x, y) and the top-k chunks D of the current index:
- student  P_R(d | x) = softmax_d(s(d, x) / γ), s = cosine of the trainable query and passage
  embeddings (fresh, with a gradient; the candidates come from the possibly stale index);
- teacher  Q(d | x, y) = softmax_d(t(d) / β), t(d) = mean token log P_LM(y | d ∘ x) from the
  frozen LM, reached only through the black-box view (`BlackBoxLM.logprobs`): the same code runs
  against an LM behind an API. The LM never changes, so t is cached per (example, chunk) and only
  new candidates (after a refresh) are scored;
- loss KL(P_R ‖ Q) as the paper writes it (`direction: student_teacher`), or the reference code's
  KL(Q ‖ P_R) (`teacher_student`); `batchmean` (the true KL per example) or the reference's
  element `mean` (= batchmean / k). Both are recorded with the run.

Examples: train-split questions (x = question in the shared QA prompt, y = gold answer) and
language-modelling windows of train-split articles (x = 32 tokens, y = the next 32, the source
article excluded from retrieval). With shared towers the chunk embeddings go stale as the
encoder trains: every `refresh_every` steps the index is re-embedded in the background
(`refresh: async`, swapped in `swap_after` steps later) or synchronously; `towers: query_side`
trains only a query copy and needs no refresh. The final index is re-embedded with the final
encoder. Evaluation is REPLUG inference (`replug.py`) with the tuned retriever.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from ragops.architectures.replug import REPLUG, REPLUGOptions
from ragops.config import OptimizerOptions
from ragops.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from ragops.training.loop import TrainRun
    from ragops.training.retriever import RetrievalExample, RetrieverSetup


class REPLUGLSROptions(REPLUGOptions):
    # training data (train split only)
    qa_examples: int = Field(default=80, ge=0)  # per QA task
    lm_examples: int = Field(default=40, ge=0)  # language-modelling windows
    prefix_tokens: int = Field(default=32, ge=4)
    target_tokens: int = Field(default=32, ge=1)
    dev_fraction: float = Field(default=0.1, ge=0, lt=1)  # examples held back for dev metrics
    # the objective
    candidates: int = Field(default=8, ge=2)  # k documents per example in training
    teacher_temperature: float = Field(default=1.0, gt=0)  # β; the student's γ is `temperature`
    direction: Literal["student_teacher", "teacher_student"] = "student_teacher"
    reduction: Literal["batchmean", "mean"] = "batchmean"
    # the retriever and its index
    towers: Literal["shared", "query_side"] = "shared"
    refresh_every: int = Field(default=25, ge=0)  # steps between index refreshes (0: never; shared towers only)
    refresh: Literal["async", "sync"] = "async"
    swap_after: int = Field(default=5, ge=1)  # async: steps between starting a refresh and swapping it in
    train: OptimizerOptions = OptimizerOptions(steps=50, batch_size=8, lr=2e-5, warmup=0.1, checkpoint_every=10)


class LSRTask:
    """The REPLUG LSR objective as a `TrainingTask` for the shared loop."""

    def __init__(self, arch: REPLUGLSR, setup: RetrieverSetup, train: list[RetrievalExample], dev: list[RetrievalExample], run: TrainRun) -> None:
        from ragops.lm.blackbox import LocalBlackBox
        from ragops.training.loop import cycle_batches

        self.arch, self.setup, self.train_examples, self.dev_examples = arch, setup, train, dev
        self.options: REPLUGLSROptions = arch.options
        self.meter = run.meter
        self.teacher = LocalBlackBox(arch.lm)  # the LM as an API would expose it: log-probs only
        self.cache = arch.teacher_cache()
        self.batches = cycle_batches(len(train), self.options.train.batch_size, arch.ctx.config.seed)
        self.gold_hits = 0
        self.gold_seen = 0

    # --- TrainingTask -------------------------------------------------------------------------------
    def modules(self) -> dict[str, torch.nn.Module]:
        return self.setup.retriever.modules()

    def param_groups(self) -> None:
        return None

    def micro_batch(self, step: int, micro: int) -> dict[str, Any]:
        index = step * self.options.train.grad_accum + micro
        examples = [self.train_examples[i] for i in self.batches(index)]
        return self._prepare(examples)

    def _prepare(self, examples: list[RetrievalExample]) -> dict[str, Any]:
        """Candidates from the current index and their (cached) teacher scores [B, k] (−inf: absent)."""
        from ragops.architectures.prompts import answer_continuation, format_passage, qa_prompt
        from ragops.training.teachers import PairScoreCache, likelihood_scores

        k = self.options.candidates
        rows = self.setup.candidates(examples, k)
        chat = self.arch.lm.chat_formatter
        prompts, conts, keys, where = [], [], [], []
        for b, (example, candidates) in enumerate(zip(examples, rows, strict=True)):
            for j, row in enumerate(candidates):
                passage = self.setup.table.texts[row]
                if example.kind == "lm":
                    prompts.append(format_passage(passage) + example.query)
                    conts.append(example.target)  # prefix and target were decoded from adjacent tokens
                else:
                    prompts.append(qa_prompt(example.question, [passage], chat))
                    conts.append(answer_continuation(example.target, chat=chat is not None))
                keys.append(PairScoreCache.key(example.example_id, self.setup.table.chunk_ids[row]))
                where.append((b, j))
        scores = likelihood_scores(self.teacher, prompts, conts, keys, self.cache, self.meter)
        teacher = np.full((len(examples), k), -np.inf)
        for (b, j), value in zip(where, scores, strict=True):
            teacher[b, j] = value
        for example, candidates in zip(examples, rows, strict=True):
            if example.gold_doc_id:
                self.gold_seen += 1
                self.gold_hits += int(any(self.setup.table.doc_ids[r] == example.gold_doc_id for r in candidates))
        if self.meter is not None:
            self.meter.add(examples=len(examples))
        return {"examples": examples, "rows": rows, "teacher": teacher}

    def _student_scores(self, batch: dict[str, Any]) -> torch.Tensor:
        import torch

        examples, rows = batch["examples"], batch["rows"]
        k = self.options.candidates
        queries = self.setup.retriever.embed_queries([e.query for e in examples])
        flat = [self.setup.table.texts[r] for candidates in rows for r in candidates]
        passages = self.setup.retriever.embed_passages(flat)
        scores = torch.full((len(examples), k), float("-inf"))
        offset = 0
        for b, candidates in enumerate(rows):
            n = len(candidates)
            scores[b, :n] = passages[offset : offset + n] @ queries[b]
            offset += n
        return scores

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        from ragops.architectures.shared import kl_distill

        opt = self.options
        student = self._student_scores(batch)
        loss = kl_distill(student, batch["teacher"], student_temperature=opt.temperature, teacher_temperature=opt.teacher_temperature,
                          direction=opt.direction, reduction=opt.reduction)
        agree = _top1_agreement(student.detach().numpy(), batch["teacher"])
        return loss, {"train/kl": float(loss.detach()), "train/top1_agreement": agree}

    def evaluate(self) -> dict[str, float]:
        import torch

        from ragops.architectures.shared import kl_distill

        if not self.dev_examples:
            return {}
        opt = self.options
        batch = self._prepare(self.dev_examples)
        with torch.no_grad():
            student = self._student_scores(batch)
            loss = kl_distill(student, batch["teacher"], student_temperature=opt.temperature, teacher_temperature=opt.teacher_temperature,
                              direction=opt.direction, reduction=opt.reduction)
        self.cache.save()
        return {"dev/loss": float(loss), "dev/top1_agreement": _top1_agreement(student.numpy(), batch["teacher"])}

    def after_step(self, step: int) -> dict[str, float]:
        opt = self.options
        out = self.setup.maybe_refresh(step, opt.train.steps, opt.refresh_every)
        if step % opt.train.checkpoint_every == 0:
            self.cache.save()  # the checkpoint that follows must not outlive the scores it relied on
        if self.gold_seen:
            out["train/gold_in_candidates"] = self.gold_hits / self.gold_seen
        return out

    def state_dict(self) -> dict[str, Any]:
        self.cache.save()
        return self.setup.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.setup.load_state_dict(state)


def _top1_agreement(student: np.ndarray, teacher: np.ndarray) -> float:
    """Fraction of examples whose highest-scoring document is the same for student and teacher."""
    return float(np.mean(np.argmax(student, axis=1) == np.argmax(teacher, axis=1)))


class REPLUGLSR(REPLUG):
    name = "replug_lsr"
    family = "black-box"
    finetune = "retriever"
    Options = REPLUGLSROptions
    options: REPLUGLSROptions

    def teacher_cache(self):
        """The persistent (example, chunk) → teacher score cache of this LM and prompt format."""
        from ragops.pipeline import code_fingerprint
        from ragops.io import json_hash
        from ragops.training.teachers import PairScoreCache

        from ragops.io import path_hash

        meta = {"lm": self.ctx.config.section("lm"), "prompts": code_fingerprint(["architectures/prompts.py"]),
                "score": "mean token log P_LM(y | d, x)", "chunks": path_hash(self.ctx.ws.chunks)}
        return PairScoreCache(self.ctx.ws.cache_dir / "teacher" / f"{self.name}-{json_hash(meta)[:16]}.json", meta)

    def train(self, run: TrainRun) -> dict[str, Any]:
        from ragops.training.retriever import RetrieverSetup, retrieval_examples, write_trained_retriever

        opt, ws, config = self.options, self.ctx.ws, self.ctx.config
        if opt.retriever == "bm25":
            raise ConfigError(f"architectures.{self.name}.retriever: bm25 cannot be trained (use dense or hybrid)")
        lm = self.lm
        train, dev = retrieval_examples(
            ws, qa_per_task=opt.qa_examples, lm_windows=opt.lm_examples, encode=lm.encode, decode=lm.decode,
            prefix_tokens=opt.prefix_tokens, target_tokens=opt.target_tokens, seed=config.seed, dev_fraction=opt.dev_fraction,
        )
        setup = RetrieverSetup(ws, config, opt.towers, meter=run.meter, device=run.device, refresh_mode=opt.refresh,
                               swap_after=opt.swap_after, progress=False)
        task = LSRTask(self, setup, train, dev, run)
        result = run.train(task, opt.train, seed=config.seed, desc=f"{self.name}: training")
        task.cache.save()
        refresher_stats = setup.refresher.stats() if setup.refresher is not None else {}

        def write(tmp):
            index_meta = write_trained_retriever(tmp / "retriever", setup, meter=run.meter, progress=self.progress)
            return {
                "training": result.summary(), "examples": {"train": len(train), "dev": len(dev)},
                "objective": {"direction": opt.direction, "reduction": opt.reduction, "student_temperature": opt.temperature,
                              "teacher_temperature": opt.teacher_temperature, "candidates": opt.candidates},
                "teacher_cache": {"pairs": len(task.cache), "hits": task.cache.hits, "misses": task.cache.misses},
                "refresh": refresher_stats, "index": {"count": index_meta["count"], "factory": index_meta["factory"]},
                "gold_in_candidates": task.gold_hits / task.gold_seen if task.gold_seen else None,
                "trainable_params": setup.retriever.trainable_parameters,
            }

        if run.meter is not None:
            run.meter.set_params(setup.retriever.n_params + lm.n_params, setup.retriever.trainable_parameters)
        manifest = self.save_artifacts(write, truncated=result.truncated)
        return manifest["info"]

