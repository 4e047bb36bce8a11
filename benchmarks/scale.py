"""modelpress at real size: a synthetic decoder with its weights in one external-data file.

    nice -n 10 python benchmarks/scale.py [--size 0.5b|1.2b] [--workdir DIR] [--keep] [--skip-ort-dynamic]

Generates (once, kept in <workdir>/<size>/, default ~/.cache/modelpress/scale) a decoder-only
transformer (token embedding, single-head causal attention, ReLU MLP, LayerNorms, LM head) whose
fp32 weights are streamed tensor by tensor into one ``decoder.onnx.data`` file, never whole in
memory: 0.5b is 0.55 B parameters (2.2 GB), 1.2b is 1.24 B (4.95 GB).

Then runs, each in a fresh child process so its peak RSS (VmHWM) is its own:

* modelpress int4 weight-only RTN (``format=matmulnbits``, asymmetric, MatMul/Gemm only: what ORT's
  tool quantizes) at block 128 and 32, and int8-dynamic: load + quantize + export with
  verification, as ``modelpress quantize`` does (block 128 also with ``--no-verify``, the same work
  as ORT's tool, which does not verify; and with the defaults, which also quantize the embedding);
* ONNX Runtime's ``MatMulNBitsQuantizer`` (RTN, asymmetric) at block 128 and 32, and
  ``quantize_dynamic`` (int8): load + quantize + save with external data.

and prints to stdout, a row as each run ends: wall time, peak RSS (and as a multiple of the model
size), output size, the logits' cosine and max |error| against fp32 on token sequences
(Zipf-distributed ids, 4 x 64 tokens), whether the logits are identical to ORT's at the same block
size, and the output's load time in ORT. All figures come from this one run.

Needs only numpy, onnx, onnx-ir, onnxruntime, pluggy, rich and pyyaml (no torch, no network): when
modelpress is not installed it is imported from this source tree, and when pydantic is missing the
wheels in the folder named by ``MODELPRESS_BENCH_WHEELS`` (pydantic, pydantic_core,
annotated_types, typing_inspection for that machine, fetched beforehand with ``pip download``)
are unpacked into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SIZES = {
    "tiny": {
        "vocab": 1000,
        "d": 256,
        "ffn": 1024,
        "layers": 2,
    },  # a smoke test of the script itself
    "0.5b": {"vocab": 32000, "d": 1536, "ffn": 6144, "layers": 16},
    "1.2b": {"vocab": 32000, "d": 2048, "ffn": 8192, "layers": 22},
}


# -- the synthetic decoder ------------------------------------------------------------------------
def _tensors(cfg: dict[str, int]) -> list[tuple[str, tuple[int, ...], float]]:
    """(name, shape, init std) of every weight, in file order."""
    d, f, v = cfg["d"], cfg["ffn"], cfg["vocab"]
    out: list[tuple[str, tuple[int, ...], float]] = [("embed.weight", (v, d), 1.0)]
    for i in range(cfg["layers"]):
        p = f"layers.{i}."
        out += [(p + "ln1.scale", (d,), 0.0), (p + "ln1.bias", (d,), -1.0)]
        out += [(p + n, (d, d), d**-0.5) for n in ("q.weight", "k.weight", "v.weight", "o.weight")]
        out += [(p + "ln2.scale", (d,), 0.0), (p + "ln2.bias", (d,), -1.0)]
        out += [
            (p + "up.weight", (d, f), d**-0.5),
            (p + "up.bias", (f,), -1.0),
            (p + "down.weight", (f, d), f**-0.5),
        ]
    out += [
        ("ln_f.scale", (d,), 0.0),
        ("ln_f.bias", (d,), -1.0),
        ("lm_head.weight", (d, v), d**-0.5),
    ]
    return out


def _write_weights(
    path: Path, tensors: list[tuple[str, tuple[int, ...], float]]
) -> list[tuple[str, tuple[int, ...], int, int]]:
    """Stream the weights into one file, a few MB at a time; returns (name, shape, offset, length)."""
    rng = np.random.default_rng(0)
    index = []
    offset = 0
    with open(path, "wb") as f:
        for name, shape, std in tensors:
            count = int(np.prod(shape))
            for start in range(0, count, 1 << 22):
                n = min(1 << 22, count - start)
                if std == 0.0:  # LayerNorm scale
                    chunk = np.ones(n, np.float32)
                elif std < 0:  # biases
                    chunk = (0.02 * rng.standard_normal(n)).astype(np.float32)
                else:
                    chunk = (std * rng.standard_normal(n)).astype(np.float32)
                f.write(chunk.tobytes())
            index.append((name, shape, offset, count * 4))
            offset += count * 4
    return index


def build_decoder(folder: Path, cfg: dict[str, int]) -> Path:
    import onnx
    from onnx import TensorProto, helper

    path = folder / "decoder.onnx"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    print(f"generating {path} ...", file=sys.stderr, flush=True)
    index = _write_weights(folder / "decoder.onnx.data.tmp", _tensors(cfg))
    inits = []
    for name, shape, offset, length in index:
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", "decoder.onnx.data"),
            ("offset", str(offset)),
            ("length", str(length)),
        ):
            t.external_data.add(key=key, value=value)
        inits.append(t)
    d = cfg["d"]
    consts = [
        helper.make_tensor("scale", TensorProto.FLOAT, [], [d**-0.5]),
        helper.make_tensor("neg", TensorProto.FLOAT, [], [-1e9]),
        helper.make_tensor("one_i", TensorProto.INT64, [1], [1]),
        helper.make_tensor("zero_f", TensorProto.FLOAT, [], [0.0]),
    ]
    nodes = [
        helper.make_node("Gather", ["embed.weight", "input_ids"], ["h0"], name="embed"),
        # causal mask [S, S]: -1e9 above the diagonal
        helper.make_node("Shape", ["input_ids"], ["ids_shape"], name="ids_shape", start=1, end=2),
        helper.make_node(
            "ConstantOfShape",
            ["ids_shape"],
            ["ones_row"],
            name="ones_row",
            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]),
        ),
        helper.make_node(
            "Concat", ["ids_shape", "ids_shape"], ["sq_shape"], name="sq_shape", axis=0
        ),
        helper.make_node("Expand", ["ones_row", "sq_shape"], ["ones_sq"], name="ones_sq"),
        helper.make_node("Trilu", ["ones_sq", "one_i"], ["upper"], name="upper", upper=1),
        helper.make_node("Mul", ["upper", "neg"], ["mask"], name="mask"),
    ]
    h = "h0"
    for i in range(cfg["layers"]):
        p = f"layers.{i}."
        q = f"l{i}_"
        nodes += [
            helper.make_node(
                "LayerNormalization",
                [h, p + "ln1.scale", p + "ln1.bias"],
                [q + "n1"],
                name=q + "ln1",
                axis=-1,
            ),
            *[
                helper.make_node("MatMul", [q + "n1", p + f"{m}.weight"], [q + m], name=q + m)
                for m in ("q", "k", "v")
            ],
            helper.make_node("Transpose", [q + "k"], [q + "kt"], name=q + "kt", perm=[0, 2, 1]),
            helper.make_node("MatMul", [q + "q", q + "kt"], [q + "s"], name=q + "scores"),
            helper.make_node("Mul", [q + "s", "scale"], [q + "ss"], name=q + "scaled"),
            helper.make_node("Add", [q + "ss", "mask"], [q + "sm"], name=q + "masked"),
            helper.make_node("Softmax", [q + "sm"], [q + "a"], name=q + "softmax", axis=-1),
            helper.make_node("MatMul", [q + "a", q + "v"], [q + "av"], name=q + "attend"),
            helper.make_node("MatMul", [q + "av", p + "o.weight"], [q + "o"], name=q + "o"),
            helper.make_node("Add", [h, q + "o"], [q + "r1"], name=q + "res1"),
            helper.make_node(
                "LayerNormalization",
                [q + "r1", p + "ln2.scale", p + "ln2.bias"],
                [q + "n2"],
                name=q + "ln2",
                axis=-1,
            ),
            helper.make_node("MatMul", [q + "n2", p + "up.weight"], [q + "u"], name=q + "up"),
            helper.make_node("Add", [q + "u", p + "up.bias"], [q + "ub"], name=q + "up_bias"),
            helper.make_node("Relu", [q + "ub"], [q + "g"], name=q + "act"),
            helper.make_node("MatMul", [q + "g", p + "down.weight"], [q + "dn"], name=q + "down"),
            helper.make_node("Add", [q + "r1", q + "dn"], [q + "out"], name=q + "res2"),
        ]
        h = q + "out"
    nodes += [
        helper.make_node(
            "LayerNormalization", [h, "ln_f.scale", "ln_f.bias"], ["hf"], name="ln_f", axis=-1
        ),
        helper.make_node("MatMul", ["hf", "lm_head.weight"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes,
        "decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [
            helper.make_tensor_value_info(
                "logits", TensorProto.FLOAT, ["batch", "sequence", cfg["vocab"]]
            )
        ],
        inits + consts,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21)],
        ir_version=10,
        producer_name="modelpress-bench",
    )
    onnx.save(model, str(path.with_suffix(".onnx.tmp")))
    os.replace(folder / "decoder.onnx.data.tmp", folder / "decoder.onnx.data")
    os.replace(path.with_suffix(".onnx.tmp"), path)
    return path


# -- runs (each in a child process) ---------------------------------------------------------------
_BOOTSTRAP = r"""
import importlib.abc, importlib.util, os, sys, tempfile, tomllib
def _use_source_tree(root):
    # modelpress is not installed here: import it from the source tree (core/ is `modelpress`,
    # adapters/ and plugins/ its subpackages, as pyproject.toml maps them) and give importlib.metadata
    # a dist-info with the built-in entry points, so the plugins register as they do when installed.
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    dirs = {k: os.path.join(root, v) for k, v in project["tool"]["setuptools"]["package-dir"].items()}
    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name in dirs:
                return importlib.util.spec_from_file_location(name, os.path.join(dirs[name], "__init__.py"),
                                                              submodule_search_locations=[dirs[name]])
            return None
    sys.meta_path.insert(0, Finder())
    info = os.path.join(tempfile.mkdtemp(prefix="modelpress-bench-"), "modelpress-0.0.0+source.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: modelpress\nVersion: 0.0.0+source\n")
    with open(os.path.join(info, "entry_points.txt"), "w") as f:
        f.write("[modelpress]\n" + "".join(f"{k} = {v}\n" for k, v in project["project"]["entry-points"]["modelpress"].items()))
    sys.path.append(os.path.dirname(info))
