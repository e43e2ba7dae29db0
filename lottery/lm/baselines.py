"""The controls a pruned transformer is compared with, at its parameter count.

  scratch  a uniform dense model of (about) the same size, trained from a fresh
           initialisation for as many steps as the pruned model has had in all (pretraining
           plus every fine-tuning round). Its shape (`matching_config`): the pruned model's
           number of layers, d_model, head_dim and context; heads per layer = the pruned
           model's mean, rounded (at least 1); the FFN width then solved so that the
           parameter count is as close as it can be (within L * (2 d + 1) / 2 parameters).
  ticket   the pruned architecture with its surviving weights rewound to their values at
           initialisation (`compact(dense config, init params, masks)` slices exactly the
           kept units out of the dense model's initial weights), trained for the same steps.
"""

from lottery.lm import gpt
from lottery.lm.compact import compact


def matching_config(pruned: gpt.GPTConfig, target_params: int) -> gpt.GPTConfig:
    """A uniform config with the pruned model's depth and widths and ~`target_params`."""
    layers, d = pruned.layers, pruned.d_model
    heads = max(1, round(sum(pruned.heads) / layers))
    per_unit = layers * (2 * d + 1)  # one more FFN unit in every layer: w1 column, b1, w2 row
    while True:
        def sized(ffn):
            return gpt.GPTConfig(pruned.vocab, pruned.context, d, pruned.head_dim,
                                 (heads,) * layers, (ffn,) * layers)
        ffn = 1 + round((target_params - gpt.param_count(sized(1))) / per_unit)
        if ffn >= 1 or heads == 1:
            return sized(max(ffn, 1))
        heads -= 1


def ticket(config: gpt.GPTConfig, init_params: dict, masks):
    """(config, params): the kept units' initial weights, in the pruned architecture."""
    return compact(config, init_params, masks)
