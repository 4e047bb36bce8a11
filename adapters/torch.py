"""The PyTorch adapter (extra ``torch``): ``nn.Module``, ``torch.export`` programs, TorchScript.

Import goes through ``torch.onnx.export(dynamo=True)`` (needs onnxscript) and falls back to the
TorchScript-based exporter when the dynamo path fails; the provenance says which was used.
Every import is verified: the module and the imported model (run in ONNX Runtime) on the
example inputs; a relative difference over ``rtol`` (default 1e-4) is an error. Weighted layers
are named after their module path (``features.0``, ``classifier.fc``), the model after its file
or class (see :mod:`.naming`).

torch is imported only inside these functions: ``import modelpress`` never imports it.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.plugin_api import (
    Adapter,
    DataError,
    InvalidModelError,
    Model,
    Provenance,
    UnsupportedModelError,
    WeightedLayer,
    check_import,
    hookimpl,
)

__all__ = ["load_torch"]

_SUFFIXES = {".pt2", ".pt", ".pth", ".ts"}


def _is_torch_object(source: Any) -> bool:
    torch = sys.modules.get("torch")
    if torch is None:  # NOTE: an object of torch cannot exist before torch was imported
        return False
    return isinstance(
        source, (torch.nn.Module, torch.export.ExportedProgram, torch.jit.ScriptModule)
    )


def _accepts(source: Any) -> bool:
    if isinstance(source, (str, os.PathLike)):
        return Path(source).suffix.lower() in _SUFFIXES
    return _is_torch_object(source)


@hookimpl
def modelpress_register_adapters(register):  # type: ignore[no-untyped-def]
    register(
        Adapter(
            name="torch",
            accepts=_accepts,
            load=load_torch,
            priority=10,
            summary="torch.nn.Module, torch.export programs (.pt2), TorchScript (.pt)",
        )
    )


def _require_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise UnsupportedModelError(
            "loading PyTorch models needs the torch extra: pip install -c constraints.txt 'modelpress[torch]'"
        ) from None
    return torch


def _refuse_weights_only_file(torch: Any, path: Path) -> None:
    """A file of tensors only (a ``state_dict`` or a checkpoint dict, which ``weights_only`` loading
    reads without running code) has no architecture to export: say so, and how to load it."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:
        return  # NOTE: not a plain tensor file: a pickled module, or no torch file at all
    if isinstance(obj, dict):
        tensors = sum(isinstance(v, torch.Tensor) for v in obj.values())
        what = (
            f"a state_dict ({tensors} tensors)"
            if tensors == len(obj)
            else f"a dict of {len(obj)} entries ({tensors} tensors)"
        )
    else:
        what = f"a {type(obj).__name__}"
    raise InvalidModelError(
        f"{str(path)!r} holds {what}: weights without the model's architecture. Build the model in Python, "
        f"load the weights (model.load_state_dict(torch.load(path))) and pass the module: modelpress.load(model, "
        f"example_inputs=...), or save it with torch.export.save (.pt2) or torch.jit.save (.pt) for the command line"
    )


def _read_file(path: Path, trust_pickle: bool) -> Any:
    torch = _require_torch()
    if not path.is_file():
        raise InvalidModelError(f"{str(path)!r}: no such file")
    if path.suffix.lower() == ".pt2":
        try:
            return torch.export.load(str(path))
        except Exception as exc:
            raise InvalidModelError(
                f"{str(path)!r}: not a torch.export program (.pt2): {exc}"
            ) from None
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as jit_error:
        _refuse_weights_only_file(torch, path)
        if not trust_pickle:
            raise InvalidModelError(
                f"{str(path)!r}: not a TorchScript file ({str(jit_error).splitlines()[0][:200]}). If it is a pickled "
                f"full module, loading it runs code from the file: pass trust_pickle=True (--trust-pickle) only if you trust it"
            ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise InvalidModelError(
            f"{str(path)!r}: cannot be unpickled as a torch module: {exc}"
        ) from None
    if not isinstance(obj, torch.nn.Module):
        raise InvalidModelError(
            f"{str(path)!r}: holds a {type(obj).__name__}, not a torch.nn.Module (a state dict needs its model class: "
            f"build the module, load_state_dict, and pass the module)"
        )
    return obj


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    torch = _require_torch()
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, dict):
        example_inputs = tuple(example_inputs.values())
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    out = []
    for item in example_inputs:
        if isinstance(item, np.ndarray):
            item = torch.from_numpy(item)
        out.append(item)
    return tuple(out)


