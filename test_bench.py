"""
bench.py runs end to end on a tiny checkpoint: every table row is printed, the ratios are
computed from the same run, and the plot is written.
"""
import bench
from conftest import make_checkpoint


def test_bench_all_runs_on_a_tiny_model(tmp_path, capsys):
    make_checkpoint(tmp_path / "m", "llama")
    png = tmp_path / "plot.png"
    assert bench.main(["all", "--model", str(tmp_path / "m"), "--repeat", "1", "--new", "4",
                       "--prefill", "8", "--lengths", "8", "16", "--plot", str(png),
                       "--prefix", "40", "--requests", "6", "--in-min", "2", "--in-max", "20", "--out-min", "2",
                       "--out-max", "8",
                       "--budget-mib", "16", "--spec-context", "16"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| ")]
    for dtype in ("bf16", "fp32"):
        for name in ("this engine", "transformers", "floor", "engine / transformers",
                     "engine / floor"):
            assert any(r.startswith(f"| {dtype} | ") and name in r for r in rows), (dtype, name)
    assert any(r.startswith("| 16 | ") and r.endswith("x |") for r in rows)
    assert any(r.startswith("| alone, warm caches | ") for r in rows)
    assert any(r.startswith("| cached / cold | ") for r in rows)
    assert any(r.startswith("| this engine (continuous batching) | ") for r in rows)
    on = next(r for r in rows if r.startswith("| on (one system prompt) | "))
    off = next(r for r in rows if r.startswith("| off (every prompt unique) | "))
    assert int(on.split("|")[2]) > int(off.split("|")[2])  # sharing fits more sequences
    for prompt in ("repetitive", "code-like", "free text"):  # speculative: speedup, same run
        assert any(r.startswith(f"| {prompt} | 8 | ") and r.endswith((" yes |", " no |"))
                   for r in rows), prompt
    assert any(r.startswith("| 4 | ") and r.endswith("x |") for r in rows)  # verification cost
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
