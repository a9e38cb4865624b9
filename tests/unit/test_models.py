"""Model loading: tiny random models match Hugging Face on both backends; registry and errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_PARAMS, load_tiny

from icl_kernels.models import backend as tl_backend
from icl_kernels.models.loading import (
    build_tiny_hf_model,
    get_model_spec,
    hf_to_transformer_lens,
    list_models,
    load_hf_model,
    load_model,
    parse_dtype,
)
from icl_kernels.utils.errors import UnknownModelError

TEXT = "The quick brown fox jumps over the lazy dog, and then it keeps on running far beyond the window."


def test_tiny_models_are_tiny(arch):
    hf, _ = build_tiny_hf_model(arch)
    assert sum(p.numel() for p in hf.parameters()) == TINY_PARAMS[arch]


def test_logits_equal_hugging_face(arch, backend):
    hf, tokenizer = build_tiny_hf_model(arch)
    tokens = tokenizer(TEXT, return_tensors="pt").input_ids
    assert tokens.shape[1] > 16, "the prompt must be longer than the local window (8)"
    with torch.no_grad():
        expected = hf(tokens).logits
        got = load_tiny(arch, backend)(tokens)
    assert (got - expected).abs().max().item() < 1e-4


def test_tiny_gpt_neo_has_local_and_global_layers(backend):
    model = load_tiny("gpt-neo", backend)
    assert tl_backend.layer_attention_types(model) == ["global", "local", "global", "local"]
    assert tl_backend.local_window(model) == 8


def test_local_folder_loads_offline(tmp_path, backend):
    hf, tokenizer = build_tiny_hf_model("gpt-j")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["GPTJForCausalLM"]
    model = load_model(str(tmp_path), device="cpu", backend=backend)
    tokens = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() < 1e-4
    assert model.tokenizer is not None


def test_registry_knows_user_spellings():
    names = {spec.name for spec in list_models()}
    for name in ("EleutherAI/gpt-neo-125M", "EleutherAI/gpt-neo-1.3B", "EleutherAI/gpt-neo-2.7B",
                 "EleutherAI/gpt-j-6B", "google/gemma-3-270m", "gemma-3-270m", "smollm2-135m-instruct"):
        assert name in names
    assert get_model_spec("EleutherAI/gpt-neo-125m").name == "EleutherAI/gpt-neo-125M"


def test_unknown_model_lists_known_names():
    with pytest.raises(UnknownModelError) as error:
        load_model("gemma-3-27O", device="cpu")
    message = str(error.value)
    assert "gemma-3-270m" in message and "Did you mean" in message


def test_dtype_names():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("fp16") is torch.float16
    with pytest.raises(ValueError, match="Unknown dtype"):
        parse_dtype("int3")


def test_float64_model_is_float64():
    hf, tokenizer = build_tiny_hf_model("gpt-neo", dtype=torch.float64)
    model = hf_to_transformer_lens(hf, tokenizer, device="cpu", dtype=torch.float64)
    assert next(model.parameters()).dtype == torch.float64


def test_bridge_is_unavailable_only_on_tl4():
    if tl_backend.TRANSFORMER_LENS_MAJOR >= 4:
        with pytest.raises(ValueError, match="HookedTransformer was removed"):
            tl_backend.resolve_backend("hooked")
    else:
        assert tl_backend.resolve_backend(None) == "hooked"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma-3-270m", "smollm2-135m-instruct"])
def test_offline_real_models_match_hugging_face(name):
    hf, tokenizer = load_hf_model(name)
    tokens = tokenizer("Review: a gorgeous, witty film.\nSentiment:", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = hf(tokens).logits[0, -1]
        for backend in tl_backend.AVAILABLE_BACKENDS:
            model = hf_to_transformer_lens(hf, tokenizer, backend=backend, device="cpu", name=name)
            got = model(tokens)[0, -1]
            # Gemma-3 on HookedTransformer: 1.4e-5 measured (different op order), bridge: exact.
            assert (got - expected).abs().max().item() < 1e-3
            del model


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_tracks_float32(arch, dtype):
    hf, tokenizer = build_tiny_hf_model(arch)
    tokens = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = hf(tokens).logits[0, -1].log_softmax(-1)
        model = hf_to_transformer_lens(hf, tokenizer, device="cuda", dtype=dtype)
        got = model(tokens.cuda())[0, -1].float().log_softmax(-1).cpu()
    assert next(model.parameters()).device.type == "cuda"
    # Half precision: same top token and log-probs within 0.1 nats on a d_model 64 model.
    assert got.argmax() == expected.argmax()
    assert (got - expected).abs().max().item() < 0.1
