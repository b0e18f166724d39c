"""What every architecture shows its LM: the one prompt format and the one document text, so quality
differences come from the method.

QA, for an LM whose tokenizer has a chat template (SmolLM2-Instruct): one user turn holding the
retrieved passages (each followed by a blank line), the instruction and the question, then the
assistant header; the gold answer is scored as the assistant's reply. For a plain LM (no chat
template): passages, then `Question: ...\\nAnswer:`, the gold answer scored as `" " + answer`.
Passages are given best first and shown in reverse rank order, so the best one sits right before
the question: with k=2 BM25 passages on 24 questions, SmolLM2's gold-answer NLL was 2.66/1.25
(describe/identify) best-last vs 2.75/1.54 best-first (closed book 2.87/3.20).
On 40 questions built from real corpus entries, SmolLM2-135M-Instruct gave the gold answer a lower
NLL in the chat form than in the plain `Question:/Answer:` or `Q:/A:` forms, closed-book and with
the gold passage (identify: 0.91 vs 1.52 nats/token with the passage), and comparable token F1.

Language modelling: the retrieved passage (`format_passage`) is prepended to the token window.
Generation stops at the first newline (after any leading whitespace) or at EOS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

INSTRUCTION = "Answer the question in a few words."
QUESTION_TEMPLATE = "Question: {question}\nAnswer:"  # plain-LM form
STOP = ("\n",)

ChatFormatter = Callable[[str], str]  # user message -> full prompt ending with the assistant header


def format_passage(text: str) -> str:
    """One retrieved passage as shown to the LM (`{title}\\n{text}` of a chunk, then a blank line)."""
    return f"{text.strip()}\n\n"


def passages_block(passages: Sequence[str]) -> str:
    """Passages given best first, laid out best last (nearest the question)."""
    return "".join(format_passage(p) for p in reversed(list(passages)))


def qa_prompt(question: str, passages: Sequence[str] = (), chat: ChatFormatter | None = None) -> str:
    """The QA prompt: passages (given best first, shown best last) then the question; chat form when `chat` is given."""
    question = question.strip()
    if chat is None:
        return passages_block(passages) + QUESTION_TEMPLATE.format(question=question)
    return chat(passages_block(passages) + f"{INSTRUCTION}\nQuestion: {question}")


def answer_continuation(answer: str, chat: bool = False) -> str:
    """The gold answer as the continuation whose NLL is measured after `qa_prompt(...)`."""
    return answer.strip() if chat else " " + answer.strip()


def clean_prediction(text: str) -> str:
    return text.strip()


def document_text(title: str, text: str) -> str:
    """The text of a document as indexed and as scored in the `lm` task: `{title}\\n{text}`, the same
    form as indexed chunks (`ragops.retrieval.embed.chunk_embedding_text`)."""
    return f"{(title or '').strip()}\n{(text or '').strip()}" if title else (text or "").strip()
