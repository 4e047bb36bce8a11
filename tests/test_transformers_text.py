"""Text features for Hugging Face checkpoints: ``--task``, text data in compress / tune / the CLI
(``--seq-len``, the held-out part of a calibration corpus), and verification that speaks text
(perplexity, greedy-token agreement, decode tokens/s; thresholds per method) on the tiny trained
Llama and GPT-2 made in the test session (nothing from the hub)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")

import modelpress  # noqa: E402
from modelpress.adapters.transformers import tasks_of  # noqa: E402
from modelpress.adapters.transformers_data import held_out_count, text_samples  # noqa: E402
from modelpress.cli.main import main  # noqa: E402
from modelpress.evaluation.text import (  # noqa: E402
    DEFAULT_TEXT_FLOOR,
    greedy_generate,
    perplexity,
    text_floor,
    text_misses,
    token_agreement,
)
from modelpress.ir.provenance import PassRecord, Provenance  # noqa: E402
from modelpress.testing import tiny_mlp  # noqa: E402
from tests import hf_fixtures  # noqa: E402


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return hf_fixtures.make_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def llama(llama_dir) -> modelpress.Model:
    return modelpress.load(llama_dir, show_progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """A calibration corpus (.txt and .jsonl) and separate evaluation text, from standard-library docstrings."""
    folder = tmp_path_factory.mktemp("text")
    texts = hf_fixtures.corpus()
    (folder / "corpus.txt").write_text("\n\n".join(texts[::3]))
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in texts[::3])
    )
    (folder / "eval.txt").write_text("\n\n".join(texts[1::6]))
    return {
        "txt": folder / "corpus.txt",
        "jsonl": folder / "corpus.jsonl",
        "eval": folder / "eval.txt",
    }


def _record(method: str) -> PassRecord:
    return PassRecord(
        method=method,
        kind="quantize",
        plugin="modelpress",
        plugin_version="",
        options={},
        seconds=0.0,
        figures={},
    )


# -- fast: no model is trained ---------------------------------------------------------------------


def test_tasks_a_model_class_can_do():
    assert tasks_of("LlamaForCausalLM") == (
        "text-generation-with-past",
        "text-generation",
        "feature-extraction",
    )
    assert tasks_of("BertForSequenceClassification") == (
        "text-classification",
        "feature-extraction",
    )
    assert tasks_of("BertModel") == ("feature-extraction",)


def test_a_causal_lm_folder_refuses_a_task_it_cannot_do_by_name(tmp_path):
    """The refusal comes from the config alone (no weights are read): the task and the list of those the model can do."""
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    )
    with pytest.raises(
        modelpress.OptionsError,
        match="task 'text-classification': LlamaForCausalLM can do "
        "text-generation-with-past, text-generation, feature-extraction",
    ):
        modelpress.load(tmp_path, task="text-classification")
    code = main(["inspect", str(tmp_path), "--task", "fill-mask"])
    assert code == 1


def test_task_on_a_model_without_tasks_is_refused(tmp_path):
    path = tmp_path / "mlp.onnx"
    modelpress.export(tiny_mlp(), path, verify=False, show_progress=False)
    with pytest.raises(modelpress.OptionsError, match=r"task 'text-generation'.*has no tasks"):
        modelpress.load(path, task="text-generation")
    assert (
        main(
            [
                "quantize",
                str(path),
                "-m",
                "int8-dynamic",
                "--task",
                "feature-extraction",
                "-o",
                str(tmp_path / "q.onnx"),
                "-q",
            ]
        )
        == 1
    )
    assert not (tmp_path / "q.onnx").exists()


def test_seq_len_must_be_a_length(tmp_path, capsys):
    with pytest.raises(
        SystemExit
    ) as exited:  # NOTE: argparse's usage error, with the exit code of every user error
        main(["quantize", "model.onnx", "-o", str(tmp_path / "q.onnx"), "--seq-len", "1"])
    assert exited.value.code == 1
    assert "--seq-len: '1': give a whole number of tokens >= 2" in capsys.readouterr().err


def test_text_thresholds_are_declared_per_method_int8_tighter_than_int4():
    registry = modelpress.get_registry()
    int8, int4 = (
        registry.method(name, "quantize").text_floor
        for name in ("int8-dynamic", "int4-weight-only")
    )
    assert (
        int8.min_token_agreement > int4.min_token_agreement
        and int8.max_perplexity_increase < int4.max_perplexity_increase
    )
    # NOTE: a chain is held to the loosest of its passes' floors; a method that declares none gets the loose default
    chain = Provenance(passes=(_record("int8-dynamic"), _record("int4-weight-only")))
    assert text_floor(chain) == int4
    assert (
        text_floor(
            Provenance(
                passes=(
                    PassRecord(
                        method="magnitude",
                        kind="prune",
                        plugin="",
                        plugin_version="",
                        options={},
                        seconds=0.0,
                        figures={},
                    ),
                )
            )
        )
        == DEFAULT_TEXT_FLOOR
    )
    assert text_floor(Provenance()) is None
    figures = {
        "perplexity": 10.0,
        "perplexity_increase": 0.1,
        "token_agreement": 0.8,
        "decode_tokens_per_s": 1.0,
    }
    assert text_misses(figures, int4) is None
    assert (
        text_misses(figures, int8) == "greedy-token agreement 80.0% < 90%; perplexity +10.0% > +5%"
    )


def test_token_agreement_counts_generated_positions_only():
    reference = np.array([[1, 2, 3, 4, 5], [1, 2, 6, 7, 8]])
    tokens = np.array([[1, 2, 3, 4, 0], [1, 2, 6, 0, 0]])
    assert token_agreement(reference, tokens, prompt_length=2) == pytest.approx(3 / 6)


def test_held_out_part_of_a_corpus():
    assert [held_out_count(n) for n in (1, 2, 8, 16, 17, 100)] == [0, 1, 1, 2, 2, 12]


# -- slow: the tiny trained Llama and GPT-2 ----------------------------------------------------------


@pytest.mark.slow
def test_calibration_and_held_out_parts_do_not_overlap(llama, corpus):
    everything = text_samples(llama, corpus["txt"], sequence_length=32, max_samples=10_000)[
        "input_ids"
    ]
    calibration = text_samples(
        llama, corpus["txt"], sequence_length=32, part="calibration", max_samples=10_000
    )["input_ids"]
    held = modelpress.get_registry().load_data(str(corpus["txt"]), llama, "held-out", 32)[
        "input_ids"
    ]
    first = len(everything) - held_out_count(len(everything))
    np.testing.assert_array_equal(calibration, everything[:first])
    np.testing.assert_array_equal(
        held, everything[first : first + 64]
    )  # NOTE: the held-out part starts after the calibration's (64 at most)
    jsonl = modelpress.get_registry().load_data(str(corpus["jsonl"]), llama, "calibration", 16)
    assert jsonl["input_ids"].shape[1] == 16 and jsonl["past_key_values.0.key"].shape[2] == 0


@pytest.mark.slow
def test_compress_a_cached_decoder_on_text_reports_perplexity_and_token_agreement(
    llama, llama_dir, corpus, tmp_path
):
    """compress with a text corpus: it calibrates on the corpus and evaluates on the part held out of it;
    the report (md/json/html) has perplexity (against the same computation by hand), its change, the greedy-token
    agreement and decode tokens/s for every stage, and int8 keeps the text."""
    recipe = {
        "passes": [{"kind": "quantize", "method": "int8-dynamic"}],
        "data": {"calibration": str(corpus["txt"]), "sequence_length": 32},
        "evaluate": {"repeats": 3, "batch_size": 4},
    }
    result = modelpress.compress(llama, recipe, output=tmp_path / "model.onnx", show_progress=False)
    source, int8 = result.stages
    held = text_samples(llama, corpus["txt"], sequence_length=32, part="held-out")
    assert source.text["perplexity"] == pytest.approx(perplexity(llama, held), rel=1e-6)
    assert source.text["token_agreement"] == 1.0 and source.text["perplexity_increase"] == 0.0
    assert int8.text["token_agreement"] >= 0.9 and abs(int8.text["perplexity_increase"]) < 0.05
    assert int8.text["perplexity"] == pytest.approx(
        perplexity(tmp_path / "model.onnx", held), rel=1e-6
    )
    assert int8.text["decode_tokens_per_s"] > 0
    markdown = (tmp_path / "report.md").read_text()
    assert "| perplexity | perplexity change | token agreement | decode tokens/s |" in markdown
    stages = json.loads((tmp_path / "report.json").read_text())["stages"]
    assert stages[1]["text"]["token_agreement"] == int8.text["token_agreement"]
    assert "token agreement" in (tmp_path / "report.html").read_text()
    assert (
        tmp_path / "genai_config.json"
    ).is_file()  # NOTE: the output named model.onnx is an onnxruntime-genai folder


@pytest.mark.slow
def test_compress_a_cached_decoder_without_data(llama, tmp_path):
    """Without data, the evaluation inputs are generated with the sizes the model declares (the mask spans past + new
    tokens); before, ONNX Runtime refused them. There is no text to judge: no text columns."""
    recipe = {
        "passes": [{"kind": "quantize", "method": "int8-dynamic"}],
        "evaluate": {"repeats": 3, "batch_size": 2},
    }
    result = modelpress.compress(llama, recipe, output=tmp_path / "int8.onnx", show_progress=False)
    assert [s.stage for s in result.stages] == [
        "source",
        "quantize/int8-dynamic",
    ] and result.stages[1].value > 0.9
    assert not result.stages[1].text and "perplexity" not in result.report.markdown()


@pytest.mark.slow
def test_a_stage_that_loses_the_text_is_refused_unless_accepted(
    llama_dir, corpus, tmp_path, capsys
):
    """90 % magnitude pruning wrecks the text: the stage misses its text floor, compress exits 4 and writes no model
    (the report says why); --accept-loss keeps it and the report notes the loss."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"passes:\n  - {{kind: prune, method: magnitude, options: {{sparsity: 0.9}}}}\ndata:\n  eval: {corpus['eval']}\n"
        "evaluate: {repeats: 2, batch_size: 2}\n"
    )
    out = tmp_path / "out"
    code = main(
        [
            "compress",
            str(llama_dir),
            "-r",
            str(recipe),
            "-o",
            str(out / "pruned.onnx"),
            "--seq-len",
            "32",
            "-q",
        ]
    )
    err = capsys.readouterr().err
    assert code == 4, err
    assert "misses its text criteria" in err and "greedy-token agreement" in err
    assert not (out / "pruned.onnx").exists() and not list((out / "pruned-stages").glob("01-*"))
    assert "misses its text criteria" in (out / "report.md").read_text()
    code = main(
        [
            "compress",
            str(llama_dir),
            "-r",
            str(recipe),
            "-o",
            str(out / "pruned.onnx"),
            "--seq-len",
            "32",
            "-q",
            "--accept-loss",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "misses its text criteria, kept with accept_loss" in (out / "report.md").read_text()


@pytest.mark.slow
def test_cli_quantize_gpt2_without_cache_judges_the_held_out_text(corpus, tmp_path, capsys):
    """GPT-2 exported for text-generation (no cache) with --task, calibrated on a .jsonl corpus cut into 32-token
    sequences: the command prints perplexity and greedy-token agreement on the held-out part of the corpus."""
    folder = hf_fixtures.make_checkpoint(tmp_path / "gpt2", "gpt2")
    out = tmp_path / "int8.onnx"
    code = main(
        [
            "quantize",
            str(folder),
            "--task",
            "text-generation",
            "-m",
            "int8-dynamic",
            "--calib",
            str(corpus["jsonl"]),
            "--seq-len",
            "32",
            "-o",
            str(out),
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert (
        "text (held-out calibration text, ONNX Runtime): perplexity" in printed.out
        and "greedy-token agreement" in printed.out
    )
    reloaded = modelpress.load(out)
    assert reloaded.signature.input_names == ["input_ids", "attention_mask", "position_ids"]
    assert reloaded.provenance.extra["task"] == "text-generation"
    prompt = text_samples(
        reloaded, corpus["jsonl"], tokenizer=folder, sequence_length=32, part="held-out"
    )["input_ids"][:2, :6]
    assert greedy_generate(out, prompt, max_new_tokens=4).shape == (2, 10)


@pytest.mark.slow
def test_feature_extraction_of_a_causal_lm_and_inspect_task(llama_dir, capsys):
    code = main(["inspect", str(llama_dir), "--task", "feature-extraction", "--json", "-q"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    info = json.loads(printed.out)
    assert [o["name"] for o in info["outputs"]] == ["last_hidden_state"]
    assert (
        "Loading weights" not in printed.err
    )  # NOTE: -q: transformers' own progress bars are off too


@pytest.mark.slow
def test_tune_reads_text_data_with_the_sequence_length(llama, corpus, tmp_path):
    """What every tune trial gets: the text tokenised with the checkpoint's tokenizer (no Ray needed to check it)."""
    import io

    from modelpress.app.tuning.inputs import gather_inputs

    inputs = gather_inputs(
        llama,
        {"eval": str(corpus["eval"]), "calibration": str(corpus["txt"]), "sequence_length": 16},
        None,
        None,
        None,
    )
    with np.load(io.BytesIO(inputs.blobs["eval"])) as npz:
        assert (
            npz["input_ids"].shape[1] == 16
            and npz["attention_mask"].shape == npz["input_ids"].shape
        )
    with np.load(io.BytesIO(inputs.blobs["calibration"])) as npz:
        everything = text_samples(llama, corpus["txt"], sequence_length=16, max_samples=10_000)[
            "input_ids"
        ]
        assert len(npz["input_ids"]) == min(64, len(everything) - held_out_count(len(everything)))
    assert inputs.evaluate.metric == "agreement"
    # NOTE: a calibration corpus alone: the evaluation data is the part held out of its calibration, as in compress
    inputs = gather_inputs(
        llama, {"calibration": str(corpus["txt"]), "sequence_length": 16}, None, None, None
    )
    held = text_samples(llama, corpus["txt"], sequence_length=16, part="held-out")["input_ids"]
    with np.load(io.BytesIO(inputs.blobs["eval"])) as npz:
        np.testing.assert_array_equal(npz["input_ids"], held)


@pytest.mark.slow
def test_tune_a_decoder_on_a_calibration_corpus(ray_address, llama, corpus, tmp_path):
    """tune with a calibration corpus alone: the trials are judged on the held-out part, and the best model's text
    figures against the source (perplexity, greedy-token agreement, decode speed) are in the report."""
    recipe = tmp_path / "search.yaml"
    recipe.write_text(
        f"passes:\n  - {{kind: quantize, method: int8-dynamic, options: {{per_channel: {{search: [true, false]}}}}}}\n"
        f"data: {{calibration: {corpus['txt']}, sequence_length: 32}}\nevaluate: {{repeats: 2}}\n"
    )
    result = modelpress.tune(
        llama,
        recipe=recipe,
        budget=2,
        workers=1,
        address=ray_address,
        output=tmp_path / "out",
        show_progress=False,
    )
    assert result.model_path is not None and result.best.metric > 0.9
    assert (
        "text: perplexity" in (tmp_path / "out" / "report.md").read_text()
        and "greedy-token agreement" in result.report.verification
    )


@pytest.mark.slow
def test_each_tune_trial_is_judged_by_its_text_floor(llama, corpus, tmp_path):
    """A tune trial of a text decoder is held to its passes' text floor on the evaluation text (as compress holds
    each stage), not only the best model: int4 keeps the text, 90 % magnitude pruning misses it, and such a
    trial does not meet the criterion (run in this process: no Ray needed)."""
    from modelpress.app.tuning.inputs import gather_inputs
    from modelpress.app.tuning.trial import run_trial

    inputs = gather_inputs(
        llama, {"eval": str(corpus["eval"]), "sequence_length": 32}, None, None, None
    )
    model = inputs.source.to_proto().SerializeToString()
    results = {
        method: run_trial(
            model,
            inputs.blobs,
            [{"kind": kind, "method": method, "options": options}],
            {**inputs.evaluate.model_dump(), "repeats": 2},
        )
        for kind, method, options in (
            ("quantize", "int4-weight-only", {"block_size": 32}),
            ("prune", "magnitude", {"sparsity": 0.9}),
        )
    }
    kept, pruned = results["int4-weight-only"], results["magnitude"]
    assert "greedy-token agreement" in kept["text"] and "text_missed" not in kept
    assert "greedy-token agreement" in pruned["text_missed"], pruned.get("text")
