"""
The block manager. A stateful hypothesis test drives random share-prefix / append / fork /
truncate / free / failed-pass sequences (with evictions, since the pool is small) against a simple
model of what each sequence holds. The pool stores each token's id as its "K" value (and another
function of it as "V"), so the test checks not just the bookkeeping but the contents: every
sequence reads back exactly its own tokens through its block table, whatever was shared, copied,
evicted or reused. Two runs in three use a block hash of two or four values, so the token re-check
of a hash hit is exercised too. The events each run reached are counted by hypothesis:
    pytest test_cache.py -k BlockManager --hypothesis-show-statistics
"""
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import event, given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import cache as cache_mod
from cache import (RELEASED, CacheFull, KVCache, blocks_for_budget, bytes_per_token, chain_hash,
                   kv_storage_dtype, parse_budget)

TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=12)  # a tiny alphabet: many hits
A_FEW = st.lists(st.integers(0, 2), min_size=1, max_size=4)  # one forward pass's worth


def expected_kv(tokens):
    """The K and V the pool must hold for a sequence of tokens: K the token id, V a rolling
    function of every token so far (exact in float32)."""
    v, vs = 0, []
    for t in tokens:
        v = (v * 3 + t + 1) % 65521
        vs.append(float(v))
    return [float(t) for t in tokens], vs


