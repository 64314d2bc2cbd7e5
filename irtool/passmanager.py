"""Passes, analyses, the pass context and the pass manager.

A pass is a small class: a kebab-case `name`, a one-line docstring summary, a frozen `Options`
dataclass, the analyses it `requires`, and `run(model, ctx) -> PassResult`. `Pass.__call__` enforces
the contract around `run`: required analyses are computed first and a PassResult must come back.
After a pass, the manager drops every cached analysis the result does not list as preserved
(LLVM's PreservedAnalyses): an unmodified model keeps them all.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from irtool.errors import IrtoolError, PassError, VerificationError
from irtool.ir.convert import paused_gc
from irtool.ir.model import Model

log = logging.getLogger(__name__)

ALL = "*"


class Analysis:
    """A cached, read-only fact about the model. Subclasses set `name` and implement `compute`."""

    name: ClassVar[str] = ""

    def compute(self, model: Model, ctx: PassContext) -> Any:
        raise NotImplementedError


@dataclass
class PassResult:
    """What a pass did: whether it changed the IR, which analyses survive, user-facing counters."""

    modified: bool
    preserved: tuple[str, ...] | str = ()
    stats: dict[str, Any] = field(default_factory=dict)

    def preserves(self, analysis_name: str) -> bool:
        if not self.modified or self.preserved == ALL:
            return True
        return analysis_name in self.preserved


class Pass:
    """Base class of every pass; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[type[Analysis], ...]] = ()

    @dataclass(frozen=True)
    class Options:
        pass

    def __init__(self, options: Any = None, **kwargs: Any):
        if options is not None and kwargs:
            raise TypeError("pass either an Options instance or keyword options, not both")
        self.options = options if options is not None else self.Options(**kwargs)

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def float_request(self, model: Model) -> Any:
        """What this pass would measure in a float pass of `model` as it is now, as an
        irtool.calibration.reference.Request, or None. `calibrate`, run just before it, takes those measurements
        in its own pass of the same data, and the pass finds them in ctx (analysis FloatReference)."""
        return None

    def __call__(self, model: Model, ctx: PassContext) -> PassResult:
        for analysis in self.requires:
            ctx.analysis(analysis, model)
        result = self.run(model, ctx)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {self.name!r} returned {type(result).__name__}, not PassResult")
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"


@dataclass
class PassContext:
    """Everything a pass may use besides the IR: options, seed, shapes, data, analyses, progress."""

    seed: int = 0
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    calibration_data: Callable[[], Iterable[Mapping[str, Any]]] | None = None
    calib_cache: str | None = None  # folder for calibration statistics keyed by model, data and options
    options: dict[str, Any] = field(default_factory=dict)
    progress: bool = False
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("irtool"))
    # The passes after the one running, set by PassManager: a pass may measure for the next one (float_request).
    upcoming: tuple[Pass, ...] = field(default=(), repr=False)
    _analyses: dict[type, Any] = field(default_factory=dict, repr=False)

    def analysis(self, kind: type[Analysis], model: Model) -> Any:
        """Compute (once) and return the result of analysis `kind` on `model`."""
        if kind not in self._analyses:
            started = time.perf_counter()
            self._analyses[kind] = kind().compute(model, self)
            self.logger.debug("analysis %s took %.3f s", kind.name, time.perf_counter() - started)
        return self._analyses[kind]

    def provide(self, kind: type[Analysis], result: Any) -> None:
        """Cache `result` as analysis `kind` of the model as it is now (a pass that measured it on the way)."""
        self._analyses[kind] = result

    def cached(self, kind: type[Analysis]) -> bool:
        return kind in self._analyses

    def invalidate(self, result: PassResult | None = None) -> None:
        """Drop cached analyses the result does not preserve (all of them when result is None)."""
        for kind in list(self._analyses):
            if result is None or not result.preserves(kind.name):
                del self._analyses[kind]


@dataclass
class PassRecord:
    """One executed pass, as it goes into the report."""

    name: str
    options: dict[str, Any]
    modified: bool
    seconds: float
    stats: dict[str, Any]


class PassManager:
    """Run a sequence of passes with optional verification, IR printing and dumps after each pass."""

    def __init__(self, passes: list[Pass], *, verify_each: bool = False, print_ir_after: Iterable[str] = (),
                 dump_dir: str | Path | None = None, ir_printer: Callable[[str], None] | None = None):
        self.passes = list(passes)
        self.verify_each = verify_each
        self.print_ir_after = set(print_ir_after)
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.ir_printer = ir_printer or (lambda text: log.info("%s", text))
        self.records: list[PassRecord] = []

    def run(self, model: Model, ctx: PassContext | None = None) -> list[PassRecord]:
        ctx = ctx or PassContext()
        if self.verify_each:
            self._verify(model, "the input model", [])
        done: list[str] = []
        for index, p in enumerate(self.passes, start=1):
            ctx.upcoming = tuple(self.passes[index:])
            record = self._run_one(p, model, ctx, done)
            self.records.append(record)
            done.append(p.name)
            self._after(p, model, index, done)
        return self.records

    def _run_one(self, p: Pass, model: Model, ctx: PassContext, done: list[str]) -> PassRecord:
        started = time.perf_counter()
        model.forget_names()
        try:
            # Passes create many long-lived objects (graph edits, protobuf wrappers); with a large graph
            # alive, the cyclic GC would rescan it over and over (2.5 s of 2.6 s in one 100k-node list()).
            with paused_gc():
                result = p(model, ctx)
        except IrtoolError as e:
            if isinstance(e, PassError):
                raise
            raise type(e)(f"pass {p.name!r} failed after {done}: {e}") from e
        except Exception as e:
            raise PassError(f"pass {p.name!r} failed after {done}: {type(e).__name__}: {e}") from e
        seconds = time.perf_counter() - started
        ctx.invalidate(result)
        log.info("pass %s: %s in %.3f s %s", p.name, "modified" if result.modified else "unchanged",
                 seconds, result.stats or "")
        return PassRecord(p.name, options_dict(p.options), result.modified, seconds, dict(result.stats))

    def _after(self, p: Pass, model: Model, index: int, done: list[str]) -> None:
        if self.verify_each:
            self._verify(model, f"pass {p.name!r}", done[:-1])
        if p.name in self.print_ir_after:
            from irtool.ir.printer import format_model
            self.ir_printer(f"// IR after {p.name}\n{format_model(model)}")
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            model.save(self.dump_dir / f"{index:03d}_{p.name}.onnx")

    def _verify(self, model: Model, where: str, before: list[str]) -> None:
        from irtool.ir.verify import verify
        try:
            verify(model)
        except VerificationError as e:
            if where == "the input model":
                raise VerificationError(f"the input model is not valid: {e}") from e
            raise VerificationError(f"verification failed after {where} (after {before}): {e}") from e


def options_dict(options: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(options):
        return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    return {}
