"""The weight-diff job: exact zeros for identical models, planted changes found exactly where planted and
equal to an independent float64 / high-precision computation, sharded == unsharded, Ray == serial, every
refusal before work starts, and memory that does not grow with the number of layers.

The planted model is a float32 copy of the seed-shaped model (36 layers x 16 heads, head_dim 8) with a
few head slices, value vectors and one embedding entry nudged by relative amounts around 1e-7.
"""

from __future__ import annotations

import json
import math
import os
import runpy
import shutil
import sys
from decimal import Decimal, localcontext
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from polars.testing import assert_frame_equal
from safetensors.torch import load_file, save_file

from jobs.weight_diff import run_weight_diff
from tests.support.models import seed_shaped_config
from tests.tolerances import U64, gamma, reorder_rel
from verif.analysis.weightdiff import BF16_COS_ONE, MLP_COMPONENTS, diff_checkpoints, plan_diff, select_rows, summarise

REPO = Path(__file__).resolve().parents[1]
HD = 8  # head_dim of the seed-shaped model
EMBED = "model.embed_tokens.weight"

# (layer, component, index) of every planted change in the float32 copy.
PLANTED = {
    (3, "q_proj", 13),
    (17, "o_proj", 9),
    (5, "v_proj", 1),
    (2, "q_bias", 4),  # the base bias is zero: cosine undefined, reported as null
    (10, "mlp_value", 7),
    (21, "mlp_up", 100),
    (21, "mlp_gate", 100),
    (30, "mlp_value", 5),  # pure scaling by 1 + 1e-6: norm changes, direction (almost) not
    (None, EMBED, None),
}
# The bf16 copy: one element of each bumped by one bf16 step (about 0.4% of that element).
PLANTED_BF16 = {(3, "q_proj", 13), (10, "mlp_value", 7)}


def _layer(i: int, name: str) -> str:
    return f"model.layers.{i}.{name}"


def _write(folder: Path, tensors: dict[str, torch.Tensor], config_from: Path, **config_edits) -> Path:
    """A model folder: one safetensors file plus the config of `config_from`, optionally edited."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((config_from / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_edits}))
    return folder


def _nudge(t: torch.Tensor, rel: float, gen: torch.Generator) -> torch.Tensor:
    return t + rel * t.abs().mean() * torch.randn(t.shape, generator=gen)


def _bump_bf16(t: torch.Tensor, *where) -> None:
    """Move one bf16 element to the next representable value away from zero, in place."""
    t.view(torch.int16)[where] += 1


def _tiny(folder: Path, n_layers: int = 2, n_heads: int = 16, tie: bool = True) -> Path:
    """A seed-shaped checkpoint with a 64-token vocabulary: fast to write, for the error paths."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    config = seed_shaped_config(n_layers=n_layers, n_heads=n_heads)
    config.vocab_size, config.tie_word_embeddings = 64, tie
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def seed_state(sweep_model_dir) -> dict[str, torch.Tensor]:
    return load_file(Path(sweep_model_dir) / "model.safetensors")


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory, sweep_model_dir, seed_state) -> Path:
    gen = torch.Generator().manual_seed(1)
    st = {k: v.clone() for k, v in seed_state.items()}
    q = st[_layer(3, "self_attn.q_proj.weight")]
    q[13 * HD : 14 * HD] = _nudge(q[13 * HD : 14 * HD], 1e-7, gen)
    o = st[_layer(17, "self_attn.o_proj.weight")]
    o[:, 9 * HD : 10 * HD] = _nudge(o[:, 9 * HD : 10 * HD], 1e-7, gen)
    v = st[_layer(5, "self_attn.v_proj.weight")]
    v[1 * HD : 2 * HD] = _nudge(v[1 * HD : 2 * HD], 1e-7, gen)
    st[_layer(2, "self_attn.q_proj.bias")][4 * HD : 5 * HD] = 1e-3 * torch.randn(HD, generator=gen)
    down = st[_layer(10, "mlp.down_proj.weight")]
    down[:, 7] = _nudge(down[:, 7], 1e-7, gen)
    for name in ("mlp.up_proj.weight", "mlp.gate_proj.weight"):
        w = st[_layer(21, name)]
        w[100] = _nudge(w[100], 1e-7, gen)
    st[_layer(30, "mlp.down_proj.weight")][:, 5] *= 1 + 1e-6
    st[EMBED][7414, 0] += 1e-3  # " Yes"
    return _write(tmp_path_factory.mktemp("planted"), st, Path(sweep_model_dir))