def colliding_cache(n_values):
    """A pool class whose block hash has n_values values: many hash hits are collisions."""
    return type(f"CollidingCache{n_values}", (KVCache,), {
        "chain_hash": staticmethod(lambda parent, tokens: chain_hash(parent, tokens) % n_values)})


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.model = {}  # seq id -> the tokens it holds: the truth the cache must agree with
        self.next_id = 0
        self.reached = set()  # the events of this run, counted once per run in teardown

    def reach(self, name):
        self.reached.add(name)

    @initialize(data=st.data(), block_size=st.sampled_from([1, 2, 4]),
                n_blocks=st.integers(3, 8), collide=st.sampled_from([2, 4, None]),
                prompts=st.lists(TOKENS, min_size=1, max_size=3))
    def make_pool(self, data, block_size, n_blocks, collide, prompts):
        """A small pool (so it fills up: evictions), two thirds of the time with a colliding
        hash, holding a few sequences (one forked, one truncated) and a failed pass from the
        start, so that every run has something to share, copy, evict and truncate, and every
        operation is reached even in a run whose rules the search draws all alike."""
        self.cache = (colliding_cache(collide) if collide else KVCache)(
            n_layer=1, n_kv_head=1, head_dim=1, n_blocks=n_blocks, block_size=block_size)
        if collide:
            self.reach("colliding hash")
        for tokens in prompts:
            self.start(data, tokens)
        self.fork(data)
        self.truncate(data)
        self.slide(data)
        self.failed_pass(data, data.draw(A_FEW))

    def write(self, slots, seq):
        """What the model's forward would do: K/V of the last len(slots) tokens of seq into the
        slots. K holds the token id; V a function of the whole prefix up to the token, as a
        real model's V is (so a block reused after another prefix reads back wrong)."""
        k, v = expected_kv(seq)
        n = len(slots)
        self.cache.kv[0, 0].view(-1)[slots] = torch.tensor(k[len(seq) - n:])
        self.cache.kv[0, 1].view(-1)[slots] = torch.tensor(v[len(seq) - n:])
        self.cache.mark_written()

    def snapshot(self):
        c = self.cache
        return (list(c.ref_counts), {s: list(t) for s, t in c.block_tables.items()},
                {s: list(t) for s, t in c.seq_tokens.items()}, list(c.free_blocks),
                list(c.cached_free), dict(c.hash_to_block))

    def evictions(self, before):
        """Blocks that were cached and free in `before` (a snapshot) and have lost their hash
        entry since: evicted to make room."""
        cached_free, hashes = before[4], before[5]
        owner = {b: h for h, b in hashes.items()}
        return [b for b in cached_free if self.cache.hash_to_block.get(owner[b]) != b]

    def note_refused_collision(self, tokens, n_cached):
        """After share_prefix stopped at n_cached: was the next block a hash hit whose tokens
        differ (a collision the token check refused)?"""
        c, p = self.cache, self.cache.block_size
        i = n_cached // p
        if n_cached % p or (i + 1) * p > len(tokens):
            return
        h = None
        for j in range(i + 1):  # the chain hash of block i, as share_prefix computed it
            h = c.chain_hash(h, tuple(tokens[j * p:(j + 1) * p]))
        block = c.hash_to_block.get(h)
        if block is not None and c.block_tokens[block] != tuple(tokens[i * p:(i + 1) * p]):
            self.reach("collision refused")

    @rule(data=st.data(), tokens=TOKENS)
    def start(self, data, tokens):
        if self.model and data.draw(st.booleans()):  # often a live sequence's tokens, cut
            src = data.draw(st.sampled_from(sorted(self.model)))  # and extended, or the same
            tokens = self.model[src][:data.draw(st.integers(0, len(self.model[src])))] + \
                tokens if data.draw(st.booleans()) else list(self.model[src])
        sid, self.next_id = self.next_id, self.next_id + 1
        n_cached = self.cache.share_prefix(sid, tokens)
        p = self.cache.block_size
        assert n_cached % p == 0 or n_cached == len(tokens) - 1
        if n_cached:
            self.reach("prefix hit")
        self.note_refused_collision(tokens, n_cached)
        rest = tokens[n_cached:]
        if self.cache.can_append(sid, len(rest)):
            self.append_to(sid, tokens[:n_cached], rest)
            self.model[sid] = list(tokens)
        else:
            self.cache.free(sid)

    def append_to(self, sid, prefix, tokens):
        """append + write, noting copy-on-write and evictions; CacheFull must change nothing."""
        before = self.snapshot()
        if self.cache._shared_write_block(sid) is not None:
            self.reach("copy-on-write")
        try:
            slots = self.cache.append(sid, tokens)
        except CacheFull:
            self.reach("cache full")
            assert self.cache.n_new_blocks(sid, len(tokens)) > self.cache.n_free_blocks
            assert self.snapshot() == before, "a failed append changed the cache"
            return False
        if self.evictions(before):
            self.reach("eviction")
        self.write(slots, prefix + tokens)
        return True

    def pick(self, data):
        """A live sequence, one started if there is none (rules have no preconditions, so that
        no run is discarded for want of an enabled rule); None if none could start."""
        if not self.model:
            self.start(data, data.draw(TOKENS))
        return data.draw(st.sampled_from(sorted(self.model))) if self.model else None

    @rule(data=st.data(), tokens=TOKENS)
    def append(self, data, tokens):
        if (sid := self.pick(data)) is None:
            return
        if self.append_to(sid, self.model[sid], tokens):
            self.model[sid] += tokens
            if data.draw(st.booleans()):  # drafted tokens, some rejected: roll them back
                self.roll_back(sid, data.draw(st.integers(1, len(tokens))))
        else:  # the pool is full: preempt a sequence, as the scheduler would
            self.preempt(data, sid)

    def preempt(self, data, sid):
        """Free a sequence to make room for sid's tokens (sid itself, at times)."""
        victim = data.draw(st.sampled_from(sorted(self.model)))
        self.cache.free(victim)
        del self.model[victim]

    @rule(data=st.data(), tokens=A_FEW)
    def failed_pass(self, data, tokens):
        """Slots reserved, then the forward pass fails before writing them: the request is
        dropped and the cache forgets what the pass was to write (a later prefix hit on it
        would read garbage, which `consistent` catches)."""
        sid = self.pick(data)
        while sid is not None and not self.cache.can_append(sid, len(tokens)):
            self.preempt(data, sid)  # make room, as the scheduler would
            sid = self.pick(data) if sid not in self.model else sid
        if sid is None:
            return
        self.cache.append(sid, tokens)
        self.reach("failed pass")
        self.cache.free(sid)
        del self.model[sid]
        self.cache.abort_step()

    @rule(data=st.data())
    def fork(self, data):
        if (sid := self.pick(data)) is None:
            return
        child, self.next_id = self.next_id, self.next_id + 1
        self.cache.fork(sid, child)
        self.model[child] = list(self.model[sid])
        tokens = data.draw(TOKENS)  # the child samples on: copy-on-write if the block is partial
        if self.append_to(child, self.model[child], tokens):
            self.model[child] += tokens

    @rule(data=st.data())
    def truncate(self, data):
        if (sid := self.pick(data)) is None:
            return
        n = len(self.model[sid])
        p = self.cache.block_size  # any count, or a block's worth or more (releases one)
        self.roll_back(sid, data.draw(st.integers(0, n) | st.integers(min(n, p), n)))

    @rule(data=st.data())
    def slide(self, data):
        """A sliding window moved past the first keys of a sequence: its blocks holding only
        positions before some point are released (the last two stay)."""
        if (sid := self.pick(data)) is None:
            return
        n = len(self.model[sid])
        if self.cache.release_before(sid, data.draw(st.just(n) | st.integers(0, n))):
            self.reach("window released a block")

    def roll_back(self, sid, k):
        released = self.cache.block_table(sid).count(RELEASED)
        if released:  # never back into what the window released (truncate refuses that)
            with pytest.raises(ValueError, match="left the sliding window"):
                self.cache.truncate(sid, len(self.model[sid]) - released * self.cache.block_size)
            k = min(k, len(self.model[sid]) - released * self.cache.block_size - 1)
        n_blocks = len(self.cache.block_table(sid))
        self.cache.truncate(sid, k)
        del self.model[sid][len(self.model[sid]) - k:]
        if len(self.cache.block_table(sid)) < n_blocks:
            self.reach("truncation released a block")

    @rule(data=st.data())
    def free(self, data):
        if (sid := self.pick(data)) is None:
            return
        self.cache.free(sid)
        del self.model[sid]

    @invariant()
    def consistent(self):
        c = self.cache
        c.check_invariants()
        assert c.seq_lens == {s: len(t) for s, t in self.model.items()}
        k_flat, v_flat = c.kv[0, 0].view(-1), c.kv[0, 1].view(-1)
        p = c.block_size
        for s, tokens in self.model.items():
            table = c.block_table(s)
            held = [i for i in range(len(tokens)) if table[i // p] != RELEASED]
            slots = [table[i // p] * p + i % p for i in held]
            k, v = expected_kv(tokens)
            assert k_flat[slots].tolist() == [k[i] for i in held], \
                f"sequence {s} reads keys that are not its own"
            assert v_flat[slots].tolist() == [v[i] for i in held], \
                f"sequence {s} reads values of another prefix"
        assert c.n_free_blocks == sum(r == 0 for r in c.ref_counts)

    def teardown(self):
        for name in sorted(self.reached):  # hypothesis reports the share of runs per event
            event(name)
        for s in list(self.model):
            self.cache.free(s)
        self.cache.check_invariants()
        assert self.cache.n_free_blocks == self.cache.n_blocks


TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = __import__("hypothesis").settings(
    stateful_step_count=40, max_examples=__import__("hypothesis").settings().max_examples * 4)


def test_prefix_hit_reuses_blocks():
    c = KVCache(1, 1, 1, n_blocks=8, block_size=4)
    prompt = list(range(10))
    c.append(0, prompt)
    assert c.share_prefix(1, prompt[:8] + [99]) == 8  # two full blocks shared
    assert c.block_table(1) == c.block_table(0)[:2]
    assert c.ref_counts[c.block_table(0)[0]] == 2
    c.append(1, [99])
    c.check_invariants()


def test_freed_blocks_stay_cached_until_evicted_lru():
    """Freed blocks keep their hashes; the allocator takes never-hashed blocks first, then
    evicts exactly the least recently freed cached block, one at a time."""
    c = KVCache(1, 1, 1, n_blocks=4, block_size=2)
    for seq, toks in enumerate([[1, 2], [3, 4], [5, 6]]):
        c.append(seq, toks)                        # three full blocks, hashed
    a, b, d = (c.block_table(s)[0] for s in range(3))
    for seq in (1, 0, 2):                          # freed in the order b, a, d
        c.free(seq)
    assert c.n_free_blocks == 4 and c.n_cached_free_blocks == 3
    c.append(3, [9])                               # the never-hashed block
    assert c.n_cached_free_blocks == 3
    c.append(4, [8])                               # evicts b, the least recently freed
    assert c.block_table(4) == [b] and c.n_cached_free_blocks == 2
    assert c.share_prefix(5, [3, 4, 0]) == 0       # b's prefix is gone
    assert c.share_prefix(6, [1, 2, 0]) == 2 and c.block_table(6) == [a]
    c.free(6)                                      # a is now the most recently freed
    c.append(7, [7])                               # so d goes first
    assert c.block_table(7) == [d]
    c.check_invariants()


def test_free_releases_the_tail_before_the_prefix():
    """A finished sequence's blocks are freed last first, so under pressure its private tail
    is evicted before the prefix that other requests may share."""
    c = KVCache(1, 1, 1, n_blocks=3, block_size=2)
    c.append(0, [1, 2, 3, 4])
    prefix, tail = c.block_table(0)
    c.free(0)
    c.append(1, [9])                               # the never-hashed block
    c.append(2, [8])                               # evicts the least recently freed
    assert c.block_table(2) == [tail]
    assert c.share_prefix(3, [1, 2, 0]) == 2 and c.block_table(3) == [prefix]
    c.check_invariants()


def test_a_hash_hit_rechecks_the_tokens():
    """Two different blocks whose chain hashes collide: the token check refuses the hit."""
    class OneHash(KVCache):
        chain_hash = staticmethod(lambda parent, tokens: 42)  # every block collides
    c = OneHash(1, 1, 1, n_blocks=4, block_size=2)
    c.append(0, [1, 2])
    assert c.share_prefix(1, [3, 4, 5]) == 0       # same hash, other tokens: a miss
    assert c.share_prefix(2, [1, 2, 5]) == 2       # same tokens: a hit
    c.check_invariants()


def test_a_hash_hit_rechecks_the_prefix():
    """A colliding block with the same tokens but computed after another prefix is a miss:
    its K/V depend on every earlier token, not just its own."""
    class TokensHash(KVCache):  # blind to the parent: equal tokens collide anywhere
        chain_hash = staticmethod(lambda parent, tokens: hash(tuple(tokens)))
    c = TokensHash(1, 1, 1, n_blocks=4, block_size=1)
    c.append(0, [7])                                # block a: [7] at the start
    a = c.block_table(0)[0]
    assert c.share_prefix(1, [7, 7, 5]) == 1        # [7] after [7] is not block a again
    c.append(1, [7, 5])
    assert c.block_table(1)[0] == a and a not in c.block_table(1)[1:]
    c.check_invariants()


def test_abort_step_forgets_only_the_unwritten_blocks():
    """After a failed forward pass, the blocks it was to write are not hits any more; blocks
    written by earlier passes (a system prompt) stay cached."""
    c = KVCache(1, 1, 1, n_blocks=8, block_size=2)
    c.append(0, [1, 2, 3, 4])
    c.mark_written()                               # an earlier pass wrote them
    c.free(0)
    assert c.share_prefix(1, [1, 2, 3, 4, 5]) == 4
    c.append(1, [5, 6])                            # reserved, hashed, not yet written
    assert c.unwritten == {c.block_table(1)[2]}
    assert c.share_prefix(2, [1, 2, 3, 4, 5, 6, 7]) == 6   # a same-step hit may map it...
    c.free(2)
    c.free(1)
    c.abort_step()                                 # ...but the pass failed
    c.check_invariants()
    assert not c.unwritten and c.share_prefix(3, [1, 2, 3, 4, 5, 6, 7]) == 4
    c.check_invariants()


def test_copies_unwritten_waits_for_the_pass():
    """A sequence whose first write lands in a shared block that this step's pass has yet to
    write must wait: a copy now would copy nothing."""
    c = KVCache(1, 1, 1, n_blocks=8, block_size=2)
    c.append(0, [1, 2, 3, 4])                      # reserved this step
    assert c.share_prefix(1, [1, 2, 3, 4]) == 3    # whole-prompt hit: its last token is
    assert c.copies_unwritten(1)                   # written into the shared last block
    c.mark_written()
    assert not c.copies_unwritten(1)
    c.check_invariants()


def test_whole_prompt_hit_leaves_last_token_to_compute():
    c = KVCache(1, 1, 1, n_blocks=8, block_size=4)
    c.append(0, [5, 6, 7, 8])
    assert c.share_prefix(1, [5, 6, 7, 8]) == 3
    assert c.n_new_blocks(1, 1) == 1  # the shared last block is copied before the write
    c.append(1, [8])
    assert c.block_table(1) != c.block_table(0)
    c.check_invariants()


def test_fork_copies_a_shared_block_on_write():
    c = KVCache(1, 1, 1, n_blocks=8, block_size=4)
    c.kv[0, 0].view(-1)[c.append(0, [1, 2])] = torch.tensor([1., 2.])
    c.fork(0, 1)
    slot_child = c.append(1, [3])[0]
    slot_parent = c.append(0, [4])[0]
    assert slot_child // 4 != slot_parent // 4  # different blocks after the copy
    assert c.kv[0, 0].view(-1)[slot_child // 4 * 4:slot_child // 4 * 4 + 2].tolist() == [1., 2.]
    c.check_invariants()


def test_truncate_releases_blocks():
    c = KVCache(1, 1, 1, n_blocks=4, block_size=2)
    c.append(0, [1, 2, 3, 4, 5])
    c.truncate(0, 3)
    assert c.seq_len(0) == 2 and len(c.block_table(0)) == 1 and c.n_free_blocks == 3
    with pytest.raises(ValueError):
        c.truncate(0, 3)
    c.check_invariants()


def test_memory_formula_for_smollm2_shapes():
    # 2 (K and V) * 30 layers * 3 KV heads * 64 dims * 2 bytes (bf16)
    assert bytes_per_token(30, 3, 64, torch.bfloat16) == 23040
    assert bytes_per_token(30, 3, 64, torch.float32) == 46080
    n = blocks_for_budget(1 << 20, 16, 30, 3, 64, torch.bfloat16)
    assert n == (1 << 20) // (16 * 23040) == 2
    c = KVCache(30, 3, 64, n_blocks=n, block_size=16, dtype=torch.bfloat16)
    assert c.kv.numel() * c.kv.element_size() == n * 16 * 23040
    c.append(0, list(range(17)))
    assert c.bytes_in_use == 2 * 16 * 23040 and c.n_free_blocks == 0


def test_pool_layout_puts_each_layer_contiguous():
    c = KVCache(n_layer=3, n_kv_head=2, head_dim=4, n_blocks=5, block_size=8)
    assert c.kv.shape == (3, 2, 2, 5, 8, 4)  # (L, K/V, K heads, N blocks, P slots, D)
    assert c.kv[1, 0].is_contiguous() and c.kv[2, 1].is_contiguous()


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError):
        KVCache(1, 1, 1, n_blocks=0)
    with pytest.raises(ValueError):
        KVCache(1, 1, 1, n_blocks=4, block_size=0)


def test_can_append_counts_the_room_left_in_the_last_block():
    c = KVCache(1, 1, 1, n_blocks=2, block_size=4)
    c.append(0, [1])                               # 3 slots left in its block, 1 block free
    assert c.can_append(0, 7) and not c.can_append(0, 8)
    assert c.can_append(1, 4) and not c.can_append(1, 5)   # a new sequence has no room yet


def test_misuse_is_refused_with_what_was_asked():
    c = KVCache(1, 1, 1, n_blocks=4, block_size=2)
    c.append(0, [1, 2, 3])
    with pytest.raises(ValueError, match="sequence 0 already exists"):
        c.share_prefix(0, [1])
    with pytest.raises(ValueError, match="sequence 0 already exists"):
        c.fork(0, 0)
    with pytest.raises(ValueError, match="cannot drop 4 of 3 tokens"):
        c.truncate(0, 4)
    with pytest.raises(ValueError, match="cannot drop -1 of 3 tokens"):
        c.truncate(0, -1)
    c.check_invariants()


def test_a_full_pool_says_what_it_lacks():
    c = KVCache(1, 1, 1, n_blocks=2, block_size=4)
    c.append(0, [1])
    with pytest.raises(CacheFull, match="sequence 0 needs 2 more blocks of 4 tokens, 1 of 2 "
                                        "are free"):
        c.append(0, [2] * 8)
    with pytest.raises(ValueError, match=r"the KV cache \(2 blocks of 4 tokens = 8 tokens\) is "
                                         "too small for one request of 9 tokens"):
        c.check_fits(9)
    c.check_fits(8)


def test_a_shared_block_costs_a_block_only_when_written():
    c = KVCache(1, 1, 1, n_blocks=4, block_size=4)
    c.append(0, [1, 2])
    c.fork(0, 1)
    assert c.n_new_blocks(1, 0) == 0 and c.n_new_blocks(1, 1) == 1 and c.n_new_blocks(1, 3) == 2


def test_defaults_and_per_layer_views():
    c = KVCache(2, 1, 1, n_blocks=1)
    assert c.block_size == 16 and c.scales is None and c.layers[1][2] is None
    q = KVCache(2, 1, 1, n_blocks=1, dtype=torch.int8)
    for i, (k, v, (ks, vs)) in enumerate(q.layers):
        assert k.data_ptr() == q.kv[i, 0].data_ptr() and v.data_ptr() == q.kv[i, 1].data_ptr()
        assert ks.data_ptr() == q.scales[i, 0].data_ptr()
        assert vs.data_ptr() == q.scales[i, 1].data_ptr()
    assert q.scales.dtype == torch.float32
    with pytest.raises(ValueError, match=r"block_size \(0\) and n_blocks \(4\) must be >= 1"):
        KVCache(1, 1, 1, n_blocks=4, block_size=0)


@pytest.mark.parametrize("kv_dtype, want", [(None, torch.bfloat16), ("auto", torch.bfloat16),
                                            (torch.bfloat16, torch.bfloat16),
                                            ("int8", torch.int8), ("fp8", torch.float8_e4m3fn)])
def test_kv_storage_dtype(kv_dtype, want):
    assert kv_storage_dtype(kv_dtype, torch.bfloat16, "cpu") == want


def test_kv_storage_dtype_refuses_others():
    with pytest.raises(ValueError, match="unsupported kv_dtype 'int4' \\(auto, int8 or fp8\\)"):
        kv_storage_dtype("int4", torch.float32, "cpu")


def test_the_pool_lives_on_its_device(monkeypatch):
    """Pools, scales, block tables and budgets follow the device they are given (the meta
    device stands in for a GPU here: tensors with a device and no memory)."""
    meta = torch.device("meta")
    c = KVCache(1, 1, 1, n_blocks=4, block_size=2, dtype=torch.int8, device=meta)
    assert c.kv.device == meta and c.scales.device == meta
    c.append(0, [1, 2, 3])
    assert c.block_table_tensor([0]).device == meta
    assert c.block_table_tensor([0], device="cpu").tolist() == [c.block_table(0)]
    free = {torch.device("cpu"): 1 << 30, meta: 1 << 33}
    monkeypatch.setattr(cache_mod, "free_memory", lambda device: free[torch.device(device)])
    per_block = 16 * bytes_per_token(2, 2, 8, torch.float32)
    c = KVCache.from_budget(0.5, 16, 2, 2, 8, max_seq_len=1 << 20, device=meta)
    assert c.kv.device == meta and c.n_blocks == (1 << 32) // per_block  # half the meta memory


def test_scales_are_fp32_whatever_the_default_dtype():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert KVCache(1, 1, 1, n_blocks=1, dtype=torch.int8).scales.dtype == torch.float32
    finally:
        torch.set_default_dtype(default)


def test_gpu_memory_and_fp8_support_come_from_the_named_gpu(monkeypatch):
    """CUDA's answers for the GPU named (faked: the suite runs without one too)."""
    gpus = {torch.device("cuda", 0): ((8, 0), (1 << 30, 1 << 34)),
            torch.device("cuda", 1): ((8, 9), (1 << 31, 1 << 34))}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: gpus[d][0])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: gpus[d][1])
    assert cache_mod.free_memory("cuda:0") == 1 << 30
    assert cache_mod.free_memory("cuda:1") == 1 << 31
    with pytest.raises(ValueError, match=r"^kv_dtype fp8 needs a GPU of compute capability 8\.9 "
                                         r"or newer \(Ada, Hopper\); use int8$"):
        kv_storage_dtype("fp8", torch.bfloat16, "cuda:0")
    assert kv_storage_dtype("fp8", torch.bfloat16, "cuda:1") == torch.float8_e4m3fn
    assert kv_storage_dtype("int8", torch.bfloat16, "cuda:0") == torch.int8


def test_forget_cached_empties_the_prefix_cache_only():
    c = KVCache(1, 1, 1, n_blocks=6, block_size=2)
    c.append(0, [1, 2, 3, 4])
    c.append(1, [5, 6, 7])
    c.free(0)
    first = c.block_table(1)[0]
    c.forget_cached()
    assert c.n_cached_free_blocks == 0 and c.n_free_blocks == 4
    assert c.share_prefix(2, [1, 2, 3]) == 0 and c.share_prefix(3, [5, 6, 0]) == 2
    assert c.block_table(3) == [first]
    c.check_invariants()


def test_block_table_tensor_pads_with_block_zero():
    c = KVCache(1, 1, 1, n_blocks=6, block_size=2)
    c.append(0, [1, 2, 3])
    c.share_prefix(1, [])
    t = c.block_table_tensor([1, 0])
    assert t.dtype == torch.int64 and t.tolist() == [[0, 0], c.block_table(0)]
    assert c.block_table_tensor([1]).tolist() == [[0]]


def test_chain_hash_names_the_whole_prefix():
    """Other parents give other hashes (the chain names the prefix, not just the block), and
    the same prefix hashes the same in every process (a disk or peer tier can use it)."""
    import subprocess
    import sys
    root = chain_hash(None, (1, 2))
    assert len({root, chain_hash(root, (1, 2)), chain_hash(root + 1, (1, 2))}) == 3
    here = os.path.dirname(os.path.abspath(cache_mod.__file__))
    other = subprocess.run([sys.executable, "-c", "from cache import chain_hash; "
                            "print(chain_hash(None, (1, 2)))"], capture_output=True, text=True,
                           check=True, cwd=here)
    assert int(other.stdout) == root


def test_blocks_for_budget_is_exact_for_any_size():
    # 8 bytes a token, one-token blocks: 2**60 - 1 bytes hold 2**57 - 1 blocks, not 2**57
    assert blocks_for_budget((1 << 60) - 1, 1, 1, 1, 1, torch.float32) == (1 << 57) - 1


def broken_states():
    """(name, corruption, message): each corruption of a consistent pool that check_invariants
    must name. The pool: sequence 0 holds 1..5 (two full hashed blocks and a partial one), a
    freed sequence left [6, 7] cached, sequence 2 is a whole-prompt hit on 0's first four
    tokens (3 tokens computed, 2 blocks mapped) and sequence 3 holds 1..4 in its own blocks."""
    def pool():
        one = KVCache(1, 1, 1, n_blocks=4, block_size=1)  # with one-token blocks, a
        one.append(0, [1, 2])                             # whole-prompt hit holds one block
        assert one.share_prefix(1, [1, 2]) == 1           # more than its tokens need
        one.check_invariants()
        c = KVCache(1, 1, 1, n_blocks=8, block_size=2)
        c.append(0, [1, 2, 3, 4, 5])
        c.append(1, [6, 7])
        c.free(1)
        assert c.share_prefix(2, [1, 2, 3, 4]) == 3
        c.append(3, [1, 2, 3, 4])  # the same tokens again, in blocks of its own
        c.mark_written()
        c.check_invariants()  # the whole-prompt hit is a legal state
        return c
    t = lambda c: c.block_table(0)  # noqa: E731
    cached = lambda c: next(iter(c.cached_free))  # noqa: E731
    free = lambda c: c.free_blocks[0]  # noqa: E731
    return pool, [
        ("refs", lambda c: c.ref_counts.__setitem__(t(c)[2], 2),
         "reference counts differ from block-table references"),
        ("free twice", lambda c: c.free_blocks.append(free(c)), "a block is free twice"),
        ("free and used", lambda c: c.free_blocks.append(t(c)[2]), "a block is both free and used"),
        ("lost", lambda c: c.free_blocks.popleft(), "a block is lost"),
        ("stale entry", lambda c: c.block_hash.__setitem__(t(c)[0], 5),
         r"hash entry of block \d+ is stale"),
        ("tokens", lambda c: c.block_tokens.__setitem__(t(c)[0], (9, 9)),
         r"block \d+ does not hash to its entry"),
        ("parent", lambda c: c.block_origin.__setitem__(t(c)[1], (cached(c),
                                                                   c.generation[cached(c)])),
         r"block \d+ is chained on a hash its parent does not have"),
        ("cached unhashed", lambda c: c.hash_to_block.pop(c.block_hash[cached(c)]),
         r"cached block \d+ unhashed"),
        ("free hashed", lambda c: c.block_hash.__setitem__(free(c), 7),
         r"free block \d+ keeps a hash"),
        ("leftovers", lambda c: c.block_tokens.__setitem__(free(c), (1, 2)),
         r"unhashed block \d+ keeps what its hash stood for"),
        ("unwritten", lambda c: c.unwritten.add(free(c)), r"unwritten block \d+ is not hashed"),
        ("tables", lambda c: c.seq_tokens.__setitem__(9, []), "tables and tokens disagree"),
        ("length", lambda c: c.seq_tokens[0].pop(), "sequence 0 has 3 blocks for 4 tokens"),
        ("length", lambda c: c.seq_tokens[0].__delitem__(slice(3, None)),
         "sequence 0 has 3 blocks for 3 tokens"),
        ("length", lambda c: c.seq_tokens[0].extend([6, 7]),
         "sequence 0 has 3 blocks for 7 tokens"),
        ("contents", lambda c: c.seq_tokens[0].__setitem__(3, 9),
         r"block \d+ of sequence 0 holds other tokens"),
        ("contents", lambda c: c.seq_tokens[2].__setitem__(0, 9),
         r"block \d+ of sequence 2 holds other tokens"),
        ("contents", lambda c: c.seq_tokens[3].__setitem__(3, 9),
         r"block \d+ of sequence 3 holds other tokens"),
    ]


@pytest.mark.parametrize("i", range(len(broken_states()[1])))
def test_check_invariants_names_each_corruption(i):
    """The bookkeeping check is the oracle of most tests here: each way of corrupting a pool
    fails it, with a message saying what broke."""
    pool, cases = broken_states()
    name, corrupt, message = cases[i]
    c = pool()
    corrupt(c)
    with pytest.raises(AssertionError, match=f"^{message}(\n|$)"):  # the whole message
        c.check_invariants()


def test_freeing_an_unknown_sequence_changes_nothing():
    c = KVCache(1, 1, 1, n_blocks=4, block_size=2)
    c.append(0, [1, 2, 3])
    c.free(7)
    assert c.seq_lens == {0: 3} and c.n_free_blocks == 2
    c.check_invariants()


# ------------------------------------------------------------------------------------------
# quantized pools and memory planning

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8,
                                   torch.float8_e4m3fn])
