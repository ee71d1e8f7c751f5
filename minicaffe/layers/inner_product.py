"""InnerProduct (Caffe's fully connected layer): y = x W^T + b, everything as GEMM via the array module.

The input's axes from `axis` on are flattened into one vector of K values (e.g. (N, C, H, W) ->
(N, C*H*W) for axis 1); the axes before it are the batch M. The weights are (num_output, K), or
(K, num_output) with transpose. There is no element-wise work that needs a kernel: the bias add and
the bias gradient (a sum over the batch) are array-module operations, as Caffe does them with BLAS.
The GEMMs write into the top, the bottom diff and (adding, beta = 1) the weight diff, so no step
allocates an array of the weights' size.
"""

from __future__ import annotations

from ..blas import gemm_accumulate, matmul
from ..layer import Layer, register
from .reduce import channel_sums_of


@register("InnerProduct")
class InnerProductLayer(Layer):
    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        param = self.param.inner_product_param
        self.num_output = param.num_output
        self.bias_term = param.bias_term
        self.transpose = param.transpose
        if self.num_output <= 0:
            self.fail("num_output must be given and positive")
        try:
            self.axis = bottom[0].canonical_axis(param.axis)
        except ValueError as error:
            self.fail(str(error))
        self.inputs = bottom[0].count_range(self.axis)  # Caffe's K
        weight_shape = (self.inputs, self.num_output) if self.transpose else (self.num_output, self.inputs)
        shapes = [weight_shape] + ([(self.num_output,)] if self.bias_term else [])
        self.setup_params(shapes, [param.weight_filler, param.bias_filler])

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) <= self.axis or bottom[0].count_range(self.axis) != self.inputs:
            self.fail(f"input size incompatible with the weights: bottom shape {list(shape)} flattened "
                      f"from axis {self.axis} has {bottom[0].count_range(self.axis)} values per item, "
                      f"the weights expect {self.inputs}")
        if top[0] is bottom[0]:
            self.fail("cannot run in place (top and bottom are the same blob)")
        self.batch = bottom[0].count_range(0, self.axis)  # Caffe's M
        top[0].reshape((*shape[:self.axis], self.num_output))

    def _weights(self):
        """The weights as (num_output, K), a view (transposed view when stored (K, num_output))."""
        weights = self.blobs[0].get_data()
        return weights.T if self.transpose else weights

    def forward(self, bottom, top):
        x = bottom[0].get_data().reshape(self.batch, self.inputs)
        y = top[0].mutable_data().reshape(self.batch, self.num_output)
        matmul(x, self._weights().T, out=y)
        if self.bias_term:
            y += self.blobs[1].get_data()

    def backward(self, top, propagate_down, bottom):
        dy = top[0].get_diff().reshape(self.batch, self.num_output)
        if self.param_propagate_down[0]:
            x = bottom[0].get_data().reshape(self.batch, self.inputs)
            weight_diff = self.blobs[0].mutable_diff()
            if self.transpose:
                gemm_accumulate(x.T, dy, weight_diff)
            else:
                gemm_accumulate(dy.T, x, weight_diff)
        if self.bias_term and self.param_propagate_down[1]:
            channel_sums_of(self, (self.batch, self.num_output, 1), dy, self.blobs[1].mutable_diff())
        if propagate_down[0]:
            dx = bottom[0].mutable_diff().reshape(self.batch, self.inputs)
            matmul(dy, self._weights(), out=dx)
