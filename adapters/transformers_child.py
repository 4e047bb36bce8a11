"""A checkpoint folder exported in a child process, so the torch weights never live in the caller's memory.

:func:`export_in_child` runs ``python -m modelpress.adapters.transformers_child REQUEST`` (``REQUEST`` a
JSON file in a temporary folder the caller owns, removed at exit). The child loads the checkpoint with
transformers, exports it to ``model.onnx`` in that folder with every weight in one external-data file,
runs torch on the export's example inputs and writes them and torch's outputs beside it, then exits:
its memory goes back to the operating system. The caller imports the file (its weights read lazily) and
checks it against torch's outputs, without torch's weights, or onnxscript's rewrite rules that keep
pointing at them, in its own memory.

A :class:`~modelpress.plugin_api.ModelpressError` raised in the child is raised again in the caller, same
class and message; any other failure is an :class:`~modelpress.plugin_api.InvalidModelError` with the
child's exit status and the last lines it printed (its traceback). Ctrl-C in the caller kills the child.
"""

from __future__ import annotations

import atexit
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ChildExport", "ReferenceRun", "export_in_child", "reference_in_child", "work_folder"]

_TAIL_LINES = 20


@dataclass
class ChildExport:
    """What the child exported: the ONNX file, the check's inputs and torch's outputs, and facts for the provenance."""

    path: Path
    reference: list[np.ndarray]
    feeds: dict[str, np.ndarray]
    facts: dict[str, Any]
    meta: dict[str, Any]
    label: str

    def check(self, rtol: float) -> tuple[Any, dict[str, Any]]:
        """The export as a :class:`modelpress.Model`, checked against torch's outputs (as ``StagedExport.check``)."""
        from modelpress.adapters.onnx import load_onnx
        from modelpress.plugin_api import check_import

        imported = load_onnx(self.path, sample=self.feeds)
        figures = check_import(self.reference, imported, self.feeds, rtol, self.label)
        return imported, {"import_check": figures, **self.facts}


def _ids(example_inputs: Any) -> np.ndarray | None:
    """The token ids of ``example_inputs`` as an array (the child checks their shape as the in-process route does)."""
    if isinstance(example_inputs, dict):
        example_inputs = example_inputs.get("input_ids")
    elif isinstance(example_inputs, (tuple, list)):
        example_inputs = example_inputs[0] if example_inputs else None
    if example_inputs is None:
        return None
    if hasattr(
        example_inputs, "detach"
    ):  # NOTE: a torch tensor; torch is imported already where one exists
        example_inputs = example_inputs.detach().cpu().numpy()
    return np.asarray(example_inputs)


