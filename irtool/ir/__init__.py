"""IR: Model over onnx-graphsurgeon, safe load/save, verifier, textual printer."""

from irtool.ir.model import Model, subgraphs_of

__all__ = ["Model", "subgraphs_of", "load", "save"]


def load(path) -> Model:
    return Model.load(path)


def save(model: Model, path, **kwargs) -> None:
    model.save(path, **kwargs)


def __getattr__(name):
    # Heavier helpers load on first use.
    if name == "verify":
        from irtool.ir.verify import verify
        return verify
    if name == "format_model":
        from irtool.ir.printer import format_model
        return format_model
    raise AttributeError(name)