def test_memory_accounting_equals_the_real_tensor_sizes(dtype):
    """bytes_per_token (the formula, scales included) times the pool's slots is exactly what
    its tensors occupy; blocks_for_budget never exceeds the budget."""
    budget = 3 << 20
    n = blocks_for_budget(budget, 16, 30, 3, 64, dtype)
    c = KVCache(30, 3, 64, n_blocks=n, block_size=16, dtype=dtype)
    real = c.kv.nbytes + (0 if c.scales is None else c.scales.nbytes)
    assert real == n * 16 * c.bytes_per_token <= budget < (n + 1) * 16 * c.bytes_per_token
    quantized = dtype in (torch.int8, torch.float8_e4m3fn)
    assert c.bytes_per_token == 2 * 30 * 3 * (64 * dtype.itemsize + 4 * quantized)
    assert (c.scales is not None) == quantized and (c.layers[0][2] is not None) == quantized


def test_int8_pool_is_about_a_quarter_of_fp32():
    # SmolLM2-135M: 2 * 30 * 3 * (64 + 4) = 12,240 bytes per token against 46,080 in fp32
    ratio = bytes_per_token(30, 3, 64, torch.int8) / bytes_per_token(30, 3, 64, torch.float32)
    assert bytes_per_token(30, 3, 64, torch.int8) == 12240 and 0.26 < ratio < 0.27


