"""What peftlab's layer wrappers show of the layer they wrap.

Model code reads attributes off layers it built: T5's feed-forward casts its input to
``self.wo.weight.dtype``, other code checks ``layer.bias is None``. A wrapper that replaced
``wo`` would raise ``AttributeError`` there, so every adapter layer (``self.base_layer`` is the
wrapped layer) shows the wrapped layer's ``weight`` and ``bias`` as peft's layers do; setting
them (transformers' ``tie_weights``) sets the wrapped layer's. The wrapper's own parameters
stay under their own names (``lora_A``, ``ia3_l``, ...), and the state dict is unchanged:
properties are not parameters.
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

    def __setattr__(self, name: str, value) -> None:
        # transformers' tie_weights() sets ``head.weight = embeddings.weight``: tie the wrapped
        # layer (nn.Module's own __setattr__ would refuse, the name being taken).
        if name in ("weight", "bias") and "base_layer" in self.__dict__.get("_modules", {}):
            setattr(self._modules["base_layer"], name, value)
            return
        super().__setattr__(name, value)
