"""An MLP whose hidden layer is scaled by a scalar input (a diffusion timestep's role): y = W2·Relu((W1·x)·s).
The scalar comes once per batch, without a batch axis; calibration takes it as it is, and the Mul's product,
the Relu's output, is ranged over the samples' own scales."""

from tests.quant.test_scalar_and_control_flow import scaled_mlp


def build():
    model = scaled_mlp()
    model.ir_version = 8
    return model