@pytest.fixture(scope="module")
def bf16_pair(tmp_path_factory, sweep_model_dir, seed_state) -> tuple[Path, Path]:
    base = {k: v.to(torch.bfloat16) for k, v in seed_state.items()}
    tuned = {k: v.clone() for k, v in base.items()}
    _bump_bf16(tuned[_layer(3, "self_attn.q_proj.weight")], 13 * HD, 0)
    _bump_bf16(tuned[_layer(10, "mlp.down_proj.weight")], 3, 7)
    root = tmp_path_factory.mktemp("bf16")
    return _write(root / "base", base, Path(sweep_model_dir)), _write(root / "tuned", tuned, Path(sweep_model_dir))


@pytest.fixture(scope="module")
def planted_table(sweep_model_dir, planted_dir) -> pl.DataFrame:
    return diff_checkpoints(plan_diff(str(sweep_model_dir), str(planted_dir)))


def _key(row: dict) -> tuple:
    return row["layer"], row["component"], row["index"]


def _changed(table: pl.DataFrame) -> set[tuple]:
    return {_key(r) for r in table.filter(pl.col("max_abs_diff") > 0).iter_rows(named=True)}


def _vector(state: dict[str, torch.Tensor], layer: int | None, component: str, index: int | None) -> np.ndarray:
    """The vector a row describes, cut out independently of the code under test, as float64."""
    if layer is None:
        return state[component].double().numpy().ravel()
    s = slice(index * HD, (index + 1) * HD)
    cut = {
        "q_proj": lambda: state[_layer(layer, "self_attn.q_proj.weight")][s],
        "q_bias": lambda: state[_layer(layer, "self_attn.q_proj.bias")][s],
        "v_proj": lambda: state[_layer(layer, "self_attn.v_proj.weight")][s],
        "o_proj": lambda: state[_layer(layer, "self_attn.o_proj.weight")][:, s],
        "mlp_value": lambda: state[_layer(layer, "mlp.down_proj.weight")][:, index],
        "mlp_up": lambda: state[_layer(layer, "mlp.up_proj.weight")][index],
        "mlp_gate": lambda: state[_layer(layer, "mlp.gate_proj.weight")][index],
    }[component]
    return cut().double().numpy().ravel()


