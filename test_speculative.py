"""
Rung 7 of the ladder: speculative greedy == target greedy, token for token (random tiny models,
k, batches, both proposers, a pool tight enough to preempt); the acceptance rule reproduces the
target distribution (chi-square at a fixed seed, for a full draft distribution and for a point
mass); rollback keeps the cache invariants and leaks no block, in both caches; bad options are
one clear error (API and CLI).
"""

import pytest
import torch
from hypothesis import given, strategies as st

import speculative as spec_mod
from conftest import make_checkpoint
from generate import LLM, SamplingParams
from speculative import Speculator, accept_draft, accept_greedy, propose_ngram

@pytest.fixture(scope="session")
def models(engine, tiny_dir):
    """models(arch) -> a tiny fp32 target (with an empty pool) and the path of a one-layer
    draft with the same tokenizer and other random weights."""
    layers = {"gpt2": dict(n_layer=1), "llama": dict(num_hidden_layers=1)}
    return lambda arch: (engine(arch), str(tiny_dir(arch, seed=1, **layers[arch])))


def proposer_name(llm, draft_path, which):
    return {"ngram": "ngram", "draft": f"draft:{draft_path}",
            "self": f"draft:{llm.model_path}"}[which]


def assert_no_block_held(llm, spec=None):
    """Both caches consistent and empty of live sequences (cached blocks may stay)."""
    drafts = [spec.proposer] if spec is not None else []
    for cache in [llm.cache] + [d.llm.cache for d in drafts if isinstance(d, spec_mod.DraftModel)]:
        cache.check_invariants()
        assert cache.n_free_blocks == cache.n_blocks and not cache.block_tables


# prompts over a small alphabet repeat themselves, so prompt lookup finds matches
prompts_st = st.lists(st.lists(st.integers(0, 12), min_size=1, max_size=16), min_size=1,
                      max_size=4)

# ------------------------------------------------------------------------------------------
# greedy: exactly the target's tokens


@given(arch=st.sampled_from(["gpt2", "llama"]), prompts=prompts_st, k=st.integers(1, 8),
       which=st.sampled_from(["ngram", "draft", "self"]), n_new=st.integers(1, 16),
       ignore_eos=st.booleans())
def test_greedy_speculative_equals_greedy_target(models, arch, prompts, k, which, n_new,
                                                 ignore_eos):
    llm, draft = models(arch)
    p = SamplingParams(max_new_tokens=n_new, ignore_eos=ignore_eos)
    want = llm.generate(prompts, p)
    spec = Speculator(proposer_name(llm, draft, which), k)
    got = llm.generate(prompts, p, speculator=spec)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.text for g in got] == [w.text for w in want]
    assert [g.finish_reason for g in got] == [w.finish_reason for w in want]
    stats = spec.stats
    assert stats.n_accepted <= stats.n_proposed
    assert stats.n_tokens == sum(len(w.token_ids) + (w.finish_reason == "stop") for w in want)
    assert_no_block_held(llm, spec)


def test_target_as_its_own_draft_accepts_everything(models):
    llm, _ = models("llama")
    p = SamplingParams(max_new_tokens=24, ignore_eos=True)
    spec = Speculator(f"draft:{llm.model_path}", 4)
    llm.generate([[1, 2, 3], [4, 5, 6, 7, 8]], p, speculator=spec)
    stats = spec.stats
    assert stats.n_proposed > 0 and stats.acceptance_rate == 1.0
    assert stats.tokens_per_forward > 3  # 5 tokens a verification pass, 1 for the prefill


def test_speculation_counts_every_target_forward(models, monkeypatch):
    """One sequence: the stats count exactly the target's forward passes (plain and verifying)
    and the tokens they gave."""
    llm, _ = models("llama")
    calls, run = [], llm.run

    def counted(batch, all_logits=False):
        calls.append(all_logits)
        return run(batch, all_logits)
    monkeypatch.setattr(llm, "run", counted)
    spec = Speculator("ngram", 3)
    [out] = llm.generate([[3, 4, 5, 3, 4, 5, 3, 4]], SamplingParams(max_new_tokens=24,
                                                                    ignore_eos=True),
                         speculator=spec)
    stats = spec.stats
    assert len(out.token_ids) == stats.n_tokens == 24
    assert stats.n_verify_forwards == sum(calls) >= 2
    assert stats.n_seq_forwards == len(calls) > stats.n_verify_forwards
    assert 0 <= stats.n_accepted <= stats.n_proposed <= 3 * stats.n_verify_forwards
    assert_no_block_held(llm, spec)


