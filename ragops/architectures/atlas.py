"""Atlas (Izacard et al. 2022): the retriever and the LM reader trained together, in the same steps.

Per training step, for a batch of train-split questions (x, gold answer y):

1. the current query tower retrieves the top-K chunks (K = `k`, 4) from the current index (the
   workspace index, or — shared towers — the last refreshed one);
2. **reader**: the LM (LoRA by default, `reader: full` trains every weight) is trained on
   −(1/|y|) Σ_t log p(y_t | d_1..d_K, x, y_<t): the K passages **concatenated in one prompt** — the
   shared `qa_prompt`, best passage nearest the question, fitted to the LM window by
   `Architecture.fit_passages` — then the gold answer followed by a terminator (the chat model's
   end-of-turn token, else a newline) so that the reader also learns where its answer ends. This is
   the decoder-only counterpart of Atlas's Fusion-in-Decoder reader (FiD encodes each passage alone
   and fuses them in the decoder's cross-attention; a decoder-only LM fuses them by reading them in
   one context). Evaluation builds exactly this prompt with the same K, the tuned retriever and the
   merged reader (`Architecture.answer`);
3. **retriever** (`retriever_loss`, Atlas's `--gold_score_mode`), with P_R(d_k) = softmax_k(cos(q, d_k)/θ_s):
   - `pdist` (Atlas `ppmean`, default): KL(P_T ‖ P_R), P_T = softmax(g/θ_g), g_k = mean token
     log p(y | d_k, x) from the CURRENT reader (one single-passage prompt per passage, no cache,
     no gradient into the reader);
   - `loop`: leave-one-out, g_k = mean token NLL of y given all passages but d_k (removing a useful
     passage raises the NLL, so it gets more target mass), same KL;
   - `adist` (Atlas `evalnormsum`): g_k = the reader's attention onto d_k's tokens weighted by the
     value norms, Σ_{j∈d_k} α_{t→j}‖v_j‖ averaged over layers, heads and the positions that predict
     the answer (Atlas's `normssum` up to its constant 1/256), KL with θ_attention. A decoder-only
     reader's attention also favours recent positions — the best-ranked passage sits nearest the
     question — which FiD's cross-attention does not (AAR reads two orders for this). Atlas's own code
     looks this up under the key `normsum`, which its aggregation never produces (it produces
     `normssum`): the reference ADist path raises a KeyError. Here the mode maps straight to its
     function (`RETRIEVER_LOSSES`) and every mode and alias is tested to run;
   - `emdr` (EMDR²): −(1/|y|) Σ_t log Σ_k P_R(d_k) · sg[p(y_t | d_k, x, y_<t)], the LM term detached.
     The LM's token probabilities are used as they are (Atlas divides the logits by θ_gold here);
   - `none`: the retriever is frozen (the `atlas_reader_only` control: LM-only fine-tuning with the
     same data, prompt and K).
   The KL is `kl_distill` with `direction: teacher_student` = KL(P_T ‖ P_R) (Atlas's
   `KLDivLoss(log P_R, P_T)`) and `reduction: batchmean` (the true KL per question; Atlas's
   `KLDivLoss()` default is the element mean = batchmean / K). Cosines replace Atlas's
   dot products /√d, hence θ_s = 0.05.
4. L = L_reader + L_retriever, one AdamW with two parameter groups (reader `train.lr`, retriever
   `retriever_lr`).

The index: `towers: query_side` (default; Atlas's few-shot setting) trains an untied copy of the
query tower, the passage tower and the workspace index stay as they are, nothing to refresh.
`towers: shared` trains both towers; the chunk embeddings then go stale and are recomputed on
Atlas's schedule `refresh_index: "start-end:every,..."` (`shared.RefreshSchedule`; after optimizer
step s when the schedule is due at s, i.e. before the (s+1)-th batch as in Atlas's train.py; step 0
is the initial index), synchronously by default as Atlas does. The final index is re-embedded with
the final encoder. Refreshes and their seconds are charged to the training cost.

The dev slice (`dev_fraction` of the sampled train-split questions) is never trained on; its
`dev/loss` is the reader's gold-answer NLL given the K passages the current retriever returns (the
joint system's own objective), for early stopping. The `lm` task is In-Context RALM's strided
retrieval with the tuned retriever and the fine-tuned reader.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from ragops.architectures.incontext_ralm import InContextRALM, InContextRALMOptions
from ragops.config import OptimizerOptions
from ragops.errors import ConfigError, RagopsError

if TYPE_CHECKING:
    import torch

    from ragops.lm.model import CausalLM
    from ragops.retrieval.types import Passage
    from ragops.training.loop import TrainRun
    from ragops.training.retriever import RetrievalExample, RetrieverSetup

READER_DIR = "reader"
EXAMPLES_FILE = "examples.json"
#: Atlas's names for the retriever losses (`--gold_score_mode` and its aliases in options.py).
LOSS_ALIASES = {"ppmean": "pdist", "evalnormsum": "adist", "emdr2": "emdr"}
RetrieverLoss = Literal["pdist", "adist", "emdr", "loop", "none"]


class AtlasOptions(InContextRALMOptions):
    retriever: Literal["dense"] = "dense"  # the trained dual encoder (training and evaluation)
    k: int = Field(default=4, ge=1)  # K passages the reader reads, in training and in QA evaluation
    # the reader
    reader: Literal["lora", "full"] = "lora"
    lora_r: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    # the retriever and its loss
    retriever_loss: RetrieverLoss = "pdist"  # also Atlas's names: ppmean, evalnormsum, emdr2
    retriever_lr: float = Field(default=1e-5, gt=0)  # the reader's is train.lr
    temperature_score: float = Field(default=0.05, gt=0)  # θ_s on cosines
    temperature_gold: float = Field(default=1.0, gt=0)  # θ_g on mean token log-likelihoods (pdist) / NLLs (loop)
    # θ_g of adist on attention × value-norm scores. On 10 smoke questions with SmolLM2 the mean normalised
    # entropy of the target was 0.62 for pdist at θ_g = 1, 0.65 for loop at 1, and for adist 0.18 at 0.1, 0.73 at 0.3
    temperature_attention: float = Field(default=0.2, gt=0)
    direction: Literal["teacher_student", "student_teacher"] = "teacher_student"  # KL(P_T ‖ P_R), as Atlas
    reduction: Literal["batchmean", "mean"] = "batchmean"
    towers: Literal["query_side", "shared"] = "query_side"
    refresh_index: str = "-1"  # shared towers: Atlas's "start-end:every,..." ("-1": never refresh)
    refresh: Literal["sync", "async"] = "sync"
    swap_after: int = Field(default=1, ge=1)  # async refresh: steps between its start and its swap
    # training data (train split only)
    qa_examples: int = Field(default=111, ge=1)  # train-split questions per QA task (dev slice included)
    dev_fraction: float = Field(default=0.1, ge=0, lt=1)
    # 200 questions, one epoch, 4 per step (2 x 2 accumulated: half the activation memory); lr = the reader's
    train: OptimizerOptions = OptimizerOptions(steps=50, batch_size=2, grad_accum=2, lr=2e-4, warmup=0.1, eval_every=25, checkpoint_every=10)

    @field_validator("retriever_loss", mode="before")
    @classmethod
    def _canonical_loss(cls, value: Any) -> Any:
        return LOSS_ALIASES.get(value, value) if isinstance(value, str) else value

    @field_validator("refresh_index")
    @classmethod
    def _check_refresh(cls, value: str, info: ValidationInfo) -> str:
        from ragops.architectures.shared import RefreshSchedule

        try:
            schedule = RefreshSchedule.parse(value)
        except ConfigError as error:
            raise ValueError(str(error)) from None
        if schedule.ranges and info.data.get("towers") == "query_side":
            raise ValueError("a refresh schedule needs towers: shared (query-side training never changes the passage embeddings)")
        return value


# ------------------------------------------------------------------------------------------------
# The retriever losses, as pure functions of tensors (P_R from retrieval scores; −inf = absent passage)
# ------------------------------------------------------------------------------------------------


def pdist_loss(scores: Any, gold_loglik: Any, *, temperature_score: float, temperature_gold: float,
               direction: str = "teacher_student", reduction: str = "batchmean") -> torch.Tensor:
    """PDist: KL between softmax(scores/θ_s) and softmax(g/θ_g), g = mean token log p(y | d_k, x) [B, K]."""
    from ragops.architectures.shared import kl_distill

    return kl_distill(scores, gold_loglik, temperature_score, temperature_gold, direction=direction, reduction=reduction)


def loop_loss(scores: Any, nll_without: Any, *, temperature_score: float, temperature_gold: float,
              direction: str = "teacher_student", reduction: str = "batchmean") -> torch.Tensor:
    """LOOP: the target is softmax(NLL(y | all passages but d_k)/θ_g): the passage whose removal
    hurts most gets the most mass (Atlas's `loop_score` returns these mean losses as gold scores)."""
    from ragops.architectures.shared import kl_distill

    return kl_distill(scores, nll_without, temperature_score, temperature_gold, direction=direction, reduction=reduction)


def adist_loss(scores: Any, attention: Any, *, temperature_score: float, temperature_attention: float,
               direction: str = "teacher_student", reduction: str = "batchmean") -> torch.Tensor:
    """ADist: the target is softmax(attention score / θ) over the passages (see `adist_scores`)."""
    from ragops.architectures.shared import kl_distill

    return kl_distill(scores, attention, temperature_score, temperature_attention, direction=direction, reduction=reduction)


def emdr_loss(scores: Any, token_logprobs: Any, token_mask: Any, *, temperature_score: float) -> torch.Tensor:
    """EMDR²: −Σ_t m_t log Σ_k P_R(d_k) p(y_t | d_k, x, y_<t) / Σ_t m_t over the batch.

    scores [B, K] (−inf: absent passage), token_logprobs [B, K, T] (log p(y_t | d_k, ...), detached
    here), token_mask [B, T] (1 on real answer tokens)."""
    import torch

    scores = torch.as_tensor(scores, dtype=torch.float32)
    lp = torch.as_tensor(token_logprobs, dtype=torch.float32).detach()
    mask = torch.as_tensor(token_mask, dtype=torch.float32)
    present = torch.isfinite(scores)
    log_pr = torch.log_softmax(scores / temperature_score, dim=-1)  # −inf stays −inf for absent passages
    lp = torch.where(present[..., None], lp, torch.zeros_like(lp))
    mixture = torch.logsumexp(log_pr[..., None] + lp, dim=1)  # [B, T]
    return -(mixture * mask).sum() / mask.sum()


def adist_scores(weights: np.ndarray, value_norms: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Per-passage ADist score: Σ_{j ∈ span} α_{t→j} ‖v_j‖, averaged over layers, heads and the query
    positions t (`weights` [layers, heads, n_query, seq] post-softmax, `value_norms` [layers, heads, seq]).
    Atlas's `normssum` is the same sum over layers, heads and answer tokens divided by 256·layers·tokens."""
    from ragops.training.teachers import attention_mass

    return attention_mass(weights, spans, value_norms=value_norms, score="norms")


def retriever_loss(mode: str, scores: Any, gold: dict[str, Any], options: AtlasOptions) -> torch.Tensor:
    """The retriever loss of `mode` (canonical name or Atlas alias) from the gold signals in `gold`."""
    mode = LOSS_ALIASES.get(mode, mode)
    common = {"temperature_score": options.temperature_score, "direction": options.direction, "reduction": options.reduction}
    if mode == "pdist":
        return pdist_loss(scores, gold["loglik"], temperature_gold=options.temperature_gold, **common)
    if mode == "loop":
        return loop_loss(scores, gold["nll_without"], temperature_gold=options.temperature_gold, **common)
    if mode == "adist":
        return adist_loss(scores, gold["attention"], temperature_attention=options.temperature_attention, **common)
    if mode == "emdr":
        return emdr_loss(scores, gold["token_logprobs"], gold["token_mask"], temperature_score=options.temperature_score)
    raise ValueError(f"unknown retriever loss '{mode}' (pdist | adist | emdr | loop | none)")


# ------------------------------------------------------------------------------------------------
# The joint training task
# ------------------------------------------------------------------------------------------------


class AtlasTask:
    """Reader + retriever in one `TrainingTask` for the shared loop."""

    def __init__(self, arch: Atlas, lm: CausalLM, model: Any, setup: RetrieverSetup, train: list[RetrievalExample],
                 dev: list[RetrievalExample], run: TrainRun) -> None:
        from ragops.architectures.shared import RefreshSchedule
        from ragops.training.loop import cycle_batches

        self.arch, self.lm, self.model, self.setup = arch, lm, model, setup
        self.options: AtlasOptions = arch.options
        self.mode = self.options.retriever_loss
        self.train_examples, self.dev_examples = train, dev
        self.meter = run.meter
        self.schedule = RefreshSchedule.parse(self.options.refresh_index)
        self.batches = cycle_batches(len(train), self.options.train.batch_size, arch.ctx.config.seed)
        self.full = self.options.reader == "full"
        self.reader_trainable = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
        self.terminator = reader_terminator(lm)
        self.gold_hits = self.gold_seen = 0

    @property
    def trains_retriever(self) -> bool:
        return self.mode != "none"

    # --- TrainingTask -------------------------------------------------------------------------------
    def modules(self) -> dict[str, torch.nn.Module]:
        out = {"reader": self.model}
        if self.trains_retriever:
            out.update(self.setup.retriever.modules())
        return out

    def param_groups(self) -> list[dict[str, Any]]:
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": self.options.train.lr}]
        if self.trains_retriever:
            retriever = [p for m in self.setup.retriever.modules().values() for p in m.parameters() if p.requires_grad]
            groups.append({"params": retriever, "lr": self.options.retriever_lr})
        return groups

    def micro_batch(self, step: int, micro: int) -> dict[str, Any]:
        index = step * self.options.train.grad_accum + micro
        return self.prepare([self.train_examples[i] for i in self.batches(index)], count=True)

    def prepare(self, examples: list[RetrievalExample], count: bool = False) -> dict[str, Any]:
        """Top-K passages of the current retriever, fitted as evaluation fits them, and the reader's
        token ids: prompt (question + K passages) and target (gold answer + terminator)."""
        from ragops.architectures.prompts import answer_continuation, qa_prompt
        from ragops.retrieval.types import Passage

        lm, table, chat = self.lm, self.setup.table, self.lm.chat_formatter
        max_new = self.arch.ctx.config.eval.max_new_tokens
        rows = self.setup.candidates(examples, self.options.k)
        texts, prompts, targets, kept = [], [], [], []
        for example, candidates in zip(examples, rows, strict=True):
            answer = lm.encode(answer_continuation(example.target, chat=chat is not None))
            passages = [Passage(table.chunk_ids[r], table.doc_ids[r], 0.0, table.texts[r]) for r in candidates]
            shown, fitted = self.arch.fit_passages(example.question, passages, reserve=max(max_new, len(answer)))
            kept.append(candidates[: len(shown)])
            texts.append(fitted)
            prompts.append(lm.encode(qa_prompt(example.question, fitted, chat)))
            targets.append(answer + self.terminator)
            if count and example.gold_doc_id:
                self.gold_seen += 1
                self.gold_hits += int(any(table.doc_ids[r] == example.gold_doc_id for r in candidates))
        if count and self.meter is not None:
            self.meter.add(examples=len(examples))
        return {"examples": examples, "rows": kept, "texts": texts, "prompts": prompts, "targets": targets}

    def _reader_loss(self, batch: dict[str, Any], charge: bool) -> torch.Tensor:
        from ragops.lm.finetune import causal_lm_loss, charge_training

        sequences = [p + t for p, t in zip(batch["prompts"], batch["targets"], strict=True)]
        masks = [[False] * len(p) + [True] * len(t) for p, t in zip(batch["prompts"], batch["targets"], strict=True)]
        loss, n_tokens = causal_lm_loss(self.model, sequences, masks, self.lm.pad_id)
        if charge:
            charge_training(self.meter, self.lm, sequences, n_tokens, full=self.full, trainable=self.reader_trainable)
        return loss

    def _retrieval_scores(self, batch: dict[str, Any]) -> torch.Tensor:
        """cos(q, d_k) [B, K] with a gradient into the trained tower(s); −inf where fewer than K passages."""
        import torch

        rows, k = batch["rows"], self.options.k
        queries = self.setup.retriever.embed_queries([e.query for e in batch["examples"]])
        passages = self.setup.retriever.embed_passages([self.setup.table.texts[r] for candidates in rows for r in candidates])
        scores = torch.full((len(rows), k), float("-inf"), device=queries.device)
        offset = 0
        for b, candidates in enumerate(rows):
            n = len(candidates)
            scores[b, :n] = passages[offset : offset + n] @ queries[b]
            offset += n
        return scores.cpu()

    def gold_signals(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The current reader's judgement of each passage for this loss mode (no gradient, eval mode)."""
        from ragops.training.retriever import evaluating

        with evaluating(self.model), self.lm.charged_to(self.meter):
            if self.mode in ("pdist", "emdr"):
                return self._single_passage_signals(batch)
            if self.mode == "loop":
                return self._leave_one_out(batch)
            if self.mode == "adist":
                return self._attention(batch)
        raise ValueError(f"no gold signal for retriever loss '{self.mode}'")

    def _single_passage_signals(self, batch: dict[str, Any]) -> dict[str, Any]:
        from ragops.architectures.prompts import qa_prompt

        k, chat = self.options.k, self.lm.chat_formatter
        contexts, conts, where = [], [], []
        for b, (example, texts, target) in enumerate(zip(batch["examples"], batch["texts"], batch["targets"], strict=True)):
            for j, text in enumerate(texts):
                contexts.append(self.lm.encode(qa_prompt(example.question, [text], chat)))
                conts.append(target)
                where.append((b, j))
        scored = self.lm.score_ids(contexts, conts)
        width = max(len(t) for t in batch["targets"])
        loglik = np.full((len(batch["examples"]), k), -np.inf)
        tokens = np.zeros((len(batch["examples"]), k, width), dtype=np.float32)
        mask = np.zeros((len(batch["examples"]), width), dtype=np.float32)
        for b, target in enumerate(batch["targets"]):
            mask[b, : len(target)] = 1.0
        for (b, j), lp in zip(where, scored, strict=True):
            loglik[b, j] = float(np.mean(lp))
            tokens[b, j, : len(lp)] = lp
        return {"loglik": loglik, "token_logprobs": tokens, "token_mask": mask}

    def _leave_one_out(self, batch: dict[str, Any]) -> dict[str, Any]:
        from ragops.architectures.prompts import qa_prompt

        k, chat = self.options.k, self.lm.chat_formatter
        contexts, conts, where = [], [], []
        for b, (example, texts, target) in enumerate(zip(batch["examples"], batch["texts"], batch["targets"], strict=True)):
            for j in range(len(texts)):
                contexts.append(self.lm.encode(qa_prompt(example.question, texts[:j] + texts[j + 1 :], chat)))
                conts.append(target)
                where.append((b, j))
        nll = np.full((len(batch["examples"]), k), -np.inf)
        for (b, j), lp in zip(where, self.lm.score_ids(contexts, conts), strict=True):
            nll[b, j] = -float(np.mean(lp))
        return {"nll_without": nll}

    def _attention(self, batch: dict[str, Any]) -> dict[str, Any]:
        k = self.options.k
        scores = np.full((len(batch["examples"]), k), -np.inf)
        for b, (example, texts, target) in enumerate(zip(batch["examples"], batch["texts"], batch["targets"], strict=True)):
            if texts:
                scores[b, : len(texts)] = reader_attention_scores(self.lm, example.question, texts, target)
        return {"attention": scores}

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        reader = self._reader_loss(batch, charge=True)
        metrics = {"train/reader_nll": float(reader.detach())}
        if not self.trains_retriever:
            return reader, metrics
        gold = self.gold_signals(batch)  # before the reader's update of this step, as Atlas
        scores = self._retrieval_scores(batch)
        retr = retriever_loss(self.mode, scores, gold, self.options)
        metrics["train/retriever_loss"] = float(retr.detach())
        teacher = gold.get("loglik", gold.get("nll_without", gold.get("attention")))
        if teacher is not None:
            metrics["train/top1_agreement"] = _top1_agreement(scores.detach().numpy(), teacher)
        return reader + retr, metrics

    def evaluate(self) -> dict[str, float]:
        """dev/loss: mean gold-answer NLL per token given the K passages the current retriever returns."""
        if not self.dev_examples:
            return {}
        total, count, hits, seen = 0.0, 0, 0, 0
        size = self.options.train.batch_size
        for start in range(0, len(self.dev_examples), size):
            batch = self.prepare(self.dev_examples[start : start + size])
            with self.lm.charged_to(self.meter):
                scored = self.lm.score_ids(batch["prompts"], batch["targets"])
            total -= float(sum(lp.sum() for lp in scored))
            count += sum(len(lp) for lp in scored)
            for example, rows in zip(batch["examples"], batch["rows"], strict=True):
                if example.gold_doc_id:
                    seen += 1
                    hits += int(any(self.setup.table.doc_ids[r] == example.gold_doc_id for r in rows))
        out = {"dev/loss": total / max(count, 1)}
        if seen:
            out["dev/gold_in_topk"] = hits / seen
        return out

    def after_step(self, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.trains_retriever:
            out = self.setup.maybe_refresh(step, self.options.train.steps, due=self.schedule.due)
        if self.gold_seen:
            out["train/gold_in_topk"] = self.gold_hits / self.gold_seen
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.setup.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.setup.load_state_dict(state)


def _top1_agreement(student: np.ndarray, teacher: np.ndarray) -> float:
    """Fraction of questions whose best passage is the same for the retriever and the reader's signal."""
    return float(np.mean(np.argmax(student, axis=1) == np.argmax(teacher, axis=1)))


def reader_terminator(lm: CausalLM) -> list[int]:
    """Token ids that end a gold answer in training: the chat model's end-of-turn (EOS) token, else a
    newline (generation stops at either, so the reader learns to stop where the answer ends)."""
    eos = lm.tokenizer.eos_token_id
    if lm.chat_formatter is not None and eos is not None:
        return [int(eos)]
    return lm.encode("\n")


def reader_passage_spans(lm: CausalLM, question: str, texts: list[str]) -> tuple[list[int], list[tuple[int, int]]]:
    """The reader's prompt ids for `texts` (best first) and each passage's token span [start, end), in
    the order of `texts` (the prompt lays them out best last)."""
    from ragops.architectures.aar import passage_spans
    from ragops.architectures.prompts import format_passage, qa_prompt

    prompt = qa_prompt(question, texts, lm.chat_formatter)
    shown = list(reversed(texts))
    cursor, char_spans = 0, []
    for text in shown:
        block = format_passage(text)
        at = prompt.index(block, cursor)
        char_spans.append((at, at + len(text.strip())))
        cursor = at + len(block)
    encoded = lm.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    spans = passage_spans([tuple(o) for o in encoded["offset_mapping"]], char_spans)
    return list(encoded["input_ids"]), spans[::-1]


def reader_attention_scores(lm: CausalLM, question: str, texts: list[str], target: list[int]) -> np.ndarray:
    """ADist's signal for passages `texts` (best first, as the reader reads them): attention from the
    positions that predict the target tokens onto each passage's tokens, weighted by value norms."""
    ids, spans = reader_passage_spans(lm, question, texts)
    full = ids + list(target)
    if len(full) > lm.max_length:
        raise RagopsError(f"atlas: a reader input of {len(full)} tokens exceeds lm.max_length={lm.max_length}")
    read = lm.attention(full, list(range(len(ids) - 1, len(full) - 1)), value_norms=True)
    return adist_scores(read["weights"], read["value_norms"], spans)


# ------------------------------------------------------------------------------------------------
# The architecture
# ------------------------------------------------------------------------------------------------


class Atlas(InContextRALM):
    name = "atlas"
    family = "white-box"
    finetune = "joint"
    Options = AtlasOptions
    options: AtlasOptions
    code_deps = ("architectures/aar.py",)  # its attention aggregation (ADist)

    def __init__(self, ctx, options=None) -> None:
        super().__init__(ctx, options)
        self._reader: CausalLM | None = None
        self._base_only = False  # True while (and after) this instance trains: the base LM, not the saved reader

    @property
    def lm(self) -> CausalLM:
        """The fine-tuned reader (base LM + adapter, merged) once trained; the base LM before and in training."""
        if self._reader is not None:
            return self._reader
        reader_dir = self.artifact_dir / READER_DIR
        if not self._base_only and (reader_dir / "finetune.json").exists():
            from ragops.architectures.base import lm_path
            from ragops.lm.finetune import load_finetuned

            self._reader = load_finetuned(reader_dir, lm_path(self.ctx.ws, self.ctx.config), self.ctx.config.lm)
            return self._reader
        return self.ctx.lm

    def train(self, run: TrainRun) -> dict[str, Any]:
        import torch

        from ragops.architectures.base import lm_path
        from ragops.io import write_json
        from ragops.lm.finetune import lora_model, save_adapter
        from ragops.training.retriever import RetrieverSetup, retrieval_examples, write_trained_retriever

        opt, ws, config = self.options, self.ctx.ws, self.ctx.config
        self._base_only = True
        lm = self.ctx.lm
        train, dev = retrieval_examples(ws, qa_per_task=opt.qa_examples, lm_windows=0, encode=lm.encode, decode=lm.decode,
                                        prefix_tokens=1, target_tokens=1, seed=config.seed, dev_fraction=opt.dev_fraction)
        towers = opt.towers if opt.retriever_loss != "none" else "query_side"
        setup = RetrieverSetup(ws, config, towers, meter=run.meter, device=run.device, refresh_mode=opt.refresh,
                               swap_after=opt.swap_after, progress=False)
        if opt.retriever_loss == "none":
            for p in setup.retriever.query_model.parameters():
                p.requires_grad_(False)
        torch.manual_seed(config.seed)  # the LoRA initialisation
        model = lora_model(lm, r=opt.lora_r, alpha=opt.lora_alpha, dropout=opt.lora_dropout, full=opt.reader == "full")
        task = AtlasTask(self, lm, model, setup, train, dev, run)
        result = run.train(task, opt.train, seed=config.seed, desc=f"{self.name}: training")
        refresher_stats = setup.refresher.stats() if setup.refresher is not None else {}
        retriever_params = setup.retriever.trainable_parameters if task.trains_retriever else 0

        def write(tmp):
            info: dict[str, Any] = {}
            if task.trains_retriever:
                index_meta = write_trained_retriever(tmp / "retriever", setup, meter=run.meter, progress=self.progress)
                info["index"] = {"count": index_meta["count"], "factory": index_meta["factory"]}
            save_adapter(model, tmp / READER_DIR, base=lm_path(ws, config), tokenizer=lm.tokenizer if task.full else None,
                         extra={"k": opt.k, "prompt": "qa_prompt, K passages concatenated", "reader": opt.reader})
            write_json(tmp / EXAMPLES_FILE, {"train": [e.example_id for e in train], "dev": [e.example_id for e in dev]})
            return {
                **info, "training": result.summary(), "examples": {"train": len(train), "dev": len(dev)},
                "objective": {"retriever_loss": opt.retriever_loss, "k": opt.k, "reader": opt.reader, "towers": towers,
                              "kl": {"direction": opt.direction, "reduction": opt.reduction} if opt.retriever_loss in ("pdist", "loop", "adist") else None,
                              "temperature_score": opt.temperature_score, "temperature_gold": opt.temperature_gold,
                              "temperature_attention": opt.temperature_attention,
                              "lr": {"reader": opt.train.lr, "retriever": opt.retriever_lr if task.trains_retriever else None},
                              "refresh_index": opt.refresh_index},
                "refresh": refresher_stats,
                "gold_in_topk": task.gold_hits / task.gold_seen if task.gold_seen else None,
                "reader_trainable_params": task.reader_trainable, "retriever_trainable_params": retriever_params,
                "trainable_params": task.reader_trainable + retriever_params,
            }

        if run.meter is not None:
            run.meter.set_params(lm.n_params + setup.retriever.n_params, task.reader_trainable + retriever_params)
        manifest = self.save_artifacts(write, truncated=result.truncated)
        return manifest["info"]
