"""
Rung 6 of the ladder: our model == Hugging Face transformers on the same checkpoint (logits),
for HF directories (GPT-2, Llama with GQA + untied embeddings + Llama-3 RoPE scaling, Qwen2
with QKV bias, sharded files) and GGUF files (every supported tensor type, llama.cpp's Q/K row
order undone); the real SmolLM2 GGUF; the tokenizer against transformers'; loader errors.
"""
import copy
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, strategies as st
import torch
import torch.nn.functional as F

import model as M
from model import kernels
from cache import KVCache
from conftest import (TINY, TRAIN_TEXT, make_checkpoint, needs_smollm2, smollm2_path, train_bpe,
                      train_sentencepiece, write_sentencepiece_tokenizer, write_tokenizer)

TEXTS = ["Hello world", "12345 apples  and   3.14159\n\n\tTabs", "naïve café — 日本語 🎉 emoji",
         "<|im_start|>user\nHi there<|im_end|>\n", "   leading spaces and trailing   ",
         "a  1  22   333 4444", "it's   don't WE'LL they've", "x\r\ny\n\n\n z", "",
         "the quick brown fox jumps over the lazy dog"]


def our_logits(model, ids, paged=False, block_size=4):
    """(T, V) logits for all positions of one sequence, dense or through a paged cache."""
    ids = torch.tensor(ids)
    n = len(ids)
    if not paged:
        meta = kernels.AttnMeta.dense([0, n])
        return model(ids, torch.arange(n), meta, None, all_logits=True)
    cfg = model.cfg
    c = KVCache(cfg.n_layer, cfg.n_kv_head, cfg.head_dim, n_blocks=64, block_size=block_size,
                dtype=model.tok_emb.weight.dtype)
    c.append(99, [0, 0, 0])  # occupy some blocks first, so ours are not simply 0, 1, 2...
    slots = c.append(0, ids.tolist())
    meta = kernels.AttnMeta.paged(slots, c.block_table_tensor([0]), [n], [0, n], c.pool_shape)
    return model(ids, torch.arange(n), meta, c.layers, all_logits=True)


@pytest.mark.parametrize("arch, tokenizer", [("gpt2", "bpe"), ("llama", "bpe"),
                                             ("llama", "spm"), ("mistral", "spm-legacy"),
                                             ("qwen2", "bpe")])
def test_logits_match_transformers(tmp_path, arch, tokenizer):
    """Each family, with the tokenizer its checkpoints come with (Llama 3 and Qwen2 byte-level,
    Llama 2 and Mistral SentencePiece): tokens as transformers makes them, then logits."""
    from transformers import AutoTokenizer
    hf = make_checkpoint(tmp_path, arch, tokenizer=tokenizer)
    ours, tok = M.load(tmp_path)
    # (transformers rebuilds the older SentencePiece layout: see the tokenizer test; and reads
    # vocab.json + merges.txt for GPT-2 and Qwen2 only)
    if tokenizer == "spm" or arch in ("gpt2", "qwen2"):
        assert tok.encode(TRAIN_TEXT[:80]) == AutoTokenizer.from_pretrained(tmp_path).encode(TRAIN_TEXT[:80])
    ids = tok.encode(TRAIN_TEXT[:80])
    want = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(our_logits(ours, ids), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(our_logits(ours, ids, paged=True), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch, rope", [
    ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
               "beta_fast": 16, "beta_slow": 2}),
    ("llama", {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16,
               "mscale": 1.0, "mscale_all_dim": 0.5}),  # DeepSeek's attention factor
    ("llama", {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32,
               "truncate": False, "attention_factor": 1.3}),
    ("llama", {"rope_type": "dynamic", "factor": 2.0}),
    ("qwen2", {"rope_type": "linear", "factor": 2.0})])
def test_rope_scaling_matches_transformers(tmp_path, arch, rope):
    """YaRN (each of its options), dynamic NTK (within max_position_embeddings, the longest
    context the engine allows it) and linear scaling, past the original context length."""
    hf = make_checkpoint(tmp_path, arch, rope_scaling=rope, max_position_embeddings=128)
    ours, tok = M.load(tmp_path)
    assert ours.cfg.max_seq_len == 128
    ids = (tok.encode(TRAIN_TEXT) * 2)[:128]
    want = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(our_logits(ours, ids, paged=True), want, rtol=1e-4, atol=1e-4)
    if rope["rope_type"] == "yarn":  # the rotation is not plain RoPE's: the test can tell
        plain = make_checkpoint(tmp_path / "plain", arch, rope_scaling=None,
                                max_position_embeddings=128)
        assert not torch.allclose(plain(torch.tensor([ids])).logits[0], want, atol=1e-2)


# (in, out) of every weight product of the architectures the README names, at real sizes:
# SmolLM2-135M, GPT-2 small, Qwen2-0.5B, Llama-3.2-1B (QKV fused, gate/up fused, down, LM head
# where it stays under ~100 MB in bf16)
WEIGHT_SHAPES = sorted({
    (576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152),
    (768, 2304), (768, 768), (768, 3072), (3072, 768), (768, 50257),
    (896, 1152), (896, 896), (896, 9728), (4864, 896),
    (2048, 3072), (2048, 2048), (2048, 16384), (8192, 2048)})


@pytest.mark.parametrize("dtype, packed", [(torch.bfloat16, False), (torch.float32, False),
                                           (torch.bfloat16, True)])
def test_invariant_linear_rows_do_not_depend_on_their_company(dtype, packed):
    """Each row of the invariant mode's CPU product (model.invariant_product: 16-row products
    through F.linear, or through oneDNN's packed weight where this CPU has its bf16 path) is
    the same bits computed alone, among 16 or among 40 others, at any place among them, for
    every weight shape listed (test_kernels.py checks the Triton product the same way). The
    negative control: the same check catches a product whose rows depend on their company
    (x W^T computed as (x - mean) W^T + mean W^T: equal in exact arithmetic, not in floating
    point)."""
    if packed and not M.can_pack(torch.zeros(1, dtype=dtype)):
        pytest.skip("oneDNN has no bf16 path on this CPU: nothing is packed here")
    g = torch.Generator().manual_seed(0)

    def company_free(linear, x):
        whole = linear(x)
        return all(torch.equal(linear(x[rows]), whole[rows])
                   for rows in ([7], [0, 1], list(range(3, 20)), [39, 2, 11]))
    for n_in, n_out in WEIGHT_SHAPES:
        lin = torch.nn.Linear(n_in, n_out, bias=False).to(dtype)
        lin.weight.data = torch.randn(n_out, n_in, generator=g).to(dtype)
        if packed:
            assert M.pack_weights(lin, rows=kernels.LINEAR_ROWS) == 1
        product = lambda x: M.invariant_product(x, lin)  # noqa: E731

        def centred(x):
            mean = x.float().mean(0, keepdim=True).to(x.dtype)
            return product(x - mean) + product(mean)
        x = torch.randn(40, n_in, generator=g).to(dtype)
        assert company_free(product, x), (n_in, n_out)
        assert not company_free(centred, x), (n_in, n_out)
        if packed:  # and it is the product of the weight (to bf16 rounding)
            torch.testing.assert_close(product(x), F.linear(x, lin.weight), rtol=2e-2,
                                       atol=2e-2 * n_in ** 0.5)


