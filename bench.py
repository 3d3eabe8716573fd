"""
Every measurement of the project, peers side by side in the same run, one row per
configuration with its conditions, and the machine it ran on.

    python bench.py engine     # decode / prefill tokens/s: engine, transformers, matvec floor
    python bench.py cache      # cached vs uncached time per token as the sequence grows (+PNG)
    python bench.py overhead   # what one small op costs after a large matmul (the decode gap)
    python bench.py prefix     # TTFT with a cached 1000-token system prompt vs cold
    python bench.py throughput # 64 random requests: continuous batching vs transformers
    python bench.py capacity   # sequences that fit a KV budget, with and without sharing
    python bench.py kernels    # GPU: Triton decode GB/s and prefill TFLOP/s vs torch SDPA
    python bench.py kernels --compile-only  # no GPU: every kernel compiled for sm_80..sm_90
    python bench.py memory     # KV bytes/token, blocks, sequences that fit: models x kv dtypes
    python bench.py accuracy   # int8 / fp8 KV cache vs fp32: perplexity, greedy agreement
    python bench.py speculative  # prompt-lookup speculation vs plain decoding; verify cost
    python bench.py load       # cold process to first token: GGUF and safetensors, vs transformers
    python bench.py invariant  # the cost of invariant mode; the ladder bitwise on the real model
    python bench.py tp         # tensor parallel: same tokens as one process, 1/N of the KV per rank
    python bench.py gpu        # GPU serving on real shapes: decode GB/s, throughput, cached TTFT
    python bench.py all        # every section (kernels only where there is a GPU)

What this is not: a test (tests assert, this measures) or a load generator. Timings on a
shared CPU are noisy: compare the ratios of rows measured in the same run, and repeat.
"""
import argparse
import contextlib
import dataclasses
import itertools
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import model as model_mod
from cache import QUANTIZED_DTYPES, KVCache
from generate import LLM, SamplingParams, Scheduler
from speculative import Speculator

# ------------------------------------------------------------------------------------------
# conditions


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        cpu += f", GPU {torch.cuda.get_device_name()}"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), commit {commit()}")


def commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True).stdout.strip()
        return (rev or "unknown") + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def row(*cells):
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


# ------------------------------------------------------------------------------------------
# engine vs transformers vs the floor

def load_peer(path, dtype):
    """The reference: transformers on the very checkpoint we run (GGUF file or HF dir), as a
    dense model in dtype: transformers 5.25 keeps a GGUF's weights in their quantized blocks
    (fp32 compute) unless asked to dequantize them, and the engine runs dense weights."""
    from transformers import AutoModelForCausalLM, GgufConfig
    if path.endswith(".gguf"):
        hf = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype,
            quantization_config=GgufConfig(dequantize=True))
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return hf.eval()


