// LSTMUnit: one LSTM time step, as Caffe's LSTMUnitLayer, for N streams of H hidden units.
//
// The gate pre-activations X of stream n are 4H contiguous values [i' | f' | o' | g'] (what the
// LSTM's inner net computes as W_hc h + W_xc x + b_c). With cont_n the sequence continuation flag:
//   i = sigmoid(i'), f = cont_n * sigmoid(f'), o = sigmoid(o'), g = tanh(g')
//   c = f * c_prev + i * g,  h = o * tanh(c)
// so cont_n = 0 starts a new sequence: c_prev is forgotten (f = 0).
//
// A plane is one stream n (H contiguous units; its X row is 4H). Backward recomputes the gates and c
// from the bottoms instead of reading the tops, so it needs nothing kept and no later layer can spoil
// what it reads. cont gets no gradient (a sequence marker, as in Caffe).
#include "shim.h"

// sigmoid(v) = 0.5 tanh(0.5 v) + 0.5: no overflow of exp(-v) for large negative v (as activation.cu).
DEVICE real lstm_sigmoid(const real v) { return real(0.5) * tanh(real(0.5) * v) + real(0.5); }

KERNEL void lstm_unit_forward(const int streams, const int hidden, const real* c_prev, const real* x,
                              const real* cont, real* c, real* h) {
  PLANE_LOOP(n, streams) {
    const real keep = cont[n];
    const size_t offset = (size_t)n * hidden;
    const real* xn = x + 4 * offset;
    INNER_LOOP(d, hidden) {
      const real i = lstm_sigmoid(xn[d]);
      const real f = keep * lstm_sigmoid(xn[hidden + d]);
      const real o = lstm_sigmoid(xn[2 * hidden + d]);
      const real g = tanh(xn[3 * hidden + d]);
      const real cell = f * c_prev[offset + d] + i * g;
      c[offset + d] = cell;
      h[offset + d] = o * tanh(cell);
    }
  }
}

// dc, dh: the top diffs. Writes dc_prev = dC * f when write_dc_prev and the four gate diffs into
// dx (4H per stream) when write_dx, with dC = dc + dh * o * (1 - tanh(c)^2) the whole gradient of c.
// The forget gate's diff is taken through f = cont * sigmoid(f'): dC * c_prev * cont * s (1 - s),
// which is Caffe's dC * c_prev * f (1 - f) for cont in {0, 1} and also right for other cont.
KERNEL void lstm_unit_backward(const int streams, const int hidden, const real* c_prev, const real* x,
                               const real* cont, const real* dc, const real* dh, real* dc_prev,
                               const int write_dc_prev, real* dx, const int write_dx) {
  PLANE_LOOP(n, streams) {
    const real keep = cont[n];
    const size_t offset = (size_t)n * hidden;
    const real* xn = x + 4 * offset;
    real* dxn = dx + 4 * offset;
    INNER_LOOP(d, hidden) {
      const real i = lstm_sigmoid(xn[d]);
      const real forget = lstm_sigmoid(xn[hidden + d]);
      const real f = keep * forget;
      const real o = lstm_sigmoid(xn[2 * hidden + d]);
      const real g = tanh(xn[3 * hidden + d]);
      const real cp = c_prev[offset + d];
      const real tanh_c = tanh(f * cp + i * g);
      const real dh_d = dh[offset + d];
      const real dcell = dc[offset + d] + dh_d * o * (real(1) - tanh_c * tanh_c);
      if (write_dc_prev) dc_prev[offset + d] = dcell * f;
      if (write_dx) {
        dxn[d] = dcell * g * i * (real(1) - i);
        dxn[hidden + d] = dcell * cp * keep * forget * (real(1) - forget);
        dxn[2 * hidden + d] = dh_d * tanh_c * o * (real(1) - o);
        dxn[3 * hidden + d] = dcell * i * (real(1) - g * g);
      }
    }
  }
}
