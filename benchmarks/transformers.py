"""Hugging Face checkpoints to int4 ONNX: modelpress, optimum-onnx + ONNX Runtime's MatMulNBitsQuantizer, and
the onnxruntime-genai model builder side by side on the same checkpoints.

    nice -n 10 python benchmarks/transformers.py [--big] [--workdir DIR] [--only LABEL ...]

Checkpoints (made once, kept in ``<workdir>/checkpoints``, default ``~/.cache/modelpress/hfbench``):

* ``llama-tiny`` and ``gpt2-tiny``: the test suite's tiny Llama and GPT-2, trained a few seconds on
  standard-library docstrings with a locally trained tokenizer (:mod:`tests.hf_fixtures`);
* ``llama-1b`` (``--big``, opt-in: ~4.4 GB on disk, several GB of memory and minutes per tool): a
  ``LlamaConfig`` (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192, vocabulary 32000, untied
  LM head: 1.09 B parameters) with random weights, saved by ``save_pretrained`` (safetensors).

Tools, each in its own child process (export + quantize from the checkpoint folder to int4, block 32):

* ``modelpress rtn`` / ``modelpress gptq`` (and each with ``tables=float``): ``modelpress.load(folder)`` (a Llama
  folder written directly as the genai builder's graph, torch only in the check's child process),
  ``int4-weight-only`` (round to nearest; GPTQ calibrated on a text file tokenised by the checkpoint's
  tokenizer, tiny models only),
  ``modelpress.export(..., "out/model.onnx")`` with its default verification (greedy tokens, logits);
* ``modelpress rtn accuracy_level=4``: the same with MatMulNBits computing on int8 activations, the genai
  builder's default on CPU (faster, less exact);
* ``optimum + ORT nbits``: optimum-onnx's ``main_export(task="text-generation-with-past")``, then
  ``MatMulNBitsQuantizer(block_size=32, is_symmetric=False)`` on its ``model.onnx``, saved with external data;
* ``genai builder``: ``python -m onnxruntime_genai.models.builder -i folder -o out -p int4 -e cpu``
  (its defaults, ``int4_block_size=32``).

Columns: CPU time (user + system, ``os.wait4`` of the child), peak RSS (the kernel's high-water mark of
the child, ``ru_maxrss``; the parent stays small and imports no framework), output size, perplexity on
held-out text (64 windows of 64 tokens; 16 on the 1 B model) and its change against transformers' torch fp32, greedy-token agreement
with torch (16 new tokens from 4 prompts, EOS masked as ``min_new_tokens`` does) and decode tokens/s in
ONNX Runtime (batch 1, 32 steps after the prompt; no more threads than the machine's cores), measured after every
tool has run, in one child that runs each output in turn, the fastest of 7 rounds (2 on the 1 B model): tools run
minutes apart met different loads on the shared machine (a 1 B decode measured right after each tool came out at
0.22x and 0.42x of the builder in two runs, 0.96x in turns). Ratios are
modelpress over each peer at the same bits, from this one run: ``tables="float"`` (lookup table float32,
every MatMul int4, a tied LM head as its own int4 copy) against optimum + MatMulNBitsQuantizer, which do the
same; the default (a tied table int4 once, for the lookup and the LM head) against the genai builder, which
does the same. The load average is printed with the figures.

optimum-onnx 0.1.0 needs transformers < 4.58 and does not export with transformers 5's models, so it runs
from its own folder put first on ``PYTHONPATH`` (``--optimum-site``, default ``~/.cache/modelpress/optimum-site``)::

    pip install --no-deps -c constraints.txt --target ~/.cache/modelpress/optimum-site \\
        optimum-onnx==0.1.0 optimum==2.1.0 transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2

A tool that is not installed or fails is printed as failed with its last error line; the others still run.
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# NOTE: run as a script, this folder comes first on sys.path and this file would shadow the transformers package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
BLOCK = 32
WINDOW = 64
NEW_TOKENS = 16
DECODE_STEPS = 32
BIG = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}

TOOLS: dict[str, dict[str, Any]] = {
    "modelpress rtn": {"tool": "modelpress", "algorithm": "rtn"},
    "modelpress rtn tables=float": {"tool": "modelpress", "algorithm": "rtn", "tables": "float"},
    "modelpress gptq": {"tool": "modelpress", "algorithm": "gptq", "tiny_only": True},
    "modelpress gptq tables=float": {
        "tool": "modelpress",
        "algorithm": "gptq",
        "tables": "float",
        "tiny_only": True,
    },
    # NOTE: the genai builder's CPU default: MatMulNBits accuracy_level=4 (int8 activations), faster, less exact
    "modelpress rtn accuracy_level=4": {
        "tool": "modelpress",
        "algorithm": "rtn",
        "accuracy_level": 4,
    },
    "optimum + ORT nbits": {"tool": "optimum"},
    "genai builder": {"tool": "builder"},
}
PEERS = ("optimum + ORT nbits", "genai builder")
# NOTE: each peer against the modelpress rows at its bits: optimum + MatMulNBitsQuantizer keep the lookup table
# float32 and quantize every MatMul (a tied LM head as its own int4 copy), as tables="float" does; the genai
# builder quantizes a tied table once for both (GatherBlockQuantized + MatMulNBits), as the default does, and
# keeps an untied lookup table float32 (its LM head int4), as tables="float" does
FLOAT_TABLES = ("modelpress rtn tables=float", "modelpress gptq tables=float")
SAME_BITS = {
    ("optimum + ORT nbits", True): FLOAT_TABLES,
    ("optimum + ORT nbits", False): FLOAT_TABLES,
    ("genai builder", True): (
        "modelpress rtn",
        "modelpress gptq",
        "modelpress rtn accuracy_level=4",
    ),
    ("genai builder", False): FLOAT_TABLES,
}
# NOTE: held-out perplexity windows: 8 x 64 tokens moved a tiny model's perplexity by more than int4 does
WINDOWS = {"llama-1b": 16}
DEFAULT_WINDOWS = 64
# NOTE: decode speed: the fastest of a few runs of DECODE_STEPS (one 32-step run on the loaded machine varied 10x)
REPEATS = {"llama-1b": 2}
DEFAULT_REPEATS = 7


# -- the children ---------------------------------------------------------------------------------
def _texts() -> tuple[list[str], list[str]]:
    """Calibration and held-out paragraphs (disjoint) of the tiny models' training corpus."""
    sys.path.insert(0, str(ROOT))
    from tests import hf_fixtures

    texts = hf_fixtures.corpus()
    return list(texts[::3]), list(texts[1::3])


