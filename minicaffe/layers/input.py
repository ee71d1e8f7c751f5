"""Input: tops of the shapes in input_param (and the legacy net-level input / input_dim fields)."""

from __future__ import annotations

from ..layer import Layer, register


@register("Input")
class InputLayer(Layer):
    exact_num_bottom = 0
    min_num_top = 1

    def layer_setup(self, bottom, top):
        shapes = self.param.input_param.shape
        if len(shapes) not in (0, 1, len(top)):
            self.fail(f"input_param has {len(shapes)} shapes for {len(top)} tops (give 1 or one per top)")
        for i, blob in enumerate(top):
            if shapes:
                blob.reshape(tuple(shapes[i if len(shapes) > 1 else 0].dim))

    def reshape(self, bottom, top):
        pass  # inputs keep the shape they were given (net.forward(data=...) may reshape them)

    def forward(self, bottom, top):
        pass
