"""Causal tracing (kcircuits.edit.trace): restoring every state gives the clean probability, restoring
none the corrupted one, the fast path (rows start at their first restored position and layer, with the
corrupted run's key/value cache and layer outputs) gives the numbers of a plain full forward per row on
every family and on SmolLM2, a hand-built model whose subject reaches the answer only through one MLP
peaks at that MLP, and the trace is reproducible, batch-size independent and works for every family."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kcircuits.data.prompts import answer_token_ids
from kcircuits.edit import trace as T
from kcircuits.errors import KcircuitsError
from kcircuits.models import from_hf
from tests.model_helpers import has_smollm2, tiny_hf

WORDS = ["[UNK]", "The", "capital", "of", "France", "is", "Paris", "New", "York", "City", "in", "the", "Albany"]
WORDS += [f"w{i}" for i in range(len(WORDS), 97)]  # one word per token id of the tiny models
PROMPT, SUBJECT, ANSWER = "The capital of New York City is", "New York City", "Albany"


@pytest.fixture(scope="module")
def smollm2():
    from kcircuits.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def word_tokenizer():
    """A word-level tokenizer over the tiny models' 97 ids (fast, with character offsets)."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _put_back(clean: torch.Tensor, pos: int):
    """A forward hook writing ``clean[pos]`` at position ``pos`` of every row of a module's output."""
    def hook(module, inputs, output):
        hidden = _hidden(output).clone()
        hidden[:, pos] = clean[pos]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
    return hook


def _reference_probs(lm, sp: T.SubjectPrompt, restorations, noise: torch.Tensor) -> list[float]:
    """Restored probabilities the plain slow way, sharing nothing with the code under test but the
    module lookup: per restoration the whole prompt, one row per noise sample, noisy ``inputs_embeds``
    and one hook per restored state; no cache, nothing skipped, every state restored as given."""
    modules = T.trace_modules(lm.hf_model)
    ids = torch.tensor([sp.input_ids])
    start, end = sp.subject_range
    clean, handles = {}, []
    for kind in T.KINDS:
        for layer in range(modules.n_layers):
            def keep(module, inputs, output, key=(kind, layer)):
                clean[key] = _hidden(output)[0].clone()
            handles.append(modules.module(kind, layer).register_forward_hook(keep))
    with torch.no_grad():
        lm.hf_model(ids)
        for h in handles:
            h.remove()
        embeds = lm.hf_model.get_input_embeddings()(ids).repeat(len(noise), 1, 1)
        embeds[:, start:end] += noise
        out = []
        for states in restorations:
            handles = [modules.module(kind, layer).register_forward_hook(_put_back(clean[(kind, layer)], pos))
                       for kind, layer, pos in states]
            probs = torch.softmax(lm.hf_model(inputs_embeds=embeds).logits[:, -1].double(), -1)[:, sp.answer_id]
            for h in handles:
                h.remove()
            out.append(float(probs.mean()))
    return out


def _sharpened(family: str):
    """A tiny model whose final norm is scaled up: random tiny models predict almost uniformly, and
    sharper logits make the corrupted probability clearly differ from the clean one."""
    hf = tiny_hf(family)
    final_norm = {"gpt2": lambda: hf.transformer.ln_f, "gpt_neox": lambda: hf.gpt_neox.final_layer_norm}
    norm = final_norm.get(family.removesuffix("_seq"), lambda: hf.model.norm)()
    with torch.no_grad():
        for p in norm.parameters():
            p.mul_(10.0)
    return hf