def isa() -> str:
    """The CPU features that decide which matmul kernels run: AMX, AVX-512 BF16, AVX2."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(ln for ln in f if ln.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "ISA unknown"
    names = [("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"),
             ("avx2", "AVX2")]
    return ", ".join(n for f, n in names if f in flags) or "no AVX2"


def matvec_floors(model, dtype) -> dict:
    """'Decode steps' that are nothing but the model's weight matrix-vector products (every
    nn.Linear, LM head included, in forward order): the memory-bandwidth limit of decode, with
    the weights as loaded (F.linear) and, where oneDNN has a bf16 path, reordered into its
    blocked layout as the compiled step runs them (model.pack_weights)."""
    lins = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {m.in_features: torch.randn(1, m.in_features, dtype=dtype) for m in lins}

    def plain():
        for m in lins:
            F.linear(xs[m.in_features], m.weight)
    floors = {"floor: weight matvecs alone": plain}
    if all(model_mod.can_pack(m.weight) for m in lins):
        model_mod.pack_weights(model)

        def packed():
            for m in lins:
                model_mod.step_linear(xs[m.in_features], m)
        floors["floor: the same, packed weights"] = packed
    return floors


def interleaved_rates(gens, floors, n_new, n_prefill, repeat):
    """Decode and prefill tokens/s of every engine in `gens`, measured in interleaved rounds
    (engine A, engine B, floors, engine A, ...) so that a slow spell of a shared machine hits
    every row alike. The same method for every engine: decode tokens/s = (N - 1) / (T(N) -
    T(1)) from an 8-token prompt, T(n) the time to generate n tokens; prefill tokens/s =
    n_prefill / T(1) with an n_prefill-token prompt. Medians over rounds. floors: name ->
    one bare step, timed 5 times a round (steps/s)."""
    times = {name: {"1": [], "n": [], "p": []} for name in gens}
    floor_times = {name: [] for name in floors}
    for gen in gens.values():  # warm-up (and the compiled engine's compile)
        gen("short", 2)
    for _ in range(repeat):
        for name, gen in gens.items():
            for key, which, n in (("1", "short", 1), ("n", "short", n_new), ("p", "long", 1)):
                t = time.perf_counter()
                gen(which, n)
                times[name][key].append(time.perf_counter() - t)
        for name, step in floors.items():
            for _ in range(5):
                t = time.perf_counter()
                step()
                floor_times[name].append(time.perf_counter() - t)
    med = statistics.median
    rates = {name: ((n_new - 1) / (med(t["n"]) - med(t["1"])), n_prefill / med(t["p"]))
             for name, t in times.items()}
    return rates, {name: 1 / med(t) for name, t in floor_times.items()}


def bench_engine(args):
    g = torch.Generator().manual_seed(0)
    print(f"\nDecode and prefill, batch 1, greedy. Machine: {machine()}; {isa()}\n")
    row("dtype", "engine", "decode tok/s", "prefill tok/s", "conditions")
    row(*["---"] * 5)
    for dname in args.dtypes:
        bench_engine_dtype(args, dname, g)


def bench_engine_dtype(args, dname, g):
    """The rows of one dtype: the engine eager and compiled, transformers and the floors, in
    interleaved rounds."""
    from transformers import __version__ as hf_version
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dname]
    engines = {"eager": LLM(args.model, dtype=dtype), "compiled": LLM(args.model, dtype=dtype,
                                                                      compile=True)}
    llm = engines["eager"]
    path = llm.model_path
    vocab = llm.cfg.vocab_size
    prompts = {"short": torch.randint(0, vocab, (8,), generator=g).tolist(),
               "long": torch.randint(0, vocab, (args.prefill,), generator=g).tolist()}
    hf = load_peer(path, dtype)

    def ours(llm):
        def gen(which, n):  # cold every time: forget the blocks the previous round cached
            llm.cache.forget_cached()
            llm.generate([prompts[which]], SamplingParams(max_new_tokens=n, ignore_eos=True))
        return gen

    def theirs(which, n):
        ids = torch.tensor([prompts[which]])
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                        min_new_tokens=n, do_sample=False, pad_token_id=0)
    gens = {name: ours(e) for name, e in engines.items() if e.compiled or name == "eager"}
    rates, floors = interleaved_rates({**gens, "hf": theirs},
                                      matvec_floors(llm.model, dtype), args.new, args.prefill,
                                      args.repeat)
    ref = rates["hf"]
    cond = f"prompt 8 / {args.prefill} tokens, {args.new} new, {args.repeat} rounds"
    for name in gens:
        eng = rates[name]
        row(dname, f"this engine, {engines[name].decode_path} decode", f"{eng[0]:.1f}",
            f"{eng[1]:.0f}", cond)
    row(dname, f"transformers {hf_version} generate", f"{ref[0]:.1f}", f"{ref[1]:.0f}",
        cond + ", same weights, dense")
    for name, rate in floors.items():
        row(dname, name, f"{rate:.1f}", "", "every nn.Linear, 1 token")
    best = max(floors.values())
    for name in gens:
        eng = rates[name]
        row(dname, f"ratio {name} / transformers", f"{eng[0] / ref[0]:.2f}x",
            f"{eng[1] / ref[1]:.2f}x", "same run")
        row(dname, f"ratio {name} / best floor", f"{eng[0] / best:.0%}", "", "same run")


# ------------------------------------------------------------------------------------------
# why decode sits below the floor: the cost of a small op after a large matmul

def bench_overhead(args):
    """One small elementwise op costs a few microseconds on warm caches, but several times more
    right after a matmul has streamed megabytes of weights through them. Measured as: the floor
    loop, the floor loop with one `y + 1` after each matmul, and the same adds alone."""
    llm = LLM(args.model, dtype=torch.bfloat16)
    mats = [m.weight for m in llm.model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=torch.bfloat16) for w in mats}
    y = torch.randn(1, llm.cfg.n_embd, dtype=torch.bfloat16)

    def floor(op):
        for w in mats:
            out = F.linear(xs[w.shape[1]], w)
            if op:
                out + 1

    def adds():
        for _ in mats:
            y + 1
    times = {"floor": [], "floor+op": [], "ops": []}
    for _ in range(args.repeat * 4):
        for key, fn in (("floor", lambda: floor(False)), ("floor+op", lambda: floor(True)),
                        ("ops", adds)):
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = len(mats)
    print(f"\nCost of one small op (y + 1 on a {llm.cfg.n_embd}-vector), bf16, interleaved rounds. "
          f"Machine: {machine()}\n")
    row("where", "us per op")
    row("---", "---")
    row("alone, warm caches", f"{med['ops'] / n * 1e6:.1f}")
    row(f"right after each of the {n} weight matvecs", f"{(med['floor+op'] - med['floor']) / n * 1e6:.1f}")


# ------------------------------------------------------------------------------------------
# prefix sharing: TTFT with a cached system prompt, throughput, capacity

def bench_prefix(args):
    """TTFT of a request whose long prefix (a system prompt) is already in the pool, against
    the same request cold (the pool's cached blocks forgotten first). Interleaved rounds."""
    llm = LLM(args.model, dtype=args.cache_dtype)
    g = torch.Generator().manual_seed(2)
    system = torch.randint(0, llm.cfg.vocab_size, (args.prefix,), generator=g).tolist()
    p = SamplingParams(max_new_tokens=1, ignore_eos=True)
    cold, warm, n_cached = [], [], 0
    for r in range(args.repeat + 1):
        question = torch.randint(0, llm.cfg.vocab_size, (16,), generator=g).tolist()
        llm.cache.forget_cached()
        [c] = llm.generate([system + question], p)         # cold: prefills everything
        [w] = llm.generate([system + question[::-1]], p)   # warm: the system prompt is cached
        if r:  # the first round is a warm-up
            cold.append(c.ttft_s)
            warm.append(w.ttft_s)
            n_cached = w.n_cached_tokens
    med = statistics.median
    print(f"\nTTFT with a cached {args.prefix}-token prefix, 16 new prompt tokens, "
          f"{args.cache_dtype}, {args.repeat} interleaved rounds. Machine: {machine()}\n")
    row("request", "TTFT ms", "prompt tokens prefilled")
    row("---", "---", "---")
    row("cold (nothing cached)", f"{med(cold) * 1e3:.0f}", args.prefix + 16)
    row("prefix cached", f"{med(warm) * 1e3:.0f}", args.prefix + 16 - n_cached)
    row("cached / cold", f"{med(warm) / med(cold):.0%}", "same run")


def bench_throughput(args):
    """nano-vllm's workload scaled down to a CPU: random token ids, random prompt and output
    lengths, ignore_eos. The peer runs transformers' batched generate on all requests at once
    (left padding; it must generate the longest output for every row, so its rate counts only
    the tokens that were asked for, like ours). The three run in interleaved rounds (eager,
    compiled, transformers, eager, ...; medians), so that a slow spell of a shared machine
    hits every row alike."""
    if not 1 <= args.in_min <= args.in_max or not 1 <= args.out_min <= args.out_max:
        raise ValueError("need 1 <= --in-min <= --in-max and 1 <= --out-min <= --out-max")
    llm = LLM(args.model, dtype=args.cache_dtype)
    g = torch.Generator().manual_seed(3)
    n = args.requests
    in_lens = torch.randint(args.in_min, args.in_max + 1, (n,), generator=g).tolist()
    out_lens = torch.randint(args.out_min, args.out_max + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(0, llm.cfg.vocab_size, (k,), generator=g).tolist() for k in in_lens]
    params = [SamplingParams(max_new_tokens=k, ignore_eos=True) for k in out_lens]
    n_out = sum(out_lens)
    compiled = LLM(args.model, dtype=args.cache_dtype, compile=True)
    # compile the steps' graphs first: the rate is the steady one
    compiled.generate(prompts[:2], SamplingParams(max_new_tokens=2, ignore_eos=True))
    compiled.generate(prompts[:1], SamplingParams(max_new_tokens=2, ignore_eos=True))
    hf = load_peer(llm.model_path, llm.dtype)
    width = max(in_lens)
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, pr in enumerate(prompts):  # left padding, as decoder-only batching needs
        ids[i, width - len(pr):] = torch.tensor(pr)
        mask[i, width - len(pr):] = 1

    def ours(engine):
        engine.cache.forget_cached()  # every round cold
        outs = engine.generate(prompts, params)
        assert sum(len(o.token_ids) for o in outs) == n_out

    def theirs():
        with torch.inference_mode():
            hf.generate(ids, attention_mask=mask, max_new_tokens=max(out_lens),
                        min_new_tokens=max(out_lens), do_sample=False, pad_token_id=0)
    runs = {"eager": lambda: ours(llm), "compiled": lambda: ours(compiled), "hf": theirs}
    secs = {name: [] for name in runs}
    for _ in range(args.repeat):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            secs[name].append(time.perf_counter() - t)
    med = {name: statistics.median(s) for name, s in secs.items()}
    paths = {"eager": llm.decode_path, "compiled": compiled.decode_path}
    print(f"\nThroughput: {n} requests, prompt {args.in_min}-{args.in_max} and output "
          f"{args.out_min}-{args.out_max} random tokens, {args.cache_dtype}, ignore_eos, "
          f"medians of {args.repeat} interleaved rounds. Machine: {machine()}; {isa()}\n")
    row("engine", "seconds", "output tok/s", "conditions")
    row("---", "---", "---", "---")
    for name in paths:
        row(f"this engine (continuous batching), {paths[name]} decode", f"{med[name]:.1f}",
            f"{n_out / med[name]:.1f}", f"{n_out} output tokens")
    row(f"transformers {__import__('transformers').__version__} batched generate",
        f"{med['hf']:.1f}", f"{n_out / med['hf']:.1f}", "one padded batch, same requests, dense")
    for name in paths:
        each = sorted(h / s for h, s in zip(secs["hf"], secs[name]))
        row(f"ratio {name} / transformers", "", f"{med['hf'] / med[name]:.2f}x",
            f"same rounds; each round {each[0]:.2f}x to {each[-1]:.2f}x")


def bench_capacity(args):
    """How many sequences a fixed KV budget holds at once, for a workload where every request
    starts with the same system prompt: block bookkeeping only (no model), with sharing and
    with every prompt made unique."""
    from cache import KVCache, blocks_for_budget
    llm_cfg = dict(n_layer=30, n_kv_head=3, head_dim=64, dtype=torch.bfloat16)  # SmolLM2-135M
    budget = args.budget_mib << 20
    n_blocks = blocks_for_budget(budget, 16, **llm_cfg)
    g = torch.Generator().manual_seed(4)
    system = torch.randint(0, 49152, (args.prefix,), generator=g).tolist()

    def fill(shared):
        c = KVCache(1, 1, 1, n_blocks, 16)  # the same bookkeeping, without the tensor
        n = 0
        while True:
            head = system if shared else torch.randint(0, 49152, (args.prefix,), generator=g).tolist()
            tokens = head + torch.randint(0, 49152, (32 + 64,), generator=g).tolist()
            n_cached = c.share_prefix(n, tokens)
            if not c.can_append(n, len(tokens) - n_cached):
                return n
            c.append(n, tokens[n_cached:])
            n += 1
    print(f"\nCapacity of {args.budget_mib} MiB of bf16 KV cache (SmolLM2-135M: "
          f"{n_blocks} blocks of 16 tokens), sequences of a {args.prefix}-token system prompt "
          f"+ 32 prompt + 64 generated tokens. Machine: {machine()}\n")
    row("prefix sharing", "concurrent sequences")
    row("---", "---")
    without, with_ = fill(False), fill(True)
    row("off (every prompt unique)", without)
    row("on (one system prompt)", with_)
    row("ratio", f"{with_ / without:.1f}x" if without else "n/a (nothing fits)")


# ------------------------------------------------------------------------------------------
# cached vs uncached: the linear-versus-quadratic picture

def bench_cache(args):
    llm = LLM(args.model, dtype=args.cache_dtype)
    g = torch.Generator().manual_seed(1)
    print(f"\nTime per generated token at sequence length L, batch 1, {args.cache_dtype}. "
          f"Machine: {machine()}\n")
    row("L", "cached ms/token", "uncached ms/token", "uncached / cached")
    row(*["---"] * 4)
    lengths, cached, uncached = [], [], []
    for n in args.lengths:
        prompt = torch.randint(0, llm.cfg.vocab_size, (n - 1,), generator=g).tolist()

        def per_token(use_cache, n_new):
            p = SamplingParams(max_new_tokens=n_new, ignore_eos=True)
            outs = []
            for _ in range(args.repeat):
                llm.cache.forget_cached()  # every run cold
                outs.append(llm.generate([prompt], p, use_cache=use_cache)[0])
            return statistics.median(o.decode_s / (n_new - 1) for o in outs)
        per_token(True, 2)  # warm-up
        c, u = per_token(True, 9), per_token(False, 3)
        lengths.append(n)
        cached.append(c * 1e3)
        uncached.append(u * 1e3)
        row(n, f"{c * 1e3:.1f}", f"{u * 1e3:.1f}", f"{u / c:.1f}x")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(lengths, uncached, "o-", label="uncached: recompute the whole sequence")
        ax.plot(lengths, cached, "o-", label="paged KV cache: one new token")
        ax.set_xlabel("sequence length L (tokens)")
        ax.set_ylabel("time per generated token (ms)")
        name = os.path.basename(llm.model_path.rstrip("/")).removesuffix(".gguf")
        ax.set_title(f"{name}, {args.cache_dtype}, batch 1, {llm.device.type.upper()}")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"\nplot: {args.plot}")

# ------------------------------------------------------------------------------------------
# memory planning and the accuracy of a quantized cache

# (n_layer, n_head, n_kv_head, head_dim) from each model's config.json
ARCHITECTURES = {
    "GPT-2 124M": (12, 12, 12, 64),
    "GPT-2 1.5B": (48, 25, 25, 64),
    "Llama-3-8B (GQA)": (32, 32, 8, 128),
    "Llama-3-8B, as many KV heads as query heads": (32, 32, 32, 128),
    "Llama-3-70B (GQA)": (80, 64, 8, 128),
    "Llama-3-70B, as many KV heads as query heads": (80, 64, 64, 128),
}
KV_STORAGE = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8,
              "fp8": torch.float8_e4m3fn}


