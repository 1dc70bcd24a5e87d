"""What a released SGLang offers, read from its source with ``ast`` (the wheel is downloaded, never installed).

Everything the stand-in engine and the contract tests know about SGLang's interface comes from here: the
``Engine`` methods and their keywords, the ServerArgs fields, the ``SamplingParams`` fields, the HTTP request
schemas and the memory tags. Nothing is written down by hand.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

from tests.upstream import released_source

PINNED = "0.5.23"  # what ``sglang>=0.5`` installs today; the newest release checked
CHECKED = ("0.5.21", "0.5.23")  # first release with weight-update sessions, and the pinned one


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise LookupError(f"class {name} not found")


def _fields(cls: ast.ClassDef) -> list[str]:
    """Annotated attributes of a class body (dataclass / msgspec.Struct fields), ClassVars excluded."""
    names = []
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if "ClassVar" not in ast.unparse(node.annotation):
                names.append(node.target.id)
    return names


@dataclass(frozen=True)
class Signature:
    """Parameters of one released function: every name, and whether it takes ``**kwargs``."""

    params: tuple[str, ...]
    var_keyword: bool

    def takes(self, keyword: str) -> bool:
        return keyword in self.params or self.var_keyword


def _signature(fn: ast.FunctionDef) -> Signature:
    a = fn.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    return Signature(tuple(n for n in names if n != "self"), a.kwarg is not None)


@dataclass(frozen=True)
class ReleasedSGLang:
    version: str
    root: Path  # the ``sglang`` package folder

    @functools.cached_property
    def engine_methods(self) -> dict[str, Signature]:
        """Public methods of ``sglang.srt.entrypoints.engine.Engine`` (and of its bases defined in that file)."""
        tree = _parse(self.root / "srt" / "entrypoints" / "engine.py")
        methods = {}
        cls = _class(tree, "Engine")
        for node in cls.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                methods[node.name] = _signature(node)
        return methods

    @functools.cached_property
    def server_args_fields(self) -> frozenset[str]:
        """ServerArgs' keywords: the fields of every namespace in ``_INPUT_NAMESPACES`` (``srt/server_args.py``),
        declared in ``srt/arg_groups/fields/*.py``, plus ServerArgs' own."""
        server_args = _parse(self.root / "srt" / "server_args.py")
        namespaces = None
        for node in server_args.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "_INPUT_NAMESPACES" for t in node.targets
            ):
                namespaces = [elt.id for elt in node.value.elts]
        if namespaces is None:
            raise LookupError("_INPUT_NAMESPACES not found in server_args.py")
        classes = {}
        for path in sorted((self.root / "srt" / "arg_groups" / "fields").glob("*.py")):
            for node in _parse(path).body:
                if isinstance(node, ast.ClassDef):
                    classes[node.name] = node
        fields = set(_fields(_class(server_args, "ServerArgs")))
        for name in namespaces:
            fields.update(_fields(classes[name]))
        return frozenset(fields)

    @functools.cached_property
    def dtype_choices(self) -> tuple[str, ...]:
        """The ``choices`` of ServerArgs' ``dtype`` field (``srt/arg_groups/fields/model.py``)."""
        model = _class(_parse(self.root / "srt" / "arg_groups" / "fields" / "model.py"), "Model")
        for node in model.body:
            if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "dtype":
                for kw in ast.walk(node.annotation):
                    if isinstance(kw, ast.keyword) and kw.arg == "choices":
                        return tuple(ast.literal_eval(kw.value))
        raise LookupError("dtype choices not found")

    @functools.cached_property
    def sampling_params_fields(self) -> tuple[str, ...]:
        """Fields of ``SamplingParams`` (``srt/sampling/sampling_params.py``): what a request's dict may hold."""
        return tuple(_fields(_class(_parse(self.root / "srt" / "sampling" / "sampling_params.py"), "SamplingParams")))

    def request_fields(self, name: str) -> tuple[str, ...]:
        """Fields of a request class in ``srt/managers/io_struct.py`` (``GenerateReqInput``, ...)."""
        return tuple(_fields(_class(_parse(self.root / "srt" / "managers" / "io_struct.py"), name)))

    @functools.cached_property
    def memory_tags(self) -> list[str]:
        """``GPU_MEMORY_ALL_TYPES`` of ``srt/constants.py``, resolved to strings."""
        tree = _parse(self.root / "srt" / "constants.py")
        consts = {}
        for node in tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                name = node.targets[0].id
                if isinstance(node.value, ast.Constant):
                    consts[name] = node.value.value
                elif name == "GPU_MEMORY_ALL_TYPES":
                    return [consts[elt.id] for elt in node.value.elts]
        raise LookupError("GPU_MEMORY_ALL_TYPES not found")

    @functools.cached_property
    def session_refusal(self) -> str:
        """The message the scheduler answers to ``update_weights_from_tensor`` outside a weight-update session."""
        path = self.root / "srt" / "managers" / "scheduler_components" / "weight_updater.py"
        for node in ast.walk(_parse(path)):
            if isinstance(node, ast.FunctionDef) and node.name == "update_weights_from_tensor":
                for kw in ast.walk(node):
                    if isinstance(kw, ast.keyword) and kw.arg == "message":
                        value = ast.literal_eval(kw.value)
                        if "begin_weight_update" in value:
                            return value
        raise LookupError("no session check in update_weights_from_tensor")


def released(version: str = PINNED) -> ReleasedSGLang:
    """The released SGLang ``version``, downloaded once (skips the test when the registry is unreachable)."""
    return ReleasedSGLang(version, released_source("sglang", version) / "sglang")