@given(prompts=st.lists(st.lists(st.integers(0, 12), min_size=1, max_size=24), min_size=2,
                        max_size=5), n_blocks=st.integers(10, 14), k=st.integers(1, 8),
       which=st.sampled_from(["ngram", "draft"]))
def test_tight_pool_speculative_equals_plain(models, prompts, n_blocks, k, which):
    """A pool too small for everyone's drafts: k shrinks, plain steps preempt; no request is
    lost and the tokens are still the target's."""
    llm, draft = models("llama")
    tight = LLM(llm.model_path, dtype="float32", block_size=4, n_blocks=n_blocks,
                max_batch_tokens=16)
    p = SamplingParams(max_new_tokens=16, ignore_eos=True)
    want = llm.generate(prompts, p)
    spec = Speculator(proposer_name(llm, draft, which), k)
    got = tight.generate(prompts, p, speculator=spec)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert_no_block_held(tight, spec)


# ------------------------------------------------------------------------------------------
# the rule: exact distribution

# chi-square critical value for 4 degrees of freedom (5 tokens) at significance 0.001; the
# trials use a fixed seed, so the test is deterministic, and it would fail by chance for one
# seed in a thousand
CHI2_4DF_999 = 18.467


def chi_square(counts, probs):
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token outside the target's support came out"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


P = torch.tensor([[0.05, 0.40, 0.25, 0.30, 0.00],
                  [0.10, 0.10, 0.50, 0.00, 0.30],
                  [0.20, 0.20, 0.20, 0.20, 0.20]])
Q = torch.tensor([[0.30, 0.10, 0.30, 0.10, 0.20],
                  [0.05, 0.60, 0.05, 0.30, 0.00]])


@pytest.mark.parametrize("deterministic", [False, True])
def test_acceptance_rule_reproduces_the_target_distribution(deterministic):
    """Token 1 of every trial, and token 2 of the trials that accepted draft 1, follow p's
    rows 0 and 1, whatever the draft: drawn from q (a draft model), or a fixed token (prompt
    lookup: q a point mass), here one the target gives little or no probability."""
    rng = torch.Generator().manual_seed(1234)
    n_trials = 8000
    first, second = torch.zeros(5), torch.zeros(5)
    for _ in range(n_trials):
        if deterministic:
            draft, q = [0, 3], None
        else:
            draft = [int(torch.multinomial(Q[i], 1, generator=rng)) for i in range(2)]
            q = Q
        out = accept_draft(P, q, draft, rng)
        assert 1 <= len(out) <= 3
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
    assert chi_square(first, P[0]) < CHI2_4DF_999
    assert chi_square(second, P[1]) < CHI2_4DF_999
    # the test has power: the draft's own distribution is rejected
    if not deterministic:
        assert ((first - Q[0] * n_trials) ** 2 / (Q[0] * n_trials)).sum() > CHI2_4DF_999


def test_acceptance_rule_edge_cases():
    rng = torch.Generator().manual_seed(0)
    one_hot = torch.eye(5)[[2, 4, 1]]
    # a one-hot p accepts exactly its token: the greedy rule
    assert accept_draft(one_hot, None, [2, 4], rng) == [2, 4, 1]
    assert accept_draft(one_hot, None, [2, 0], rng) == [2, 4]
    assert accept_greedy([2, 4, 1], [2, 4]) == [2, 4, 1]
    assert accept_greedy([2, 4, 1], [3, 4]) == [2]
    # p == q: always accepted, the bonus drawn from the last row
    assert accept_draft(P, P[:2], [1, 2], rng)[:2] == [1, 2]
    # no drafts: one plain draw from p
    assert accept_draft(one_hot[:1], None, [], rng) == [2]
    # p <= q everywhere yet a rejection (p and q each rounded, p's sum short of q's): the
    # residual max(p - q, 0) is empty, and the token comes from p itself
    p, q = torch.tensor([[0.3, 0.3, 0.3, 0.0], [0.25] * 4]), torch.tensor([[0.4, 0.3, 0.3, 0.0]])
    outs = [accept_draft(p, q, [0], torch.Generator().manual_seed(s)) for s in range(40)]
    rejected = [r for r in outs if len(r) == 1]  # each run rejects with chance 1/4
    assert rejected and all(r[0] in (0, 1, 2) for r in rejected)


