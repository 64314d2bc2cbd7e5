"""rename-outputs: give the model's output values a common prefix (`y` -> `out_y`).

Deployment code often looks outputs up by name; a prefix makes them easy to find and shows where a
model went through this pipeline. Outputs that are also graph inputs are left alone (renaming the
value would rename the input too), and so are outputs already carrying the prefix, which makes the
pass idempotent. A new name that is already taken gets a numeric suffix from `Model.unique_name`.
"""

from __future__ import annotations

from dataclasses import dataclass

from irtool.ir.model import Model
from irtool.passmanager import Pass, PassContext, PassResult


class RenameOutputs(Pass):
    """Prefix the names of the model's outputs."""

    name = "rename-outputs"

    @dataclass(frozen=True)
    class Options:
        prefix: str = "out_"

        def __post_init__(self):
            # Raised as a PipelineError by the parser, so a bad value is a one-line usage error.
            if not self.prefix:
                raise ValueError("prefix must not be empty")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        prefix = self.options.prefix
        inputs = {t.name for t in model.graph.inputs}
        renamed = 0
        for tensor in model.graph.outputs:
            if tensor.name in inputs or tensor.name.startswith(prefix):
                continue
            # A graphsurgeon tensor is one object shared by its producer and consumers: renaming it
            # here renames every reference.
            tensor.name = model.unique_name(prefix + tensor.name)
            renamed += 1
        # Shapes and costs are keyed by value name, so no cached analysis survives a rename.
        return PassResult(modified=renamed > 0, preserved=(), stats={"renamed": renamed})
