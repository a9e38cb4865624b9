"""One record per supported model architecture: everything that differs between them, in one place.

Each `Architecture` says how to load the architecture (its Hugging Face class and ``model_type``, the
TransformerLens weight converter, where its HookedTransformer config comes from, which tokenizer a
folder without one gets), how its attention is shaped (the score scale, local windows, grouped
key/value heads, key/value biases, the rotary embedding and which hooks carry rotated q and k), which
Hugging Face modules project keys, values and the attention output, and its tiny random test model
(the Hugging Face config of ``tiny-<name>`` and the parameter count it must have).

The geometry fields are rules for reading a model's Hugging Face config, not numbers: the sizes,
windows and rotary bases come from the config of the model at hand, so one record serves every model
of an architecture (``tiny-gemma-3``, ``gemma-3-270m`` and ``google/gemma-3-270m`` alike).

`ARCHITECTURES` is the registry, `get_architecture` looks a record up by its short name, Hugging Face
class or ``model_type``, and `architecture_of` finds the record of a Hugging Face config; both raise
`icl_kernels.utils.errors.UnknownArchitectureError` naming the supported architectures.

Adding an architecture is adding a record here (and a row for it in the tests): loading, the attention
geometry (`icl_kernels.engine.hooks.attention_spec`), the rotary hook rule, the key/value finetuning
and the Hugging Face momentum patch all read the record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from icl_kernels.utils.errors import UnknownArchitectureError

__all__ = [
    "Architecture",
    "ARCHITECTURES",
    "DEFAULT_ROPE_BASE",
    "GPT2_VOCAB",
    "TINY_COMMON",
    "architecture_of",
    "find_architecture",
    "find_config_architecture",
    "get_architecture",
    "rope_bases",
]

#: The GPT-2 BPE vocabulary, which every tiny model uses.
GPT2_VOCAB = 50257
#: Hugging Face config kwargs shared by every tiny model (GPT-2 vocabulary and end-of-text token).
TINY_COMMON: Mapping[str, Any] = {"vocab_size": GPT2_VOCAB, "bos_token_id": 50256, "eos_token_id": 50256}
#: Rotary base of architectures whose config names none (GPT-J hard-codes it).
DEFAULT_ROPE_BASE = 10000.0

#: How a rotary embedding pairs the coordinates it rotates: GPT-J rotates adjacent pairs (x0, x1),
#: Llama and Gemma rotate the first half of the rotary dimensions against the second.
RotaryPairing = Literal["adjacent", "halves"]


@dataclass(frozen=True)
class Architecture:
    """What differs between two supported architectures. Sizes are read from each model's config."""

    name: str  # short name, as in ``tiny-<name>``
    hf_class: str  # Hugging Face causal-LM class, ``config.architectures[0]``
    hf_model_type: str  # Hugging Face ``config.model_type``
    converter: str  # function of ``transformer_lens.pretrained.weight_conversions`` (HookedTransformer)
    # TransformerLens converts the Hugging Face config itself (None), or knows the architecture only
    # through this table entry, whose sizes `icl_kernels.models.loading` replaces by the config's.
    hooked_config_from: str | None = None
    gpt2_tokenizer: bool = False  # a folder with GPT-2's vocabulary and no tokenizer gets GPT-2's

    # Attention geometry: scores = q . k / scale.
    scaled_scores: bool = True  # False: scale 1 (GPT-Neo)
    scale_key: str | None = None  # config value whose square root is the scale; None: d_head
    window_key: str | None = None  # config value of the local window; None: no local attention
    # Config list of each layer's attention type ("local"/"global" or "sliding_attention"/
    # "full_attention"); None: every layer is local when the config sets a window.
    layer_types_key: str | None = None
    grouped_kv: bool = False  # fewer key/value heads than query heads (``num_key_value_heads``)
    kv_bias: bool | str = False  # key/value projections have biases: always, never, or per this config flag
    rotary: RotaryPairing | None = None  # None: no rotary embedding (learned positions)
    rotary_dim_key: str | None = None  # config value of the rotated dimensions; None: all of d_head

    # Hugging Face attention modules: key, value and output projections (``torch.nn.Linear``).
    hf_key_proj: str = "k_proj"
    hf_value_proj: str = "v_proj"
    hf_output_proj: str = "o_proj"

    # The tiny random test model ``tiny-<name>``: its config kwargs (besides `TINY_COMMON`) and size.
    tiny_config: Mapping[str, Any] = field(default_factory=dict, hash=False)
    tiny_params: int = 0  # parameters of the Hugging Face model, asserted by the tests

    @property
    def rotated_hooks(self) -> bool:
        """Rule for the hooks that carry the q and k scores are made of.

        False (no rotary): ``hook_q``/``hook_k``. True: ``hook_rot_q``/``hook_rot_k`` where the backend
        fires them, else ``hook_q``/``hook_k`` rotated by `icl_kernels.engine.hooks.apply_rotary`
        (`icl_kernels.engine.hooks.rotary_hook_kinds` probes which).
        """
        return self.rotary is not None

    def tiny_hf_kwargs(self) -> dict[str, Any]:
        """The Hugging Face config kwargs of ``tiny-<name>``."""
        return {**self.tiny_config, **TINY_COMMON}

    def score_scale(self, hf_config, d_head: int) -> float:
        """The divisor of ``q . k`` in the attention scores."""
        if not self.scaled_scores:
            return 1.0
        if self.scale_key is not None:
            return float(getattr(hf_config, self.scale_key)) ** 0.5
        return d_head**0.5

    def n_kv_heads(self, hf_config, n_heads: int) -> int:
        """Key/value heads (``n_heads`` unless the architecture groups them)."""
        if not self.grouped_kv:
            return n_heads
        return getattr(hf_config, "num_key_value_heads", None) or n_heads

    def has_kv_bias(self, hf_config) -> bool:
        """Whether the key/value projections of a model with this config have biases."""
        if isinstance(self.kv_bias, str):
            return bool(getattr(hf_config, self.kv_bias, False))
        return self.kv_bias

    def local_window(self, hf_config) -> int | None:
        """The local-attention window of the config (None: no local attention)."""
        if self.window_key is None:
            return None
        window = getattr(hf_config, self.window_key, None)
        return int(window) if window else None

    def layer_attention_types(self, hf_config, n_layers: int) -> list[str]:
        """``"local"`` or ``"global"`` for each layer, from the config."""
        if self.window_key is None or self.local_window(hf_config) is None:
            return ["global"] * n_layers
        if self.layer_types_key is None:
            return ["local"] * n_layers
        types = getattr(hf_config, self.layer_types_key)
        return ["local" if t in ("local", "sliding_attention") else "global" for t in types]

    def rotary_dim(self, hf_config, d_head: int) -> int | None:
        """Rotated dimensions of each head (None: no rotary)."""
        if self.rotary is None:
            return None
        return d_head if self.rotary_dim_key is None else int(getattr(hf_config, self.rotary_dim_key))