# ------------------------------------------------------------------------------------------
# the decode step as one traceable function (compiled by generate.CompiledSteps)

@pytest.mark.skipif(not M.can_pack(torch.zeros(1, dtype=torch.bfloat16)),
                    reason="oneDNN has no bf16 path on this CPU: nothing is packed here")
def test_packed_product_equals_f_linear():
    """The packed weights give F.linear's product (to bf16 rounding) for every weight shape
    of the supported architectures and 1, 3 or 64 rows; packing twice packs nothing new."""
    g = torch.Generator().manual_seed(0)
    for n_in, n_out in sorted(WEIGHT_SHAPES)[:12]:
        lin = torch.nn.Linear(n_in, n_out, bias=False).to(torch.bfloat16)
        lin.weight.data = torch.randn(n_out, n_in, generator=g).to(torch.bfloat16) / n_in ** .5
        assert M.pack_weights(lin) == 1 and M.pack_weights(lin) == 1
        number = lin.packed
        M.pack_weights(lin)
        assert lin.packed == number
        for m in (1, 3, 64):
            x = torch.randn(m, n_in, generator=g).to(torch.bfloat16)
            want = F.linear(x.float(), lin.weight.float())
            got = M.step_linear(x, lin).float()
            assert torch.allclose(got, want, atol=0.05, rtol=0.02), (n_in, n_out, m)


@pytest.mark.parametrize("arch, config, dtype", [
    ("llama", {}, torch.float32), ("gpt2", {}, torch.float32), ("llama", {}, torch.bfloat16),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1},
     torch.float32)])
def test_decode_step_equals_the_eager_forward(tmp_path, arch, config, dtype):
    """Transformer.decode_step (run eagerly here; generate's tests compile it) == forward with
    the paged decode path: logits, and the K/V it writes into the pool, for a batch of
    sequences of unequal contexts in scattered blocks (fp32 tightly; bf16 to its rounding,
    with packed weights where this CPU has them)."""
    make_checkpoint(tmp_path, arch, **config)
    model, _ = M.load(tmp_path, dtype)
    M.pack_weights(model)
    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    block = 4
    contexts = [9, 3, 14]  # after this step's token
    pools = [KVCache(cfg.n_layer, cfg.n_kv_head, cfg.head_dim, 16, block, dtype)
             for _ in range(2)]
    tables = [[12, 3, 7], [5], [0, 9, 14, 1]]
    pools[0].kv.normal_(generator=g)  # the cached prefix: random keys and values
    pools[1].kv.copy_(pools[0].kv)
    before = pools[0].kv.clone()
    tokens = torch.randint(0, cfg.vocab_size, (3,), generator=g)
    positions = torch.tensor([c - 1 for c in contexts])
    slots = [t[(c - 1) // block] * block + (c - 1) % block for t, c in zip(tables, contexts)]
    width = max(map(len, tables))
    padded = [t + [0] * (width - len(t)) for t in tables]
    meta = kernels.AttnMeta.paged(slots, padded, contexts, [0, 1, 2, 3], pools[0].pool_shape)
    want = model(tokens, positions, meta, pools[0].layers)
    step = kernels.DecodeBatch.build(slots, padded, contexts, block)
    with torch.no_grad():
        got, greedy = model.decode_step(tokens, positions, pools[1].blocks, *step.tensors())
    assert torch.equal(greedy, got.argmax(-1))
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.3, rtol=0.05)
    assert torch.allclose(got, want, **tol), (got - want).abs().max()
    assert torch.allclose(pools[1].kv.float(), pools[0].kv.float(), **tol)
    assert not torch.equal(pools[1].kv, before)  # the step wrote its K/V


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compiled_halves_equal_the_eager_blocks(tmp_path, arch):
    """Transformer.compile_regions: a prefill of two ragged prompts, then a chunk of each that
    attends to the cached prefix, give the eager model's logits (every token's, fp32) and
    write the same K/V; the two compiled halves serve every layer and both steps."""
    make_checkpoint(tmp_path, arch)
    models = [M.load(tmp_path, torch.float32)[0] for _ in range(2)]
    models[1].compile_regions()
    assert models[1].blocks[0].regions is models[1].blocks[-1].regions
    cfg = models[0].cfg
    block = 4
    pools = [KVCache(cfg.n_layer, cfg.n_kv_head, cfg.head_dim, 16, block, torch.float32)
             for _ in range(2)]
    g = torch.Generator().manual_seed(2)
    tables = [[3, 9, 0], [12, 5]]
    for before, n in (([0, 0], [7, 5]), ([7, 5], [3, 2])):  # a prefill, then a chunk of each
        starts = [0, n[0], n[0] + n[1]]
        positions = torch.tensor([p for b0, k in zip(before, n) for p in range(b0, b0 + k)])
        slots = [t[p // block] * block + p % block for t, b0, k in zip(tables, before, n)
                 for p in range(b0, b0 + k)]
        width = max(map(len, tables))
        meta = kernels.AttnMeta.paged(slots, [t + [0] * (width - len(t)) for t in tables],
                                      [b0 + k for b0, k in zip(before, n)], starts,
                                      pools[0].pool_shape)
        tokens = torch.randint(0, cfg.vocab_size, (sum(n),), generator=g)
        want, got = (m(tokens, positions, meta, p.layers, all_logits=True)
                     for m, p in zip(models, pools))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pools[1].kv, pools[0].kv, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch, config", [
    ("mistral", {"sliding_window": 8}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 0,
               "layer_types": None})])  # an older config.json: no layer_types written
