"""MonteCLoRA (Monte Carlo Low-Rank Adaptation) for Linear layers (L3).

Each adapter gets a `MontecloraSampler` (``lora_monteclora_sampler[name]``) holding variational
parameters. In training mode lora_A^T [in, r] is replaced by a Dirichlet-weighted average of
`num_samples` copies perturbed by Gaussian noise whose covariance is Wishart-reparametrized:
``A_eff^T = sum_n w_n (A^T + noise_n)``; eval mode and merges use plain LoRA. The noise comes from
pre-drawn buffers (`BufferedMontecloraSampler`), drawn from torch's global RNG in PEFT's order, so
the same seed gives the same samples as PEFT. `LoraModel._get_monteclora_loss` gives the KL and
entropy terms to add to the task loss.

Forward path: PEFT's formula (composite path) in training mode (a different A per step); in eval
mode the layer is plain LoRA and keeps the fused op.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions.wishart import Wishart

from ...utils.other import infer_device
from .variants import LoraVariant


class BufferedMontecloraSampler:
    """Pre-draws `buffer_size` sets of standard normal / Wishart samples and hands them out one by one."""

    def __init__(self, model: "MontecloraSampler", buffer_size: int = 150, device=None) -> None:
        self.model = model
        self.device = device if device is not None else infer_device()
        self.buffer_size = buffer_size
        self.buffer: list[dict[str, torch.Tensor]] = []
        self.index = 0
        self.wish_sampler = Wishart(df=model.out_features, scale_tril=torch.eye(model.out_features, device=self.device))
        self._refill_buffer()

    def _refill_buffer(self) -> None:
        m = self.model
        dtype = m.dtype
        with torch.no_grad():
            z_mvn = torch.randn((self.buffer_size, m.num_samples, m.in_features, m.out_features),
                                device=self.device, dtype=dtype)  # [buf, n, in, r]
            z_dirichlet = torch.randn((self.buffer_size, m.num_samples), device=self.device, dtype=dtype)
            self.buffer = []
            for i in range(self.buffer_size):
                # Wishart draws are unstable in low precision: fp32, then cast
                z_wishart = self.wish_sampler._bartlett_sampling(torch.Size()).to(self.device)
                if dtype is not None:
                    z_wishart = z_wishart.to(dtype)
                self.buffer.append({"z_mvn": z_mvn[i], "z_wishart": z_wishart, "z_dirichlet": z_dirichlet[i]})
        self.index = 0

    def get(self) -> dict[str, torch.Tensor]:
        if self.index >= self.buffer_size:
            self._refill_buffer()
        sample = self.buffer[self.index]
        self.index += 1
        return sample


class MontecloraSampler(nn.Module):
    """Variational parameters of one adapter: `std_prior` [r], `expert_weights_prior` [n] (trained),
    buffers `gaussian_var_prior` [r, r] and `expert_weights` [n] (last sample's state)."""

    def __init__(self, in_features: int, out_features: int, num_samples: int, use_entropy: bool = True,
                 dirichlet_prior: float = 1.0, sample_scaler: float = 3e-4, kl_loss_weight: float = 1e-5,
                 buffer_size: int = 10, device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                 **kwargs) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.num_samples = num_samples
        self.use_entropy = use_entropy
        self.device = device if device is not None else infer_device()
        self.dtype = dtype
        self.sample_scaler = sample_scaler
        self.kl_loss_weight = kl_loss_weight
        self.dirichlet_prior = dirichlet_prior
        self.std_prior = nn.Parameter(torch.rand(out_features, dtype=dtype))
        self.expert_weights_prior = nn.Parameter(torch.rand(num_samples, dtype=dtype))
        self.register_buffer("gaussian_var_prior", torch.eye(out_features, dtype=dtype))
        self.register_buffer("expert_weights", torch.ones(num_samples, dtype=dtype) / num_samples)
        self.sampler = BufferedMontecloraSampler(self, buffer_size=buffer_size, device=self.device)
        self.to(self.device)

    def wishart_reparameterization(self, std: torch.Tensor, z_wishart: torch.Tensor) -> torch.Tensor:
        var = std @ z_wishart @ std.T
        return torch.diag(torch.clip(var.diag(), min=1e-3))

    def multivariate_reparameterization(self, z_mvn: torch.Tensor, cov_matrix: torch.Tensor) -> torch.Tensor:
        # Cholesky in fp32 even under autocast (NaNs / not positive-definite in fp16/bf16)
        with torch.amp.autocast("cuda", enabled=False):
            L = torch.linalg.cholesky(cov_matrix.float())
        L = L.to(cov_matrix.dtype)
        varsum = torch.nan_to_num(torch.einsum("eio,op->eip", z_mvn, L), nan=1e-3)
        return self.sample_scaler * varsum

    def dirichlet_reparameterization(self, alpha: torch.Tensor, z_dirichlet: torch.Tensor) -> torch.Tensor:
        eps = 1e-6
        alpha = torch.clamp(alpha, min=eps)
        mu = torch.log(alpha) - torch.log(alpha).mean()
        # Dirichlet approximated by a normal in log space (Laplace approximation)
        diag_term = 1 / alpha * (1 - 2 / self.num_samples) + 1 / (self.num_samples ** 2) * (1 / alpha).sum()
        sigma = torch.diag(torch.clamp(diag_term, min=eps))
        sigma = sigma + eps * torch.eye(len(alpha), device=self.expert_weights_prior.device)
        with torch.amp.autocast("cuda", enabled=False):
            try:
                L = torch.linalg.cholesky(sigma.float())
            except torch.linalg.LinAlgError:
                sigma = sigma + 1e-4 * torch.eye(len(alpha), device=self.expert_weights_prior.device)
                L = torch.linalg.cholesky(sigma.float())
        return L.to(sigma.dtype) @ z_dirichlet + mu

    def dirichlet_kl(self, alpha2: torch.Tensor) -> torch.Tensor:
        alpha1 = torch.tensor([self.dirichlet_prior] * self.num_samples, device=self.expert_weights_prior.device)

        def gamma(x: torch.Tensor) -> torch.Tensor:
            return torch.lgamma(x).exp()

        return (
            torch.log(gamma(alpha2.sum()) / gamma(alpha1.sum()))
            + (torch.log(gamma(alpha2) / gamma(alpha1))).sum()
            + ((alpha2 - alpha1) * (torch.digamma(alpha2) - torch.digamma(alpha2.sum()))).sum()
        )

    def wishart_kl(self, std: torch.Tensor) -> torch.Tensor:
        var = torch.diag((std @ std.T).diag())
        n = self.out_features
        return 0.5 * (-torch.log(var).trace() * n + var.trace() * n - n ** 2)

    def multivariate_kl(self, var: torch.Tensor) -> torch.Tensor:
        var = torch.clamp(var, min=1e-6)
        return self.num_samples * 0.5 * (var.trace() - torch.log(var).trace() - self.out_features)

    def get_variational_loss(self):
        """(kl_loss_weight * KL, entropy) in training mode, (0.0, 0.0) in eval mode."""
        if not self.training:
            return 0.0, 0.0
        kl1 = self.dirichlet_kl(torch.exp(self.expert_weights_prior))
        kl2 = self.wishart_kl(torch.diag(torch.exp(self.std_prior)))
        kl3 = self.multivariate_kl(self.gaussian_var_prior)
        entropy = (self.expert_weights ** 2).sum() if self.use_entropy else 0
        return self.kl_loss_weight * (kl1 + kl2 + kl3), entropy

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise [n, in, r], expert weights [n]) for one training step."""
        device, dtype = self.std_prior.device, self.std_prior.dtype
        sample = self.sampler.get()
        z_mvn = sample["z_mvn"].to(device=device, dtype=dtype)
        z_wishart = sample["z_wishart"].to(device=device, dtype=dtype)
        z_dirichlet = sample["z_dirichlet"].to(device=device, dtype=dtype)
        std = torch.diag(torch.exp(self.std_prior))
        gaussian_var = self.wishart_reparameterization(std, z_wishart)
        self.gaussian_var_prior = gaussian_var
        var = self.multivariate_reparameterization(z_mvn, gaussian_var)
        logits = self.dirichlet_reparameterization(torch.exp(self.expert_weights_prior), z_dirichlet)
        self.expert_weights = torch.softmax(logits, dim=-1)
        return var, self.expert_weights


class MontecloraLinearVariant(LoraVariant):
    @staticmethod
    def fusable(module) -> bool:
        return not module.training  # eval mode is plain LoRA

    @staticmethod
    def init(module, adapter_name: str, config=None, **kwargs: Any) -> None:
        if not hasattr(module, "lora_monteclora_sampler"):
            module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_monteclora_sampler",)
            module.lora_monteclora_sampler = nn.ModuleDict()
        if not hasattr(module, "_lora_monteclora_config"):
            module._lora_monteclora_config = {}
        module._lora_monteclora_config[adapter_name] = config.monteclora_config
        if module.lora_A[adapter_name].weight.device.type != "meta":  # else: created at the first forward
            module.lora_monteclora_sampler[adapter_name] = MontecloraLinearVariant._create_sampler(
                module, adapter_name, config.monteclora_config)

    @staticmethod
    def _create_sampler(module, adapter_name: str, cfg) -> MontecloraSampler:
        A = module.lora_A[adapter_name]
        return MontecloraSampler(
            in_features=module.in_features, out_features=A.out_features, num_samples=cfg.num_samples,
            use_entropy=cfg.use_entropy, dirichlet_prior=cfg.dirichlet_prior, sample_scaler=cfg.sample_scaler,
            kl_loss_weight=cfg.kl_loss_weight, buffer_size=cfg.buffer_size, device=A.weight.device,
            dtype=A.weight.dtype,
        )

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        A, B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        dropout, scaling = module.lora_dropout[active_adapter], module.scaling[active_adapter]
        if active_adapter not in module.lora_monteclora_sampler:
            module.lora_monteclora_sampler[active_adapter] = MontecloraLinearVariant._create_sampler(
                module, active_adapter, module._lora_monteclora_config[active_adapter])
        sampler = module.lora_monteclora_sampler[active_adapter]
        x = x.to(A.weight.dtype)
        x_dropped = x if isinstance(dropout, nn.Identity) or not module.training else dropout(x)
        weight_A = A.weight
        if module.training:
            noise, weights = sampler()
            if torch.isnan(noise).any() or torch.isnan(weights).any():
                warnings.warn("Monteclora sampling produced NaNs, using base weights.")
            else:
                perturbed = A.weight.T + torch.nan_to_num(noise, nan=0.0)  # [n, in, r]
                weight_A = torch.einsum("n,nij->ij", weights, perturbed).T
        return result + B(F.linear(x_dropped, weight_A)) * scaling


def monteclora_loss(model: nn.Module, adapter_names: list[str]):
    """Mean over the MonteCLoRA samplers of `adapter_names` of (KL + entropy); 0.0 if there are none."""
    total, n = 0.0, 0
    for module in model.modules():
        samplers = getattr(module, "lora_monteclora_sampler", None)
        if not isinstance(samplers, nn.ModuleDict):
            continue
        for name in adapter_names:
            if name in samplers:
                kl, entropy = samplers[name].get_variational_loss()
                total = total + kl + entropy
                n += 1
    return total / n if n else 0.0