def _reference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Norms, 1 - cos and |b| - |a| to ~1e-16 relative, computed apart from the code under test.

    |a|^2: squares of float32/bf16 values are exact in float64 and `math.fsum` rounds their exact sum once.
    Everything else follows exactly, in 60-digit decimals (every float64 is an exact decimal), from |a|^2 and
    the entries where a and b differ: |b|^2 = |a|^2 + sum(b^2 - a^2), a.b = |a|^2 + sum(a (b - a)). So even
    the 19M-element embedding with one changed entry costs a single fsum.
    """
    changed = np.flatnonzero(a != b)
    with localcontext() as ctx:
        ctx.prec = 60
        aa = Decimal(math.fsum((a * a).tolist()))
        da, db = [Decimal(float(x)) for x in a[changed]], [Decimal(float(x)) for x in b[changed]]
        bb = aa + sum(y * y - x * x for x, y in zip(da, db, strict=True))
        ab = aa + sum(x * (y - x) for x, y in zip(da, db, strict=True))
        na, nb = aa.sqrt(), bb.sqrt()
        omc = 1 - ab / (na * nb)
        return {"norm_base": float(na), "norm_tuned": float(nb), "one_minus_cos": float(omc), "cos": float(1 - omc),
                "norm_change": float(nb - na), "rel_norm_change": float((nb - na) / na)}  # fmt: skip


def _check_against_reference(row: dict, a: np.ndarray, b: np.ndarray) -> None:
    """The row against `_reference`, within bounds derived from how the product computes it (float64).

    Norms: a sum of n squares in the order of the product's chunks and BLAS kernel: reorder_rel(n) (the
    19M-element embedding: 9.8e-13, where a norm off by 1e-9 must fail), halved by the square root.
    The change: norm_change = (2 d.a + |d|^2) / (|a| + |b|) and 2|a||b|(1 - cos) = |d|^2 - norm_change^2 with
    d = b - a: sums over the k changed entries (zeros add exactly) are off by gamma(k) times their sum of
    |terms|, amplified by the cancellation in them, which the bounds below compute from the vectors.
    """
    ref = _reference(a, b)
    n, k = a.size, int(np.count_nonzero(a != b))
    d = b - a  # exact: float32/bf16 values close together
    na, nb = ref["norm_base"], ref["norm_tuned"]
    norm_rel = reorder_rel(n) / 2 + 2 * U64
    assert row["norm_base"] == pytest.approx(na, rel=norm_rel, abs=0)
    assert row["norm_tuned"] == pytest.approx(nb, rel=norm_rel, abs=0)
    assert row["max_abs_diff"] == np.abs(d).max()  # float32/bf16 differences are exact in float64
    dd, da_abs, change = float(d @ d), float(np.abs(d * a).sum()), ref["norm_change"]
    ds = 2 * (d @ a) + dd
    change_rel = gamma(k + 1, U64) * (2 * da_abs + dd) / abs(ds) + 2 * norm_rel + 2 * U64
    assert math.isclose(row["norm_change"], change, rel_tol=change_rel, abs_tol=0)
    assert math.isclose(row["rel_norm_change"], ref["rel_norm_change"], rel_tol=change_rel + norm_rel + U64, abs_tol=0)
    omc_abs = (gamma(k + 1, U64) * dd + 2 * change * change * change_rel) / (2 * na * nb)
    omc = ref["one_minus_cos"]
    assert abs(row["one_minus_cos"] - omc) <= omc_abs + (2 * norm_rel + 4 * U64) * omc
    assert abs(row["cos"] - ref["cos"]) <= U64  # 1 - (1 - cos) rounds to one of two floats next to 1


# ----------------------------------------------------------------------------------------------------------


def test_identical_checkpoints_give_exact_zeros(sweep_model_dir, study_heads, tmp_path):
    result = run_weight_diff(str(sweep_model_dir), str(sweep_model_dir), tmp_path / "out",
                             target_heads=study_heads, value_vectors=[(10, 7), (30, 5)], top_k=5)  # fmt: skip
    t = result.table
    assert (t["cos"] == 1.0).all() and t["cos"].null_count() == 0
    for col in ("one_minus_cos", "norm_change", "rel_norm_change", "max_abs_diff"):
        assert (t[col] == 0.0).all(), col
    # 36 layers x (16 q + 16 q bias + 16 o + 2 x 4 k/v rows and biases + 3 x 256 neuron rows + 2 norms)
    # + embeddings + final norm; tied, so no lm_head row.
    assert t.height == 36 * (16 * 3 + 2 * 4 + 3 * 256 + 2) + 2
    assert "lm_head.weight" not in set(t["component"])
    kv = t.filter(layer=5, component="k_proj")
    assert kv["shared_by"].to_list() == [list(range(8)), list(range(8, 16))]
    sel = result.selection.filter(selection="target_heads").row(0, named=True)
    # 29 heads: q, q bias, o each; their k/v rows (and biases) counted once per (layer, kv head).
    assert sel["n_items"] == 29 and sel["max_one_minus_cos"] == 0.0 and sel["cos_is_1_in_bf16"]
    assert set(result.selection["selection"]) >= {"target_heads", "value_vectors", "top_5_value_vectors", "all"}
    assert result.verdicts[0].startswith("target_heads (29 items, 0/")
    for path in result.files.values():
        assert path.is_file()
    assert_frame_equal(pl.read_parquet(result.files["table"]), t)
    summary = json.loads(result.files["summary"].read_text())
    assert summary["base"]["dtypes"] == ["F32"] and summary["verdicts"] == list(result.verdicts)


def test_planted_changes_found_exactly_and_match_reference(planted_table, seed_state, planted_dir):
    t = planted_table
    assert _changed(t) == PLANTED
    rest = t.filter(pl.col("max_abs_diff") == 0)
    assert (rest["cos"] == 1.0).all() and (rest["one_minus_cos"] == 0.0).all() and (rest["norm_change"] == 0.0).all()
    tuned = load_file(planted_dir / "model.safetensors")
    for key in PLANTED - {(2, "q_bias", 4)}:
        row = t.filter(pl.col("component") == key[1], pl.col("layer").eq_missing(key[0]),
                       pl.col("index").eq_missing(key[2])).row(0, named=True)  # fmt: skip
        a, b = _vector(seed_state, *key), _vector(tuned, *key)
        _check_against_reference(row, a, b)
        # Relative nudges of ~1e-7 turn a vector by ~1e-7 rad: 1 - cos ~ 5e-15, invisible in float32 and bf16.
        assert 0 < row["one_minus_cos"] < 1e-10
    scaled = t.filter(layer=30, component="mlp_value", index=5).row(0, named=True)
    # x (1 + 1e-6) stored in float32 is off by <= 2^-24 = 6e-8 relative per element: 1e-6 +- 6%.
    assert scaled["rel_norm_change"] == pytest.approx(1e-6, rel=0.1)
    bias = t.filter(layer=2, component="q_bias", index=4).row(0, named=True)
    assert bias["cos"] is None and bias["one_minus_cos"] is None and bias["rel_norm_change"] is None
    # From a zero base, norm_change = |d|^2 / sqrt(|d|^2) and norm_tuned = sqrt(|d|^2): two roundings, <= 4u.
    assert bias["norm_base"] == 0.0 and bias["norm_change"] == pytest.approx(bias["norm_tuned"], rel=4 * U64)


def test_bf16_change_invisible_to_bf16_cosine_is_visible_here(bf16_pair):
    base_dir, tuned_dir = bf16_pair
    t = diff_checkpoints(plan_diff(str(base_dir), str(tuned_dir)))
    assert _changed(t) == PLANTED_BF16
    base, tuned = load_file(base_dir / "model.safetensors"), load_file(tuned_dir / "model.safetensors")
    for key in PLANTED_BF16:
        a, b = _vector(base, *key), _vector(tuned, *key)
        bf16_cos = torch.nn.functional.cosine_similarity(
            torch.from_numpy(a).to(torch.bfloat16), torch.from_numpy(b).to(torch.bfloat16), dim=0
        )
        assert bf16_cos.item() == 1.0  # the study's computation cannot see it
        row = t.filter(layer=key[0], component=key[1], index=key[2]).row(0, named=True)
        assert row["one_minus_cos"] > 0
        _check_against_reference(row, a, b)


def test_sharded_checkpoint_gives_the_same_table(tmp_path, sweep_model_dir, seed_state, planted_dir, planted_table):
    from huggingface_hub import save_torch_state_dict

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_torch_state_dict(seed_state, sharded, max_shard_size="8MB")
    shutil.copy(Path(sweep_model_dir) / "config.json", sharded / "config.json")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    assert_frame_equal(diff_checkpoints(plan_diff(str(sharded), str(planted_dir))), planted_table)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never a `ray start` cluster of this machine
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("RAY_AUTH_MODE")
    else:
        os.environ["RAY_AUTH_MODE"] = old


def test_ray_parallel_equals_serial(local_ray, sweep_model_dir, planted_dir, planted_table, tmp_path):
    result = run_weight_diff(str(sweep_model_dir), str(planted_dir), tmp_path, top_k=3, ray_workers=2)
    assert_frame_equal(result.table, planted_table)
    assert local_ray.is_initialized()  # a Ray it did not start is left running


# ---------------------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_state(tiny_dir) -> dict[str, torch.Tensor]:
    return load_file(tiny_dir / "model.safetensors")


def test_tensor_only_in_one_model_is_named(tmp_path, tiny_dir, tiny_state):
    dropped = _layer(1, "mlp.up_proj.weight")
    other = _write(tmp_path / "t", {k: v for k, v in tiny_state.items() if k != dropped}, tiny_dir)
    with pytest.raises(ValueError, match=rf"tensor names differ: only in base .*\[1\]: {dropped}"):
        plan_diff(str(tiny_dir), str(other))
    with pytest.raises(ValueError, match=rf"only in tuned .*{dropped}"):
        plan_diff(str(other), str(tiny_dir))


def test_shape_mismatch_is_named_with_both_shapes(tmp_path, tiny_dir, tiny_state):
    other = _write(tmp_path / "t", {**tiny_state, "model.norm.weight": torch.ones(129)}, tiny_dir)
    with pytest.raises(ValueError, match=r"shape mismatch .*model\.norm\.weight is \[128\] in base, \[129\] in tuned"):
        plan_diff(str(tiny_dir), str(other))


def test_different_architectures_name_the_config_keys(tmp_path, tiny_dir):
    with pytest.raises(ValueError, match=r"architectures differ.*num_hidden_layers: base 2, tuned 3"):
        plan_diff(str(tiny_dir), str(_tiny(tmp_path / "three", n_layers=3)))
    with pytest.raises(ValueError, match=r"num_attention_heads: base 16, tuned 8; .*hidden_size: base 128, tuned 64"):
        plan_diff(str(tiny_dir), str(_tiny(tmp_path / "eight", n_heads=8)))


def test_tensors_that_contradict_the_config_layout(tmp_path, tiny_dir, tiny_state):
    # Both claim head_dim 4, but q_proj has 16 x 8 rows.
    a = _write(tmp_path / "a", tiny_state, tiny_dir, head_dim=4)
    layout = r"do not match the layout.*q_proj\.weight is \[128, 128\], config.json implies \[64, 128\]"
    with pytest.raises(ValueError, match=layout):
        plan_diff(str(a), str(a))


def test_missing_unreadable_and_unsupported_inputs(tmp_path, tiny_dir, tiny_state, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"base checkpoint: .*{missing}"):
        plan_diff(str(missing), str(tiny_dir))
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(tiny_dir / "config.json", empty / "config.json")
    with pytest.raises(FileNotFoundError, match=r"tuned checkpoint .*no \*\.safetensors files"):
        plan_diff(str(tiny_dir), str(empty))
    broken = _write(tmp_path / "broken", tiny_state, tiny_dir)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(OSError, match=rf"cannot read {broken / 'model.safetensors'}"):
        plan_diff(str(tiny_dir), str(broken))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="GGUF is not supported"):
        plan_diff(str(gguf), str(tiny_dir))
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub = r"tuned checkpoint 'verif-sweep-test/no-such-model': cannot fetch it from the Hugging Face hub"
    with pytest.raises(OSError, match=hub):
        plan_diff(str(tiny_dir), "verif-sweep-test/no-such-model")


def test_command_line_entry_prints_verdicts_or_the_error(tmp_path, tiny_dir, capsys):
    import launch

    common = ["--weight-diff", "--base", str(tiny_dir), "--set", "wandb.mode=disabled"]
    assert launch.main([*common, "--tuned", str(tiny_dir), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "all_heads (32 items, 0/" in printed and (tmp_path / "out" / "weight_diff.parquet").is_file()
    assert "target_heads" not in printed  # the study's heads do not fit a 2-layer model
    assert launch.main([*common, "--tuned", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out2")]) == 2
    assert "error: weight_diff: tuned checkpoint" in capsys.readouterr().err
    heads = ["--set", "ablation.target_heads=L1 H3"]
    assert launch.main([*common, "--tuned", str(tiny_dir), "--out", str(tmp_path / "out3"), *heads]) == 0
    assert "target_heads" in capsys.readouterr().out
    # One rule: weight_diff.heads picks the group; `none` drops it, `study` must fit the checkpoint.
    none = [*heads, "--set", "weight_diff.heads=none"]
    assert launch.main([*common, "--tuned", str(tiny_dir), "--out", str(tmp_path / "out4"), *none]) == 0
    assert "target_heads" not in capsys.readouterr().out
    study = ["--set", "weight_diff.heads=study"]
    assert launch.main([*common, "--tuned", str(tiny_dir), "--out", str(tmp_path / "out5"), *study]) == 2
    err = capsys.readouterr().err
    assert "head L3 H13" in err and "weight_diff.heads='study'" in err
    assert not (tmp_path / "out5").exists()


def test_selection_outside_the_model_is_refused_before_work(tmp_path, tiny_dir):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"selection outside the model.*head L2 H0.*value vector L0 N256"):
        run_weight_diff(str(tiny_dir), str(tiny_dir), out, target_heads=[(2, 0)], value_vectors=[(0, 256)])
    assert not out.exists()


@pytest.mark.parametrize("stored_in", ["base", "tuned"])
def test_stored_lm_head_is_compared_with_the_tied_embeddings(tmp_path, tiny_dir, tiny_state, stored_in):
    lm_head = tiny_state[EMBED].clone()
    lm_head[5, 3] += 1e-4
    stored = {**tiny_state, "lm_head.weight": lm_head}
    untied = _write(tmp_path / "untied", stored, tiny_dir, tie_word_embeddings=False)
    pair = (tiny_dir, untied) if stored_in == "tuned" else (untied, tiny_dir)
    t = diff_checkpoints(plan_diff(*map(str, pair)))
    assert _changed(t) == {(None, "lm_head.weight", None)}
    row = t.filter(component="lm_head.weight").row(0, named=True)
    bumped = float(lm_head[5, 3].double() - tiny_state[EMBED][5, 3].double())  # ~1e-4, exact in float64
    assert "tied" in row["tensor"] and row["max_abs_diff"] == bumped
    assert t.filter(component=EMBED)["max_abs_diff"].item() == 0.0


def test_selections_pick_the_rows_of_heads_and_neurons(planted_table, sweep_model_dir):
    arch = plan_diff(str(sweep_model_dir), str(sweep_model_dir)).arch
    sel = select_rows(planted_table, arch, [(3, 13), (3, 12)], [(10, 7)], top_k=2)
    heads = sel.filter(selection="target_heads")
    # q, q bias, o for each head; both heads read kv head 1 (heads 8-15): its 4 rows once.
    assert heads.height == 2 * 3 + 4
    assert set(heads.filter(pl.col("component") == "k_proj")["index"]) == {1}
    assert set(sel.filter(selection="value_vectors")["component"]) == set(MLP_COMPONENTS)
    top = sel.filter(selection="top_2_value_vectors")
    assert {(r["layer"], r["index"]) for r in top.iter_rows(named=True)} == {(10, 7), (30, 5)}
    summary = summarise(planted_table, sel, arch)
    row = summary.filter(selection="target_heads").row(0, named=True)
    assert row["n_items"] == 2 and row["n_changed"] == 1 and row["most_turned"] == "L3 q_proj[13]"
    assert row["cos_is_1_in_bf16"] and row["norm_change_below_claim"]
    assert row["verdict"].startswith("target_heads (2 items, 1/10 rows changed): max 1-cos ")


def test_bf16_rounding_threshold_of_the_verdict():
    """`cos_is_1_in_bf16` is decided by 1-cos <= BF16_COS_ONE; torch's own rounding agrees at the edge."""

    def rounds_to_one(x: float) -> bool:
        return torch.tensor(x, dtype=torch.float64).to(torch.bfloat16).item() == 1.0

    # 1e-3 is a probe step (far above float64 rounding of the product), not a tolerance.
    assert rounds_to_one(1 - BF16_COS_ONE) and not rounds_to_one(1 - BF16_COS_ONE * (1 + 1e-3))


