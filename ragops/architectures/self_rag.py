"""SELF-RAG (Asai et al. 2024): an LM fine-tuned to decide when to retrieve and to critique its own
output with reflection tokens, decoded with those critiques (rag-methods.md §5, method-designs §3.4).

**Vocabulary.** The tokenizer gains SELF-RAG's 13 reflection tokens — Retrieve `[Retrieval]`
`[No Retrieval]` `[Continue to Use Evidence]`; IsRel `[Relevant]` `[Irrelevant]`; IsSup
`[Fully supported]` `[Partially supported]` `[No support / Contradictory]`; IsUse `[Utility:1]`…
`[Utility:5]` — and the passage markers `<paragraph>` `</paragraph>`, each one special id
(`finetune.add_special_tokens`, mean-initialised rows, seeded; SmolLM2's input and output embeddings
are tied, so one new row per token serves both), trained as `trainable_token_indices` next to LoRA,
at `token_lr_scale` × the LoRA learning rate (they start ~19 nats below where they must be
predicted). Only the LoRA weights and these 15 rows are saved (`save_embedding_layers=False`).
Training questions are train-split questions; training passages are retrieved with held-out and
dev/test articles excluded, and both are checked by `assert_clean_training_data`.

**Critic labels without GPT-4** (train split only; the gold answer y and gold article are known):
- Retrieve: `[Retrieval]` iff the gold article's passage lowers the frozen LM's mean gold-answer
  NLL by more than `retrieve_margin` nats/token (closed book vs that passage in the shared prompt);
  the passage is the gold article's chunk that contains most of the answer.
- IsRel: `[Relevant]` iff the passage comes from the gold article.
- IsSup: recall of the answer's content tokens (SQuAD-normalised, stop words dropped) in the
  passage: ≥ `support_full` Fully, ≥ `support_partial` Partially, else No support.
- IsUse: utility of an answer = 1 + round(4·F1(answer, gold)) ∈ 1..5. Labelled on the frozen LM's
  own closed-book answer (the informative case) and on the gold answer (5).
**Critic.** As in the paper, a critic — here LoRA (+ the new token rows) on a copy of the LM — is
trained on these labels (one label token per item, four prompt kinds, `CRITIC_PROMPTS`); items of
`critic_heldout` of the critic questions are held out and its agreement with their labels is
reported (`critic.agreement` in the manifest, per aspect, with the majority-label baseline). The
critic then labels the generator's questions (disjoint from its own): Retrieve on (x, y), IsRel and
IsSup on each of the `candidates` top retrieved passages, IsUse on (x, y).

**Generator data** (the paper's `postprocess_data.py`): Retrieve → `[Retrieval]<paragraph>p
</paragraph>[IsRel]y[IsSup][Utility:k]`, with p = a passage that is Relevant and Fully supported;
else a Partially supported one with probability 0.7; else a No-support one with probability 0.25;
else a random one. No Retrieve → `[No Retrieval]y[Utility:k]`, kept with probability
`keep_no_retrieval` (0.4). The prompt is the shared QA prompt without passages (`qa_prompt`), the
reply ends with the terminator (EOS for a chat model). The loss is the LM loss on the reply with the
prompt and `<paragraph>…</paragraph>` (markers included: the system inserts them) masked out.

**Inference** (short form; answers are ≤ 16 tokens, one segment): retrieve iff
p([Retrieval]) / (p([Retrieval]) + p([No Retrieval])) > δ on **probabilities** (the reference
compares log-probs: issues #9/#40). Without retrieval the answer is generated after `[No Retrieval]`.
With retrieval, for each of the top-k passages d: the IsRel distribution after
`[Retrieval]<paragraph>d</paragraph>`, the answer generated after the more likely IsRel token (it ends
at any reflection token, EOS or newline), the IsSup distribution after the answer and the IsUse
distribution after the more likely IsSup token; score(d) = exp(mean answer-token log-prob)
+ w_rel·p(Rel)/(p(Rel)+p(Irr)) + w_sup·(p(Full) + 0.5·p(Partial))/Σ + w_use·Σ_i u_i p(U_i)/Σ p(U_i),
u = (−1, −0.5, 0, 0.5, 1) over `[Utility:1..5]` (the reference's long-form loop reads the IsSup
tokens there); the best passage's answer is the prediction. Reflection tokens never reach the
prediction (special tokens are dropped when decoding). The gold-answer NLL is scored as every
architecture scores it (`answer_continuation`) right where the prediction was generated: after
`[No Retrieval]`, or after the selected passage and its IsRel token.

**Retrieval rate and δ sweep.** Both paths are computed for every question (the path δ did not take
is charged to a scratch meter, not to the evaluation's cost), so quality and LM tokens at any δ
follow from the cached per-question decision probabilities: `inference/<task>/retrieval_rate` (the harness's, as for every architecture) is a metric, and
`delta_sweep.csv` / `delta_sweep.png` (quality and LM tokens per question vs retrieval rate) are
written next to the predictions.

**The `lm` task**: In-Context RALM's strided retrieval read by the fine-tuned LM (plain text, no
reflection tokens: SELF-RAG defines no document-scoring procedure), the same metric keys.

**Control** (`reflection: false`, the `self_rag_always` variant): the same questions, LoRA and steps,
no reflection tokens and no critic; always the top retrieved passage in the shared prompt (RAGLAB's
fine-tuned baseline); evaluated like In-Context RALM with k passages.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field

from ragops.architectures.incontext_ralm import InContextRALM, InContextRALMOptions
from ragops.config import OptimizerOptions
from ragops.training.loop import TrainingTask

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from ragops.cost import CostMeter
    from ragops.lm.model import CausalLM
    from ragops.retrieval.types import Passage
    from ragops.training.loop import TrainRun

GENERATOR_DIR = "generator"
EXAMPLES_FILE = "examples.json"

RETRIEVAL, NO_RETRIEVAL, CONTINUE = "[Retrieval]", "[No Retrieval]", "[Continue to Use Evidence]"
RELEVANT, IRRELEVANT = "[Relevant]", "[Irrelevant]"
FULLY, PARTIALLY, NO_SUPPORT = "[Fully supported]", "[Partially supported]", "[No support / Contradictory]"
UTILITY = tuple(f"[Utility:{i}]" for i in range(1, 6))
PARAGRAPH_OPEN, PARAGRAPH_CLOSE = "<paragraph>", "</paragraph>"
REFLECTION_TOKENS = (RETRIEVAL, NO_RETRIEVAL, CONTINUE, RELEVANT, IRRELEVANT, FULLY, PARTIALLY, NO_SUPPORT, *UTILITY,
                     PARAGRAPH_OPEN, PARAGRAPH_CLOSE)
UTILITY_VALUES = (-1.0, -0.5, 0.0, 0.5, 1.0)
SUPPORT_TOKENS = (FULLY, PARTIALLY, NO_SUPPORT)
#: The critic's four prompt kinds (user messages; the label token is its whole reply).
CRITIC_PROMPTS = {
    "retrieve": "Would a passage from a reference text help to give this answer?\nQuestion: {question}\nAnswer: {answer}",
    "isrel": "Is the passage relevant to the question?\nPassage: {passage}\nQuestion: {question}",
    "issup": "Is the answer supported by the passage?\nPassage: {passage}\nQuestion: {question}\nAnswer: {answer}",
    "isuse": "How useful is the answer to the question (1-5)?\nQuestion: {question}\nAnswer: {answer}",
}
CRITIC_LABELS = {
    "retrieve": (RETRIEVAL, NO_RETRIEVAL), "isrel": (RELEVANT, IRRELEVANT), "issup": SUPPORT_TOKENS, "isuse": UTILITY,
}
STOP_WORDS = frozenset("of in on at to for by with from and or is was are were be as that this it its his her their".split())
PASSAGE_TOKENS = 192  # longest passage (tokens) put between the markers; indexed chunks have p95 135, max 198
DEFAULT_SWEEP = tuple(round(0.1 * i, 1) for i in range(11))


class SelfRAGOptions(InContextRALMOptions):
    k: int = Field(default=2, ge=1)  # passages read (each on its own) when retrieving; the control shows k together
    reflection: bool = True  # false: the control (no reflection tokens, no critic, always retrieve)
    threshold: float = Field(default=0.2, ge=0, le=1)  # δ: retrieve iff p(Ret)/(p(Ret)+p(NoRet)) > δ
    w_rel: float = 1.0
    w_sup: float = 1.0
    w_use: float = 0.5  # the README's value (the short-form argparse default is 1.0)
    use_seqscore: bool = True  # add exp(mean answer-token log-prob) to the critique score
    sweep_deltas: list[float] = Field(default_factory=lambda: list(DEFAULT_SWEEP))  # [] = no sweep (one path per question)
    lora_r: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    # The new tokens' rows start (mean-initialised) at p ≈ 1e-8 where they must be predicted: a label
    # loss of ~19 nats on SmolLM2. On 8 critic items (8 steps, lr 3e-4, warm-up then linear decay) the
    # loss went 18.9 -> 14.6 with the rows at the LoRA rate, -> 9.1 at 10x, -> 0.54 at 30x (chance
    # level for the two labels: 0.69), smoothly. So the rows train at train.lr × this.
    token_lr_scale: float = Field(default=30.0, gt=0)
    # critic labels and critic
    critic_questions: int = Field(default=60, ge=1)  # train-split questions per QA task labelled for the critic
    critic_heldout: float = Field(default=0.2, ge=0, lt=1)  # of those, questions whose items only measure agreement
    retrieve_margin: float = Field(default=0.1, ge=0)  # nats/token the gold passage must save for [Retrieval]
    support_full: float = Field(default=0.8, gt=0, le=1)
    support_partial: float = Field(default=0.4, ge=0, le=1)
    critic_train: OptimizerOptions = OptimizerOptions(steps=40, batch_size=8, lr=3e-4, warmup=0.1, checkpoint_every=10)
    # generator
    qa_examples: int = Field(default=120, ge=1)  # train-split questions per QA task for the generator
    candidates: int = Field(default=2, ge=1)  # retrieved passages the critic judges per generator question
    keep_no_retrieval: float = Field(default=0.4, ge=0, le=1)  # the paper's sampling of [No Retrieval] examples
    train: OptimizerOptions = OptimizerOptions(steps=55, batch_size=4, lr=2e-4, warmup=0.1, checkpoint_every=10)


# ------------------------------------------------------------------------------------------------
# Inference-time scores, as pure functions of log-probabilities
# ------------------------------------------------------------------------------------------------


def retrieval_probability(logp_retrieval: float, logp_no_retrieval: float) -> float:
    """p(Ret) / (p(Ret) + p(NoRet)) from the two tokens' log-probs: a ratio of PROBABILITIES."""
    top = max(logp_retrieval, logp_no_retrieval)
    a, b = math.exp(logp_retrieval - top), math.exp(logp_no_retrieval - top)
    return a / (a + b)


