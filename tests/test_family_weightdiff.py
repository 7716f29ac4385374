"""The weight diff on every checkpoint layout: changes planted in one head's / one neuron's slice of the
stored tensors (written here from each family's storage layout, independently of
`verif.model.families`) are found exactly at that head's / neuron's rows, and nowhere else.

Layouts: separate q/k/v/o and gate/up/down with biases (Llama with attention and MLP biases), extra
norms (Qwen3, OLMo 2, Gemma 2), Phi-3's fused `qkv_proj` (rows q | k | v) and `gate_up_proj` (gate |
up), GPT-NeoX's `query_key_value` interleaved per head (q_h | k_h | v_h) and `attention.dense`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from safetensors.torch import load_file, save_file

from tests.support.families import HEAD_DIM as HD
from tests.support.families import INTER, N_HEADS, N_KV, family_dir
from verif.analysis.weightdiff import diff_checkpoints, diff_head_rows, plan_diff, summarise_rows

NUDGE = 1e-3
# (layer, component, index) planted in every family; head 3 reads kv head 1 under 2-way grouping.
HEADS_AND_NEURONS = {(1, "q_proj", 3), (2, "k_proj", 1), (0, "v_proj", 0), (3, "o_proj", 2), (1, "mlp_value", 17),
                     (2, "mlp_up", 5)}  # fmt: skip


def llama_slices(layer: int, component: str, i: int) -> tuple[str, tuple]:
    """(tensor name, index) of one element inside the slice of (component, i), separate projections."""
    p = f"model.layers.{layer}."
    return {
        "q_proj": (p + "self_attn.q_proj.weight", (i * HD + 1, 0)),
        "k_proj": (p + "self_attn.k_proj.weight", (i * HD + HD - 1, 3)),
        "v_proj": (p + "self_attn.v_proj.weight", (i * HD, 2)),
        "o_proj": (p + "self_attn.o_proj.weight", (5, i * HD + 2)),
        "mlp_value": (p + "mlp.down_proj.weight", (7, i)),
        "mlp_up": (p + "mlp.up_proj.weight", (i, 4)),
        "mlp_gate": (p + "mlp.gate_proj.weight", (i, 1)),
        "k_bias": (p + "self_attn.k_proj.bias", (i * HD + 3,)),
        "mlp_up_bias": (p + "mlp.up_proj.bias", (i,)),
    }[component]


def phi3_slices(layer: int, component: str, i: int) -> tuple[str, tuple]:
    p = f"model.layers.{layer}."
    return {
        "q_proj": (p + "self_attn.qkv_proj.weight", (i * HD + 1, 0)),
        "k_proj": (p + "self_attn.qkv_proj.weight", ((N_HEADS + i) * HD + HD - 1, 3)),
        "v_proj": (p + "self_attn.qkv_proj.weight", ((N_HEADS + N_KV + i) * HD, 2)),
        "o_proj": (p + "self_attn.o_proj.weight", (5, i * HD + 2)),
        "mlp_value": (p + "mlp.down_proj.weight", (7, i)),
        "mlp_gate": (p + "mlp.gate_up_proj.weight", (i, 1)),
        "mlp_up": (p + "mlp.gate_up_proj.weight", (INTER + i, 4)),
    }[component]


def neox_slices(layer: int, component: str, i: int) -> tuple[str, tuple]:
    p = f"gpt_neox.layers.{layer}."
    part = {"q": 0, "k": 1, "v": 2}
    if component in ("q_proj", "k_proj", "v_proj"):
        return p + "attention.query_key_value.weight", ((3 * i + part[component[0]]) * HD + 1, 2)
    if component in ("q_bias", "k_bias", "v_bias"):
        return p + "attention.query_key_value.bias", ((3 * i + part[component[0]]) * HD + 4,)
    return {
        "o_proj": (p + "attention.dense.weight", (5, i * HD + 2)),
        "mlp_value": (p + "mlp.dense_4h_to_h.weight", (7, i)),
        "mlp_up": (p + "mlp.dense_h_to_4h.weight", (i, 4)),
        "mlp_up_bias": (p + "mlp.dense_h_to_4h.bias", (i,)),
    }[component]


CASES = {
    "llama-biases": ("llama", (("attention_bias", True), ("mlp_bias", True)), llama_slices,
                     HEADS_AND_NEURONS | {(3, "mlp_gate", 60), (2, "k_bias", 0), (0, "mlp_up_bias", 9)}),
    "qwen3": ("qwen3", (), llama_slices, HEADS_AND_NEURONS | {(0, "mlp_gate", 1)}),
    "olmo2": ("olmo2", (), llama_slices, HEADS_AND_NEURONS),
    "gemma2": ("gemma2", (), llama_slices, HEADS_AND_NEURONS),
    "phi3": ("phi3", (), phi3_slices, HEADS_AND_NEURONS | {(3, "mlp_gate", 60)}),
    # GPT-NeoX has no grouping: kv head i is query head i
    "gpt_neox": ("gpt_neox", (), neox_slices, HEADS_AND_NEURONS | {(3, "q_bias", 2), (1, "v_bias", 3), (0, "mlp_up_bias", 9)}),
}


def _plant(base: Path, out: Path, slices, planted) -> Path:
    out.mkdir()
    shutil.copy(base / "config.json", out / "config.json")
    tensors = load_file(base / "model.safetensors")
    for layer, component, i in planted:
        name, idx = slices(layer, component, i)
        tensors[name] = tensors[name].clone()
        tensors[name][idx] += NUDGE
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_planted_changes_found_at_their_heads_and_neurons(case, tmp_path):
    family, overrides, slices, planted = CASES[case]
    base = family_dir(family, overrides)
    tuned = _plant(base, tmp_path / "tuned", slices, planted)
    table = diff_checkpoints(plan_diff(str(base), str(tuned)))
    changed = table.filter(pl.col("max_abs_diff") > 0)
    assert set(zip(changed["layer"], changed["component"], changed["index"], strict=True)) == planted
    assert all(abs(d - NUDGE) < 1e-6 for d in changed["max_abs_diff"])  # float32 storage of x + 1e-3
    # every head and neuron has its rows: 4 query heads, kv heads, 64 neurons per layer
    kv = N_HEADS if family == "gpt_neox" else N_KV
    per_layer = table.filter(layer=1).group_by("component").len()
    counts = dict(zip(per_layer["component"], per_layer["len"], strict=True))
    assert counts["q_proj"] == counts["o_proj"] == N_HEADS and counts["k_proj"] == counts["v_proj"] == kv
    assert counts["mlp_value"] == counts["mlp_up"] == INTER
    shared = table.filter(layer=2, component="k_proj", index=1)["shared_by"].to_list()[0]
    assert shared == ([1] if family == "gpt_neox" else [2, 3])


def test_fused_layout_checked_against_the_config(tmp_path):
    """A Phi-3 checkpoint whose fused qkv_proj does not have the rows its config implies is refused."""
    base = family_dir("phi3")
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((base / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "num_key_value_heads": N_HEADS}))
    shutil.copy(base / "model.safetensors", bad / "model.safetensors")
    with pytest.raises(ValueError, match="architectures differ"):
        plan_diff(str(base), str(bad))
    with pytest.raises(ValueError, match=r"qkv_proj.weight is \[64, 32\], config.json implies \[96, 32\]"):
        plan_diff(str(bad), str(bad))


def _expected_rows(family: str, slices, planted) -> set[tuple[int, int, str, int]]:
    """(layer, query head, matrix, row) of every planted attention weight element: the row inside the
    head's slice (q/k/v: its row, o_proj: its column), repeated for each query head a kv head serves."""
    group = 1 if family == "gpt_neox" else N_HEADS // N_KV
    rows = set()
    for layer, component, i in planted:
        if component not in ("q_proj", "k_proj", "v_proj", "o_proj"):
            continue
        _, idx = slices(layer, component, i)
        r = (idx[1] if component == "o_proj" else idx[0]) % HD
        heads = [i] if component in ("q_proj", "o_proj") else range(i * group, (i + 1) * group)
        rows |= {(layer, h, component, r) for h in heads}
    return rows


