"""An independent reference for the intervention kinds: hooks on the model's own modules, one prompt at a time.

Nothing here uses `verif.model.interventions` or the engine. Activations are read by this module's own
forward pre-hooks on each layer's attention output projection (heads) and MLP down projection (neurons)
in the model's own forward of one unpadded prompt; means and partner activations are computed from those
reads with numpy, and a scored prompt's intervened columns are overwritten by this module's own pre-hooks.
For cross (cross-model activation patching) the values are read the same way from another model's own
forward of the same prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from verif.design.conditions import Ablation
from verif.model.families import down_projs, o_projs
from verif.model.score import YesNoIds, scores_from_log_probs, yes_no_log_probs


def _modules(model) -> dict[str, list]:
    return {"heads": o_projs(model), "neurons": down_projs(model)}


@torch.inference_mode()
def own_inputs(model, toks: Sequence[int]) -> dict[str, list[np.ndarray]]:
    """Every layer's o_proj input `[T, H*d]` and down_proj input `[T, I]` in the model's own forward of one
    prompt, as float64 numpy arrays."""
    got: dict[str, list] = {"heads": [], "neurons": []}
    handles = []
    for site, mods in _modules(model).items():
        got[site] = [None] * len(mods)
        for layer, mod in enumerate(mods):
            def hook(module, args, site=site, layer=layer):
                got[site][layer] = args[0][0].double().cpu().numpy().copy()

            handles.append(mod.register_forward_pre_hook(hook))
    try:
        model(input_ids=torch.tensor([list(toks)]), use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return got


def means_of(model, prompts: Sequence[Sequence[int]]) -> dict:
    """The reference prompts' means of every layer's inputs: `mean[site][layer]` `[W]` over every position,
    `positional[site][layer]` `[longest, W]` by position from the end, each over the prompts that have it."""
    reads = [own_inputs(model, t) for t in prompts]
    longest = max(len(t) for t in prompts)
    mean, positional = {}, {}
    for site in ("heads", "neurons"):
        n_layers = len(reads[0][site])
        mean[site] = [np.concatenate([r[site][l] for r in reads]).mean(0) for l in range(n_layers)]
        positional[site] = []
        for l in range(n_layers):
            rows = []
            for k in range(longest):
                have = [r[site][l][-1 - k] for r in reads if r[site][l].shape[0] > k]
                rows.append(np.mean(have, axis=0))
            positional[site].append(np.stack(rows))
    return {"mean": mean, "positional": positional}


def _columns(a: Ablation, site: str, layer: int, head_dim: int) -> list[int]:
    if site == "heads":
        return [h * head_dim + j for l, h in a.heads if l == layer for j in range(head_dim)]
    return [i for l, i in a.neurons if l == layer]


@torch.inference_mode()
def score_one(model, arch, ids: YesNoIds, toks: Sequence[int], ablation: Ablation, means: dict | None = None,
              partner: Sequence[int] | None = None, source_model=None):
    """log P(Yes), log P(No) of one prompt with `ablation`'s components replaced at every position: by 0, the
    reference mean, the positional mean (`means`, from `means_of`), `partner`'s activation (resample) or
    `source_model`'s activation on the same prompt (cross)."""
    seq = len(toks)
    source = {"resample": lambda: own_inputs(model, partner),
              "cross": lambda: own_inputs(source_model, toks)}.get(ablation.kind, lambda: None)()
    handles = []
    for site, mods in _modules(model).items():
        for layer, mod in enumerate(mods):
            cols = _columns(ablation, site, layer, arch.head_dim)
            if not cols:
                continue
            if ablation.kind == "zero":
                values = np.zeros((seq, len(cols)))
            elif ablation.kind == "mean":
                values = np.broadcast_to(means["mean"][site][layer][cols], (seq, len(cols)))
            elif ablation.kind == "mean_positional":
                values = means["positional"][site][layer][:seq][::-1][:, cols]
            else:
                values = source[site][layer][:, cols]

            def hook(module, args, cols=cols, values=values):
                x = args[0].clone()
                x[0, :, cols] = torch.as_tensor(np.ascontiguousarray(values), dtype=x.dtype)
                return (x,) + tuple(args[1:])

            handles.append(mod.register_forward_pre_hook(hook))
    try:
        out = model(input_ids=torch.tensor([list(toks)]), use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    log_yes, log_no = yes_no_log_probs(out.logits[:, -1], ids)
    return float(log_yes[0]), float(log_no[0])


def reference_table(loaded, ids: YesNoIds, prompts: Sequence[Sequence[int]], ablations: Sequence[Ablation],
                    means: dict | None = None, partners: Sequence[int] | None = None, source_model=None):
    """Scores `[n_prompts, n_ablations]` one prompt and one condition per forward (`partners[i]`: the index of
    prompt i's partner among `prompts`; `source_model`: the torch model cross reads)."""
    log_yes = np.zeros((len(prompts), len(ablations)))
    log_no = np.zeros_like(log_yes)
    for i, toks in enumerate(prompts):
        for j, a in enumerate(ablations):
            partner = prompts[partners[i]] if partners is not None else None
            log_yes[i, j], log_no[i, j] = score_one(loaded.model, loaded.arch, ids, toks, a, means, partner,
                                                    source_model)
    return scores_from_log_probs(log_yes, log_no)