# ----------------------------------------------------------------------------- all or nothing restored
def test_restore_all_gives_clean_none_gives_corrupt(family, word_tokenizer):
    lm = from_hf(_sharpened(family), word_tokenizer)
    modules = T.trace_modules(lm.hf_model)
    with torch.no_grad():
        clean_probs = torch.softmax(lm.hf_model(torch.tensor([word_tokenizer(PROMPT).input_ids])).logits[0, -1], -1)
    top = int(clean_probs.argmax())  # the model's own answer, as causal tracing is meant to be used
    sp = T.locate_subject(word_tokenizer, PROMPT, SUBJECT, WORDS[top])
    clean = T.clean_run(lm, sp, modules)
    assert sp.answer_id == top and clean.p_clean == pytest.approx(float(clean_probs[top]), abs=1e-6)

    start, end = sp.subject_range
    noise = T.subject_noise(end - start, modules.embed.weight.shape[1], 3, 3 * T.embedding_std(modules), seed=0)
    L, P = modules.n_layers, sp.n_positions
    everything = [(k, layer, i) for k in T.KINDS for layer in range(L) for i in range(P)]
    last_layer = [("hidden", L - 1, i) for i in range(P)]
    probs = T.restored_probs(lm, sp, [(), everything, last_layer, [("hidden", L - 1, P - 1)]], noise,
                             clean=clean, batch_size=4, modules=modules)
    assert probs[0] == pytest.approx(_reference_probs(lm, sp, [()], noise)[0], abs=1e-6)
    assert abs(probs[0] - clean.p_clean) > 1e-4  # the noise changes it, far beyond the tolerance (1e-6)
    assert probs[1:].tolist() == pytest.approx([clean.p_clean] * 3, abs=1e-6)


# ----------------------------------------------------------------------------- the fast path
def _untouched(lm) -> bool:
    """No hook left on any module and no layer's forward shadowed."""
    return not any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in lm.hf_model.modules())


@pytest.mark.parametrize("prompt, subject", [(PROMPT, SUBJECT), ("New York City is in the", "New York")],
                         ids=["subject-in-the-middle", "subject-at-the-start"])
def test_fast_path_equals_slow_reference(family, word_tokenizer, prompt, subject):
    """Rows start at their first restored position (the corrupted run's key/value cache before it) and
    layer (the corrupted run's output of the layer before): the same numbers as the whole model per
    row, with and without the cache, for restorations before, in and after the subject."""
    lm = from_hf(_sharpened(family), word_tokenizer)
    modules = T.trace_modules(lm.hf_model)
    with torch.no_grad():
        top = int(lm.hf_model(torch.tensor([word_tokenizer(prompt).input_ids])).logits[0, -1].argmax())
    sp = T.locate_subject(word_tokenizer, prompt, subject, WORDS[top])
    start, end = sp.subject_range
    noise = T.subject_noise(end - start, modules.embed.weight.shape[1], 3, 3 * T.embedding_std(modules), seed=1)
    L, P = modules.n_layers, sp.n_positions
    restorations = [()] + [r for kind in T.KINDS for r in T.trace_restorations(kind, L, range(P), 2)[1]]
    restorations += [[(k, layer, i) for k in T.KINDS for layer in range(L) for i in range(P)],  # everything
                     [("mlp", 0, P - 1), ("hidden", L - 1, start), ("attn", 1, 0)]]  # a mix, one at position 0
    reference = _reference_probs(lm, sp, restorations, noise)
    assert max(reference) - min(reference) > 1e-4  # far beyond the tolerance: restorations matter
    for kv_cache in (True, False):
        probs = T.restored_probs(lm, sp, restorations, noise, batch_size=5, modules=modules, kv_cache=kv_cache)
        assert probs.tolist() == pytest.approx(reference, abs=1e-6), kv_cache
        assert _untouched(lm)
    assert T.corrupted_run(lm, sp, noise, modules).cached  # every tested family's cache is reused


def test_fast_path_runs_only_what_differs(word_tokenizer):
    """Restoring the block output of layer l at position i runs positions [i, P) through layers
    (l, L) only: counted in the MLPs' outputs, besides the corrupted run (every position and layer)
    and its prefixes (positions [0, i) for each first restored position i)."""
    lm = from_hf(tiny_hf("llama"), word_tokenizer)
    modules = T.trace_modules(lm.hf_model)
    sp = T.locate_subject(word_tokenizer, PROMPT, SUBJECT, ANSWER)
    start, end = sp.subject_range
    S, L, P = 2, modules.n_layers, sp.n_positions
    noise = T.subject_noise(end - start, modules.embed.weight.shape[1], S, 1.0, seed=0)
    cells, restorations = T.trace_restorations("hidden", L, range(start, P), 1)
    clean = T.clean_run(lm, sp, modules)
    counted = []
    handles = [m.register_forward_hook(lambda m, i, o: counted.append(o.shape[0] * o.shape[1])) for m in modules.mlps]
    try:  # batches of one restoration's rows: each computes exactly what it needs
        T.restored_probs(lm, sp, restorations, noise, clean=clean, batch_size=S, modules=modules)
    finally:
        for h in handles:
            h.remove()
    rows = S * sum((P - i) * (L - layer - 1) for layer, i in cells)
    assert sum(counted) == rows + S * P * L + S * L * sum(range(start, P))
    assert sum(counted) < 0.5 * len(restorations) * S * P * L  # the whole prompt through every layer, per row


