"""How far apart two floating-point results may be: tolerances derived from the dtype and the computation.

u is the unit roundoff (half the gap from 1 to the next float): U32 = 2^-24 = 6.0e-8, U64 = 2^-53 = 1.1e-16.

Reductions. A sum or dot product of n terms computed in any order (sequential, blocked, pairwise, with FMA,
split over threads) is off by at most gamma(n) = n*u / (1 - n*u) times the sum of |terms| (Higham, Accuracy
and Stability of Numerical Algorithms, 2nd ed., sec. 3.1). That bound is rigorous and holds on every CPU and
BLAS. Rounding errors of random sign make the usual error ~sqrt(n)*u*sum|terms| instead; `reorder_rel` uses
that where the rigorous bound would be too loose to catch a bug (long float64 sums).

Whole forwards. A layer's rounding is amplified by the layers after it, by a factor that depends on the
weights. The shape-only estimate L * sqrt(d) * u32 * max|logit| fits the seed-shaped random model (init 0.2,
chaotic: measured 1.5x that estimate), while the same shape at init 0.05 and SmolLM2 stay 25-30x below it
(measured against float64 copies). So the error of a whole float32 forward cannot be derived from the shapes
alone; `forward_rounding` measures it on the machine running the tests: delta, the largest |float32 logit -
float64 logit| of the model's own forward at each position of a few prompts. Two float32 computations that
reduce in different orders (batch shapes, padding, kernels, thread counts, CPUs) each carry an error of that
size; `ScoreTol.between_forwards` turns delta into bounds on the scores.
"""

from __future__ import annotations

import copy
import math
import types
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from verif.model.ablation import HookedAblation, head_masks

U32 = 2.0**-24
U64 = 2.0**-53
# A tolerance on p_yes_norm at or above this would let a bug that moves a probability by 1e-3 pass.
MEANINGFUL_NORM = 1e-3


def gamma(n: int, u: float) -> float:
    """Rigorous relative bound (to the sum of |terms|) of a sum of n terms in any order."""
    assert n * u < 0.5, (n, u)
    return n * u / (1 - n * u)


def reorder_rel(n: int, u: float = U64) -> float:
    """Two summation orders of n same-sign terms differ by ~sqrt(n/3)*u relative each (random-walk rounding);
    2*sqrt(n)*u is about 6 standard deviations of their difference."""
    return 2 * math.sqrt(n) * u


# ---------------------------------------------------------------------------------------------- forwards


