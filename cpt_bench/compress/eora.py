"""EoRA (Liu et al., arXiv 2410.21271): a training-free rank-r correction of each compressed Linear, fitted in the
eigenspace of its calibration inputs.

For a Linear ``W [out, in]`` compressed to ``Ŵ``, ``dW = W - Ŵ``, and calibration inputs ``X [in, n]``, EoRA chooses
``B [out, r]``, ``A [r, in]`` minimising the output error ``||(dW - B A) X||_F``; the layer then computes
``Ŵ x + B (A x)``. With the input covariance ``C = X X^T = Q diag(L) Q^T`` (any positive multiple of it gives the same
answer: the GPTQ Hessian ``H = 2 X X^T / n`` is used as it is, undamped):

1. eigendecompose ``C`` in float64 and drop the eigenvalues below ``L_max * len(L) * eps_float32`` (GPTQModel's
   cutoff), so rank-deficient covariances work: the dropped directions carry no input;
2. ``dW' = dW Q diag(sqrt(L))`` (the output error of a correction is its Frobenius error here);
3. ``U S V^T = svd(dW')``, top ``r``;
4. ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T diag(1/sqrt(L)) Q^T``.

A plain SVD of ``dW`` (ZeroQuant-V2's LoRC) is the case ``C = I``; EoRA's output error is never larger at the same rank.
With fewer kept eigenvalues than ``r``, ``A`` / ``B`` are padded with zero rows / columns to rank ``r`` exactly.

``Compensator`` does this inside ``sequential``'s layer-by-layer pass: each Linear is corrected right after it is
compressed, from the same Hessian, and the layer keeps ``Ŵ + B A``, so every later Linear's calibration inputs come
from the already compressed *and* compensated ones (as the authors and GPTQModel do). Errors are ``gptq.output_error``'s
unit: the mean over calibration tokens of the squared L2 norm of the output error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from cpt_bench.compress.gptq import output_error
from cpt_bench.errors import UserError

CUTOFF_EPS = torch.finfo(torch.float32).eps  # relative eigenvalue cutoff per eigenvalue (GPTQModel's)


class EoraError(UserError):
    """A bad EoRA setting (one-line message)."""


def check_rank(rank: object, flag: str = "--rank") -> int:
    """``rank`` as a positive int, or ``EoraError`` naming ``flag`` and the value."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise EoraError(f"{flag} must be a positive integer (the EoRA rank, e.g. 16), got {rank!r}")
    return rank


@dataclass(frozen=True)
class Eigenspace:
    """The kept eigenpairs of an input covariance: ``vectors [in, k]`` and ``values [k]`` (float64, all > 0)."""

    vectors: torch.Tensor
    values: torch.Tensor


def eigenspace(covariance: torch.Tensor) -> Eigenspace:
    """Eigendecomposition of a symmetric positive semi-definite ``covariance [in, in]`` in float64, eigenvalues below
    ``max(L) * in * eps_float32`` dropped (all of them when the covariance is zero)."""
    c = covariance.detach().double()
    values, vectors = torch.linalg.eigh((c + c.T) / 2)
    top = values.max().clamp_min(0)
    keep = values > top * values.numel() * CUTOFF_EPS if top > 0 else torch.zeros_like(values, dtype=torch.bool)
    return Eigenspace(vectors[:, keep], values[keep])


