"""What peftlab's layer wrappers show of the layer they wrap.

Model code reads attributes off layers it built: T5's feed-forward casts its input to
``self.wo.weight.dtype``, other code checks ``layer.bias is None``. A wrapper that replaced
``wo`` would raise ``AttributeError`` there, so every adapter layer (``self.base_layer`` is the
wrapped layer) shows the wrapped layer's ``weight`` and ``bias``, read-only, as peft's layers
do. The wrapper's own parameters stay under their own names (``lora_A``, ``ia3_l``, ...), and
the state dict is unchanged: properties are not parameters.
"""

from __future__ import annotations

import torch


class BaseLayerAttributes:
    """Mixin for adapter layers: ``weight`` and ``bias`` are the wrapped layer's."""

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)