def _use_wheels(root):
    # NOTE: a machine without network and without pydantic (a core dependency): the wheels in
    # $MODELPRESS_BENCH_WHEELS (pydantic and its dependencies, downloaded for that machine) are
    # unpacked into a temporary folder put first on sys.path.
    import glob, zipfile
    site = tempfile.mkdtemp(prefix="modelpress-bench-site-")
    for wheel in glob.glob(os.path.join(os.environ.get("MODELPRESS_BENCH_WHEELS", ""), "*.whl")):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    sys.path.insert(0, site)
    for name in [m for m in sys.modules if m.split(".")[0] in ("pydantic", "pydantic_core", "typing_extensions", "annotated_types", "typing_inspection")]:
        del sys.modules[name]
for attempt in range(3):
    try:
        import modelpress
        break
    except ImportError as exc:
        if exc.name == "modelpress" and attempt == 0:
            _use_source_tree(ROOT)
        elif exc.name and exc.name.split(".")[0] in ("pydantic", "pydantic_core", "annotated_types", "typing_inspection") and attempt < 2:
            _use_wheels(ROOT)
        else:
            raise SystemExit(f"modelpress needs {exc.name!r}, which is not installed ({exc})")
"""

_CHILD = r"""
import json, os, sys, time
spec = json.loads(sys.argv[1])
ROOT = spec["root"]
start = time.perf_counter()
figures = {}
if spec["tool"] == "modelpress":
    exec(spec["bootstrap"])
    model = modelpress.load(spec["source"], show_progress=False)
    t = time.perf_counter()
    result = modelpress.quantize(model, spec["method"], show_progress=False, **spec["options"])
    figures["pass_s"] = time.perf_counter() - t
    exported = modelpress.export(result, spec["output"], show_progress=False, verify=spec.get("verify", True))
    figures["verify_s"] = exported.verification_seconds