def _rank_r(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``B = U_r sqrt(S_r) [out, rank]`` and ``sqrt(S_r) V_r^T [rank, k]``, zero-padded to ``rank``."""
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b = torch.zeros(u.shape[0], rank, dtype=u.dtype, device=u.device)
    a = torch.zeros(rank, vh.shape[1], dtype=u.dtype, device=u.device)
    b[:, :r] = u[:, :r] * root
    a[:r] = root[:, None] * vh[:r]
    return a, b


def fit(delta: torch.Tensor, space: Eigenspace, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EoRA's rank-``rank`` correction of ``delta = W - Ŵ [out, in]`` in the eigenspace ``space`` of its inputs.

    Returns ``(A [rank, in], B [out, rank])`` float32 on ``delta``'s device, minimising ``||(delta - B A) X||_F``.
    """
    q, values = space.vectors.to(delta.device), space.values.to(delta.device)
    scale = values.sqrt()
    u, s, vh = torch.linalg.svd((delta.double() @ q) * scale, full_matrices=False)
    a, b = _rank_r(u, s, vh, rank)
    return ((a / scale) @ q.T).float(), b.float()


def plain_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``rank`` truncated SVD of ``delta [out, in]`` (LoRC), as ``(A [rank, in], B [out, rank])`` float32."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    a, b = _rank_r(u, s, vh, rank)
    return a.float(), b.float()


@dataclass
class EoraFit:
    """Every Linear's correction and its output errors on the calibration inputs.

    ``adapters``: module name -> ``(A [rank, in], B [out, rank])`` float32 on the CPU, in the order fitted;
    ``errors``: module name -> ``{"none", "svd", "eora"}``, the output error (``gptq.output_error``) of ``Ŵ``, of
    ``Ŵ`` plus the plain rank-``rank`` SVD of ``dW`` and of ``Ŵ + B A``; ``seconds``: time spent fitting;
    ``signature``: the first Linear's ``weight_signature`` of ``Ŵ`` (what the correction was fitted on)."""

    rank: int
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    errors: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    signature: dict | None = None

    def totals(self) -> dict[str, float]:
        """The output errors summed over Linears, per correction (``none``, ``svd``, ``eora``)."""
        return {key: sum(errors[key] for errors in self.errors.values()) for key in ("none", "svd", "eora")}


SIGNATURE_TOLERANCE = 0.02  # x sqrt(in) x rms(Ŵ): 16-bit storage moves a row sum far less, another compression more


def weight_signature(name: str, weight: torch.Tensor) -> dict:
    """What identifies a compressed weight ``[out, in]`` up to 16-bit storage: its row sums (float64) and their
    scale ``sqrt(in) * rms(weight)`` (a row sum of another compression differs by about that times its relative
    error, far more than ``SIGNATURE_TOLERANCE`` of it at 2-4 bits)."""
    w = weight.detach().double()
    return {"module": name, "row_sums": w.sum(1).cpu().tolist(),
            "scale": float(w.pow(2).mean().sqrt() * w.shape[1] ** 0.5)}


def signature_mismatch(signature: dict, weight: torch.Tensor) -> float | None:
    """The largest row-sum difference of ``weight`` from ``signature`` in units of its scale when it exceeds
    ``SIGNATURE_TOLERANCE`` (or the shapes differ: ``inf``); None when ``weight`` is the signed one."""
    sums = weight.detach().double().sum(1).cpu()
    expected = torch.tensor(signature["row_sums"], dtype=torch.float64)
    if sums.shape != expected.shape:
        return float("inf")
    worst = float((sums - expected).abs().max()) / max(signature["scale"], 1e-30)
    return worst if worst > SIGNATURE_TOLERANCE else None


class Compensator:
    """Fits EoRA for each Linear as the sequential pass compresses it (``sequential.compress_model``'s
    ``compensator``); ``fit`` holds the result. Linears sharing one Hessian share its eigendecomposition."""

    def __init__(self, rank: int) -> None:
        self.fit = EoraFit(check_rank(rank, "EoRA rank"))
        self._last: tuple[torch.Tensor, Eigenspace] | None = None

    def compensate(self, name: str, original: torch.Tensor, compressed: torch.Tensor,
                   hessian: torch.Tensor) -> torch.Tensor:
        """Fit Linear ``name``'s correction from ``original`` / ``compressed`` weights ``[out, in]`` and its
        calibration Hessian ``[in, in]``; return the weight the layer runs with, ``Ŵ + B A`` (``compressed``'s
        dtype)."""
        started = time.perf_counter()
        if self._last is None or self._last[0] is not hessian:
            self._last = (hessian, eigenspace(hessian))
        delta = original.float() - compressed.float()
        a, b = fit(delta, self._last[1], self.fit.rank)
        corrected = compressed.float() + b @ a
        svd_a, svd_b = plain_svd(delta, self.fit.rank)
        self.fit.errors[name] = {"none": output_error(original, compressed, hessian),
                                 "svd": output_error(original, compressed.float() + svd_b @ svd_a, hessian),
                                 "eora": output_error(original, corrected, hessian)}
        self.fit.adapters[name] = (a.cpu(), b.cpu())
        if self.fit.signature is None:
            self.fit.signature = weight_signature(name, compressed)
        self.fit.seconds += time.perf_counter() - started
        return corrected.to(compressed.dtype)
