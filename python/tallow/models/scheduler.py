"""Iteration-level (continuous) batching for decoder LMs (Orca, Yu et al. 2022;
vLLM's scheduler without paging): GPT-2 and the Llama family, through the
small model interface :class:`GenerativeModel` names.

A :class:`GenerationScheduler` owns a KV pool and the rows running in it.
Every :meth:`~GenerationScheduler.step` is one iteration: waiting requests
whose rows fit join (their prompts prefilled together, at most
``prefill_tokens_per_step`` padded tokens unless a single request is larger,
their first token sampled from the prefill), every row already running
decodes one token at its own position, and rows that finish leave at once.
Each row samples with its own :class:`SamplingParams` and its own
``torch.Generator`` (seeded with ``seed``, or else from torch's default
generator when the row is admitted).

The prefill is right-padded, not left-padded as the static batch was: row
b's tokens are then at positions 0..P_b-1 both in the prefill batch and in
its slot, so the prefill writes the keys and values straight into the pool
(no temporary cache, no copy), causal attention alone keeps the padding out
of every real token's context, and a row's prefill numerics do not depend
on the other prompts' lengths. Positions a row has not written are zeros
(finite: attention reads them masked).

KV pool. Per layer a key and a value tensor ``[slots, kv_heads, len, head_dim]``
of the model's ``kv_cache_dtype`` (the layout ``model.new_cache`` gives); running row b lives in slot b (rows are
kept compacted in slots 0..B-1: a leaving row's slot gets the last row, so a
decode step's attention reads ``pool[:B, :, :keys]``, a view), its tokens at
positions 0..L-1. The pool is allocated on demand and reallocated (slots
rounded up to a power of two, length to a multiple of 64, both only as far as
the budget allows) when an admitted request needs more rows or a longer
length; it is freed when no row runs.

Memory accounting. A row reserves ``prompt + max_new_tokens`` positions at
admission. The pool's physical size is ``slots x len x kv_bytes_per_token``
(a rectangle: every slot is as long as the longest reservation), and a
request is admitted only when the rectangle for the running rows plus its
own fits ``kv_budget_bytes``, counting the transient of a reallocation
(one layer's old and new tensor coexist while it is copied; the pool is
reallocated layer by layer). So the bytes the pool holds never exceed the
budget. A request that cannot fit now waits; the queue is FIFO and a
request that does not fit blocks those behind it (no starvation of big
requests). One that could not fit even alone raises :class:`KVPoolFull` at
:meth:`~GenerationScheduler.add`. Not counted: the per-step activations and
the per-row "seen tokens" mask ([slots, vocab] bool, for the repetition
penalty).
"""

from __future__ import annotations

import contextlib
import operator
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Hashable, Optional, Protocol, Sequence

import numpy as np
import torch

from .generation import SamplingParams, find_stop, holdback, next_tokens
from .layers import tiled_gemm


