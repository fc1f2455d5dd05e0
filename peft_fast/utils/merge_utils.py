"""Task-vector merging for `add_weighted_adapter` (same names and numbers as `peft.utils.merge_utils`).

Each function takes the per-adapter tensors ("task tensors", all of one shape) and a 1-d tensor of
weights, and returns one merged tensor:

- task arithmetic: sum_i w_i t_i
- magnitude_prune: task arithmetic after keeping the `density` fraction of largest |t_i| entries
- TIES (Yadav et al., 2023, arXiv:2306.01708): magnitude pruning, a majority sign per entry
  (by total mass or by count), then the mean of the weighted entries that agree with it
- DARE (Yu et al., 2023, arXiv:2311.03099): random pruning (Bernoulli(density) mask, rescaled by
  1/density), then task arithmetic (dare_linear) or TIES' sign election (dare_ties)

Random pruning draws one `torch.bernoulli` per task tensor, in order, from the default generator,
as PEFT does: the same seed gives the same merged adapter.
"""
from __future__ import annotations

import warnings
from typing import Literal

import torch


def reshape_weight_task_tensors(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`weights` [n] viewed as [n, 1, ...] to broadcast against the stacked task tensors [n, ...]."""
    return weights.view(weights.shape + (1,) * (task_tensors.dim() - weights.dim()))


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """`tensor` with all but its int(density * numel) largest-magnitude entries set to zero."""
    mask = torch.zeros_like(tensor).reshape(-1)
    k = int(density * tensor.numel())
    top_k = torch.topk(tensor.abs().reshape(-1), k=k, largest=True)
    mask[top_k[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Each entry kept with probability `density` (divided by `density` if `rescale`)."""
    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density))
    pruned = tensor * mask
    return pruned / density if rescale else pruned


def prune(tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"],
          rescale: bool = False) -> torch.Tensor:
    """Prune `tensor` to the fraction `density` by `method` ("magnitude" or "random")."""
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.")
        return tensor
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    if method == "random":
        return random_pruning(tensor, density, rescale=rescale)
    raise ValueError(f"Unknown method {method}")


def calculate_majority_sign_mask(tensor: torch.Tensor,
                                 method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """Bool mask [n, ...]: which entries of the stacked task tensors carry the majority sign
    ("total": sign of the sum; "frequency": the more frequent sign; ties count as positive)."""
    sign = tensor.sign()
    if method == "total":
        sign_magnitude = tensor.sum(dim=0)
    elif method == "frequency":
        sign_magnitude = sign.sum(dim=0)
    else:
        raise RuntimeError(f'Unimplemented mask method "{method}"')
    majority_sign = torch.where(sign_magnitude >= 0, 1, -1)
    return sign == majority_sign


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the task tensors [n, ...] of the entries in the mask (0 where none is)."""
    mixed = (task_tensors * majority_sign_mask).sum(dim=0)
    kept = majority_sign_mask.sum(dim=0)
    return mixed / torch.clamp(kept, min=1.0)


def _weighted_sum(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack(task_tensors, dim=0)
    return (stacked * reshape_weight_task_tensors(stacked, weights)).sum(dim=0)


def _sign_elected(task_tensors: list[torch.Tensor], weights: torch.Tensor, majority_sign_method) -> torch.Tensor:
    stacked = torch.stack(task_tensors, dim=0)
    mask = calculate_majority_sign_mask(stacked, method=majority_sign_method)  # on the unweighted tensors
    return disjoint_merge(stacked * reshape_weight_task_tensors(stacked, weights), mask)


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_i weights[i] * task_tensors[i]."""
    return _weighted_sum(task_tensors, weights)


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """Task arithmetic of the magnitude-pruned task tensors."""
    return _weighted_sum([prune(t, density, method="magnitude") for t in task_tensors], weights)


def ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
         majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """TIES: magnitude pruning, sign election, disjoint mean."""
    return _sign_elected([prune(t, density, method="magnitude") for t in task_tensors], weights,
                         majority_sign_method)


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: rescaled random pruning, then task arithmetic."""
    return _weighted_sum([prune(t, density, method="random", rescale=True) for t in task_tensors], weights)


def dare_ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
              majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """DARE pruning with TIES' sign election and disjoint mean."""
    return _sign_elected([prune(t, density, method="random", rescale=True) for t in task_tensors], weights,
                         majority_sign_method)


# combination_type of add_weighted_adapter -> merge function (the "_svd" forms merge delta weights)
MERGE_FUNCTIONS = {
    "linear": task_arithmetic, "svd": task_arithmetic,
    "ties": ties, "ties_svd": ties,
    "dare_linear": dare_linear, "dare_linear_svd": dare_linear,
    "dare_ties": dare_ties, "dare_ties_svd": dare_ties,
    "magnitude_prune": magnitude_prune, "magnitude_prune_svd": magnitude_prune,
}


def merge_task_tensors(combination_type: str, task_tensors: list[torch.Tensor], weights: torch.Tensor,
                       density, majority_sign_method: str) -> torch.Tensor:
    """Dispatch on `combination_type` with the arguments each method takes."""
    fn = MERGE_FUNCTIONS[combination_type]
    if fn is task_arithmetic:
        return fn(task_tensors, weights)
    if fn in (ties, dare_ties):
        return fn(task_tensors, weights, density, majority_sign_method)
    return fn(task_tensors, weights, density)


def check_merge_arguments(combination_type: str, density, majority_sign_method: str) -> None:
    """Refuse, before anything changes, a `density` or `majority_sign_method` that the method of
    `combination_type` would fail on half-way through the layers."""
    fn = MERGE_FUNCTIONS.get(combination_type)
    if fn is None or fn is task_arithmetic:
        return
    if isinstance(density, bool) or not isinstance(density, (int, float)) or density != density:
        raise ValueError(f"add_weighted_adapter: combination_type={combination_type!r} needs `density`, a number "
                         f"in [0, 1] (the fraction of values kept), got {density!r}")
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    if fn in (ties, dare_ties) and majority_sign_method not in ("total", "frequency"):
        raise RuntimeError(f'Unimplemented mask method "{majority_sign_method}"')