def test_sliding_window_matches_transformers(tmp_path, arch, config):
    """Mistral (every layer slides) and Qwen2 (the layers from max_window_layers on, as
    transformers reads it): logits over a sequence several windows long, dense and paged; the
    context limit is the positional one; without the window the logits would differ."""
    hf = make_checkpoint(tmp_path, arch, **{k: v for k, v in config.items() if k != "layer_types"})
    if "layer_types" in config:  # as a config.json written before transformers listed them
        c = json.loads((tmp_path / "config.json").read_text())
        del c["layer_types"]
        (tmp_path / "config.json").write_text(json.dumps(c))
    ours, _ = M.load(tmp_path)
    n_layer = hf.config.num_hidden_layers
    want_layers = tuple(range(config.get("max_window_layers", 0), n_layer))
    assert (ours.cfg.window, ours.cfg.sliding_layers) == (config["sliding_window"], want_layers)
    assert ours.cfg.max_seq_len == hf.config.max_position_embeddings
    ids = [(7 * i) % 300 + 1 for i in range(40)]
    want = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(our_logits(ours, ids), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(our_logits(ours, ids, paged=True), want, rtol=1e-4, atol=1e-4)
    for block in ours.blocks:  # the negative control: the same weights, no window
        block.window = 0
    assert not torch.allclose(our_logits(ours, ids), want, atol=1e-3)


@pytest.mark.parametrize("as_matrix", [True, False])
def test_both_rope_forms_match_transformers(tmp_path, monkeypatch, as_matrix):
    """RoPE as (T, D, D) matrices (the CPU's form) and as cos/sin (a GPU's: no T x D x D
    transient) give the same logits, each within fp32 rounding of transformers'."""
    hf = make_checkpoint(tmp_path, "llama")
    ours, tok = M.load(tmp_path)
    ids = tok.encode(TRAIN_TEXT[:80])
    built, rope_rotation = [], M.rope_rotation

    def rope(positions, inv_freq, dtype, scale):
        built.append(rope_rotation(positions, inv_freq, dtype, as_matrix=as_matrix, scale=scale))
        return built[-1]
    monkeypatch.setattr(M, "rope_rotation", rope)
    got = our_logits(ours, ids, paged=True)
    assert isinstance(built[0], torch.Tensor) == as_matrix  # the form asked for was used
    torch.testing.assert_close(got, hf(torch.tensor([ids])).logits[0], rtol=1e-4, atol=1e-4)


# A process started in the project folder, as `python generate.py` or a user's script there
# is: it touches transformers' model classes (which import Hugging Face's `kernels` package,
# 5.25 and later) before or after the engine, then runs the engine's kernels and compares.
ROOT = Path(__file__).resolve().parent
ONE_PROCESS = """
import sys, pathlib, torch
if sys.argv[2] == "transformers":
    import transformers
    transformers.LlamaForCausalLM  # touching a model class imports `kernels` (5.25 and later)
import model
from conftest import make_checkpoint
from test_model import our_logits
path = pathlib.Path(sys.argv[1])
hf = make_checkpoint(path, "llama")
ours, tok = model.load(path)
ids = tok.encode("the quick brown fox jumps")
want = hf(torch.tensor([ids])).logits[0]
torch.testing.assert_close(our_logits(ours, ids, paged=True), want, rtol=1e-4, atol=1e-4)
import kernels  # the bare name, as transformers asks for it
print(model.kernels.__name__, model.kernels.__file__, kernels.__file__,
      hasattr(kernels, "CUDAProperties"))
"""


def installed(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def hf_kernels_required():
    """Whether the installed transformers needs Hugging Face's `kernels` package (5.25 and
    later), so that the name clash is really exercised here."""
    major, minor = map(int, installed("transformers").split(".")[:2])
    if (major, minor) >= (5, 25):
        assert installed("kernels") is not None
    return installed("kernels") is not None


def test_transformers_first_then_the_engine_in_one_process(tmp_path):
    """`kernels` names this project's kernels.py and Hugging Face's hub-kernels package, which
    transformers imports: a process started in the project folder that touches transformers'
    model classes first, then runs the engine (through Triton where it is installed), gets
    transformers' logits, and the bare name belongs to the installed package."""
    hf_kernels = hf_kernels_required()
    env = dict(os.environ, KVCACHE_KERNELS="triton" if kernels.triton else "ref")
    out = subprocess.run([sys.executable, "-c", ONE_PROCESS, str(tmp_path), "transformers"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    name, ours, bare, bare_is_hf = out.stdout.split()
    assert name == "kvcache_kernels" and Path(ours) == ROOT / "kernels.py"
    if hf_kernels:
        assert Path(bare).parent.name == "kernels" and bare_is_hf == "True"
    else:
        assert Path(bare) == ROOT / "kernels.py"


def test_engine_first_then_transformers_in_this_process(tmp_path, monkeypatch):
    """The other order is this very process: the test files imported the engine before any
    transformers model class was touched. Building one now, and running the engine's kernels
    beside it, works, and the two `kernels` are two modules."""
    hf_kernels = hf_kernels_required()
    monkeypatch.setenv("KVCACHE_KERNELS", "triton" if kernels.triton else "ref")
    hf = make_checkpoint(tmp_path, "llama")  # touches LlamaForCausalLM
    ours, tok = M.load(tmp_path)
    ids = tok.encode("the quick brown fox jumps")
    torch.testing.assert_close(our_logits(ours, ids, paged=True), hf(torch.tensor([ids])).logits[0],
                               rtol=1e-4, atol=1e-4)
    assert kernels.__name__ == "kvcache_kernels" and Path(kernels.__file__) == ROOT / "kernels.py"
    if hf_kernels:
        assert sys.modules["kernels"] is not kernels
        assert hasattr(sys.modules["kernels"], "CUDAProperties")


def test_sharded_checkpoint_loads_the_same(tmp_path):
    hf = make_checkpoint(tmp_path, "llama", shard=True)
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours, _ = M.load(tmp_path)
    ids = list(range(3, 40))
    torch.testing.assert_close(our_logits(ours, ids), hf(torch.tensor([ids])).logits[0],
                               rtol=1e-4, atol=1e-4)


@given(n=st.integers(1, 1000), world=st.integers(1, 9))
def test_split_cuts_every_item_once_in_near_equal_shares(n, world):
    shares = [M.split(n, world, r) for r in range(world)]
    assert shares[0][0] == 0 and shares[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    sizes = [hi - lo for lo, hi in shares]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_parallel_degrees_divide_the_kv_heads_and_the_mlp():
    smollm2 = M.LlamaConfig(n_layer=30, n_embd=576, n_head=9, n_kv_head=3, head_dim=64,
                            n_hidden=1536, vocab_size=49152, max_seq_len=8192)
    assert M.parallel_degrees(smollm2) == [1, 3]
    assert M.parallel_degrees(M.LlamaConfig(2, 64, 8, 4, 8, 24, 10, 16)) == [1, 2, 4]
    assert M.parallel_degrees(M.LlamaConfig(2, 64, 8, 4, 8, 30, 10, 16)) == [1, 2]  # F = 30
    with pytest.raises(ValueError, match="tensor parallel 2 does not divide this model's 3 KV "
                                         "heads and MLP width 1536: 1, 3 would"):
        M.check_degree(smollm2, 2)


@pytest.mark.parametrize("arch,overrides,world", [
    ("llama", dict(num_attention_heads=8, num_key_value_heads=4), 4),
    ("gpt2", {}, 2), ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2), 2)])
def test_shards_put_together_are_the_whole_model(tmp_path, arch, overrides, world):
    """Every rank's weights, put back together along the split (Q, K and V heads and the
    MLP's rows in rank order, the row-parallel columns, the vocabulary), are the model's;
    what is replicated is equal, and a tied LM head stays the embedding's share."""
    make_checkpoint(tmp_path, arch, **overrides)
    whole, _ = M.load(tmp_path)
    ranks = [M.shard(M.load(tmp_path)[0], r, world) for r in range(world)]
    cfg, d = whole.cfg, whole.cfg.head_dim
    for i, block in enumerate(whole.blocks):
        parts = [m.blocks[i] for m in ranks]
        h, k = parts[0].n_head, parts[0].n_kv_head
        assert (h * world, k * world) == (cfg.n_head, cfg.n_kv_head)
        for t in ("weight", "bias"):
            if getattr(block.qkv, t) is None:
                continue
            q, key, v = zip(*(getattr(p.qkv, t).split([h * d, k * d, k * d]) for p in parts))
            assert torch.equal(torch.cat(q + key + v), getattr(block.qkv, t))
        row_parallel = ("out", "down") if arch != "gpt2" else ("out", "proj")
        for name in row_parallel:
            assert torch.equal(torch.cat([getattr(p, name).weight for p in parts], 1),
                               getattr(block, name).weight)
            for p in parts:  # a bias is added once, after the all-reduce: whole on every rank
                assert getattr(p, name).bias is None or \
                    torch.equal(getattr(p, name).bias, getattr(block, name).bias)
        if arch != "gpt2":
            gate, up = zip(*(p.gate_up.weight.chunk(2) for p in parts))
            assert torch.equal(torch.cat(gate + up), block.gate_up.weight)
        else:
            assert torch.equal(torch.cat([p.fc.weight for p in parts]), block.fc.weight)
            assert torch.equal(torch.cat([p.fc.bias for p in parts]), block.fc.bias)
        assert all(torch.equal(p.attn_norm["weight"], block.attn_norm["weight"]) for p in parts)
    assert torch.equal(torch.cat([m.tok_emb.weight for m in ranks]), whole.tok_emb.weight)
    assert torch.equal(torch.cat([m.lm_head.weight for m in ranks]), whole.lm_head.weight)
    for m in ranks:
        assert (m.lm_head.weight is m.tok_emb.weight) == cfg.tie_embeddings


def test_hf_tokenizer_matches_transformers(tiny_dir):
    from transformers import AutoTokenizer
    path = tiny_dir("gpt2")
    ours = M.tokenizer_from_hf_dir(path)
    theirs = AutoTokenizer.from_pretrained(path)
    for text in TEXTS + [TRAIN_TEXT]:
        text = text.replace("<|im_start|>", "").replace("<|im_end|>", "")
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == text


# ------------------------------------------------------------------------------------------
# GGUF

def llamacpp_permute(w, n_head):
    """What llama.cpp's converter does to W_q and W_k (the inverse of what we undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def write_gguf(path, hf, qtype="F32", arch="llama", skip=(), extra=None, strings=None,
               tokenizer="gpt2", drop_keys=(), numbers=None):
    """Write an HF Llama model as a llama.cpp-style GGUF, every 2-D weight stored as qtype
    (extra: more tensors; strings: more string metadata). tokenizer: "gpt2" (byte-level BPE),
    "llama" (SentencePiece: conftest.train_sentencepiece's pieces, scored as llama.cpp's
    converter scores them) or None."""
    cfg = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if tokenizer == "gpt2":
        vocab, merges = train_bpe(TRAIN_TEXT, 40)
        vocab = vocab + ["<|endoftext|>"] + [f"<pad{i}>" for i in range(cfg.vocab_size - len(vocab) - 1)]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(vocab)
        w.add_token_types([1] * 296 + [3] * (cfg.vocab_size - 296))
        w.add_token_merges(merges)
        w.add_eos_token_id(296)
    elif tokenizer == "llama":  # SentencePiece: pieces, a score each (best merges first), types
        pieces, _ = train_sentencepiece()
        w.add_tokenizer_model("llama")
        w.add_token_list(pieces)
        w.add_token_scores([0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(len(pieces) - 259)])
        w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(pieces) - 259))
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    inv = {v: k for k, v in M.GGUF_LLAMA.items()}
    h, k = cfg.num_attention_heads, cfg.num_key_value_heads
    for name, t in hf.state_dict().items():
        ours = M.rename(name, M.HF_LLAMA, M.HF_LLAMA_DROPPED)
        i = name.split(".")[2] if ".layers." in name else None
        our_template = ours.replace(f".{i}.", ".{i}.") if i else ours
        src = inv[our_template].replace("{i}", i) if i else inv[our_template]
        if src in skip or (src == "output.weight" and cfg.tie_word_embeddings):
            continue
        a = t.detach().float().numpy()
        if arch != "llama":  # qwen2 (and a wrong architecture): rows as HF has them
            pass
        elif src.endswith("attn_q.weight"):
            a = llamacpp_permute(a, h)
        elif src.endswith("attn_k.weight"):
            a = llamacpp_permute(a, k)
        kind = gguf.GGMLQuantizationType[qtype] if a.ndim == 2 else gguf.GGMLQuantizationType.F32
        if kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor(src, a.astype(np.float16))
        elif kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(src, a)
        else:
            w.add_tensor(src, gguf.quants.quantize(a, kind), raw_dtype=kind)
    for name, a in (extra or {}).items():
        w.add_tensor(name, a)
    for key, value in (strings or {}).items():
        w.add_string(key, value)
    for key, value in (numbers or {}).items():
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(key, value)
    for key in drop_keys:
        del w.kv_data[0][key]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


GGUF_LLAMA_TINY = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                       num_key_value_heads=2, rope_scaling=None, vocab_size=320)


@pytest.fixture(scope="module")
def gguf_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    return make_checkpoint(d, "llama", **GGUF_LLAMA_TINY), d


def test_gguf_f32_logits_match_transformers(gguf_llama):
    hf, d = gguf_llama
    write_gguf(d / "m.gguf", hf, "F32")
    ours, tok = M.load(d / "m.gguf")
    assert not ours.cfg.tie_embeddings
    ids = tok.encode(TRAIN_TEXT[:60])
    torch.testing.assert_close(our_logits(ours, ids, paged=True), hf(torch.tensor([ids])).logits[0],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_tensor_types_dequantize_exactly(gguf_llama, qtype):
    """Each loaded weight equals the dequantized stored weight, with the row order restored."""
    hf, d = gguf_llama
    write_gguf(d / f"{qtype}.gguf", hf, qtype)
    ours, _ = M.load(d / f"{qtype}.gguf")
    kind = gguf.GGMLQuantizationType[qtype]
    q = hf.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    if qtype == "F16":
        roundtrip = q.astype(np.float16).astype(np.float32)
    else:
        roundtrip = gguf.quants.dequantize(gguf.quants.quantize(q, kind), kind)
    torch.testing.assert_close(ours.blocks[1].qkv.weight[:64], torch.from_numpy(roundtrip),
                               rtol=0, atol=0)
    ids = list(range(5, 30))  # and the model still follows transformers, within the rounding
    err = (our_logits(ours, ids) - hf(torch.tensor([ids])).logits[0]).abs().max()
    assert err < {"F16": 0.05, "BF16": 0.3, "Q8_0": 0.3, "Q4_0": 3, "Q4_1": 3}[qtype]


SPM_TEXTS = TEXTS + ["<s>hi</s> there", " x", "été, 日本 déjà", "\u00e9\n\n  é", "▁ literal"]


def check_tokenizer(ours, encode, texts=SPM_TEXTS, decode=None):
    """ours encodes as `encode` does, decodes back to the text (as `decode` does), and
    streams a continuation whose pieces join to the bytes of its tokens."""
    for text in texts:
        ids = ours.encode(text)
        assert ids == encode(text), text
        if decode is not None:
            assert ours.decode(ids) == decode(ids), text
        stream = ours.stream()
        streamed = "".join(stream.feed(i) for i in ids) + stream.flush()
        assert streamed == ours.decode_bytes(ids).decode("utf-8", errors="replace"), text


@pytest.mark.parametrize("layout", ["spm", "spm-legacy"])
def test_sentencepiece_tokenizer_json_matches_transformers(tmp_path, layout):
    """Llama-2-style tokenizer.json (Metaspace, or the older Prepend + Replace normalizer),
    byte fallback for characters no piece holds, BOS added: token for token as transformers'
    tokenizer over the same file; decoded back to the text."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    write_sentencepiece_tokenizer(tmp_path, legacy=layout == "spm-legacy")
    ours = M.tokenizer_from_hf_dir(tmp_path)
    assert isinstance(ours, M.SentencePieceTokenizer) and ours.add_bos and ours.bos_id == 1
    # transformers 5's LlamaTokenizer rebuilds a Metaspace pipeline whatever the file says; its
    # generic fast tokenizer runs the file as written, as SentencePiece itself would
    theirs = AutoTokenizer.from_pretrained(tmp_path) if layout == "spm" else \
        PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    check_tokenizer(ours, theirs.encode, decode=theirs.decode)
    for text in SPM_TEXTS:  # (Metaspace adds no "▁" before a leading space, yet strips one)
        if "<s>" not in text and "▁" not in text and (layout == "spm-legacy" or not text[:1].isspace()):
            assert ours.decode(ours.encode(text, add_bos=False)) == text
    assert ours.encode("é") == [1, 297, 0xC3 + 3, 0xA9 + 3]  # ▁, then the bytes of é
    assert ours.decode_bytes(ours.encode("a é", add_bos=False)) == " a é".encode()


def spm_reference(pieces, scores, text, specials=("<s>", "</s>")):
    """SentencePiece BPE as llama.cpp runs a GGUF's "llama" vocabulary, written plainly: BOS;
    each stretch of text between special tokens gets a space before it, spaces become "▁";
    then, from single characters, merge the adjacent pair whose merged piece is in the
    vocabulary with the highest score (the leftmost of equals) until none is; a symbol
    without a piece becomes the byte tokens of its UTF-8."""
    vocab = {}
    for i, p in enumerate(pieces):
        vocab.setdefault(p, i)
    ids = [vocab["<s>"]]
    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        if part in specials:
            ids.append(vocab[part])
            continue
        if not part:
            continue
        sym = list((" " + part).replace(" ", "▁"))
        while True:
            best = None
            for i in range(len(sym) - 1):
                merged = sym[i] + sym[i + 1]
                if merged in vocab and (best is None or scores[vocab[merged]] > best[0]):
                    best = (scores[vocab[merged]], i)
            if best is None:
                break
            i = best[1]
            sym[i:i + 2] = [sym[i] + sym[i + 1]]
        for p in sym:
            ids += [vocab[p]] if p in vocab else [vocab[f"<0x{b:02X}>"] for b in p.encode()]
    return ids


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    """A GGUF with a SentencePiece vocabulary (tokenizer.ggml.model "llama": pieces, scores,
    types): token for token as SentencePiece's algorithm (spm_reference) and as transformers
    reads the same file; the model loads and runs."""
    from transformers import AutoTokenizer
    hf = make_checkpoint(tmp_path / "hf", "llama", tokenizer="spm-legacy",
                         **{**GGUF_LLAMA_TINY, "vocab_size": 358})
    write_gguf(tmp_path / "m.gguf", hf, "F32", tokenizer="llama")
    model, ours = M.load(tmp_path / "m.gguf")
    assert isinstance(ours, M.SentencePieceTokenizer) and ours.eos_ids == {2}
    pieces, _ = train_sentencepiece()
    scores = M.read_gguf(tmp_path / "m.gguf").get("tokenizer.ggml.scores")
    check_tokenizer(ours, lambda t: spm_reference(pieces, scores, t))
    # transformers rebuilds a Metaspace pipeline, which adds no "▁" before a leading space or
    # "▁" or after a special token: equal elsewhere
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    check_tokenizer(ours, theirs.encode, decode=theirs.decode,
                    texts=[t for t in SPM_TEXTS if not ("<s>" in t or "▁" in t or t[:1].isspace())])
    ids = ours.encode("the quick brown fox")
    torch.testing.assert_close(our_logits(model, ids), hf(torch.tensor([ids])).logits[0],
                               rtol=1e-4, atol=1e-4)


# chat templates as checkpoints of each family write them (shortened, same structure)
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% endif %}"
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant/user/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' }}"
    "{% if loop.first and system is defined %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}"
    "{% endif %}{{ m['content'].strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}"
    "{{ m['content'] + eos_token }}{% else %}{{ raise_exception('only user and assistant') }}"
    "{% endif %}{% endfor %}")
CHATML_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("family, template", [("llama2", LLAMA2_TEMPLATE),
                                              ("mistral", MISTRAL_TEMPLATE),
                                              ("chatml", CHATML_TEMPLATE)])
def test_chat_templates_render_as_transformers_renders_them(tmp_path, family, template):
    """The checkpoint's own template, rendered: the same text and token ids as transformers'
    apply_chat_template; BOS once, whether the template writes it or not; a template that
    refuses a conversation is one ValueError."""
    from transformers import AutoTokenizer
    if family == "chatml":
        write_tokenizer(tmp_path)
        cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(
            {**cfg, "chat_template": template, "tokenizer_class": "GPT2Tokenizer"}))
    else:
        write_sentencepiece_tokenizer(tmp_path, chat_template=template)
    ours, theirs = M.tokenizer_from_hf_dir(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    convs = [[{"role": "user", "content": "the quick fox"}],
             [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the dog"},
              {"role": "user", "content": "and then?"}]]
    if family != "mistral":
        convs.append([{"role": "system", "content": "be brief"}] + convs[1])
    for conv in convs:
        text = M.apply_chat_template(ours, conv)
        assert text == theirs.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        ids = M.encode_chat(ours, text)
        assert ids == theirs.encode(text, add_special_tokens=False)
        assert ids.count(ours.bos_id) == text.count("<s>")
    if family != "chatml":
        with pytest.raises(ValueError, match="chat template refuses the conversation"):
            M.apply_chat_template(ours, [{"role": "narrator", "content": "x"}])


def test_a_checkpoint_without_tokenizer_runs_token_ids(tmp_path):
    """No tokenizer files: the model loads and generates from token ids (its text is the ids);
    a text prompt is one clear error naming what is missing."""
    from generate import LLM, SamplingParams
    hf = make_checkpoint(tmp_path, "llama", tokenizer=None)
    llm = LLM(str(tmp_path), dtype="float32", n_blocks=32)
    [out] = llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    want = hf.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)[0, 3:]
    assert out.token_ids == want.tolist()
    assert out.text == "".join(f" {i}" for i in out.token_ids)
    with pytest.raises(ValueError, match="has no tokenizer files .* give prompts as token ids"):
        llm.generate(["hello"])
    write_gguf(tmp_path / "m.gguf", hf, tokenizer=None)  # a GGUF without tokenizer.ggml.*
    gguf_llm = LLM(str(tmp_path / "m.gguf"), dtype="float32", n_blocks=32)
    [again] = gguf_llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert again.token_ids == out.token_ids
    with pytest.raises(ValueError, match="m.gguf has no tokenizer files"):
        gguf_llm.generate(["hello"])


