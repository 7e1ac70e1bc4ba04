"""One request being decoded by the transformers engine: its sampling, grammar, stop strings and text.

The engine's scheduler owns a batch of `Sequence`s. Each step it hands the batch's next-token logits
to `choose_tokens`, which applies every row's own settings (repetition penalties, grammar mask,
temperature, top-p, seeded sampling) with batched tensor ops where rows agree and per-row ops where
they differ, then calls `Sequence.append` with each row's token. `append` advances the grammar
matcher, detokenises incrementally, holds back text that may be the start of a stop string, and
returns the `StreamDelta` to deliver. `forced_tokens` gives the tokens the grammar forces next
(jump-forward decoding), which the engine appends without sampling them.

Incremental detokenisation uses the prefix/read-offset scheme of vLLM and TGI: decode a short window
twice (without and with the new tokens) and emit the difference once it does not end in an incomplete
UTF-8 character. tokenizers' own `DecodeStream` raises on the invalid byte sequences a sampled
byte-fallback model can produce, so it cannot be used here.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
import weakref
from typing import Any

import torch

from medtune.serve.engines.base import GenerationRequest, StreamDelta, TokenLogprob, TopLogprob
from medtune.serve.guided import Guide


class Sequence:
    """Decoding state of one request (lives in the scheduler thread; `cancel` may come from any thread)."""

    def __init__(
        self,
        req: GenerationRequest,
        prompt_ids: list[int],
        max_new_tokens: int,
        matcher: Any,
        tokenizer: Any,
        eos_ids: set[int],
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self.req = req
        self.sampling = req.sampling
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.matcher = matcher
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.out_ids: list[int] = []
        self.finish_reason: str | None = None
        self.cancelled = False
        self.delivered = 0  # deltas handed to the event loop so far
        self.stops = [s for s in self.sampling.stop if s]
        # The Rust tokenizer's decode directly: the transformers wrapper costs ~10x more per call.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._decode = backend.decode if backend is not None else tokenizer.decode
        self._encode = backend.encode if backend is not None else None
        self.jump_forward = False  # set by the engine: feed grammar-forced tokens without sampling them
        self.pending: list[int] = []  # tokens accepted but not yet in the cache (the next input aside)
        self.carry: StreamDelta | None = None  # forced before the prefill: delivered with the first token
        self._prefix_offset = 0  # out_ids[_prefix_offset:_read_offset] were decoded last time
        self._read_offset = 0
        self._text = ""  # decoded so far (complete characters)
        self._sent = 0  # characters of _text already delivered
        self.loop = loop
        self.queue: asyncio.Queue[StreamDelta | BaseException] = asyncio.Queue()
        seed = self.sampling.seed if self.sampling.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        penalised = self.sampling.presence_penalty or self.sampling.frequency_penalty
        self.counts: torch.Tensor | None = None if not penalised else torch.zeros(0)
        bias = self.sampling.logit_bias  # as the (ids, values) `choose_tokens` adds to the row's logits
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if bias:
            self.bias = torch.tensor(list(bias), dtype=torch.long), torch.tensor(list(bias.values()))

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def cancel(self) -> None:
        self.cancelled = True

    # -- delivery (to the event loop that asked) ----------------------------------------------------

    def deliver(self, item: StreamDelta | BaseException) -> None:
        deliver_all([(self, item)])

    # -- one token ----------------------------------------------------------------------------------

    def append(self, token: int, logprob: TokenLogprob | None) -> StreamDelta | None:
        """Take the chosen token; return the delta to deliver (None when nothing is ready yet)."""
        self.out_ids.append(token)
        if self.counts is not None and self.counts.numel():  # before `choose_tokens` sizes it: out_ids
            self.counts[token] += 1
        if token in self.eos_ids:
            return self._finish("stop", [token], logprob)
        if self.matcher is not None and not self.matcher.accept_token(token):
            # Cannot happen with the mask applied; end rather than emit text outside the grammar.
            return self._finish("stop", [token], logprob)
        self._detokenize(final=False)
        if self.stops:
            start = max(0, self._sent - max(map(len, self.stops)))
            hits = [i for i in (self._text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self._text = self._text[: min(hits)]
                return self._finish("stop", [token], logprob, flush=False)
        if len(self.out_ids) >= self.max_new_tokens:
            return self._finish("length", [token], logprob)
        if self.matcher is not None and self.matcher.is_terminated():
            return self._finish("stop", [token], logprob)
        ready = len(self._text) - self._held_back()
        text, self._sent = self._text[self._sent : ready], max(self._sent, ready)
        return self._delta(text, [token], logprob)

    def take(self, token: int, logprob: TokenLogprob | None) -> tuple[StreamDelta, list[int]]:
        """Append the chosen token and, with jump-forward decoding, the tokens the grammar then forces;
        return the delta to deliver (with the text forced before the prefill, the first time) and the
        forced tokens appended (their keys and values are not in the cache yet)."""
        delta = merge_deltas(self.carry, self.append(token, logprob))
        self.carry = None
        return self._append_forced([] if self.finished else self.forced_tokens(), delta)

    def _append_forced(self, tokens: list[int], delta: StreamDelta | None) -> tuple[StreamDelta, list[int]]:
        """Append forced `tokens` (until the answer ends), their text merged into `delta`; return it and
        the tokens appended."""
        taken = []
        for token in tokens:
            delta = merge_deltas(delta, self.append(token, None))
            taken.append(token)
            if self.finished:
                break
        return delta, taken

    def forced_tokens(self) -> list[int]:
        """The tokens the grammar forces next (jump-forward decoding), as the tokenizer would write them.

        xgrammar gives the text every answer must continue with (`find_jump_forward_string`: a JSON key,
        the rest of an enum value once its first token decided it). Its tokens are those the tokenizer
        gives it at the end of the answer so far (the split the model was trained on); the last one is
        left to the model, as it might merge with the free text that follows. Nothing is forced when a
        token of that tokenisation would straddle the end of the answer so far, or when it does not
        decode back to the same text."""
        if not self.jump_forward or self.matcher is None or self._encode is None:
            return []
        try:
            forced = self.matcher.find_jump_forward_string()
        except UnicodeDecodeError:  # it starts or ends inside a character (byte tokens): decode on
            return []
        if not forced:
            return []
        done = self._decode(self.out_ids, skip_special_tokens=False)
        encoding = self._encode(done + forced, add_special_tokens=False)
        if self._decode(encoding.ids, skip_special_tokens=False) != done + forced:
            return []
        cut = len(done)  # the forced text's tokens start there, unless a token straddles it
        first = next((i for i, (start, _) in enumerate(encoding.offsets) if start >= cut), None)
        if first is None or any(start < cut < end for start, end in encoding.offsets):
            return []
        return encoding.ids[first:-1]

    @property
    def prefill_ids(self) -> list[int]:
        """What the prefill feeds: the prompt and the tokens forced before it (`force_start`)."""
        return self.prompt_ids + self.out_ids if self.out_ids else self.prompt_ids

    def force_start(self) -> int:
        """Accept the tokens the grammar forces at the very start (a JSON schema's opening brace and first
        key), so that the prefill feeds them with the prompt; return how many (none when they would end
        the answer: a stop string in them, or the token budget). Their text reaches the client with the
        first sampled token."""
        forced = self.forced_tokens()
        if not forced or len(forced) >= self.max_new_tokens:
            return 0
        text = self._decode(forced, skip_special_tokens=True)
        if any(stop in text for stop in self.stops):
            return 0
        self.carry, taken = self._append_forced(forced, self.carry)
        return len(taken)

    def _detokenize(self, final: bool) -> None:
        """Append the text the new tokens complete (all of it when `final`)."""
        ids = self.out_ids[:-1] if self.out_ids and self.out_ids[-1] in self.eos_ids else self.out_ids
        decode = self._decode
        before = decode(ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        after = decode(ids[self._prefix_offset :], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._text += after[len(before) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(ids)

    def finish_completed(self) -> StreamDelta:
        """End a constrained answer that is complete and can only be followed by a stop token."""
        return self._finish("stop", [], None)

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that could still grow into a stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self._text)), best, -1):
                if self._text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _finish(
        self, reason: str, ids: list[int], logprob: TokenLogprob | None, flush: bool = True
    ) -> StreamDelta:
        if flush:
            self._detokenize(final=True)  # an incomplete character at the end comes out as U+FFFD
        self.finish_reason = reason
        text, self._sent = self._text[self._sent :], len(self._text)
        return self._delta(text, ids, logprob)

    def _delta(self, text: str, ids: list[int], logprob: TokenLogprob | None) -> StreamDelta:
        return StreamDelta(
            text=text,
            token_ids=ids,
            logprobs=[logprob] if logprob is not None else None,
            finish_reason=self.finish_reason,  # type: ignore[arg-type]
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.out_ids),
        )

    @property
    def text(self) -> str:
        return self._text


def merge_deltas(first: StreamDelta | None, then: StreamDelta) -> StreamDelta:
    """One delta for two consecutive ones of a request (`first` is extended in place)."""
    if first is None:
        return then
    first.text += then.text
    first.token_ids += then.token_ids
    if then.logprobs is not None:
        first.logprobs = (first.logprobs or []) + then.logprobs
    first.finish_reason, first.completion_tokens = then.finish_reason, then.completion_tokens
    return first


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _token_text(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def _logprob_entry(tokenizer: Any, logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    text = _token_text(tokenizer, token)
    entry = TokenLogprob(token=text, logprob=float(logprobs[token]), bytes=list(text.encode()))
    if top:
        values, ids = torch.topk(logprobs, top)
        for v, i in zip(values.tolist(), ids.tolist(), strict=True):
            alt = _token_text(tokenizer, i)
            entry.top_logprobs.append(TopLogprob(token=alt, logprob=float(v), bytes=list(alt.encode())))
    return entry


def choose_tokens(
    logits: torch.Tensor,
    seqs: list[Sequence],
    guide: Guide | None,
    bitmask: torch.Tensor | None,
    tokenizer: Any,
) -> list[tuple[int, TokenLogprob | None]]:
    """Pick each row's next token from `logits` [rows, vocab] (float32, modified in place)."""
    want_logprobs = [s.sampling.logprobs or s.sampling.top_logprobs > 0 for s in seqs]
    raw = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
    # Repetition penalties (OpenAI semantics: over the generated tokens only), then logit_bias.
    for i, s in enumerate(seqs):
        if s.counts is not None:
            if s.counts.numel() == 0:  # the tokens so far (forced before the prefill) count too
                ids = torch.tensor(s.out_ids, dtype=torch.long)
                s.counts = torch.bincount(ids, minlength=logits.shape[-1]).float()
            logits[i] -= s.sampling.frequency_penalty * s.counts + s.sampling.presence_penalty * (
                s.counts > 0
            )
        if s.bias is not None:
            logits[i].index_add_(0, *s.bias)
    greedy = [s.sampling.greedy for s in seqs]
    nucleus = [not greedy[i] and s.sampling.top_p < 1.0 for i, s in enumerate(seqs)]
    guided = (
        [i for i, s in enumerate(seqs) if s.matcher is not None]
        if guide is not None and bitmask is not None
        else []
    )

    def mask(rows: list[int]) -> None:  # the grammar's mask, for these rows only, in one call each
        guide.fill_rows(bitmask, [(i, seqs[i].matcher) for i in rows])
        guide.apply(logits, bitmask, rows)

    # Nucleus sampling needs the grammar's mask before it draws. Greedy rows and plain sampling rows pick
    # first, and only a row whose pick the grammar refuses is masked and picks again (llama.cpp's fast
    # path): the best allowed token is the best token whenever the grammar allows it, same noise drawn.
    if first := [i for i in guided if nucleus[i]]:
        mask(first)
    # Plain temperature sampling (Gumbel-max: argmax of logits / T minus the log of Exp(1) noise), the
    # noise drawn from each row's own seeded generator. Exp(1) is -log(U) for U uniform: drawing U is ~5x
    # cheaper than `exponential_`, and the logarithms run once for all rows.
    plain = {i: j for j, i in enumerate(i for i in range(len(seqs)) if not greedy[i] and not nucleus[i])}
    if plain:
        noise = torch.empty(len(plain), logits.shape[-1])
        for i, j in plain.items():
            noise[j].uniform_(generator=seqs[i].generator)
        noise.log_().neg_().log_()  # log(Exp(1)); U = 0 gives +inf: that token is never picked
        temps = torch.tensor([seqs[i].sampling.temperature for i in plain])[:, None]
    tokens = [0] * len(seqs)

    def pick(rows: list[int]) -> None:
        if ids := [i for i in rows if greedy[i]]:
            top = (logits if len(ids) == len(seqs) else logits[ids]).argmax(dim=-1).tolist()
            for i, t in zip(ids, top, strict=True):
                tokens[i] = t
        if ids := [i for i in rows if i in plain]:
            at = [plain[i] for i in ids]
            for i, t in zip(ids, (logits[ids] / temps[at] - noise[at]).argmax(dim=-1).tolist(), strict=True):
                tokens[i] = t
        for i in rows:
            if nucleus[i]:
                probs = torch.softmax(logits[i] / seqs[i].sampling.temperature, dim=-1)
                sorted_p, order = torch.sort(probs, descending=True)
                keep = sorted_p.cumsum(-1) - sorted_p < seqs[i].sampling.top_p  # always keeps the top token
                probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
                tokens[i] = int(torch.multinomial(probs, 1, generator=seqs[i].generator))

    pick(list(range(len(seqs))))
    if again := [i for i in guided if not nucleus[i] and not guide.allows(seqs[i].matcher, tokens[i])]:
        mask(again)
        pick(again)
    out: list[tuple[int, TokenLogprob | None]] = []
    for i, s in enumerate(seqs):
        lp = None
        if raw is not None and want_logprobs[i]:
            lp = _logprob_entry(tokenizer, raw[i], tokens[i], s.sampling.top_logprobs)
        out.append((tokens[i], lp))
    return out