@pytest.mark.parametrize("case", ["llama-biases", "phi3", "gpt_neox"])
def test_row_view_finds_planted_rows_and_matches_numpy(case, tmp_path):
    """The study's per-row view: planted elements found at exactly their (head, matrix, row), k/v rows
    repeated to the query heads they serve, and each row's cosine equal to numpy's on the raw rows."""
    family, overrides, slices, planted = CASES[case]
    base = family_dir(family, overrides)
    tuned = _plant(base, tmp_path / "tuned", slices, planted)
    rows = diff_head_rows(plan_diff(str(base), str(tuned)), None)
    kv = N_HEADS if family == "gpt_neox" else N_KV
    # every query head has head_dim rows of each of the four matrices in every layer
    assert rows.height == 4 * N_HEADS * 4 * HD and rows.select("layer", "head", "matrix", "row").is_unique().all()
    changed = rows.filter(pl.col("max_abs_diff") > 0)
    assert set(changed.select("layer", "head", "matrix", "row").iter_rows()) == _expected_rows(family, slices, planted)
    # an independent float64 computation on one changed and one unchanged row of each matrix
    a, b = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    for layer, component, i in sorted(planted):
        if component not in ("q_proj", "k_proj", "v_proj", "o_proj"):
            continue
        name, idx = slices(layer, component, i)
        r = idx[1] if component == "o_proj" else idx[0]
        for rr in (r, r - 1 if r % HD else r + 1):
            u, v = (t[name].double().numpy() for t in (a, b))
            u, v = (u[:, rr], v[:, rr]) if component == "o_proj" else (u[rr], v[rr])
            cos = float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
            head = i * (1 if family == "gpt_neox" or component in ("q_proj", "o_proj") else N_HEADS // kv)
            got = rows.filter(layer=layer, head=head, matrix=component, row=rr % HD)
            # 32-element float64 dot products: differences in summation order stay below 1e-14
            assert got["cos"].item() == pytest.approx(cos, abs=1e-14)
            assert got["max_abs_diff"].item() == float(np.abs(v - u).max())


def test_row_view_of_selected_heads_only(tmp_path):
    family, overrides, slices, planted = CASES["llama-biases"]
    base = family_dir(family, overrides)
    tuned = _plant(base, tmp_path / "tuned", slices, planted)
    plan = plan_diff(str(base), str(tuned))
    rows = diff_head_rows(plan, [(2, 3), (3, 2)])
    assert set(rows.select("layer", "head").unique().iter_rows()) == {(2, 3), (3, 2)}
    assert rows.height == 2 * 4 * HD
    changed = rows.filter(pl.col("max_abs_diff") > 0)
    assert set(changed.select("layer", "head", "matrix").iter_rows()) == {(2, 3, "k_proj"), (3, 2, "o_proj")}
    summary = summarise_rows(rows)
    assert summary.height == 2 * 4 and (summary["n_rows"] == HD).all()
    assert summary.filter(layer=2, head=3, matrix="k_proj")["max_one_minus_cos"].item() > 0
    assert summary.filter(matrix="q_proj")["max_one_minus_cos"].to_list() == [0.0, 0.0]