def test_ids_the_tokenizer_lacks_do_not_end_the_run(tmp_path):
    """A model whose vocabulary is larger than its tokenizer's (padded embeddings) may sample
    an id the tokenizer cannot decode: it shows as U+FFFD, and the text so far is kept."""
    write_tokenizer(tmp_path)
    tok = M.tokenizer_from_hf_dir(tmp_path)
    stream = tok.stream()
    text = "".join(stream.feed(i) for i in tok.encode("the fox") + [10**6, tok.encode("x")[0]])
    assert text == "the fox\ufffdx"


def test_gguf_header_reads_as_the_gguf_package_reads_it(tmp_path):
    """Every value type, arrays of each, a vocabulary-sized string array and tensors of odd
    shapes: our one-pass reader gives what gguf.GGUFReader gives."""
    w = gguf.GGUFWriter(str(tmp_path / "all.gguf"), "llama")
    w.add_uint8("t.u8", 200), w.add_int8("t.i8", -5), w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -3000), w.add_uint32("t.u32", 4_000_000_000), w.add_int32("t.i32", -7)
    w.add_float32("t.f32", 0.1), w.add_bool("t.bool", True), w.add_string("t.str", "naïve 🎉")
    w.add_uint64("t.u64", 2**63), w.add_int64("t.i64", -2**40), w.add_float64("t.f64", 1e-300)
    w.add_array("t.ints", [1, 2, 3]), w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.bools", [True, False]), w.add_array("t.empty", [])
    w.add_array("t.strs", [f"tok{i} ▁x" for i in range(5000)] + [""])
    w.add_tensor("a", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.add_tensor("b", np.ones((3, 1, 64), np.float16))
    w.add_tensor("c", gguf.quants.quantize(np.ones((2, 64), np.float32), gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    ours, theirs = M.read_gguf(tmp_path / "all.gguf"), gguf.GGUFReader(str(tmp_path / "all.gguf"))
    fields = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert set(ours.fields) == set(fields)
    for k, v in fields.items():
        assert ours.fields[k] == v and type(ours.fields[k]) is type(v), k
    assert {t.name for t in theirs.tensors} == set(ours.tensors)
    for t in theirs.tensors:
        kind, shape, start, nbytes = ours.tensors[t.name]
        assert (start, nbytes) == (int(t.data_offset), int(t.n_bytes))
        assert kind == t.tensor_type.name and shape == tuple(reversed(t.shape.tolist()))
        assert ours.tensor_bytes(t.name).numpy().tobytes() == t.data.tobytes()


@pytest.mark.parametrize("qtype", [*M.GGUF_BLOCKS, *M.GGUF_NUMPY, "F16", "BF16"])
def test_dequantize_is_bitwise_the_gguf_package(qtype):
    """Our torch dequantizers against gguf.quants on random blocks (every bit pattern of the
    quants, scales and minimums random finite fp16)."""
    kind = gguf.GGMLQuantizationType[qtype]
    block, nbytes = gguf.GGML_QUANT_SIZES[kind]
    rows, cols = 6, 2 * 256 if block == 256 else 4 * block
    raw = np.random.default_rng(0).integers(0, 256, rows * cols // block * nbytes, np.uint8)
    if qtype not in ("F16", "BF16"):  # finite scales: overwrite each block's fp16 fields
        blocks = raw.reshape(-1, nbytes)
        for at in {"Q4_1": (0, 2), "Q5_1": (0, 2)}.get(qtype, (0,) if block == 32 else ()):
            blocks[:, at:at + 2] = np.random.default_rng(1).uniform(-2, 2, len(blocks)) \
                .astype(np.float16)[:, None].view(np.uint8)
        if block == 256:  # K-quants keep their fp16 super-scales at the end (Q2_K..Q6_K)
            tail = {"Q2_K": 4, "Q3_K": 2, "Q4_K": 4, "Q5_K": 4, "Q6_K": 2}[qtype]
            at = {"Q4_K": 0, "Q5_K": 0}.get(qtype, nbytes - tail)
            blocks[:, at:at + tail] = np.random.default_rng(2).uniform(-1, 1, (len(blocks), tail // 2)) \
                .astype(np.float16).view(np.uint8)
    elif qtype == "F16":
        raw = np.random.default_rng(3).standard_normal(rows * cols).astype(np.float16).view(np.uint8)
    ours = M.dequantize(torch.from_numpy(raw.copy()), qtype, (rows, cols)).float()
    theirs = np.asarray(gguf.quants.dequantize(raw, kind), np.float32).reshape(rows, cols)
    assert torch.equal(ours.view(torch.int32), torch.from_numpy(theirs).view(torch.int32))


def test_a_damaged_gguf_is_one_value_error(gguf_llama, tmp_path):
    """Any cut and any byte changed in the header: a ValueError naming the file (or a model
    that loads), never another exception, a hang or a huge allocation."""
    hf, _ = gguf_llama
    good = tmp_path / "good.gguf"
    write_gguf(good, hf, "Q8_0")
    data = bytearray(good.read_bytes())
    header = M.read_gguf(good).data_start
    rng = np.random.default_rng(0)
    cases = [bytes(data[:n]) for n in [0, 3, 4, 10, 23, 24, 100, header - 1, header, len(data) - 1]]
    for at in rng.integers(0, header, 60):
        for value in (0, 0xFF, int(rng.integers(256))):
            changed = bytearray(data)
            changed[at] = value
            cases.append(bytes(changed))
    bad = tmp_path / "bad.gguf"
    outcomes = set()
    for case in cases:
        bad.write_bytes(case)
        try:
            M.load(bad)
            outcomes.add("loaded")
        except ValueError as e:
            assert str(bad) in str(e) and "\n" not in str(e)
            outcomes.add("refused")
    assert "refused" in outcomes


@pytest.mark.parametrize("arch, rope", [
    ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
               "beta_fast": 16.0, "beta_slow": 2.0}),
    ("qwen2", None), ("qwen2", {"rope_type": "yarn", "factor": 4.0,
                                "original_max_position_embeddings": 32}), ("mistral", None)])
def test_gguf_qwen2_and_yarn_match_transformers(tmp_path, arch, rope):
    """GGUF architecture qwen2 (Q/K/V biases, rows as HF has them, tied embeddings),
    llama.cpp's YaRN keys and a sliding window (a Mistral written as architecture llama),
    against transformers on the HF checkpoint written to that GGUF."""
    extra = {"sliding_window": 8} if arch == "mistral" else {}
    hf = make_checkpoint(tmp_path, arch, rope_scaling=rope, max_position_embeddings=128,
                         **{k: v for k, v in GGUF_LLAMA_TINY.items() if k != "rope_scaling"},
                         **extra)
    numbers = {"llama.attention.sliding_window": 8} if arch == "mistral" else {}
    arch = "llama" if arch == "mistral" else arch
    if rope:
        numbers = {f"{arch}.rope.scaling.factor": rope["factor"],
                   f"{arch}.rope.scaling.original_context_length":
                       rope["original_max_position_embeddings"]}
        numbers.update({f"{arch}.rope.scaling.yarn_{b}": rope[b] for b in ("beta_fast", "beta_slow")
                        if b in rope})
    write_gguf(tmp_path / "m.gguf", hf, "F32", arch=arch, numbers=numbers,
               strings={f"{arch}.rope.scaling.type": "yarn"} if rope else {})
    ours, tok = M.load(tmp_path / "m.gguf")
    assert ours.cfg.qkv_bias == (arch == "qwen2") and ours.cfg.tie_embeddings == (arch == "qwen2")
    assert ours.cfg.window == (8 if extra else 0)
    ids = (tok.encode(TRAIN_TEXT) * 2)[:128]
    torch.testing.assert_close(our_logits(ours, ids, paged=True), hf(torch.tensor([ids])).logits[0],
                               rtol=1e-4, atol=1e-4)


def test_gguf_errors_name_what_does_not_fit(gguf_llama, tmp_path):
    hf, _ = gguf_llama
    write_gguf(tmp_path / "missing.gguf", hf, skip=("blk.1.ffn_up.weight",))
    with pytest.raises(ValueError, match="blocks.1.up.weight|blocks.1.gate_up.weight"):
        M.load(tmp_path / "missing.gguf")
    write_gguf(tmp_path / "extra.gguf", hf, extra={"blk.0.mystery.weight": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="unknown tensor blk.0.mystery.weight"):
        M.load(tmp_path / "extra.gguf")
    write_gguf(tmp_path / "gpt2.gguf", hf, arch="gpt2")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        M.load(tmp_path / "gpt2.gguf")
    write_gguf(tmp_path / "q5k.gguf", hf, "F32",
               extra={"blk.0.bad.weight": np.zeros((2, 8), np.int8)})
    with pytest.raises(ValueError, match="unsupported type I8"):
        M.load(tmp_path / "q5k.gguf")
    huge = copy.copy(hf)  # the same weights under a header that claims 10^9 blocks
    huge.config = copy.deepcopy(hf.config)
    huge.config.num_hidden_layers = 10**9
    write_gguf(tmp_path / "huge.gguf", huge)
    with pytest.raises(ValueError, match="the config says 1000000000 layers, the file holds "
                                         "weights of 2"):
        M.load(tmp_path / "huge.gguf")  # at once: no model of 10^9 blocks is built first
    write_gguf(tmp_path / "longrope.gguf", hf, strings={"llama.rope.scaling.type": "longrope"})
    with pytest.raises(ValueError, match="rope.scaling.type='longrope' is not supported"):
        M.load(tmp_path / "longrope.gguf")
    write_gguf(tmp_path / "log.gguf", hf, strings={"llama.rope.scaling.type": "yarn"}, numbers={
        "llama.rope.scaling.factor": 4.0, "llama.rope.scaling.original_context_length": 32,
        "llama.rope.scaling.yarn_log_multiplier": 0.1})
    with pytest.raises(ValueError, match="rope.scaling.yarn_log_multiplier=0.1.* not supported"):
        M.load(tmp_path / "log.gguf")
    good = tmp_path / "good.gguf"
    write_gguf(good, hf, "Q8_0")
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="cut.gguf"):
        M.load(tmp_path / "cut.gguf")


def test_hf_errors_name_what_does_not_fit(tmp_path):
    make_checkpoint(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 65}))
    with pytest.raises(ValueError, match=r"gate_up.weight has shape \(128, 48\).*\(130, 48\)"):
        M.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 10**9}))
    with pytest.raises(ValueError, match="the config says 1000000000 layers"):
        M.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    with pytest.raises(ValueError, match="unsupported model_type 'mamba'"):
        M.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match="cannot read safetensors"):
        M.load(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        M.load(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a GGUF file nor"):
        M.load(tmp_path / "notes.txt")


@pytest.mark.parametrize("arch, field, value", [
    ("gpt2", "scale_attn_weights", False), ("gpt2", "scale_attn_by_inverse_layer_idx", True),
    ("gpt2", "tie_word_embeddings", False), ("gpt2", "activation_function", "relu"),
    ("llama", "hidden_act", "gelu"), ("qwen2", "hidden_act", "gelu")])
def test_configs_the_engine_does_not_implement_are_refused(tmp_path, arch, field, value):
    """Each of these fields changes transformers' logits (shown here), so a checkpoint with it
    is refused with one line naming the field, not run with wrong logits."""
    ids = torch.tensor([[5, 9, 2, 7, 1, 3]])
    plain = make_checkpoint(tmp_path / "plain", arch)(ids).logits
    other = make_checkpoint(tmp_path / "other", arch, **{field: value})(ids).logits
    assert not torch.allclose(plain, other, atol=1e-4)  # the field matters
    with pytest.raises(ValueError, match=f"config.json: {field}=.* is not supported"):
        M.load(tmp_path / "other")


FAMILIES = {"gpt2": ("GPT2Config", "GPT2LMHeadModel"), "llama": ("LlamaConfig", "LlamaForCausalLM"),
            "mistral": ("MistralConfig", "MistralForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}
# a value other than the default for each field the engine ignores, tried on transformers
CHANGED = {"resid_pdrop": 0.5, "embd_pdrop": 0.5, "attn_pdrop": 0.5, "summary_type": "last",
           "summary_use_proj": False, "summary_activation": "tanh", "summary_proj_to_labels": False,
           "summary_first_dropout": 0.5, "reorder_and_upcast_attn": True, "attention_dropout": 0.5,
           "pretraining_tp": 2, "max_window_layers": 1, "initializer_range": 0.5, "use_cache": False,
           "bos_token_id": 3, "eos_token_id": 4, "pad_token_id": 5, "chunk_size_feed_forward": 2,
           "output_attentions": True, "output_hidden_states": True}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_config_field_is_read_refused_or_shown_not_to_matter(family):
    """Each field of the installed transformers' config for the family is one the loader
    reads, one it refuses (a value other than the one implemented: ValueError naming it), or
    one that does not change the logits: changing it leaves transformers' own logits as they
    were. A field added by a new transformers fails here until it is classified."""
    import transformers
    cfg_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family])
    fields = set(cfg_cls().to_dict())
    fixed, ignored = M.HF_FIXED[family], M.HF_IGNORED[family] | M.HF_IGNORED["all"]
    assert fields <= M.HF_READ[family] | set(fixed) | ignored, \
        sorted(fields - M.HF_READ[family] - set(fixed) - ignored)
    base = {**TINY["gpt2" if family == "gpt2" else "llama"],
            "vocab_size": 64, "model_type": family}
    if family == "qwen2":
        base["sliding_window"] = 8
    for field, allowed in fixed.items():
        other = "gelu" if isinstance(allowed, tuple) else not allowed
        with pytest.raises(ValueError, match=f"config.json: {field}=.* is not supported"):
            M.config_from_hf({**base, field: other})
    torch.manual_seed(0)
    reference = model_cls(cfg_cls(**base)).eval()
    ids = torch.tensor([[5, 9, 2, 7, 1, 3, 11, 4, 8, 6]])
    want = reference(ids).logits
    for field in sorted(ignored & fields & set(CHANGED)):
        changed = model_cls(cfg_cls(**{**base, field: CHANGED[field]})).eval()
        changed.load_state_dict(reference.state_dict())
        got = changed(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=field)


@pytest.mark.parametrize("config, match", [
    ([], r"holds \[\], not a JSON object"), (None, "holds null, not a JSON object"),
    ({"model_type": "llama"}, "config.json: no 'num_hidden_layers'"),
    ({"model_type": "gpt2", "n_layer": 2}, "config.json: no 'n_embd'"),
    ("drop intermediate_size", "config.json: no 'intermediate_size'"),
    ("null n_embd", "n_embd must be a positive integer, got None"),
    ("null heads", "config.json: a value of the wrong type"),
    ("longrope", "unsupported rope scaling type 'longrope'"),
    ("partial rotary", "partial_rotary_factor other than 1 is not supported")])
def test_malformed_configs_are_one_line(tmp_path, config, match):
    make_checkpoint(tmp_path, "gpt2" if config == "null n_embd" else "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    if config == "drop intermediate_size":
        config = {k: v for k, v in cfg.items() if k != "intermediate_size"}
    elif config == "null n_embd":
        config = {**cfg, "n_embd": None}
    elif config == "null heads":
        config = {**cfg, "num_attention_heads": None, "head_dim": None}
    elif config in ("longrope", "partial rotary"):
        rope = {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]} \
            if config == "longrope" else {"rope_type": "default", "partial_rotary_factor": 0.5}
        config = {**cfg, "rope_parameters": {**rope, "rope_theta": 10000.0}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        M.load(tmp_path)


# ------------------------------------------------------------------------------------------
# the real model: SmolLM2-135M-Instruct (GGUF, Q4_1 + Q8_0)

@pytest.fixture(scope="module")
def smollm2(smollm2_llm):
    return smollm2_llm.model, smollm2_llm.tokenizer


@pytest.fixture(scope="module")
def smollm2_hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    p = smollm2_path()
    hf = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
    return hf.eval(), AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)


@needs_smollm2
def test_smollm2_tokenizer_matches_transformers(smollm2, smollm2_hf):
    _, ours = smollm2
    _, theirs = smollm2_hf
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == text


@needs_smollm2
def test_smollm2_logits_match_transformers(smollm2, smollm2_hf):
    (model, tok), (hf, _) = smollm2, smollm2_hf
    for text in ["Once upon a time, there was a little", "The capital of France is",
                 "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]:
        ids = tok.encode(text)
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0]
        got = our_logits(model, ids, paged=True, block_size=16)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-3)
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_stream_decoder_never_emits_half_a_character(smollm2):
    _, tok = smollm2
    text = "emoji 🎉🎉 and 日本語 and naïve"
    ids = tok.encode(text)
    s = tok.stream()
    pieces = [s.feed(i) for i in ids] + [s.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces)  # some token did end mid-character, and was held


def test_chat_template_is_chatml_with_default_system(smollm2):
    _, tok = smollm2
    text = M.apply_chat_template(tok, [{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                    "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert tok.encode(text)[0] == tok.special["<|im_start|>"]