def test_copy_on_write_copies_the_scales():
    c = KVCache(1, 1, 2, n_blocks=4, block_size=4, dtype=torch.int8)
    slots = c.append(0, [1, 2])
    c.kv[0, 0].view(-1, 2)[slots] = torch.tensor([[3, 4], [5, 6]], dtype=torch.int8)
    c.scales[0, 0].view(-1)[slots] = torch.tensor([0.5, 0.25])
    c.fork(0, 1)
    [slot] = c.append(1, [9])  # the shared block is copied before the child writes into it
    c.check_invariants()
    copied = c.scales[0, 0].view(-1)[slot - 2:slot]
    assert slot // 4 != slots[0] // 4 and copied.tolist() == [0.5, 0.25]
    assert c.kv[0, 0].view(-1, 2)[slot - 2:slot].tolist() == [[3, 4], [5, 6]]


@pytest.mark.parametrize("text, want", [
    ("2GiB", 2 << 30), ("512 MiB", 512 << 20), ("1.5GB", 1_500_000_000), ("4096KiB", 4 << 20),
    ("1048576", 1 << 20), (1 << 20, 1 << 20), ("1B", 1), ("1.9 b", 1)])
def test_parse_budget_sizes(text, want):
    assert parse_budget(text) == want


def test_parse_budget_fraction_of_free_memory():
    assert 0 < parse_budget(0.5) <= parse_budget(1.0) and parse_budget("0.5") == parse_budget(0.5)