def should_retrieve(logp_retrieval: float, logp_no_retrieval: float, threshold: float) -> bool:
    return retrieval_probability(logp_retrieval, logp_no_retrieval) > threshold


def _normalised(logps: Sequence[float]) -> np.ndarray:
    values = np.asarray(logps, dtype=np.float64)
    p = np.exp(values - values.max())
    return p / p.sum()


def relevance_score(logp_relevant: float, logp_irrelevant: float) -> float:
    """s(IsRel) = p(Relevant) / (p(Relevant) + p(Irrelevant))."""
    return float(_normalised([logp_relevant, logp_irrelevant])[0])


def support_score(logp_full: float, logp_partial: float, logp_none: float) -> float:
    """s(IsSup) = (p(Full) + 0.5·p(Partial)) / (p(Full) + p(Partial) + p(No support))."""
    p = _normalised([logp_full, logp_partial, logp_none])
    return float(p[0] + 0.5 * p[1])


def utility_score(logp_utility: Sequence[float]) -> float:
    """s(IsUse) = Σ_i u_i p(Utility:i) / Σ_i p(Utility:i), u = (−1, −0.5, 0, 0.5, 1)."""
    if len(logp_utility) != len(UTILITY_VALUES):
        raise ValueError(f"utility_score: {len(logp_utility)} log-probs for {len(UTILITY_VALUES)} utility tokens")
    return float(np.dot(_normalised(logp_utility), UTILITY_VALUES))


def critique_score(answer_logprobs: Sequence[float], rel: float, sup: float, use: float, *, w_rel: float, w_sup: float,
                   w_use: float, use_seqscore: bool = True) -> float:
    """score(d) = exp(mean answer-token log-prob) + w_rel·s(IsRel) + w_sup·s(IsSup) + w_use·s(IsUse)."""
    seq = math.exp(float(np.mean(answer_logprobs))) if use_seqscore and len(answer_logprobs) else 0.0
    return seq + w_rel * rel + w_sup * sup + w_use * use


# ------------------------------------------------------------------------------------------------
# Critic labels from the benchmark and the frozen LM
# ------------------------------------------------------------------------------------------------


def content_tokens(text: str) -> list[str]:
    from ragops.evaluation.metrics import normalize_answer

    tokens = normalize_answer(text).split()
    content = [t for t in tokens if t not in STOP_WORDS]
    return content or tokens