@pytest.mark.real_model
@pytest.mark.skipif(not has_smollm2(), reason="needs the bundled SmolLM2")
@pytest.mark.parametrize("prompt, subject, answer", [
    ("The capital city of New Zealand is", "New Zealand", "Wellington"),
    ("Barack Obama was born in the state of", "Barack Obama", "Hawaii")])
def test_fast_path_equals_slow_reference_smollm2(smollm2, prompt, subject, answer):
    """The real Llama-family model (rotary positions after the cache, grouped keys and values): a
    subject in the middle and one at the start, windows, single states and a mix."""
    sp = T.locate_subject(smollm2.tokenizer, prompt, subject, answer)
    modules = T.trace_modules(smollm2.hf_model)
    start, end = sp.subject_range
    noise = T.subject_noise(end - start, 576, 3, 3 * T.embedding_std(modules), seed=0)
    L, P = modules.n_layers, sp.n_positions
    window = [(k, layer, end - 1) for k in ("mlp", "attn") for layer in T.window_layers(5, 10, L)]
    restorations = [(), [("hidden", 0, start)], [("hidden", L - 1, P - 1)], [("hidden", 12, end)], window,
                    [("attn", 20, P - 1), ("mlp", 3, max(start - 1, 0)), ("hidden", 8, end - 1)]]
    reference = _reference_probs(smollm2, sp, restorations, noise)
    probs = T.restored_probs(smollm2, sp, restorations, noise, batch_size=4, modules=modules)
    assert probs.tolist() == pytest.approx(reference, abs=1e-5)
    assert _untouched(smollm2)


# ----------------------------------------------------------------------------- one MLP carries the subject
def _single_mlp_model(word_tokenizer, j: int, n_layers: int = 4, scale: float = 1000.0):
    """A llama whose subject reaches the answer only through MLP ``j``.

    The width is split in three: A (embeddings), B (MLP j's output) and C (layer j+1's attention
    output). Every other MLP and attention writes nothing; layer j+1's attention reads only B (its
    norm weight is zero on A and C) and attends uniformly (zero queries); the final norm reads only C.
    So the corrupted subject reaches the logits through MLP j's output at the subject, and through
    the noise the embedding adds to B (and to every norm's scale), which ``scale`` makes negligible.
    """
    hf = tiny_hf("llama", num_hidden_layers=n_layers, tie_word_embeddings=False)
    A, B, C = slice(0, 16), slice(16, 32), slice(32, 48)
    with torch.no_grad():
        hf.model.embed_tokens.weight[:, 16:] = 0
        for layer, block in enumerate(hf.model.layers):
            down, out = block.mlp.down_proj.weight, block.self_attn.o_proj.weight
            down[A], down[C] = 0, 0
            down[B] *= scale if layer == j else 0
            out[A], out[B] = 0, 0
            if layer == j + 1:
                block.self_attn.q_proj.weight.zero_()
                block.input_layernorm.weight[A], block.input_layernorm.weight[C] = 0, 0
            else:
                out.zero_()
        hf.model.norm.weight[A], hf.model.norm.weight[B] = 0, 0
        hf.model.norm.weight[C] *= 10 * scale  # peaked logits despite MLP j's large output
    lm = from_hf(hf, word_tokenizer)
    with torch.no_grad():
        top = int(hf(torch.tensor([word_tokenizer("The capital of France is").input_ids])).logits[0, -1].argmax())
    return lm, WORDS[top]  # the clean prediction is the answer


