"""One round of structured pruning: the lowest-scored heads, FFN units or layers gated off.

`remove_lowest(scores, masks, structures, fraction)` returns new 0/1 masks (NumPy, the
`gpt.full_masks` layout) with, for each kind in `structures`, `fraction` of that kind's
surviving units removed (rounded, at least one), lowest score first, ranked across all
layers. Layers go first (at least one layer always stays); heads and FFN units are then
chosen among the surviving layers, and a layer always keeps at least one head and one FFN
unit (a layer goes only through its layer gate), so the result always passes
`compact.check_masks`. `remove_to_target` shrinks the round that crosses a budget so that
it lands on the budget rather than past it. `request_masks` turns an explicit removal
request (the config's `prune.remove`) into masks for `check_masks` to judge.
"""

import numpy as np

from lottery.lm import gpt

STRUCTURES = ("heads", "ffn", "layers")


def _copy(masks) -> dict:
    return {"heads": [np.array(m, np.float32) for m in masks["heads"]],
            "ffn": [np.array(m, np.float32) for m in masks["ffn"]],
            "layers": np.array(masks["layers"], np.float32)}


def _count(fraction: float, alive: int) -> int:
    return max(1, int(round(fraction * alive))) if alive else 0


def remove_lowest(scores: dict, masks, structures, fraction: float) -> dict:
    """New masks with the lowest-scored `fraction` of each kind's surviving units removed
    (see the module docstring); the same masks if nothing can be removed."""
    masks = _copy(masks)
    if "layers" in structures:
        alive = np.flatnonzero(masks["layers"])
        n = min(_count(fraction, alive.size), alive.size - 1)
        for layer in alive[np.argsort(np.asarray(scores["layers"])[alive], kind="stable")][:n]:
            masks["layers"][layer] = 0
    live_layers = np.flatnonzero(masks["layers"])
    for kind in ("heads", "ffn"):
        if kind not in structures:
            continue
        candidates = [(float(scores[kind][layer][unit]), int(layer), int(unit))
                      for layer in live_layers for unit in np.flatnonzero(masks[kind][layer])]
        left = {int(layer): int(np.count_nonzero(masks[kind][layer])) for layer in live_layers}
        n = _count(fraction, len(candidates))
        for _, layer, unit in sorted(candidates):
            if n == 0:
                break
            if left[layer] > 1:
                masks[kind][layer][unit] = 0
                left[layer] -= 1
                n -= 1
    return masks


def last_over(trial, fits, high: float, below, above, iterations: int = 40) -> tuple:
    """(below, above): `trial(x)` at the largest x in [0, high] found whose result does not
    `fit`, and at the smallest found that does, by bisection (removal grows with x, so
    fitting does too); `below` and `above` are the results at 0 and `high`."""
    low = 0.0
    for _ in range(iterations):
        middle = (low + high) / 2
        result = trial(middle)
        if fits(result):
            high, above = middle, result
        else:
            low, below = middle, result
    return below, above


def first_fitting(fits, low: int, high: int) -> int:
    """The smallest n in (low, high] with `fits(n)`, given not `fits(low)`, `fits(high)` and
    fitting growing with n (bisection)."""
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def remove_to_target(scores: dict, masks, structures, fraction: float, fits) -> dict:
    """`remove_lowest` with `fraction`, unless its result `fits` (a predicate on masks, e.g.
    "at most N parameters"): then only what reaching the target needs, so that a round
    crossing a budget lands on it rather than past it. The largest fraction whose result
    does not fit yet is found by bisection (removal grows with the fraction); from there the
    lowest-scored FFN units go one by one (when `ffn` is a chosen kind) until it fits, so the
    result lands within one FFN unit of the target, else within one step of the fraction."""
    result = remove_lowest(scores, masks, structures, fraction)
    if not fits(result):
        return result
    below, result = last_over(lambda x: remove_lowest(scores, masks, structures, x), fits,
                              fraction, masks, result)  # below: does not fit
    if "ffn" not in structures:
        return result
    if not fits(remove_lowest(scores, below, ("ffn",), 1.0)):  # all the FFN units it can
        return result
    alive = sum(int(np.count_nonzero(m)) for m in below["ffn"])  # extra units: bisect

    def extra(count: int) -> dict:
        return remove_lowest(scores, below, ("ffn",), count / alive)

    return extra(first_fitting(lambda count: fits(extra(count)), 0, alive))


def request_masks(config: gpt.GPTConfig, remove) -> dict:
    """Masks for an explicit request {"heads": {layer: [units]}, "ffn": {layer: [units]},
    "layers": [layers]} (any part may be missing); out-of-range indices are
    `PruneRequestError`s, a sublayer or model emptied is left for `check_masks` to refuse."""
    masks = _copy(gpt.full_masks(config))
    remove = dict(remove or {})
    unknown = set(remove) - set(STRUCTURES)
    if unknown:
        raise gpt.PruneRequestError(f"prune.remove has unknown kind(s) {sorted(unknown)}; use "
                                    f"{', '.join(STRUCTURES)}")
    for layer in remove.get("layers") or []:
        if not (isinstance(layer, int) and 0 <= layer < config.layers):
            raise gpt.PruneRequestError(f"prune.remove.layers: {layer!r} is not a layer of the "
                                        f"model (0..{config.layers - 1})")
        masks["layers"][layer] = 0
    for kind, sizes in (("heads", config.heads), ("ffn", config.ffn)):
        for layer, units in dict(remove.get(kind) or {}).items():
            layer = int(layer)
            if not 0 <= layer < config.layers:
                raise gpt.PruneRequestError(f"prune.remove.{kind}: layer {layer} is not a "
                                            f"layer of the model (0..{config.layers - 1})")
            for unit in units:
                if not (isinstance(unit, int) and 0 <= unit < sizes[layer]):
                    raise gpt.PruneRequestError(
                        f"prune.remove.{kind}[{layer}]: {unit!r} is not one of layer "
                        f"{layer}'s {sizes[layer]} units (0..{sizes[layer] - 1})")
                masks[kind][layer][unit] = 0
    return masks
