"""Plain cross-entropy: ``G = e / B``, every weight one. The baseline."""

import torch

from .base import METHODS, Method, logit_error


@METHODS.register("ce")
class CE(Method):
    """Unweighted cross-entropy; ``backward`` equals ``F.cross_entropy(model(x), y).backward()``."""

    def logit_grad(self, fwd, y, x_meta, y_meta, lr):
        _, e = logit_error(fwd.logits, y, self.num_classes)
        return {"G": e / fwd.B, "weights": torch.ones(y.shape[0], device=e.device, dtype=e.dtype)}