def answer_recall(answer: str, passage: str) -> float:
    """Fraction of the answer's content tokens that occur in the passage."""
    wanted = content_tokens(answer)
    if not wanted:
        return 0.0
    present = set(content_tokens(passage))
    return sum(t in present for t in wanted) / len(wanted)


def retrieve_label(nll_closed: float, nll_with_gold: float, margin: float) -> str:
    """[Retrieval] iff the gold passage lowers the gold answer's mean NLL by more than `margin`."""
    return RETRIEVAL if nll_closed - nll_with_gold > margin else NO_RETRIEVAL


def relevance_label(passage_doc_id: str, gold_doc_id: str | None) -> str:
    return RELEVANT if gold_doc_id is not None and str(passage_doc_id) == str(gold_doc_id) else IRRELEVANT


def support_label(answer: str, passage: str, full: float = 0.8, partial: float = 0.4) -> str:
    recall = answer_recall(answer, passage)
    return FULLY if recall >= full else PARTIALLY if recall >= partial else NO_SUPPORT


def utility_label(answer: str, gold: str) -> str:
    """[Utility:k], k = 1 + round(4·F1(answer, gold)) (half up)."""
    from ragops.evaluation.metrics import token_f1

    return UTILITY[int(math.floor(4 * token_f1(answer, gold) + 0.5))]


def choose_passage(labels: Sequence[tuple[str, str]], rng: np.random.Generator) -> int:
    """The paper's passage choice (`postprocess_data.py`) over (IsRel, IsSup) labels of the candidates:
    Relevant and Fully supported; else Partially supported with probability 0.7; else No support
    with probability 0.25; else a random candidate."""
    best = [i for i, (rel, sup) in enumerate(labels) if rel == RELEVANT and sup == FULLY]
    if best:
        return best[0]
    for label, p in ((PARTIALLY, 0.7), (NO_SUPPORT, 0.25)):
        found = [i for i, (_, sup) in enumerate(labels) if sup == label]
        if found and rng.random() < p:
            return found[0]
    return int(rng.integers(len(labels)))


def generator_example(prompt: Sequence[int], answer: Sequence[int], terminator: Sequence[int], ids: dict[str, int], *,
                      passage: Sequence[int] | None = None, rel: str | None = None, sup: str | None = None,
                      utility: str | None = None) -> tuple[list[int], list[bool]]:
    """(token ids, loss mask) of one generator example. With `passage`:
    prompt [Retrieval] <paragraph> passage </paragraph> [IsRel] answer [IsSup] [Utility:k] terminator;
    without: prompt [No Retrieval] answer [Utility:k] terminator. The prompt and everything from
    <paragraph> to </paragraph> are masked (False); the rest is in the loss."""
    seq, mask = list(prompt), [False] * len(prompt)

    def put(tokens: Sequence[int], in_loss: bool) -> None:
        seq.extend(tokens)
        mask.extend([in_loss] * len(tokens))

    if passage is not None:
        put([ids[RETRIEVAL]], True)
        put([ids[PARAGRAPH_OPEN], *passage, ids[PARAGRAPH_CLOSE]], False)
        put([ids[rel or RELEVANT]], True)
        put(answer, True)
        put([ids[sup or FULLY]], True)
    else:
        put([ids[NO_RETRIEVAL]], True)
        put(answer, True)
    put([ids[utility or UTILITY[-1]]], True)
    put(terminator, True)
    return seq, mask


# ------------------------------------------------------------------------------------------------
# Training tasks for the shared loop
# ------------------------------------------------------------------------------------------------


class SequenceTask(TrainingTask):
    """A LoRA model trained on fixed (ids, mask) sequences: the critic and the generator."""

    def __init__(self, lm: CausalLM, model: Any, sequences: list[tuple[list[int], list[bool]]], options: OptimizerOptions,
                 seed: int, meter: CostMeter | None, token_lr_scale: float = 1.0) -> None:
        from ragops.training.loop import cycle_batches

        self.lm, self.model, self.sequences, self.options, self.meter = lm, model, sequences, options, meter
        self.token_lr_scale = token_lr_scale
        self.batches = cycle_batches(len(sequences), options.batch_size, seed)
        self.trainable = int(sum(p.numel() for p in model.parameters() if p.requires_grad))

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model}

    def param_groups(self) -> list[dict[str, Any]]:
        """LoRA weights at `lr`; the added tokens' rows (peft's trainable-token delta) at lr × token_lr_scale."""
        rows = [p for n, p in self.model.named_parameters() if p.requires_grad and "trainable_tokens" in n]
        rest = [p for n, p in self.model.named_parameters() if p.requires_grad and "trainable_tokens" not in n]
        groups = [{"params": rest, "lr": self.options.lr}]
        if rows:
            groups.append({"params": rows, "lr": self.options.lr * self.token_lr_scale})
        return groups

    def micro_batch(self, step: int, micro: int) -> list[tuple[list[int], list[bool]]]:
        return [self.sequences[i] for i in self.batches(step * self.options.grad_accum + micro)]

    def loss(self, batch: list[tuple[list[int], list[bool]]]) -> tuple[torch.Tensor, dict[str, float]]:
        from ragops.lm.finetune import causal_lm_loss, charge_training

        sequences, masks = [s for s, _ in batch], [m for _, m in batch]
        loss, n_tokens = causal_lm_loss(self.model, sequences, masks, self.lm.pad_id)
        charge_training(self.meter, self.lm, sequences, n_tokens, full=False, trainable=self.trainable)
        if self.meter is not None:
            self.meter.add(examples=len(batch))
        return loss, {}


def _renamed(report: Any, prefix: str) -> Any:
    """A loss-curve reporter that files the critic's train/* curves under critic/*."""
    if report is None:
        return None
    return lambda step, metrics: report(step, {k.replace("train/", f"{prefix}/", 1): v for k, v in metrics.items()})


# ------------------------------------------------------------------------------------------------
# The architecture
# ------------------------------------------------------------------------------------------------