class GenerativeModel(Protocol):
    """What the scheduler uses of a model (GPT2LMHeadModel and LlamaForCausalLM
    implement it; a new architecture needs only these):

    - ``config.n_positions`` (context limit), ``config.vocab_size``,
      ``config.eos_token_id``; optionally ``config.eos_token_ids`` (every id
      that ends a row with "eos", e.g. Llama 3's <|eot_id|> too);
    - ``tokenizer``: ``decode(ids) -> str`` (special tokens skipped), or None;
    - ``new_cache(batch, max_len)`` -> (keys, values), each
      ``[layers, batch, kv_heads, max_len, head_dim]`` of the KV dtype: the
      pool copies this layout (called once with (1, 1));
    - ``kv_bytes_per_token()``: bytes of one token of one row (keys and values, all layers);
    - ``prefill_rows(prompts, cache)`` -> float32 logits [n, vocab] after each
      prompt's last token; ``cache`` = (keys, values), per layer
      ``[n, kv_heads, len, head_dim]`` views of the pool, prompts written at 0..P-1;
    - ``decode_rows(tokens [B], positions [B], cache)`` -> float32 logits [B, vocab]:
      token b fed at positions[b], its key/value written there.
    """

    config: object
    tokenizer: object

    def new_cache(self, batch: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def kv_bytes_per_token(self) -> int: ...

    def prefill_rows(self, prompts: Sequence[Sequence[int]], cache) -> torch.Tensor: ...

    def decode_rows(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor: ...

# The default budget: max_rows rows at the model's full context, capped at 2 GiB
# (GPT-2-124M: 32 rows x 1024 tokens need 1.2 GB in bf16; in fp32, 2.4 GB, so
# the cap allows 28 rows at full context, or 32 rows of up to 910 tokens).
_DEFAULT_BUDGET_CAP = 2 << 30
_LEN_ROUND = 64


@dataclass
class RowEvent:
    """One row's new token (or its end) in one step."""

    request: Hashable          # the id given to add()/submit()
    row: int                   # row index within that request
    token_id: int              # -1 on an error event (and on a max_new_tokens=0 row's "length" event)
    text: str                  # text delta to stream (incomplete UTF-8 and partial stop strings held back)
    finish_reason: Optional[str]  # "eos" | "stop" | "length" | "error" | None
    error: Optional[str] = None   # message when finish_reason == "error"


class KVPoolFull(ValueError):
    """A request that can never fit the scheduler's rows or KV budget."""


@dataclass
class _Row:
    request: Hashable
    index: int
    prompt: list[int]
    params: SamplingParams
    generator: Optional[torch.Generator]
    reserve: int                   # prompt + max_new_tokens positions
    length: int = 0                # tokens in the slot's cache
    pending: int = -1              # the sampled token to feed at the next decode
    out: list[int] = field(default_factory=list)
    emitted: str = ""


@dataclass
class _Request:
    id: Hashable
    rows: list[_Row]
    width: int                     # the longest prompt (prefill columns)
    reserve: int                   # the longest row reservation


def _zeros(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled pool tensor made without a torch op: numpy's calloc gets
    zeroed pages from the OS, where torch.zeros fills them on torch's OpenMP
    team, whose threads then busy-wait for milliseconds, competing with the
    native decode steps that follow (tests/test_thread_pools.py)."""
    if dtype == torch.bfloat16:  # numpy has no bfloat16: the same bits as int16
        return torch.from_numpy(np.zeros(shape, dtype=np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.zeros(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype))


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src through numpy (one thread, no torch parallel region; see _zeros)."""
    if dst.dtype == torch.bfloat16:
        dst, src = dst.view(torch.int16), src.view(torch.int16)
    dst.numpy()[...] = src.numpy()


class GenerationScheduler:
    """Iteration-level batching over one model (a :class:`GenerativeModel`; not
    thread-safe: see :class:`GenerationLoop` for a thread driving one)."""

    def __init__(self, model: GenerativeModel, *, max_rows: int = 32, kv_budget_bytes: Optional[int] = None,
                 prefill_tokens_per_step: int = 2048, batch_invariant: bool = False):
        """``batch_invariant``: also run one-row forwards (a lone row's decode,
        a lone prompt's LM head) through the tiled fp32 GEMM, so that an fp32
        model's rows are bit-identical alone and in any batch (without it they
        differ by ~1e-6 relative when a row runs alone; INT8 models are
        invariant either way). Costs ~3x in the linears of a batch-1 step."""
        if not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be an int >= 1, got {max_rows!r}")
        if not isinstance(prefill_tokens_per_step, int) or prefill_tokens_per_step < 1:
            raise ValueError(f"prefill_tokens_per_step must be an int >= 1, got {prefill_tokens_per_step!r}")
        self.model = model
        self.max_rows = max_rows
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.batch_invariant = bool(batch_invariant)
        self._bpt = model.kv_bytes_per_token()
        if kv_budget_bytes is None:
            kv_budget_bytes = min(max_rows * model.config.n_positions * self._bpt, _DEFAULT_BUDGET_CAP)
        if not isinstance(kv_budget_bytes, int) or kv_budget_bytes < 1:
            raise ValueError(f"kv_budget_bytes must be an int >= 1, got {kv_budget_bytes!r}")
        self.kv_budget_bytes = kv_budget_bytes
        layout = model.new_cache(1, 1)[0]  # [layers, 1, kv_heads, 1, head_dim]
        self._dtype = layout.dtype
        self._layers = layout.shape[0]
        self._head = (layout.shape[2], layout.shape[4])
        c = model.config
        self._eos = frozenset(getattr(c, "eos_token_ids", None) or (c.eos_token_id,))
        self._keys: list[torch.Tensor] = []    # per layer [slots, heads, len, d]
        self._values: list[torch.Tensor] = []
        self._slots = 0
        self._len = 0
        self._seen = torch.zeros((0, c.vocab_size), dtype=torch.bool)
        self._rows: list[_Row] = []           # running rows; index = slot
        self._waiting: deque[_Request] = deque()
        self._ids: set = set()                # requests waiting or running
        self._finished: list[RowEvent] = []   # events produced outside step (max_new_tokens=0 rows)

    # -- requests -----------------------------------------------------------------------------

    def add(self, request: Hashable, prompt_ids: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> None:
        """Queues a request: one row per prompt, row i sampled with params[i].
        Raises ValueError (naming what is wrong) or KVPoolFull, synchronously."""
        self._enqueue(self.validate(request, prompt_ids, params))

    def validate(self, request: Hashable, prompt_ids: Sequence[Sequence[int]],
                 params: Sequence[SamplingParams]) -> _Request:
        """add()'s checks without queueing (GenerationLoop runs them in the caller's thread)."""
        if isinstance(params, SamplingParams):
            raise TypeError("params must be a sequence of SamplingParams, one per prompt")
        prompts = [list(p) for p in prompt_ids]
        params = list(params)
        if not prompts:
            raise ValueError("a request needs at least one prompt")
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams (one per prompt)")
        c = self.model.config
        rows = []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            if not isinstance(sp, SamplingParams):
                raise TypeError(f"params[{i}] must be a SamplingParams, got {type(sp).__name__}")
            sp = replace(sp)  # the row's own copy: validate() normalises stop
            try:
                sp.validate()
            except ValueError as e:
                raise ValueError(f"row {i}: {e}") from None
            if not p:
                raise ValueError(f"prompt {i} is empty")
            try:
                p = [operator.index(t) for t in p]
            except TypeError:
                raise TypeError(f"prompt {i} must hold int token ids") from None
            if min(p) < 0 or max(p) >= c.vocab_size:
                raise ValueError(f"prompt {i} has token ids outside [0, {c.vocab_size})")
            total = len(p) + sp.max_new_tokens
            if total > c.n_positions:
                raise ValueError(f"prompt {i}: {total} positions exceed the model's context limit of {c.n_positions} "
                                 f"(prompt tokens {len(p)} + max_new_tokens {sp.max_new_tokens})")
            rows.append(_Row(request, i, p, sp, None, total))
        live = [r for r in rows if r.params.max_new_tokens > 0]
        req = _Request(request, rows, max((len(r.prompt) for r in live), default=0),
                       max((r.reserve for r in live), default=0))
        if live:
            need = len(live) * req.reserve * self._bpt
            if len(live) > self.max_rows or need > self.kv_budget_bytes:
                raise KVPoolFull(
                    f"request {request!r} needs {len(live)} rows x {req.reserve} tokens (prompt + max_new_tokens) = "
                    f"{need} bytes of KV cache; this scheduler has max_rows={self.max_rows} and "
                    f"kv_budget_bytes={self.kv_budget_bytes} ({self.kv_budget_bytes // self._bpt} row-tokens at "
                    f"{self._bpt} bytes each)")
        return req

    def _enqueue(self, req: _Request) -> None:
        if req.id in self._ids:
            raise ValueError(f"request {req.id!r} is already waiting or running")
        for r in req.rows:
            if r.params.max_new_tokens == 0:  # nothing to generate: it ends now
                self._finished.append(RowEvent(req.id, r.index, -1, "", "length"))
        req.rows = [r for r in req.rows if r.params.max_new_tokens > 0]
        if req.rows:
            self._ids.add(req.id)
            self._waiting.append(req)

    def cancel(self, request: Hashable) -> None:
        """Drops a waiting request, or frees a running request's rows now (no
        events are emitted for them). Unknown ids are ignored."""
        if request not in self._ids:
            return
        self._ids.discard(request)
        self._waiting = deque(r for r in self._waiting if r.id != request)
        self._remove([s for s, r in enumerate(self._rows) if r.request == request])

    @property
    def idle(self) -> bool:
        return not self._rows and not self._waiting and not self._finished

    def stats(self) -> dict:
        return {
            "running_rows": len(self._rows),
            "running_requests": len({r.request for r in self._rows}),
            "waiting_requests": len(self._waiting),
            "waiting_rows": sum(len(r.rows) for r in self._waiting),
            "max_rows": self.max_rows,
            "kv_bytes_in_use": self._pool_bytes(self._slots, self._len),
            "kv_bytes_reserved": sum(r.reserve for r in self._rows) * self._bpt,
            "kv_budget_bytes": self.kv_budget_bytes,
            "kv_pool_shape": [len(self._keys), self._slots, *self._head[:1], self._len, self._head[1]],
        }

    def fail_all(self, message: str) -> list[RowEvent]:
        """Ends every running and waiting row with an "error" event (the
        GenerationLoop's last resort when step() itself raised)."""
        events = [RowEvent(r.request, r.index, -1, "", "error", message) for r in self._rows]
        events += [RowEvent(q.id, r.index, -1, "", "error", message) for q in self._waiting for r in q.rows]
        self._rows, self._waiting, self._ids = [], deque(), set()
        self._free_pool()
        return events

    # -- one iteration -----------------------------------------------------------------------

    def step(self) -> list[RowEvent]:
        """Admits what fits (prefill), decodes every row that was running, samples
        one token per row, returns this step's events; finished rows leave."""
        with tiled_gemm() if self.batch_invariant else contextlib.nullcontext():
            return self._step()

    def _step(self) -> list[RowEvent]:
        events, self._finished = self._finished, []
        old = len(self._rows)
        admitted = self._admit()  # their rows take slots old..
        slots: list[int] = []
        parts: list[torch.Tensor] = []
        finished: set[int] = set()
        if old:
            rows = self._rows[:old]
            try:
                tokens = torch.tensor([r.pending for r in rows], dtype=torch.long)
                positions = torch.tensor([r.length for r in rows], dtype=torch.long)
                parts.append(self.model.decode_rows(tokens, positions, self._views(0, old)))
                slots += range(old)
                for r in rows:
                    r.length += 1
            except Exception as e:  # not attributable to one row: every decoding row fails
                events += self._error_rows(range(old), e)
                finished.update(range(old))
        if admitted:
            logits, ok = self._prefill(admitted, old, events, finished)
            if ok:
                parts.append(logits)
                slots += ok
        if parts:
            events += self._sample(slots, torch.cat(parts) if len(parts) > 1 else parts[0], finished)
        self._remove(finished)
        return events

    def _prefill(self, admitted: list[_Request], start: int, events: list[RowEvent],
                 finished: set[int]) -> tuple[Optional[torch.Tensor], list[int]]:
        """Prefills the admitted requests' rows (slots start..) all together; if
        that raises, request by request, failing only those that raise again.
        Returns their logits and the slots they belong to."""
        end = len(self._rows)
        for r in self._rows[start:]:
            r.length = len(r.prompt)
        try:
            logits = self.model.prefill_rows([r.prompt for r in self._rows[start:]], self._views(start, end))
            return logits, list(range(start, end))
        except Exception:
            pass
        parts, ok, s = [], [], start
        for q in admitted:
            k = len(q.rows)
            try:
                parts.append(self.model.prefill_rows([r.prompt for r in q.rows], self._views(s, s + k)))
                ok += range(s, s + k)
            except Exception as e:
                events += self._error_rows(range(s, s + k), e)
                finished.update(range(s, s + k))
            s += k
        return (torch.cat(parts) if parts else None), ok

    def _sample(self, slots: list[int], logits: torch.Tensor, finished: set[int]) -> list[RowEvent]:
        rows = [self._rows[s] for s in slots]
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        idx = torch.tensor(slots, dtype=torch.long)
        seen = self._seen[slots[0]:slots[0] + len(slots)] if contiguous else self._seen[idx]
        params, gens = [r.params for r in rows], [r.generator for r in rows]
        try:
            toks: list = next_tokens(logits, params, seen, gens).tolist()
        except Exception:  # find the rows that fail on their own
            toks = []
            for j in range(len(rows)):
                try:
                    toks.append(int(next_tokens(logits[j:j + 1], params[j:j + 1], seen[j:j + 1], gens[j:j + 1])))
                except Exception as e:
                    toks.append(e)
        good = [(s, t) for s, t in zip(slots, toks) if not isinstance(t, Exception)]
        if good:
            self._seen[torch.tensor([s for s, _ in good]), torch.tensor([t for _, t in good])] = True
        events: list[RowEvent] = []
        bad: dict[Hashable, Exception] = {}
        for s, r, t in zip(slots, rows, toks):
            if r.request in bad:
                continue
            if isinstance(t, Exception):
                bad[r.request] = t
                continue
            try:
                ev = self._row_token(r, t)
            except Exception as e:
                bad[r.request] = e
                continue
            events.append(ev)
            if ev.finish_reason is not None:
                finished.add(s)
        for req, e in bad.items():  # a request whose row failed ends all its unfinished rows with an error
            events = [ev for ev in events if ev.request != req or ev.finish_reason is not None]
            fail = [s for s, r in enumerate(self._rows) if r.request == req and s not in finished]
            events += self._error_rows(fail, e)
            finished.update(fail)
        return events

    def _row_token(self, r: _Row, t: int) -> RowEvent:
        """Today's streaming rules: eos, the row's stop_token_ids ("stop"; the
        token itself not streamed, the text held back so far flushed), stop
        strings (cut, held back while partial), incomplete UTF-8 held back,
        "length" at max_new_tokens."""
        p = r.params
        r.out.append(t)
        r.pending = t
        reason = None
        if p.stop_at_eos and t in self._eos:
            reason = "eos"
            text = self._decode(r.out[:-1])
        elif t in p.stop_token_ids:
            reason = "stop"
            text = self._decode(r.out[:-1])
        else:
            text = self._decode(r.out)
            cut = find_stop(text, p.stop) if p.stop else -1
            if cut >= 0:
                reason, text = "stop", text[:cut]
            elif len(r.out) >= p.max_new_tokens:
                reason = "length"
            else:
                text = text[: len(text) - holdback(text, p.stop)]
        delta = text[len(r.emitted):] if text.startswith(r.emitted) else ""
        r.emitted += delta
        return RowEvent(r.request, r.index, t, delta, reason)

    def _decode(self, ids: list[int]) -> str:
        tok = self.model.tokenizer
        return tok.decode(ids) if tok is not None else ""

    def _error_rows(self, slots, e: Exception) -> list[RowEvent]:
        msg = f"{type(e).__name__}: {e}"
        return [RowEvent(self._rows[s].request, self._rows[s].index, -1, "", "error", msg) for s in slots]

    # -- admission and the pool ---------------------------------------------------------------

    def _pool_bytes(self, slots: int, length: int) -> int:
        return slots * length * self._bpt

    def _peak(self, slots: int, length: int) -> int:
        """Bytes held while reallocating the pool to (slots, length), layer by layer."""
        old, new = self._pool_bytes(self._slots, self._len), self._pool_bytes(slots, length)
        if not self._rows:
            return new  # nothing to copy: the old pool is freed first
        per_tensor = max(old, new) // (2 * len(self._keys) if self._keys else 1)
        return max(old, new) + per_tensor

    def _fit(self, rows: int, length: int) -> Optional[tuple[int, int]]:
        """The pool shape to use for ``rows`` rows of ``length`` positions, or
        None when it does not fit the budget now."""
        if rows > self.max_rows:
            return None
        if rows <= self._slots and length <= self._len:
            return self._slots, self._len
        slots = min(self.max_rows, max(self._slots, 1 << (rows - 1).bit_length()))
        n_pos = self.model.config.n_positions
        ln = min(n_pos, max(length, -(-length // _LEN_ROUND) * _LEN_ROUND))
        for shape in ((slots, ln), (rows, ln), (slots, length), (rows, length)):
            if self._peak(*shape) <= self.kv_budget_bytes:
                return shape
        return None

    def _admit(self) -> list[_Request]:
        admitted: list[_Request] = []
        rows = len(self._rows)
        length = max((r.reserve for r in self._rows), default=0)
        width, prefill_rows = 0, 0
        while self._waiting:
            q = self._waiting[0]
            n_rows, n_len = rows + len(q.rows), max(length, q.reserve)
            w = max(width, q.width)
            if admitted and (prefill_rows + len(q.rows)) * w > self.prefill_tokens_per_step:
                break
            shape = self._fit(n_rows, n_len)
            if shape is None:
                break  # FIFO: nothing overtakes the head of the queue
            self._resize(*shape)
            self._waiting.popleft()
            for r in q.rows:
                r.generator = self._generator(r.params)
                self._seen[len(self._rows)] = False
                self._seen[len(self._rows), torch.tensor(r.prompt, dtype=torch.long)] = True
                self._rows.append(r)
            admitted.append(q)
            rows, length, width, prefill_rows = n_rows, n_len, w, prefill_rows + len(q.rows)
        return admitted

    @staticmethod
    def _generator(p: SamplingParams) -> Optional[torch.Generator]:
        if p.greedy:
            return None
        if p.seed is not None:
            return torch.Generator().manual_seed(int(p.seed))
        # Unseeded: seeded from torch's default generator now, so torch.manual_seed upstream reproduces runs.
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))

    def _resize(self, slots: int, length: int) -> None:
        if (slots, length) == (self._slots, self._len):
            return
        if not self._rows:
            self._free_pool()
        n_layer = self._layers
        heads, d = self._head
        keep_s, keep_l = len(self._rows), min(self._len, length)
        for store in (self._keys, self._values):
            for i in range(n_layer):
                # zeros, not empty: the positions a row has not written yet are read
                # (masked) by attention, and 0 x NaN garbage would poison the row
                new = _zeros((slots, heads, length, d), self._dtype)
                if i < len(store):
                    _copy_into(new[:keep_s, :, :keep_l], store[i][:keep_s, :, :keep_l])
                    store[i] = new  # the old layer tensor is freed here
                else:
                    store.append(new)
        seen = torch.zeros((slots, self.model.config.vocab_size), dtype=torch.bool)
        seen[:len(self._rows)] = self._seen[:len(self._rows)]
        self._seen = seen
        self._slots, self._len = slots, length

    def _free_pool(self) -> None:
        self._keys, self._values = [], []
        self._slots = self._len = 0
        self._seen = self._seen[:0]

    def _views(self, a: int, b: int):
        return [k[a:b] for k in self._keys], [v[a:b] for v in self._values]

    def _remove(self, slots: Sequence[int]) -> None:
        """Frees rows' slots, moving the last row into each freed slot (descending order)."""
        for s in sorted(set(slots), reverse=True):
            last = len(self._rows) - 1
            if s != last:
                row = self._rows[last]
                n = row.length
                for k, v in zip(self._keys, self._values):
                    k[s, :, :n] = k[last, :, :n]
                    v[s, :, :n] = v[last, :, :n]
                self._seen[s] = self._seen[last]
                self._rows[s] = row
            self._rows.pop()
        live = {r.request for r in self._rows} | {q.id for q in self._waiting}
        self._ids &= live
        if not self._rows:
            self._free_pool()


class GenerationLoop:
    """A daemon thread driving a scheduler; submit/cancel are thread-safe.

    ``emit`` is called from the loop's thread once per step with all that
    step's events. submit() validates in the caller's thread (ValueError /
    KVPoolFull raise there); the request joins at the next step. The thread
    sleeps on a condition while the scheduler is idle."""

    def __init__(self, scheduler: GenerationScheduler, emit: Callable[[list[RowEvent]], None]):
        self.scheduler = scheduler
        self._emit = emit
        self._cond = threading.Condition()
        self._inbox: list[tuple[str, object]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tallow-generation-loop", daemon=True)
        self._thread.start()

    def submit(self, request: Hashable, prompt_ids: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> None:
        req = self.scheduler.validate(request, prompt_ids, params)
        with self._cond:
            if self._closed:
                raise RuntimeError("GenerationLoop is closed")
            self._inbox.append(("add", req))
            self._cond.notify()

    def cancel(self, request: Hashable) -> None:
        with self._cond:
            self._inbox.append(("cancel", request))
            self._cond.notify()

    def close(self, timeout: Optional[float] = None) -> None:
        """Stops the thread after the step in progress (waiting and running
        requests are dropped without events)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        sched = self.scheduler
        while True:
            with self._cond:
                while not self._closed and not self._inbox and sched.idle:
                    self._cond.wait()
                if self._closed:
                    return
                inbox, self._inbox = self._inbox, []
            events: list[RowEvent] = []
            for op, arg in inbox:
                if op == "cancel":
                    sched.cancel(arg)
                    continue
                try:
                    sched._enqueue(arg)
                except Exception as e:  # e.g. a duplicate id: its rows end with an error
                    events += [RowEvent(arg.id, r.index, -1, "", "error", f"{type(e).__name__}: {e}")
                               for r in arg.rows]
            try:
                events += sched.step()
            except Exception as e:  # a bug in the scheduler itself: fail what runs, keep serving
                events += sched.fail_all(f"{type(e).__name__}: {e}")
            if events:
                try:
                    self._emit(events)
                except Exception:  # the consumer's failure must not stop the loop
                    import logging

                    logging.getLogger(__name__).exception("GenerationLoop: emit raised")