def _run(command: list[str], log: Path) -> int:
    """Run the child, its output into ``log``; any interruption of the caller (Ctrl-C) kills it."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            return proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise


def _raise_failure(work: Path, code: int, folder: Path) -> None:
    """The child's error raised again: its ModelpressError as it was, anything else with its output's tail."""
    import modelpress.plugin_api as api

    error = work / "error.json"
    if error.is_file():
        found = json.loads(error.read_text())
        kind = getattr(api, found["type"], None)
        if isinstance(kind, type) and issubclass(kind, api.ModelpressError):
            raise kind(found["message"]) from None
    lines = (
        (work / "child.log").read_text(errors="replace").splitlines()
        if (work / "child.log").is_file()
        else []
    )
    tail = "\n".join(lines[-_TAIL_LINES:]) or "(it printed nothing)"
    last = next((line.strip() for line in reversed(lines) if line.strip()), "no output")
    raise api.InvalidModelError(
        f"{str(folder)!r}: exporting the checkpoint in a child process failed (exit status {code}): {last}\n"
        f"the child's last output lines:\n{tail}"
    )


def work_folder() -> Path:
    """A temporary folder for one export, removed at exit."""
    work = Path(tempfile.mkdtemp(prefix="modelpress-transformers-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    return work


def _start(work: Path, request: dict[str, Any], example_inputs: Any) -> None:
    """Run the child on ``request`` in ``work``; its failure raised here (see the module docstring)."""
    ids = _ids(example_inputs)
    if ids is not None:
        np.save(work / "example_ids.npy", ids)
    request = {**request, "work": str(work), "ids": ids is not None}
    (work / "request.json").write_text(json.dumps(request))
    command = [
        sys.executable,
        "-m",
        "modelpress.adapters.transformers_child",
        str(work / "request.json"),
    ]
    code = _run(command, work / "child.log")
    if code != 0 or not (work / "result.json").is_file():
        _raise_failure(work, code, Path(request["folder"]))


@dataclass
class ReferenceRun:
    """torch's side of checking an export written without torch: the check's inputs and outputs, greedy tokens."""

    reference: list[np.ndarray]
    feeds: dict[str, np.ndarray]
    prompts: np.ndarray
    tokens: np.ndarray


def reference_in_child(
    folder: Path, work: Path, task: str, layout: tuple[int, int, int], *, example_inputs: Any = None
) -> ReferenceRun:
    """The checkpoint ``folder`` run in torch in a child process (:mod:`~modelpress.adapters.transformers_reference`):
    this process never holds torch, its weights, or both the export and them."""
    request = {"mode": "reference", "folder": str(folder), "task": task, "layout": list(layout)}
    _start(work, request, example_inputs)
    with np.load(work / "arrays.npz") as arrays:
        count = sum(1 for k in arrays.files if k.startswith("reference."))
        reference = [arrays[f"reference.{i}"] for i in range(count)]
        feeds = {k.removeprefix("feed."): arrays[k] for k in arrays.files if k.startswith("feed.")}
        return ReferenceRun(reference, feeds, arrays["greedy.prompts"], arrays["greedy.tokens"])


def export_in_child(
    folder: Path, task: str | None, *, example_inputs: Any = None, opset: int | None = None
) -> ChildExport:
    """Export the checkpoint ``folder`` for ``task`` in a child process (see the module docstring)."""
    work = work_folder()
    _start(work, {"folder": str(folder), "task": task, "opset": opset}, example_inputs)
    result = json.loads((work / "result.json").read_text())
    with np.load(work / "arrays.npz") as arrays:
        reference = [arrays[f"reference.{i}"] for i in range(result["outputs"])]
        feeds = {name: arrays[f"feed.{name}"] for name in result["inputs"]}
    return ChildExport(
        work / "model.onnx", reference, feeds, result["facts"], result["meta"], result["label"]
    )


# -- the child ------------------------------------------------------------------------------------
def _export(request: dict[str, Any]) -> None:
    from modelpress.adapters.transformers import _open_folder, _refuse_unsupported, _require
    from modelpress.adapters.transformers_export import export_staged

    transformers = _require()
    folder, work = Path(request["folder"]), Path(request["work"])
    ids = np.load(work / "example_ids.npy") if request["ids"] else None
    model, task = _open_folder(transformers, folder, request["task"])
    _refuse_unsupported(model, task, str(folder))
    staged = export_staged(
        model, task, str(folder), example_inputs=ids, opset=request["opset"], folder=work
    )
    meta = {
        "task": task,
        "architecture": type(model).__name__,
        "model_type": getattr(model.config, "model_type", ""),
        "transformers_version": transformers.__version__,
    }
    arrays = {f"reference.{i}": r for i, r in enumerate(staged.reference)} | {
        f"feed.{k}": v for k, v in staged.feeds.items()
    }
    np.savez(work / "arrays.npz", **arrays)
    result = {
        "outputs": len(staged.reference),
        "inputs": list(staged.feeds),
        "facts": staged.facts,
        "meta": meta,
        "label": staged.label,
    }
    (work / "result.json").write_text(json.dumps(result))


def _reference(request: dict[str, Any]) -> None:
    from modelpress.adapters.transformers import _open_folder, _require
    from modelpress.adapters.transformers_reference import reference_arrays

    transformers = _require()
    work = Path(request["work"])
    ids = np.load(work / "example_ids.npy") if request["ids"] else None
    # NOTE: in float32 whatever the checkpoint stores: the direct writer writes float32
    model, _ = _open_folder(transformers, Path(request["folder"]), request["task"], float32=True)
    np.savez(work / "arrays.npz", **reference_arrays(model, ids, tuple(request["layout"])))
    (work / "result.json").write_text(json.dumps({"done": True}))


def main(argv: list[str]) -> int:
    from modelpress.plugin_api import ModelpressError

    request = json.loads(Path(argv[0]).read_text())
    try:
        _reference(request) if request.get("mode") == "reference" else _export(request)
    except ModelpressError as exc:
        (Path(request["work"]) / "error.json").write_text(
            json.dumps({"type": type(exc).__name__, "message": str(exc)})
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
