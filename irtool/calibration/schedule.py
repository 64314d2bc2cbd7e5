"""An ONNX Runtime session for the calibration graph that runs each summary as soon as its input exists.

On x86, ONNX Runtime's NCHWc transformer replaces every Conv and every pooling node by a new node, and new
nodes are numbered in the order the transformer makes them: the summaries' pools after all the convs. In
priority order ONNX Runtime runs, of the nodes that are ready, the one with the lowest number, so every
observed activation stayed alive until the end of the run and the first batch paid for touching all that
memory (batch 16, MobileNetV2: peak RSS 610 MB against 320 MB, first batch 0.41 s against 0.18 s for the
next; ResNet-50: 1.7 GB against 0.8 GB). The order of the nodes we write is not what decides it, since the
transformer renumbers them after we write it.

So when the transformer has rewritten a tenth of the summaries or more, the optimized graph is saved
(weights in a side file), its nodes are renumbered so that a node the model's own outputs do not need runs
as soon as it is ready, and that graph is loaded with optimizations off (they have all run) in priority
order, which then follows our numbering. Every kernel is the one ONNX Runtime chose; only the order of
independent nodes changes.
"""

from __future__ import annotations

import heapq
import logging
import re
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
import onnxruntime as ort

from irtool.backends.ort import ort_message
from irtool.errors import InputError

log = logging.getLogger(__name__)
PROVIDERS = ["CPUExecutionProvider"]
NCHWC_DOMAIN = "com.microsoft.nchwc"
MIN_RENUMBERED_SHARE = 0.1
READ_AHEAD_BYTES = 128 << 20
Built = TypeVar("Built")


def build_while_reading(build: Callable[[], Built], batches: Iterable[Mapping[str, np.ndarray]],
                        limit: int = READ_AHEAD_BYTES) -> tuple[Built, Iterator[Mapping[str, np.ndarray]], float]:
    """Run `build` on a thread while this one reads the first batches; returns (what it built, every batch in
    order, the seconds this thread then waited for it). Building a calibration session is mostly ONNX
    Runtime's graph work, which releases the GIL, and reading a batch (decoding images, loading arrays) mostly
    keeps one core busy. Calibrating from a folder of 64 JPEGs: ResNet-50 2.88 -> 2.70 s (its 0.31 s build
    hidden); MobileNetV2, whose build is mostly Python (the renumbered graph), gains nothing. Read-ahead stops
    when the build is done or the batches read hold `limit` bytes, so memory stays flat in the number of
    samples. The batches must not share buffers, as CalibrationData's never do, since several are held at
    once."""
    iterator = iter(batches)
    ahead: deque[Mapping[str, np.ndarray]] = deque()
    with ThreadPoolExecutor(1, thread_name_prefix="irtool-session") as pool:
        future, held = pool.submit(build), 0
        while not future.done() and held < limit:  # on an error reading, the pool's exit still waits for build
            batch = next(iterator, None)
            if batch is None:
                break
            ahead.append(batch)
            held += sum(np.asarray(value).nbytes for value in batch.values())
        started = time.perf_counter()
        built = future.result()
    return built, _replay(ahead, iterator), time.perf_counter() - started


def _replay(ahead: deque, rest: Iterator) -> Iterator:
    """The batches read ahead, each let go once taken, then the rest."""
    while ahead:
        yield ahead.popleft()
    yield from rest


def session_with_weights(proto: onnx.ModelProto, options: ort.SessionOptions,
                         weights: Mapping[str, np.ndarray] | None = None) -> ort.InferenceSession:
    """A session of `proto`, whose initializers named in `weights` (from `Model.to_proto(weights=...)`) are
    external data ONNX Runtime takes from those arrays, in place."""
    values = []
    if weights:
        names = list(weights)
        values = [ort.OrtValue.ortvalue_from_numpy(weights[name]) for name in names]
        options.add_external_initializers(names, values)
    session = _session(proto.SerializeToString(), options)
    # ONNX Runtime keeps pointers into the arrays, not references to them: the session must hold them.
    session._irtool_weights = values
    return session


def calibration_session(proto: onnx.ModelProto, model_outputs: Iterable[str], threads: int | None = None,
                        may_renumber: bool = True,
                        weights: Mapping[str, np.ndarray] | None = None) -> ort.InferenceSession:
    """With `may_renumber` False (the caller knows few summaries sit on conv layouts) the plain session: saving
    the optimized model alone cost the ViT 0.2-0.4 s. A graph with subgraphs (If, Loop, Scan) takes it too: ONNX
    Runtime saved an If whose branches both hold convs with one reorder name in both (a model it refused to load),
    and the renumbering does not see the names a branch reads from the outer graph. `weights`: see
    session_with_weights."""
    if not may_renumber or _has_subgraphs(proto.graph):
        return session_with_weights(proto, _options(threads), weights)
    with tempfile.TemporaryDirectory(prefix="irtool-calibration-", ignore_cleanup_errors=True) as tmp:
        path = Path(tmp) / "optimized.onnx"
        options = _options(threads, prepack=False)
        options.optimized_model_filepath = str(path)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights.bin")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        options.log_severity_level = 3  # the "hardware specific" NCHWc warning: this file never leaves the process
        session = session_with_weights(proto, options, weights)
        optimized = onnx.load(str(path), load_external_data=False)
        graph = optimized.graph
        needed = _needed(graph, set(model_outputs))
        if not worth_rebuilding(graph, needed):
            return session
        side_nodes_first(graph, needed)
        onnx.save(optimized, str(path))  # the weights stay in weights.bin next to it
        options = _options(threads, prepack=False)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return _session(str(path), options)