@pytest.mark.parametrize("bad", ["2 parsecs", "", "-1GiB", 0, -5, 1.5, 0.0, "GiB", "1.5",
                                 "4096", 4096, "0.0001KiB", "0"])
def test_parse_budget_rejects_bad_input(bad):
    """A bare number is a fraction in (0, 1] or whole bytes from 1 MiB up; anything else is
    refused with one line naming the accepted forms."""
    with pytest.raises(ValueError, match="give bytes with a unit"):
        parse_budget(bad)


@pytest.mark.parametrize("bad", [None, [1], True])
def test_parse_budget_rejects_other_types(bad):
    with pytest.raises(TypeError, match="give bytes with a unit"):
        parse_budget(bad)


def test_parse_budget_names_the_empty_budget():
    with pytest.raises(ValueError, match=r"KV budget '0\.4 B' is empty"):
        parse_budget(" 0.4 B ")


def test_free_ram_counts_the_page_cache_the_kernel_can_drop(tmp_path):
    """A machine that has read a few GiB of files has almost no free pages but plenty of RAM
    available: the budget is checked against MemAvailable, not MemFree."""
    import cache as cache_mod
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       25000000 kB\nMemFree:          230000 kB\n"
                       "MemAvailable:   24000000 kB\nBuffers:            4000 kB\n")
    assert cache_mod.free_memory("cpu", meminfo) == 24000000 * 1024
    missing = cache_mod.free_memory("cpu", tmp_path / "absent")  # not Linux: the free pages
    assert missing == os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_a_budget_beyond_memory_is_refused_with_what_fits(monkeypatch):
    with pytest.raises(ValueError, match=r"more than the [0-9.]+ GiB of memory available"):
        KVCache.from_budget("100TiB", 16, 2, 2, 8, max_seq_len=64)
    assert KVCache.from_budget("1MiB", 16, 2, 2, 8, max_seq_len=16).n_blocks == 64  # the cap
    import cache as cache_mod
    monkeypatch.setattr(cache_mod, "free_memory", lambda device: 3 << 30)
    with pytest.raises(ValueError, match=r"a KV budget of 3\.50 GiB is more than the 3\.00 GiB"):
        KVCache.from_budget("3.5GiB", 16, 2, 2, 8, max_seq_len=64)
    assert KVCache.from_budget("3GiB", 16, 2, 2, 8, max_seq_len=64).n_blocks == 64 * 4  # all of it
    assert KVCache.from_budget(0.5, 16, 2, 2, 8, max_seq_len=64).n_blocks == 64 * 4


