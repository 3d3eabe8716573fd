"""
Speculative decoding: a cheap proposer drafts up to k tokens per sequence, the target model
scores all of them in one forward pass over the paged KV cache, and an exact rejection rule
keeps some of them: the output has exactly the target's distribution (greedy: exactly its
tokens), in fewer target forward passes when the drafts are good.

    python generate.py --speculative ngram --spec-k 4 "..."
    python generate.py --speculative draft:path/to/small_model "..."
    spec = Speculator("ngram", k=4)
    llm.generate(prompts, params, speculator=spec)                    # spec.stats after

This file does not import generate.py (which imports it): what a step needs of the engine, the
engine (LLM), its scheduler and its outputs, arrive as arguments of Speculator.step, and the
sampling rule is a method of each request's SamplingParams.

Proposers:
  - prompt lookup ("ngram"): no model; find the latest earlier occurrence of the context's last
    few tokens and propose what followed it. Pays off on text that repeats its context (code,
    lists, quotes, extraction), not on free prose.
  - a draft model ("draft:PATH"): any checkpoint with the target's tokenizer, with its own model
    and paged cache; it drafts autoregressively and is rolled back to what the target kept.

One step, for every running sequence at once (each with its own number of drafts and its own
accepted length): append the last sampled token and its drafts to the sequence's cache slots,
run the target once with logits at every position (the prefill-with-prefix path), accept per
sequence, and truncate the cache back over the rejected drafts (their blocks go back to the
pool).

Sampled runs draw from the target's distribution but consume each request's random stream
differently: a seed reproduces a speculative run, not the plain run's sample. Greedy runs give
the plain run's tokens where the (k+1)-token pass rounds like the 1-token pass: exactly in fp32
(the tests); in bf16 a near tie may flip (bench.py reports it).

What this is not: tree or multi-draft speculation, self-speculation from the target's first
layers (not built), adaptive k, or a GPU-tuned loop (the draft's k steps run one after another).
Test: `pytest test_speculative.py`.
"""
import math
import time
from dataclasses import dataclass

import torch

# ------------------------------------------------------------------------------------------
# proposers: propose(seqs, ks) -> (drafts, qs). drafts[i] holds at most ks[i] tokens for
# seqs[i]; qs[i] is (len(drafts[i]), V): the distribution each draft token was drawn from, or
# None when the draft is deterministic (a point mass on each token; greedy drafts too).


def propose_ngram(tokens, k, n_max=3, n_min=1) -> list:
    """Prompt lookup: take the longest suffix of `tokens` (n_max down to n_min tokens) that
    occurs earlier too, find its latest earlier occurrence at i, and propose the k tokens that
    followed it, tokens[i + n : i + n + k]. Past the end of `tokens` the proposal continues
    from itself, so a repeating pattern keeps repeating ("a b a b" proposes "a b a b ...").
    [] when no suffix recurs."""
    n_tok = len(tokens)
    for n in range(min(n_max, n_tok - 1), n_min - 1, -1):
        suffix = tokens[n_tok - n:]
        for i in range(n_tok - n - 1, -1, -1):  # latest first
            if tokens[i:i + n] == suffix:
                out = []
                for j in range(k):  # i + n <= n_tok - 1, so src - n_tok < j: already proposed
                    src = i + n + j
                    out.append(tokens[src] if src < n_tok else out[src - n_tok])
                return out
    return []


class NgramProposer:
    """Prompt lookup for a batch (propose_ngram). It holds no cache: nothing to roll back."""

    def __init__(self, n_max=3, n_min=1):
        self.n_max, self.n_min = n_max, n_min

    def propose(self, seqs, ks):
        drafts = [propose_ngram(s.tokens, k, self.n_max, self.n_min) if k else []
                  for s, k in zip(seqs, ks)]
        return drafts, [None] * len(seqs)

    def forget(self, seq_id):
        pass

    def close(self, failed=False):
        pass


@dataclass
class DraftSeq:
    """A target sequence as the draft model sees it: its tokens (plus this step's drafts), of
    which n_computed have K/V in the draft's cache. n_synced leading tokens are known to equal
    the target sequence's (which only ever grows)."""
    id: int
    tokens: list
    n_computed: int = 0
    n_synced: int = 0