def _to_numpy_list(outputs: Any) -> list[np.ndarray]:
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if not isinstance(outputs, (tuple, list)):
        outputs = [outputs]
    return [o.detach().cpu().numpy() for o in outputs]


def load_torch(
    source: Any,
    *,
    example_inputs: Any = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_batch: bool = True,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    opset: int | None = None,
    rtol: float = 1e-4,
    trust_pickle: bool = False,
    exporter: str = "auto",
    **_: Any,
) -> Model:
    """Import a PyTorch model (see the module docstring).

    Args:
        example_inputs: a tensor, array or tuple of them; required unless ``source`` is a
            ``torch.export`` program that carries its own.
        input_names / output_names: ONNX names (default: the forward's argument names / the
            exporter's).
        dynamic_batch: make axis 0 of every input dynamic (``"batch"``).
        dynamic_axes: more dynamic axes, ``{"tokens": {1: "seq"}}``.
        exporter: ``"auto"`` (dynamo, then TorchScript), ``"dynamo"`` or ``"torchscript"``.
    """
    torch = _require_torch()
    label = str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
    title = Path(source).stem if isinstance(source, (str, os.PathLike)) else type(source).__name__
    if isinstance(source, (str, os.PathLike)):
        source = _read_file(Path(source), trust_pickle)
    if not _is_torch_object(source):
        raise UnsupportedModelError(
            f"{label}: not a torch.nn.Module, torch.export program or TorchScript module"
        )
    is_program = isinstance(source, torch.export.ExportedProgram)
    args = _example_args(source, example_inputs, is_program, label)
    if is_program and dynamic_batch:
        source = _dynamic_batch_source(torch, source, args, label)
        is_program = isinstance(source, torch.export.ExportedProgram)

    runnable = source.module() if is_program else source
    reference = _reference_outputs(torch, runnable, args, label, is_program)
    names, axes = _input_axes(runnable, args, input_names, dynamic_batch, dynamic_axes)
    job = _Export(torch, source, args, names, output_names, axes, opset, is_program, label)
    proto, used = _to_onnx(job, exporter)

    from modelpress.adapters.naming import rename_layers
    from modelpress.adapters.onnx import load_onnx

    model = load_onnx(
        proto, normalize=False
    )  # NOTE: a fresh export: keep its BatchNorms for training
    rename_layers(model, module_path)
    model.ir.graph.name = title  # NOTE: not the exporter's 'main_graph' in errors and report titles
    feeds = {
        spec.name: np.asarray(a.detach().cpu().numpy())
        for spec, a in zip(model.signature.inputs, args, strict=False)
    }
    figures = check_import(reference, model, feeds, rtol, f"{label} (exported with {used})")
    model.provenance = Provenance(
        source_framework="torch",
        source_version=torch.__version__,
        source=label,
        importer=used,
        extra={"import_check": figures, "fallback_reasons": job.errors},
    )
    return model


# NOTE: exporter-made constants (folded, transposed weights) are "val_12", "onnx::MatMul_7", "_v_3": not module paths
_PARAMETER = re.compile(r"^(?!val_\d|_v_\d)[A-Za-z_]\w*(\.\w+)*$")
# NOTE: a module path may start with a digit (a top-level nn.Sequential: "0.weight"); a bare number is never a parameter
_MODULE_WEIGHT = re.compile(r"^(?!val_\d|_v_\d)\w+(\.\w+)*\.(weight|weight_orig)$")