def _make_checkpoint(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    from tests import hf_fixtures

    folder = Path(spec["folder"])
    if spec["name"] != "llama-1b":
        hf_fixtures.make_checkpoint(folder, spec["name"].split("-")[0])
        return {}
    tokenizer = hf_fixtures.tokenizer()
    config = transformers.LlamaConfig(
        **BIG,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {}


def _modelpress(spec: dict[str, Any]) -> dict[str, Any]:
    import modelpress

    model = modelpress.load(spec["checkpoint"], show_progress=False)
    options: dict[str, Any] = {
        "block_size": BLOCK,
        "algorithm": spec["algorithm"],
        "tables": spec.get("tables", "quantize"),
    }
    if spec["algorithm"] == "gptq":
        options["calibration"] = spec["calibration"]
    if "accuracy_level" in spec:
        options["accuracy_level"] = spec["accuracy_level"]
    quantized = modelpress.quantize(model, "int4-weight-only", show_progress=False, **options)
    del model
    Path(spec["output"]).mkdir(parents=True, exist_ok=True)
    modelpress.export(quantized, Path(spec["output"]) / "model.onnx", show_progress=False)
    import resource

    # NOTE: a large checkpoint is exported in a child process of this one; wait4's ru_maxrss is the larger of
    # the two high-water marks (this one waits, small, while its child runs), and these tell them apart
    return {
        "own_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "export_child_peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }


def _optimum(spec: dict[str, Any]) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from optimum.exporters.onnx import main_export

    fp32 = Path(spec["output"] + "-fp32")
    main_export(spec["checkpoint"], fp32, task="text-generation-with-past", do_validation=False)
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(fp32 / "model.onnx")), block_size=BLOCK, is_symmetric=False
    )
    quantizer.process()
    Path(spec["output"]).mkdir(parents=True, exist_ok=True)
    quantizer.model.save_model_to_file(
        str(Path(spec["output"]) / "model.onnx"), use_external_data_format=True
    )
    shutil.rmtree(fp32)
    return {}