class DraftModel:
    """A smaller model with the target's tokenizer. It owns its model and paged KV cache (an
    LLM of its own) and keeps a twin of every target sequence there. Each draft token is
    drawn from q = the same temperature / top-k / top-p transform of the draft's logits as the
    target's p (greedy: the draft's argmax)."""

    def __init__(self, target, path):
        # an engine of the target's own class (this file does not import generate.py)
        self.llm = type(target)(path, device=target.device, dtype=target.dtype,
                                block_size=target.cache.block_size)
        probe = "The draft, 1234 tokens: the same?"
        if self.llm.cfg.vocab_size != target.cfg.vocab_size or \
                self.llm.tokenizer.encode(probe) != target.tokenizer.encode(probe):
            raise ValueError(f"draft model {path} does not share the target's tokenizer "
                             f"(vocabulary {self.llm.cfg.vocab_size} vs "
                             f"{target.cfg.vocab_size})")
        self.twins: dict[int, DraftSeq] = {}

    def sync(self, seq) -> DraftSeq:
        """seq's twin, rolled back to the longest prefix its cache shares with seq.tokens
        (the drafts the target rejected are truncated here, their blocks freed), and holding
        seq's tokens. At least the last token is left to compute: its logits draft the next."""
        cache = self.llm.cache
        d = self.twins.get(seq.id)
        if d is None:  # new: map what the draft pool already holds of its prefix
            d = self.twins[seq.id] = DraftSeq(seq.id, list(seq.tokens))
            d.n_computed = cache.share_prefix(seq.id, seq.tokens)
        else:
            keep, limit = d.n_synced, min(d.n_computed, len(seq.tokens) - 1)
            while keep < limit and d.tokens[keep] == seq.tokens[keep]:
                keep += 1
            cache.truncate(d.id, d.n_computed - keep)
            d.n_computed = keep
            d.tokens[keep:] = seq.tokens[keep:]
        d.n_synced = len(seq.tokens)
        return d

    def propose(self, seqs, ks):
        cache = self.llm.cache
        # a draft with a shorter context than the target's drafts nothing past its own end
        ks = [min(k, self.llm.cfg.max_seq_len - len(s.tokens)) for s, k in zip(seqs, ks)]
        twins = {i: self.sync(s) for i, (s, k) in enumerate(zip(seqs, ks)) if k > 0}
        drafts, qs = [[] for _ in seqs], [[] for _ in seqs]
        live = [i for i in twins]
        while live:  # round j drafts token j of every sequence that wants more than j
            batch, rows = [], []
            for i in live:
                d = twins[i]
                n = len(d.tokens) - d.n_computed  # catch-up tokens, then one draft token
                if cache.can_append(d.id, n):  # a full draft pool only shortens the draft
                    batch.append((d, n, cache.append(d.id, d.tokens[d.n_computed:])))
                    rows.append(i)
            if not batch:
                break
            logits = self.llm.run(batch)                              # (B, V) last tokens
            greedy = logits.argmax(-1).tolist()
            for row, i in enumerate(rows):
                p = seqs[i].params
                if p.temperature == 0:
                    x = greedy[row]
                else:
                    q = p.probs(logits[row])
                    x = int(torch.multinomial(q, 1, generator=seqs[i].rng))
                    qs[i].append(q)
                drafts[i].append(x)
                twins[i].tokens.append(x)
            live = [i for i in rows if len(drafts[i]) < ks[i]]
        return drafts, [torch.stack(q) if q else None for q in qs]

    def forget(self, seq_id):
        self.llm.cache.free(seq_id)
        self.twins.pop(seq_id, None)

    def close(self, failed=False):
        """Free every twin (after a generate call). After a failure, the blocks a failed pass
        was to write hold nothing: forget them, as the target's cache does."""
        for seq_id in list(self.twins):
            self.forget(seq_id)
        if failed:
            self.llm.cache.abort_step()


# ------------------------------------------------------------------------------------------
# acceptance: the exact rule

def accept_greedy(target_argmax, draft) -> list:
    """Greedy verification. target_argmax[i] (k+1 of them) is the target's argmax after the
    context plus draft[:i]. Keep draft tokens while they equal it, then add the target's own
    token: the correction at the first disagreement, or a bonus after all k. This is the rule
    of accept_draft with p one-hot (p(x) is 1 or 0; the residual is p itself), and it yields
    exactly the tokens greedy decoding does."""
    n = 0
    while n < len(draft) and draft[n] == target_argmax[n]:
        n += 1
    return list(draft[:n]) + [target_argmax[n]]