def module_path(layer: WeightedLayer) -> str | None:
    """The path of the module holding ``layer``'s weight: from the weight's name (both exporters
    name initializers after parameters, ``features.0.weight``), else the module scope the dynamo
    exporter records on the node (``pkg.torch.onnx.name_scopes``), else a bare parameter's name,
    else the scope in a TorchScript node name."""
    weight = layer.weight.name or ""
    if _MODULE_WEIGHT.match(weight):
        return weight.rsplit(".", 1)[0]
    scope = module_scope(layer.node)
    if scope:
        return scope
    if _PARAMETER.match(weight):
        return weight
    return _scope_path(layer.node.name or "")


def module_scope(node: Any) -> str | None:
    """The innermost module the dynamo exporter records for ``node`` (``pkg.torch.onnx.name_scopes``:
    ``['', 'features', 'features.0', 'conv2d']`` -> ``features.0``), or None."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return None
    try:
        modules = [s for s in ast.literal_eval(scopes)[:-1] if s]
    except (ValueError, SyntaxError):
        return None
    return str(modules[-1]) if modules else None


def _scope_path(node_name: str) -> str | None:
    """The module path in a TorchScript exporter's node name: ``/features/features.2/conv/Conv`` -> ``features.2.conv``."""
    if not node_name.startswith("/"):
        return None
    path = ""
    for part in node_name.strip("/").split("/")[:-1]:
        path = part if not path or part.startswith(path + ".") else f"{path}.{part}"
    return path or None


def _example_args(
    source: Any, example_inputs: Any, is_program: bool, label: str
) -> tuple[Any, ...]:
    """The example inputs as a tuple: the ones given, else an exported program's own."""
    args = _as_tuple(example_inputs)
    if not args and is_program and source.example_inputs is not None:
        args = tuple(source.example_inputs[0])
    if not args:
        raise DataError(
            f"{label}: example_inputs are needed to export a PyTorch model (e.g. example_inputs=torch.randn(1, 3, 32, 32))"
        )
    return args


def _fixed_batch(torch: Any, program: Any, args: tuple[Any, ...]) -> int | None:
    """The batch a ``torch.export`` program was specialised to (``export(net, (x[:2],))`` without
    ``dynamic_shapes``: axis 0 of every tensor input is that int), or None where it is dynamic."""
    sizes = {a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.dim() > 0}
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    for name in program.graph_signature.user_inputs:
        value = getattr(placeholders.get(name), "meta", {}).get("val")
        shape = getattr(value, "shape", None)
        if shape is not None and len(shape) > 0 and not isinstance(shape[0], int):
            return None
    return sizes.pop() if len(sizes) == 1 else None


def _rows_agree(torch: Any, fixed: Any, dynamic: Any, args: tuple[Any, ...]) -> bool:
    """Whether ``dynamic`` computes each row as the ``fixed`` program does: on the example batch
    plus its first row again (a batch the fixed program cannot take)."""
    more = tuple(torch.cat([a, a[:1]]) if isinstance(a, torch.Tensor) else a for a in args)
    with torch.no_grad():
        want = _to_numpy_list(fixed(*args))
        first = _to_numpy_list(fixed(*(torch.cat([a[:1]] * a.shape[0]) for a in args)))
        got = _to_numpy_list(dynamic(*more))
    return all(
        g.shape[:1] == (w.shape[0] + 1,)
        and np.allclose(g[:-1], w, rtol=1e-4, atol=1e-5)
        and np.allclose(g[-1], f[0], rtol=1e-4, atol=1e-5)
        for g, w, f in zip(got, want, first, strict=True)
    )