def _windows(tokenizer: Any, texts: list[str], count: int) -> Any:
    import numpy as np

    ids: list[int] = []
    for text in texts:
        ids += list(tokenizer(text)["input_ids"])
    n = min(count, len(ids) // WINDOW)
    return np.asarray(ids[: n * WINDOW], np.int64).reshape(n, WINDOW)


def _nll(logits: Any, ids: Any) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of ``ids [n, T]`` under ``logits [n, T, V]``, and the token count."""
    import numpy as np

    x = logits[:, :-1].astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    log_probs = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return -float(np.take_along_axis(log_probs, ids[:, 1:, None], axis=-1).sum()), ids[:, 1:].size


def _reference(spec: dict[str, Any]) -> dict[str, Any]:
    """transformers' torch fp32: perplexity on the held-out windows and greedy tokens from the prompts."""
    import numpy as np
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        spec["checkpoint"], local_files_only=True
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        spec["checkpoint"], local_files_only=True, dtype=torch.float32
    ).eval()
    ids = _windows(tokenizer, _texts()[1], spec["windows"])
    total, count = 0.0, 0
    with torch.no_grad():
        for row in ids:
            logits = model(input_ids=torch.from_numpy(row[None])).logits.numpy()
            nll, n = _nll(logits, row[None])
            total, count = total + nll, count + n
        tokens = [
            model.generate(
                torch.from_numpy(row[None, :8]),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )[0, 8:].tolist()
            for row in ids[:4]
        ]
    return {
        "perplexity": float(np.exp(total / count)),
        "tokens": tokens,
        "windows": ids.tolist(),
        "eos": tokenizer.eos_token_id,
    }


class _Decoder:
    """Any of the three tools' decoders in ONNX Runtime: inputs by name, the past from the checkpoint's config."""

    def __init__(self, path: Path, config: dict[str, Any]):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = os.cpu_count() or 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        heads = config.get("num_attention_heads") or config["n_head"]
        self.kv_heads = config.get("num_key_value_heads") or heads
        self.head_size = (
            config.get("head_dim") or (config.get("hidden_size") or config["n_embd"]) // heads
        )

    def step(
        self, ids: Any, past: dict[str, Any] | None, length: int
    ) -> tuple[Any, dict[str, Any]]:
        """Logits of ``ids [1, n]`` after ``length`` cached positions, and the new past."""
        import numpy as np

        n = ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, length + n), np.int64)}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(length, length + n, dtype=np.int64)[None]
        for name in self.inputs:
            if name.startswith("past_key_values."):
                feeds[name] = (
                    past[name]
                    if past
                    else np.zeros((1, self.kv_heads, 0, self.head_size), np.float32)
                )
        values = self.session.run(None, feeds)
        new = {
            o.replace("present", "past_key_values", 1): v
            for o, v in zip(self.outputs, values, strict=True)
            if o.startswith("present")
        }
        return values[self.outputs.index("logits")], new


def _decode_seconds(decoder: _Decoder, prompt: Any) -> float:
    """Seconds for :data:`DECODE_STEPS` greedy steps after ``prompt [1, n]``."""
    import numpy as np

    logits, past = decoder.step(prompt, None, 0)
    start = time.perf_counter()
    for i in range(DECODE_STEPS):
        logits, past = decoder.step(
            np.asarray([[int(logits[0, -1].argmax())]], np.int64), past, prompt.shape[1] + i
        )
    return time.perf_counter() - start