def accept_draft(p, q, draft, rng) -> list:
    """Speculative sampling. p (k+1, V): row i is the target's sampling distribution after the
    context plus draft[:i]; q (k, V): row i the distribution draft[i] was drawn from, or None
    for a deterministic draft (q = the point mass on draft[i]). Returns the accepted drafts and
    one more token: 1 to k+1 tokens, distributed exactly as k+1 draws from the target would be.

    At one position, with x ~ q: accept x with probability min(1, p(x)/q(x)); on rejection
    draw from r = max(p - q, 0) / Z. Then
        P(reject) = sum_x q(x) (1 - min(1, p(x)/q(x))) = 1 - sum_x min(p(x), q(x)) = Z,
    since Z = sum_y max(p(y) - q(y), 0) = sum_y (p(y) - min(p(y), q(y))), and so
        P(emit y) = q(y) min(1, p(y)/q(y)) + P(reject) r(y)
                  = min(p(y), q(y)) + max(p(y) - q(y), 0) = p(y).
    Each emitted token is thus a draw from the target given the tokens before it; the next
    position is only looked at after an acceptance, when its row of p is conditioned on the
    accepted token. After k acceptances, row k of p gives a bonus token at no extra pass.
    Point-mass q = delta_x: accept with probability p(x); the residual max(p - delta_x, 0) is p
    with x zeroed (p(x) <= 1), renormalised."""
    k = len(draft)
    pos = torch.arange(k)
    x = torch.tensor(draft, dtype=torch.long)
    p_x = p[pos, x]                                                  # (k,)
    q_x = q[pos, x] if q is not None else torch.ones(k)
    u = torch.rand(k, generator=rng)                                 # one uniform per draft
    # u < p(x)/q(x) written without the division (q(x) > 0: x was drawn from q)
    ok = (u * q_x < p_x).tolist()
    n = ok.index(False) if False in ok else k
    if n == k:
        residual = p[k]
    else:
        residual = (p[n] - q[n]).clamp(min=0) if q is not None else p[n].clone()
        residual[draft[n]] = 0  # the residual never holds the rejected token (p(x) < q(x))
        if not residual.sum() > 0:  # p == q up to rounding: the rejection was a rounding
            residual = p[n]         # accident, and p is the distribution to draw from
    return list(draft[:n]) + [int(torch.multinomial(residual, 1, generator=rng))]


# ------------------------------------------------------------------------------------------
# one engine step

@dataclass
class SpecStats:
    """Counters of one speculative generate() call; the CLI summary line prints them."""
    method: str
    k: int
    n_verify_forwards: int = 0  # target forward passes that verified drafts
    n_seq_forwards: int = 0     # (sequence, target forward) pairs that gave it tokens
    n_tokens: int = 0           # tokens those passes gave (end-of-sequence tokens included)
    n_proposed: int = 0         # draft tokens verified
    n_accepted: int = 0         # draft tokens kept

    def count_plain(self, n_seqs):
        """A plain step (prefill, or a fallback) gave n_seqs sequences one token each."""
        self.n_seq_forwards += n_seqs
        self.n_tokens += n_seqs

    @property
    def acceptance_rate(self) -> float:
        return self.n_accepted / self.n_proposed if self.n_proposed else math.nan

    @property
    def tokens_per_forward(self) -> float:
        """Per sequence: plain decoding gives exactly 1, speculation up to k + 1."""
        return self.n_tokens / self.n_seq_forwards if self.n_seq_forwards else math.nan

    def summary(self) -> str:
        accepted = f"{self.acceptance_rate:.0%} of {self.n_proposed} drafted tokens accepted" \
            if self.n_proposed else "no drafted tokens"
        return (f"speculative {self.method} k={self.k}: {accepted}, "
                f"{self.tokens_per_forward:.2f} tokens per target forward")