elif spec["tool"] == "ort-nbits":
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    model = onnx.load(spec["source"])
    quant = MatMulNBitsQuantizer(model, block_size=spec["block_size"], is_symmetric=False)
    quant.process()
    quant.model.save_model_to_file(spec["output"], use_external_data_format=True)
else:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(spec["source"], spec["output"], weight_type=QuantType.QInt8, use_external_data_format=True)
figures["wall_s"] = time.perf_counter() - start
try:  # NOTE: VmHWM is this process's own high-water mark; ru_maxrss also counts the parent it was forked from
    with open("/proc/self/status") as f:
        figures["peak_rss"] = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
except (OSError, StopIteration):
    import resource
    figures["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
print("FIGURES " + json.dumps(figures))
"""


def run_child(spec: dict) -> dict:
    env = {**os.environ, "MODELPRESS_PROGRESS": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps({**spec, "bootstrap": _BOOTSTRAP})],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    line = next(x for x in proc.stdout.splitlines() if x.startswith("FIGURES "))
    return json.loads(line[len("FIGURES ") :])


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def _session(path: Path):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    start = time.perf_counter()
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session, time.perf_counter() - start


def _tokens(vocab: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.minimum(rng.zipf(1.3, size=(4, 64)) - 1, vocab - 1).astype(np.int64)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The logits' cosine, flattened: modelpress's one cosine, imported as the children import it."""
    exec(
        _BOOTSTRAP, {"ROOT": str(ROOT)}
    )  # NOTE: from this tree when modelpress is not installed; once imported, a no-op
    from modelpress.evaluation.criteria import cosine

    return cosine(a, b)


_MATMUL_ONLY = {
    "op_types": ["MatMul", "Gemm"]
}  # NOTE: what ORT's MatMulNBitsQuantizer quantizes (not the embedding)
VARIANTS: list[tuple[str, dict]] = [  # type: ignore[type-arg]
    (
        "modelpress int4 b128",
        {
            "tool": "modelpress",
            "method": "int4-weight-only",
            "options": {"block_size": 128, "format": "matmulnbits", **_MATMUL_ONLY},
        },
    ),
    (
        "modelpress int4 b128 --no-verify",
        {
            "tool": "modelpress",
            "method": "int4-weight-only",
            "verify": False,
            "options": {"block_size": 128, "format": "matmulnbits", **_MATMUL_ONLY},
        },
    ),
    ("ORT MatMulNBits b128", {"tool": "ort-nbits", "block_size": 128}),
    (
        "modelpress int4 b32",
        {
            "tool": "modelpress",
            "method": "int4-weight-only",
            "options": {"block_size": 32, "format": "matmulnbits", **_MATMUL_ONLY},
        },
    ),
    ("ORT MatMulNBits b32", {"tool": "ort-nbits", "block_size": 32}),
    (
        "modelpress int4 b128 + embedding",
        {
            "tool": "modelpress",
            "method": "int4-weight-only",
            "options": {"block_size": 128, "format": "matmulnbits"},
        },
    ),
    ("modelpress int8-dynamic", {"tool": "modelpress", "method": "int8-dynamic", "options": {}}),
    ("ORT quantize_dynamic", {"tool": "ort-dynamic"}),
]
TWINS = {
    "modelpress int4 b128": "ORT MatMulNBits b128",
    "modelpress int4 b128 --no-verify": "ORT MatMulNBits b128",
    "modelpress int4 b32": "ORT MatMulNBits b32",
    "modelpress int8-dynamic": "ORT quantize_dynamic",
}
SAME_WORK = {
    "modelpress int4 b128",
    "modelpress int4 b128 --no-verify",
    "modelpress int4 b32",
}  # logits comparable with the twin's


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    parser.add_argument(
        "--workdir",
        default=str(Path.home() / ".cache" / "modelpress" / "scale"),
        help="folder for the generated model (<workdir>/<size>/, kept and reused) and the outputs "
        "(<workdir>/outputs-<size>/, removed afterwards unless --keep)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the quantized outputs")
    parser.add_argument("--only", nargs="*", help="run only these variants (labels as printed)")
    parser.add_argument(
        "--skip", nargs="*", default=[], help="skip these variants (labels as printed)"
    )
    parser.add_argument(
        "--skip-ort-dynamic",
        action="store_true",
        help="skip ORT's quantize_dynamic (it needs about 3x the model size in memory: ~15 GB at 1.2b)",
    )
    args = parser.parse_args()

    cfg = SIZES[args.size]
    workdir = Path(args.workdir).expanduser().resolve()
    source = build_decoder(workdir / args.size, cfg)
    model_bytes = _size(source)
    work = workdir / f"outputs-{args.size}"
    work.mkdir(parents=True, exist_ok=True)
    skip = set(args.skip) | ({"ORT quantize_dynamic"} if args.skip_ort_dynamic else set())
    variants = [v for v in VARIANTS if (not args.only or v[0] in args.only) and v[0] not in skip]
    tokens = _tokens(cfg["vocab"])
    try:
        session, load_s = _session(source)
        reference = session.run(None, {"input_ids": tokens})[0]
        del session
        rows = [("fp32 source", {"wall_s": 0.0, "peak_rss": None}, model_bytes, load_s, reference)]
        _print_head(model_bytes, args.size, cfg)
        _print_row(rows[0], rows, model_bytes)
        for label, spec in variants:
            out = work / (label.replace(" ", "_").replace("+", "plus").replace("--", "") + ".onnx")
            print(f"running {label} ...", file=sys.stderr, flush=True)
            figures = run_child(
                {**spec, "root": str(ROOT), "source": str(source), "output": str(out)}
            )
            if "error" in figures:
                print(f"  {label} failed: {figures['error']}", file=sys.stderr, flush=True)
                rows.append((label, figures, 0, None, None))
                _print_row(rows[-1], rows, model_bytes)
                continue
            session, load_s = _session(out)
            logits = session.run(None, {"input_ids": tokens})[0]
            del session
            rows.append((label, figures, _size(out), load_s, logits))
            _print_row(rows[-1], rows, model_bytes)
            if not args.keep:
                for p in work.glob(out.name + "*"):
                    p.unlink()
        _print_ratios(rows)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


_HEAD = f"| {'variant':32} | wall s | pass s | verify s | peak RSS GiB | RSS / model | output MB | cosine vs fp32 | max abs err | = ORT logits | ORT load s |"


def _print_head(model_bytes: int, size: str, cfg: dict[str, int]) -> None:
    params = sum(int(np.prod(s)) for _, s, _ in _tensors(cfg))
    print(
        f"\nsynthetic decoder {size}: {params / 1e9:.2f} B parameters, {model_bytes / 1e9:.2f} GB fp32 in one external-data file; "
        f"{os.cpu_count()} CPUs\n"
    )
    print(_HEAD)
    print("|" + "|".join("-" * (len(c)) for c in _HEAD.split("|")[1:-1]) + "|", flush=True)


def _print_row(row: tuple, rows: list, model_bytes: int) -> None:  # type: ignore[type-arg]
    """One row, printed as soon as its run is done (a twin ORT row compares with the modelpress rows before it)."""
    label, figures, out_bytes, load_s, out = row
    if "error" in figures:
        print(f"| {label:32} | failed: {figures['error']} |", flush=True)
        return
    reference = rows[0][4]
    logits = {r[0]: r[4] for r in rows}
    rss = figures.get("peak_rss")
    same = "-"
    if label in SAME_WORK and logits.get(TWINS[label]) is not None:
        twin = logits[TWINS[label]]
        same = "yes" if np.array_equal(out, twin) else f"no ({np.abs(out - twin).max():.2g})"
    elif (
        label in TWINS.values()
    ):  # NOTE: ORT runs after the modelpress variants it is compared with
        mine = [
            r for r in rows if TWINS.get(r[0]) == label and r[0] in SAME_WORK and r[4] is not None
        ]
        same = (
            ", ".join(
                ("yes" if np.array_equal(r[4], out) else f"no ({np.abs(r[4] - out).max():.2g})")
                for r in mine
            )
            or "-"
        )
    print(
        f"| {label:32} | {figures['wall_s']:6.1f} | {figures.get('pass_s') or 0:6.1f} | {figures.get('verify_s') or 0:8.1f} | "
        f"{(rss or 0) / 2**30:12.2f} | {((rss or 0) / model_bytes):10.2f}x | {out_bytes / 1e6:9.0f} | "
        f"{_cosine(out, reference):14.6f} | {float(np.abs(out - reference).max()):11.4f} | {same:12} | {load_s:10.2f} |",
        flush=True,
    )


def _print_ratios(rows: list) -> None:  # type: ignore[type-arg]
    ratios = []
    for mp_label, ort_label in TWINS.items():
        a = next((r for r in rows if r[0] == mp_label and "error" not in r[1]), None)
        b = next((r for r in rows if r[0] == ort_label and "error" not in r[1]), None)
        if a and b:
            ratios.append(
                f"{mp_label} / {ort_label}: wall {a[1]['wall_s'] / b[1]['wall_s']:.2f}x, peak RSS {a[1]['peak_rss'] / b[1]['peak_rss']:.2f}x"
            )
    print("\n" + "\n".join(ratios), flush=True)


if __name__ == "__main__":
    main()