@pytest.mark.parametrize("j", [0, 2])
def test_single_mlp_model_peaks_at_that_mlp(word_tokenizer, j):
    lm, answer = _single_mlp_model(word_tokenizer, j)
    result = T.causal_trace(lm, ["The capital of France is"], ["France"], [answer], window=1, samples=4,
                            kinds=("mlp", "hidden"), progress=False)
    trace = result.prompts[0]
    subject_last = trace.subject_range[1] - 1
    assert trace.p_clean - trace.p_corrupt > 0.2  # the corruption does lose the answer
    effect = trace.effect("mlp")
    assert divmod(int(effect.argmax()), effect.shape[1]) == (j, subject_last)  # the peak of the whole map
    # restoring MLP j alone gives back (almost) the whole clean probability; nothing else does anything
    assert effect[j, subject_last] == pytest.approx(trace.p_clean - trace.p_corrupt, rel=0.02)
    others = effect.clone()
    others[j, subject_last] = 0
    assert others.abs().max() < 1e-5
    assert result.critical_layer() == j
    # the residual stream carries the effect at the subject up to layer j, then at the last token
    hidden, full = trace.effect("hidden"), trace.p_clean - trace.p_corrupt
    assert hidden[: j + 1, subject_last].min() > 0.9 * full and hidden[j + 1:, -1].min() > 0.9 * full


def test_window_restores_the_layers_around(word_tokenizer):
    assert T.window_layers(5, 10, 30) == range(0, 10)
    assert T.window_layers(20, 10, 30) == range(15, 25)
    assert T.window_layers(29, 10, 30) == range(24, 30)
    assert T.window_layers(3, 1, 30) == range(3, 4)
    lm, answer = _single_mlp_model(word_tokenizer, 1)
    trace = T.causal_trace(lm, ["The capital of France is"], ["France"], [answer], window=3, samples=2,
                           kinds=("mlp",), progress=False).prompts[0]
    column = trace.effect("mlp")[:, trace.subject_range[1] - 1]
    # layers 0..2 have MLP 1 in their window of 3; layer 3's window is 2..3
    assert column[:3].tolist() == pytest.approx([column[1].item()] * 3, abs=1e-6) and column[1] > 0.2
    assert abs(column[3]) < 1e-5


# ----------------------------------------------------------------------------- every family, settings
def test_trace_shapes_and_json_each_family(family, word_tokenizer):
    lm = from_hf(tiny_hf(family), word_tokenizer)
    result = T.causal_trace(lm, [PROMPT, "New York City is in the"], [SUBJECT, "New York"], [ANSWER, "France"],
                            samples=2, window=2, progress=False)
    L = lm.config.num_hidden_layers
    assert result.n_layers == L and result.kinds == T.KINDS
    for trace in result.prompts:
        start, end = trace.subject_range
        P = len(trace.input_ids)
        for kind in T.KINDS:
            scores = trace.scores[kind]
            assert scores.shape == (L, P) and bool(((scores >= 0) & (scores <= 1)).all())
            assert (scores[:, :start] == trace.p_corrupt).all()  # before the subject nothing differs
        assert trace.scores["hidden"][L - 1, P - 1] == pytest.approx(trace.p_clean, abs=1e-6)
        assert trace.scores["hidden"][0, start:end].tolist() != [trace.p_corrupt] * (end - start)
    assert result.prompts[1].subject_range == (0, 2)
    mean = result.mean_effect("mlp")
    assert mean.shape == (L, len(T.GROUPS))
    assert 0 <= result.critical_layer() < L
    data = json.loads(json.dumps(result.to_json(), allow_nan=False))
    assert data["critical_layer"] == result.critical_layer()
    back = T.TraceResult.from_json(data)
    assert torch.allclose(back.mean_effect("attn"), result.mean_effect("attn"), equal_nan=True)


def test_seed_reproducible_and_batch_size_independent(word_tokenizer):
    lm = from_hf(tiny_hf("gpt2"), word_tokenizer)

    def run(seed, batch_size):
        return T.causal_trace(lm, [PROMPT], [SUBJECT], [ANSWER], samples=3, window=2, seed=seed,
                              batch_size=batch_size, progress=False).prompts[0]

    a, b, c, d = run(0, 128), run(0, 128), run(1, 128), run(0, 5)
    for kind in T.KINDS:
        assert torch.equal(a.scores[kind], b.scores[kind])
        assert torch.allclose(a.scores[kind], d.scores[kind], atol=1e-6, rtol=0)
    assert a.p_corrupt != c.p_corrupt


