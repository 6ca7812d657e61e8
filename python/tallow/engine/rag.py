"""RAG answers with their sources: generative or, without a generator,
extractive (the retrieved chunks' sentences closest to the question).

Generative: the retrieved chunks are fitted into the generator's context
window best first (the first that does not fit trimmed at a token boundary,
the rest dropped) and numbered. A model with a chat template (SmolLM2,
Llama, Qwen2: instruct models) gets them as a system message, the question
as the user's message, rendered with its own template; the reply ends at
the template's end of turn. A model without one (a base GPT-2) continues a
plain prompt that ends in ``Answer:``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .documents import EngineError
from .retrieval import SearchResult

PROMPT_HEAD = "Answer the question using the context.\n\nContext:\n"
PROMPT_TAIL = "\nQuestion: {question}\nAnswer:"
# The system message of a chat model's RAG prompt; the numbered sources follow it.
CHAT_SYSTEM = ("Answer the user's question using only the numbered sources below. If they do not contain "
               "the answer, say that you do not know.\n\nSources:\n")


@dataclass
class RagAnswer:
    answer: str
    sources: list[dict]
    prompt: str
    prompt_tokens: int
    finish_reason: str | None = None
    mode: str = "generative"  # or "extractive" (no generator: sentences of the sources)

    def to_dict(self) -> dict:
        return asdict(self)


def check_max_new_tokens(max_new_tokens: Any, gen: Any = None) -> None:
    """``max_new_tokens`` must be an int >= 1 and, given the generator, leave
    room for a prompt in its context window."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise EngineError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if gen is not None and max_new_tokens >= gen.config.n_positions:
        raise EngineError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the generator's "
                          f"context window of {gen.config.n_positions}")


def _fit_chunks(hf, results: Sequence[SearchResult], budget: int) -> tuple[list[str], list[dict]]:
    """Lines ``[i] <chunk text>\n`` of at most ``budget`` tokens together (``hf``:
    a tokenizers.Tokenizer): best first; the first chunk that does not fit is
    trimmed at a token boundary to the tokens left (kept if at least one token
    is left) and every chunk after it is dropped. Returns (lines, sources)."""

    def ntok(s: str) -> int:
        return len(hf.encode(s, add_special_tokens=False).ids)

    lines: list[str] = []
    sources: list[dict] = []
    for r in results:
        line = f"[{len(lines) + 1}] {r.text}\n"
        ids = hf.encode(line, add_special_tokens=False).ids
        used = ntok("".join(lines))
        left = budget - used
        trimmed = False
        if len(ids) > left:
            trimmed = True
            keep = left - 1  # room for the newline that ends the line
            text = ""
            while keep > 0:
                text = hf.decode(ids[:keep]).rstrip("\ufffd\n")
                if ntok("".join(lines) + text + "\n") <= budget:
                    break
                keep -= 1
            if keep <= 0 or not text.strip() or text.strip() == f"[{len(lines) + 1}]":
                break
            line = text + "\n"
        lines.append(line)
        body = line[len(f"[{len(lines)}] "):].rstrip("\n")
        sources.append({"doc_id": r.doc_id, "title": r.title, "chunk_id": r.chunk_id, "text": body,
                        "score": r.score, "trimmed": trimmed})
        if trimmed:
            break
    return lines, sources


def build_prompt(gen, question: str, results: Sequence[SearchResult], max_new_tokens: int, *,
                 head: str = PROMPT_HEAD, tail_template: str = PROMPT_TAIL) -> tuple[str, list[dict], int]:
    """The RAG prompt within GPT-2's context window.

    Template: ``head`` (``PROMPT_HEAD``), then one line ``[i] <chunk text>`` per
    context chunk, then ``tail_template`` (``PROMPT_TAIL``) with the question. Budget for the
    chunks = n_positions − max_new_tokens − tokens(template + question).
    Chunks are added best first while they fit; the first one that does
    not fit is trimmed at a token boundary to the tokens left (kept if at
    least one token is left), and every chunk after it is dropped.
    Returns (prompt, sources used, prompt tokens)."""
    hf = gen.tokenizer._tok
    n_ctx = gen.config.n_positions

    def ntok(s: str) -> int:
        return len(hf.encode(s, add_special_tokens=False).ids)

    tail = tail_template.format(question=question)
    budget = n_ctx - max_new_tokens - ntok(head + tail)
    if budget < 0:
        raise EngineError(f"the question and the prompt template need {n_ctx - max_new_tokens - budget} tokens; "
                          f"GPT-2's context window is {n_ctx} with max_new_tokens={max_new_tokens}: "
                          "shorten the question or lower max_new_tokens")
    lines, sources = _fit_chunks(hf, results, budget)
    prompt = head + "".join(lines) + tail
    n = ntok(prompt)
    # BPE merges across the joins can change counts by a token or two; the
    # generator checks the hard limit, so make sure here.
    while n + max_new_tokens > n_ctx and lines:
        lines.pop()
        sources.pop()
        prompt = head + "".join(lines) + tail
        n = ntok(prompt)
    return prompt, sources, n


