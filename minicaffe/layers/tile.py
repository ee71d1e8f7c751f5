"""Tile: the bottom repeated tile_param.tiles times along tile_param.axis (default 1), as Caffe's
TileLayer: (2, 3) tiled 2 times on axis 1 is (2, 6), each row [a b c a b c]. Backward sums the tiles."""

from __future__ import annotations

from ..kernel import KernelFile
from ..layer import Layer, register

KERNELS = KernelFile("tile.cu")


@register("Tile")
class TileLayer(Layer):
    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        param = self.param.tile_param
        if not param.HasField("tiles") or param.tiles < 1:
            self.fail(f"tile_param.tiles must be given and at least 1, got "
                      f"{param.tiles if param.HasField('tiles') else 'none'}")
        self.tiles = param.tiles

    def reshape(self, bottom, top):
        if top[0] is bottom[0]:
            self.fail("cannot run in place (the top has another shape)")
        try:
            axis = bottom[0].canonical_axis(self.param.tile_param.axis)
        except ValueError as error:
            self.fail(str(error))
        self.outer, self.inner = bottom[0].count_range(0, axis), bottom[0].count_range(axis)
        shape = list(bottom[0].shape)
        shape[axis] *= self.tiles
        top[0].reshape(shape)

    def forward(self, bottom, top):
        if bottom[0].count:
            KERNELS.tile_forward(self.outer, self.tiles, self.inner, bottom[0].get_data(),
                                 top[0].mutable_data(), extents=(self.outer, self.inner))

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0] and bottom[0].count:
            KERNELS.tile_backward(self.outer, self.tiles, self.inner, top[0].get_diff(),
                                  bottom[0].mutable_diff(), extents=(self.outer, self.inner))
