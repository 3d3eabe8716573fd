"""
Rungs 3-4 of the ladder, end to end: cached generation == uncached recomputation (logits at
every step, greedy tokens), batched == one at a time, preempted == never preempted, chunked
prefill == whole prefill; sampling, stop strings and streaming; every bad input gives one
clear error (API and CLI); the golden continuation of the real model.
"""
import copy
import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from model import kernels
from conftest import make_checkpoint, smollm2_path
import cache as cache_mod
import generate as gen_mod
import model as model_mod
from generate import LLM, SamplingParams, Scheduler, main
from transformers import AutoModelForCausalLM

HERE = Path(__file__).parent


def dense_logits(llm, tokens):
    n = len(tokens)
    meta = kernels.AttnMeta.dense([0, n])
    return llm.model(torch.tensor(tokens), torch.arange(n), meta, None, all_logits=True)


prompts_st = st.lists(st.lists(st.integers(0, 290), min_size=1, max_size=20), min_size=1,
                      max_size=4)


@given(arch=st.sampled_from(["gpt2", "llama"]), prompts=prompts_st, n_new=st.integers(1, 12))
def test_cached_logits_match_uncached_at_every_step(engine, arch, prompts, n_new):
    """Prefill all prompts in one ragged batch, then decode in lockstep through the paged
    cache; every step's logits equal a full recomputation of the sequence so far."""
    llm = engine(arch)
    g = torch.Generator().manual_seed(len(prompts) * 31 + n_new)
    seqs = llm.make_sequences([p + torch.randint(0, 290, (n_new,), generator=g).tolist()
                               for p in prompts], SamplingParams(max_new_tokens=1))
    try:
        batch = [(s, len(p), llm.cache.append(s.id, p)) for s, p in zip(seqs, prompts)]
        while batch:
            logits = llm.run(batch)
            llm.cache.check_invariants()
            for row, (s, _, _) in enumerate(batch):
                want = dense_logits(llm, s.tokens[:s.n_computed])[-1]
                torch.testing.assert_close(logits[row], want, rtol=1e-4, atol=1e-4)
            batch = [(s, 1, llm.cache.append(s.id, s.tokens[s.n_computed:s.n_computed + 1]))
                     for s in seqs if s.n_computed < len(s.tokens)]
    finally:
        for s in seqs:
            llm.cache.free(s.id)
    llm.cache.check_invariants()
    assert llm.cache.n_free_blocks == llm.cache.n_blocks


@given(arch=st.sampled_from(["gpt2", "llama"]), prompts=prompts_st)
def test_greedy_tokens_cached_equal_uncached(engine, arch, prompts):
    llm, p = engine(arch), SamplingParams(max_new_tokens=10, ignore_eos=True)
    cached = llm.generate(prompts, p)
    uncached = llm.generate(prompts, p, use_cache=False)
    assert [c.token_ids for c in cached] == [u.token_ids for u in uncached]
    assert all(len(c.token_ids) == 10 for c in cached)


@given(arch=st.sampled_from(["gpt2", "llama"]), prompts=prompts_st,
       temperature=st.sampled_from([0.0, 0.8]), seed=st.integers(0, 100))
def test_batched_generation_equals_one_at_a_time(engine, arch, prompts, temperature, seed):
    llm = engine(arch)
    p = SamplingParams(max_new_tokens=8, temperature=temperature, top_k=20, seed=seed)
    together = llm.generate(prompts, p)
    alone = [llm.generate([q], p)[0] for q in prompts]
    assert [t.token_ids for t in together] == [a.token_ids for a in alone]
    assert [t.text for t in together] == [a.text for a in alone]


@given(prompts=st.lists(st.lists(st.integers(0, 290), min_size=1, max_size=24), min_size=2,
                        max_size=6), n_blocks=st.integers(10, 14),
       max_batch_tokens=st.integers(3, 64))
def test_preempted_and_chunked_equal_unconstrained(tiny_dir, prompts, n_blocks, max_batch_tokens):
    """A pool that fits only a few sequences (preemption) and a small token budget (chunked
    prefill) give exactly the outputs of an ample pool; no request is lost."""
    ample = LLM(str(tiny_dir("llama")), dtype="float32", block_size=4)
    tight = LLM(str(tiny_dir("llama")), dtype="float32", block_size=4, n_blocks=n_blocks,
                max_batch_tokens=max_batch_tokens)
    p = SamplingParams(max_new_tokens=16, ignore_eos=True)
    want = ample.generate(prompts, p)
    got = tight.generate(prompts, p)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    tight.cache.check_invariants()
    assert tight.cache.n_free_blocks == n_blocks


# ------------------------------------------------------------------------------------------
# invariant mode: the ladder bitwise in bf16 (and over an int8 cache)

def record_logits(monkeypatch) -> dict:
    """Every sampled row of logits, keyed by the tokens it follows: in invariant mode one
    prefix has one row of logits, whichever run, batch, step or path computed it."""
    seen, take = {}, gen_mod.next_tokens

    def recording(logits, seqs):
        for row, seq in zip(logits, seqs):
            seen.setdefault(tuple(seq.tokens), []).append(row.clone())
        return take(logits, seqs)
    monkeypatch.setattr(gen_mod, "next_tokens", recording)
    return seen


def ladder_runs(path, prompts, n_new, n_blocks, max_batch_tokens, kv_dtype, invariant,
                device="cpu", dtype="bfloat16", ample_blocks=512):
    """Token ids of the same greedy requests run every way the ladder compares."""
    def engine(**kw):
        return LLM(path, device=device, dtype=dtype, block_size=4, kv_dtype=kv_dtype,
                   invariant=invariant, **kw)
    p = SamplingParams(max_new_tokens=n_new, ignore_eos=True)
    ample = engine(n_blocks=ample_blocks)
    tight = engine(n_blocks=n_blocks, max_batch_tokens=max_batch_tokens)
    runs = {"alone": [ample.generate([q], p)[0].token_ids for q in prompts]}
    runs["uncached"] = [o.token_ids for o in ample.generate(prompts, p, use_cache=False)]
    runs["batched, chunked, preempted"] = [o.token_ids for o in tight.generate(prompts, p)]
    again = tight.generate(prompts[::-1], p)[::-1]  # prefix hits on what the last run left
    runs["prefix hits"] = [o.token_ids for o in again]
    runs["speculative"] = [o.token_ids for o in ample.generate(prompts, p, speculative="ngram",
                                                               spec_k=3)]
    return runs, tight