def answer(gen: Any, prompt: str, sources: list[dict], prompt_tokens: int, max_new_tokens: int,
           **sampling) -> RagAnswer:
    """Generates from the prompt (greedy unless ``temperature`` etc. are given)."""
    sampling.setdefault("temperature", 0.0)
    out = gen.generate([prompt], max_new_tokens=max_new_tokens, **sampling)[0]
    return RagAnswer(out.text.strip(), sources, prompt, prompt_tokens, out.finish_reason)


def build_chat_prompt(gen, question: str, results: Sequence[SearchResult], max_new_tokens: int, *,
                      system: str = CHAT_SYSTEM) -> tuple[str, list[int], list[dict]]:
    """The RAG prompt of a model with a chat template: a system message
    (``system`` and the numbered sources, fitted as ``build_prompt`` fits
    them) and the question as the user's message, rendered with the model's
    template. Returns (prompt text, its token ids, sources used)."""
    from .chat import chat_template_of, encode_chat_prompt, render_chat, special_tokens_of

    template, special = chat_template_of(gen), special_tokens_of(gen)
    n_ctx = gen.config.n_positions

    def render(lines: list[str]) -> str:
        messages = [{"role": "system", "content": system + "".join(lines).rstrip("\n")},
                    {"role": "user", "content": question}]
        return render_chat(template, messages, special_tokens=special)

    budget = n_ctx - max_new_tokens - len(encode_chat_prompt(gen, render([])))
    if budget < 0:
        raise EngineError(f"the question and the prompt template need {n_ctx - max_new_tokens - budget} tokens; "
                          f"the generator's context window is {n_ctx} with max_new_tokens={max_new_tokens}: "
                          "shorten the question or lower max_new_tokens")
    lines, sources = _fit_chunks(gen.tokenizer._tok, results, budget)
    prompt = render(lines)
    ids = encode_chat_prompt(gen, prompt)
    while len(ids) + max_new_tokens > n_ctx and lines:  # merges across the joins: a token or two more
        lines.pop()
        sources.pop()
        prompt = render(lines)
        ids = encode_chat_prompt(gen, prompt)
    return prompt, ids, sources


def chat_answer(gen: Any, prompt: str, ids: list[int], sources: list[dict], max_new_tokens: int,
                **sampling) -> RagAnswer:
    """Generates the reply to ``build_chat_prompt``'s prompt (greedy unless
    ``temperature`` etc. are given); it ends at the model's eos or its
    template's end of turn (the scheduler stops the row there)."""
    from ..models.generation import SamplingParams
    from .chat import chat_template_of, stop_token_ids

    sampling.setdefault("temperature", 0.0)
    sampling["stop_token_ids"] = tuple(sorted(stop_token_ids(gen, chat_template_of(gen))))
    if hasattr(gen, "generate_ids"):  # a model in this process: its own scheduler
        text, reason = "", None
        for event in gen.generate_ids([ids], SamplingParams(max_new_tokens=max_new_tokens, **sampling)):
            text += event.text
            reason = event.finish_reason or reason
    else:  # a served model (serve.workers.ServedModel): the server's scheduler, which takes token ids
        out = gen.generate([ids], max_new_tokens=max_new_tokens, **sampling)[0]
        text, reason = out.text, out.finish_reason
    return RagAnswer(text.strip(), sources, prompt, len(ids), reason)


# -- extractive answers (no generator) ----------------------------------------------------

EXTRACTIVE_SENTENCES = 3
# A sentence ends at . ! or ? followed by white space, or at a line break.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if len(s.strip()) > 1]


def extractive_answer(embed: Callable[[list[str]], np.ndarray], question: str,
                      results: Sequence[SearchResult], max_sentences: int = EXTRACTIVE_SENTENCES) -> RagAnswer:
    """The answer without a generator: the ``max_sentences`` sentences of the
    retrieved chunks whose embeddings are closest (cosine) to the question's,
    in the order they appear in the results (best chunk first, then position
    in the chunk), joined with spaces. Sources: the chunks that gave a
    sentence, best first, each with the sentences taken from it."""
    found = [(rank, pos, s) for rank, r in enumerate(results) for pos, s in enumerate(split_sentences(r.text))]
    if not found:
        return RagAnswer("", [], "", 0, None, mode="extractive")
    vecs = np.asarray(embed([question] + [s for _, _, s in found]), dtype=np.float32)
    vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    scores = vecs[1:] @ vecs[0]
    best = sorted(np.argsort(-scores, kind="stable")[:max_sentences].tolist(), key=lambda i: found[i][:2])
    taken: dict[int, list[str]] = {}
    for i in best:
        taken.setdefault(found[i][0], []).append(found[i][2])
    sources = [{"doc_id": results[rank].doc_id, "title": results[rank].title, "chunk_id": results[rank].chunk_id,
                "text": results[rank].text, "score": results[rank].score, "trimmed": False,
                "sentences": taken[rank]} for rank in sorted(taken)]
    return RagAnswer(" ".join(found[i][2] for i in best), sources, "", 0, None, mode="extractive")