def bench_memory(args):
    """The cache-size formula made concrete: 2 * n_layer * n_kv_head * head_dim * bytes per
    element (+ one fp32 scale per vector when quantized), the blocks a budget holds and how
    many sequences of a given context fit at once. Arithmetic only: nothing is allocated."""
    from cache import blocks_for_budget, bytes_per_token, parse_budget
    from model import load
    budget = parse_budget(args.memory_budget)
    cfg = load(args.model or default_model(), torch.float32, "cpu")[0].cfg
    loaded = os.path.basename((args.model or default_model()).rstrip("/")).removesuffix(".gguf")
    archs = {f"{loaded} (loaded)": (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim),
             **ARCHITECTURES}
    print(f"\nKV cache budget {args.memory_budget} ({budget:,} bytes), blocks of 16 tokens, "
          f"sequences of {args.context} tokens\n")
    row("model", "L x K x D", "kv dtype", "bytes/token", "blocks", "sequences that fit")
    row(*["---"] * 6)
    blocks_per_seq = -(-args.context // 16)
    for name, (n_layer, _, n_kv, d) in archs.items():
        for dname, dtype in KV_STORAGE.items():
            n_blocks = blocks_for_budget(budget, 16, n_layer, n_kv, d, dtype)
            row(name, f"{n_layer} x {n_kv} x {d}", dname,
                f"{bytes_per_token(n_layer, n_kv, d, dtype):,}", f"{n_blocks:,}",
                f"{n_blocks // blocks_per_seq:,}")
    window = args.window
    print(f"\nOne sequence generating {args.long_context:,} tokens one at a time, blocks of 16, "
          f"under a sliding window of {window:,} on every layer (Mistral-7B v0.1's window: "
          f"4,096): the blocks it holds at its peak (block bookkeeping only)\n")
    row("release of blocks out of the window", "peak blocks", "peak KV, Mistral-7B bf16")
    row(*["---"] * 3)
    per_block = 16 * bytes_per_token(32, 8, 128, torch.bfloat16)
    for release in (False, True):
        peak = peak_blocks_of_a_long_generation(args.long_context, window, release)
        row("on" if release else "off", f"{peak:,}", f"{peak * per_block / 2**30:.2f} GiB")


def peak_blocks_of_a_long_generation(n_tokens, window, release, block_size=16) -> int:
    """Append one token at a time (a prompt of one block, then decode) to a pool on the meta
    device, releasing what the window left after every token, as the engine does."""
    cache = KVCache(1, 1, 1, -(-n_tokens // block_size) + 1, block_size, device="meta")
    cache.append(0, list(range(block_size)))
    peak = 1
    for n in range(block_size, n_tokens):
        cache.append(0, [n % 50000])
        if release:
            cache.release_before(0, n + 1 - window + 1)
        peak = max(peak, cache.n_used_blocks)
    cache.check_invariants()
    return peak


def default_model():
    from model import default_model_path
    return str(default_model_path())


# ------------------------------------------------------------------------------------------
# GPU serving on real shapes (random weights: speed does not depend on their values)

GPU_SHAPES = {  # transformers LlamaConfig fields of the real models
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True, rope_theta=100000.0),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,  # a CPU dry run
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
}


def random_checkpoint(name, dest, dtype, device):
    """transformers' model of a GPU_SHAPES shape with its own random init, in dtype on device
    (the peer), saved to dest as a safetensors checkpoint (what the engine loads)."""
    import transformers
    cfg = transformers.LlamaConfig(**GPU_SHAPES[name], max_position_embeddings=8192,
                                   bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = transformers.LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    hf.save_pretrained(dest)
    return hf


def bench_gpu(args):
    """For each shape: batch-1 decode (tokens/s, and the bytes a step must read, every weight
    once plus the KV cache, over the step time, as a share of the measured copy bandwidth);
    serving throughput (random prompt and output lengths, random ids, ignore_eos: nano-vllm's
    workload); TTFT behind a cached system prompt against cold; the invariant mode's batch-1
    decode and throughput against the default's. Peers in the same run: transformers'
    generate for batch 1 and its continuous batching (generate_batch) for throughput. On a
    CPU this is a dry run (--gpu-shapes tiny and small sizes)."""
    import tempfile
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not 1 <= args.in_min <= args.in_max or not 1 <= args.out_min <= args.out_max:
        raise ValueError("need 1 <= --in-min <= --in-max and 1 <= --out-min <= --out-max")
    copy = copy_bandwidth_gbs(device, args.copy_mib << 20)
    print(f"\nGPU serving, {str(dtype).removeprefix('torch.')}, random weights of real shapes. "
          f"Device copy bandwidth {copy:.0f} GB/s (read + write). Machine: {machine()}\n")
    row("shape", "measure", "this engine", "transformers", "ratio", "conditions")
    row(*["---"] * 6)
    g = torch.Generator().manual_seed(6)
    for name in args.gpu_shapes:
        with tempfile.TemporaryDirectory() as tmp:
            hf = random_checkpoint(name, tmp, dtype, device)
            llm = LLM(tmp, device=str(device), dtype=dtype, kv_budget=args.gpu_kv_budget)
            vocab = llm.cfg.vocab_size
            ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
            # batch 1: the step reads every weight once (a tied head once) and the KV so far
            n = args.new
            prompt = ids(16)
            llm.generate([prompt], SamplingParams(max_new_tokens=4, ignore_eos=True))
            ours = ours_decode = decode_rate(llm, prompt, n)
            step_bytes = weight_bytes(llm.model) + llm.cache.bytes_per_token * (16 + n // 2)
            theirs = hf_decode_rate(hf, prompt, n, device)
            row(name, "batch-1 decode tok/s", f"{ours:.1f}", f"{theirs:.1f}",
                f"{ours / theirs:.2f}x", f"{n} new tokens; transformers generate, eager")
            if args.hf_compile:  # its fastest batch-1 setup: a static cache, compiled forward
                compiled = hf_decode_rate(hf, prompt, n, device, compiled=True)
                row(name, "batch-1 decode tok/s", f"{ours:.1f}", f"{compiled:.1f}",
                    f"{ours / compiled:.2f}x", f"{n} new tokens; transformers generate, static "
                    f"cache, torch.compile (compiled before the timed run)")
            row(name, "batch-1 decode, % of copy bandwidth",
                f"{step_bytes * ours / 1e9:.0f} GB/s = {step_bytes * ours / 1e9 / copy:.0%}",
                f"{step_bytes * theirs / 1e9 / copy:.0%}", "",
                f"{step_bytes / 2**20:.0f} MiB a step (weights + KV)")
            # throughput
            k = args.requests
            in_lens = torch.randint(args.in_min, args.in_max + 1, (k,), generator=g).tolist()
            out_lens = torch.randint(args.out_min, args.out_max + 1, (k,), generator=g).tolist()
            prompts = [ids(m) for m in in_lens]
            ours = serve_rate(llm, prompts, out_lens)
            theirs, how = hf_throughput(hf, prompts, out_lens, device)
            row(name, "throughput, output tok/s", f"{ours:.0f}", f"{theirs:.0f}",
                f"{ours / theirs:.2f}x", f"{k} requests, prompts {args.in_min}-{args.in_max}, "
                f"outputs {args.out_min}-{args.out_max}; transformers {how}")
            few = (prompts[:args.gpu_invariant_requests], out_lens[:args.gpu_invariant_requests])
            default_rates = (ours_decode, serve_rate(llm, *few))
            # TTFT behind a cached system prompt
            system = ids(args.gpu_prefix)
            one = SamplingParams(max_new_tokens=1, ignore_eos=True)
            cold, warm = [], []
            for r in range(args.repeat + 1):
                question = ids(16)
                llm.cache.forget_cached()
                [c] = llm.generate([system + question], one)
                [w] = llm.generate([system + question[::-1]], one)
                if r:
                    cold.append(c.ttft_s)
                    warm.append(w.ttft_s)
            med = statistics.median
            row(name, "TTFT, cached system prompt / cold",
                f"{med(warm) * 1e3:.1f} / {med(cold) * 1e3:.1f} ms", "",
                f"{med(warm) / med(cold):.0%}", f"{args.gpu_prefix}-token system prompt, 16 "
                f"new tokens, {args.repeat} rounds")
            # the cost of invariant mode: another engine (its steps are never graphed)
            del llm
            inv = LLM(tmp, device=str(device), dtype=dtype, kv_budget=args.gpu_kv_budget,
                      invariant=True)
            inv.generate([prompt], SamplingParams(max_new_tokens=4, ignore_eos=True))
            for measure, off, on, what in (
                    ("batch-1 decode tok/s", default_rates[0], decode_rate(inv, prompt, n),
                     f"{n} new tokens"),
                    ("throughput, output tok/s", default_rates[1], serve_rate(inv, *few),
                     f"the first {len(few[0])} of the requests above")):
                row(name, f"invariant mode: {measure}", f"on {on:.1f} / off {off:.1f}", "",
                    f"{on / off:.2f}x", f"{what}; off: the default engine above")
            del hf, inv
            if device.type == "cuda":
                torch.cuda.empty_cache()


def decode_rate(llm, prompt, n) -> float:
    """Batch-1 tokens/s after the first token, generating n tokens greedily after prompt."""
    [o] = llm.generate([prompt], SamplingParams(max_new_tokens=n, ignore_eos=True))
    return (n - 1) / o.decode_s


def serve_rate(llm, prompts, out_lens) -> float:
    """Output tokens/s of the requests, each with its own output length, all submitted at
    once (ignore_eos)."""
    t = time.perf_counter()
    outs = llm.generate(prompts, [SamplingParams(max_new_tokens=m, ignore_eos=True)
                                  for m in out_lens])
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)


def hf_decode_rate(hf, prompt, n, device, compiled=False) -> float:
    """transformers' batch-1 tokens/s generating n tokens after prompt (warmed up first);
    compiled: a static KV cache and the forward compiled (its documented fast path)."""
    kw = dict(do_sample=False)
    if compiled:
        kw["cache_implementation"] = "static"
        hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
    x = torch.tensor([prompt], device=device)
    try:
        with torch.inference_mode():
            hf.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)  # warm-up (and compile)
            sync(device)
            t = time.perf_counter()
            hf.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
            sync(device)
            return n / (time.perf_counter() - t)
    finally:
        if compiled:
            del hf.forward  # back to the class's own


def weight_bytes(model) -> int:
    """Bytes of the model's weights, a tensor shared by two names (a tied head) once."""
    return sum(t.untyped_storage().nbytes() for t in {
        t.untyped_storage().data_ptr(): t for t in model.parameters()}.values())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def hf_throughput(hf, prompts, out_lens, device) -> tuple:
    """transformers' output tokens/s for the same requests, each with its own output length:
    its continuous batching (the manager behind generate_batch, warmed up first) where the
    installed version has it, else a padded batched generate (which runs every row to the
    longest output; only the tokens asked for are counted)."""
    import transformers
    gc = transformers.GenerationConfig(max_new_tokens=max(out_lens), do_sample=False,
                                       eos_token_id=-1, pad_token_id=0)
    why = "no continuous batching in this version"
    with torch.inference_mode():
        if hasattr(hf, "init_continuous_batching"):
            try:
                return hf_continuous_batching(hf, prompts, out_lens, gc)
            except Exception as e:  # (an API that moved between versions): the fallback, said
                why = f"its continuous batching failed: {type(e).__name__}: {str(e)[:80]}"
        gc.min_new_tokens = max(out_lens)
        width = max(map(len, prompts))
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        t = time.perf_counter()
        hf.generate(ids, attention_mask=mask, generation_config=gc)
        sync(device)
        return sum(out_lens) / (time.perf_counter() - t), f"padded batched generate ({why})"


def hf_continuous_batching(hf, prompts, out_lens, gc) -> tuple:
    """transformers' continuous batching manager, warmed up, each request its own length."""
    manager = hf.init_continuous_batching(generation_config=gc)
    manager.start()
    try:
        manager.add_request(prompts[0], max_new_tokens=2)
        manager.get_result(timeout=600)  # its warm-up, untimed
        t = time.perf_counter()
        for p, m in zip(prompts, out_lens):
            manager.add_request(p, max_new_tokens=m)
        done = [manager.get_result(timeout=3600) for _ in prompts]
        elapsed = time.perf_counter() - t
    finally:
        manager.stop(block=True)
    n = sum(len(r.generated_tokens) for r in done if r is not None)
    if n != sum(out_lens):
        raise ValueError(f"it returned {n} tokens of {sum(out_lens)}")
    return n / elapsed, "continuous batching (each request its own length)"


# ------------------------------------------------------------------------------------------
# tensor parallelism: the same output, each rank 1/N of the KV cache

def bench_tp(args):
    """Every tensor-parallel degree the model splits into (up to --tp-max), against one
    process, in fp32: the largest logit difference over a scored text, and the same greedy
    requests (a shared system prompt for prefix hits, a pool tight enough to preempt) token for
    token; each rank's KV bytes per token against the formula divided by the degree, the blocks
    a budget holds per rank, and its weights; then tokens/s, interleaved rounds. The ranks are
    processes talking over gloo: on a CPU of a few cores they share the cores, so speed is not
    the point here (a machine with several GPUs is)."""
    from cache import blocks_for_budget, bytes_per_token, parse_budget
    from model import parallel_degrees
    path = args.model or default_model()
    g = torch.Generator().manual_seed(5)
    bs = 16
    one = LLM(path, dtype="float32", block_size=bs, n_blocks=1)
    cfg, vocab = one.cfg, one.cfg.vocab_size
    degrees = [n for n in parallel_degrees(cfg) if n <= args.tp_max]
    system = torch.randint(0, vocab, (args.prefix,), generator=g).tolist()
    prompts = [system + torch.randint(0, vocab, (8,), generator=g).tolist()
               for _ in range(args.requests)]
    text = torch.randint(0, vocab, (args.prefill,), generator=g).tolist()
    per_request = -(-(args.prefix + 8 + args.new) // bs)
    n_blocks = max(per_request + 1, per_request * args.requests // 2)  # preempts
    one.close()
    p = SamplingParams(max_new_tokens=args.new, ignore_eos=True)
    outs, scores, preempted, secs, solo, bpt, weights = {}, {}, {}, {}, {}, {}, {}

    def run(n, llm):
        llm.cache.forget_cached()
        before = llm.n_preemptions
        t = time.perf_counter()
        outs[n] = llm.generate(prompts, p)
        secs.setdefault(n, []).append(time.perf_counter() - t)
        preempted[n] = llm.n_preemptions - before
        [o] = llm.generate(prompts[:1], p)
        solo.setdefault(n, []).append((len(o.token_ids) - 1) / o.decode_s)
    def measure(n, llm):
        scores[n] = llm.score(text)
        bpt[n] = llm.cache.bytes_per_token
        weights[n] = weight_bytes(llm.model)
    one = LLM(path, dtype="float32", block_size=bs, n_blocks=n_blocks)
    measure(1, one)
    for n in degrees[1:] or [1]:  # one tensor-parallel engine at a time, beside one process
        with LLM(path, dtype="float32", block_size=bs, n_blocks=n_blocks,
                 tensor_parallel=n) as llm:
            measure(n, llm)
            for _ in range(args.repeat):  # interleaved rounds
                run(1, one)
                if n > 1:
                    run(n, llm)
    print(f"\nTensor parallel on {os.path.basename(path.rstrip('/'))} ({cfg.n_head} query heads, "
          f"{cfg.n_kv_head} KV heads, MLP {cfg.n_hidden}, vocabulary {vocab}), fp32, gloo. "
          f"{args.requests} greedy requests sharing a {args.prefix}-token system prompt, "
          f"{args.new} new tokens each, a pool of {n_blocks} blocks of {bs} (tight: it "
          f"preempts); a {args.prefill}-token text scored. Machine: {machine()}\n")
    row("degree", "KV heads per rank", "largest logit difference vs 1 process",
        "requests token-equal",
        "prompt tokens from cache", "preemptions")
    row(*["---"] * 6)
    for n in degrees:
        same = sum(a.token_ids == b.token_ids for a, b in zip(outs[1], outs[n]))
        row(n, cfg.n_kv_head // n, f"{(scores[n] - scores[1]).abs().max().item():.2e} "
            f"(logits up to {scores[1].abs().max().item():.1f})",
            f"{same}/{args.requests} ({args.new} tokens each)",
            sum(o.n_cached_tokens for o in outs[n]), preempted[n])
    budget = parse_budget(args.kv_budget)
    full = bytes_per_token(cfg.n_layer, cfg.n_kv_head, cfg.head_dim, torch.float32)
    print(f"\nPer rank, fp32 (formula: 2 x {cfg.n_layer} layers x {cfg.n_kv_head} KV heads x "
          f"{cfg.head_dim} x 4 bytes = {full:,} bytes/token in one process)\n")
    row("degree", "KV bytes/token per rank", "formula / degree",
        f"blocks of {bs} in {args.kv_budget} per rank", "weights per rank (rank 0)")
    row(*["---"] * 5)
    for n in degrees:
        fit = blocks_for_budget(budget, bs, cfg.n_layer, cfg.n_kv_head // n, cfg.head_dim,
                                torch.float32)
        row(n, f"{bpt[n]:,}", f"{full // n:,}", f"{fit:,}", f"{weights[n] / 2**20:.1f} MiB")
    n_out = args.requests * args.new
    print(f"\nSpeed ({args.repeat} interleaved rounds, medians; the ranks share this machine's "
          f"{os.cpu_count()} cores)\n")
    row("degree", "requests: seconds", "output tok/s", "batch-1 decode tok/s")
    row(*["---"] * 4)
    for n in degrees:  # (degree 1: every round beside every degree)
        med = statistics.median(secs[n])
        row(n, f"{med:.2f}", f"{n_out / med:.1f}", f"{statistics.median(solo[n]):.1f}")


# ------------------------------------------------------------------------------------------
# invariant mode: what it costs, and whether each cache trick keeps every bit of the output

INVARIANT_PROMPTS = [
    "The history of the printing press begins", "Here are three tips for a good night's sleep:",
    "def fibonacci(n):", "The capital of France is", "Photosynthesis is the process by which",
    "Once upon a time, there was a little", "To make a cup of tea, first",
    "The three states of matter are"]


def bench_invariant(args):
    """Batch-1 decode/prefill and many-request throughput with invariant mode off and on, in
    interleaved rounds over one engine; then the ladder on the real model in bf16, counting
    the requests whose tokens are the same bits: cached vs uncached, each request alone vs
    among the others in a small pool, speculative vs plain greedy."""
    llm = LLM(args.model, dtype="bfloat16")
    g = torch.Generator().manual_seed(0)
    vocab = llm.cfg.vocab_size
    short = torch.randint(0, vocab, (8,), generator=g).tolist()
    long = torch.randint(0, vocab, (args.prefill,), generator=g).tolist()
    n = args.requests
    lens = [(torch.randint(args.in_min, args.in_max + 1, (1,), generator=g).item(),
             torch.randint(args.out_min, args.out_max + 1, (1,), generator=g).item())
            for _ in range(n)]
    many = [torch.randint(0, vocab, (i,), generator=g).tolist() for i, _ in lens]
    once = SamplingParams(max_new_tokens=1, ignore_eos=True)
    rates = {"decode": lambda: decode_rate(llm, short, args.new),  # after the first token
             "prefill": lambda: args.prefill / llm.generate([long], once)[0].ttft_s,
             "many": lambda: serve_rate(llm, many, [o for _, o in lens])}
    times = {(mode, what): [] for mode in ("off", "on") for what in rates}
    for _ in range(args.repeat):
        for mode in ("off", "on"):
            llm.model.set_invariant(mode == "on")
            for what, rate in rates.items():
                llm.cache.forget_cached()
                times[mode, what].append(rate())
    print(f"\n## invariant mode: cost, bf16, medians of {args.repeat} interleaved rounds "
          f"({machine()})\n")
    row("workload", "off tok/s", "on tok/s", "on / off")
    row(*["---"] * 4)
    for what, label in (("decode", f"batch-1 decode, {args.new} new"),
                        ("prefill", f"prefill, {args.prefill} tokens"),
                        ("many", f"{n} requests, prompts {args.in_min}-{args.in_max}, "
                                 f"outputs {args.out_min}-{args.out_max}")):
        off, on = (statistics.median(times[m, what]) for m in ("off", "on"))
        row(label, f"{off:.1f}", f"{on:.1f}", f"{on / off:.2f}x")
    print(f"\n## invariant mode: the ladder on this model, bf16, {args.agree_new} greedy tokens\n")
    row("comparison", "invariant off: same bits", "invariant on: same bits")
    row(*["---"] * 3)
    counts = {mode: invariance_counts(llm, args, mode == "on") for mode in ("off", "on")}
    for name in counts["on"]:
        if name != "preemptions":
            row(name, counts["off"][name], counts["on"][name])
    print(f"\nsequences preempted in the 48-block pool: {counts['off']['preemptions']} (off), "
          f"{counts['on']['preemptions']} (on)")
    llm.model.set_invariant(False)


def invariance_counts(llm, args, on) -> dict:
    """{comparison: "k/n requests identical"} for one mode."""
    llm.model.set_invariant(on)
    tok = llm.tokenizer
    greedy = SamplingParams(max_new_tokens=args.agree_new, ignore_eos=True)
    held_out = [tok.encode(t) for t in INVARIANT_PROMPTS[:5]]
    out = {}
    llm.cache.forget_cached()
    cached = llm.generate(held_out, greedy)
    uncached = llm.generate(held_out, greedy, use_cache=False)
    same = sum(a.token_ids == b.token_ids for a, b in zip(cached, uncached))
    out["5 prompts: cached == uncached"] = f"{same}/5"
    requests = [tok.encode(INVARIANT_PROMPTS[i % 8]) + tok.encode(f" ({i})", add_bos=False)
                for i in range(24)]
    short = SamplingParams(max_new_tokens=min(48, args.agree_new), ignore_eos=True)
    small = LLM(llm.model_path, dtype="bfloat16", n_blocks=48, invariant=on)
    small.model = llm.model  # the same weights
    together = small.generate(requests, short)
    alone = []
    for r in requests:
        llm.cache.forget_cached()
        alone.append(llm.generate([r], short)[0])
    same = sum(a.token_ids == b.token_ids for a, b in zip(together, alone))
    out["24 requests in a 48-block pool == each alone"] = f"{same}/24"
    out["preemptions"] = small.n_preemptions
    spec = llm.generate(held_out[:3], greedy, speculative="ngram", spec_k=4)
    same = sum(a.token_ids == b.token_ids for a, b in zip(spec, cached[:3]))
    out["3 prompts: speculative (prompt lookup) == plain greedy"] = f"{same}/3"
    return out


# ------------------------------------------------------------------------------------------
# load: a cold process until its first token

COMPILED_LOADER = "this engine, compiled decode (2 tokens, warm compile cache)"
LOAD_CHILD = {  # run by `python -c` in a fresh process; prints seconds since the parent's spawn
    "this engine": """
import time, sys; T0 = float(sys.argv[2])
import torch; from generate import LLM, SamplingParams
t_import = time.time() - T0
llm = LLM(sys.argv[1], dtype="bfloat16", n_blocks=64)
t_loaded = time.time() - T0
llm.generate(["Once upon a time"], SamplingParams(max_new_tokens=1))
print(t_import, t_loaded, time.time() - T0)
""",
    # the compiled decode step: its "first token" is the second, the first the compiled step
    # makes, so that the time includes tracing it and loading its graph from inductor's cache
    # (warmed by an untimed run first)
    COMPILED_LOADER: """
import time, sys; T0 = float(sys.argv[2])
import torch; from generate import LLM, SamplingParams
t_import = time.time() - T0
llm = LLM(sys.argv[1], dtype="bfloat16", n_blocks=64, compile=True)
t_loaded = time.time() - T0
llm.generate(["Once upon a time"], SamplingParams(max_new_tokens=2, ignore_eos=True))
print(t_import, t_loaded, time.time() - T0)
""",
    "transformers": """
import time, sys, os; T0 = float(sys.argv[2])
import torch; from transformers import AutoModelForCausalLM, AutoTokenizer
t_import = time.time() - T0
p = sys.argv[1]; kw = dict(gguf_file=os.path.basename(p)) if p.endswith(".gguf") else {}
d = os.path.dirname(p) if kw else p
tok = AutoTokenizer.from_pretrained(d, **kw)
m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, **kw).eval()
t_loaded = time.time() - T0
m.generate(**tok("Once upon a time", return_tensors="pt"), max_new_tokens=1, do_sample=False)
print(t_import, t_loaded, time.time() - T0)
""",
    # the loader this project used before its own GGUF reader: the gguf package's GGUFReader
    # and numpy dequantization of every tensor (the weights only: no model, no token)
    "gguf package (GGUFReader + numpy dequantize)": """
import time, sys; T0 = float(sys.argv[2])
import torch, gguf, numpy as np
t_import = time.time() - T0
r = gguf.GGUFReader(sys.argv[1])
w = [torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), np.float32))
     for t in r.tensors]
t = time.time() - T0
print(t_import, t, float("nan"))
""",
}


def time_cold_process(who, path) -> list[float]:
    here = os.path.dirname(os.path.abspath(__file__))
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", LOAD_CHILD[who], path, repr(t0)], cwd=here,
                         capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise ValueError(f"load: {who} failed: {out.stderr.strip().splitlines()[-1:]}")
    return [float(x) for x in out.stdout.split()[-3:]]


def hf_copy_of(path, dest) -> str:
    """A safetensors directory holding the same model as a GGUF file (written by transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging
    logging.disable_progress_bar()
    kw = dict(gguf_file=os.path.basename(path))
    src = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), **kw)
    config = src.config.to_dict()
    config.pop("quantization_config", None)  # dequantized already: plain weights from here
    copy = AutoModelForCausalLM.from_config(type(src.config).from_dict(config))
    copy.load_state_dict(src.state_dict())
    copy.save_pretrained(dest)
    AutoTokenizer.from_pretrained(os.path.dirname(path), **kw).save_pretrained(dest)
    return dest


def bench_load(args):
    """Seconds from a cold `python` until the model is loaded and until its first token, for
    the GGUF file and a safetensors directory of the same model, peers interleaved."""
    import tempfile
    path = args.model or default_model()
    print(f"\n## load: cold process to first token, bf16 ({machine()})")
    print(f"median of {args.repeat} interleaved runs; times include starting Python")
    with tempfile.TemporaryDirectory() as tmp:
        sources = [(path, "GGUF" if path.endswith(".gguf") else "safetensors dir")]
        if path.endswith(".gguf"):
            sources.append((hf_copy_of(path, os.path.join(tmp, "hf")), "safetensors dir"))
        runs = [(p, kind, who) for p, kind in sources for who in LOAD_CHILD
                if who != "gguf package (GGUFReader + numpy dequantize)" or kind == "GGUF"]
        times = {r: [] for r in runs}
        for p, _, who in runs:
            if who == COMPILED_LOADER:  # warm inductor's cache (a cold compile: minutes)
                time_cold_process(who, p)
        for _ in range(args.repeat):
            for r in runs:
                times[r].append(time_cold_process(r[2], r[0]))
    row("format", "loader", "imports s", "loaded s", "first token s", "loaded / engine")
    row(*["---"] * 6)
    for p, kind, who in runs:
        med = [statistics.median(t[i] for t in times[(p, kind, who)]) for i in range(3)]
        ours = statistics.median(t[1] for t in times[(p, kind, "this engine")])
        row(kind, who, f"{med[0]:.2f}", f"{med[1]:.2f}",
            "-" if med[2] != med[2] else f"{med[2]:.2f}", f"{med[1] / ours:.2f}x")


PROMPT_CACHE_CHILD = """
import json, sys, time; T0 = float(sys.argv[3])
from generate import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype="bfloat16", prompt_cache=sys.argv[4])
with open(sys.argv[2]) as f:
    ids = json.load(f)
o = llm.generate([ids], SamplingParams(max_new_tokens=1))[0]
print(o.ttft_s, o.n_disk_tokens, o.n_prompt_tokens, time.time() - T0, llm.cache.bytes_per_token,
      llm.cache.block_size)
"""


def bench_prompt_cache(args):
    """A long system prompt plus a short question, each run in a fresh process: TTFT with the
    prompt cache's disk tier cold (an empty directory) and warm (filled by an earlier run),
    interleaved; and the bytes each cached token takes on disk against the pool's formula."""
    import json
    import tempfile
    path = args.model or default_model()
    here = os.path.dirname(os.path.abspath(__file__))
    tok = LLM(path, n_blocks=1).tokenizer
    with open(os.path.join(here, "declaration.txt"), encoding="utf-8") as f:
        text = tok.encode(f.read())
    system = (text * (1 + args.system_tokens // len(text)))[:args.system_tokens]  # repeated
    ids = system + tok.encode(" Question: who wrote this, and when?", add_bos=False)
    print(f"\n## prompt cache: a {len(system)}-token system prompt plus a question, TTFT in a "
          f"fresh process, bf16 ({machine()})")
    print(f"median of {args.repeat} interleaved runs; TTFT from generate() to the first token")

    def child(prompt_file, cache_dir):
        out = subprocess.run([sys.executable, "-c", PROMPT_CACHE_CHILD, path, prompt_file,
                              repr(time.time()), cache_dir], cwd=here, capture_output=True,
                             text=True, timeout=600)
        if out.returncode:
            raise ValueError(f"prompt-cache: a run failed: {out.stderr.strip().splitlines()[-1:]}")
        return [float(x) for x in out.stdout.split()[-6:]]
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = os.path.join(tmp, "prompt.json")
        with open(prompt_file, "w") as f:
            json.dump(ids, f)
        warm_dir = os.path.join(tmp, "warm")
        child(prompt_file, warm_dir)  # fills the warm directory
        runs = {"cold (empty directory)": [], "warm (filled by an earlier process)": []}
        for i in range(args.repeat):
            runs["cold (empty directory)"].append(
                child(prompt_file, os.path.join(tmp, f"cold{i}")))
            runs["warm (filled by an earlier process)"].append(child(prompt_file, warm_dir))
        files = [f for f in os.listdir(warm_dir) if f.endswith(".safetensors")]
        on_disk = sum(os.path.getsize(os.path.join(warm_dir, f)) for f in files)
    row("disk tier", "TTFT ms", "prompt tokens read from disk", "process start to first token s")
    row(*["---"] * 4)
    med = {name: [statistics.median(r[i] for r in rs) for i in range(4)]
           for name, rs in runs.items()}
    for name, (ttft, n_disk, n_prompt, total) in med.items():
        row(name, f"{ttft * 1e3:.0f}", f"{n_disk:.0f} of {n_prompt:.0f}", f"{total:.2f}")
    cold, warm = med.values()
    row("warm / cold", f"{warm[0] / cold[0]:.0%}", "", f"{warm[3] / cold[3]:.0%}")
    per_token, block_size = runs["cold (empty directory)"][0][4:6]
    print(f"\nOn disk: {len(files)} block files, {on_disk:,} bytes, "
          f"{on_disk / (len(files) * block_size):,.0f} bytes per token; the pool's formula "
          f"2 * n_layer * n_kv_head * head_dim * bytes gives {per_token:,.0f} (the rest: each "
          f"file's header, token ids and metadata)")


def bench_accuracy(args):
    """An fp32 model with an fp32 cache against the same model with an int8 and an fp8
    cache: perplexity of a fixed public-domain text (declaration.txt, the Declaration of
    Independence of 1776), the largest logit difference over it, and greedy agreement over
    --agree-new tokens on a few prompts."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "declaration.txt")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    prompts = ["Once upon a time, there was a little", "The three most important things "
               "about a KV cache are", "def fibonacci(n):", "The capital of France is"]
    p = SamplingParams(max_new_tokens=args.agree_new, ignore_eos=True)
    results = {}
    for kv in ("auto", "int8", "fp8"):
        llm = LLM(args.model, dtype="float32", kv_dtype=kv)
        ids = llm.tokenizer.encode(text)[:args.ppl_tokens or None]
        logits = llm.score(ids)
        nll = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
        greedy = [o.token_ids for o in llm.generate(prompts, p)]
        results[kv] = logits, float(torch.exp(nll)), greedy, llm.cache.bytes_per_token
    exact_logits, exact_ppl, exact_greedy, exact_bytes = results["auto"]
    name = os.path.basename((args.model or default_model()).rstrip("/")).removesuffix(".gguf")
    print(f"\nQuantized KV cache, {name}, fp32 weights and activations: perplexity over "
          f"{len(exact_logits)} tokens of declaration.txt, greedy agreement over "
          f"{args.agree_new} new tokens x {len(prompts)} prompts. Machine: {machine()}\n")
    row("kv cache", "bytes/token", "perplexity", "vs fp32", "max logit error",
        "mean logit error", "greedy tokens before the first difference", "prompts identical")
    row(*["---"] * 8)
    for kv, (logits, ppl, greedy, n_bytes) in results.items():
        err = (logits - exact_logits).abs()
        agree = sum(next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), len(e))
                    for g, e in zip(greedy, exact_greedy))
        row("fp32" if kv == "auto" else kv, f"{n_bytes:,}", f"{ppl:.3f}",
            f"{100 * (ppl / exact_ppl - 1):+.2f}%", f"{err.max():.3f}", f"{err.mean():.4f}",
            f"{agree}/{sum(map(len, exact_greedy))}",
            f"{sum(g == e for g, e in zip(greedy, exact_greedy))}/{len(prompts)}")


# ------------------------------------------------------------------------------------------
# Triton kernels on a GPU: decode GB/s against the copy bandwidth, prefill TFLOP/s against SDPA

KERNEL_SHAPES = {"llama3-8b": (32, 8, 128), "smollm2": (9, 3, 64)}  # (H, K, D)
LINEAR_SHAPES = {"smollm2-qkv": (576, 960), "smollm2-down": (1536, 576),  # (in, out)
                 "llama3-8b-qkv": (4096, 6144), "llama3-8b-gate-up": (4096, 28672),
                 "llama3-8b-down": (14336, 4096)}


def time_ms(fn, repeat=20) -> float:
    """Median milliseconds of fn(): triton's do_bench on a GPU (warm-up, L2 flushed between
    calls, CUDA events); wall clock on a CPU (the interpreter's dry run of this section)."""
    if torch.cuda.is_available():
        import triton.testing
        return triton.testing.do_bench(fn, warmup=5, rep=repeat * 5, return_mode="median")
    fn()
    times = []
    for _ in range(max(1, repeat // 10)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def copy_bandwidth_gbs(device, n_bytes=1 << 30) -> float:
    """Device-to-device copy, counting the bytes read and the bytes written."""
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return 2 * n_bytes / time_ms(lambda: dst.copy_(src)) / 1e6


def paged_pool(n_seq, n_ctx, n_kv, d, block_size, dtype, device, g):
    """A (K, N, P, D) pool holding n_seq sequences of n_ctx tokens in shuffled blocks, and the
    decode metadata of one new token each (already stored: the last position)."""
    from model import kernels
    n_used = -(-n_ctx // block_size)
    n_blocks = n_seq * n_used
    k_cache = torch.randn(n_kv, n_blocks, block_size, d, generator=g).to(device, dtype)
    v_cache = torch.randn(n_kv, n_blocks, block_size, d, generator=g).to(device, dtype)
    tables = torch.randperm(n_blocks, generator=g).view(n_seq, n_used).to(device)
    last = tables[:, (n_ctx - 1) // block_size] * block_size + (n_ctx - 1) % block_size
    ctx = (n_ctx,) * n_seq
    meta = kernels.AttnMeta.paged(last.tolist(), tables, ctx, range(n_seq + 1),
                                  k_cache.shape[:3], device)
    return k_cache, v_cache, meta


# ------------------------------------------------------------------------------------------
# ahead of time: every kernel compiled for GPUs this machine need not have

# compute capability -> (examples, shared memory a block may use, multiprocessors)
AOT_TARGETS = {80: ("A100", 166912, 108), 86: ("RTX 30xx", 101376, 84),
               89: ("L4, RTX 40xx", 101376, 58), 90: ("H100/H200", 232448, 132)}
# (H, K, D) of the models that matter, a 7:1 group, and a head dim that is not a power of two
AOT_SHAPES = {"gpt2-124m": (12, 12, 64), "smollm2-135m": (9, 3, 64),
              "llama3-8b": (32, 8, 128), "llama3-70b": (64, 8, 128), "7:1 d128": (56, 8, 128),
              "d80": (16, 4, 80)}
# the sweep the test suite runs (under a minute on two cores), and the full one
AOT_QUICK = {"targets": [80, 90], "shapes": ["smollm2-135m", "llama3-8b"], "dtypes": ["bf16"],
             "kv": ["auto", "int8", "fp8"], "block_sizes": [16]}
AOT_FULL = {"targets": sorted(AOT_TARGETS), "shapes": list(AOT_SHAPES),
            "dtypes": ["fp32", "fp16", "bf16"], "kv": ["auto", "int8", "fp8"],
            "block_sizes": [16, 32]}
FP8_FROM = 89  # compute capability of the first GPUs with fp8 (kv_storage_dtype refuses older)
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.int8: "i8", torch.int32: "i32", torch.int64: "i64",
                torch.float8_e4m3fn: "fp8e4nv"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@contextlib.contextmanager
def kernels_captured(n_sm=132):
    """The engine's Triton kernels replaced by recorders, for a GPU of n_sm multiprocessors:
    their launchers' host code runs (on CPU or meta tensors) and no kernel does. Yields the
    list that collects each launch as (kernel, args, kwargs)."""
    from model import kernels
    calls = []

    class Capture:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.kernel, args, kwargs))
    names = ["_store_kv_kernel", "_prefill_attention_kernel", "_decode_attention_kernel",
             "_merge_splits_kernel", "_invariant_attention_kernel", "_invariant_linear_kernel",
             "n_multiprocessors"]
    saved = {name: getattr(kernels, name) for name in names}
    try:
        for name in names[:-1]:
            setattr(kernels, name, Capture(saved[name]))
        kernels.n_multiprocessors = lambda device: n_sm
        yield calls
    finally:
        for name, value in saved.items():
            setattr(kernels, name, value)


def captured_launches(n_head, n_kv, d, dtype, kv_dtype, block_size, n_sm):
    """The kernel launches the engine's launchers make for one layer of this shape, captured
    instead of run (on CPU tensors: only the host code runs): a two-sequence prefill (store,
    attention), a decode step of four sequences at a 4k context, the invariant attention of the
    prefill, and the invariant weight product (QKV's shape, with a bias).
    [(kernel, args, kwargs)]"""
    from model import kernels
    with kernels_captured(n_sm) as calls:
        ctx = 4096
        pool = KVCache(1, n_kv, d, n_blocks=4 * ctx // block_size, block_size=block_size,
                       dtype=dtype if kv_dtype == "auto" else QUANTIZED_DTYPES[kv_dtype])
        k_cache, v_cache, scales = pool.layers[0]
        tables = torch.arange(pool.n_blocks).view(4, -1)
        k = torch.zeros(24, n_kv, d, dtype=dtype)
        prefill = kernels.AttnMeta.paged(list(range(24)), tables[:2], [16, 8], [0, 16, 24],
                                         pool.pool_shape)
        kernels.store_kv_triton(k, k, k_cache, v_cache, prefill, scales)
        q = torch.zeros(24, n_head, d, dtype=dtype)
        kernels.prefill_attention_triton(q, k_cache, v_cache, prefill, d ** -0.5, scales)
        decode = kernels.AttnMeta.paged([ctx - 1] * 4, tables, [ctx] * 4, range(5),
                                        pool.pool_shape)
        kernels.decode_attention_triton(q[:4], k_cache, v_cache, decode, d ** -0.5, scales)
        kernels.invariant_attention_triton(q, k_cache, v_cache, prefill, d ** -0.5, scales)
        w = torch.zeros((n_head + 2 * n_kv) * d, n_head * d, dtype=dtype)
        kernels.invariant_linear_triton(q.view(24, -1), w, w.new_zeros(w.shape[0]))
    return calls


def launch_signature(kernel, args, kwargs) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, options, aligned) of one captured launch: its tensors become
    typed pointers, its ints i32 (i64 past 2^31), its keywords constexprs or compile options;
    and the specialization Triton's JIT gives a launch on a GPU: an int equal to 1 becomes the
    constant 1, and an int divisible by 16 or a pointer aligned to 16 bytes is declared so
    (`aligned`), which lets the compiler vectorize and pipeline the loads that use it (without
    it the binary is not the one the GPU runs: loads one element at a time, no pipelining)."""
    signature, constexprs, aligned = {}, {}, {}
    for name, a in zip(kernel.arg_names, args):
        if isinstance(a, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[a.dtype]
            aligned[name] = a.data_ptr() % 16 == 0
        elif isinstance(a, bool):
            signature[name] = "i1"
        elif isinstance(a, int) and a == 1:
            signature[name], constexprs[name] = "constexpr", 1
        elif isinstance(a, int):
            signature[name] = "i64" if abs(a) >= 1 << 31 else "i32"
            aligned[name] = a % 16 == 0
        elif isinstance(a, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: argument {name} is a {type(a).__name__}")
    options = {k: v for k, v in kwargs.items() if k in LAUNCH_OPTIONS}
    for name, value in kwargs.items():
        if name not in LAUNCH_OPTIONS:
            signature[name], constexprs[name] = "constexpr", value
    return signature, constexprs, options, {k: v for k, v in aligned.items() if v}


def compile_for(kernel, signature, constexprs, options, aligned, cc):
    """triton.compile of one launch for compute capability cc: no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                          target=GPUTarget("cuda", cc, 32), options=options)


def resource_usage(compiled) -> dict:
    """Registers and spilled bytes per thread of a compiled kernel, from the cubin by the
    cuobjdump inside the triton wheel (what ptxas allocated)."""
    import re
    import tempfile
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text))
    return {"registers": int(fields["REG"]),
            "spills": int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0))}


def dot_instruction(compiled) -> str:
    """The matrix instruction the kernel's tl.dot became: wgmma (Hopper), mma (Ampere on), or
    fma (scalar: fp32 inputs kept in full precision by dot_precision, or a fallback)."""
    ptx = compiled.asm["ptx"]
    return "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "fma"


DOT_KERNELS = ("_prefill_attention_kernel", "_decode_attention_kernel",
               "_invariant_attention_kernel", "_invariant_linear_kernel")


def compile_sweep(plan, log=print) -> list[dict]:
    """Every distinct launch of the plan's configurations, compiled for each of its targets:
    one dict per (launch, target), with what the compiler reports."""
    results, seen = [], set()
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    for cc, shape, dname, kv, block_size in itertools.product(
            plan["targets"], plan["shapes"], plan["dtypes"], plan["kv"], plan["block_sizes"]):
        if kv == "fp8" and cc < FP8_FROM:
            continue  # refused on such a GPU (kv_storage_dtype)
        _, shared_limit, n_sm = AOT_TARGETS[cc]
        n_head, n_kv, d = AOT_SHAPES[shape]
        for kernel, args, kwargs in captured_launches(n_head, n_kv, d, dtypes[dname], kv,
                                                      block_size, n_sm):
            launch = launch_signature(kernel, args, kwargs)
            key = (cc, kernel.__name__, *(tuple(part.items()) for part in launch))
            if key in seen:  # the same binary as a row already made
                continue
            seen.add(key)
            r = {"target": f"sm_{cc}", "kernel": kernel.__name__.strip("_"), "shape": shape,
                 "dtype": dname, "kv": kv, "block_size": block_size,
                 "shared_limit": shared_limit}
            try:
                compiled = compile_for(kernel, *launch, cc)
            except Exception as e:  # noqa: BLE001 (reported, not hidden)
                r.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
            else:
                r.update(ok=True, shared=compiled.metadata.shared,
                         warps=compiled.metadata.num_warps,
                         instruction=dot_instruction(compiled)
                         if kernel.__name__ in DOT_KERNELS else "-", **resource_usage(compiled))
            results.append(r)
            log(r)
    return results


def expected_instruction(r) -> str:
    """What a 16-bit tl.dot must become: wgmma on Hopper for the tiles of 64 rows and more
    (prefill attention, the invariant weight product), mma.sync elsewhere (decode and invariant
    attention tiles have 16 rows, below wgmma's 64)."""
    big = r["kernel"].startswith("prefill") or r["kernel"] == "invariant_linear_kernel"
    return "wgmma" if r["target"] == "sm_90" and big else "mma"


def compile_problems(results) -> list[str]:
    """What the sweep must not show: a failed compile, shared memory over the target's limit,
    a 16-bit tl.dot that is not the expected matrix instruction, or a kernel with a tl.dot that
    spills registers (local memory or a stack frame: attention_tiles and LINEAR_TILES pick
    tiles that fit)."""
    bad = []
    for r in results:
        name = f"{r['kernel']} {r['target']} {r['shape']} {r['dtype']} kv={r['kv']} " \
               f"P={r['block_size']}"
        if not r["ok"]:
            bad.append(f"{name}: {r['error']}")
            continue
        if r["shared"] > r["shared_limit"]:
            bad.append(f"{name}: {r['shared']} bytes of shared memory, limit {r['shared_limit']}")
        if r["instruction"] != "-" and r["dtype"] != "fp32" and \
                r["instruction"] != expected_instruction(r):
            bad.append(f"{name}: tl.dot became {r['instruction']}, not {expected_instruction(r)}")
        if r["instruction"] != "-" and r["spills"]:
            bad.append(f"{name}: {r['spills']} bytes spilled")
    return bad


def bench_compile(args):
    """bench.py kernels --compile-only: the compile table (no GPU needed)."""
    from model import kernels
    if kernels.triton is None:
        raise ValueError("bench.py kernels --compile-only needs the triton package (Linux only)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError("the ahead-of-time compile needs real Triton: unset TRITON_INTERPRET")
    import json
    import triton
    plan = dict(AOT_QUICK if args.quick else AOT_FULL)
    plan["targets"] = args.targets or plan["targets"]
    print(f"\nTriton kernels compiled ahead of time ({'quick' if args.quick else 'full'} sweep): "
          f"triton {triton.__version__}, machine {machine()}\n")
    row("target", "kernel", "shape", "dtype", "kv", "P", "ok", "shared B", "warps", "registers",
        "spills B", "instruction")
    row(*["---"] * 12)
    t0 = time.perf_counter()

    def show(r):
        row(r["target"], r["kernel"], r["shape"], r["dtype"], r["kv"], r["block_size"],
            "ok" if r["ok"] else "FAIL", r.get("shared", "-"), r.get("warps", "-"),
            r.get("registers", "-"), r.get("spills", "-"), r.get("instruction", r.get("error")))
    results = compile_sweep(plan, log=show)
    problems = compile_problems(results)
    print(f"\n{len(results)} compiles in {time.perf_counter() - t0:.0f} s; {len(problems)} "
          f"problems (failed, over shared memory, no matrix instruction, spilled)")
    for p in problems:
        print("  " + p)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"plan": plan, "results": results, "problems": problems}, f, indent=1)
    if problems:
        raise ValueError(f"{len(problems)} compile problems (listed above)")