def _rms_norm_float64(self, x: torch.Tensor) -> torch.Tensor:
    """transformers' LLaMA-style RMSNorm arithmetic without its cast to float32."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


# RMSNorms computing weight * x / rms(x) (in float32, which the copy drops).
_LLAMA_STYLE_NORMS = frozenset({"Qwen2RMSNorm", "Qwen3RMSNorm", "LlamaRMSNorm", "MistralRMSNorm", "Phi3RMSNorm"})


def float64_copy(model: nn.Module) -> nn.Module:
    """A float64 copy that computes in float64 throughout.

    transformers' RMSNorm casts to float32 whatever the model dtype, which would leave float32 rounding at
    every norm of a `.double()` copy; each norm's forward is re-pointed at the same arithmetic in float64.
    The modules keep their classes, so the engine still sees the family it knows (and takes its fast path).
    A norm with another formula (Gemma's 1 + w) is refused rather than left in float32.
    """
    model64 = copy.deepcopy(model).double()
    for module in model64.modules():
        name = type(module).__name__
        if name in _LLAMA_STYLE_NORMS:
            module.forward = types.MethodType(_rms_norm_float64, module)
        elif "RMSNorm" in name:
            raise NotImplementedError(f"float64_copy: no float64 formula for {name} (tests/tolerances.py)")
    return model64


@torch.inference_mode()
def forward_rounding(loaded, token_ids: Sequence[Sequence[int]], head_sets: Sequence = ((),)) -> np.ndarray:
    """delta per position: the largest |logit(float32 forward) - logit(float64 forward)| of `loaded`'s own
    forward at that position, over the prompts (each alone: nothing padded) and head sets (hook ablation).

    The float64 copy's own rounding is 2^-29 of the float32 one, so the difference is the float32 model's
    rounding error, amplified as this model amplifies it.
    """
    model32 = loaded.model
    assert next(model32.parameters()).dtype == torch.float32, "forward_rounding measures a float32 model"
    model64 = float64_copy(model32)
    worst = np.zeros(max(len(t) for t in token_ids))
    with HookedAblation(model32, loaded.arch) as h32, HookedAblation(model64, loaded.arch) as h64:
        for heads in head_sets:
            h32.masks = h64.masks = head_masks([list(heads)], loaded.arch)
            for toks in token_ids:
                ids = torch.tensor([list(toks)])
                a = model32(input_ids=ids, use_cache=False, logits_to_keep=0).logits[0]
                b = model64(input_ids=ids, use_cache=False, logits_to_keep=0).logits[0]
                err = (a.double() - b).abs().amax(-1).numpy()
                worst[: len(err)] = np.maximum(worst[: len(err)], err)
    return worst


# ---------------------------------------------------------------------------------------------- scores


@dataclass(frozen=True)
class ScoreTol:
    """Absolute tolerances on a score table: `log` on log p_yes, log p_no and the log-odds, `norm` on p_yes_norm.

    Log-space is where the error lives: a logit error e moves log p by at most 2e whatever p is, so a
    relative tolerance on a probability of 1.5e-5 is the same as one on a probability of 0.5.
    """

    log: float
    norm: float

    @classmethod
    def between_forwards(cls, delta: float) -> ScoreTol:
        """Two forwards of a model whose single-forward logit error is `delta` (`forward_rounding`).

        Their logits differ by at most 2*delta, x1.5 because delta is the maximum of one rounding pattern and
        another pattern's maximum may be larger: 3*delta. log p_yes = LSE(yes logits) - LSE(all logits) and
        the log-odds = LSE(yes) - LSE(no) are differences of two log-sum-exps, each of which moves by at most
        the largest logit change: 6*delta. p_yes_norm = sigmoid(log-odds) has slope <= 1/4: 1.5*delta.
        """
        tol = cls(log=6 * delta, norm=1.5 * delta)
        if not tol.norm < MEANINGFUL_NORM:
            raise ValueError(
                f"float rounding of this model (delta={delta:.2e}) allows p_yes_norm to differ by {tol.norm:.2e}: "
                f"a test at that tolerance could not see a 1e-3 error; compare float64 copies instead"
            )
        return tol

    @classmethod
    def float64_forwards(cls, delta32: float) -> ScoreTol:
        """Two float64 forwards of a model whose float32 forward errs by `delta32`: the same operations
        round U64/U32 = 2^-29 as much."""
        return cls.between_forwards(delta32 * U64 / U32)


def _field(table, name: str) -> np.ndarray:
    return np.asarray(table[name] if isinstance(table, dict) else getattr(table, name), dtype=np.float64)


def assert_scores_close(got, want, tol: ScoreTol, what: str = "") -> None:
    """Compare two score tables (objects with p_yes, p_no, p_yes_norm, log_odds, or dicts of arrays)."""
    np.testing.assert_allclose(_field(got, "log_odds"), _field(want, "log_odds"), rtol=0, atol=tol.log,
                               err_msg=f"{what}: log_odds")  # fmt: skip
    for name in ("p_yes", "p_no"):  # |d log p| <= tol.log, i.e. a relative tolerance on p
        np.testing.assert_allclose(_field(got, name), _field(want, name), rtol=math.expm1(tol.log), atol=0,
                                   err_msg=f"{what}: {name}")  # fmt: skip
    np.testing.assert_allclose(_field(got, "p_yes_norm"), _field(want, "p_yes_norm"), rtol=0, atol=tol.norm,
                               err_msg=f"{what}: p_yes_norm")  # fmt: skip
