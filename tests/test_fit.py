"""Whether a model fits a worker's GPUs, said before any work: the estimate from the config alone against
what the test models load, what `--check` prints, the refusal with the numbers, and the device map a
worker builds from the GPUs it sees (no GPU here: the CUDA queries are replaced by hand-made answers).
"""

from __future__ import annotations

import pytest
import torch

import launch
from jobs import fit
from jobs.config import load_config
from jobs.prepare import resolve_models
from verif.model import loading
from verif.model.devicemap import DoesNotFitError
from verif.model.families import decoder_layers
from verif.model.memory import activation_bytes_per_token, estimate
from verif.model.options import EngineOptions
from tests.support.sweeps import sweep_overrides


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.mark.parametrize("which", ["seed_model", "smollm2"])
def test_estimate_counts_the_bytes_the_model_loads(which, request):
    loaded = request.getfixturevalue(which)  # float32 on the CPU: Qwen2 from safetensors, Llama from GGUF
    config = loading.read_config(loaded.source)
    est = estimate(config, torch.float32, EngineOptions(), 1024)
    assert est.param_bytes == _bytes(loaded.model)  # tied embeddings counted once (both models tie them)
    layers = decoder_layers(loaded.model)
    assert [est.sizes.units[f"model.layers.{i}"] for i in range(len(layers))] == [_bytes(layer) for layer in layers]
    assert est.sizes.units["lm_head"] == 0 and est.sizes.tied == (("model.embed_tokens", "lm_head"),)
    assert estimate(config, torch.bfloat16, EngineOptions(), 1024).param_bytes * 2 == est.param_bytes


def test_estimate_adds_up_what_scoring_holds(seed_model):
    """The reserve by hand: the unit's hidden states twice, a chunk's temporaries, its mask and logits."""
    arch, opts = seed_model.arch, EngineOptions(max_rows=32, max_chunk_tokens=8192, max_unit_tokens=65536)
    est = estimate(loading.read_config(seed_model.source), torch.bfloat16, opts, 300)
    assert est.hidden_bytes == 2 * 65536 * arch.hidden_size * 2
    assert est.chunk_bytes == 8192 * activation_bytes_per_token(arch, torch.bfloat16)
    assert est.mask_bytes == 8192 * 300
    assert est.logits_bytes == 32 * arch.vocab_size * (2 + 16)
    assert est.per_gpu(1) == est.param_bytes + sum(s for n, s in est.sizes.units.items()
                                                   if n == "model.rotary_emb") + est.reserve_bytes
    assert est.per_gpu(2) < est.per_gpu(1)


def _check(seed_model_dir, tmp_path, *extra: str) -> list[str]:
    """`--check` of the small test sweep with a worker's GPU choices: model.device and dtype auto, as on a cluster."""
    args = ["--check", "--out", str(tmp_path / "OUT")]
    for item in sweep_overrides(seed_model_dir, "model.device=auto", "model.dtype=auto", *extra):
        args += ["--set", item]
    return args


def test_check_says_what_a_gpu_would_need(seed_model_dir, tmp_path, capsys):
    assert launch.main(_check(seed_model_dir, tmp_path, "ray.gpus_per_worker=2")) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("fit: ")]
    assert "parameters 0.05 GB (bfloat16)" in line  # a GPU's dtype: auto is bf16 there
    assert "with ray.gpus_per_worker 2 a worker needs" in line and "no GPU here to compare with" in line


# Small budgets, so that the weights dominate what a GPU must hold.
SMALL = ("engine.max_rows=4", "engine.max_chunk_tokens=1024", "engine.max_unit_tokens=4096")


def test_what_cannot_fit_is_refused_with_the_gpus_that_would(seed_model_dir, tmp_path, monkeypatch):
    """`--check` and `--sweep` call `check_fit` in `prepare`; a refusal is one line (an InputError) naming them."""
    # four 64 MB "GPUs": the 50 MB of weights and ~20 MB for scoring need two (the 39 MB embeddings are one part)
    monkeypatch.setattr(fit, "local_gpu_memory", lambda: [64 * 10**6] * 4)

    def cfg(gpus: int):
        return load_config(None, sweep_overrides(seed_model_dir, "model.device=auto", "model.dtype=auto",
                                                 f"ray.gpus_per_worker={gpus}", *SMALL), str(tmp_path / "OUT"))

    sources, _ = resolve_models([str(seed_model_dir)])
    with pytest.raises(fit.FitError) as refused:
        fit.check_fit(cfg(1), sources)
    err = str(refused.value)
    assert "\n" not in err and err.startswith(f"{seed_model_dir.name} does not fit a worker's 1 GPU(s) of 0.06 GB "
                                              "(ray.gpus_per_worker 1): it needs 0.07 GB per GPU")
    assert "ray.gpus_per_worker: 2 would fit" in err and "parameters 0.05 GB (bfloat16)" in err
    (line,) = fit.check_fit(cfg(2), sources)
    assert line.endswith("on each of 2 GPU(s) of 0.06 GB here: fits")


def test_a_worker_maps_the_gpus_it_sees(seed_model, monkeypatch):
    """Ray gives a worker of 2 GPUs global ids 6 and 7 as cuda:0 and cuda:1: the map uses 0 and 1."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    free = {"bytes": 80 * 10**9}
    monkeypatch.setattr(loading, "free_memory", lambda slots: [free["bytes"]] * len(slots))
    slots = loading.gpu_slots("cuda", 2)
    assert slots == [0, 1]
    config = loading.read_config(seed_model.source)
    opts = EngineOptions(max_rows=4, max_chunk_tokens=1024, max_unit_tokens=4096)
    device_map = loading._device_map(config, torch.bfloat16, slots, opts, 1024, "seed")
    layers = [device_map[f"model.layers.{i}"] for i in range(36)]
    assert set(device_map.values()) == {0, 1} and layers == sorted(layers)
    with pytest.raises(DoesNotFitError, match=r"needs 3 GPU\(s\) from cuda:0 on \(ray.gpus_per_worker\) but sees 2"):
        loading.gpu_slots("cuda", 3)
    free["bytes"] = 64 * 10**6  # ~50 MB of weights and ~20 MB for scoring: two such GPUs, not one
    with pytest.raises(DoesNotFitError, match=r"seed \(qwen2\) does not fit 1 GPU\(s\) with 0.06 GB free: it "
                                              r"needs 0.07 GB on each .* ray.gpus_per_worker: 2 would fit"):
        loading._device_map(config, torch.bfloat16, loading.gpu_slots("cuda", 1), opts, 1024, "seed")