def rope_bases(hf_config) -> tuple[float, float] | None:
    """(global, local) rotary bases named by a config, across transformers' spellings; None if none.

    Per-layer-type ``rope_parameters`` (Gemma-3), flat ``rope_parameters`` (Llama), or the older
    ``rope_theta`` with an optional ``rope_local_base_freq``.
    """
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and "full_attention" in params:
        full = params["full_attention"]
        return float(full["rope_theta"]), float(params.get("sliding_attention", full)["rope_theta"])
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    if theta is None:
        theta = getattr(hf_config, "rope_theta", None)
    if theta is None:
        return None
    local = getattr(hf_config, "rope_local_base_freq", None)
    return float(theta), float(local if local is not None else theta)


ARCHITECTURES: dict[str, Architecture] = {
    record.name: record
    for record in (
        Architecture(
            name="gpt-neo", hf_class="GPTNeoForCausalLM", hf_model_type="gpt_neo",
            converter="convert_neo_weights", gpt2_tokenizer=True,
            scaled_scores=False, window_key="window_size", layer_types_key="attention_layers",
            hf_output_proj="out_proj",
            # Two global and two local layers; a window of 8 so that local layers really are local.
            tiny_config={
                "hidden_size": 64, "num_layers": 4, "num_heads": 4,
                "attention_types": [[["global", "local"], 2]], "window_size": 8,
                "max_position_embeddings": 512, "initializer_range": 0.1,
            },
            tiny_params=3_448_512,
        ),
        Architecture(
            name="gpt-j", hf_class="GPTJForCausalLM", hf_model_type="gptj",
            converter="convert_gptj_weights", gpt2_tokenizer=True,
            rotary="adjacent", rotary_dim_key="rotary_dim", hf_output_proj="out_proj",
            tiny_config={
                "n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "n_positions": 512,
                "initializer_range": 0.1,
            },
            tiny_params=6_582_481,
        ),
        Architecture(
            name="gemma-3", hf_class="Gemma3ForCausalLM", hf_model_type="gemma3_text",
            converter="convert_gemma_weights", hooked_config_from="google/gemma-3-270m",
            scale_key="query_pre_attn_scalar", window_key="sliding_window", layer_types_key="layer_types",
            grouped_kv=True, kv_bias="attention_bias", rotary="halves",
            tiny_config={
                "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
                "query_pre_attn_scalar": 16, "sliding_window": 8,
                "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                "max_position_embeddings": 512, "initializer_range": 0.1, "pad_token_id": 50256,
            },
            tiny_params=3_356_928,
        ),
        Architecture(
            name="llama", hf_class="LlamaForCausalLM", hf_model_type="llama",
            converter="convert_llama_weights",
            grouped_kv=True, kv_bias="attention_bias", rotary="halves",
            tiny_config={
                "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                "initializer_range": 0.1, "tie_word_embeddings": False,
            },
            tiny_params=6_506_944,
        ),
    )
}


def _known() -> list[str]:
    return [*ARCHITECTURES, *(record.hf_class for record in ARCHITECTURES.values())]


def find_architecture(name: str) -> Architecture | None:
    """The record whose short name, Hugging Face class or ``model_type`` is ``name``, or None."""
    for record in ARCHITECTURES.values():
        if name in (record.name, record.hf_class, record.hf_model_type):
            return record
    return None


def get_architecture(name: str) -> Architecture:
    """The record of an architecture by short name (``"gpt-neo"``), Hugging Face class or ``model_type``.

    Raises:
        UnknownArchitectureError: no supported architecture has that name.
    """
    record = find_architecture(name)
    if record is None:
        raise UnknownArchitectureError(name, _known())
    return record


def find_config_architecture(hf_config) -> Architecture | None:
    """The record of a Hugging Face config (by its class, else its ``model_type``), or None."""
    classes = getattr(hf_config, "architectures", None) or []
    for name in (*classes[:1], getattr(hf_config, "model_type", None)):
        record = find_architecture(name) if name else None
        if record is not None:
            return record
    return None


def architecture_of(hf_config) -> Architecture:
    """The record of a Hugging Face config.

    Raises:
        UnknownArchitectureError: the config is of an architecture without a record.
    """
    record = find_config_architecture(hf_config)
    if record is None:
        classes = getattr(hf_config, "architectures", None) or [getattr(hf_config, "model_type", "?")]
        raise UnknownArchitectureError(str(classes[0]), _known())
    return record
