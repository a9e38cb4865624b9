"""Architecture records: each tiny model loads with its recorded size, and the record's geometry is the model's.

The records (icl_kernels/models/architectures.py) are rules for reading a Hugging Face config. Here they
are checked against what TransformerLens derives from the same config on its own (HookedTransformer's
``cfg``), against the Hugging Face modules they name, and against the attention spec the engine builds.
That recomputing each layer's attention pattern from the spec gives the model's pattern on both
backends is tested in tests/unit/test_hooks.py (test_recomputed_attention_equals_model).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_ARCHS, TINY_PARAMS, load_tiny
from transformers import GPT2Config, GPT2LMHeadModel

from icl_kernels.engine.hooks import attention_spec, rotary_hook_kinds
from icl_kernels.models import backend as tl_backend
from icl_kernels.models.architectures import (
    ARCHITECTURES,
    architecture_of,
    get_architecture,
    rope_bases,
)
from icl_kernels.models.loading import build_tiny_hf_model, hf_to_transformer_lens, tiny_hf_config
from icl_kernels.utils.errors import UnknownArchitectureError

#: What a HookedTransformer adds to the Hugging Face parameter count at most: an untied unembedding
#: (vocab x (d_model + 1)) and zero biases.
HOOKED_EXTRA = 50257 * 65 + 50_000


def test_conftest_rows_are_the_records():
    assert TINY_ARCHS == tuple(ARCHITECTURES) == ("gpt-neo", "gpt-j", "gemma-3", "llama")
    assert TINY_PARAMS == {name: record.tiny_params for name, record in ARCHITECTURES.items()}


def test_records_are_found_by_every_name_and_are_frozen(arch):
    record = ARCHITECTURES[arch]
    assert get_architecture(record.hf_class) is get_architecture(record.hf_model_type) is record
    config = tiny_hf_config(arch)
    assert config.architectures == [record.hf_class] and config.model_type == record.hf_model_type
    config.architectures = None  # e.g. a model built from a config without it: found by model_type
    assert architecture_of(config) is record
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.tiny_params = 0


def test_tiny_model_loads_with_its_recorded_size(arch, backend):
    hf, _ = build_tiny_hf_model(arch)
    assert sum(p.numel() for p in hf.parameters()) == ARCHITECTURES[arch].tiny_params
    model = load_tiny(arch, backend)
    n_params = sum(p.numel() for p in model.parameters())
    assert ARCHITECTURES[arch].tiny_params <= n_params <= ARCHITECTURES[arch].tiny_params + HOOKED_EXTRA


def test_record_names_the_hugging_face_projections(arch, backend):
    """Key, value and output projections are Linear modules of the right sizes in every layer."""
    record = ARCHITECTURES[arch]
    model = load_tiny(arch, backend)
    config = tl_backend.hf_config(model)
    assert architecture_of(config) is record
    hf, _ = build_tiny_hf_model(arch)
    spec = attention_spec(model, 0)
    attention = [m for m in hf.modules() if isinstance(getattr(m, record.hf_value_proj, None), torch.nn.Linear)]
    assert len(attention) == model.cfg.n_layers
    for module in attention:
        k_proj, v_proj = getattr(module, record.hf_key_proj), getattr(module, record.hf_value_proj)
        assert k_proj.out_features == v_proj.out_features == spec.n_kv_heads * spec.d_head
        assert isinstance(getattr(module, record.hf_output_proj), torch.nn.Linear)
        assert (k_proj.bias is not None) == (v_proj.bias is not None) == record.has_kv_bias(config)


def test_geometry_matches_what_the_model_reports(arch, backend):
    """Grouped key/value heads, rotary and local windows: the record's reading of the config vs the model's."""
    record = ARCHITECTURES[arch]
    model = load_tiny(arch, backend)
    config = tl_backend.hf_config(model)
    n_heads = model.cfg.n_heads
    assert (model.cfg.n_key_value_heads or n_heads) == record.n_kv_heads(config, n_heads)
    assert (model.cfg.positional_embedding_type == "rotary") == (record.rotary is not None)
    if record.rotary is None:
        assert rotary_hook_kinds(model) == ("q", "k")
    types = tl_backend.layer_attention_types(model)
    assert types == record.layer_attention_types(config, model.cfg.n_layers)
    assert ("local" in types) == (record.local_window(config) is not None)
    for layer in range(model.cfg.n_layers):
        spec = attention_spec(model, layer)
        assert spec.window == (record.local_window(config) if types[layer] == "local" else None)
        assert (spec.rotary_dim is None) == (record.rotary is None)


def test_geometry_matches_transformer_lens_own_conversion(arch):
    """HookedTransformer's cfg (converted by TransformerLens from the same config) agrees with the record."""
    if "hooked" not in tl_backend.AVAILABLE_BACKENDS:
        pytest.skip("HookedTransformer needs TransformerLens < 4")
    record = ARCHITECTURES[arch]
    model = load_tiny(arch, "hooked")
    cfg = model.cfg
    config = tl_backend.hf_config(model)
    assert (cfg.attn_types or ["global"] * cfg.n_layers) == record.layer_attention_types(config, cfg.n_layers)
    if "local" in (cfg.attn_types or []):
        assert cfg.window_size == record.local_window(config)
    for layer in range(cfg.n_layers):
        spec = attention_spec(model, layer)
        assert spec.scale == pytest.approx(cfg.attn_scale if cfg.use_attn_scale else 1.0, rel=1e-12)
        assert spec.rotary_dim == cfg.rotary_dim
        if record.rotary is not None:
            assert spec.rotary_adjacent_pairs == cfg.rotary_adjacent_pairs
            local = cfg.attn_types is not None and cfg.attn_types[layer] == "local"
            want = getattr(cfg, "rotary_base_local", None) if local else None
            assert spec.rotary_base == pytest.approx(float(want or cfg.rotary_base))
    assert rotary_hook_kinds(model) == (("rot_q", "rot_k") if record.rotary else ("q", "k"))


def test_rope_bases_read_every_spelling():
    nested = {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}}
    assert rope_bases(SimpleNamespace(rope_parameters=nested)) == (1e6, 1e4)
    assert rope_bases(SimpleNamespace(rope_parameters={"rope_theta": 5e5})) == (5e5, 5e5)
    assert rope_bases(SimpleNamespace(rope_theta=1e6, rope_local_base_freq=1e4)) == (1e6, 1e4)
    assert rope_bases(SimpleNamespace()) is None


def test_unknown_architecture_raises_naming_the_supported_ones():
    with pytest.raises(UnknownArchitectureError) as error:
        get_architecture("gpt2")
    for record in ARCHITECTURES.values():
        assert record.name in str(error.value)
    assert "architectures.py" in str(error.value)
    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=32, architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnknownArchitectureError, match="GPT2LMHeadModel"):
        architecture_of(config)
    if "hooked" in tl_backend.AVAILABLE_BACKENDS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            hf = GPT2LMHeadModel(config).eval()
        with pytest.raises(UnknownArchitectureError, match="gpt-neo"):
            hf_to_transformer_lens(hf, None, backend="hooked", device="cpu")
