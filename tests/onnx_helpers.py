"""What every folded ONNX model must keep from its original (shared by the ONNX fold tests).

The checks read both models with plain protobuf access, independently of ``adapters.onnx``'s own
dataflow code: node names and order, model and graph metadata, value_info, initializers (unused
ones gone, untouched ones byte-identical).
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
from onnx import AttributeProto, GraphProto

from adapters.report import FusionReport

_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def graphs(model: onnx.ModelProto) -> Iterator[tuple[str, GraphProto | onnx.FunctionProto]]:
    """(path, body) of the main graph, every nested subgraph and every function, in a fixed order."""
    def walk(path: str, graph: GraphProto) -> Iterator[tuple[str, GraphProto | onnx.FunctionProto]]:
        yield path, graph
        for node in graph.node:
            for attr in node.attribute:
                subs = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)
                for i, sub in enumerate(subs):
                    yield from walk(f"{path}/{node.name}.{attr.name}[{i}]", sub)
    yield from walk("main", model.graph)
    for function in model.functions:
        yield f"function {function.domain}.{function.name}", function
        for node in function.node:
            for attr in node.attribute:
                subs = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)
                for i, sub in enumerate(subs):
                    yield from walk(f"{function.name}/{node.name}.{attr.name}[{i}]", sub)


def _read_names(body: GraphProto | onnx.FunctionProto) -> set[str]:
    names = {n for node in body.node for n in node.input}
    if isinstance(body, GraphProto):
        names |= {o.name for o in body.output}
        for node in body.node:
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)):
                    names |= _read_names(sub)
    else:
        names |= set(body.output)
    return names


def _values(body: GraphProto | onnx.FunctionProto) -> set[str]:
    names = {o for node in body.node for o in node.output if o}
    if isinstance(body, GraphProto):
        names |= {i.name for i in body.input} | {t.name for t in body.initializer}
    else:
        names |= set(body.input)
    return names


def _constant_copies(body: GraphProto | onnx.FunctionProto, initializers: set[str]) -> set[str]:
    """Names of the Identity nodes of ``body`` that copy a constant (an initializer, a Constant, another copy)."""
    constants = set(initializers) | {o for n in body.node if n.op_type == "Constant" for o in n.output}
    copies: set[str] = set()
    for node in body.node:
        if node.op_type == "Identity" and node.input and node.input[0] in constants:
            copies.add(node.name)
            constants.update(node.output)
    return copies


def assert_faithful(original: onnx.ModelProto, folded: onnx.ModelProto, report: FusionReport) -> None:
    """Everything a fold must not change is unchanged; nothing left behind is unused."""
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        assert getattr(folded, field) == getattr(original, field), field
    assert list(folded.opset_import) == list(original.opset_import)
    assert list(folded.metadata_props) == list(original.metadata_props)
    assert [(f.domain, f.name, list(f.input), list(f.output)) for f in folded.functions] == \
        [(f.domain, f.name, list(f.input), list(f.output)) for f in original.functions]
    assert folded.graph.name == original.graph.name and folded.graph.doc_string == original.graph.doc_string
    assert list(folded.graph.output) == list(original.graph.output)
    initializer_inputs = {t.name for t in original.graph.initializer} | {t.name for t in folded.graph.initializer}
    assert [i for i in folded.graph.input if i.name not in initializer_inputs] == \
        [i for i in original.graph.input if i.name not in initializer_inputs]

    folded_norms = {p.norm for p in report.folded}
    original_bodies, folded_bodies = list(graphs(original)), list(graphs(folded))
    assert [p for p, _ in original_bodies] == [p for p, _ in folded_bodies]
    initializers = {t.name for _, body in original_bodies if isinstance(body, GraphProto) for t in body.initializer}
    for (path, before), (_, after) in zip(original_bodies, folded_bodies, strict=True):
        # Norms, Constant nodes and Identity copies of constants may go (when nothing reads them any more).
        gone_copies = _constant_copies(before, initializers) - {n.name for n in after.node}

        # A MatMul of an input that is not 2-D gets its new bias from an Add inserted right after it.
        before_names = {n.name for n in before.node}
        after_nodes = list(after.node)
        for i, node in enumerate(after_nodes):
            if node.name not in before_names:
                assert node.op_type in ("Constant", "Add") and (node.op_type == "Constant" or (
                    i > 0 and after_nodes[i - 1].op_type == "MatMul" and after_nodes[i - 1].output[0] == node.input[0]
                    and node.name.startswith(after_nodes[i - 1].name))), (path, node.name, node.op_type)

        # An Add of a constant right after a folded layer or norm (a bias, a norm's extra shift) may go.
        gone_copies = gone_copies | _folded_adds(before, after, initializers, report)

        def kept(body: GraphProto | onnx.FunctionProto, gone: set[str] = gone_copies,
                 known: set[str] = before_names) -> list[onnx.NodeProto]:
            return [n for n in body.node if n.op_type not in ("BatchNormalization", "Constant") and n.name not in gone
                    and n.name in known]
        # Every node keeps its name and place; MatMul may become Gemm (a MatMul whose BN needs a bias).
        assert [n.name for n in kept(after)] == [n.name for n in kept(before)], path
        for a, b in zip(kept(after), kept(before), strict=True):
            assert a.op_type == b.op_type or (b.op_type, a.op_type) == ("MatMul", "Gemm"), (path, a.name)
            assert a.doc_string == b.doc_string and a.domain == b.domain, (path, a.name)
        before_norms = [n.name for n in before.node if n.op_type == "BatchNormalization"]
        after_norms = [n.name for n in after.node if n.op_type == "BatchNormalization"]
        assert after_norms == [n for n in before_norms if n not in folded_norms and
                               not any(f.endswith("/" + n) for f in folded_norms)], path
        values = _values(after) | _outer_values(folded, path)
        kept_info = [v for v in before.value_info if v.name in values]
        assert list(after.value_info) == kept_info, f"{path}: value_info not kept or not cleaned up"
        if isinstance(after, GraphProto):
            used_after, used_before = _read_names_everywhere(folded), _read_names_everywhere(original)
            for tensor in after.initializer:
                assert tensor.name in used_after or tensor.name not in used_before, \
                    f"{path}: initializer '{tensor.name}' is left unused"
    _assert_untouched_initializers(original, folded, report)


def _folded_adds(before: GraphProto | onnx.FunctionProto, after: GraphProto | onnx.FunctionProto,
                 initializers: set[str], report: FusionReport) -> set[str]:
    """Names of the Add nodes of ``before`` missing from ``after``, each checked to add a constant (an initializer or
    a Constant's output) to the output of a folded layer or norm, or of another such Add."""
    folded = {name.rsplit("/", 1)[-1] for p in report.folded for name in (p.norm, p.layer)}
    present = {n.name for n in after.node}
    constants = set(initializers) | {o for n in before.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in before.node for o in n.output}
    gone: set[str] = set()
    for node in before.node:
        if node.op_type != "Add" or node.name in present:
            continue
        data = [i for i in node.input if i not in constants]
        assert len(data) == 1 and len(node.input) == 2, f"Add '{node.name}' removed but it adds no constant"
        source = producer.get(data[0])
        assert source is not None and (source.name in folded or source.name in gone), \
            f"Add '{node.name}' removed but it reads no folded layer or norm"
        gone.add(node.name)
    return gone


def _outer_values(model: onnx.ModelProto, path: str) -> set[str]:
    """Values of the enclosing graphs of a subgraph (a subgraph's value_info may describe them)."""
    if path == "main" or path.startswith("function"):
        return set()
    return set().union(*(_values(body) for p, body in graphs(model) if path.startswith(p) and p != path))


def _read_names_everywhere(model: onnx.ModelProto) -> set[str]:
    return _read_names(model.graph)


def _assert_untouched_initializers(original: onnx.ModelProto, folded: onnx.ModelProto, report: FusionReport) -> None:
    """A main-graph initializer whose bytes changed must be read by a folded layer (or the Add of its bias)."""
    layer_names = {p.layer.rsplit("/", 1)[-1] for p in report.folded}
    nodes = [n for _, body in graphs(folded) for n in body.node]
    layers = [n for n in nodes if n.name in layer_names and n.op_type in _LAYERS]
    outputs = {n.output[0] for n in layers}
    allowed = {name for n in layers for name in n.input[1:]}
    allowed |= {name for n in nodes if n.op_type == "Add" and outputs & set(n.input) for name in n.input}
    before = {t.name: t.SerializeToString() for t in original.graph.initializer}
    for tensor in folded.graph.initializer:
        if tensor.name in before and tensor.SerializeToString() != before[tensor.name]:
            assert tensor.name in allowed, f"initializer '{tensor.name}' changed but no folded layer reads it"