def test_a_budget_smaller_than_a_block_still_gives_one():
    # 30 layers x 3 heads x 64 x 4 bytes x 2 x 16 slots = 1.4 MiB a block: 1 MiB holds none
    assert KVCache.from_budget("1MiB", 16, 30, 3, 64, max_seq_len=2048).n_blocks == 1


# ------------------------------------------------------------------------------------------
# the disk tier (prompt caching across processes)

LONG_TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=24)


def fill(cache, sid, tokens):
    """A request through the cache as the engine runs it: share the prefix (from the pool or
    the disk), append the rest, write its K/V (expected_kv), end the pass. Returns n_cached."""
    n_cached = cache.share_prefix(sid, tokens)
    slots = cache.append(sid, tokens[n_cached:])
    k, v = expected_kv(tokens)
    cache.kv[0, 0].view(-1)[slots] = torch.tensor(k[n_cached:])
    cache.kv[0, 1].view(-1)[slots] = torch.tensor(v[n_cached:])
    cache.mark_written()
    return n_cached


@given(first=st.lists(LONG_TOKENS, min_size=1, max_size=5),
       second=st.lists(LONG_TOKENS, min_size=1, max_size=5), block_size=st.sampled_from([1, 2, 4]),
       budget_blocks=st.integers(1, 16),
       damage=st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from(["cut", "flip", "swap"])),
                       max_size=3), data=st.data())
