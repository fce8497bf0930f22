"""Weight averaging: the mean of the fine-tuned weights, theta_0 + mean_t tau_t."""
import torch

from mergeflow.methods import register


@register("weight_average", reference="Wortsman et al., Model soups, ICML 2022")
def weight_average(name, base, taus):
    """Mean of the fine-tuned models."""
    return torch.stack(list(taus)).mean(0)
