"""Finding and loading a model: a Hugging Face hub id, a local folder, or a local `.gguf` file.

Every source ends up as a local folder of safetensors shards (`ModelSource.folder`): hub models are
downloaded (weights, configs, tokenizer only), GGUF files are dequantized once by transformers and saved
to the cache. The streaming edit always reads that folder; forward passes load it with transformers.

`--quantize 4bit|8bit` (bitsandbytes, the `quantize` extra) applies only to the model loaded here for forward
passes: the files in the folder are never changed, so the edit still streams the original full-precision
shards, and the edited checkpoint is evaluated in the same quantization as the base.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer, BitsAndBytesConfig
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

from abliterate.errors import ModelError, UsageError
from abliterate.storage.atomic import atomic_output, write_json
from abliterate.storage.paths import cache_dir

if TYPE_CHECKING:  # transformers is imported only when a model is actually loaded (it takes seconds)
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken", "LICENSE*", "USE_POLICY*"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
QUANTIZE_HINT = "pip install 'abliterate[quantize]'"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: the user's spec and a local folder with config, tokenizer and safetensors."""

    spec: str
    folder: Path
    revision: str | None = None
    gguf_file: Path | None = None


def resolve(spec: str, *, revision: str | None = None, allow_pickle: bool = False) -> ModelSource:
    """Turn the user's MODEL argument into a local folder (downloading or converting when needed)."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(spec, convert_gguf(path), gguf_file=path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json", hint="point at a transformers model folder")
        return ModelSource(spec, path.resolve())
    if path.exists():
        raise ModelError(f"{spec} is neither a model folder nor a .gguf file", hint="point at one of those")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return _download(spec, revision, allow_pickle)
    raise ModelError(f"model {spec!r} not found", hint="give a local folder, a .gguf file, or a hub id ORG/NAME")


def _download(repo_id: str, revision: str | None, allow_pickle: bool) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = HUB_PATTERNS + (["*.bin"] if allow_pickle else [])
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except GatedRepoError:
        raise ModelError(
            f"{repo_id} is gated", hint="accept its license on huggingface.co and log in (hf auth login or HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"{repo_id} was not found on the Hugging Face hub",
            hint="check the name; private repos need a login (hf auth login or HF_TOKEN)",
        ) from None
    except RevisionNotFoundError:
        raise ModelError(f"revision {revision!r} of {repo_id} not found", hint="check --revision") from None
    except LocalEntryNotFoundError:
        raise ModelError(
            f"cannot download {repo_id}: the hub is unreachable and it is not in the local cache",
            hint="connect to the internet, or pass a local folder",
        ) from None
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", "?")
        raise ModelError(f"downloading {repo_id} failed (HTTP {status})", hint="try again later") from None
    return ModelSource(repo_id, folder, revision=folder.name)


def _gguf_key(path: Path) -> str:
    stat = path.stat()
    raw = f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF file once into a cached safetensors folder (float32, no quantization_config)."""
    target = cache_dir() / "converted" / f"{path.stem}-{_gguf_key(path)}"
    if (target / "config.json").is_file():
        return target

    log.info("dequantizing %s into %s (once)", path.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as err:  # transformers raises many types for unreadable GGUF files
        raise ModelError(f"cannot load GGUF file {path}: {err}", hint="check that it is a GGUF chat model") from None
    # The weights are plain float tensors now; drop the GGUF quantizer so that transformers saves them.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (typed as Module by transformers)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_output(target, overwrite=False) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        config.pop("quantization_config", None)
        write_json(tmp / "config.json", config)
    return target


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`auto` means float32 on CPU (bf16 matmuls are slow there) and bfloat16 on a GPU; models and judges alike."""
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}", hint=f"use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> str:
    """`auto` is cuda when a GPU is visible, else cpu; any other name must be a device torch knows."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for, but no CUDA GPU is visible", hint="use --device cpu")
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {name!r}", hint="use cpu, cuda, cuda:N, mps or auto") from None
    return name


def module_installed(name: str) -> bool:
    """Whether `import name` would find the module (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that fails, or a module blocked in sys.modules
        return False


def check_quantize(quantize: str) -> None:
    """`--quantize 4bit|8bit` needs bitsandbytes: checked before any model is loaded."""
    if quantize != "none" and not module_installed("bitsandbytes"):
        raise ModelError(f"--quantize {quantize} needs bitsandbytes, which is not installed", hint=QUANTIZE_HINT)


def quantization_config(quantize: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """The bitsandbytes config of `--quantize` (None for none): 4bit is NF4 with double quantization."""
    if quantize == "none":
        return None

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantize == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=True,
        )
    raise ModelError(f"unknown quantization {quantize!r}", hint="use --quantize none, 4bit or 8bit")


def auto_model_class(folder: Path) -> Any:
    """The transformers auto class that loads `folder` as a language model for forward passes.

    AutoModelForCausalLM, except for multimodal families that have no causal-LM class (mistral3): those load as
    image-text-to-text models, which take text alone just as well.
    """
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return AutoModelForCausalLM  # transformers reports the problem itself
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def load_tokenizer(source: ModelSource, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer, set up for batches: left padding and a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(source.folder, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    source: ModelSource,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    quantize: str = "none",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model (eval mode) and tokenizer (left padding, a pad token) for forward passes.

    `quantize` (4bit or 8bit) loads the linear layers with bitsandbytes; the other weights, and 4-bit
    matmuls, use `dtype` (auto: bfloat16 on GPU, float32 on CPU). The files on disk are not changed.
    """
    check_quantize(quantize)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    device_map = "auto" if device == "cuda" else "cpu"
    quantized = quantization_config(quantize, torch_dtype)
    extra = {"quantization_config": quantized} if quantized is not None else {}
    try:
        tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
        model = auto_model_class(source.folder).from_pretrained(
            source.folder, dtype=torch_dtype, device_map=device_map, trust_remote_code=trust_remote_code, **extra
        )
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ModelError(
                f"{source.spec} needs custom code", hint="pass --trust-remote-code if you trust it"
            ) from None
        raise ModelError(f"cannot load {source.spec}: {err}", hint="check that it is a causal LM") from None
    except OSError as err:
        raise ModelError(f"cannot load {source.spec}: {err}", hint="the checkpoint may be incomplete") from None
    except (ImportError, RuntimeError) as err:
        if quantized is None:
            raise
        raise ModelError(
            f"cannot load {source.spec} with --quantize {quantize}: {err}",
            hint=f"check the bitsandbytes install ({QUANTIZE_HINT}), or use --quantize none",
        ) from None
    model.eval()
    if quantized is not None:
        log.info("loaded %s with %s bitsandbytes quantization on %s", source.spec, quantize, model.device)
    return model, tokenizer