def test_peak_memory_does_not_grow_with_layers(tmp_path, monkeypatch):
    """Benchmark run with 1 and 4 layers of wide bf16 layers (vocab 512, so layer tensors are the largest).

    The script runs as its command line does (`__main__`, these arguments), in this process: it only writes
    the checkpoints and starts the measurements, each in a fresh process of its own as always (this one
    has torch, transformers and polars imported already, a fresh one would import them once more)."""
    out = tmp_path / "mem.json"
    script = REPO / "benchmarks" / "bench_weightdiff_memory.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--layers", "1", "4", "--hidden", "1024", "--intermediate", "2048",
                                      "--vocab", "512", "--threads", "1", "--out", str(out)])  # fmt: skip
    runpy.run_path(str(script), run_name="__main__")
    small, large = json.loads(out.read_text())["rows"]
    model_growth = 2 * (large["model_bytes"] - small["model_bytes"])  # base + tuned
    # Holding the model would add at least model_growth (x4 once in float64); streaming adds only the
    # growing result table (~6k rows per layer here).
    assert large["peak_extra_bytes"] - small["peak_extra_bytes"] < 0.2 * model_growth
    for r in (small, large):  # three float64 chunk buffers (here each the size of the largest tensor) + slack
        assert r["peak_extra_bytes"] < 3 * r["largest_pair_f64_bytes"] + 32 * 2**20


