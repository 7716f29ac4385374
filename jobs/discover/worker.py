"""The discovery job's worker: one loaded model, three kinds of shard.

* `scan`: over a slice of the prompts, the attribution-patching sums for every head and neuron and
  the attention to the target (over the prompts the objective averages), and the last-position
  residual stream after every layer (over all of them: the probes need both labels);
* `neurons`: the value vectors' direct Yes-minus-No logits and their cosine with the driver's probes;
* `deltas`: exact effects of ablation sets (single heads, top-k and random sets) through the sweep's
  engine, as sums over a slice of the prompts.

Scan shards differentiate the model, which needs float32 gradients at least: when the model scores in
a lower precision (bf16 on a GPU) the worker loads a float32 copy for scan shards, once, on the first
one, and drops it when the later steps begin; exact effects are always scored in the configured dtype,
as a sweep scores them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jobs.runtime.worker import ModelWorker, WorkerSpec
from verif.analysis.discovery.atp import GRADIENT_DTYPES, atp_sums
from verif.analysis.discovery.attention import attn_to_target_sums, encode_with_target_positions
from verif.analysis.discovery.exact import delta_sums
from verif.analysis.discovery.neurons import logit_yes_no, value_vectors
from verif.analysis.discovery.probes import Probe, last_position_residuals, probe_cosines
from verif.design.conditions import PAIRED_KINDS, Ablation
from verif.model.engine import Scorer
from verif.model.interventions import ReferenceMeans, Sites, Sources, all_components
from verif.model.loading import LoadedModel, load_model

PHASES = ("reference", "scan", "neurons", "deltas")


@dataclass(frozen=True)
class DiscoveryShard:
    """One unit of discovery work for one model: `phase` is one of PHASES, `prompt_ids` the prompts it
    covers (none for `neurons`), `step` which set of ablations a `deltas` shard scores (exact, sets)."""

    id: str
    model: str
    phase: str
    prompt_ids: tuple[int, ...] = ()
    step: str = ""


@dataclass(frozen=True)
class ScanPrompts:
    """A scan shard's prompts: text, target number, and whether the objective M averages it; with
    `discover.intervention` mean or resample, what AtP differences against (the reference means over every
    head and neuron, or each prompt's partner's text)."""

    texts: tuple[str, ...]
    targets: tuple[int, ...]
    in_objective: tuple[bool, ...]
    batch_size: int
    partners: tuple[str, ...] | None = None
    means: ReferenceMeans | None = field(default=None, compare=False)

    def key(self) -> dict:
        """What the shard's result depends on, for its inputs digest (the means by their own digest)."""
        return {**{k: v for k, v in self.__dict__.items() if k != "means"},
                "means": None if self.means is None else self.means.digest()}