def test_acceptance_draws_only_from_its_own_generator():
    """A seeded request gives the same tokens whatever else used torch's global generator."""
    p, q = torch.tensor([[0.5, 0.5], [0.5, 0.5]]), torch.tensor([[0.0, 1.0]])  # accept: 1/2
    runs = []
    for i in range(20):
        torch.manual_seed(i)  # another user of the global generator
        runs.append(accept_draft(p, q, [1], torch.Generator().manual_seed(7)))
    assert all(r == runs[0] for r in runs)


def test_spec_stats_summary():
    stats = spec_mod.SpecStats("ngram", 4)
    stats.count_plain(2)
    assert stats.summary() == "speculative ngram k=4: no drafted tokens, 1.00 tokens per " \
        "target forward"
    stats.n_proposed, stats.n_accepted, stats.n_seq_forwards, stats.n_tokens = 8, 6, 4, 10
    assert stats.summary() == "speculative ngram k=4: 75% of 8 drafted tokens accepted, 2.50 " \
        "tokens per target forward"


def test_propose_ngram():
    assert propose_ngram([1, 2, 3, 1, 2], 3) == [3, 1, 2]
    assert propose_ngram([1, 2, 5, 1, 2, 6, 1, 2], 3) == [6, 1, 2]  # the latest occurrence
    assert propose_ngram([7, 7, 7], 4) == [7, 7, 7, 7]              # a pattern continues
    assert propose_ngram([1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]
    assert propose_ngram([1, 2, 3], 4) == [] and propose_ngram([1], 4) == []
    assert propose_ngram([4, 1, 2, 9, 1, 2], 2, n_max=1) == [9, 1]  # suffix [2]: then 9, 1
    # the longest recurring suffix wins: [1, 2] (then 7) over a later [2] (then 9)
    longest = [1, 2, 7, 3, 2, 9, 1, 2]
    assert propose_ngram(longest, 3) == [7, 3, 2] and propose_ngram(longest, 3, n_max=1) == \
        [9, 1, 2]
    assert propose_ngram([1, 2, 3, 2], 2, n_min=2) == [] and propose_ngram([1, 2, 3, 2], 2) == \
        [3, 2]


def test_draft_budget_gives_the_oldest_the_most_that_fits():
    """Drafts per sequence: at most k and one less than it may still generate, oldest first,
    each the largest whose new blocks fit beside the ones before; None when one cannot even
    take its next token."""
    from types import SimpleNamespace as Seq
    from cache import KVCache
    cache = KVCache(1, 1, 1, n_blocks=6, block_size=4)
    for sid, tokens in enumerate([[1, 2, 3], [1, 2, 3, 4], [5], [6]]):
        cache.append(sid, tokens)  # 4 blocks used, 2 free
    seqs = [Seq(id=0, n_left=10), Seq(id=1, n_left=10), Seq(id=2, n_left=2), Seq(id=3, n_left=1)]
    # 0: 4 drafts + 1 -> 8 tokens, one new block; 1: 4 + 1 would take two, one is left: 3;
    # 2: limited to n_left - 1 = 1, in its own block; 3: nothing left to draft
    assert spec_mod.draft_budget(cache, seqs, 4) == [4, 3, 1, 0]
    assert spec_mod.draft_budget(cache, seqs[1:], 4) == [4, 1, 0]  # 1 first: both blocks
    assert spec_mod.draft_budget(cache, seqs, 2) == [2, 2, 1, 0]
    full = KVCache(1, 1, 1, n_blocks=1, block_size=2)
    full.append(0, [1, 2])
    assert spec_mod.draft_budget(full, [Seq(id=0, n_left=5)], 4) is None


def test_ngram_proposer_proposes_with_its_sizes():
    from types import SimpleNamespace
    seqs = [SimpleNamespace(tokens=[1, 2, 7, 3, 2, 9, 1, 2]), SimpleNamespace(tokens=[1, 2, 3, 2]),
            SimpleNamespace(tokens=[5, 5])]
    drafts, _ = spec_mod.NgramProposer(n_max=3, n_min=1).propose(seqs, [3, 2, 0])
    assert drafts == [[7, 3, 2], [3, 2], []]
    drafts, _ = spec_mod.NgramProposer(n_max=3, n_min=2).propose(seqs, [3, 2, 2])
    assert drafts == [[7, 3, 2], [], []]


# ------------------------------------------------------------------------------------------
# rollback and sampling end to end

def test_rollback_keeps_invariants_and_returns_blocks(models, monkeypatch):
    """Every truncate (target and draft) leaves a consistent cache; rejected drafts that
    spanned a block give it back; nothing is held after generate."""
    llm, draft = models("llama")
    spec = Speculator(f"draft:{draft}", 8)
    llm.generate([[1]], SamplingParams(max_new_tokens=1), speculator=spec)  # load the draft
    caches = [llm.cache, spec.proposer.llm.cache]
    freed = []
    for cache in caches:
        def truncate(seq_id, n_drop, cache=cache, original=cache.truncate):
            n_free = cache.n_free_blocks
            original(seq_id, n_drop)
            cache.check_invariants()
            freed.append((cache is llm.cache, cache.n_free_blocks - n_free))
        monkeypatch.setattr(cache, "truncate", truncate)
    draft_model, n_checked = spec.proposer, []

    def propose(seqs, ks, original=draft_model.propose):
        # after every rollback and draft, the draft's cache holds exactly what its twins
        # computed, and each twin agrees with its target sequence as far as it was synced
        out = original(seqs, ks)
        for s, k in zip(seqs, ks):
            d = draft_model.twins.get(s.id)
            if d is not None and k > 0:  # synced this step
                assert draft_model.llm.cache.seq_tokens[d.id] == d.tokens[:d.n_computed]
                assert d.tokens[:len(s.tokens)] == s.tokens
                n_checked.append(d.id)
        return out
    monkeypatch.setattr(draft_model, "propose", propose)
    p = SamplingParams(max_new_tokens=24, ignore_eos=True, temperature=1.0, seed=5)
    outs = llm.generate([[1, 2, 3], [3, 4, 5, 6, 7, 8, 9]], p, speculator=spec)
    assert all(len(o.token_ids) == 24 for o in outs)
    assert any(target and n > 0 for target, n in freed)      # a target block came back
    assert any(not target for target, _ in freed)            # the draft was rolled back too
    assert n_checked
    assert_no_block_held(llm, spec)


def test_sampled_speculation_is_seeded_and_self_draft_accepts_nearly_all(models):
    llm, _ = models("gpt2")
    p = SamplingParams(max_new_tokens=16, ignore_eos=True, temperature=0.9, top_p=0.9, seed=3)
    spec = Speculator(f"draft:{llm.model_path}")
    a = llm.generate([[1, 2, 3], [5, 6]], p, speculator=spec)
    b = llm.generate([[1, 2, 3], [5, 6]], p, speculator=spec)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    # p and q are the same model through two attention paths: equal up to rounding
    assert spec.stats.acceptance_rate > 0.9
    assert_no_block_held(llm, spec)


# ------------------------------------------------------------------------------------------
# bad options, API and CLI

def test_bad_speculative_options_raise(models, tmp_path):
    llm, _ = models("llama")
    for kwargs, match in [(dict(speculative="bogus"), "'ngram' or 'draft:PATH'"),
                          (dict(speculative="draft:"), "'ngram' or 'draft:PATH'"),
                          (dict(speculative="ngram", spec_k=0), "spec_k must be"),
                          (dict(speculative="ngram", use_cache=False), "cannot run uncached"),
                          (dict(speculative=f"draft:{tmp_path / 'nope'}"), "does not exist")]:
        with pytest.raises(ValueError, match=match):
            llm.generate([[1, 2]], SamplingParams(max_new_tokens=3), **kwargs)
    other = tmp_path / "other"
    make_checkpoint(other, "llama", vocab_size=400)
    with pytest.raises(ValueError, match="does not share the target's tokenizer"):
        llm.generate([[1, 2]], SamplingParams(max_new_tokens=3), speculative=f"draft:{other}")
    assert_no_block_held(llm)


def test_cli_speculative(models, capsys):
    """Each proposer through main(); bad options are one line and exit status 2."""
    from generate import main
    llm, draft = models("gpt2")
    common = ["the fox the fox the", "--model", llm.model_path, "--dtype", "float32",
              "--max-new-tokens", "12", "--ignore-eos"]
    [want] = llm.generate(["the fox the fox the"], SamplingParams(max_new_tokens=12,
                                                                  ignore_eos=True))
    runs = []
    for spec in ("ngram", f"draft:{draft}"):
        code = main([*common, "--speculative", spec, "--spec-k", "3"])
        runs.append((spec, code, *capsys.readouterr()))
    for spec, code, out, err in runs:
        assert code == 0, err
        assert out == want.text + "\n"
        assert f"speculative {spec} k=3: " in err and "tokens per target forward" in err
    for bad, match in [(["--speculative", "bogus"], "'ngram' or 'draft:PATH'"),
                       (["--speculative", "ngram", "--spec-k", "0"], "--spec-k >= 1")]:
        code = main([*common, *bad])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
        assert match in lines[0]