def test_row_granularity_through_the_command_line(tmp_path, tiny_dir, tiny_state, capsys):
    """`weight_diff.granularity: row` writes the study's per-row view of the chosen heads (here all), and
    refuses when no head is chosen; the planted change shows in exactly its row."""
    import launch

    q = _layer(1, "self_attn.q_proj.weight")
    tuned = dict(tiny_state)
    tuned[q] = tuned[q].clone()
    head_dim = tuned[q].shape[0] // 16
    tuned[q][3 * head_dim + 2, 0] += 1e-3  # head 3, row 2 of layer 1's W_Q
    tuned_dir = _write(tmp_path / "tuned", tuned, tiny_dir)
    common = ["--weight-diff", "--base", str(tiny_dir), "--tuned", str(tuned_dir), "--set", "wandb.mode=disabled",
              "--set", "weight_diff.granularity=row"]
    assert launch.main([*common, "--out", str(tmp_path / "none")]) == 2
    assert "weight_diff.granularity: row compares the rows of chosen heads" in capsys.readouterr().err
    assert launch.main([*common, "--set", "weight_diff.heads=all", "--out", str(tmp_path / "out")]) == 0
    rows = pl.read_parquet(tmp_path / "out" / "weight_diff_rows.parquet")
    assert rows.height == 2 * 16 * 4 * head_dim  # layers x heads x matrices x rows
    changed = rows.filter(pl.col("max_abs_diff") > 0)
    assert changed.select("layer", "head", "matrix", "row").rows() == [(1, 3, "q_proj", 2)]
    summary = pl.read_parquet(tmp_path / "out" / "weight_diff_rows_summary.parquet")
    assert summary.filter(pl.col("max_one_minus_cos") > 0).select("layer", "head", "matrix").rows() == [(1, 3, "q_proj")]
