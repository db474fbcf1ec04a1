"""The outer step of a one-process DiLoCo simulation, as the issue's
reference defines it, shared by the DiLoCo tests."""

from typing import Any, Optional, Sequence


def set_outer_gradient(glob, copies: Sequence, cast: Any, weights: Optional[Sequence[float]] = None) -> None:
    """Sets each global parameter's `.grad` to the merge of the copies'
    pseudo-gradients (the global weights minus the copy's), each cast to
    `cast` and back as the wire casts it, summed in the order given (worker
    id order): their mean, or with `weights` `sum(w_i * d_i) / sum(w_i)`,
    each product rounded to f32, products and weights summed in order."""
    import torch  # the tests that use this skip without torch

    with torch.no_grad():
        for name, g in glob.named_parameters():
            deltas = [(g - dict(c.named_parameters())[name]).to(cast).float() for c in copies]
            if weights is None:
                total = deltas[0]
                for d in deltas[1:]:
                    total = total + d
                g.grad = total / len(deltas)
                continue
            w = torch.tensor(weights, dtype=torch.float32)
            total, norm = w[0] * deltas[0], w[0]
            for i in range(1, len(deltas)):
                total, norm = total + w[i] * deltas[i], norm + w[i]
            g.grad = total / norm