class SelfRAG(InContextRALM):
    name = "self_rag"
    family = "white-box"
    finetune = "lm"
    Options = SelfRAGOptions
    options: SelfRAGOptions
    code_deps = ("architectures/incontext_ralm.py", "retrieval/retriever.py", "evaluation/metrics.py")

    def __init__(self, ctx, options=None) -> None:
        super().__init__(ctx, options)
        self._generator: CausalLM | None = None
        self._base_only = False

    @property
    def lm(self) -> CausalLM:
        """The fine-tuned generator (base + adapter merged, reflection tokens end an answer) once
        trained; the base LM before and during training."""
        if self._generator is not None:
            return self._generator
        directory = self.artifact_dir / GENERATOR_DIR
        if not self._base_only and (directory / "finetune.json").exists():
            from ragops.architectures.base import lm_path
            from ragops.lm.finetune import load_finetuned

            lm = load_finetuned(directory, lm_path(self.ctx.ws, self.ctx.config), self.ctx.config.lm)
            if self.options.reflection:
                lm.eos_ids |= set(reflection_ids(lm).values())
            self._generator = lm
            return lm
        return self.ctx.lm

    # --- training -------------------------------------------------------------------------------------
    def _side_file(self, run: TrainRun, suffix: str) -> Path | None:
        return run.checkpoint.with_name(run.checkpoint.stem + suffix) if run.checkpoint is not None else None

    def train(self, run: TrainRun) -> dict[str, Any]:
        import torch

        from ragops.architectures.base import lm_path
        from ragops.io import read_json, write_json
        from ragops.lm.finetune import add_special_tokens, lora_model, save_adapter
        from ragops.training.data import assert_clean_training_data, train_questions

        opt, ws, config = self.options, self.ctx.ws, self.ctx.config
        self._base_only = True
        lm = self.ctx.lm
        # The control samples exactly as SELF-RAG does and drops the critic's share: the same generator questions.
        pool = train_questions(ws, opt.qa_examples + opt.critic_questions, config.seed)
        critic_q, gen_q = _split_questions(pool, opt.critic_questions)
        if not opt.reflection:
            critic_q = critic_q.iloc[:0]
        retriever = self.ctx.retriever(opt.retriever)
        gen_passages = self._training_passages(retriever, gen_q, opt.candidates if opt.reflection else 1, run.meter)
        terminator = _terminator(lm)
        chat = lm.chat_formatter
        info: dict[str, Any] = {}
        text_docs = {p.doc_id for ps in gen_passages for p in ps}
        if opt.reflection:
            labels_file = self._side_file(run, ".critic.json")
            if labels_file is not None and labels_file.exists() and read_json(labels_file).get("fingerprint") == self.training_fingerprint():
                cached = read_json(labels_file)  # a resumed training: the critic's work is done
                # The critic's cost, unless the generator's checkpoint (which holds it already) restores it.
                if run.meter is not None and cached.get("meter") and not (run.checkpoint is not None and run.checkpoint.exists()):
                    run.meter.restore(cached["meter"])
                critic_info, gen_labels = cached["critic"], cached["labels"]
                text_docs |= set(cached.get("critic_docs", []))
                torch.manual_seed(config.seed)  # the new rows' (mean-resizing) initialisation
                ids = dict(zip(REFLECTION_TOKENS, add_special_tokens(lm, REFLECTION_TOKENS), strict=True))
            else:
                items, label_stats, critic_docs = self._critic_items(lm, retriever, critic_q, run.meter)
                text_docs |= critic_docs
                torch.manual_seed(config.seed)  # the new rows' (mean-resizing) initialisation
                ids = dict(zip(REFLECTION_TOKENS, add_special_tokens(lm, REFLECTION_TOKENS), strict=True))
                critic_info, gen_labels = self._train_critic(lm, ids, items, gen_q, gen_passages, run)
                critic_info["labels"] = label_stats
                if labels_file is not None:
                    write_json(labels_file, {"fingerprint": self.training_fingerprint(), "critic": critic_info, "labels": gen_labels,
                                             "critic_docs": sorted(critic_docs), "meter": run.meter.snapshot() if run.meter is not None else None})
            info["critic"] = critic_info
            if run.report is not None:  # the critic's held-out agreement as metrics of the train run
                agreement = critic_info["agreement"]
                values = {"critic/heldout_agreement": agreement.get("overall"),
                          **{f"critic/heldout_agreement_{a}": agreement[a]["accuracy"] for a in CRITIC_PROMPTS if a in agreement}}
                run.report(int(critic_info["training"]["steps"]), {k: float(v) for k, v in values.items() if v is not None})
            sequences, composition = self._generator_sequences(lm, ids, gen_q, gen_passages, gen_labels, terminator)
            info["generator_data"] = composition
            trainable_tokens = list(ids.values())
        else:
            sequences = []
            for (_, q), passages in zip(gen_q.iterrows(), gen_passages, strict=True):
                prompt = lm.encode(_qa_prompt(str(q["question"]), [_cut(lm, passages[0].text)] if passages else [], chat))
                answer = lm.encode(_answer(str(q["answer"]), chat))
                sequences.append((prompt + answer + terminator, [False] * len(prompt) + [True] * (len(answer) + len(terminator))))
            trainable_tokens = []
        assert_clean_training_data(ws, qids=list(critic_q["qid"]) + list(gen_q["qid"]), text_doc_ids=text_docs)
        torch.manual_seed(config.seed)  # the LoRA initialisation
        model = lora_model(lm, r=opt.lora_r, alpha=opt.lora_alpha, dropout=opt.lora_dropout, trainable_token_ids=trainable_tokens)
        task = SequenceTask(lm, model, sequences, opt.train, config.seed, run.meter, opt.token_lr_scale)
        result = run.train(task, opt.train, seed=config.seed, desc=f"{self.name}: generator")

        def write(tmp):
            save_adapter(model, tmp / GENERATOR_DIR, base=lm_path(ws, config), tokenizer=lm.tokenizer if opt.reflection else None,
                         save_embedding_layers=False,  # the added rows are the adapter's trainable-token delta
                         extra={"reflection": opt.reflection, "reflection_tokens": list(REFLECTION_TOKENS) if opt.reflection else []})
            write_json(tmp / EXAMPLES_FILE, {"critic": list(critic_q["qid"]), "generator": list(gen_q["qid"]),
                                             "passage_doc_ids": sorted(text_docs)})
            return {
                **info, "training": result.summary(),
                "examples": {"critic_questions": len(critic_q), "generator_questions": len(gen_q), "generator_sequences": len(sequences)},
                "trainable_params": task.trainable, "reflection": opt.reflection,
            }

        if run.meter is not None:
            run.meter.set_params(lm.n_params, task.trainable)
        manifest = self.save_artifacts(write, truncated=result.truncated)
        if not result.truncated:
            for suffix in (".critic.json", ".critic-ckpt"):
                side = self._side_file(run, suffix)
                if side is not None:
                    side.unlink(missing_ok=True)
        return manifest["info"]

    def _training_passages(self, retriever: Any, questions: pd.DataFrame, k: int, meter: CostMeter | None) -> list[list[Passage]]:
        """Top-k passages per training question; held-out and dev/test articles are never retrieved."""
        from ragops.cost import CostMeter as Meter
        from ragops.training.data import forbidden_doc_ids

        if not len(questions):
            return []
        forbidden = forbidden_doc_ids(self.ctx.ws)
        return self.retrieve(retriever, [str(q) for q in questions["question"]], k, meter or Meter(),
                             exclude_doc_ids=[forbidden] * len(questions))

    def _critic_items(self, lm: CausalLM, retriever: Any, questions: pd.DataFrame, meter: CostMeter | None
                      ) -> tuple[list[dict[str, Any]], dict[str, Any], set[str]]:
        """Labelled critic items (question index, aspect, critic prompt fields, label) from the
        benchmark and the frozen LM (before any token is added: its distribution is the base LM's)."""
        from ragops.architectures.prompts import STOP

        chat = lm.chat_formatter
        passages = self._training_passages(retriever, questions, self.options.candidates, meter)
        table = retriever.table
        closed_prompts, gold_prompts, conts, has_gold = [], [], [], []
        for (_, q), _ps in zip(questions.iterrows(), passages, strict=True):
            question, answer = str(q["question"]), str(q["answer"])
            closed_prompts.append(lm.encode(_qa_prompt(question, [], chat)))
            gold_text = _gold_passage(table, q["gold_doc_id"], answer)
            has_gold.append(gold_text)
            gold_prompts.append(lm.encode(_qa_prompt(question, [_cut(lm, gold_text)] if gold_text else [], chat)))
            conts.append(lm.encode(_answer(answer, chat)))
        with lm.charged_to(meter):
            closed_lp, closed_answers = lm.score_and_generate_ids(closed_prompts, conts, max_new_tokens=self.ctx.config.eval.max_new_tokens, stop=STOP)
            gold_lp = lm.score_ids(gold_prompts, conts)
        items: list[dict[str, Any]] = []
        docs: set[str] = set()
        for i, ((_, q), ps) in enumerate(zip(questions.iterrows(), passages, strict=True)):
            question, answer, gold_doc = str(q["question"]), str(q["answer"]), q["gold_doc_id"]
            nll_closed, nll_gold = -float(np.mean(closed_lp[i])), -float(np.mean(gold_lp[i]))
            label = retrieve_label(nll_closed, nll_gold, self.options.retrieve_margin) if has_gold[i] else NO_RETRIEVAL
            items.append({"q": i, "aspect": "retrieve", "question": question, "answer": answer, "label": label,
                          "nll_closed": nll_closed, "nll_gold": nll_gold})
            shown = [(p.doc_id, p.text) for p in ps]
            if has_gold[i] and gold_doc not in {d for d, _ in shown}:
                shown = [*shown[: max(len(shown) - 1, 0)], (str(gold_doc), has_gold[i])]  # both IsRel classes occur
            for doc_id, text in shown:
                docs.add(str(doc_id))
                passage = _cut(lm, text)
                items.append({"q": i, "aspect": "isrel", "question": question, "passage": passage, "label": relevance_label(doc_id, gold_doc)})
                items.append({"q": i, "aspect": "issup", "question": question, "passage": passage, "answer": answer,
                              "label": support_label(answer, text, self.options.support_full, self.options.support_partial)})
            lm_answer = closed_answers[i].strip()
            items.append({"q": i, "aspect": "isuse", "question": question, "answer": lm_answer, "label": utility_label(lm_answer, answer)})
            items.append({"q": i, "aspect": "isuse", "question": question, "answer": answer, "label": UTILITY[-1]})
        stats = {aspect: _counts([it["label"] for it in items if it["aspect"] == aspect]) for aspect in CRITIC_PROMPTS}
        return items, stats, docs

    def _train_critic(self, lm: CausalLM, ids: dict[str, int], items: list[dict[str, Any]], gen_q: pd.DataFrame,
                      gen_passages: list[list[Passage]], run: TrainRun) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Train the critic (LoRA + token rows on a copy of the LM), measure its agreement with the
        held-out items' labels, and label the generator's questions with it."""
        import torch

        from ragops.lm.finetune import lora_model
        from ragops.lm.model import CausalLM as LM
        from ragops.training.loop import train

        opt, seed = self.options, self.ctx.config.seed
        n_questions = 1 + max((it["q"] for it in items), default=-1)
        heldout_q = set(np.random.default_rng([seed, 11]).permutation(n_questions)[: int(round(opt.critic_heldout * n_questions))].tolist())
        train_items = [it for it in items if it["q"] not in heldout_q]
        heldout = [it for it in items if it["q"] in heldout_q]
        critic_lm = LM(copy.deepcopy(lm.model), lm.tokenizer, max_length=lm.max_length, batch_tokens=lm.batch_tokens, name=f"{lm.name}+critic")
        sequences = []
        for it in train_items:
            prompt = critic_prompt(critic_lm, it)
            sequences.append((prompt + [ids[it["label"]]], [False] * len(prompt) + [True]))
        torch.manual_seed(seed + 1)
        model = lora_model(critic_lm, r=opt.lora_r, alpha=opt.lora_alpha, dropout=opt.lora_dropout, trainable_token_ids=list(ids.values()))
        task = SequenceTask(critic_lm, model, sequences, opt.critic_train, seed + 1, run.meter, opt.token_lr_scale)
        result = train(task, opt.critic_train, seed=seed + 1, checkpoint=self._side_file(run, ".critic-ckpt"),
                       settings={**run.settings, "phase": "critic"}, meter=run.meter, report=_renamed(run.report, "critic"),
                       max_minutes=None, progress=run.progress, desc=f"{self.name}: critic")
        critic = LM(model.merge_and_unload().eval(), lm.tokenizer, max_length=lm.max_length, batch_tokens=lm.batch_tokens, name=f"{lm.name}+critic")
        with critic.charged_to(run.meter):
            predicted = critic_predict(critic, ids, heldout)
            agreement = critic_agreement(heldout, predicted)
            gen_items = []
            for i, ((_, q), ps) in enumerate(zip(gen_q.iterrows(), gen_passages, strict=True)):
                question, answer = str(q["question"]), str(q["answer"])
                gen_items.append({"q": i, "aspect": "retrieve", "question": question, "answer": answer})
                gen_items.append({"q": i, "aspect": "isuse", "question": question, "answer": answer})
                for j, p in enumerate(ps):
                    passage = _cut(lm, p.text)
                    gen_items.append({"q": i, "j": j, "aspect": "isrel", "question": question, "passage": passage})
                    gen_items.append({"q": i, "j": j, "aspect": "issup", "question": question, "passage": passage, "answer": answer})
            gen_predicted = critic_predict(critic, ids, gen_items)
        labels: list[dict[str, Any]] = [{"retrieve": None, "isuse": None, "passages": [[None, None] for _ in ps]} for ps in gen_passages]
        for it, label in zip(gen_items, gen_predicted, strict=True):
            slot = labels[it["q"]]
            if it["aspect"] in ("retrieve", "isuse"):
                slot[it["aspect"]] = label
            else:
                slot["passages"][it["j"]][0 if it["aspect"] == "isrel" else 1] = label
        del critic, critic_lm, model
        return {"items": {"train": len(train_items), "heldout": len(heldout)}, "heldout_questions": len(heldout_q),
                "agreement": agreement, "training": result.summary(),
                "generator_labels": {a: _counts([lab for it, lab in zip(gen_items, gen_predicted, strict=True) if it["aspect"] == a])
                                     for a in CRITIC_PROMPTS}}, labels

    def _generator_sequences(self, lm: CausalLM, ids: dict[str, int], questions: pd.DataFrame, passages: list[list[Passage]],
                             labels: list[dict[str, Any]], terminator: list[int]) -> tuple[list[tuple[list[int], list[bool]]], dict[str, int]]:
        rng = np.random.default_rng([self.ctx.config.seed, 13])
        chat = lm.chat_formatter
        out, counts = [], {"retrieval": 0, "no_retrieval": 0, "no_retrieval_dropped": 0}
        for (_, q), ps, lab in zip(questions.iterrows(), passages, labels, strict=True):
            prompt = lm.encode(_qa_prompt(str(q["question"]), [], chat))
            answer = lm.encode(_answer(str(q["answer"]), chat))
            if lab["retrieve"] == RETRIEVAL and ps:
                j = choose_passage([tuple(x) for x in lab["passages"]], rng)
                rel, sup = lab["passages"][j]
                passage = lm.encode(_cut(lm, ps[j].text))
                out.append(generator_example(prompt, answer, terminator, ids, passage=passage, rel=rel, sup=sup, utility=lab["isuse"]))
                counts["retrieval"] += 1
            elif rng.random() < self.options.keep_no_retrieval:
                out.append(generator_example(prompt, answer, terminator, ids, utility=lab["isuse"]))
                counts["no_retrieval"] += 1
            else:
                counts["no_retrieval_dropped"] += 1
        if not out:
            from ragops.errors import RagopsError

            raise RagopsError(f"architectures.{self.name}: the critic's labels left no generator example (raise keep_no_retrieval or qa_examples)")
        return out, counts

    # --- QA -------------------------------------------------------------------------------------------
    def answer(self, questions: pd.DataFrame, meter: CostMeter) -> pd.DataFrame:
        if not self.options.reflection:
            return super().answer(questions, meter)
        import pandas as pd

        from ragops.architectures.base import QA_BATCH, _progress
        from ragops.cost import CostMeter as Meter

        lm, opt = self.lm, self.options
        ids = reflection_ids(lm)
        scratch = Meter()  # the path δ did not take: computed for the sweep, not charged to the evaluation
        rows, sweep_rows = [], []
        bar = _progress(self.progress, len(questions), self.qa_progress_label(questions))
        for start in range(0, len(questions), QA_BATCH):
            batch = questions.iloc[start : start + QA_BATCH].reset_index(drop=True)
            chat = lm.chat_formatter
            prompts = [lm.encode(_qa_prompt(str(q), [], chat)) for q in batch["question"]]
            golds = [lm.encode(_answer(str(a), chat)) for a in batch["answer"]]
            with lm.charged_to(meter):
                decision = lm.next_token_logprobs(prompts, [ids[RETRIEVAL], ids[NO_RETRIEVAL]])
            p_retrieve = [retrieval_probability(float(a), float(b)) for a, b in decision]
            retrieve = [p > opt.threshold for p in p_retrieve]
            both = bool(opt.sweep_deltas)
            opened = self._retrieval_path(lm, ids, batch, prompts, golds, retrieve, meter, scratch if both else None)
            retrieve = [r and o is not None for r, o in zip(retrieve, opened, strict=True)]  # nothing retrieved: answer closed-book
            closed = self._no_retrieval_path(lm, ids, prompts, golds, retrieve, meter, scratch if both else None)
            for i, (_, q) in enumerate(batch.iterrows()):
                chosen = opened[i] if retrieve[i] else closed[i]
                meter.add(tokens_prompt=chosen["tokens_prompt"] + len(prompts[i]), tokens_retrieved=chosen["tokens_retrieved"],
                          questions=1, examples=1)
                rows.append({
                    "qid": q["qid"], "prediction": chosen["prediction"], "gold_nll": chosen["gold_nll"], "gold_tokens": len(golds[i]),
                    "retrieved_doc_ids": chosen["retrieved_doc_ids"], "retrieved_scores": chosen["retrieved_scores"],
                    "shown_doc_ids": chosen["shown_doc_ids"], "tokens_prompt": chosen["tokens_prompt"] + len(prompts[i]),
                    "tokens_retrieved": chosen["tokens_retrieved"], "tokens_generated": chosen["tokens_generated"],
                })
                sweep_rows.append({"task": q.get("task", ""), "gold": str(q["answer"]), "gold_doc_id": q.get("gold_doc_id"),
                                   "p_retrieve": p_retrieve[i], "decision_tokens": len(prompts[i]),
                                   "closed": closed[i], "opened": opened[i]})
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        self._record(sweep_rows)
        return pd.DataFrame(rows)

    def _no_retrieval_path(self, lm: CausalLM, ids: dict[str, int], prompts: list[list[int]], golds: list[list[int]],
                           retrieve: list[bool], meter: CostMeter, scratch: CostMeter | None) -> list[dict[str, Any] | None]:
        from ragops.architectures.prompts import STOP

        out: list[dict[str, Any] | None] = [None] * len(prompts)
        for charged, wanted in ((meter, [not r for r in retrieve]), (scratch, list(retrieve))):
            todo = [i for i, w in enumerate(wanted) if w] if charged is not None else []
            if not todo:
                continue
            with lm.charged_to(charged):
                scores, texts = lm.score_and_generate_ids([prompts[i] + [ids[NO_RETRIEVAL]] for i in todo], [golds[i] for i in todo],
                                                          max_new_tokens=self.ctx.config.eval.max_new_tokens, stop=STOP)
            for i, lp, text in zip(todo, scores, texts, strict=True):
                out[i] = {"prediction": strip_reflection(text), "gold_nll": float(-lp.mean()) if len(lp) else math.nan,
                          "retrieved_doc_ids": [], "retrieved_scores": [], "shown_doc_ids": [], "tokens_prompt": len(prompts[i]) + 1,
                          "tokens_retrieved": 0, "tokens_generated": lm.count_tokens(text)}
        return out

    def _retrieval_path(self, lm: CausalLM, ids: dict[str, int], batch: pd.DataFrame, prompts: list[list[int]], golds: list[list[int]],
                        retrieve: list[bool], meter: CostMeter, scratch: CostMeter | None) -> list[dict[str, Any] | None]:
        """Per question: read each of the top-k passages on its own, generate, critique, keep the best."""
        from ragops.architectures.prompts import STOP

        opt = self.options
        out: list[dict[str, Any] | None] = [None] * len(prompts)
        retriever = self.ctx.retriever(opt.retriever)
        max_new = self.ctx.config.eval.max_new_tokens
        for charged, wanted in ((meter, list(retrieve)), (scratch, [not r for r in retrieve])):
            todo = [i for i, w in enumerate(wanted) if w] if charged is not None else []
            if not todo:
                continue
            found = self.retrieve(retriever, [str(batch.iloc[i]["question"]) for i in todo], opt.k, charged)
            jobs = []  # (question, passage, prefix ids, passage token count)
            for i, passages in zip(todo, found, strict=True):
                for p in passages:
                    passage = lm.encode(_cut(lm, p.text))
                    prefix = prompts[i] + [ids[RETRIEVAL], ids[PARAGRAPH_OPEN], *passage, ids[PARAGRAPH_CLOSE]]
                    jobs.append((i, p, prefix, len(passage)))
            if not jobs:
                for i in todo:
                    out[i] = None
                continue
            with lm.charged_to(charged):
                rel = lm.next_token_logprobs([j[2] for j in jobs], [ids[RELEVANT], ids[IRRELEVANT]])
                rel_tok = [ids[RELEVANT] if a >= b else ids[IRRELEVANT] for a, b in rel]
                heads = [j[2] + [t] for j, t in zip(jobs, rel_tok, strict=True)]
                gold_lp, texts = lm.score_and_generate_ids(heads, [golds[j[0]] for j in jobs], max_new_tokens=max_new, stop=STOP)
                answers = [lm.encode(strip_reflection(t)) for t in texts]
                answer_lp, sup, use = critique_readout(lm, heads, answers, ids)
            candidates: dict[int, list[dict[str, Any]]] = {}
            for n, (i, p, prefix, n_passage) in enumerate(jobs):
                s_rel, s_sup, s_use = relevance_score(*rel[n]), support_score(*sup[n]), utility_score(use[n])
                score = critique_score(answer_lp[n], s_rel, s_sup, s_use, w_rel=opt.w_rel, w_sup=opt.w_sup, w_use=opt.w_use,
                                       use_seqscore=opt.use_seqscore)
                candidates.setdefault(i, []).append({
                    "doc_id": p.doc_id, "retrieval_score": p.score, "score": score, "prediction": strip_reflection(texts[n]),
                    "gold_nll": float(-gold_lp[n].mean()) if len(gold_lp[n]) else math.nan, "n_passage": n_passage,
                    "prefix": len(prefix) - n_passage + 1, "generated": lm.count_tokens(texts[n]),
                    "rel": s_rel, "sup": s_sup, "use": s_use,
                })
            for i in todo:
                cands = candidates.get(i, [])
                if not cands:
                    continue
                best = max(cands, key=lambda c: c["score"])
                out[i] = {
                    "prediction": best["prediction"], "gold_nll": best["gold_nll"],
                    "retrieved_doc_ids": [c["doc_id"] for c in cands], "retrieved_scores": [c["retrieval_score"] for c in cands],
                    "shown_doc_ids": [c["doc_id"] for c in cands], "selected_doc_id": best["doc_id"],
                    "tokens_prompt": sum(c["prefix"] for c in cands), "tokens_retrieved": sum(c["n_passage"] for c in cands),
                    "tokens_generated": sum(c["generated"] for c in cands),
                    "critique": {"rel": best["rel"], "sup": best["sup"], "use": best["use"]},
                }
        return out

    def _record(self, sweep_rows: list[dict[str, Any]]) -> None:
        """Retrieval rate (metric + info) and the δ sweep for this task, from the cached decisions."""
        from ragops.evaluation.metrics import exact_match, token_f1

        if not sweep_rows:
            return
        task = str(sweep_rows[0]["task"] or "qa")
        opt = self.options
        rate = float(np.mean([r["p_retrieve"] > opt.threshold and r["opened"] is not None for r in sweep_rows]))
        self.info.setdefault("retrieval_rate", {})[task] = rate
        self.info.setdefault("p_retrieve", {})[task] = {
            "mean": float(np.mean([r["p_retrieve"] for r in sweep_rows])),
            "quantiles": [float(x) for x in np.quantile([r["p_retrieve"] for r in sweep_rows], [0.1, 0.5, 0.9])],
        }
        picked = [r["opened"] for r in sweep_rows if r["p_retrieve"] > opt.threshold and r["opened"]]
        with_gold = [(r["opened"], r["gold_doc_id"]) for r in sweep_rows if r["p_retrieve"] > opt.threshold and r["opened"]]
        if with_gold:
            self.info.setdefault("selected_gold_rate", {})[task] = float(np.mean([o["selected_doc_id"] == g for o, g in with_gold]))
        if picked:
            self.info.setdefault("critique_mean", {})[task] = {k: float(np.mean([o["critique"][k] for o in picked])) for k in ("rel", "sup", "use")}
        if not opt.sweep_deltas:
            return
        table = []
        for delta in sorted(set(opt.sweep_deltas) | {opt.threshold}):
            f1, em, nll, tokens, retrieved = [], [], [], [], []
            for r in sweep_rows:
                use_open = r["p_retrieve"] > delta and r["opened"] is not None
                path = r["opened"] if use_open else r["closed"]
                f1.append(token_f1(path["prediction"], r["gold"]))
                em.append(exact_match(path["prediction"], r["gold"]))
                nll.append(path["gold_nll"])
                tokens.append(r["decision_tokens"] + path["tokens_prompt"] + path["tokens_retrieved"] + path["tokens_generated"])
                retrieved.append(use_open)
            table.append({"task": task, "delta": float(delta), "retrieval_rate": float(np.mean(retrieved)), "f1": float(np.mean(f1)),
                          "em": float(np.mean(em)), "gold_nll": float(np.nanmean(nll)), "lm_tokens_per_question": float(np.mean(tokens))})
        tables = self.info.setdefault("tables", {})
        tables["delta_sweep"] = [row for row in tables.get("delta_sweep", []) if row["task"] != task] + table

    @classmethod
    def write_eval_files(cls, info: dict[str, Any], directory: Path) -> list[Path]:
        """delta_sweep.csv and delta_sweep.png (quality and LM tokens vs retrieval rate, per task)."""
        import pandas as pd

        rows = (info.get("tables") or {}).get("delta_sweep") or []
        if not rows:
            return []
        frame = pd.DataFrame(rows)
        csv = directory / "delta_sweep.csv"
        frame.to_csv(csv, index=False)
        return [csv, plot_delta_sweep(frame, directory / "delta_sweep.png", cls.name)]


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def critique_readout(lm: CausalLM, heads: list[list[int]], answers: list[list[int]], ids: dict[str, int]
                     ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """For each (head, answer): the answer tokens' log-probs after the head, the IsSup tokens' log-probs
    after the answer, and the IsUse tokens' log-probs after the more likely IsSup token.

    One scoring call: every head is read once (its KV cache shared, `CausalLM.score_ids`) and the 15
    continuations answer + [IsSup_j] + [Utility_i] are scored on top, which yields all three read-outs
    (3 separate forwards of the head otherwise)."""
    sup_ids, use_ids = [ids[t] for t in SUPPORT_TOKENS], [ids[t] for t in UTILITY]
    contexts, conts = [], []
    for head, answer in zip(heads, answers, strict=True):
        for s in sup_ids:
            for u in use_ids:
                contexts.append(head)
                conts.append([*answer, s, u])
    scored = lm.score_ids(contexts, conts)
    per = len(sup_ids) * len(use_ids)
    answer_lp, sup, use = [], np.zeros((len(heads), len(sup_ids))), np.zeros((len(heads), len(use_ids)))
    for n, answer in enumerate(answers):
        block = scored[n * per : (n + 1) * per]
        m = len(answer)
        answer_lp.append(block[0][:m])
        sup[n] = [block[j * len(use_ids)][m] for j in range(len(sup_ids))]
        best = int(np.argmax(sup[n]))
        use[n] = [block[best * len(use_ids) + i][m + 1] for i in range(len(use_ids))]
    return answer_lp, sup, use


def strip_reflection(text: str) -> str:
    """The answer without reflection tokens: decoding drops them as special ids already; this also
    removes any spelled out in plain characters, then `clean_prediction`."""
    from ragops.architectures.prompts import clean_prediction

    stripped = text
    for token in REFLECTION_TOKENS:
        stripped = stripped.replace(token, " ")
    return clean_prediction(" ".join(stripped.split()) if stripped != text else stripped)


def reflection_ids(lm: CausalLM) -> dict[str, int]:
    vocab = lm.tokenizer.get_vocab()
    missing = [t for t in REFLECTION_TOKENS if t not in vocab]
    if missing:
        from ragops.errors import RagopsError

        raise RagopsError(f"{lm.name}: the tokenizer lacks SELF-RAG's reflection tokens ({', '.join(missing[:3])}); train self_rag first")
    return {t: int(vocab[t]) for t in REFLECTION_TOKENS}


def critic_prompt(lm: CausalLM, item: dict[str, Any]) -> list[int]:
    """The critic's prompt ids for an item (its user message in the chat template when there is one)."""
    text = CRITIC_PROMPTS[item["aspect"]].format(question=item["question"], answer=item.get("answer", ""), passage=item.get("passage", ""))
    chat = lm.chat_formatter
    return lm.encode(chat(text) if chat is not None else text + "\nLabel:")


