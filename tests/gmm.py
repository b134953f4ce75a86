"""An isotropic Gaussian mixture with an exact EDM denoiser: a ground truth for samplers without trained weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GaussianMixture:
    weights: torch.Tensor   # (K,)
    means: torch.Tensor     # (K, d)
    stds: torch.Tensor      # (K,)

    def _responsibilities(self, x: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        d = x.shape[1]
        sq = torch.cdist(x, self.means).pow(2)                                    # (B, K)
        log_p = self.weights.log() - 0.5 * d * var.log() - sq / (2 * var)
        return log_p.softmax(dim=1)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """E[x0 | x0 + sigma n = x]; with label (B, K) one-hot, the posterior of that component alone
        (an all-zero row means no label: the whole mixture)."""
        x64, s = x.double(), sigma.double().reshape(-1, 1)
        var = self.stds.pow(2) + s**2                                             # (B, K)
        r = self._responsibilities(x64, var)
        if label is not None:
            labelled = label.double().sum(1, keepdim=True) > 0
            r = torch.where(labelled, label.double(), r)
        shrink = self.stds.pow(2) / var                                           # (B, K)
        per_k = self.means + shrink[..., None] * (x64[:, None] - self.means)      # (B, K, d)
        return (r[..., None] * per_k).sum(1).to(x.dtype)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Component index of each sample, by the posterior at sigma -> 0."""
        var = self.stds.pow(2).expand(x.shape[0], -1)
        return self._responsibilities(x.double(), var).argmax(1)

    def stats_error(self, x: torch.Tensor) -> dict[str, float]:
        """Largest errors of the samples' component weights, means and variances against the truth."""
        k = self.assign(x)
        err = {"weight": 0.0, "mean": 0.0, "var_rel": 0.0}
        for i in range(len(self.weights)):
            xi = x[k == i].double()
            err["weight"] = max(err["weight"], abs(len(xi) / len(x) - float(self.weights[i])))
            err["mean"] = max(err["mean"], float((xi.mean(0) - self.means[i]).abs().max()))
            var = float(xi.var(0).mean())
            err["var_rel"] = max(err["var_rel"], abs(var / float(self.stds[i]) ** 2 - 1))
        return err


def toy_mixture() -> GaussianMixture:
    return GaussianMixture(
        weights=torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
        means=torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=torch.float64),
        stds=torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64),
    )
