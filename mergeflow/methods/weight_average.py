"""Weight averaging: the mean of the fine-tuned weights, theta_0 + mean_t tau_t."""
import torch

from mergeflow.methods import register


@register("weight_average", reference="Wortsman et al., Model soups, ICML 2022", blockwise=True)
def weight_average(name, base, taus):
    """Mean of the fine-tuned models."""
    total = taus[0].clone()
    for tau in taus[1:]:
        total += tau
    return total.div_(len(taus))
