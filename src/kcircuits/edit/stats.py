"""Where ROME/MEMIT write, and the statistics of what is already written there.

Both methods edit the output matrix of one MLP (GPT-2 ``c_proj``, GPT-NeoX ``dense_4h_to_h``,
Llama/Qwen2 ``down_proj``): its input is the *key* ``k [d_mlp]`` (the MLP's hidden activation), its
output the *value*. :func:`mlp_output` finds that matrix through the parameter layout (the one place
that knows each family), :func:`capture_keys` records keys and values at chosen token positions,
and :func:`key_second_moment` computes ``C = E[k kᵀ]`` over the tokens of a text corpus, which the
updates need so that an edit leaves keys in general alone (:mod:`kcircuits.edit.updates`).

C is computed once per weights' fingerprint, layer and corpus and kept in the step cache
(:mod:`kcircuits.steps`). With no corpus given, :func:`generated_corpus` has the model write text
from a fixed set of neutral prefixes (seeded, cached): statistics of the model's own distribution,
not of natural text, which is the trade-off to state in a run's config.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kcircuits.errors import KcircuitsError
from kcircuits.models import LoadedModel
from kcircuits.models.layout import ParamBlock
from kcircuits.steps import StepCache, json_digest, step_key

#: Neutral beginnings the model continues when no corpus is given (fixed, so the statistics are reproducible).
NEUTRAL_PREFIXES = ("The", "In", "It is", "A", "This", "When", "There are", "One of the", "After the", "We",
                    "According to", "Many people", "In the year", "The first", "However,", "Most")


@dataclass(frozen=True)
class MlpOutput:
    """The output matrix of layer ``layer``'s MLP: the module holding it and its parameter blocks.

    ``weight.matrix(param)`` views the matrix as ``[d_model, d_mlp]`` whatever the storage
    (GPT-2's Conv1D stores it transposed); ``bias`` is None when the projection has none."""

    layer: int
    module: torch.nn.Module
    weight: ParamBlock
    bias: ParamBlock | None

    def matrix(self, lm: LoadedModel) -> torch.Tensor:
        """``W [d_model, d_mlp]`` (a view of the parameter)."""
        return self.weight.matrix(lm.hf_model.get_parameter(self.weight.param_name))

    def bias_vector(self, lm: LoadedModel) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.select(lm.hf_model.get_parameter(self.bias.param_name))

    def delta(self, dW: torch.Tensor) -> dict[str, torch.Tensor]:
        """A ``[d_model, d_mlp]`` change of the matrix as a delta of its stored parameter
        (``{param_name: Δ}`` for :func:`kcircuits.models.edits.edited`)."""
        return {self.weight.param_name: dW.T.contiguous() if self.weight.transposed else dW}


def mlp_output(lm: LoadedModel, layer: int) -> MlpOutput:
    """Layer ``layer``'s MLP output matrix (a clear error for a layer out of range)."""
    n_layers = lm.weights.n_layers
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
        raise KcircuitsError(f"layer {layer!r} is out of range: the model has layers 0..{n_layers - 1}")
    blocks = lm.layout.blocks(f"m{layer}")
    weight = next(b for b in blocks if b.role == "W_out")
    bias = next((b for b in blocks if b.role == "b_out"), None)
    module = lm.hf_model.get_submodule(weight.param_name.rsplit(".", 1)[0])
    return MlpOutput(layer, module, weight, bias)


@contextmanager
def capture_keys(target: MlpOutput) -> Iterator[dict[str, torch.Tensor]]:
    """Inside the block, every forward pass stores the output projection's input (``"keys"``,
    ``[b, p, d_mlp]``) and output (``"values"``, ``[b, p, d_model]``) of the last call."""
    seen: dict[str, torch.Tensor] = {}

    def hook(module, inputs, output):
        seen["keys"] = inputs[0].detach()
        seen["values"] = output.detach()

    handle = target.module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def body(lm: LoadedModel) -> torch.nn.Module:
    """The transformer without its unembedding: enough to reach any MLP, and the unembedding of every
    position (49k logits per token for SmolLM2) is most of a small model's cost."""
    return getattr(lm.hf_model, "base_model", lm.hf_model)


@torch.no_grad()
def key_second_moment(lm: LoadedModel, layer: int, texts: Sequence[str], *, batch_size: int = 8,
                      max_length: int = 128, cache: StepCache | None = None) -> torch.Tensor:
    """``C = E[k kᵀ] [d_mlp, d_mlp]`` (float64) of layer ``layer``'s keys in ``lm`` over every real token of
    ``texts`` (each cut to ``max_length`` tokens, run ``batch_size`` at a time), from ``cache`` (the step
    cache) when it holds it."""
    if not texts:
        raise KcircuitsError("the corpus for the key statistics is empty; give a text file, JSONL or folder")
    cache = cache or StepCache(None)
    key = step_key("key_second_moment", weights=lm.fingerprint, dtype=str(lm.dtype), layer=layer,
                   texts=json_digest(list(texts)), max_length=max_length)
    hit = cache.read_tensors("key_second_moment", key)
    if hit is not None:
        return hit["C"]
    target = mlp_output(lm, layer)
    tok = lm.tokenizer
    total, count = None, 0
    with capture_keys(target) as seen:
        for start in range(0, len(texts), batch_size):
            enc = [tok(t, add_special_tokens=False).input_ids[:max_length] for t in texts[start:start + batch_size]]
            enc = [ids for ids in enc if ids]
            if not enc:
                continue
            width = max(len(ids) for ids in enc)
            ids = torch.full((len(enc), width), lm.pad_token_id, dtype=torch.long)
            real = torch.zeros(len(enc), width, dtype=torch.bool)
            for i, row in enumerate(enc):  # right padding: causal attention keeps real tokens unaffected
                ids[i, :len(row)], real[i, :len(row)] = torch.tensor(row), True
            body(lm)(input_ids=ids.to(lm.device), attention_mask=real.to(lm.device).long())
            keys = seen["keys"][real.to(lm.device)].double()  # [n_tokens, d_mlp]
            total = keys.T @ keys if total is None else total + keys.T @ keys
            count += keys.shape[0]
    if not count:
        raise KcircuitsError("the corpus for the key statistics has no tokens")
    C = (total / count).cpu()
    cache.write_tensors("key_second_moment", key, {"C": C})
    return C


def generated_corpus(lm: LoadedModel, n_texts: int = 64, n_tokens: int = 64, seed: int = 0,
                     cache: StepCache | None = None) -> list[str]:
    """``n_texts`` texts the model samples (temperature 1, seeded) from :data:`NEUTRAL_PREFIXES` (one batch
    per prefix), cached.

    Used when no corpus is named: the keys' statistics are then those of the model's own text."""
    cache = cache or StepCache(None)
    key = step_key("generated_corpus", weights=lm.fingerprint, n_texts=n_texts, n_tokens=n_tokens, seed=seed,
                   prefixes=NEUTRAL_PREFIXES)
    hit = cache.read_json("generated_corpus", key)
    if isinstance(hit, list) and len(hit) == n_texts:
        return hit
    texts: list[str] = []
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # seeded sampling that leaves the caller's RNG alone
        torch.manual_seed(seed)
        for j, prefix in enumerate(NEUTRAL_PREFIXES):  # the texts of one prefix in one batch: no padding needed
            count = len(range(j, n_texts, len(NEUTRAL_PREFIXES)))
            if not count:
                break
            ids = torch.tensor([lm.tokenizer(prefix, add_special_tokens=False).input_ids], device=lm.device)
            out = lm.hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                                       temperature=1.0, max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                                       num_return_sequences=count, pad_token_id=lm.pad_token_id)
            texts.extend(lm.tokenizer.decode(row) for row in out)
    cache.write_json("generated_corpus", key, texts)
    return texts