def bench_kernels(args):
    """Peers in the same run: torch SDPA on contiguous K/V (the flash backend for prefill),
    with and without the gather that turns the paged pool into contiguous tensors; then the
    invariant weight product against F.linear."""
    if args.compile_only:
        return bench_compile(args)
    from model import kernels
    if kernels.triton is None:
        raise ValueError("bench.py kernels needs the triton package (Linux only)")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("bench.py kernels needs a CUDA GPU (TRITON_INTERPRET=1 gives a slow "
                         "dry run of the code on a CPU, with tiny --kernel-* sizes)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    copy_gbs = copy_bandwidth_gbs(device, args.copy_mib << 20)
    print(f"\nTriton kernels, {str(dtype).removeprefix('torch.')}, block size 16. Machine: "
          f"{machine()}, triton {__import__('triton').__version__}\n"
          f"Device-to-device copy: {copy_gbs:.0f} GB/s\n")
    row("decode", "B x S", "Triton us", "GB/s", "% of copy", "SDPA us (contiguous)",
        "SDPA us (with gather)", "Triton / SDPA+gather")
    row(*["---"] * 8)
    for name, (n_head, n_kv, d) in KERNEL_SHAPES.items():
        for shape in args.kernel_batches:
            n_seq, n_ctx = map(int, shape.split("x"))
            k_cache, v_cache, meta = paged_pool(n_seq, n_ctx, n_kv, d, 16, dtype, device, g)
            q = torch.randn(n_seq, n_head, d, generator=g).to(device, dtype)
            scale = d ** -0.5
            ours = time_ms(lambda: kernels.decode_attention_triton(q, k_cache, v_cache, meta,
                                                                   scale))
            # K/V of every context, plus Q and the output
            n_bytes = (2 * n_seq * n_ctx * n_kv * d + 2 * n_seq * n_head * d) * dtype.itemsize

            def gather():
                rows = meta.block_tables.reshape(-1)
                return [c.index_select(1, rows).view(n_kv, n_seq, -1, d)[:, :, :n_ctx]
                        .transpose(0, 1) for c in (k_cache, v_cache)]  # (B, K, S, D)
            k, v = (t.contiguous() for t in gather())
            qh = q.unsqueeze(2)                                           # (B, H, 1, D)
            sdpa = lambda k, v: F.scaled_dot_product_attention(qh, k, v, scale=scale,  # noqa
                                                               enable_gqa=True)
            peer = time_ms(lambda: sdpa(k, v))
            peer_gather = time_ms(lambda: sdpa(*gather()))
            gbs = n_bytes / ours / 1e6
            row(name, shape, f"{1e3 * ours:.1f}", f"{gbs:.0f}", f"{100 * gbs / copy_gbs:.0f}%",
                f"{1e3 * peer:.1f}", f"{1e3 * peer_gather:.1f}", f"{peer_gather / ours:.2f}x")
            del k_cache, v_cache, k, v
    print()
    row("prefill", "tokens", "head dim", "Triton TFLOP/s", "SDPA flash TFLOP/s",
        "Triton / SDPA")
    row(*["---"] * 6)
    n_head, n_kv = 32, 8
    for d in (64, 128):
        for n_tok in args.kernel_prefill:
            k_cache, v_cache, meta = paged_pool(1, n_tok, n_kv, d, 16, dtype, device, g)
            meta = dataclasses.replace(meta, query_start=torch.tensor([0, n_tok], device=device),
                                       query_start_host=(0, n_tok))
            q = torch.randn(n_tok, n_head, d, generator=g).to(device, dtype)
            scale = d ** -0.5
            ours = time_ms(lambda: kernels.prefill_attention_triton(q, k_cache, v_cache, meta,
                                                                    scale))
            k, v = (kernels.gather_context(k_cache, v_cache, meta.block_tables[0], n_tok))
            qh = q.transpose(0, 1).unsqueeze(0)                            # (1, H, T, D)
            kh, vh = (t.repeat_interleave(n_head // n_kv, 0).unsqueeze(0) for t in (k, v))
            peer = time_ms(lambda: flash_sdpa(qh, kh, vh, scale))
            flops = 2 * 2 * n_head * d * n_tok * (n_tok + 1) / 2  # QK^T and PV, causal half
            row("causal, batch 1", n_tok, d, f"{flops / ours / 1e9:.1f}",
                f"{flops / peer / 1e9:.1f}", f"{peer / ours:.2f}x")
    bench_invariant_linear(args, device, dtype, g)


def bench_invariant_linear(args, device, dtype, g):
    """The invariant mode's weight product (kernels.invariant_linear_triton) against F.linear
    (cuBLAS on a GPU), per weight shape and row count: time, TFLOP/s, weight GB/s, and whether
    each product's first rows are the same bits as those rows multiplied alone (the property
    the invariant mode needs; cuBLAS picks its kernel from the row count)."""
    from model import kernels
    print()
    row("weight product", "in x out", "rows", "Triton us", "TFLOP/s", "weight GB/s",
        "F.linear us", "Triton / F.linear", "rows' bits: Triton", "rows' bits: F.linear")
    row(*["---"] * 10)
    for name in args.kernel_linear_shapes:
        n_in, n_out = LINEAR_SHAPES[name]
        w = (torch.randn(n_out, n_in, generator=g) / n_in ** 0.5).to(device, dtype)
        x = torch.randn(max(args.kernel_linear), n_in, generator=g).to(device, dtype)
        alone = {f: torch.cat([f(x[i:i + 1], w) for i in range(8)]) for f in
                 (kernels.invariant_linear_triton, F.linear)}
        for m in args.kernel_linear:
            xm = x[:m]
            ours = time_ms(lambda: kernels.invariant_linear_triton(xm, w))
            peer = time_ms(lambda: F.linear(xm, w))
            same = ["-" if m == 1 else "same" if torch.equal(f(xm, w)[:8], alone[f][:min(m, 8)])
                    else "differ" for f in alone]
            row(name, f"{n_in} x {n_out}", m, f"{1e3 * ours:.1f}",
                f"{2 * m * n_in * n_out / ours / 1e9:.2f}",
                f"{n_in * n_out * dtype.itemsize / ours / 1e6:.0f}", f"{1e3 * peer:.1f}",
                f"{peer / ours:.2f}x", *same)
        del w, x


def flash_sdpa(q, k, v, scale):
    """torch SDPA with the flash backend (the math backend on a CPU dry run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = SDPBackend.FLASH_ATTENTION if q.is_cuda else SDPBackend.MATH
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


# ------------------------------------------------------------------------------------------
# speculative decoding: speedup and acceptance, and the cost of verification

SPEC_PROMPTS = {  # what prompt lookup can copy from: everything, some names, nothing much
    "repetitive": "Repeat the list five times.\napple, banana, cherry, date, elderberry, fig, "
                  "grape\napple, banana, cherry, date, elderberry, fig, grape\n",
    "code-like": "```python\ndef add(a, b):\n    \"\"\"Return a + b.\"\"\"\n    return a + b\n\n\n"
                 "def sub(a, b):\n    \"\"\"Return a - b.\"\"\"\n    return a - b\n\n\ndef mul(a, b):\n",
    "free text": "Once upon a time, there was a little",
}


def bench_speculative(args):
    """Prompt lookup (n-gram) speculation against plain decoding, greedy, ignore_eos, one
    sequence: decode tokens/s = (N - 1) / decode time (prefill excluded), medians over
    interleaved rounds (plain, then each k, per prompt, per round). 'same tokens' says whether
    every speculative run gave plain decoding's tokens (in bf16, the (k+1)-token pass can round
    differently from the 1-token pass and flip a near tie). Then the reason it can pay: the
    time of one forward pass of k+1 new tokens over a cached context, against 1 token."""
    llm = LLM(args.model, dtype=args.cache_dtype)
    p = SamplingParams(max_new_tokens=args.new, ignore_eos=True)
    ids = {name: llm.tokenizer.encode(text) for name, text in SPEC_PROMPTS.items()}
    configs = [(name, k) for name in ids for k in [None] + args.spec_k]
    rates = {c: [] for c in configs}
    accept, per_fwd, tokens, same = {}, {}, {}, {}
    for r in range(args.repeat + 1):  # round 0 is a warm-up
        for name, k in configs:
            llm.cache.forget_cached()
            spec = Speculator("ngram", k) if k else None
            [out] = llm.generate([ids[name]], p, speculator=spec)
            if k is None:
                tokens[name] = out.token_ids
            else:
                accept[name, k] = spec.stats.acceptance_rate
                per_fwd[name, k] = spec.stats.tokens_per_forward
                same[name, k] = same.get((name, k), True) and out.token_ids == tokens[name]
            if r:
                rates[name, k].append((len(out.token_ids) - 1) / out.decode_s)
    med = {c: statistics.median(v) for c, v in rates.items()}
    print(f"\nSpeculative decoding (prompt lookup, n <= 3) vs plain, batch 1, greedy, "
          f"{args.new} new tokens, {args.cache_dtype}, {args.repeat} interleaved rounds. "
          f"Machine: {machine()}\n")
    row("prompt", "k", "plain tok/s", "speculative tok/s", "speedup", "acceptance",
        "tokens / target forward", "same tokens")
    row(*["---"] * 8)
    for name, k in configs:
        if k is not None:
            row(name, k, f"{med[name, None]:.1f}", f"{med[name, k]:.1f}",
                f"{med[name, k] / med[name, None]:.2f}x", f"{accept[name, k]:.0%}",
                f"{per_fwd[name, k]:.2f}", "yes" if same[name, k] else "no")
    bench_verify_cost(args, llm)


def bench_verify_cost(args, llm):
    """Median time of one forward pass computing n new tokens after a cached context (all
    logits, as verification needs), n = 1 and k + 1: interleaved, the context truncated back
    after each pass."""
    g = torch.Generator().manual_seed(5)
    n_ctx, ks = args.spec_context, args.spec_k
    ids = torch.randint(0, llm.cfg.vocab_size, (n_ctx + max(ks) + 1,), generator=g).tolist()
    [seq] = llm.make_sequences([ids], SamplingParams(max_new_tokens=1))
    sched = Scheduler(llm.cache, n_ctx)
    llm.cache.forget_cached()
    llm.run([sched.reserve(seq, n_ctx)])  # the cached context
    times = {n: [] for n in [1] + [k + 1 for k in ks]}
    for _ in range(args.repeat * 4):
        for n in times:
            batch = [sched.reserve(seq, n)]
            t = time.perf_counter()
            llm.run(batch, all_logits=True)
            times[n].append(time.perf_counter() - t)
            sched.rollback(seq, n)
    llm.cache.free(seq.id)
    med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    print(f"\nCost of verification: one forward pass of n new tokens after {n_ctx} cached, "
          f"{args.cache_dtype}, medians of {args.repeat * 4} interleaved passes. "
          f"Machine: {machine()}\n")
    row("k", "1-token pass ms", "(k+1)-token pass ms", "ratio")
    row(*["---"] * 4)
    for k in ks:
        row(k, f"{med[1]:.1f}", f"{med[k + 1]:.1f}", f"{med[k + 1] / med[1]:.2f}x")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("what", choices=["engine", "cache", "overhead", "prefix", "throughput",
                                     "capacity", "speculative", "kernels", "memory",
                                     "accuracy", "load", "invariant", "prompt-cache",
                                     "tp", "gpu", "all"])
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: embedded)")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    ap.add_argument("--new", type=int, default=64, help="generated tokens for decode rates")
    ap.add_argument("--prefill", type=int, default=256, help="prompt tokens for prefill rates")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds (median)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 128, 256, 512, 1024])
    ap.add_argument("--cache-dtype", default="bfloat16")
    ap.add_argument("--plot", default="cache_vs_nocache.png", help="PNG path ('' for none)")
    ap.add_argument("--prefix", type=int, default=1000, help="shared prefix tokens (prefix, "
                    "capacity)")
    ap.add_argument("--requests", type=int, default=64, help="requests (throughput)")
    ap.add_argument("--in-min", type=int, default=16)
    ap.add_argument("--in-max", type=int, default=256)
    ap.add_argument("--out-min", type=int, default=16)
    ap.add_argument("--out-max", type=int, default=128)
    ap.add_argument("--budget-mib", type=int, default=64, help="KV budget (capacity)")
    ap.add_argument("--spec-k", type=int, nargs="+", default=[2, 4, 8],
                    help="draft lengths (speculative)")
    ap.add_argument("--spec-context", type=int, default=256,
                    help="cached tokens before a verification pass (speculative)")
    ap.add_argument("--kernel-batches", nargs="+", default=["1x16384", "16x4096", "64x4096"],
                    help="decode batch x context (kernels)")
    ap.add_argument("--kernel-prefill", type=int, nargs="+", default=[1024, 4096, 16384],
                    help="prefill tokens (kernels)")
    ap.add_argument("--kernel-linear", type=int, nargs="+", default=[1, 16, 256, 4096],
                    help="rows of the invariant weight product (kernels)")
    ap.add_argument("--kernel-linear-shapes", nargs="+", default=list(LINEAR_SHAPES),
                    choices=list(LINEAR_SHAPES), help="its weight shapes (kernels)")
    ap.add_argument("--copy-mib", type=int, default=1024, help="copy-bandwidth buffer (kernels)")
    ap.add_argument("--compile-only", action="store_true", help="kernels: compile every kernel "
                    "for GPU targets ahead of time (no GPU needed) and print the table")
    ap.add_argument("--quick", action="store_true", help="kernels --compile-only: the subset "
                    "the test suite compiles (default: every shape, dtype, kv dtype, block size)")
    ap.add_argument("--targets", type=int, nargs="+", choices=sorted(AOT_TARGETS),
                    help="kernels --compile-only: compute capabilities (default: 80 86 89 90)")
    ap.add_argument("--json", default="", help="kernels --compile-only: also write the results")
    ap.add_argument("--memory-budget", default="16GiB", help="KV budget (memory)")
    ap.add_argument("--context", type=int, default=4096, help="tokens per sequence (memory)")
    ap.add_argument("--window", type=int, default=4096, help="sliding window (memory)")
    ap.add_argument("--long-context", type=int, default=32768,
                    help="tokens of the long generation under a sliding window (memory)")
    ap.add_argument("--agree-new", type=int, default=128,
                    help="greedy tokens compared per prompt (accuracy)")
    ap.add_argument("--ppl-tokens", type=int, default=0,
                    help="score only the first N tokens of the text, 0 for all (accuracy)")
    ap.add_argument("--tp-max", type=int, default=4, help="largest tensor-parallel degree (tp)")
    ap.add_argument("--gpu-shapes", nargs="+", default=["smollm2-135m", "llama-3.2-1b"],
                    choices=list(GPU_SHAPES), help="model shapes (gpu)")
    ap.add_argument("--gpu-prefix", type=int, default=4096, help="cached system prompt (gpu)")
    ap.add_argument("--gpu-kv-budget", default="0.5", help="KV budget (gpu)")
    ap.add_argument("--gpu-invariant-requests", type=int, default=64,
                    help="gpu: requests of the invariant mode's throughput, on and off")
    ap.add_argument("--hf-compile", action="store_true", help="gpu: also transformers with a "
                    "static cache and torch.compile (compiles for a minute or more)")
    ap.add_argument("--kv-budget", default="256MiB", help="KV budget per rank (tp)")
    ap.add_argument("--system-tokens", type=int, default=2000,
                    help="system prompt tokens (prompt-cache)")
    args = ap.parse_args(argv)
    sections = {"engine": bench_engine, "overhead": bench_overhead, "prefix": bench_prefix,
                "capacity": bench_capacity, "throughput": bench_throughput, "cache": bench_cache,
                "speculative": bench_speculative, "kernels": bench_kernels,
                "memory": bench_memory, "accuracy": bench_accuracy, "load": bench_load,
                "invariant": bench_invariant, "prompt-cache": bench_prompt_cache,
                "tp": bench_tp, "gpu": bench_gpu}
    try:
        for name, run in sections.items():  # `all` runs them in this order
            if name in ("kernels", "gpu") and args.what == "all" and \
                    not torch.cuda.is_available():
                print(f"\n{name}: skipped, no CUDA GPU here")
                continue
            if name in ("load", "prompt-cache", "tp") and args.what == "all":
                print(f"\n{name}: processes of its own, run by name (python bench.py {name})")
                continue
            if args.what in (name, "all"):
                run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