def critic_predict(critic: CausalLM, ids: dict[str, int], items: list[dict[str, Any]]) -> list[str]:
    """The critic's label per item: the most likely of its aspect's label tokens."""
    out: list[str | None] = [None] * len(items)
    for aspect, labels in CRITIC_LABELS.items():
        todo = [i for i, it in enumerate(items) if it["aspect"] == aspect]
        if not todo:
            continue
        logp = critic.next_token_logprobs([critic_prompt(critic, items[i]) for i in todo], [ids[t] for t in labels])
        for i, row in zip(todo, logp, strict=True):
            out[i] = labels[int(np.argmax(row))]
    return out  # type: ignore[return-value]


def critic_agreement(items: list[dict[str, Any]], predicted: list[str]) -> dict[str, Any]:
    """Per aspect: accuracy of the critic on held-out items and the majority-label baseline."""
    out: dict[str, Any] = {}
    for aspect in CRITIC_PROMPTS:
        pairs = [(it["label"], p) for it, p in zip(items, predicted, strict=True) if it["aspect"] == aspect]
        if not pairs:
            continue
        gold = [g for g, _ in pairs]
        majority = max(set(gold), key=gold.count)
        out[aspect] = {"n": len(pairs), "accuracy": float(np.mean([g == p for g, p in pairs])),
                       "majority_baseline": float(np.mean([g == majority for g in gold]))}
    if items:
        out["overall"] = float(np.mean([it["label"] == p for it, p in zip(items, predicted, strict=True)]))
    return out