def _dynamic_batch_source(torch: Any, program: Any, args: tuple[Any, ...], label: str) -> Any:
    """Where ``program`` was exported with a fixed batch and its graph does not depend on it (it
    re-traces with a dynamic batch and computes each row as before), that module, exported like
    any module (``dynamic_batch``: axis 0 named ``batch``); else ``program`` as it is, with a
    warning that says the batch is fixed and how to export it with a dynamic one."""
    batch = _fixed_batch(torch, program, args)
    if batch is None:
        return program
    more = tuple(torch.cat([a, a[:1]]) if isinstance(a, torch.Tensor) else a for a in args)
    dims = tuple(
        {0: torch.export.Dim("batch")} if isinstance(a, torch.Tensor) and a.dim() else None
        for a in args
    )
    try:
        with warnings.catch_warnings(), _quiet_retrace():
            warnings.simplefilter("ignore")
            # NOTE: .module() of a fixed-batch program checks its inputs' shapes: re-traced without
            # those guards with a dynamic batch (one row more: a batch the program cannot take)
            free = torch.export.export(
                program.module(check_guards=False), more, dynamic_shapes=dims, strict=False
            ).module()
            if _rows_agree(torch, program.module(), free, args):
                return free
    except Exception:  # NOTE: the graph depends on the batch (a reshape to it): keep it, and say so
        pass
    warnings.warn(
        f"{label} was exported with a fixed batch of {batch} (torch.export.export without dynamic_shapes) that "
        f"its graph depends on (it could not be re-traced with another batch, or then computed other rows): "
        f"the ONNX model takes batches of exactly {batch} (data is fed in batches of {batch}). "
        f"For any batch size, export it with a dynamic batch: torch.export.export(net, (x,), "
        f"dynamic_shapes=({{0: torch.export.Dim('batch')}},)), one entry per input",
        UserWarning,
        stacklevel=3,
    )
    return program


@dataclass
class _Export:
    """One export to ONNX, what each exporter is given: the ``torch`` module, the ``source`` model
    (module or ``torch.export`` program) and its example ``args``, the ONNX input ``names``,
    ``output_names`` and dynamic ``axes``, the ``opset``, and the ``label`` errors name; each
    failed exporter's reason goes into ``errors``."""

    torch: Any
    source: Any
    args: tuple[Any, ...]
    names: list[str]
    output_names: list[str] | None
    axes: dict[str, dict[int, str]]
    opset: int | None
    is_program: bool
    label: str
    errors: list[str] = field(default_factory=list)


def _to_onnx(job: _Export, exporter: str) -> tuple[Any, str]:
    """The ONNX proto and the exporter that wrote it: dynamo, then (``"auto"``) TorchScript; each
    failure's reason goes into ``job.errors``, and none working is an error listing them."""
    proto, used = None, ""
    if exporter in ("auto", "dynamo"):
        proto, used = _export_dynamo(job)
    if proto is None and exporter in ("auto", "torchscript") and not job.is_program:
        proto, used = _export_torchscript(job)
    if proto is None:
        raise UnsupportedModelError(
            f"{job.label}: PyTorch could not export the model to ONNX: " + "; ".join(job.errors)
        )
    return proto, used


