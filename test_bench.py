"""
bench.py runs end to end on a tiny checkpoint: every table row is printed, the ratios are
computed from the same run, and the plot is written.
"""
import torch

import bench
from conftest import make_checkpoint
from test_kernels import needs_triton


def test_bench_all_runs_on_a_tiny_model(tmp_path, capsys):
    make_checkpoint(tmp_path / "m", "llama")
    png = tmp_path / "plot.png"
    assert bench.main(["all", "--model", str(tmp_path / "m"), "--repeat", "1", "--new", "4",
                       "--prefill", "8", "--lengths", "8", "16", "--plot", str(png),
                       "--prefix", "40", "--requests", "6", "--in-min", "2", "--in-max", "20", "--out-min", "2",
                       "--out-max", "8",
                       "--budget-mib", "16", "--agree-new", "4", "--ppl-tokens", "60",
                       "--spec-context", "16", "--long-context", "2048", "--window", "256"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| ")]
    for dtype in ("bf16", "fp32"):  # the compiled engine, the peer and the floors, same run
        for name in ("this engine, eager decode", "this engine, compiled decode",
                     "transformers", "floor: weight matvecs alone", "eager / transformers",
                     "compiled / transformers", "compiled / best floor"):
            assert any(r.startswith(f"| {dtype} | ") and name in r for r in rows), (dtype, name)
    packs = bench.model_mod.can_pack(torch.zeros(1, dtype=torch.bfloat16))
    assert any(r.startswith("| bf16 | floor: the same, packed weights | ") for r in rows) == packs
    assert any(r.startswith("| 16 | ") and r.endswith("x |") for r in rows)
    assert any(r.startswith("| alone, warm caches | ") for r in rows)
    assert any(r.startswith("| cached / cold | ") for r in rows)
    for path in ("eager", "compiled"):
        assert any(r.startswith(f"| this engine (continuous batching), {path} decode | ")
                   for r in rows)
        assert any(r.startswith(f"| ratio {path} / transformers | ") for r in rows)
    on = next(r for r in rows if r.startswith("| on (one system prompt) | "))
    off = next(r for r in rows if r.startswith("| off (every prompt unique) | "))
    assert int(on.split("|")[2]) > int(off.split("|")[2])  # sharing fits more sequences
    for prompt in ("repetitive", "code-like", "free text"):  # speculative: speedup, same run
        assert any(r.startswith(f"| {prompt} | 8 | ") and r.endswith((" yes |", " no |"))
                   for r in rows), prompt
    assert any(r.startswith("| 4 | ") and r.endswith("x |") for r in rows)  # verification cost
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # invariant mode: its cost, and the ladder's counts, every comparison all same in mode on
    assert any(r.startswith("| batch-1 decode, 4 new | ") and r.endswith("x |") for r in rows)
    ladder = [r for r in rows if "==" in r.split(" | ")[0]]
    assert len(ladder) == 3 and all(r.split(" | ")[2].split("/")[0] ==
                                    r.split(" | ")[2].split("/")[1].rstrip(" |") for r in ladder)
    # memory: every architecture x every kv dtype; int8 halves fp16 but for the scales
    mem = {(r.split(" | ")[0][2:], r.split(" | ")[2]): int(r.split(" | ")[3].replace(",", ""))
           for r in rows if r.split(" | ")[2:3] and r.split(" | ")[2] in bench.KV_STORAGE}
    assert mem["Llama-3-8B (GQA)", "int8"] == 2 * 32 * 8 * (128 + 4)
    assert mem["Llama-3-8B, as many KV heads as query heads", "fp16"] == \
        4 * mem["Llama-3-8B (GQA)", "fp16"]
    # a sliding window: releasing blocks bounds a long generation by the window
    peak = {r.split(" | ")[0][2:]: int(r.split(" | ")[1].replace(",", "")) for r in rows
            if r.split(" | ")[0][2:] in ("on", "off")}
    assert peak == {"off": 2048 // 16, "on": 256 // 16 + 1}
    # accuracy: the fp32 row is the baseline, the quantized rows report their difference
    acc = {r.split(" | ")[0][2:]: r for r in rows if r.split(" | ")[0][2:] in ("fp32", "int8", "fp8")}
    assert "+0.00%" in acc["fp32"] and " | 0.000 | 0.0000 | " in acc["fp32"] and len(acc) == 3


@needs_triton
def test_bench_kernels_runs(capsys):
    """The GPU section end to end: compiled on a GPU; on a CPU a dry run in Triton's
    interpreter on tiny sizes (conftest.py sets TRITON_INTERPRET=1)."""
    sizes = [] if torch.cuda.is_available() else [
        "--kernel-batches", "2x20", "--kernel-prefill", "24", "--copy-mib", "1",
        "--kernel-linear", "1", "3", "--kernel-linear-shapes", "smollm2-qkv"]
    assert bench.main(["kernels", *sizes]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    for shape in bench.KERNEL_SHAPES:
        assert any(r.startswith(f"| {shape} | ") and r.endswith("x |") for r in rows), shape
    n_prefill = 1 if sizes else 3  # the default: 1k, 4k and 16k tokens
    assert sum(r.startswith("| causal, batch 1 | ") for r in rows) == 2 * n_prefill
    linear = [r for r in rows if r.split(" | ")[0][2:] in bench.LINEAR_SHAPES]
    assert len(linear) == (2 if sizes else 4 * len(bench.LINEAR_SHAPES))
    assert all(r.split(" | ")[-2] in ("-", "same") for r in linear)  # the invariant product


def test_bench_load_times_cold_processes(tiny_dir, capsys):
    """The load section: each loader in its own cold process, interleaved, one row each, the
    ratio to this engine's load in the same run."""
    assert bench.main(["load", "--model", str(tiny_dir("gpt2")), "--repeat", "1"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    ours = next(r for r in rows if r.startswith("| safetensors dir | this engine | "))
    theirs = next(r for r in rows if r.startswith("| safetensors dir | transformers | "))
    compiled = next(r for r in rows if r.startswith(f"| safetensors dir | {bench.COMPILED_LOADER} | "))
    assert ours.endswith(" | 1.00x |") and theirs.endswith("x |") and compiled.endswith("x |")
    imports, loaded, first = (float(c) for c in ours.split(" | ")[2:5])
    assert 0 < imports <= loaded <= first  # (two decimals: a tiny model loads at once)


def test_bench_prompt_cache_times_fresh_processes(tiny_dir, capsys):
    """The prompt-cache section: a cold and a warm run per round, each a fresh process; the
    warm one reads the system prompt's blocks from disk."""
    assert bench.main(["prompt-cache", "--model", str(tiny_dir("llama")), "--repeat", "1",
                       "--system-tokens", "40"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| ")]
    cold = next(r for r in rows if r.startswith("| cold (empty directory) | "))
    warm = next(r for r in rows if r.startswith("| warm (filled by an earlier process) | "))
    assert cold.split(" | ")[2].startswith("0 of ") and not warm.split(" | ")[2].startswith("0 ")
    assert any(r.startswith("| warm / cold | ") for r in rows) and "bytes per token" in out


def test_bench_tp_compares_every_degree_with_one_process(tiny_dir, capsys):
    """The tp section: every degree the model splits into, the same tokens and logits within
    float32 rounding of one process, each rank's KV bytes the formula divided by the degree."""
    path = tiny_dir("llama", num_attention_heads=8, num_key_value_heads=4)
    assert bench.main(["tp", "--model", str(path), "--repeat", "1", "--new", "8", "--prefix",
                       "40", "--requests", "4", "--prefill", "16"]) == 0
    rows = [ln.split(" | ") for ln in capsys.readouterr().out.splitlines()
            if ln.startswith("| ")]
    same = {r[0][2:]: r for r in rows if len(r) == 6 and r[0][2:].isdigit()}
    assert sorted(same) == ["1", "2", "4"]
    for n, r in same.items():
        assert r[1] == str(4 // int(n)) and float(r[2].split()[0]) < 1e-5
        assert r[2].split()[1] == "(logits" and r[3].startswith("4/4 ")
        assert int(r[4]) > 0 and r[5].rstrip(" |") == same["1"][5].rstrip(" |") != "0"
    per_rank = {r[0][2:]: r for r in rows if len(r) == 5 and r[0][2:].isdigit()}
    for n, r in per_rank.items():
        assert r[1] == r[2] == f"{2 * 2 * 4 * 6 * 4 // int(n):,}"  # 2 L K D 4 bytes / n


@needs_triton
def test_dev_gpu_check_runs_its_steps_on_a_cpu(tmp_path):
    """`./dev gpu-check OUT --dry-run`: the steps a lent GPU machine would run (tests, then
    bench.py kernels), each with its log and a summary line; without --dry-run on a machine
    with no GPU, one line and exit 2."""
    import subprocess
    import sys
    from pathlib import Path
    here = Path(__file__).parent
    env = {**__import__("os").environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(here / "dev"), "gpu-check", str(tmp_path), "--dry-run"],
                          cwd=here, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [ln.split(":")[0] for ln in summary] == ["tests", "kernels", "serving"]
    assert all(": exit 0 in " in ln for ln in summary) and " passed" in summary[0]
    assert "| smollm2 | 2x20 | " in (tmp_path / "kernels.txt").read_text()
    serving = (tmp_path / "serving.txt").read_text()
    for measure in ("batch-1 decode tok/s", "batch-1 decode, % of copy bandwidth",
                    "throughput, output tok/s", "TTFT, cached system prompt / cold",
                    "invariant mode: batch-1 decode tok/s", "invariant mode: throughput, "
                    "output tok/s"):
        assert f"| tiny | {measure} | " in serving, measure
    assert "torch" in (tmp_path / "env.txt").read_text()
    if not torch.cuda.is_available():
        bare = subprocess.run(["bash", str(here / "dev"), "gpu-check", str(tmp_path / "x")],
                              cwd=here, env=env, capture_output=True, text=True, timeout=120)
        assert bare.returncode == 2 and bare.stderr.strip() == (
            "dev: gpu-check needs a CUDA GPU (--dry-run runs its steps on a CPU)")