def plot_delta_sweep(frame: pd.DataFrame, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for task, part in frame.groupby("task"):
        part = part.sort_values("retrieval_rate")
        left.plot(part["retrieval_rate"], part["f1"], marker="o", label=str(task))
        right.plot(part["retrieval_rate"], part["lm_tokens_per_question"], marker="o", label=str(task))
    left.set_xlabel("retrieval rate")
    left.set_ylabel("token F1")
    right.set_xlabel("retrieval rate")
    right.set_ylabel("LM tokens per question")
    left.legend()
    fig.suptitle(f"{title}: δ sweep")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def _split_questions(pool: pd.DataFrame, critic_per_task: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The first `critic_per_task` sampled questions of each task label the critic; the rest train the generator."""
    critic_idx = pool.groupby("task", sort=False).head(critic_per_task).index if critic_per_task else pool.index[:0]
    return pool.loc[critic_idx].reset_index(drop=True), pool.drop(index=critic_idx).reset_index(drop=True)


def _gold_passage(table: Any, gold_doc_id: Any, answer: str) -> str | None:
    """The gold article's chunk holding most of the answer (None when the article is not indexed)."""
    if gold_doc_id is None or table is None:
        return None
    rows = table.doc_rows(str(gold_doc_id))
    if not len(rows):
        return None
    texts = [table.texts[int(r)] for r in rows]
    return max(texts, key=lambda t: answer_recall(answer, t))


def _cut(lm: CausalLM, text: str, limit: int = PASSAGE_TOKENS) -> str:
    ids = lm.encode(text)
    return text if len(ids) <= limit else lm.decode(ids[:limit])


def _qa_prompt(question: str, passages: Sequence[str], chat: Any) -> str:
    from ragops.architectures.prompts import qa_prompt

    return qa_prompt(question, passages, chat)


def _answer(answer: str, chat: Any) -> str:
    from ragops.architectures.prompts import answer_continuation

    return answer_continuation(answer, chat=chat is not None)


def _terminator(lm: CausalLM) -> list[int]:
    from ragops.architectures.atlas import reader_terminator

    return reader_terminator(lm)


def _counts(values: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out