def _evaluate(spec: dict[str, Any]) -> dict[str, Any]:
    """The exported decoder in ONNX Runtime: perplexity, greedy tokens (EOS masked) and decode tokens/s."""
    import numpy as np

    reference = json.loads(Path(spec["reference"]).read_text())
    config = json.loads((Path(spec["checkpoint"]) / "config.json").read_text())
    decoder = _Decoder(Path(spec["output"]) / "model.onnx", config)
    ids = np.asarray(reference["windows"], np.int64)
    total, count = 0.0, 0
    for row in ids:
        nll, n = _nll(decoder.step(row[None], None, 0)[0], row[None])
        total, count = total + nll, count + n
    tokens = []
    for row in ids[:4]:
        logits, past = decoder.step(row[None, :8], None, 0)
        chosen: list[int] = []
        for i in range(NEW_TOKENS):
            last = logits[0, -1].copy()
            last[reference["eos"]] = -np.inf
            chosen.append(int(last.argmax()))
            logits, past = decoder.step(np.asarray([[chosen[-1]]], np.int64), past, 8 + i)
        tokens.append(chosen)
    agree = np.mean(
        [
            a == b
            for x, y in zip(tokens, reference["tokens"], strict=True)
            for a, b in zip(x, y, strict=True)
        ]
    )
    return {"perplexity": float(np.exp(total / count)), "agreement": float(agree)}


def _decode(spec: dict[str, Any]) -> dict[str, Any]:
    """Decode tokens/s of every tool's output, measured in turns (one run of each per round, the fastest
    round kept): on a shared machine the load moves between tools run minutes apart, not within a round."""
    import numpy as np

    reference = json.loads(Path(spec["reference"]).read_text())
    config = json.loads((Path(spec["checkpoint"]) / "config.json").read_text())
    prompt = np.asarray(reference["windows"], np.int64)[:1, :8]
    best = dict.fromkeys(spec["outputs"], float("inf"))
    for _ in range(spec["repeats"]):
        for label, folder in spec["outputs"].items():
            decoder = _Decoder(Path(folder) / "model.onnx", config)
            best[label] = min(best[label], _decode_seconds(decoder, prompt))
            del decoder
    return {label: DECODE_STEPS / seconds for label, seconds in best.items()}


CHILDREN = {
    "checkpoint": _make_checkpoint,
    "modelpress": _modelpress,
    "optimum": _optimum,
    "reference": _reference,
    "evaluate": _evaluate,
    "decode": _decode,
}


def _child(spec: dict[str, Any]) -> None:
    figures = CHILDREN[spec["tool"]](spec)
    Path(spec["result"]).write_text(json.dumps(figures))


