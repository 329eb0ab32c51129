"""A short hash of the weights a model actually computes with (DESIGN decision 12).

Caches and run folders are keyed by this, not by the model's name, so an edited or fine-tuned
model never reuses the original's results. The hash covers every parameter's name, shape, dtype
and bytes, the model class, and the config entries that change the computation (not its name,
path, transformers version, dtype label, attention kernel or token ids).

Hashing SmolLM2-135M (540 MB fp32) takes about a third of a second: SHA-256 over each tensor's
bytes read through a zero-copy numpy view, tensors hashed on a few threads (hashlib releases the
GIL). The result is cached per HF model and reused while no parameter has changed: the cache key
is each parameter's identity, data pointer and autograd version counter, which every in-place
change (``add_``, ``copy_``, optimizer steps, ``load_state_dict``, ``.to()``) bumps. A change
made through ``param.data`` bypasses the version counter: pass ``refresh=True`` after one.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch

#: config keys that do not change what the model computes
_IGNORED_CONFIG = frozenset({
    "_name_or_path", "name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype", "architectures",
    "_attn_implementation", "_attn_implementation_autoset", "_attn_implementation_internal", "attn_implementation",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict", "torchscript", "id2label", "label2id",
    "tokenizer_class", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
})
#: characters of the hex digest returned (64 bits: collisions are not a concern for cache keys)
LENGTH = 16

_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def hf_module(model) -> torch.nn.Module:
    """The HF module of a LoadedModel, or the module itself."""
    return getattr(model, "hf_model", model)


def _state_key(hf: torch.nn.Module) -> tuple:
    """Changes whenever any parameter is replaced or changed in place (cheap: no tensor is read)."""
    return tuple((name, id(p), p.data_ptr(), p._version) for name, p in hf.named_parameters(remove_duplicate=False))


def weights_fingerprint(model, *, refresh: bool = False) -> str:
    """Hex hash (:data:`LENGTH` chars) of a model's weights, class and computation-relevant config.

    ``model``: a :class:`~kcircuits.models.LoadedModel` or an HF module. Equal weights give equal
    fingerprints across processes and separately built models; one changed element changes it.
    """
    hf = hf_module(model)
    key = _state_key(hf)
    cached = _CACHE.get(hf)
    if not refresh and cached is not None and cached[0] == key:
        return cached[1]
    fp = _compute(hf)
    _CACHE[hf] = (key, fp)
    return fp


def cached_fingerprint(model) -> str | None:
    """The cached fingerprint if it is still valid for the current weights, else None (no hashing)."""
    hf = hf_module(model)
    cached = _CACHE.get(hf)
    return cached[1] if cached is not None and cached[0] == _state_key(hf) else None


def remember_fingerprint(model, fingerprint: str) -> None:
    """Record that the current weights have ``fingerprint`` (used after restoring exact bytes,
    so the restored model need not be hashed again)."""
    hf = hf_module(model)
    _CACHE[hf] = (_state_key(hf), fingerprint)


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """SHA-256 of a tensor's raw bytes (row-major; bf16/fp16 read as raw bytes, not converted)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.contiguous().reshape(-1).view(torch.uint8)  # a view for contiguous CPU tensors: no copy
    return hashlib.sha256(memoryview(flat.numpy())).digest()


def _config_text(hf: torch.nn.Module) -> str:
    config = getattr(hf, "config", None)
    entries = {} if config is None else {k: v for k, v in config.to_dict().items() if k not in _IGNORED_CONFIG}
    return json.dumps({"class": f"{type(hf).__module__}.{type(hf).__qualname__}", "config": entries},
                      sort_keys=True, default=repr)


def _compute(hf: torch.nn.Module) -> str:
    named = list(hf.named_parameters(remove_duplicate=False))
    first: dict[int, str] = {}
    unique: list[torch.Tensor] = []
    for name, p in named:
        if id(p) not in first:
            first[id(p)] = name
            unique.append(p)
    workers = max(1, min(4, os.cpu_count() or 1))
    if workers > 1 and len(unique) > 1:
        with ThreadPoolExecutor(workers) as pool:
            digests = dict(zip(map(id, unique), pool.map(tensor_digest, unique), strict=True))
    else:
        digests = {id(p): tensor_digest(p) for p in unique}
    h = hashlib.sha256(_config_text(hf).encode())
    for name, p in named:
        if first[id(p)] != name:  # tied: same tensor under a second name
            h.update(f"\n{name}=tied:{first[id(p)]}".encode())
            continue
        h.update(f"\n{name}|{tuple(p.shape)}|{p.dtype}|".encode())
        h.update(digests[id(p)])
    return h.hexdigest()[:LENGTH]