# What ONNX Runtime says of an op it has no kernel for: the model's, not calibration's, to fix.
_MISSING_OP = re.compile(r"is not a registered function/op|Could not find an implementation for")


def _session(source: str | bytes, options: ort.SessionOptions) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(source, options, providers=PROVIDERS)
    except Exception as e:  # onnxruntime's errors derive from Exception only
        if _MISSING_OP.search(str(e)):
            raise InputError(f"calibration runs the model in ONNX Runtime, which cannot run it: {ort_message(e)} "
                             "(register the op's library with ONNX Runtime, or replace the op)") from e
        raise


def _has_subgraphs(graph: onnx.GraphProto) -> bool:
    return any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for node in graph.node for attr in node.attribute)


def _options(threads: int | None, prepack: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not prepack:
        # Conv nets on the renumbered path (their convs are NCHWc kernels, which reorder their weights when the
        # transformer makes them): weight prepacking cost MobileNetV2 and ResNet-50 ~0.02 s of session build
        # and gained nothing per batch (medians of 6 and 2 builds); the ViT, whose MatMuls it speeds up
        # (4 batches: 1.32 against 1.43 s), takes the plain session.
        options.add_session_config_entry("session.disable_prepacking", "1")
    # Measured on ResNet-50 (batch 16): ORT's memory pattern planning keeps 3.5 GB and runs 2.6 s per batch on
    # the summarized graph; without it 2.0 GB and 2.0 s (the float model: 0.6 GB, 1.4 s).
    options.enable_mem_pattern = False
    # In the default order the ViT's summaries ran late too (1.25 GB peak, first batch twice as slow).
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    # ONNX Runtime's idle threads spin for a while after a run, on the cores the histograms bin on
    # (engine.Binning) and the next batch is read on; this stops them when the run returns, and keeps spinning
    # within a run, where the many small summary ops need it. bench/quant_bench.py, x floor at 64 / 256 samples:
    # MobileNetV2 entropy 1.62 / 1.37 -> 1.52 / 1.33, the ViT's 1.79 / 1.40 -> 1.68 / 1.33; not spinning at all
    # (allow_spinning=0) left the histogram cells where they were and slowed minmax (the ViT's /256 1.35 -> 1.51).
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


def worth_rebuilding(graph: onnx.GraphProto, needed: set[int]) -> bool:
    """Rebuilding costs a second session; it pays where the transformer rewrote many summaries (the CNNs of
    bench/quant_bench.py: 70-85% of them) and not where it touched a few (the ViT's patch conv: under 1%)."""
    side = [node for i, node in enumerate(graph.node) if i not in needed]
    return sum(node.domain == NCHWC_DOMAIN for node in side) >= max(1.0, MIN_RENUMBERED_SHARE * len(side))


def _needed(graph: onnx.GraphProto, model_outputs: set[str]) -> set[int]:
    """Positions of the nodes the model's own outputs depend on."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    needed, stack = set(), [producer[name] for name in model_outputs if name in producer]
    while stack:
        i = stack.pop()
        if i not in needed:
            needed.add(i)
            stack.extend(producer[x] for x in graph.node[i].input if x in producer)
    return needed


def side_nodes_first(graph: onnx.GraphProto, needed: set[int]) -> None:
    """Reorder the nodes topologically, taking among the ready nodes first those not in `needed` (positions of
    the nodes the model's outputs depend on: the rest are the summaries), then by their current position."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    deps = [{producer[x] for x in node.input if x in producer} for node in graph.node]
    consumers: list[list[int]] = [[] for _ in graph.node]
    for i, d in enumerate(deps):
        for j in d:
            consumers[j].append(i)
    waiting = [len(d) for d in deps]
    ready = [(i in needed, i) for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for c in consumers[i]:
            waiting[c] -= 1
            if waiting[c] == 0:
                heapq.heappush(ready, (c in needed, c))
    if len(order) != len(graph.node):  # a cycle cannot come out of ONNX Runtime; keep its order if it does
        log.debug("calibration graph left in ONNX Runtime's order: %d of %d nodes sorted", len(order), len(graph.node))
        return
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)