def only_stop_allowed(guide: Guide, bitmask: torch.Tensor, row: int, seq: Sequence, vocab: int) -> bool:
    """True when a constrained answer is complete and the grammar allows nothing but a stop token."""
    if seq.matcher is None or not seq.matcher.is_completed():
        return False
    guide.fill(bitmask, row, seq.matcher)
    probe = torch.zeros(1, vocab)
    guide.apply(probe, bitmask[row : row + 1], [0])
    allowed = torch.isfinite(probe[0]).nonzero().flatten().tolist()
    return all(t in seq.eos_ids for t in allowed)


class _Mailbox:
    """Items waiting for one event loop. Waking a loop from another thread writes to its self-pipe and
    then waits for the GIL the woken loop grabs: ~1 ms on a busy machine, as much as a decoding step of
    a small model. So the scheduler wakes a loop at once only for what a client is waiting for (a
    request's first text, its end, an error) and otherwise at most every `COALESCE_S` seconds; tokens
    in between wait in the mailbox and reach streams in small bursts."""

    COALESCE_S = 0.02

    def __init__(self) -> None:
        self.items: list[tuple[Sequence, StreamDelta | BaseException]] = []
        self.lock = threading.Lock()
        self.last_wake = 0.0
        self.scheduled = False

    def drain(self) -> None:  # on the loop
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for seq, item in items:
            seq.queue.put_nowait(item)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()


def _urgent(seq: Sequence, item: StreamDelta | BaseException) -> bool:
    return not isinstance(item, StreamDelta) or item.finish_reason is not None or seq.delivered == 0


def deliver_all(items: list[tuple[Sequence, StreamDelta | BaseException]]) -> None:
    """Hand items (from the scheduler thread) to their requests' event loops, coalescing wake-ups."""
    now = time.monotonic()
    by_loop: dict[asyncio.AbstractEventLoop, bool] = {}
    for seq, item in items:
        loop = seq.loop
        if loop is None or loop.is_closed():
            continue
        box = _mailboxes.get(loop)
        if box is None:
            box = _mailboxes.setdefault(loop, _Mailbox())
        with box.lock:
            box.items.append((seq, item))
        urgent = _urgent(seq, item)
        if isinstance(item, StreamDelta):
            seq.delivered += 1
        by_loop[loop] = by_loop.get(loop, False) or urgent
    for loop, urgent in by_loop.items():
        box = _mailboxes[loop]
        with box.lock:
            if box.scheduled or not (urgent or now - box.last_wake >= box.COALESCE_S):
                continue
            box.scheduled, box.last_wake = True, now
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: its requests are gone
            loop.call_soon_threadsafe(box.drain)
