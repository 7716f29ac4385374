"""What replaces an intervened activation, row by row of one forward: the engine's sources and edits.

A component's activation is a head's slice of the attention output projection's input or a neuron's
coordinate of the MLP down projection's input (the two *sites*, `SITES`), as for zero-ablation. A
condition of kind (`verif.design.conditions.INTERVENTIONS`)

* `zero` replaces it by 0: the keep-masks of `verif.model.ablation`, no edit at all;
* `mean` by its mean over every non-padding position of the reference prompts (`ReferenceMeans.mean`);
* `mean_positional` by the reference prompts' mean at the same position counted from the end of the
  prompt (`ReferenceMeans.positional`; a position some reference prompts lack is averaged over those that
  have it, `n_at`);
* `resample` by an activation the caller supplies per scored prompt (`ActivationCache`): the prompt's
  partner's, at the same position, from an unablated forward of the partner;
* `cross` by another model's activation on the same prompt (`Sources.cross`, a second cache: a shard may
  hold resample and cross rows at once), from that model's unablated forward.

The cache is the seam for patching from anywhere. `verif.model.engine.Scorer.activations` fills one from
a model's unablated forward (the same forward code the scores come from, so a prompt's own activations
replace its own bit for bit); the engine reads entry i as the replacement for scored prompt i whoever
filled it. Cross-model activation patching (issue 21: another model's activations on the same prompt)
is a cache filled by the other model's Scorer and handed to this one's `score_tokens` as `Sources.cross`.

Per-row mixing and the shared trunk stay as they are: a condition branches off the trunk at its first
intervened layer (its keep-masks say where, whatever the kind), the keep-masks zero its components, and
an `Edit` built for the rows of one forward chunk writes the replacement values where a row of a
non-zero kind intervenes (`torch.where`, so a value is copied exactly, never rounded). Rows of different
kinds and sets share a chunk.

Memory is bounded by the components the conditions touch (`Sites`): the reference means hold a vector
per touched column (and, for mean_positional, one per position from the end); a cache holds each prompt's
`[length, touched columns]` per layer; a unit materialises one layer's replacement values at a time
(`UnitEdits`), `[prompts, length, touched columns of that layer]`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from verif.design.conditions import Ablation

SITES = ("heads", "neurons")  # the attention output projection's input, the MLP down projection's input
Key = tuple[str, int]  # (site, layer)
# Codes of a row's replacement source (zero rows need no edit; -1: a trunk row or a zero row).
_MEAN, _POSITIONAL, _CACHE, _CROSS = 1, 2, 3, 4
_CODES = {"mean": _MEAN, "mean_positional": _POSITIONAL, "resample": _CACHE, "cross": _CROSS}


# --------------------------------------------------------------------------------------------
# which components
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sites:
    """Components whose activations a pass reads or replaces: per layer, heads and neurons (sorted)."""

    heads: dict[int, tuple[int, ...]] = field(default_factory=dict)
    neurons: dict[int, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, ablations: Iterable[Ablation], kinds: Sequence[str] | None = None) -> Sites:
        """Every component intervened on by an ablation whose kind is in `kinds` (default: any but zero)."""
        heads: dict[int, set[int]] = {}
        neurons: dict[int, set[int]] = {}
        for a in ablations:
            if a.kind == "zero" if kinds is None else a.kind not in kinds:
                continue
            for layer, h in a.heads:
                heads.setdefault(layer, set()).add(h)
            for layer, i in a.neurons:
                neurons.setdefault(layer, set()).add(i)
        return cls({l: tuple(sorted(v)) for l, v in sorted(heads.items())},
                   {l: tuple(sorted(v)) for l, v in sorted(neurons.items())})

    def __bool__(self) -> bool:
        return bool(self.heads or self.neurons)

    def keys(self) -> list[Key]:
        return [("heads", layer) for layer in self.heads] + [("neurons", layer) for layer in self.neurons]

    def layers(self, site: str) -> dict[int, tuple[int, ...]]:
        return self.heads if site == "heads" else self.neurons

    def columns(self, key: Key, head_dim: int) -> np.ndarray:
        """Input columns of the site's projection at that layer: each head's `head_dim` slice, or the neurons."""
        site, layer = key
        ids = np.asarray(self.layers(site)[layer], dtype=np.int64)
        if site == "neurons":
            return ids
        return (ids[:, None] * head_dim + np.arange(head_dim)[None, :]).reshape(-1)

    def covers(self, other: Sites) -> bool:
        """Whether every component of `other` is one of these."""
        return all(set(ids) <= set(self.layers(site).get(layer, ())) for site in SITES
                   for layer, ids in other.layers(site).items())

    def to_dict(self) -> dict:
        """JSON form, for the manifest (layers as strings)."""
        return {"heads": {str(l): list(v) for l, v in self.heads.items()},
                "neurons": {str(l): list(v) for l, v in self.neurons.items()}}


def all_components(n_layers: int, n_heads: int, n_neurons: int) -> Sites:
    """Every head and every MLP neuron of a model (what AtP's reference activations cover)."""
    return Sites({l: tuple(range(n_heads)) for l in range(n_layers)}, {l: tuple(range(n_neurons)) for l in range(n_layers)})


# --------------------------------------------------------------------------------------------
# what replaces them
# --------------------------------------------------------------------------------------------


@dataclass
class ActivationCache:
    """Per prompt, activations at `sites` from an unablated forward: `entries[i][(site, layer)]` is
    `[length of prompt i, columns]` (`Sites.columns` order), real positions only.

    `tokens[i]` are the token ids entry i was read from and `origin` names the model that read them
    (`Scorer.activations` fills both; None where unknown). A scorer of that same model knows from them that
    positions where entry i's tokens and scored prompt i's agree from the start hold the prompt's own
    activations: a resample there changes nothing, and it skips them (`verif.model.forward.SharedPrefix`).
    Any other filler (another model's activations) leaves them None, and every position is computed.
    """

    sites: Sites
    entries: list[dict[Key, torch.Tensor]]
    tokens: list[tuple[int, ...]] | None = None
    origin: str | None = None

    def lengths(self) -> list[int]:
        return [next(iter(e.values())).shape[0] if e else 0 for e in self.entries]

    def select(self, idx: Sequence[int]) -> ActivationCache:
        tokens = None if self.tokens is None else [self.tokens[i] for i in idx]
        return ActivationCache(self.sites, [self.entries[i] for i in idx], tokens, self.origin)

    def same_prefix(self, token_ids: Sequence[Sequence[int]], origin: str) -> list[int]:
        """Per scored prompt, how many of its first tokens entry i's tokens share (0 for every prompt unless
        the cache was read by `origin`, the scoring model, from known tokens)."""
        if self.tokens is None or self.origin != origin:
            return [0] * len(token_ids)
        out = []
        for mine, theirs in zip(token_ids, self.tokens):
            n = min(len(mine), len(theirs))
            diff = np.flatnonzero(np.asarray(mine[:n]) != np.asarray(theirs[:n]))
            out.append(int(diff[0]) if len(diff) else n)
        return out

    def nbytes(self) -> int:
        """Bytes the activations take: per prompt, its positions x the touched columns x the dtype's size."""
        return sum(t.numel() * t.element_size() for e in self.entries for t in e.values())


@dataclass
class ReferenceSums:
    """Float64 sums of activations over reference prompts: what shards return and a driver adds.

    `total[key]` sums every real position of every prompt; `positional[key]` row k sums the activation k
    positions before each prompt's last (None unless asked for) and `n_at[k]` counts the prompts that
    have that position.
    """

    sites: Sites
    total: dict[Key, np.ndarray]
    n_tokens: int
    n_prompts: int
    positional: dict[Key, np.ndarray] | None = None
    n_at: np.ndarray | None = None

    @classmethod
    def of(cls, cache: ActivationCache, positional: bool) -> ReferenceSums:
        lengths = cache.lengths()
        longest = max(lengths, default=0)
        keys = cache.sites.keys()
        total = {k: sum((e[k].double().sum(0).cpu() for e in cache.entries), torch.zeros(())).numpy() for k in keys}
        pos = None
        n_at = None
        if positional:
            pos = {}
            for k in keys:
                acc = torch.zeros(longest, cache.entries[0][k].shape[1], dtype=torch.float64)
                for e in cache.entries:
                    acc[: e[k].shape[0]] += e[k].double().flip(0).cpu()  # row j: j positions before the last
                pos[k] = acc.numpy()
            n_at = (np.asarray(lengths)[None, :] > np.arange(longest)[:, None]).sum(1)
        return cls(cache.sites, total, int(sum(lengths)), len(lengths), pos, n_at)

    def __add__(self, other: ReferenceSums) -> ReferenceSums:
        if self.sites != other.sites or (self.positional is None) != (other.positional is None):
            raise ValueError("cannot add reference sums over different components")
        total = {k: self.total[k] + other.total[k] for k in self.total}
        pos = n_at = None
        if self.positional is not None:
            longest = max(len(self.n_at), len(other.n_at))
            pad = lambda a: np.pad(a, [(0, longest - a.shape[0])] + [(0, 0)] * (a.ndim - 1))  # noqa: E731
            pos = {k: pad(self.positional[k]) + pad(other.positional[k]) for k in self.positional}
            n_at = pad(self.n_at) + pad(other.n_at)
        return ReferenceSums(self.sites, total, self.n_tokens + other.n_tokens, self.n_prompts + other.n_prompts,
                             pos, n_at)

    def means(self) -> ReferenceMeans:
        if not self.n_tokens:
            raise ValueError("reference means: no reference prompt was read")
        pos = None if self.positional is None else {k: v / self.n_at[:, None] for k, v in self.positional.items()}
        return ReferenceMeans(self.sites, {k: v / self.n_tokens for k, v in self.total.items()}, pos,
                              self.n_at, self.n_prompts, self.n_tokens)


@dataclass
class ReferenceMeans:
    """Float64 means of the activations at `sites` over the reference prompts: `mean[key]` `[columns]`
    over every real position, `positional[key]` `[longest, columns]` by position from the end (row 0:
    the last position) over the `n_at[k]` prompts that have it (None unless asked for)."""

    sites: Sites
    mean: dict[Key, np.ndarray]
    positional: dict[Key, np.ndarray] | None
    n_at: np.ndarray | None
    n_prompts: int
    n_tokens: int

    def arrays(self) -> dict[str, np.ndarray]:
        """Flat named arrays (for an .npz file); `from_arrays` reads them back."""
        out = {f"mean/{s}/{l}": v for (s, l), v in self.mean.items()}
        if self.positional is not None:
            out |= {f"positional/{s}/{l}": v for (s, l), v in self.positional.items()}
            out["n_at"] = self.n_at
        out["counts"] = np.asarray([self.n_prompts, self.n_tokens])
        return out

    @classmethod
    def from_arrays(cls, sites: Sites, arrays) -> ReferenceMeans:
        def keyed(prefix: str) -> dict[Key, np.ndarray]:
            return {(s, int(l)): np.asarray(arrays[name]) for name in arrays if name.startswith(prefix + "/")
                    for _, s, l in [name.split("/")]}

        pos = keyed("positional")
        n_prompts, n_tokens = (int(v) for v in arrays["counts"])
        return cls(sites, keyed("mean"), pos or None, np.asarray(arrays["n_at"]) if pos else None, n_prompts, n_tokens)

    def digest(self) -> str:
        """SHA-256 (first 16 hex digits) of every array, in a fixed order."""
        h = hashlib.sha256()
        for name, a in sorted(self.arrays().items()):
            h.update(name.encode())
            h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
        return h.hexdigest()[:16]


@dataclass
class Sources:
    """What non-zero kinds read in one `Scorer.score_tokens` call: the reference means (mean,
    mean_positional) and per-prompt caches (entry i is the activation that replaces scored prompt i's):
    `cache` the partners' (resample), `cross` the source model's on the same prompts (cross)."""

    means: ReferenceMeans | None = None
    cache: ActivationCache | None = None
    cross: ActivationCache | None = None


def check_sources(ablations: Sequence[Ablation], sources: Sources | None, lengths: Sequence[int]) -> None:
    """Refuse, before any forward, a non-zero kind whose source is missing or does not cover its components,
    and a cache whose prompts are not the scored prompts' lengths."""
    sources = sources or Sources()
    reference = Sites.of(ablations, ("mean", "mean_positional"))
    if reference:
        if sources.means is None or not sources.means.sites.covers(reference):
            raise ValueError("mean and mean_positional need the reference prompts' means of every component they "
                             "intervene on (Sources.means)")
        if any(a.kind == "mean_positional" for a in ablations):
            if sources.means.positional is None:
                raise ValueError("mean_positional needs positional reference means (computed with positional=True)")
            longest = len(sources.means.n_at)
            if max(lengths, default=0) > longest:
                i = int(np.argmax(lengths))
                raise ValueError(f"prompt {i} has {lengths[i]} tokens, more than the longest reference prompt "
                                 f"({longest}): mean_positional has no mean for its first positions")
    for kind, cache, field_name in (("resample", sources.cache, "cache"), ("cross", sources.cross, "cross")):
        cached = Sites.of(ablations, (kind,))
        if not cached:
            continue
        if cache is None or len(cache.entries) != len(lengths) or not cache.sites.covers(cached):
            raise ValueError(f"{kind} needs an activation cache with one entry per scored prompt covering every "
                             f"component it intervenes on (Sources.{field_name})")
        for i, (n, m) in enumerate(zip(lengths, cache.lengths())):
            if n != m:
                raise ValueError(f"{kind}: prompt {i} has {n} tokens but its cached activations {m}; the "
                                 "replacement is read at the same positions, so the two must be as long")


# --------------------------------------------------------------------------------------------
# edits of one forward chunk
# --------------------------------------------------------------------------------------------


@dataclass
class Replace:
    """Rows' replacement at one site of one layer: `values` `[rows, T or 1, k]` at input columns `cols`
    where `mask` `[rows, 1, k]` is set (a row of a non-zero kind intervening there)."""

    cols: torch.Tensor
    mask: torch.Tensor
    values: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`x` `[rows, T, width]`, or `[rows, width]` for the last position only; returns a new tensor (on x's
        device: a layer of a model split over devices gets its values there)."""
        # x may be a row's last positions only (verif.model.forward.SharedPrefix): values align to the right
        mask, values = (self.mask, self.values[:, -x.shape[1]:]) if x.dim() == 3 else (self.mask[:, 0], self.values[:, -1])
        cols, mask, values = (t.to(x.device) for t in (self.cols, mask, values))
        old = x.index_select(-1, cols)
        return x.index_copy(-1, cols, torch.where(mask, values.to(x.dtype), old))


@dataclass
class Edit:
    """What one chunk's rows do at one layer: replace (or read) head and neuron activations."""

    heads: Callable[[torch.Tensor], torch.Tensor] | None = None
    neurons: Callable[[torch.Tensor], torch.Tensor] | None = None

    def at_heads(self, a: torch.Tensor) -> torch.Tensor:
        return a if self.heads is None else self.heads(a)

    def at_neurons(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.neurons is None else self.neurons(z)


class UnitEdits:
    """The edits of one unit (prompts x conditions of one forward pass), built layer by layer.

    `at(layer, row_cond, row_prompt)` is the chunk's `Edit` (None where none of its rows replaces anything
    at that layer): `row_cond` the unit-local condition of each row (-1: a trunk row), `row_prompt` its
    unit-local prompt. One layer's replacement values are held at a time.
    """

    def __init__(self, ablations: Sequence[Ablation], sources: Sources | None, prompts: Sequence[int], seq: int,
                 head_dim: int, device: torch.device, dtype: torch.dtype):
        self.ablations = list(ablations)
        self.sources = sources or Sources()
        self.prompts = list(prompts)
        self.seq, self.head_dim, self.device, self.dtype = seq, head_dim, device, dtype
        self.code = np.array([_CODES.get(a.kind, -1) for a in self.ablations] + [-1])  # [-1]: trunk rows
        self.sites = Sites.of(self.ablations)
        self._layer: int | None = None
        self._built: dict[str, tuple | None] = {}

    def _build(self, key: Key) -> tuple | None:
        """(cols, per-condition mask [C + 1, k], mean [k], positional [T, k], cache [P, T, k], cross [P, T, k])
        at `key`."""
        site, layer = key
        ids = self.sites.layers(site).get(layer)
        if not ids:
            return None
        per = self.head_dim if site == "heads" else 1
        cols = self.sites.columns(key, self.head_dim)
        where = {c: j for j, c in enumerate(cols.tolist())}
        mask = np.zeros((len(self.ablations) + 1, len(cols)), dtype=bool)
        for c, a in enumerate(self.ablations):
            if a.kind == "zero":
                continue
            for lyr, i in a.heads if site == "heads" else a.neurons:
                if lyr == layer:
                    j = where[i * per]
                    mask[c, j:j + per] = True
        # a copy (arrays that came through Ray's object store are read-only)
        dev = lambda t: torch.tensor(np.asarray(t)).to(self.device, self.dtype)  # noqa: E731
        mean = positional = cache = None
        means, c = self.sources.means, self.sources.cache
        # A source covers its own kind's components (check_sources); columns it lacks are never read from it.
        if (self.code == _MEAN).any() and key in means.mean:
            mean = dev(self._subset(means.mean[key], means.sites, key, cols))
        if (self.code == _POSITIONAL).any() and key in means.positional:
            table = self._subset(means.positional[key], means.sites, key, cols)[: self.seq]
            positional = dev(np.flip(table, 0).copy())  # index t of the unit: seq - 1 - t positions before the last
        cache = self._per_prompt(_CACHE, c, key, cols)
        cross = self._per_prompt(_CROSS, self.sources.cross, key, cols)
        return (torch.from_numpy(cols).to(self.device), torch.from_numpy(mask).to(self.device), mean, positional,
                cache, cross)

    def _per_prompt(self, code: int, c: ActivationCache | None, key: Key, cols: np.ndarray) -> torch.Tensor | None:
        """`[P, T, k]`: the unit's prompts' cached activations at `key`, right-aligned (left padding is 0);
        None when no row of that code reads the cache here."""
        if not (self.code == code).any() or key not in c.sites.keys():
            return None
        out = torch.zeros(len(self.prompts), self.seq, len(cols), device=self.device, dtype=self.dtype)
        for p, i in enumerate(self.prompts):
            entry = self._subset(c.entries[i][key], c.sites, key, cols)
            out[p, self.seq - entry.shape[0]:] = torch.as_tensor(entry).to(self.device, self.dtype)
        return out

    def _subset(self, values, sites: Sites, key: Key, cols: np.ndarray):
        """The columns `cols` of an array over `sites`' columns at `key`: the source may hold more, and columns
        it does not hold (another kind's) are 0."""
        have = sites.columns(key, self.head_dim)
        if len(have) == len(cols) and (have == cols).all():
            return values
        pos = np.minimum(np.searchsorted(have, cols), len(have) - 1)
        present = have[pos] == cols
        if isinstance(values, torch.Tensor):
            out = values.new_zeros(*values.shape[:-1], len(cols))
            out[..., torch.from_numpy(present)] = values[..., torch.from_numpy(pos[present])]
            return out
        out = np.zeros(values.shape[:-1] + (len(cols),), dtype=values.dtype)
        out[..., present] = values[..., pos[present]]
        return out

    def _replace(self, key: Key, row_cond: np.ndarray, row_prompt: np.ndarray) -> Replace | None:
        built = self._built.get(key[0])
        if built is None:
            return None
        cols, mask, mean, positional, cache, cross = built
        codes = self.code[row_cond]  # row_cond -1 reads the trunk's entry (-1)
        if not (codes > 0).any():
            return None
        conds = torch.from_numpy(row_cond).to(self.device)
        row_mask = mask[conds][:, None, :]
        if not bool(row_mask.any()):
            return None
        full = ((codes == _POSITIONAL) | (codes == _CACHE) | (codes == _CROSS)).any()
        values = torch.zeros(len(row_cond), self.seq if full else 1, len(cols), device=self.device, dtype=self.dtype)
        for code, src in ((_MEAN, mean), (_POSITIONAL, positional)):
            rows = np.flatnonzero(codes == code)
            if len(rows) and src is not None:
                values[torch.from_numpy(rows).to(self.device)] = src
        for code, src in ((_CACHE, cache), (_CROSS, cross)):
            rows = np.flatnonzero(codes == code)
            if len(rows) and src is not None:
                values[torch.from_numpy(rows).to(self.device)] = src[torch.from_numpy(row_prompt[rows]).to(self.device)]
        return Replace(cols, row_mask, values)

    def at(self, layer: int, row_cond: np.ndarray, row_prompt: np.ndarray) -> Edit | None:
        if self._layer != layer:  # layers come in order: build this one, drop the last
            self._layer = layer
            self._built = {site: self._build((site, layer)) for site in SITES}
        edit = Edit(self._replace(("heads", layer), row_cond, row_prompt),
                    self._replace(("neurons", layer), row_cond, row_prompt))
        return edit if edit.heads is not None or edit.neurons is not None else None


class Capture:
    """Reads the activations at `sites` of every row (an unablated forward of prompts alone), as an edit
    that changes nothing; `entries` afterwards holds each prompt's `[length, columns]` per key."""

    def __init__(self, sites: Sites, prompts: Sequence[int], lengths: Sequence[int], seq: int, head_dim: int):
        self.sites, self.prompts, self.lengths, self.seq = sites, list(prompts), list(lengths), seq
        self.cols = {k: torch.from_numpy(sites.columns(k, head_dim)) for k in sites.keys()}
        self.entries: list[dict[Key, torch.Tensor]] = [{} for _ in self.prompts]

    def _reader(self, key: Key, row_prompt: np.ndarray):
        cols = self.cols[key]

        def read(x: torch.Tensor) -> torch.Tensor:
            if x.dim() != 3:
                raise ValueError("a capture needs every position: run it without last_position_only")
            got = x.index_select(-1, cols.to(x.device))
            for r, p in enumerate(row_prompt):
                self.entries[p][key] = got[r, self.seq - self.lengths[p]:].clone()
            return x

        return read

    def at(self, layer: int, row_cond: np.ndarray, row_prompt: np.ndarray) -> Edit | None:
        heads = ("heads", layer) in self.cols
        neurons = ("neurons", layer) in self.cols
        if not (heads or neurons):
            return None
        return Edit(self._reader(("heads", layer), row_prompt) if heads else None,
                    self._reader(("neurons", layer), row_prompt) if neurons else None)