def _reference_outputs(
    torch: Any, runnable: Any, args: tuple[Any, ...], label: str, is_program: bool
) -> list[np.ndarray]:
    """The source model's outputs on the example inputs (what the import is checked against)."""
    if isinstance(runnable, torch.nn.Module) and not is_program:  # NOTE: programs refuse .eval()
        with contextlib.suppress(
            NotImplementedError
        ):  # NOTE: so do their modules (a fixed batch made dynamic)
            runnable.eval()
    try:
        with torch.no_grad():
            return _to_numpy_list(runnable(*args))
    except Exception as exc:
        shapes = ", ".join(
            str(tuple(a.shape)) if hasattr(a, "shape") else type(a).__name__ for a in args
        )
        raise DataError(
            f"{label}: the example inputs ({shapes}) do not fit the model: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        ) from None


def _input_axes(
    runnable: Any,
    args: tuple[Any, ...],
    input_names: list[str] | None,
    dynamic_batch: bool,
    dynamic_axes: dict[str, dict[int, str]] | None,
) -> tuple[list[str], dict[str, dict[int, str]]]:
    """The ONNX input names (default: the forward's argument names) and their dynamic axes."""
    names = input_names
    if names is None:
        try:
            import inspect

            params = list(inspect.signature(runnable.forward).parameters)
            names = params[: len(args)] if len(params) >= len(args) else None
        except (TypeError, ValueError):
            names = None
    names = names or [f"input_{i}" for i in range(len(args))]
    axes: dict[str, dict[int, str]] = {}
    for name, arg in zip(names, args, strict=True):
        if dynamic_batch and getattr(arg, "dim", lambda: 0)() > 0:
            axes.setdefault(name, {})[0] = "batch"
    for name, extra in (dynamic_axes or {}).items():
        axes.setdefault(name, {}).update(extra)
    return names, axes


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _export_dynamo(job: _Export) -> tuple[Any, str]:
    """``torch.onnx.export(dynamo=True)``; ``(None, "")`` with the reason in ``job.errors`` when it fails."""
    torch = job.torch
    try:
        dims: dict[str, Any] = {}
        dyn_shapes = tuple(
            {
                axis: dims.setdefault(dim, torch.export.Dim(dim))
                for axis, dim in job.axes.get(name, {}).items()
            }
            or None
            for name in job.names
        )
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                job.source,
                job.args,
                dynamo=True,
                input_names=job.names,
                output_names=job.output_names,
                dynamic_shapes=None if job.is_program else dyn_shapes,
                opset_version=job.opset,
                verbose=False,
            )
        return program.model_proto, "torch.onnx.export(dynamo=True)"
    except Exception as exc:
        job.errors.append(f"dynamo exporter: {_first_line(exc)}")
        return None, ""


def _export_torchscript(job: _Export) -> tuple[Any, str]:
    """The TorchScript exporter (the fallback); ``(None, "")`` with the reason in ``job.errors`` when it fails."""
    try:
        buffer = io.BytesIO()
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            job.torch.onnx.export(
                job.source,
                job.args,
                buffer,
                dynamo=False,
                input_names=job.names,
                output_names=job.output_names,
                dynamic_axes=job.axes or None,
                opset_version=job.opset or 17,
            )
        import onnx

        return onnx.load_from_string(
            buffer.getvalue()
        ), "torch.onnx.export(dynamo=False) (TorchScript fallback)"
    except Exception as exc:
        job.errors.append(f"TorchScript exporter: {_first_line(exc)}")
        return None, ""


class _quiet:
    """Silence exporters that print progress to stdout and log notices (e.g. "torchvision is
    not installed. Skipping torchvision::nms") through torch's loggers; with the ``modelpress``
    logger at DEBUG (``modelpress -v``) the log notices are shown."""

    _LOGGERS: tuple[str, ...] = ("torch.onnx", "torch.export", "torch._dynamo", "torch._export")
    _LEVEL = logging.ERROR

    def __enter__(self) -> None:
        self._stdout = sys.stdout
        sys.stdout = io.StringIO()
        self._levels: dict[str, int] = {}
        if not logging.getLogger("modelpress").isEnabledFor(logging.DEBUG):
            for name in self._LOGGERS:
                logger = logging.getLogger(name)
                self._levels[name] = logger.level
                logger.setLevel(self._LEVEL)

    def __exit__(self, *exc: object) -> None:
        sys.stdout = self._stdout
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)


class _quiet_retrace(_quiet):
    """:class:`_quiet` for re-tracing a fixed-batch program with another batch: where its graph depends
    on the batch that fails, as expected, and fake tensors' error logs (a traceback) are not shown."""

    _LOGGERS = (*_quiet._LOGGERS, "torch._subclasses.fake_tensor")
    _LEVEL = logging.CRITICAL
