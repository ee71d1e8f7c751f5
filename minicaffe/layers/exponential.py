"""ELU, Exp and Log, as Caffe's layers of those types (math in kernels/exponential.cu).

    ELU: y = max(x, 0) + alpha * (exp(min(x, 0)) - 1),   dy/dx = 1 where x > 0, alpha + y elsewhere
    Exp: y = base^(shift + scale * x),                    dy/dx = ln(base) * scale * y
    Log: y = log_base(shift + scale * x),                 dy/dx = scale / (ln(base) * (shift + scale * x))

(base -1, the default, means e.) ELU and Exp differentiate through y, as Caffe does. Caffe reads y from
the top blob in backward, which a later in-place layer may have changed; here backward reads y from the
top only where the Net says no later layer writes it (`top_data_survives`), and then keeps nothing in
place. Elsewhere it recomputes y from x, which it keeps in place as `keeps = "input"` does. The two ways
agree up to rounding; in place and not in place take the same way, so they give the same bits. Log
needs x.
"""

from __future__ import annotations

import math

from ..kernel import KernelFile
from ..layer import NeuronLayer, register

KERNELS = KernelFile("exponential.cu")


class OutputGradientNeuron(NeuronLayer):
    """A neuron whose dy/dx is a function of y. `kernel` names the pair `<kernel>_forward(count, x, y,
    *args)` / `<kernel>_backward(count, kept, kept_is_y, dy, dx, *args)`, kept being y or x (the kernel
    then recomputes y); `args` (the kernels' parameters) is set by layer_setup."""

    kernel = ""
    keeps = "input"
    args: tuple = ()

    def gradient_from_output(self) -> bool:
        """Whether y alone gives dy/dx."""
        return True

    def reads_top(self) -> bool:
        """Backward reads y from the top: y is there then, and determines the gradient."""
        return self.top_data_survives and self.gradient_from_output()

    def lean_keep(self, bottom, top):
        return self.reads_top()  # nothing to keep: backward reads y from the top

    def planned_kept_bytes(self, bottom, top):
        return 0 if self.reads_top() else super().planned_kept_bytes(bottom, top)

    def forward(self, bottom, top):
        x = bottom[0].get_data()
        KERNELS.launch(f"{self.kernel}_forward", x.size, x.size, x, top[0].mutable_data(), *self.args)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if self.kept_lean or self.reads_top():
            kept, kept_is_y = top[0].get_data(), 1
        else:
            kept, kept_is_y = self.kept_input(bottom), 0
        KERNELS.launch(f"{self.kernel}_backward", kept.size, kept.size, kept, kept_is_y, top[0].get_diff(),
                       bottom[0].mutable_diff(), *self.args)


@register("ELU")
class ELULayer(OutputGradientNeuron):
    kernel = "elu"

    def layer_setup(self, bottom, top):
        self.alpha = float(self.param.elu_param.alpha)
        if not math.isfinite(self.alpha):
            self.fail(f"elu_param.alpha must be finite, got {self.alpha}")
        self.args = (self.alpha,)

    def gradient_from_output(self) -> bool:
        # For alpha >= 0, y > 0 exactly where x > 0; a negative alpha makes y positive for x < 0 too.
        return self.alpha >= 0


def log_of_base(layer: NeuronLayer, base: float) -> float:
    """ln(base) for exp_param / log_param's base, where -1 means e (ln exactly 1), as Caffe's checks."""
    if base == -1:
        return 1.0
    if not (base > 0 and math.isfinite(base)):
        layer.fail(f"base must be -1 (for e) or a finite number > 0, got {base}")
    return math.log(base)


def finite_scale(layer: NeuronLayer, what: str, value: float) -> float:
    """`value` (a parameter, or one derived from base, scale and shift), which must be finite."""
    if not math.isfinite(value):
        layer.fail(f"{what} = {value} is not finite: check base, scale and shift")
    return value


@register("Exp")
class ExpLayer(OutputGradientNeuron):
    kernel = "exp"

    def layer_setup(self, bottom, top):
        param = self.param.exp_param
        base, scale, shift = float(param.base), float(param.scale), float(param.shift)
        ln_base = log_of_base(self, base)
        try:  # outer scale base^shift, and e^shift for base e (Caffe's outer_scale_)
            outer = 1.0 if shift == 0 else math.exp(shift) if base == -1 else math.pow(base, shift)
        except OverflowError:
            outer = math.inf
        self.args = (finite_scale(self, "ln(base) * scale", ln_base * scale),
                     finite_scale(self, "base^shift", outer))


@register("Log")
class LogLayer(NeuronLayer):
    keeps = "input"  # backward needs x

    def layer_setup(self, bottom, top):
        param = self.param.log_param
        base, scale, shift = float(param.base), float(param.scale), float(param.shift)
        ln_base = log_of_base(self, base)
        if ln_base == 0:
            self.fail("base 1 has no logarithms (1 / ln(base) is infinite)")
        self.scale = finite_scale(self, "scale", scale)
        self.shift = finite_scale(self, "shift", shift)
        self.output_scale = 1.0 / ln_base
        self.gradient_scale = scale / ln_base

    def forward(self, bottom, top):
        x = bottom[0].get_data()
        KERNELS.log_forward(x.size, x, top[0].mutable_data(), self.scale, self.shift, self.output_scale,
                            extents=x.size)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x = self.kept_input(bottom)
        KERNELS.log_backward(x.size, x, top[0].get_diff(), bottom[0].mutable_diff(), self.scale, self.shift,
                             self.gradient_scale, extents=x.size)