@settings(deadline=None)
def test_disk_tier_restores_a_prefix_s_own_kv_or_nothing(first, second, block_size,
                                                        budget_blocks, damage, data):
    """One pool spills every written block to a directory; its files are then cut, changed or
    swapped; a fresh pool on that directory (a new process) restores the longest prefix it
    finds for prompts of its own (often those of the first): every restored slot holds the
    prompt's own K/V, damaged files are removed and never restored, the pool's invariants hold,
    and the directory stays within its budget. A pool with another salt restores nothing."""
    def pool(salt):
        c = KVCache(n_layer=1, n_kv_head=1, head_dim=1, n_blocks=64, block_size=block_size)
        c.attach_tiers(salt, disk=cache_mod.DiskTier(d, budget, salt))
        return c
    with tempfile.TemporaryDirectory() as d:
        budget = budget_blocks * block_file_size(block_size)
        one = pool(b"model A")
        for sid, tokens in enumerate(first):
            fill(one, sid, tokens)
            one.free(sid)
            assert one.disk.size() <= budget
        files = sorted(Path(d).glob("*.safetensors"))
        damaged = set()
        for at, how in damage:
            if not files:
                break
            f = files[at % len(files)]
            raw = bytearray(f.read_bytes())
            if not raw:
                continue
            if how == "cut":
                f.write_bytes(raw[:at % len(raw)])
            elif how == "flip":
                raw[at % len(raw)] ^= 1 << at % 8
                f.write_bytes(raw)
            elif len(files) > 1:
                f.write_bytes(files[(at + 1) % len(files)].read_bytes())
            damaged.add(f.name)
        assert pool(b"model B").share_prefix(0, first[0]) == 0  # another salt: no hit
        two = pool(b"model A")
        prompts = second + [data.draw(st.sampled_from(first)) for _ in first]
        for sid, tokens in enumerate(prompts):
            share_and_check(two, sid, tokens)
            two.free(sid)
            two.check_invariants()
            fill(two, sid, tokens)  # prefill the rest: the pool spills it in turn
            two.free(sid)
        for f in Path(d).glob("*.safetensors"):  # each file valid, or damaged and never read
            try:
                with cache_mod.safe_open(f, "pt") as st_file:
                    toks = st_file.get_tensor("tokens").tolist()
                valid = two.disk.load(bytes.fromhex(f.name.split(".")[0]), toks,
                                      (1, 2, 1, block_size, 1), torch.float32) is not None
            except Exception:
                valid = False
            assert valid or f.name in damaged, f.name
        assert two.disk.size() <= budget and not list(Path(d).glob("*.tmp"))