# -- the parent (no framework imported: its RSS stays out of the children's) ----------------------
def run_child(
    spec: dict[str, Any], work: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run one child; its figures plus ``cpu_s`` and ``peak_rss`` (bytes) from ``os.wait4``, or ``error``."""
    label = spec.get("label", spec["tool"]).replace(" ", "_").replace("+", "").replace("=", "-")
    log, result = work / f"{label}.log", work / f"{label}.json"
    result.unlink(missing_ok=True)
    command = spec.get("command") or [
        sys.executable,
        __file__,
        "--child",
        json.dumps({**spec, "result": str(result)}),
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MODELPRESS_PROGRESS": "0", **(env or {})},
        )
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    figures = {"cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss": usage.ru_maxrss * 1024}
    if proc.returncode != 0 or (not spec.get("command") and not result.is_file()):
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
        return {**figures, "error": (lines or ["?"])[-1][:160]}
    return {**figures, **(json.loads(result.read_text()) if result.is_file() else {})}


def _size(folder: Path) -> int:
    return sum(
        p.stat().st_size
        for p in folder.iterdir()
        if p.suffix in (".onnx", ".data") or p.name.endswith(".onnx.data")
    )


def _checkpoint(name: str, root: Path, work: Path) -> Path:
    folder = root / name
    if not (folder / "config.json").is_file():
        print(f"making checkpoint {name} ...", file=sys.stderr, flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        figures = run_child(
            {"tool": "checkpoint", "name": name, "folder": str(folder), "label": f"make-{name}"},
            work,
        )
        if "error" in figures:
            raise SystemExit(f"could not make {name}: {figures['error']}")
    return folder


def _spec(
    label: str, checkpoint: Path, out: Path, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, str] | None]:
    tool = TOOLS[label]
    spec = {
        **tool,
        "label": label,
        "checkpoint": str(checkpoint),
        "output": str(out),
        "calibration": str(args.calibration),
    }
    if tool["tool"] == "builder":
        spec["command"] = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(checkpoint),
            "-o",
            str(out),
            "-p",
            "int4",
            "-e",
            "cpu",
            "-c",
            str(out) + "-cache",
            "--extra_options",
            f"int4_block_size={BLOCK}",
        ]
    env = (
        {"PYTHONPATH": os.pathsep.join([str(args.optimum_site), str(ROOT)])}
        if tool["tool"] == "optimum"
        else None
    )
    return spec, env


def _rows(
    name: str, checkpoint: Path, args: argparse.Namespace
) -> list[tuple[str, dict[str, Any]]]:
    work = args.workdir / "runs" / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"running torch fp32 reference on {name} ...", file=sys.stderr, flush=True)
    ref = run_child(
        {
            "tool": "reference",
            "checkpoint": str(checkpoint),
            "label": "reference",
            "windows": WINDOWS.get(name, DEFAULT_WINDOWS),
        },
        work,
    )
    rows: list[tuple[str, dict[str, Any]]] = [
        ("torch fp32", {**ref, "size": _size_checkpoint(checkpoint)})
    ]
    _print_row(name, *rows[0], rows[0][1])
    outputs: dict[str, Path] = {}
    for label in TOOLS:
        if (args.only and label not in args.only) or (
            TOOLS[label].get("tiny_only") and name == "llama-1b"
        ):
            continue
        out = work / label.replace(" ", "_").replace("+", "").replace("=", "-")
        print(f"running {label} on {name} ...", file=sys.stderr, flush=True)
        spec, env = _spec(label, checkpoint, out, args)
        figures = run_child(spec, work, env)
        if "error" not in figures:
            figures["size"] = _size(out)
            scores = run_child(
                {
                    "tool": "evaluate",
                    "checkpoint": str(checkpoint),
                    "output": str(out),
                    "label": f"eval-{label}",
                    "reference": str(work / "reference.json"),
                    "repeats": REPEATS.get(name, DEFAULT_REPEATS),
                },
                work,
            )
            figures.update({k: v for k, v in scores.items() if k not in ("cpu_s", "peak_rss")})
        rows.append((label, figures))
        outputs[label] = out
    _decode_in_turns(name, checkpoint, work, rows, outputs)
    for label, figures in rows[1:]:
        _print_row(name, label, figures, ref)
    if not args.keep:
        for out in outputs.values():
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(str(out) + "-cache", ignore_errors=True)
    return rows


def _decode_in_turns(
    name: str,
    checkpoint: Path,
    work: Path,
    rows: list[tuple[str, dict[str, Any]]],
    outputs: dict[str, Path],
) -> None:
    """Every output's decode tokens/s from one child that runs them in turns (:func:`_decode`)."""
    done = {label: str(outputs[label]) for label, f in rows[1:] if "error" not in f}
    if not done:
        return
    print(f"decoding in turns on {name} ...", file=sys.stderr, flush=True)
    spec = {
        "tool": "decode",
        "checkpoint": str(checkpoint),
        "label": "decode",
        "outputs": done,
        "reference": str(work / "reference.json"),
        "repeats": REPEATS.get(name, DEFAULT_REPEATS),
    }
    speeds = run_child(spec, work)
    for label, figures in rows[1:]:
        if label in speeds:
            figures["tokens_s"] = speeds[label]


def _size_checkpoint(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


_HEAD = (
    "| checkpoint | tool                         | CPU s  | peak RSS GB | output MB | perplexity | ppl delta | agreement | decode tok/s |\n"
    "|------------|------------------------------|--------|-------------|-----------|------------|-----------|-----------|--------------|"
)


def _print_row(name: str, label: str, f: dict[str, Any], ref: dict[str, Any]) -> None:
    if "error" in f:
        print(f"| {name:10} | {label:28} | failed: {f['error']} |", flush=True)
        return
    ppl, base = f.get("perplexity"), ref.get("perplexity")
    delta = (
        f"{ppl - base:+9.3f}"
        if ppl is not None and base is not None and label != "torch fp32"
        else f"{'-':>9}"
    )
    cpu = f"{f['cpu_s']:6.1f}" if "cpu_s" in f and label != "torch fp32" else f"{'-':>6}"
    rss = (
        f"{f['peak_rss'] / 1e9:11.2f}"
        if "peak_rss" in f and label != "torch fp32"
        else f"{'-':>11}"
    )
    agree = f"{f['agreement']:9.3f}" if "agreement" in f else f"{'-':>9}"
    speed = f"{f['tokens_s']:12.1f}" if "tokens_s" in f else f"{'-':>12}"
    print(
        f"| {name:10} | {label:28} | {cpu} | {rss} | {f['size'] / 1e6:9.1f} | {ppl or 0:10.3f} | {delta} | {agree} | {speed} |",
        flush=True,
    )


def _print_ratios(name: str, rows: list[tuple[str, dict[str, Any]]], tied: bool) -> None:
    """Each peer against the modelpress rows at its bits (:data:`SAME_BITS`; ``tied``: the checkpoint ties its
    LM head to the embedding table): the ratios, and the perplexity and agreement differences (modelpress minus
    peer: lower perplexity, higher agreement is better)."""
    by = dict(rows)
    for peer in PEERS:
        other = by.get(peer, {})
        for label in SAME_BITS[peer, tied]:
            mine = by.get(label, {})
            if "error" in mine or "error" in other or not mine or not other:
                continue
            print(
                f"{name}: {label} / {peer} (same bits): CPU {mine['cpu_s'] / other['cpu_s']:.2f}x, "
                f"peak RSS {mine['peak_rss'] / other['peak_rss']:.2f}x, size {mine['size'] / other['size']:.2f}x, "
                f"decode tok/s {mine['tokens_s'] / other['tokens_s']:.2f}x, perplexity {mine['perplexity'] - other['perplexity']:+.3f}, "
                f"agreement {mine['agreement'] - other['agreement']:+.3f}",
                flush=True,
            )
    mine = by.get("modelpress rtn", {})
    if (
        "peak_rss" in mine and by["torch fp32"].get("size", 0) > 100e6
    ):  # NOTE: a tiny checkpoint's ratio is the interpreter's size
        print(
            f"{name}: modelpress rtn peak RSS / checkpoint fp32 size: {mine['peak_rss'] / by['torch fp32']['size']:.2f}x",
            flush=True,
        )
        if mine.get("export_child_peak_rss"):
            size = by["torch fp32"]["size"]
            print(
                f"{name}: modelpress rtn: export child {mine['export_child_peak_rss'] / size:.2f}x, "
                f"the process that checks, quantizes and exports {mine['own_peak_rss'] / size:.2f}x the checkpoint",
                flush=True,
            )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--big",
        action="store_true",
        help="add the 1.09 B random-weight Llama (~4.4 GB; several GB of memory and minutes per tool)",
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path.home() / ".cache" / "modelpress" / "hfbench"
    )
    parser.add_argument(
        "--optimum-site",
        type=Path,
        default=Path.home() / ".cache" / "modelpress" / "optimum-site",
        help="folder holding optimum-onnx and transformers<4.58 (pip install --target), put first on the optimum child's PYTHONPATH",
    )
    parser.add_argument("--only", nargs="*", help="run only these tools (labels as printed)")
    parser.add_argument(
        "--checkpoints",
        nargs="*",
        help="run only these checkpoints (llama-tiny, gpt2-tiny, llama-1b)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the outputs (<workdir>/runs/)")
    args = parser.parse_args()
    args.workdir = args.workdir.expanduser().resolve()
    names = [
        n
        for n in ("llama-tiny", "gpt2-tiny", *(["llama-1b"] if args.big else []))
        if not args.checkpoints or n in args.checkpoints
    ]
    (args.workdir / "runs").mkdir(parents=True, exist_ok=True)
    args.calibration = args.workdir / "calibration.txt"
    if not args.calibration.is_file():
        sys.path.insert(0, str(ROOT))
        args.calibration.write_text("\n\n".join(_texts()[0]))
    print(
        f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs (a shared, loaded machine)",
        flush=True,
    )
    print(_HEAD, flush=True)
    results = {
        name: _rows(
            name, _checkpoint(name, args.workdir / "checkpoints", args.workdir / "runs"), args
        )
        for name in names
    }
    print()
    for name, rows in results.items():
        config = json.loads((args.workdir / "checkpoints" / name / "config.json").read_text())
        _print_ratios(name, rows, bool(config.get("tie_word_embeddings", True)))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)


if __name__ == "__main__":
    main()