class DiscoveryWorker(ModelWorker):
    """Runs discovery shards (`run`) on one loaded model; see the module docstring."""

    def __init__(self, spec: WorkerSpec):
        super().__init__(spec)
        self.scorer = Scorer(self.loaded, self.ids, spec.engine)
        self.float32_copy: LoadedModel | None = None  # for scans of a bf16 or float16 model

    def gradient_model(self) -> LoadedModel:
        """The scoring model when it is float32 or float64, else a float32 copy (loaded on first use)."""
        if next(self.loaded.model.parameters()).dtype in GRADIENT_DTYPES:
            return self.loaded
        if self.float32_copy is None:
            self.float32_copy = load_model(self.spec.model, "float32", self.spec.device)
        return self.float32_copy

    def run(self, shard: DiscoveryShard, inputs: Any) -> dict:
        """The shard's result: {"shard": id, "n_prompts": ..., "arrays": {name: array}, ...} (see each phase)."""
        if shard.phase != "scan":
            self.float32_copy = None  # scans come first: the later steps get its memory back
        if shard.phase == "scan":
            return {"shard": shard.id, **self.scan(shard.prompt_ids, inputs)}
        if shard.phase == "neurons":
            return {"shard": shard.id, **self.neuron_scores(inputs)}
        if shard.phase == "deltas":
            return {"shard": shard.id, **self.deltas(*inputs)}
        if shard.phase == "reference":
            return {"shard": shard.id, **self.reference(*inputs)}
        raise ValueError(f"shard {shard.id}: unknown phase {shard.phase!r}; one of {', '.join(PHASES)}")

    def scan(self, prompt_ids: tuple[int, ...], prompts: ScanPrompts) -> dict:
        """Sums over the objective's prompts (`atp_heads`, `atp_neurons`, `log_odds`, `attn_to_target`) and
        each prompt's `[L, hidden]` residuals (`residuals`, keyed by prompt id)."""
        loaded = self.gradient_model()
        model, arch = loaded.model, loaded.arch
        tokens, positions = encode_with_target_positions(loaded.tokenizer, prompts.texts, prompts.targets)
        chosen = [i for i, keep in enumerate(prompts.in_objective) if keep]
        arrays = {
            "atp_heads": np.zeros((arch.n_layers, arch.n_heads)),
            "atp_neurons": np.zeros((arch.n_layers, arch.intermediate_size)),
            "log_odds": np.zeros(()),
            "attn_to_target": np.zeros((arch.n_layers, arch.n_heads)),
        }
        if chosen:  # a slice of the prompts may hold none the objective averages: its sums are 0 over 0
            pad = self.scorer.pad_id
            partners = None
            if prompts.partners is not None:
                partners = [self.loaded.tokenizer.encode(prompts.partners[i], add_special_tokens=False) for i in chosen]
            means = None if prompts.means is None else prompts.means.mean
            atp = atp_sums(model, arch, [tokens[i] for i in chosen], self.ids, pad, prompts.batch_size, means,
                           partners)
            attn = attn_to_target_sums(model, arch, [tokens[i] for i in chosen], [positions[i] for i in chosen],
                                       prompts.batch_size)
            arrays = {**atp.sums, **attn.sums}
        residuals = last_position_residuals(model, tokens, self.scorer.pad_id, prompts.batch_size)
        return {"n_prompts": len(chosen), "arrays": arrays,
                "residuals": {pid: residuals[i] for i, pid in enumerate(prompt_ids)}}

    def neuron_scores(self, probes: list[Probe]) -> dict:
        """`logit_yes_no` and `probe_cos` `[L, I]` (NaN where no separating probe reads a layer)."""
        model = self.loaded.model
        arrays = {"logit_yes_no": logit_yes_no(model, self.ids), "probe_cos": probe_cosines(value_vectors(model), probes)}
        return {"n_prompts": 0, "arrays": arrays}

    def deltas(self, texts: list[str], ablations: list[Ablation], means: ReferenceMeans | None = None,
               partners: list[str] | None = None) -> dict:
        """Sums over these prompts of each set's `delta` (log-odds with it intervened on minus without) and
        `log_odds`; a mean kind reads `means`, resample the activations of `partners` (prompt i's is i)."""
        tokens = self.scorer.tokenize(texts)
        cache = None
        if partners is not None:
            cache = self.scorer.activations(self.scorer.tokenize(partners), Sites.of(ablations, PAIRED_KINDS))
        sums = delta_sums(self.scorer, tokens, ablations, Sources(means, cache))
        return {"n_prompts": sums.n_prompts, "arrays": dict(sums.sums)}

    def reference(self, texts: list[str]) -> dict:
        """Float64 sums of every head's and neuron's activation over these reference prompts and their token
        count (`n_tokens`): the driver adds the shards and divides once."""
        arch = self.loaded.arch
        sites = all_components(arch.n_layers, arch.n_heads, arch.n_neurons)
        sums = self.scorer.reference_sums(self.scorer.tokenize(texts), sites, positional=False)
        arrays = {f"{site}/{layer}": v for (site, layer), v in sums.total.items()}
        return {"n_prompts": sums.n_prompts, "arrays": {**arrays, "n_tokens": np.asarray(float(sums.n_tokens))}}