def test_bad_input_is_one_line_error(word_tokenizer):
    lm = from_hf(tiny_hf("llama"), word_tokenizer)
    with pytest.raises(KcircuitsError, match="does not occur in the prompt") as err:
        T.causal_trace(lm, [PROMPT], ["Paris"], [ANSWER], progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(KcircuitsError, match="as many subjects"):
        T.causal_trace(lm, [PROMPT], [SUBJECT, SUBJECT], [ANSWER], progress=False)
    with pytest.raises(KcircuitsError, match="unknown trace kind"):
        T.causal_trace(lm, [PROMPT], [SUBJECT], [ANSWER], kinds=("resid",), progress=False)
    result = T.causal_trace(lm, [PROMPT], [SUBJECT], [ANSWER], kinds=("attn",), samples=1, progress=False)
    with pytest.raises(KcircuitsError, match="needs the MLP trace"):
        result.critical_layer()


# ----------------------------------------------------------------------------- subject tokens, groups
def test_locate_subject_with_and_without_offsets(word_tokenizer):
    sp = T.locate_subject(word_tokenizer, PROMPT, SUBJECT, ANSWER)
    assert sp.subject_range == (3, 6) and sp.answer_id == WORDS.index("Albany")
    assert sp.tokens[3:6] == ("New", "York", "City")

    class NoOffsets:  # a tokenizer without character offsets (like HF's slow tokenizers)
        def __call__(self, text, return_offsets_mapping=False, **kwargs):
            if return_offsets_mapping:
                raise NotImplementedError
            return word_tokenizer(text, **kwargs)

        def decode(self, ids):
            return word_tokenizer.decode(ids)

    assert T.locate_subject(NoOffsets(), PROMPT, SUBJECT, ANSWER) == sp
    assert T.locate_subject(NoOffsets(), "New York City is in", "New York", "France").subject_range == (0, 2)


@pytest.mark.skipif(not has_smollm2(), reason="needs the bundled SmolLM2 tokenizer")
def test_locate_subject_real_tokenizer(smollm2_tokenizer):
    prompt = "The capital of France is"
    sp = T.locate_subject(smollm2_tokenizer, prompt, "France", "Paris")
    assert sp.subject_range == (3, 4) and sp.tokens[3] == " France"  # the token carries the space before it
    assert sp.answer_id == answer_token_ids(smollm2_tokenizer, prompt, "Paris")[0]


def test_group_positions_and_mean_effect():
    #                 subject [1, 4) in 7 positions: first, middle, last, first after, further, last
    assert T.group_positions((1, 4), 7) == ([1], [2], [3], [4], [5], [6])
    assert T.group_positions((2, 3), 4) == ([2], [], [2], [3], [], [3])  # ROME counts shared positions twice
    assert T.group_positions((0, 2), 2) == ([0], [], [1], [], [], [1])

    def trace(subject_range, scores):
        scores = torch.tensor(scores, dtype=torch.float64)
        return T.PromptTrace("p", "s", "a", ["t"] * scores.shape[1], [0] * scores.shape[1], subject_range, 0,
                             1.0, 0.1, {"mlp": scores})

    result = T.TraceResult([trace((0, 3), [[0.1, 0.2, 0.9, 0.3, 0.1], [0.1, 0.4, 0.5, 0.6, 0.7]]),
                            trace((1, 2), [[0.1, 0.2, 0.3], [0.1, 0.8, 0.1]])],
                           ("mlp",), 2, 3.0, 0.3, 10, 10, 0)
    mean = result.mean_effect("mlp")
    expected_layer0 = [(0.0 + 0.1) / 2, 0.1, (0.8 + 0.1) / 2, (0.2 + 0.2) / 2, float("nan"), (0.0 + 0.2) / 2]
    assert mean[0].tolist() == pytest.approx(expected_layer0, nan_ok=True)
    assert result.critical_layer() == 1  # last subject token: layer 0 (0.8 + 0.1) / 2, layer 1 (0.4 + 0.7) / 2
    data = result.to_json()
    assert data["mean_effect"]["mlp"][0][4] is None