def draft_budget(cache, seqs, k):
    """Drafts each sequence may verify this step, or None when the pool cannot hold even one
    more token for some sequence (then a plain step preempts). At most k, and at most one less
    than the tokens it may still generate (a step yields up to drafts + 1). Oldest first, each
    takes the largest number whose new blocks still fit beside those of the ones before it
    (a conservative sum: two forks writing into one shared block both count a copy)."""
    ks, n_free = [], cache.n_free_blocks
    for s in seqs:
        k_s = max(0, min(k, s.n_left - 1))
        while k_s >= 0 and cache.n_new_blocks(s.id, k_s + 1) > n_free:
            k_s -= 1
        if k_s < 0:
            return None
        n_free -= cache.n_new_blocks(s.id, k_s + 1)
        ks.append(k_s)
    return ks


class Speculator:
    """Speculative decoding for LLM.generate(..., speculator=...). method "ngram" (prompt
    lookup) or "draft:PATH" (a smaller model with the target's tokenizer) proposes up to k
    tokens per sequence and step. A draft model is loaded at the first start and kept for
    later calls; stats holds the counters of the last call."""

    def __init__(self, method="ngram", k=4):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"spec_k must be an integer >= 1, got {k!r}")
        is_draft = isinstance(method, str) and method.startswith("draft:")
        if method != "ngram" and not (is_draft and method[len("draft:"):]):
            raise ValueError(f"speculative must be 'ngram' or 'draft:PATH', got {method!r}")
        self.method, self.k = method, k
        self.proposer = None if is_draft else NgramProposer()
        self.stats = None

    def start(self, llm, use_cache=True):
        """Ready for one generate() call of llm, the target."""
        if not use_cache:
            raise ValueError("speculative decoding verifies drafts through the KV cache: it "
                             "cannot run uncached")
        if self.proposer is None:
            self.proposer = DraftModel(llm, self.method[len("draft:"):])
        self.stats = SpecStats(self.method, self.k)

    def count_plain(self, seqs):
        """A plain step (prefill, or a fallback) gave each of seqs one token."""
        self.stats.count_plain(len(seqs))
        for s in seqs:
            if s.finish_reason:
                self.proposer.forget(s.id)

    def stop(self, failed=False):
        """After a generate() call: the proposer lets go of its sequences."""
        self.proposer.close(failed)

    def step(self, llm, sched, out) -> bool:
        """One speculative step of every running sequence, if none waits, all are decoding
        (the last sampled token not yet in the cache) and the pool holds their tokens; else
        False, nothing changed. llm.take streams and retires, as in a plain step."""
        seqs = list(sched.running)
        if sched.waiting or not seqs or any(s.n_computed != len(s.tokens) - 1 for s in seqs):
            return False
        ks = draft_budget(sched.cache, seqs, self.k)
        if ks is None:
            return False
        drafts, qs = self.proposer.propose(seqs, ks)
        # per sequence: the last sampled token, then its drafts, computed like a prompt's
        # chunk; the drafts sit in seq.tokens only for this pass, and leave before any is
        # accepted
        for s, d in zip(seqs, drafts):
            s.tokens += d
        try:
            batch = [sched.reserve(s, 1 + len(d)) for s, d in zip(seqs, drafts)]
            logits = llm.run(batch, all_logits=True)  # (T, V): a sequence's row j is the
        finally:                                      # target after its context + draft[:j]
            for s, d in zip(seqs, drafts):
                del s.tokens[len(s.tokens) - len(d):]
        greedy = logits.argmax(-1).tolist()  # one host sync for the whole batch
        stats, now, start = self.stats, time.perf_counter(), 0
        stats.n_verify_forwards += 1
        for s, d, q in zip(seqs, drafts, qs):
            rows = slice(start, start + 1 + len(d))
            start = rows.stop
            if s.params.temperature == 0:
                kept = accept_greedy(greedy[rows], d)
            else:
                kept = accept_draft(s.params.probs(logits[rows]), q, d, s.rng)
            n_acc = len(kept) - 1
            # roll back: the cache keeps the context, the last token and the accepted
            # drafts; the K/V of the rejected drafts go (and any block only they used)
            sched.rollback(s, len(d) - n_acc)
            stats.n_proposed += len(d)
            stats.n_accepted += n_acc
            stats.n_seq_forwards += 1
            for tok in kept:  # the plain step's stopping and streaming, token by token
                stats.n_tokens += 1
                if llm.take(sched, out, s, tok, now):
                    self.proposer.forget(s.id)
                    break
        return True