@settings(max_examples=max(6, settings.default.max_examples // 2))
@given(arch=st.sampled_from(["gpt2", "llama"]),
       prompts=st.lists(st.lists(st.integers(0, 290), min_size=1, max_size=40), min_size=2,
                        max_size=6),
       n_new=st.integers(16, 40), spare=st.integers(0, 6), max_batch_tokens=st.integers(3, 64),
       kv_dtype=st.sampled_from([None, "int8"]))
def test_invariant_mode_is_bitwise_in_bf16(tiny_dir, arch, prompts, n_new, spare,
                                          max_batch_tokens, kv_dtype):
    """invariant=True, bf16 (and an int8 cache): a request alone == uncached (a fresh prefill
    of every prefix) == among the others in a pool tight enough to preempt, prefilled in chunks
    == on prefix hits == speculative greedy, as token ids and as every step's logits."""
    n_blocks = max(-(-(len(q) + n_new) // 4) for q in prompts) + spare
    with pytest.MonkeyPatch.context() as mp:
        seen = record_logits(mp)
        runs, tight = ladder_runs(str(tiny_dir(arch)), prompts, n_new, n_blocks,
                                  max_batch_tokens, kv_dtype, invariant=True)
    for name, ids in runs.items():
        assert ids == runs["alone"], name
    for prefix, rows in seen.items():
        assert all(torch.equal(r, rows[0]) for r in rows[1:]), prefix
    assert sum(len(r) > 1 for r in seen.values()) >= len(seen) // 2  # most were recomputed
    tight.cache.check_invariants()


def test_without_invariant_mode_the_ladder_sees_differences(tiny_dir, monkeypatch):
    """The negative control: the same comparisons in the default mode find logits that
    differ in bf16 (so the test above can see what it claims)."""
    seen = record_logits(monkeypatch)
    prompts = [[(7 * i + 3 * j) % 290 for j in range(5 + 6 * i)] for i in range(6)]
    ladder_runs(str(tiny_dir("llama")), prompts, 40, 40, 7, None, invariant=False)
    assert any(not torch.equal(r, rows[0]) for rows in seen.values() for r in rows[1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the invariant mode's Triton kernels "
                    "run compiled in bf16 on a CUDA GPU only (the interpreter has no bf16)")
@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_invariant_mode_is_bitwise_on_a_gpu(tiny_dir, monkeypatch, kv_dtype):
    """The ladder above on CUDA, bf16: the invariant attention kernel and the persistent
    invariant matmul, compiled. Alone == uncached == batched, chunked and preempted == prefix
    hits == speculative, token ids and every step's logits; and the negative control on the
    same requests: the default mode's kernels (and cuBLAS) find differing logits."""
    prompts = [[(7 * i + 3 * j) % 290 for j in range(5 + 6 * i)] for i in range(6)]
    for invariant in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            seen = record_logits(mp)
            runs, tight = ladder_runs(str(tiny_dir("llama")), prompts, 40, 40, 7, kv_dtype,
                                      invariant, device="cuda")
        same = all(torch.equal(r, rows[0]) for rows in seen.values() for r in rows[1:])
        assert same == invariant, "invariant" if invariant else "the negative control"
        if invariant:
            assert all(ids == runs["alone"] for ids in runs.values())
        tight.cache.check_invariants()


@pytest.mark.skipif(kernels.triton is None, reason="triton is not installed (no wheel for this "
                    "platform): the engine runs its torch reference")
def test_invariant_mode_through_the_triton_kernels(tiny_dir, monkeypatch):
    """The ladder through the Triton kernels in the interpreter (fp16, an int8 cache: bf16
    does not run there): the invariant attention kernel and the persistent invariant matmul
    give alone == uncached == batched, chunked and preempted == prefix hits == speculative,
    token ids and logits; the default mode's kernels, on the same requests, do not."""
    monkeypatch.setenv("KVCACHE_KERNELS", "triton")
    prompts = [[(7 * i + 3 * j) % 290 for j in range(3 + 5 * i)] for i in range(3)]
    for invariant in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            seen = record_logits(mp)
            runs, tight = ladder_runs(str(tiny_dir("llama")), prompts, 16, 12, 5, "int8",
                                      invariant, dtype="float16", ample_blocks=40)
        same = all(torch.equal(r, rows[0]) for rows in seen.values() for r in rows[1:])
        assert same == invariant, "invariant" if invariant else "the negative control"
        if invariant:
            assert all(ids == runs["alone"] for ids in runs.values())
        tight.cache.check_invariants()


def test_invariant_forks_equal_each_sample_alone(tiny_dir):
    llm = LLM(str(tiny_dir("llama")), dtype="bfloat16", block_size=4, invariant=True)
    p = dict(max_new_tokens=24, temperature=0.9, ignore_eos=True)
    forks = llm.generate([[5, 6, 7, 8, 9]], SamplingParams(n=3, seed=11, **p))
    alone = [llm.generate([[5, 6, 7, 8, 9]], SamplingParams(seed=11 + i, **p))[0]
             for i in range(3)]
    assert [f.token_ids for f in forks] == [a.token_ids for a in alone]


# ------------------------------------------------------------------------------------------
# sliding windows: the blocks a window left go back to the pool, the output stays transformers'

@settings(max_examples=max(6, settings.default.max_examples // 2))
@given(arch=st.sampled_from(["mistral", "qwen2"]), window=st.integers(3, 12),
       prompts=st.lists(st.lists(st.integers(1, 290), min_size=1, max_size=30), min_size=1,
                        max_size=4),
       max_batch_tokens=st.integers(4, 64), spare=st.integers(0, 8),
       speculative=st.booleans())
def test_sliding_window_generation_matches_transformers(tiny_dir, arch, window, prompts,
                                                        max_batch_tokens, spare, speculative):
    """Greedy tokens of requests several windows long == transformers' generate, and every
    step's logits == transformers' forward over the same tokens, with chunked prefill, a pool
    that may preempt, prefix hits (the requests run twice) and speculative decoding; when
    every layer slides (Mistral), a sequence never holds more than the window's blocks + 2,
    and the blocks it released went back to the pool."""
    extra = {"sliding_window": window} if arch == "mistral" else \
        {"use_sliding_window": True, "sliding_window": window, "max_window_layers": 1}
    path = tiny_dir(arch, **extra)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # generate on past EOS, as ignore_eos does
    n_new, p = 30, 4
    bound = -(-window // p) + 2
    longest = max(len(q) for q in prompts) + n_new
    need = bound + -(-max_batch_tokens // p) + 1 if arch == "mistral" else -(-longest // p)
    llm = LLM(str(path), dtype="float32", block_size=p, n_blocks=need + spare,
              max_batch_tokens=max_batch_tokens)
    held = []

    def check(seq_ids):
        held.extend(sum(b != cache_mod.RELEASED for b in llm.cache.block_tables[s])
                    for s in seq_ids if s in llm.cache.block_tables)
    params = SamplingParams(max_new_tokens=n_new, ignore_eos=True)
    with pytest.MonkeyPatch.context() as mp:
        seen = record_logits(mp)
        step = LLM.step

        def checked_step(self, sched, out, speculator=None):
            step(self, sched, out, speculator)
            check([s.id for s in sched.running])
        mp.setattr(LLM, "step", checked_step)
        want = [hf.generate(torch.tensor([q]), attention_mask=torch.ones(1, len(q), dtype=int),
                            max_new_tokens=n_new, do_sample=False)[0, len(q):].tolist()
                for q in prompts]
        for _ in range(2):  # the second round maps what the first left cached
            outs = llm.generate(prompts, params, speculative="ngram" if speculative else None)
            assert [o.token_ids for o in outs] == want
    for prefix, rows in list(seen.items())[-6:]:  # the longest: several windows in
        torch.testing.assert_close(rows[0], hf(torch.tensor([list(prefix)])).logits[0, -1],
                                   rtol=1e-4, atol=1e-4)
    if arch == "mistral":
        assert max(held) <= bound, (max(held), bound)
    llm.cache.check_invariants()
    assert llm.cache.n_free_blocks == llm.cache.n_blocks


def test_a_released_block_cannot_be_truncated_back_into(tiny_dir):
    llm = LLM(str(tiny_dir("mistral", sliding_window=4)), dtype="float32", block_size=2)
    c = llm.cache
    c.append(0, list(range(20)))
    assert c.release_before(0, 20 - 4 + 1) == 8 and c.block_tables[0][:8] == [cache_mod.RELEASED] * 8
    c.check_invariants()
    with pytest.raises(ValueError, match="has left the sliding window"):
        c.truncate(0, 6)
    c.truncate(0, 3)  # within the blocks still held
    c.free(0)
    c.check_invariants()
    assert c.n_free_blocks == c.n_blocks


def test_tight_pool_really_preempts(tiny_dir, monkeypatch):
    """Preemptions happen, are counted one by one, and every request still completes."""
    llm = LLM(str(tiny_dir("llama")), dtype="float32", block_size=4, n_blocks=10)
    preempted = []
    preempt = Scheduler.preempt
    monkeypatch.setattr(Scheduler, "preempt", lambda self, seq: (preempted.append(seq.id),
                                                                 preempt(self, seq)))
    outs = llm.generate([[5] * 10, [6] * 10, [7] * 10], SamplingParams(max_new_tokens=20,
                                                                       ignore_eos=True))
    assert llm.n_preemptions == len(preempted) > 0
    assert all(len(o.token_ids) == 20 for o in outs)


def test_every_step_fills_the_token_budget_and_no_more(engine, monkeypatch):
    """A step schedules at most max_batch_tokens tokens, and exactly that many whenever a
    request is left waiting (the pool is ample here: only the budget holds it back)."""
    llm = engine("llama", max_batch_tokens=5)
    steps = []
    schedule = Scheduler.schedule

    def recorded(self):
        batch = schedule(self)
        steps.append((sum(b.n_tokens for b in batch), len(self.waiting)))
        return batch
    monkeypatch.setattr(Scheduler, "schedule", recorded)
    llm.generate([[3] * 3, [4] * 7, [5] * 2, [6] * 9], SamplingParams(max_new_tokens=4,
                                                                      ignore_eos=True))
    assert all(n <= 5 for n, _ in steps)
    assert all(n == 5 for n, waiting in steps if waiting) and any(w for _, w in steps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_preemption_equals_an_ample_pool(engine, seed):
    """Sampling, where a token recomputed after preemption would come out differently if a
    sampled token were lost or drawn again: a pool that must preempt gives exactly the
    sampled tokens of an ample one."""
    prompts = [[5] * 10, [6] * 10, [7] * 10]
    p = SamplingParams(max_new_tokens=20, ignore_eos=True, temperature=1.0, seed=seed)
    want = engine("llama").generate(prompts, p)
    tight = engine("llama", n_blocks=10)
    n_before = tight.n_preemptions
    got = tight.generate(prompts, p)
    assert tight.n_preemptions > n_before
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


def test_sampling_filters():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    rng = torch.Generator().manual_seed(0)
    assert SamplingParams(temperature=0).draw(logits, rng) == 1
    assert {SamplingParams(temperature=5, top_k=1).draw(logits, rng) for _ in range(20)} == {1}
    picks = {SamplingParams(temperature=1, top_k=2).draw(logits, rng) for _ in range(200)}
    assert picks == {1, 3}
    picks = {SamplingParams(temperature=1, top_p=0.01).draw(logits, rng) for _ in range(50)}
    assert picks == {1}
    # top_p keeps the smallest set reaching the mass: here tokens 1 and 3 (~0.47 + ~0.43)
    picks = {SamplingParams(temperature=1, top_p=0.85).draw(logits, rng) for _ in range(300)}
    assert picks == {1, 3}


def test_seeded_sampling_is_reproducible(engine):
    llm = engine("llama")
    p = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    a, b = llm.generate([[1, 2, 3]], p), llm.generate([[1, 2, 3]], p)
    assert a[0].token_ids == b[0].token_ids


def test_stop_strings_and_streaming(engine):
    llm = engine("gpt2")
    p = SamplingParams(max_new_tokens=30, ignore_eos=True)
    [full] = llm.generate(["the fox"], p)
    assert len(full.text) > 4
    stop = full.text[3:5]
    pieces = []
    [out] = llm.generate(["the fox"], SamplingParams(max_new_tokens=30, ignore_eos=True,
                                                     stop=(stop,)),
                         on_text=lambda i, s: pieces.append(s))
    assert out.text == full.text[:full.text.find(stop)]
    assert out.finish_reason == "stop" and "".join(pieces) == out.text


def test_completion_fields(engine):
    llm = engine("llama")
    [o] = llm.generate(["the quick brown fox"], SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert o.n_prompt_tokens == len(llm.tokenizer.encode("the quick brown fox"))
    assert o.n_cached_tokens == 0 and len(o.token_ids) == 5 and o.finish_reason == "length"
    assert o.ttft_s > 0 and o.decode_s >= 0
    assert o.text == llm.tokenizer.decode(o.token_ids)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k")])
def test_bad_sampling_params_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_requests_raise_and_leave_the_cache_intact(engine):
    llm = engine("llama")
    for prompts, params, match in [
            ([""], None, "empty prompt"), ([[]], None, "empty prompt"), ([], None, "no prompts"),
            ([[1] * 250], SamplingParams(max_new_tokens=10), r"260 tokens, beyond .* 256"),
            ([[99999]], None, "outside the vocabulary")]:
        with pytest.raises(ValueError, match=match):
            llm.generate(prompts, params)
        llm.cache.check_invariants()
        assert llm.cache.n_free_blocks == llm.cache.n_blocks
    small = LLM(str(Path(llm.model_path)), dtype="float32", block_size=4, n_blocks=2)
    with pytest.raises(ValueError, match="too small for one request of 20 tokens"):
        small.generate([[1] * 10], SamplingParams(max_new_tokens=10))


# ------------------------------------------------------------------------------------------
# the CLI, as a user runs it

def run_cli(*args, stdin=None):
    """generate.py as a user runs it, in a process of its own."""
    return subprocess.run([sys.executable, str(HERE / "generate.py"), *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def cli(capsys, monkeypatch):
    """cli(*args, stdin=None) -> (exit code, stdout, stderr) of generate.py's main(), called
    in this process (no interpreter start-up per case; run_cli keeps the real thing)."""
    def run(*args, stdin=None):
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        capsys.readouterr()  # what fixtures printed before is not the command's
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """Paths that must each fail with a clear message."""
    import numpy as np
    from test_model import GGUF_LLAMA_TINY, write_gguf
    d = tmp_path_factory.mktemp("bad")
    hf = make_checkpoint(d / "hf", "llama", **GGUF_LLAMA_TINY)
    write_gguf(d / "arch.gguf", hf, arch="gpt2")
    write_gguf(d / "type.gguf", hf, extra={"blk.0.x.weight": np.zeros((2, 8), np.int8)})
    write_gguf(d / "ok.gguf", hf, "Q8_0")
    data = (d / "ok.gguf").read_bytes()
    (d / "cut.gguf").write_bytes(data[:len(data) // 2])
    (d / "text.txt").write_text("not a model")
    for name, key in [("heads", "llama.attention.head_count"), ("blocks", "llama.block_count"),
                      ("eps", "llama.attention.layer_norm_rms_epsilon"),
                      ("tokens", "tokenizer.ggml.tokens")]:
        write_gguf(d / f"no-{name}.gguf", hf, drop_keys=[key])
    write_gguf(d / "rope.gguf", hf, strings={"llama.rope.scaling.type": "weird"})
    huge = copy.copy(hf)  # the same weights under a header that claims 10^9 blocks
    huge.config = copy.deepcopy(hf.config)
    huge.config.num_hidden_layers = 10**9
    write_gguf(d / "huge.gguf", huge)
    llama = json.loads((d / "hf" / "config.json").read_text())
    configs = {"list": [], "null": None, "bare": {"model_type": "llama"},
               "no-ffn": {k: v for k, v in llama.items() if k != "intermediate_size"},
               "refused": {**llama, "hidden_act": "gelu"}}
    for name, config in configs.items():
        (d / f"config-{name}").mkdir()
        (d / f"config-{name}" / "config.json").write_text(json.dumps(config))
    (d / "unreadable" / "config.json").mkdir(parents=True)  # exists, cannot be read as a file
    make_checkpoint(d / "no-tokenizer", "llama", tokenizer=None)
    return d


# The engine on a platform without a triton wheel (macOS, Windows): triton made unimportable.
NO_TRITON = """
import json, os, sys

class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "triton":
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoTriton())
from generate import LLM, SamplingParams
from model import kernels
assert kernels.triton is None and "triton" not in sys.modules
llm = LLM(sys.argv[1], dtype="float32", block_size=4)
params = SamplingParams(max_new_tokens=8, ignore_eos=True)
tokens = [c.token_ids for c in llm.generate([[3, 4, 5, 6, 7], [3, 4, 5, 9]], params)]
os.environ["KVCACHE_KERNELS"] = "triton"
try:
    llm.generate([[3, 4]], params)
except RuntimeError as e:
    print(json.dumps([tokens, str(e)]))
"""


def test_engine_runs_without_triton(tiny_dir):
    """Where triton cannot be imported the engine imports, runs its reference (the same tokens
    as here) and refuses KVCACHE_KERNELS=triton with a reason."""
    path = tiny_dir("llama")
    out = subprocess.run([sys.executable, "-c", NO_TRITON, str(path)], cwd=HERE,
                         capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "KVCACHE_KERNELS"})
    assert out.returncode == 0, out.stderr[-3000:]
    tokens, error = json.loads(out.stdout)
    llm = LLM(str(path), dtype="float32", block_size=4)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    assert tokens == [c.token_ids for c in llm.generate([[3, 4, 5, 6, 7], [3, 4, 5, 9]], params)]
    assert "triton package is not installed" in error


def test_cli_streams_a_completion(engine):
    """generate.py in a process of its own, as from the shell (the other CLI tests call main()
    in this one; test_ctrl_c_while_starting_is_one_line runs a bad start in a process too)."""
    r = run_cli("the quick", "--model", engine("gpt2").model_path, "--max-new-tokens", "5",
                "--dtype", "float32", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    [o] = engine("gpt2").generate(["the quick"], SamplingParams(max_new_tokens=5, ignore_eos=True,
                                                              seed=0))
    assert r.stdout == o.text + "\n"
    assert "prompt 3 tokens" in r.stderr and "tokens/s" in r.stderr and "KV cache" in r.stderr


def test_cli_prompt_file_and_chat(tiny_dir, tmp_path, cli):
    f = tmp_path / "p.txt"
    f.write_text("the fox\n\nthe dog\nsun\n")
    code, out, err = cli("--prompt-file", str(f), "--model", str(tiny_dir("gpt2")),
                         "--max-new-tokens", "3", "--dtype", "float32")
    assert code == 0, err
    assert out.count("### ") == 3 and "3/3 requests done" in err
    code, out, err = cli("--chat", "--model", str(tiny_dir("gpt2")), "--max-new-tokens", "3",
                         stdin="hello\nagain\n")
    assert code == 0, err
    assert err.count("[1 request") == 2


BAD_INPUT = [
    "empty", "context", "missing", "text", "arch", "type", "cut", "temperature", "top_p",
    "top_k", "max_new", "kv_budget", "kv_budget_unit", "no_prompt", "no-heads", "no-blocks",
    "no-eps", "no-tokens", "rope", "huge", "config-list", "config-null", "config-bare",
    "config-no-ffn", "config-refused", "unreadable", "kv_budget_huge", "n_blocks_huge",
    "text_without_tokenizer", "token_ids_not_ints", "token_ids_range", "token_ids_chat",
    "tensor_parallel", "tensor_parallel_0"]


@pytest.mark.parametrize("case", BAD_INPUT)
def test_cli_bad_input_is_one_clear_line(tiny_dir, bad_files, cli, case):
    """Every bad file and value: one line, exit code 2, no traceback."""
    m = ["--model", str(tiny_dir("llama"))]
    bad = lambda name: ["hi", "--model", str(bad_files / name)]  # noqa: E731
    args, match = {
        "empty": (["", *m], "empty prompt"),
        "context": (["hi", *m, "--max-new-tokens", "300"], "beyond the model's context of 256"),
        "missing": (["hi", "--model", str(bad_files / "nope")], "does not exist"),
        "text": (["hi", "--model", str(bad_files / "text.txt")], "neither a GGUF file nor"),
        "arch": (["hi", "--model", str(bad_files / "arch.gguf")], "unsupported GGUF architecture"),
        "type": (["hi", "--model", str(bad_files / "type.gguf")], "unsupported type I8"),
        "cut": (["hi", "--model", str(bad_files / "cut.gguf")], "cut.gguf"),
        "temperature": (["hi", *m, "--temperature", "-0.5"], "temperature must be >= 0"),
        "top_p": (["hi", *m, "--top-p", "1.5"], r"top_p must be in \(0, 1\]"),
        "top_k": (["hi", *m, "--top-k", "-2"], "top_k must be"),
        "max_new": (["hi", *m, "--max-new-tokens", "0"], "max_new_tokens must be"),
        "kv_budget": (["hi", *m, "--n-blocks", "1", "--block-size", "4"], "too small for one"),
        "kv_budget_unit": (["hi", *m, "--kv-budget", "2 parsecs"], "give bytes with a unit"),
        "no_prompt": (m, "give a PROMPT"),
        "no-heads": (bad("no-heads.gguf"), "GGUF key llama.attention.head_count is missing"),
        "no-blocks": (bad("no-blocks.gguf"), "GGUF key llama.block_count is missing"),
        "no-eps": (bad("no-eps.gguf"), "llama.attention.layer_norm_rms_epsilon is missing"),
        "no-tokens": (bad("no-tokens.gguf"), "tokenizer.ggml.tokens is missing"),
        "rope": (bad("rope.gguf"), "rope.scaling.type='weird' is not supported"),
        "huge": (bad("huge.gguf"), "the config says 1000000000 layers, the file holds weights of 2"),
        "config-list": (bad("config-list"), r"config.json holds \[\], not a JSON object"),
        "config-null": (bad("config-null"), "config.json holds null, not a JSON object"),
        "config-bare": (bad("config-bare"), "config.json: no '.*' \\(a llama config needs it\\)"),
        "config-no-ffn": (bad("config-no-ffn"), "config.json: no 'intermediate_size'"),
        "config-refused": (bad("config-refused"), 'hidden_act="gelu" is not supported'),
        "unreadable": (bad("unreadable"), "config.json: cannot read"),
        "kv_budget_huge": (["hi", *m, "--kv-budget", "100TiB"], "more than the"),
        "n_blocks_huge": (["hi", *m, "--n-blocks", str(10**12)], r"at most \d+ blocks of 16 fit"),
        "text_without_tokenizer": (bad("no-tokenizer"), "has no tokenizer files .* token ids"),
        "token_ids_not_ints": (["1 2 x", *m, "--token-ids"], "'1 2 x' is not a list of integers"),
        "token_ids_range": (["1 99999", *m, "--token-ids"], "token id 99999 outside the vocab"),
        "token_ids_chat": (["1 2", *m, "--token-ids", "--chat"], "do not go together"),
        "tensor_parallel": (["hi", *m, "--tensor-parallel", "4"], "tensor parallel 4 does not "
                            "divide this model.s 2 KV heads and MLP width 64: 1, 2 would"),
        "tensor_parallel_0": (["hi", *m, "--tensor-parallel", "0"], "must be a whole number"),
    }[case]
    code, _, err = cli(*args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(match, lines[0]), lines[0]



# ------------------------------------------------------------------------------------------
# golden: the embedded model, fp32, greedy

def test_golden_smollm2_continuation(smollm2_llm):
    llm = smollm2_llm
    [out] = llm.generate(["Once upon a time, there was a little"], SamplingParams(max_new_tokens=14))
    assert out.text.startswith(" girl named Emma who loved to play in the sun.")
    assert str(smollm2_path()) == llm.model_path


# ------------------------------------------------------------------------------------------
# prefix sharing, forks

def cold_logits_and_tokens(path, prompt, n_new):
    cold = LLM(path, dtype="float32", block_size=4)
    [out] = cold.generate([prompt], SamplingParams(max_new_tokens=n_new, ignore_eos=True))
    return dense_logits(cold, prompt)[-1], out.token_ids


def first_step_logits(llm, prompt):
    """Admit one prompt through the real scheduler (prefix hits included) and run its
    prefill: (logits of its last position, tokens it got from the cache)."""
    [seq] = llm.make_sequences([prompt], SamplingParams(max_new_tokens=1))
    sched = Scheduler(llm.cache, llm.max_batch_tokens)
    sched.add([seq])
    try:
        return llm.run(sched.schedule())[0], seq.n_cached
    finally:
        llm.cache.free(seq.id)


@given(prefix=st.lists(st.integers(0, 290), min_size=1, max_size=20),
       suffix_a=st.lists(st.integers(0, 290), max_size=6),
       suffix_b=st.lists(st.integers(0, 290), max_size=6),
       churn=st.lists(st.lists(st.integers(0, 290), min_size=1, max_size=12), max_size=3),
       n_blocks=st.sampled_from([12, 40]))
def test_prefix_hit_equals_cold_prefill(tiny_dir, prefix, suffix_a, suffix_b, churn, n_blocks):
    """Warm the pool with A = prefix + suffix_a and maybe churn (which, in the small pool,
    evicts some of it), then B = prefix + suffix_b reuses what is left: same logits and greedy
    tokens as a cold run. n_cached_tokens is exactly the full blocks B shares with anything
    computed before (all but its last token at most) where nothing was evicted (the large
    pool), and never more than that."""
    path = str(tiny_dir("llama"))
    llm = LLM(path, dtype="float32", block_size=4, n_blocks=n_blocks)
    a, b = prefix + suffix_a, prefix + suffix_b
    p = SamplingParams(max_new_tokens=3, ignore_eos=True)
    computed = []  # every sequence whose K/V went through the cache (the last sampled token never)
    for prompt in [a] + churn:
        [out] = llm.generate([prompt], p)
        computed.append(prompt + out.token_ids[:-1])
    llm.cache.check_invariants()
    logits, n_cached = first_step_logits(llm, b)
    want_logits, want_tokens = cold_logits_and_tokens(path, b, 3)
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    [out_b] = llm.generate([b], p)  # B's own full blocks are cached now: a second hit
    assert out_b.token_ids == want_tokens

    def shared(x):  # tokens of b in full blocks shared with x, at most all but b's last
        lcp = next((i for i, (u, v) in enumerate(zip(x, b)) if u != v), min(len(x), len(b)))
        return min(lcp // 4 * 4, len(b) - 1)
    # a pool of 40 blocks holds every sequence here (A, churn, B: at most 28 blocks): no eviction
    best = max(shared(x) for x in computed)
    assert n_cached == best if n_blocks == 40 else n_cached <= best
    assert out_b.n_cached_tokens == shared(b) if n_blocks == 40 else \
        out_b.n_cached_tokens <= shared(b)
    llm.cache.check_invariants()


def test_identical_block_aligned_prompts_in_one_batch_equal_alone(tiny_dir):
    """The second of two equal prompts of whole blocks maps the first's blocks and must copy
    the last one before writing its final token: not before the first's forward pass has
    written it (a fresh pool, so nothing is cached from before)."""
    p = SamplingParams(max_new_tokens=6, ignore_eos=True)
    want = LLM(str(tiny_dir("llama")), dtype="float32", block_size=4).generate([[6, 3, 6, 0]], p)
    llm = LLM(str(tiny_dir("llama")), dtype="float32", block_size=4)
    outs = llm.generate([[6, 3, 6, 0]] * 3, p)
    assert [o.token_ids for o in outs] == [want[0].token_ids] * 3
    llm.cache.check_invariants()


def test_shared_system_prompt_is_prefilled_once(engine):
    llm = engine("llama")
    system = list(range(1, 41))  # 10 blocks of 4
    outs = llm.generate([system + [50 + i] for i in range(4)],
                        SamplingParams(max_new_tokens=2, ignore_eos=True))
    # all four are admitted in one step: the first prefills the system prompt, the others map
    # its blocks as they are reserved (the pass writes them before anyone attends)
    assert [o.n_cached_tokens for o in outs] == [0, 40, 40, 40]
    [again] = llm.generate([system + [99]], SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert again.n_cached_tokens == 40 and outs[0].n_prompt_tokens == 41


def test_a_failed_step_loses_only_its_own_blocks(engine, tiny_dir):
    """A forward pass that raises mid-generation: the error reaches the caller, every block
    comes back, the cache stays consistent, a system prompt cached before stays a hit, and
    the blocks the failed pass was to write are not hits (they hold nothing)."""
    llm = engine("llama")
    system, p = list(range(1, 41)), SamplingParams(max_new_tokens=4, ignore_eos=True)
    llm.generate([system + [50]], p)
    prompt = system + list(range(60, 69))  # two more full blocks of 4, then one token
    forward, fail = llm.model.forward, [True]

    def failing(*args, **kwargs):
        if fail[0]:
            raise RuntimeError("the device went away")
        return forward(*args, **kwargs)
    llm.model.forward = failing
    try:
        with pytest.raises(RuntimeError, match="went away"):
            llm.generate([prompt], p)
        llm.cache.check_invariants()
        assert llm.cache.n_free_blocks == llm.cache.n_blocks and not llm.cache.unwritten
        fail[0] = False
        [again] = llm.generate([prompt], p)
    finally:
        del llm.model.forward
    assert again.n_cached_tokens == 40
    cold = LLM(str(tiny_dir("llama")), dtype="float32", block_size=4)
    assert again.token_ids == cold.generate([prompt], p)[0].token_ids


@given(seed=st.integers(0, 1000), n=st.integers(2, 4), prompt_len=st.integers(1, 9))
def test_forked_samples_equal_each_sample_alone(engine, seed, n, prompt_len):
    llm = engine("gpt2")
    prompt = list(range(10, 10 + prompt_len))
    p = SamplingParams(max_new_tokens=6, temperature=1.0, seed=seed, n=n, ignore_eos=True)
    outs = llm.generate([prompt, [7, 7]], p)
    assert len(outs) == 2 * n
    for i in range(n):
        [alone] = llm.generate([prompt], SamplingParams(max_new_tokens=6, temperature=1.0,
                                                         seed=seed + i, ignore_eos=True))
        assert outs[i].token_ids == alone.token_ids
    llm.cache.check_invariants()
    assert llm.cache.n_free_blocks == llm.cache.n_blocks


def test_without_a_cache_every_step_recomputes_every_token(engine):
    seqs = engine("llama").make_sequences([[1, 2, 3], [4, 5]], SamplingParams())
    sched = Scheduler(None, 64)
    sched.add(seqs)
    assert [(b.seq, b.n_tokens, b.slots) for b in sched.schedule()] == \
        [(seqs[0], 3, None), (seqs[1], 2, None)]


def test_scheduler_check_sees_a_waiting_sequence_with_blocks(engine):
    llm = engine("llama")
    [seq] = llm.make_sequences([[1, 2, 3]], SamplingParams())
    sched = Scheduler(llm.cache, 64)
    sched.add([seq])
    sched.check_invariants()
    llm.cache.append(seq.id, [1, 2, 3])  # blocks for a sequence that never ran: a leak
    try:
        with pytest.raises(AssertionError, match=f"waiting sequence {seq.id} holds blocks"):
            sched.check_invariants()
    finally:
        llm.cache.free(seq.id)


def step(sched):
    """One scheduler step with the forward pass simulated: each scheduled sequence computes
    its tokens, and one that has computed all it holds samples token 0 next."""
    batch = sched.schedule()
    for seq, n, _ in batch:
        seq.n_computed += n
        if seq.n_computed == len(seq.tokens):
            seq.tokens.append(0)
    sched.check_invariants()
    return [(s.id, n) for s, n, _ in batch]


def test_a_full_pool_preempts_no_one_who_has_room(engine):
    """Two sequences fill a two-block pool, each with room left in its block: they decode on
    side by side until one needs a block that does not exist, and only then is the newer one
    preempted."""
    from cache import KVCache
    a, b = engine("llama").make_sequences([[1, 2], [3, 4]], SamplingParams())
    sched = Scheduler(KVCache(1, 1, 4, n_blocks=2, block_size=4), 64)
    sched.add([a, b])
    assert step(sched) == [(a.id, 2), (b.id, 2)]
    assert sched.cache.n_free_blocks == 0
    for _ in range(2):  # positions 2 and 3 fit in each one's own block
        assert step(sched) == [(a.id, 1), (b.id, 1)]
    assert sched.n_preemptions == 0
    assert step(sched) == [(a.id, 1)]  # position 4 needs a fifth slot: b makes way
    assert sched.n_preemptions == 1 and list(sched.waiting) == [b]
    sched.cache.free(a.id)


def test_a_cached_prompt_is_admitted_into_a_full_pool(engine):
    """A prompt whose every block is cached needs no fresh block (only its last token is
    recomputed, into its own cached block): it is admitted though nothing else is free."""
    from cache import KVCache
    llm = engine("llama")
    first, other, again = llm.make_sequences([[1, 2, 3, 4], [5, 6], [1, 2, 3, 4]],
                                             SamplingParams())
    sched = Scheduler(KVCache(1, 1, 4, n_blocks=2, block_size=4), 64)
    sched.add([first])
    step(sched)
    sched.finish(first)  # its one full block stays cached
    sched.add([other])
    step(sched)  # takes the never-used block: none is free but the cached one
    sched.add([again])
    assert step(sched) == [(other.id, 1), (again.id, 1)]
    assert again.n_cached == 3 and sched.n_preemptions == 0
    for s in (other, again):
        sched.cache.free(s.id)


def test_forks_run_right_after_their_parent(engine, monkeypatch):
    """A prompt's other samples join the running list right behind it, in order: they are as
    old as their parent (preempted after it, never before)."""
    placed = []
    start_forks = Scheduler.start_forks

    def recorded(self, parent):
        children = start_forks(self, parent)
        if children:
            at = self.running.index(parent)
            placed.append(self.running[at + 1:at + 1 + len(children)] == children)
        return children
    monkeypatch.setattr(Scheduler, "start_forks", recorded)
    outs = engine("gpt2").generate([[7, 7], [1, 2, 3]], SamplingParams(
        max_new_tokens=3, temperature=1.0, seed=0, n=3, ignore_eos=True))
    assert len(outs) == 6 and placed == [True, True]


def test_many_requests_complete_in_a_small_pool(tiny_dir):
    """Hundreds of requests through a pool that holds a handful: none lost, all correct."""
    llm = LLM(str(tiny_dir("llama")), dtype="float32", block_size=4, n_blocks=16,
              max_batch_tokens=32)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 290, (int(torch.randint(1, 12, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(200)]
    p = SamplingParams(max_new_tokens=8, ignore_eos=True)
    done = []
    outs = llm.generate(prompts, p, on_finish=lambda i, o: done.append(i))
    assert sorted(done) == list(range(200)) and all(len(o.token_ids) == 8 for o in outs)
    ample = LLM(str(tiny_dir("llama")), dtype="float32", block_size=4)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ample.generate(prompts, p)]


def test_chat_turns_reuse_the_conversation_cache(tiny_dir, cli):
    code, _, err = cli("--chat", "--model", str(tiny_dir("gpt2")), "--max-new-tokens", "6",
                       "--dtype", "float32", "--ignore-eos",
                       stdin="the quick brown fox\nand the dog\n")
    assert code == 0, err
    cached = [int(x) for x in re.findall(r"cached (\d+)", err)]
    prompts = [int(x) for x in re.findall(r"prompt (\d+) tokens", err)]
    # turn 2 extends turn 1's ids, so every full block of what turn 1 computed (its prompt and
    # all its reply but the last token, which never went through the cache) is a hit
    assert len(cached) == 2 and cached[0] == 0
    assert cached[1] == (prompts[0] + 6 - 1) // 16 * 16 > 0


# ------------------------------------------------------------------------------------------
# a quantized KV cache

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_quantized_cache_logits_stay_close_to_exact(tiny_dir, arch, kv_dtype):
    """Prefill, then teacher-forced decode through a quantized cache: every step's logits
    within a few percent of the logit range of the exact (uncached, fp32) ones. The exact
    bound of one attention call is test_kernels.py's; through the layers it compounds, so
    this one is empirical: int8 stays within 1%, fp8 (3 mantissa bits) within 6%."""
    llm = LLM(str(tiny_dir(arch)), dtype="float32", block_size=4, kv_dtype=kv_dtype)
    tokens = torch.randint(0, 290, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    [seq] = llm.make_sequences([tokens], SamplingParams(max_new_tokens=1))
    worst = 0.0
    try:
        batch = [(seq, 20, llm.cache.append(seq.id, tokens[:20]))]
        while True:
            logits = llm.run(batch)[0]
            want = dense_logits(llm, tokens[:seq.n_computed])[-1]
            worst = max(worst, ((logits - want).abs().max() / (want.max() - want.min())).item())
            if seq.n_computed == len(tokens):
                break
            batch = [(seq, 1, llm.cache.append(seq.id, [tokens[seq.n_computed]]))]
    finally:
        llm.cache.free(seq.id)
    assert 0 < worst < {"int8": 0.01, "fp8": 0.06}[kv_dtype]


def test_quantized_cache_shares_forks_and_preempts_unchanged(tiny_dir):
    """Prefix hits, forks, copy-on-write and preemption move whole blocks and their scales:
    in an int8 pool they give exactly what the same int8 pool gives without them."""
    path = str(tiny_dir("llama"))
    p = SamplingParams(max_new_tokens=6, ignore_eos=True)
    ample = LLM(path, dtype="float32", block_size=4, kv_dtype="int8")
    prompts = [list(range(3, 30)), list(range(3, 30)) + [5, 6], [9] * 13, [4, 4]]
    alone = [ample.generate([pr], p)[0].token_ids for pr in prompts]
    ample.cache.forget_cached()
    shared = ample.generate(prompts, p)
    assert [o.token_ids for o in shared] == alone
    hit = ample.generate([prompts[1]], p)[0]
    assert hit.n_cached_tokens > 0 and hit.token_ids == alone[1]
    tight = LLM(path, dtype="float32", block_size=4, kv_dtype="int8", n_blocks=12,
                max_batch_tokens=8)
    assert [o.token_ids for o in tight.generate(prompts, p)] == alone
    assert tight.n_preemptions > 0
    forks = ample.generate([prompts[2]], SamplingParams(max_new_tokens=6, temperature=1.0,
                                                        seed=3, n=3, ignore_eos=True))
    for i, f in enumerate(forks):
        [one] = ample.generate([prompts[2]], SamplingParams(
            max_new_tokens=6, temperature=1.0, seed=3 + i, ignore_eos=True))
        assert f.token_ids == one.token_ids
    for llm in (ample, tight):
        llm.cache.check_invariants()
        assert llm.cache.n_free_blocks == llm.cache.n_blocks


# ------------------------------------------------------------------------------------------
# the shell as people use it: chat, Ctrl-C, honest summaries, no traceback

def test_chat_api_is_generate_through_the_template(engine):
    llm = engine("gpt2")
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the fox"}]
    p = SamplingParams(max_new_tokens=5, ignore_eos=True)
    text = model_mod.apply_chat_template(llm.tokenizer, conv)
    [want] = llm.generate([llm.tokenizer.encode(text)], p)
    [one] = llm.chat(conv, p)
    two = llm.chat([conv, conv[1:]], p)
    assert one.token_ids == want.token_ids == two[0].token_ids and len(two) == 2
    for bad in ([], [{"role": "user"}], [[]], "hi", [["hi"]]):
        with pytest.raises(ValueError, match="conversation"):
            llm.chat(bad, p)


@pytest.mark.parametrize("call, error, match", [
    (lambda llm: llm.generate([None]), TypeError, "a string or a list of token ids, not NoneType"),
    (lambda llm: llm.generate([[1, 1.7]]), TypeError, "token ids are integers, not 1.7"),
    (lambda llm: llm.generate([[1, True]]), TypeError, "token ids are integers"),
    (lambda llm: llm.generate([5]), ValueError, "list of strings or a list of token-id lists"),
    (lambda llm: LLM(llm.model_path, device="tpu"), ValueError, "unsupported device 'tpu'"),
    (lambda llm: LLM(llm.model_path, kv_budget="100TiB"), ValueError, "more than the"),
    (lambda llm: LLM(llm.model_path, kv_budget=4096), ValueError, "bytes only from 1 MiB"),
    (lambda llm: LLM(llm.model_path, n_blocks=10**12), ValueError, r"at most \d+ blocks of 16 fit")])
def test_bad_api_arguments_raise_one_clear_error(engine, call, error, match):
    llm = engine("llama")
    with pytest.raises(error, match=match):
        call(llm)
    llm.cache.check_invariants()
    assert llm.cache.n_free_blocks == llm.cache.n_blocks


def test_summary_never_shows_a_negative_rate_and_says_why_nothing_came(engine, monkeypatch):
    llm = engine("llama")
    [empty] = llm.generate([[1, 2]], SamplingParams(max_new_tokens=1, ignore_eos=True))
    empty.token_ids, empty.decode_s = [], 0.0  # as when the first token is end-of-sequence
    monkeypatch.setattr(llm.tokenizer, "chat_template", "{{ messages }}")
    line = gen_mod.summary_line(llm, [empty], 0.1)
    assert "no token generated" in line and "--chat" in line and "tokens/s" not in line
    assert "--chat" not in gen_mod.summary_line(llm, [empty], 0.1, chat=True)
    [one] = llm.generate([[1, 2]], SamplingParams(max_new_tokens=1, ignore_eos=True))
    line = gen_mod.summary_line(llm, [one], 0.1)
    assert "1 generated" in line and "tokens/s" not in line and "-" not in line.split("|")[4]


def test_cli_chat_answers_a_file_of_questions(tiny_dir, cli, tmp_path):
    f = tmp_path / "q.txt"
    f.write_text("the fox\nthe dog\n")
    code, out, err = cli("--chat", "--prompt-file", str(f), "--model", str(tiny_dir("gpt2")),
                         "--max-new-tokens", "3", "--ignore-eos")
    assert code == 0 and out.count("### ") == 2 and "### 1: the dog" in out, err
    assert "[2 requests" in err


def test_cli_chat_answers_one_question_and_exits(tiny_dir, cli):
    code, out, err = cli("--chat", "the fox", "--model", str(tiny_dir("gpt2")),
                         "--max-new-tokens", "4", "--ignore-eos")
    assert code == 0 and out.strip() and err.count("[1 request") == 1, err
    assert "chat:" not in err  # no interactive banner


def test_cli_chat_commands(tiny_dir, cli, tmp_path):
    """Empty lines are skipped, /system and /reset start over, /save writes the conversation,
    /help lists the commands, /exit leaves."""
    saved = tmp_path / "conv.json"
    code, out, err = cli("--chat", "--model", str(tiny_dir("gpt2")), "--max-new-tokens", "3",
                         "--ignore-eos", stdin=f"\n/help\n/system be brief\nthe fox\n"
                         f"/save {saved}\n/reset\nthe dog\n/save {tmp_path / 'no' / 'x'}\n"
                         "/exit\nnot read\n")
    assert code == 0, err
    assert "/reset" in err and err.count("(a new conversation)") == 2
    assert err.count("[1 request") == 2 and "error: cannot save" in err
    conv = json.loads(saved.read_text())
    assert [m["role"] for m in conv] == ["system", "user", "assistant"]
    assert conv[0]["content"] == "be brief" and conv[1]["content"] == "the fox"


@pytest.mark.parametrize("args, match", [
    (["--device", "tpu"], "unsupported device 'tpu'"),
    (["--kv-budget", "100TiB"], "more than the"),
    (["--kv-budget", "1.5"], "a fraction must be in"),
    (["--kv-budget", "4096"], "bytes only from 1 MiB"),
    (["--n-blocks", str(10**12)], "blocks of 16 fit"),
    (["--chat", "--prompt-file", "x"], "--chat takes a question or --prompt-file")])
def test_cli_more_bad_input_is_one_clear_line(tiny_dir, cli, args, match):
    code, _, err = cli("hi", "--model", str(tiny_dir("llama")), *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]


def test_ctrl_c_while_starting_is_one_line(tiny_dir):
    """SIGINT while torch is still importing: exit status 130 and one line, no traceback."""
    proc = subprocess.Popen([sys.executable, str(HERE / "generate.py"), "hi", "--model",
                             str(tiny_dir("llama"))], stderr=subprocess.PIPE, text=True)
    time.sleep(0.8)  # past Python's start, inside torch's import (about 2 s)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "interrupted", err


def read_until(fd, marker, timeout=60):
    """Read a pseudo-terminal until marker has appeared; everything read so far."""
    seen, end = b"", time.monotonic() + timeout
    while marker.encode() not in seen:
        assert time.monotonic() < end, f"no {marker!r} in {seen[-2000:]!r}"
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:
                break
    return seen.decode(errors="replace")


def test_interactive_chat_through_a_terminal(tiny_dir):
    """Three turns in a real pseudo-terminal: a reply, a reply stopped by Ctrl-C (the program
    stays), a third turn that still has the conversation in its prompt, and a clean Ctrl-D."""
    path = tiny_dir("llama", max_position_embeddings=8192)
    pid, fd = pty.fork()
    if pid == 0:  # the child: generate.py on the terminal's other end
        os.execv(sys.executable, [sys.executable, str(HERE / "generate.py"), "--chat",
                                  "--model", str(path), "--max-new-tokens", "400",
                                  "--ignore-eos", "--dtype", "float32"])
    reply_done = "s]\r\n> "  # a summary line's end, then the prompt
    try:
        read_until(fd, "leaves\r\n> ")
        os.write(fd, b"the fox\n")
        first = read_until(fd, reply_done)
        prompt_1 = int(re.search(r"prompt (\d+) tokens", first).group(1))
        os.write(fd, b"and the dog\n")
        read_until(fd, "and the dog\r\n")  # the terminal's echo of the line
        os.read(fd, 1)                    # the reply has begun streaming: 400 tokens to go
        os.write(fd, b"\x03")             # Ctrl-C, through the terminal: SIGINT
        stopped = read_until(fd, "[reply stopped]\r\n> ")
        assert "[reply stopped]" in stopped and "Traceback" not in stopped
        os.write(fd, b"sun\n")
        third = read_until(fd, reply_done)
        prompt_3 = int(re.search(r"prompt (\d+) tokens", third).group(1))
        assert prompt_3 > prompt_1 + 400  # the first reply and the stopped one are in it
        assert int(re.search(r"cached (\d+)", third).group(1)) > 0
        os.write(fd, b"\x04")             # Ctrl-D at the prompt: leave
        read_until(fd, "\n", timeout=30)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0


# ------------------------------------------------------------------------------------------
# the compiled decode step (LLM(compile=True), --compile)

@pytest.mark.parametrize("arch, config", [
    ("gpt2", {}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1})])
def test_compiled_decode_gives_the_eager_tokens(tiny_dir, arch, config, cli):
    """compile=True in fp32: every request's tokens == the eager engine's, greedy and seeded
    sampling, in a batch whose requests end at different steps (the graph for many sequences,
    then the one for a single sequence; prompts through the blocks' compiled halves), with
    windows that slide past the first blocks; then a prefix-cache hit through the compiled
    step, and the CLI's --compile on the same graphs."""
    path = str(tiny_dir(arch, **config))
    prompts = [[5, 9, 2, 33, 7], [11, 4, 18], [3, 3, 40, 21, 9, 8, 1, 30, 6, 12]]
    params = [SamplingParams(max_new_tokens=20, ignore_eos=True),
              SamplingParams(max_new_tokens=6, ignore_eos=True),
              SamplingParams(max_new_tokens=13, temperature=0.8, seed=3, ignore_eos=True)]
    eager = LLM(path, dtype="float32", block_size=4)
    compiled = LLM(path, dtype="float32", block_size=4, compile=True)
    assert (eager.decode_path, compiled.decode_path) == ("eager", "compiled")
    for run in range(2):  # the second: every prompt's full blocks hit the prefix cache
        want = eager.generate(prompts, params)
        got = compiled.generate(prompts, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert all(o.n_cached_tokens > 0 for o in got[:1]) == (run == 1)
        compiled.cache.check_invariants()
    assert set(compiled.compiled.graphs) == {"decode 1", "decode 2+", "prefill"}
    code, out, err = cli("--model", path, "--dtype", "float32", "--block-size", "4",
                         "--compile", "--token-ids", "5 9 2 33 7", "--max-new-tokens", "20",
                         "--ignore-eos")
    assert code == 0, err
    assert "compiling the decode step for 1 sequence" in err
    assert "compiling the blocks' halves around attention (prefill)" in err
    assert "| compiled decode (first call of each graph: prefill " in err


def test_compile_gives_way_where_it_cannot_apply(engine, tiny_dir, cli):
    """compile=True where the compiled step does not apply runs eager and says why (invariant
    mode keeps its bitwise ladder on its own products; a quantized cache); the CLI says so."""
    path = str(tiny_dir("llama"))
    assert engine("llama").decode_path == "eager"
    inv = LLM(path, dtype="bfloat16", compile=True, invariant=True)
    assert inv.compiled is None and inv.decode_path.startswith("eager (invariant mode")
    int8 = LLM(path, dtype="float32", compile=True, kv_dtype="int8")
    assert int8.compiled is None and int8.decode_path == "eager (a quantized cache)"
    code, _, err = cli("--model", path, "--compile", "--invariant", "--token-ids", "5 9 2",
                       "--max-new-tokens", "3")
    assert code == 0 and "note: decode runs eager (invariant mode" in err
    assert "| eager (invariant mode keeps its own fixed-shape products) decode |" in err


# ------------------------------------------------------------------------------------------
# the prompt cache's disk tier (LLM(prompt_cache=DIR), --prompt-cache)

@pytest.mark.parametrize("dtype, invariant, kv_dtype", [
    ("float32", False, None), ("bfloat16", True, None), ("float32", False, "int8")])
def test_prompt_cache_hit_from_disk_equals_cold(tiny_dir, tmp_path, dtype, invariant, kv_dtype):
    """A fresh engine on a warm directory (a new process, as far as the cache knows) reads the
    prompts' full blocks from disk and prefills only the rest: the same tokens as an engine
    without a prompt cache (fp32, bitwise-invariant bf16: there a hit changes no bit, and an
    int8 cache, whose scales travel with their blocks)."""
    path = str(tiny_dir("llama"))
    shared = [7, 3, 9, 1, 4, 4, 8, 2, 6, 5, 3, 11]
    prompts = [shared + [5, 2, 9], shared + [1], [3, 1, 4, 1, 5, 9, 2, 6]]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    kw = dict(dtype=dtype, block_size=4, invariant=invariant, kv_dtype=kv_dtype)
    cold = LLM(path, **kw).generate(prompts, params)
    first = LLM(path, prompt_cache=tmp_path, **kw).generate(prompts, params)
    assert all(o.n_disk_tokens == 0 for o in first)
    warm = LLM(path, prompt_cache=tmp_path, **kw)
    again = warm.generate(prompts, params)
    assert [o.token_ids for o in again] == [o.token_ids for o in cold]
    # the first and third prompts' full blocks come from disk; the second's from the pool,
    # where the first brought them in the same step
    assert [o.n_disk_tokens for o in again] == [12, 0, 7]
    assert [o.n_cached_tokens for o in again] == [12, 12, 7]
    warm.cache.check_invariants()


def test_prompt_cache_never_hits_for_another_setup(tiny_dir, tmp_path):
    """A block written under one setup is never read under another: other weights (same
    architecture), dtype, KV storage dtype or block size."""
    prompt = [[7, 3, 9, 1, 4, 4, 8, 2, 6, 5, 3, 11, 2]]
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    base = dict(dtype="float32", block_size=4, prompt_cache=tmp_path)
    LLM(str(tiny_dir("llama")), **base).generate(prompt, params)
    same = LLM(str(tiny_dir("llama")), **base).generate(prompt, params)[0]
    assert same.n_disk_tokens == 12  # the control: the same setup hits
    for path, change in [(tiny_dir("llama", seed=1), {}), (tiny_dir("llama"), {"dtype": "bfloat16"}),
                         (tiny_dir("llama"), {"kv_dtype": "int8"}),
                         (tiny_dir("llama"), {"block_size": 2})]:
        out = LLM(str(path), **{**base, **change}).generate(prompt, params)[0]
        assert out.n_disk_tokens == 0, change


def test_prompt_cache_survives_damaged_files_and_two_writers(tiny_dir, tmp_path, cli):
    """Damaged files (cut, changed) are refused and removed and the request is still right;
    two processes filling one directory at once leave only whole, valid files and no
    temporary ones; the CLI's summary counts the tokens read from disk."""
    path = str(tiny_dir("llama"))
    prompt = [7, 3, 9, 1, 4, 4, 8, 2, 6, 5, 3, 11, 2]
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    cold = LLM(path, dtype="float32", block_size=4).generate([prompt], params)[0]
    LLM(path, dtype="float32", block_size=4, prompt_cache=tmp_path).generate([prompt], params)
    by_tokens = {}
    for f in tmp_path.glob("*.safetensors"):
        with cache_mod.safe_open(f, "pt") as st_file:
            by_tokens[tuple(st_file.get_tensor("tokens").tolist())] = f
    first, second = by_tokens[tuple(prompt[:4])], by_tokens[tuple(prompt[4:8])]
    raw = bytearray(first.read_bytes())
    raw[-5] ^= 0x10  # a bit of its K/V changed: the checksum disagrees
    first.write_bytes(raw)
    second.write_bytes(second.read_bytes()[:100])  # cut short: the header points past the end
    llm = LLM(path, dtype="float32", block_size=4, prompt_cache=tmp_path)
    for n_rejected in (1, 2):  # the first block refused, then (its copy rewritten) the second
        llm.cache.forget_cached()
        out = llm.generate([prompt], params)[0]
        assert out.token_ids == cold.token_ids and llm.cache.disk.n_rejected == n_rejected
    out = llm.generate([prompt], params)[0]  # both rewritten whole by the prefills
    assert out.n_disk_tokens == 0 and out.n_cached_tokens == 12
    llm.cache.forget_cached()
    assert llm.generate([prompt], params)[0].n_disk_tokens == 12
    script = (f"import sys; sys.path.insert(0, {str(HERE)!r}); from generate import LLM, "
              f"SamplingParams\nllm = LLM({path!r}, dtype='float32', block_size=4, "
              f"prompt_cache=sys.argv[1])\nfor i in range(6):\n    llm.generate([[i, 5, 9, 1, 4, "
              f"4, 8, 2, 6, 5, 3, 11, 2, i]], SamplingParams(max_new_tokens=5, ignore_eos=True))")
    shared = tmp_path / "shared"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(shared)]) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert not list(shared.glob("*.tmp")) and len(list(shared.glob("*.safetensors"))) >= 12
    check = LLM(path, dtype="float32", block_size=4, prompt_cache=shared)
    for f in shared.glob("*.safetensors"):
        with cache_mod.safe_open(f, "pt") as st_file:
            toks = st_file.get_tensor("tokens").tolist()
        assert check.cache.disk.load(bytes.fromhex(f.stem), toks, (2, 2, 2, 4, 8),
                                     torch.float32) is not None, f.name
    code, _, err = cli("--model", path, "--dtype", "float32", "--block-size", "4",
                       "--prompt-cache", str(tmp_path), "--token-ids", " ".join(map(str, prompt)),
                       "--max-new-tokens", "2")
    assert code == 0 and "| cached 12 (12 from disk) |" in err
    code, _, err = cli("--model", path, "--prompt-cache", str(tmp_path),
                       "--prompt-cache-budget", "lots", "--token-ids", "1 2")
    assert code == 2 and err.startswith("error: prompt cache budget 'lots'")
    code, _, err = cli("--model", path, "--kv-host-budget", "1GiB", "--token-ids", "1 2",
                       "--max-new-tokens", "1")
    assert code == 0 and "note: --kv-host-budget is skipped on a CPU" in err
    code, _, err = cli("--model", path, "--kv-host-budget", "-3", "--token-ids", "1 2")
    assert code == 2 and err.startswith("error: KV host budget '-3'")


# ------------------------------------------------------------------------------------------
# tensor parallelism: N processes over gloo give one process's tokens, each with 1/N of the KV

TP_LAYOUTS = {  # name: (arch, checkpoint overrides); every head count even, and a 9:3 one
    "llama-gqa": ("llama", dict(num_attention_heads=8, num_key_value_heads=4)),
    "gpt2": ("gpt2", {}),
    "llama-9:3": ("llama", dict(num_attention_heads=9, num_key_value_heads=3, hidden_size=36,
                                intermediate_size=48)),
}
TP_PREFIX = [5, 9, 1, 4, 4, 8, 2, 6, 5, 3, 11, 2]  # three blocks of 4: prefix hits


def tp_run(llm, monkeypatch, draft):
    """What a tensor-parallel engine must reproduce: greedy requests sharing a prefix through
    a pool tight enough to preempt (with every sampled row of logits), the same requests
    uncached and speculative (n-gram and a draft model), and a scored sequence."""
    prompts = [TP_PREFIX + [i, 7, i + 1] for i in range(4)] + [[3, 1, 4, 1, 5, 9, 2, 6]]
    p = SamplingParams(max_new_tokens=64, ignore_eos=True)
    rows = record_logits(monkeypatch)
    before = llm.n_preemptions
    outs = llm.generate(prompts, p)
    logits = {k: torch.stack(v) for k, v in rows.items()}
    monkeypatch.undo()
    return dict(
        tokens=[o.token_ids for o in outs], cached=[o.n_cached_tokens for o in outs],
        preempted=llm.n_preemptions - before, logits=logits,
        uncached=[o.token_ids for o in llm.generate(prompts[-2:], p, use_cache=False)],
        ngram=[o.token_ids for o in llm.generate(prompts, p, speculative="ngram")],
        draft=[o.token_ids for o in llm.generate(prompts[:2], p, speculative=f"draft:{draft}")],
        score=llm.score(prompts[0] + outs[0].token_ids))


@pytest.mark.parametrize("layout,n", [("llama-gqa", 2), ("llama-gqa", 4), ("gpt2", 2),
                                      ("gpt2", 4), ("llama-9:3", 3)])
def test_tensor_parallel_gives_one_process_tokens(tiny_dir, monkeypatch, layout, n):
    """TP n against TP 1 on the same checkpoint and pool: fp32 logits within 1e-5 at every
    sampled step and over a scored sequence, greedy tokens equal over 64 tokens with prefix
    hits, preemption, no cache, n-gram and draft speculation; the ranks' pools hold the same
    blocks (the bookkeeping rank 0 broadcast is every rank's), each 1/n of one process's KV
    bytes; and the ranks end with the engine."""
    arch, overrides = TP_LAYOUTS[layout]
    path = str(tiny_dir(arch, **overrides))
    kw = dict(dtype="float32", block_size=4, n_blocks=40)
    one = LLM(path, **kw)
    want = tp_run(one, monkeypatch, path)
    with LLM(path, tensor_parallel=n, **kw) as llm:
        got = tp_run(llm, monkeypatch, path)
        shards = llm.kv_shards()
        procs = llm.cache.workers.procs
        assert len(procs) == n - 1 and all(p.is_alive() for p in procs)
        assert llm.cache.bytes_per_token * n == one.cache.bytes_per_token
        with pytest.raises(ValueError, match="another tensor-parallel engine of this process"):
            LLM(path, tensor_parallel=n, **kw)  # one process group per process
    assert [p.exitcode for p in procs] == [0] * (n - 1)  # closed: every rank left its loop
    assert want["preempted"] > 0 and got["preempted"] == want["preempted"]
    assert want["cached"][1] >= len(TP_PREFIX) and got["cached"] == want["cached"]
    assert got["tokens"] == want["tokens"] == want["ngram"]
    assert got["uncached"] == want["tokens"][-2:] and got["ngram"] == want["tokens"]
    assert got["draft"] == want["tokens"][:2]
    assert got["logits"].keys() == want["logits"].keys()
    for k, rows in want["logits"].items():
        torch.testing.assert_close(got["logits"][k], rows, atol=1e-5, rtol=0)
    torch.testing.assert_close(got["score"], want["score"], atol=1e-5, rtol=0)
    assert len(shards) == n
    for kv, _ in shards:
        assert kv.shape[2] == one.cfg.n_kv_head // n  # (L, 2, K/n, N, P, D)
        assert kv.nbytes == one.cache.n_blocks * 4 * llm.cache.bytes_per_token
    torch.testing.assert_close(torch.cat([kv for kv, _ in shards], dim=2), one.cache.kv,
                               atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="this tensor-parallel engine is closed"):
        llm.generate([[1, 2]])


def test_tensor_parallel_batches_equal_one_process(tiny_dir):
    """Random batches (prompts sharing prefixes, greedy and seeded sampling, forks) through a
    small pool in small steps (chunks, preemption): TP 2 gives one process's tokens."""
    arch, overrides = TP_LAYOUTS["llama-gqa"]
    path = str(tiny_dir(arch, **overrides))
    kw = dict(dtype="float32", block_size=4, n_blocks=24, max_batch_tokens=12)
    one = LLM(path, **kw)
    with LLM(path, tensor_parallel=2, **kw) as two:
        @settings(max_examples=max(8, settings.default.max_examples // 2))
        @given(prompts=st.lists(st.lists(st.integers(3, 6), min_size=1, max_size=20),
                                min_size=1, max_size=5),
               n_new=st.integers(1, 24), temperature=st.sampled_from([0.0, 0.8]),
               n=st.integers(1, 2), seed=st.integers(0, 99))
        def check(prompts, n_new, temperature, n, seed):
            p = SamplingParams(max_new_tokens=n_new, temperature=temperature, n=n, seed=seed,
                               ignore_eos=True)
            for llm in (one, two):
                llm.cache.forget_cached()
            want = [o.token_ids for o in one.generate(prompts, p)]
            assert [o.token_ids for o in two.generate(prompts, p)] == want
            two.cache.check_invariants()
        check()


def test_tensor_parallel_invariant_mode_is_bitwise_in_bf16(tiny_dir, monkeypatch):
    """TP 3 (the 9:3 layout: with three ranks the order of a sum matters), invariant mode,
    bf16 and an int8 cache: a request alone == uncached == among others in a tight pool, in
    chunks, with preemption == on prefix hits == speculative, as tokens and as every sampled
    step's logits, bit for bit: the ranks' partial products summed in rank order."""
    arch, overrides = TP_LAYOUTS["llama-9:3"]
    path = str(tiny_dir(arch, **overrides))
    prompts = [TP_PREFIX + [i, 7, 1 + i % 3] for i in range(4)] + [[3, 1, 4, 1, 5, 9, 2]]
    p = SamplingParams(max_new_tokens=40, ignore_eos=True)
    rows = record_logits(monkeypatch)
    with LLM(path, dtype="bfloat16", kv_dtype="int8", block_size=4, n_blocks=30,
             max_batch_tokens=8, invariant=True, tensor_parallel=3) as llm:
        alone = [llm.generate([q], p)[0].token_ids for q in prompts]
        before = llm.n_preemptions
        runs = {"uncached": llm.generate(prompts, p, use_cache=False),
                "batched, chunked, preempted": llm.generate(prompts, p),
                "prefix hits": llm.generate(prompts[::-1], p)[::-1],
                "speculative": llm.generate(prompts, p, speculative="ngram", spec_k=3)}
        assert llm.n_preemptions > before
    for name, outs in runs.items():
        assert [o.token_ids for o in outs] == alone, name
    assert runs["prefix hits"][0].n_cached_tokens >= len(TP_PREFIX)
    for prefix, seen in rows.items():
        assert all(torch.equal(r, seen[0]) for r in seen[1:]), prefix
    assert sum(len(r) > 1 for r in rows.values()) >= len(rows) // 2


def test_bad_tensor_parallel_degrees_are_refused_in_one_line(tiny_dir):
    path = str(tiny_dir(*TP_LAYOUTS["llama-9:3"][:1], **TP_LAYOUTS["llama-9:3"][1]))
    with pytest.raises(ValueError, match="^tensor parallel 2 does not divide this model's 3 KV "
                                         "heads and MLP width 48: 1, 3 would$"):
        LLM(path, tensor_parallel=2)
    for bad in (0, -1, True, 2.0, "2"):
        with pytest.raises(ValueError, match="tensor_parallel must be a whole number >= 1"):
            LLM(path, tensor_parallel=bad)
    for kw, what in ((dict(kv_host_budget="1GiB"), "a KV host budget"),
                     (dict(prompt_cache="somewhere"), "a prompt cache")):
        with pytest.raises(ValueError, match=f"tensor parallel 3 does not run with {what}"):
            LLM(path, tensor_parallel=3, **kw)


def test_a_tensor_parallel_step_finishes_before_ctrl_c_and_a_failure_ends_it():
    """Workers.step: Ctrl-C inside waits for the step's end (a rank interrupted midway would
    leave the others in a collective); an error inside ends the engine, which then refuses
    every call with the same reason."""
    workers = gen_mod.Workers(1)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with workers.step():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append("the step ran to its end")
    assert done == ["the step ran to its end"]
    previous = signal.signal(signal.SIGINT, lambda *_: done.append("the chat's handler"))
    try:  # a chat's own handler (it stops the reply) gets the signal after the step
        with workers.step():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append("the step ran to its end")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert done[1:] == ["the step ran to its end", "the chat's handler"]
    with pytest.raises(RuntimeError, match=r"a tensor-parallel step failed \(ValueError: boom\)"
                                           "; every rank is stopped: make a new LLM"):
        with workers.step():
            raise ValueError("boom")
    with pytest.raises(RuntimeError, match="step failed"):
        workers.send("run")


TP_SCRIPT = """
import os, signal, sys, time
sys.path.insert(0, {here!r})
from generate import LLM, SamplingParams
llm = LLM({path!r}, dtype="float32", block_size=4, n_blocks=40, tensor_parallel={n})
print("pids", *[p.pid for p in llm.cache.workers.procs], flush=True)
"""


def tp_script(tiny_dir, n, body):
    """Run a TP engine's script in its own interpreter (a hang or a leak cannot reach this
    one): (exit code, stdout lines, the ranks' pids)."""
    arch, overrides = TP_LAYOUTS["llama-gqa"]
    script = TP_SCRIPT.format(here=str(HERE), path=str(tiny_dir(arch, **overrides)), n=n) + body
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=180)
    lines = proc.stdout.splitlines()
    assert lines and lines[0].startswith("pids"), proc.stderr
    pids = [int(p) for p in lines[0].split()[1:]]
    return proc.returncode, lines, pids


def gone(pid, within=30.0) -> bool:
    """Whether process pid has exited (or is a zombie no one has reaped yet) within the time."""
    end = time.monotonic() + within
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in "ZX":
                    return True
        except FileNotFoundError:
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.1)


def test_a_rank_that_dies_ends_the_others_with_a_clear_error(tiny_dir):
    """Rank 3 of 4 killed: the next call fails at once naming it, the other ranks are
    stopped (no hang), the cache's invariants hold, and every later call says the same."""
    code, lines, pids = tp_script(tiny_dir, 4, """
os.kill(llm.cache.workers.procs[-1].pid, signal.SIGKILL)
t = time.monotonic()
for _ in range(2):
    try:
        llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=8))
    except RuntimeError as e:
        print("error", e, flush=True)
print("seconds", time.monotonic() - t < 30)
llm.cache.check_invariants()
print("tables", llm.cache.block_tables, [p.is_alive() for p in llm.cache.workers.procs])
""")
    assert code == 0
    want = "error tensor-parallel rank 3 ended (exit code -9); every rank is stopped: make a " \
           "new LLM"
    assert lines[1:] == [want, want, "seconds True", "tables {} [False, False, False]"], lines


def test_the_ranks_end_with_rank_0_or_its_interpreter(tiny_dir):
    """Rank 0 killed outright: its ranks see the closed sockets and exit. Rank 0 leaving
    without close(): the interpreter's exit ends them, and exits at once."""
    _, _, pids = tp_script(tiny_dir, 2, "os.kill(os.getpid(), signal.SIGKILL)")
    assert all(gone(p) for p in pids)
    t = time.monotonic()
    code, lines, pids = tp_script(tiny_dir, 4, "print(llm.generate([[1, 2]], SamplingParams("
                                  "max_new_tokens=2, ignore_eos=True))[0].token_ids)")
    assert code == 0 and len(lines) == 2 and all(gone(p, 1) for p in pids)
    assert time.monotonic() - t < 60


def test_torchrun_runs_the_cli_tensor_parallel(tiny_dir):
    """torchrun starts both ranks; rank 0 prints what one process prints, rank 1 serves its
    steps and exits with it."""
    arch, overrides = TP_LAYOUTS["llama-gqa"]
    args = [str(HERE / "generate.py"), "--model", str(tiny_dir(arch, **overrides)), "--dtype",
            "float32", "--token-ids", "5 9 1 4 4 8", "--max-new-tokens", "24", "--ignore-eos"]
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", *args, "--tensor-parallel", "2"],
                         capture_output=True, text=True, timeout=180)
    assert one.returncode == two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and one.stdout.strip()
    assert "| eager, tensor parallel 2 decode |" in two.stderr


# ------------------------------------------------------------------------------------------
# the static-buffer decode step (CUDA graphs on a GPU; uncaptured on a CPU)

def test_static_decode_equals_the_eager_step(tiny_dir, monkeypatch):
    """Batches of 1-9 sequences (buckets 1 to 16, padding rows), shared prefixes, a pool that
    may preempt: the static-buffer step gives the eager step's tokens and, at every sampled
    step, its logits; its padding rows write nothing (the pools end equal)."""
    @settings(max_examples=max(8, settings.default.max_examples // 2))
    @given(prompts=st.lists(st.lists(st.integers(3, 6), min_size=1, max_size=14), min_size=1,
                            max_size=9),
           n_new=st.integers(1, 20), temperature=st.sampled_from([0.0, 0.9]),
           seed=st.integers(0, 99), n_blocks=st.sampled_from([20, 200]))
    def check(prompts, n_new, temperature, seed, n_blocks):
        eager, static = engines[n_blocks]
        for llm in (eager, static):
            llm.cache.forget_cached()
        p = SamplingParams(max_new_tokens=n_new, temperature=temperature, seed=seed,
                           ignore_eos=True)
        rows = record_logits(monkeypatch)
        try:
            want = [o.token_ids for o in eager.generate(prompts, p)]
            got = [o.token_ids for o in static.generate(prompts, p)]
        finally:
            monkeypatch.undo()
        assert got == want
        for seen in rows.values():
            for row in seen[1:]:
                torch.testing.assert_close(row, seen[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(static.cache.kv, eager.cache.kv, atol=1e-5, rtol=0)
    path = tiny_dir("llama")  # engines of this test only: the pools see the same history
    engines = {n: [LLM(path, dtype="float32", block_size=4, n_blocks=n, cuda_graphs=graphs)
                   for graphs in (False, True)] for n in (20, 200)}
    assert all(s.static is not None and s.decode_path == "static-buffer" and e.static is None
               for e, s in engines.values())
    check()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_decode_equals_eager(tiny_dir, dtype):
    """On a GPU: graphs captured (the summary says so), replayed with other batch
    compositions and with prefix hits in the batch, give the eager GPU step's tokens."""
    path = str(tiny_dir("llama"))
    kw = dict(device="cuda", dtype=dtype, block_size=16, n_blocks=64)
    eager, graphs = LLM(path, cuda_graphs=False, **kw), LLM(path, **kw)
    p = SamplingParams(max_new_tokens=24, ignore_eos=True)
    system = list(range(3, 40))
    for prompts in ([[5, 6, 7]], [system + [i] for i in range(3)],
                    [system + [9, i] for i in range(5)] + [[8, 8]]):
        want = [o.token_ids for o in eager.generate(prompts, p)]
        assert [o.token_ids for o in graphs.generate(prompts, p)] == want
    assert graphs.decode_path == "CUDA-graph" and graphs.static.capture
    assert sum(g is not None for _, _, g, _ in graphs.static.sets.values()) >= 3