def share_and_check(cache, sid, tokens):
    """share_prefix, then check that every slot it mapped (from the pool or a tier) holds the
    prompt's own K/V."""
    n_cached = cache.share_prefix(sid, tokens)
    table, p = cache.block_table(sid), cache.block_size
    k, v = expected_kv(tokens)
    slots = [table[i // p] * p + i % p for i in range(n_cached)]
    assert cache.kv[0, 0].view(-1)[slots].tolist() == k[:n_cached]
    assert cache.kv[0, 1].view(-1)[slots].tolist() == v[:n_cached]


def block_file_size(block_size) -> int:
    """Bytes of one block file of a 1-layer, 1-head, head-dim-1 fp32 pool."""
    with tempfile.TemporaryDirectory() as d:
        c = KVCache(n_layer=1, n_kv_head=1, head_dim=1, n_blocks=1, block_size=block_size)
        c.attach_tiers(b"probe", disk=cache_mod.DiskTier(d, 1 << 20, b"probe"))
        fill(c, 0, [0] * block_size)
        return c.disk.size()


def test_disk_tier_refuses_bad_settings(tmp_path):
    """A prompt cache directory that cannot be made, or a budget that is not a size: one line."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cannot create"):
        cache_mod.DiskTier(tmp_path / "file" / "sub", 1 << 20, b"s")
    for bad in ("lots", "-1GiB", "0", "1.5 parsecs"):
        with pytest.raises(ValueError, match="prompt cache budget"):
            cache_mod.parse_size(bad, "prompt cache budget")
    assert cache_mod.parse_size("2GiB") == 2 << 30 and cache_mod.parse_size("4096") == 4096


@given(prompts=st.lists(LONG_TOKENS, min_size=2, max_size=6), block_size=st.sampled_from([1, 2, 4]),
       n_blocks=st.integers(4, 10), budget_blocks=st.integers(1, 8), data=st.data())
@settings(deadline=None)
def test_host_tier_keeps_evicted_blocks_own_kv(prompts, block_size, n_blocks, budget_blocks,
                                               data):
    """A small pool with a host tier (as a GPU pool has; here on the CPU): blocks the pool
    evicts go to host memory under its budget, and a prompt that comes again restores them
    from there, each slot holding the prompt's own K/V; invariants hold throughout."""
    c = KVCache(n_layer=1, n_kv_head=1, head_dim=1, n_blocks=n_blocks, block_size=block_size)
    per_block = 2 * block_size * 4  # K and V, fp32, one head, head dim 1
    c.attach_tiers(b"host", host=cache_mod.HostTier(budget_blocks * per_block))
    restored = 0
    for sid, tokens in enumerate(prompts + [data.draw(st.sampled_from(prompts))
                                            for _ in prompts]):
        if c.blocks_needed(len(tokens)) > n_blocks:
            continue
        share_and_check(c, sid, tokens)
        restored += c.n_restored
        c.free(sid)
        fill(c, sid, tokens)
        c.free(sid)
        c.check_invariants()
        assert c.host.bytes <= c.host.budget
    event(f"restored from host: {restored > 0}")
