"""LSTMUnit: one LSTM time step, as Caffe's LSTMUnitLayer (the cell of the LSTM layer's unrolled net).

Bottoms: C_prev (1, N, H), X (1, N, 4H) -- the gate pre-activations [i' | f' | o' | g'] of each stream --
and cont (1, N), the sequence continuation flags. Tops: C (1, N, H) and H (1, N, H):
c = cont * sigmoid(f') * c_prev + sigmoid(i') * tanh(g'), h = sigmoid(o') * tanh(c); kernels/lstm_unit.cu.
C_prev and X get gradients; cont gets none (Caffe refuses to backpropagate to it, so do we).
"""

from __future__ import annotations

from ..kernel import KernelFile
from ..layer import Layer, register

KERNELS = KernelFile("lstm_unit.cu")


@register("LSTMUnit")
class LSTMUnitLayer(Layer):
    exact_num_bottom = 3
    exact_num_top = 2

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 2  # cont is a marker, not a value to differentiate

    def reshape(self, bottom, top):
        c_prev, x, cont = bottom
        if c_prev.num_axes != 3 or c_prev.shape[0] != 1:
            self.fail(f"C_prev (bottom 0) must have shape (1, N, H), got {list(c_prev.shape)}")
        streams, hidden = c_prev.shape[1], c_prev.shape[2]
        if x.shape != (1, streams, 4 * hidden):
            self.fail(f"X (bottom 1) must have shape (1, N, 4H) = {[1, streams, 4 * hidden]} for C_prev "
                      f"{list(c_prev.shape)}, got {list(x.shape)}")
        if cont.shape != (1, streams):
            self.fail(f"cont (bottom 2) must have shape (1, N) = {[1, streams]}, got {list(cont.shape)}")
        if any(t is b for t in top for b in bottom):
            self.fail("cannot run in place (backward reads C_prev and X)")
        self.streams, self.hidden = streams, hidden
        for blob in top:
            blob.reshape_like(c_prev)

    def forward(self, bottom, top):
        c_prev, x, cont = (b.get_data() for b in bottom)
        KERNELS.lstm_unit_forward(self.streams, self.hidden, c_prev, x, cont, top[0].mutable_data(),
                                  top[1].mutable_data(), extents=(self.streams, self.hidden))

    def backward(self, top, propagate_down, bottom):
        if propagate_down[2]:
            self.fail("cannot backpropagate to the sequence continuation indicators (bottom 2, cont)")
        if not (propagate_down[0] or propagate_down[1]):
            return
        c_prev, x, cont = (b.get_data() for b in bottom)
        dc, dh = top[0].get_diff(), top[1].get_diff()
        # A diff that is not asked for is not written; the kernel then gets a top diff in its place.
        dc_prev = bottom[0].mutable_diff() if propagate_down[0] else dc
        dx = bottom[1].mutable_diff() if propagate_down[1] else dc
        KERNELS.lstm_unit_backward(self.streams, self.hidden, c_prev, x, cont, dc, dh, dc_prev,
                                   int(propagate_down[0]), dx, int(propagate_down[1]),
                                   extents=(self.streams, self.hidden))
