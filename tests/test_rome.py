"""ROME on tiny models of every family: the edited matrix maps the subject's key to the optimised value."""

from __future__ import annotations

import dataclasses
import logging
import re

import pytest
import torch

from kcircuits.data.prompts import answer_token_ids
from kcircuits.edit import rome
from kcircuits.edit.rome import (STOP_LOSS, ValueSettings, optimised_value, optimised_values, rome_edit, split_template,
                                 subject_key, subject_keys, subject_position, target_value)
from kcircuits.edit.trace import trace_modules
from kcircuits.edit.stats import capture_keys, key_second_moment, mlp_output
from kcircuits.errors import KcircuitsError
from kcircuits.models import from_hf
from kcircuits.models.edits import edited
from kcircuits.steps import StepCache
from tests.edit_helpers import answer_logprob, statistics_corpus
from tests.model_helpers import tiny_hf

PROMPT, SUBJECT, NEW = "The capital of {} is", "France", "Berlin"


@pytest.fixture(scope="module", params=["gpt2", "gpt_neox", "llama", "qwen2"])
def lm(request, smollm2_tokenizer):
    hf = tiny_hf(request.param, vocab_size=49152)
    return from_hf(hf, smollm2_tokenizer, name=f"tiny-{request.param}")


def test_the_edit_maps_the_key_to_the_value_with_rank_one(lm, tmp_path):
    layer = 0  # an edit at the subject reaches the answer through a later layer's attention
    C = key_second_moment(lm, layer, statistics_corpus(), cache=StepCache(tmp_path))
    before = answer_logprob(lm, PROMPT.format(SUBJECT), NEW)
    # plain likelihood ascent (no KL, no decay): the tiny random models' scales are not GPT-2 XL's
    edit = rome_edit(lm, PROMPT, SUBJECT, NEW, layer, C, settings=ValueSettings(steps=8, lr=0.1, kl_factor=0.0,
                                                                                  weight_decay=0.0))
    (name, delta), = edit.delta.items()
    assert torch.linalg.matrix_rank(delta.double(), rtol=1e-5).item() == 1  # rank one up to float32 rounding
    target = mlp_output(lm, layer)
    pos = len(lm.tokenizer("The capital of France", add_special_tokens=False).input_ids) - 1
    ids = torch.tensor([lm.tokenizer(PROMPT.format(SUBJECT), add_special_tokens=False).input_ids])
    original = dict(lm.hf_model.named_parameters())[name].detach().clone()
    with edited(lm, edit.delta), capture_keys(target) as seen, torch.no_grad():
        lm.hf_model(input_ids=ids)
        after = answer_logprob(lm, PROMPT.format(SUBJECT), NEW)
    assert torch.allclose(seen["keys"][0, pos], edit.key, rtol=1e-5, atol=1e-6)  # earlier layers: same key
    rel = (seen["values"][0, pos] - edit.value).norm() / edit.value.norm()
    assert rel < 1e-5  # W' k* (+ b) = v*
    assert after > before  # the new target became more likely
    assert torch.equal(dict(lm.hf_model.named_parameters())[name], original)  # restored exactly


def test_the_value_optimisation_respects_its_norm_clamp(lm):
    target = mlp_output(lm, 0)
    key = subject_key(lm, target, PROMPT, SUBJECT)
    v0 = key @ target.matrix(lm).T.detach()
    bias = target.bias_vector(lm)
    v0 = v0 + bias.detach() if bias is not None else v0
    value = target_value(lm, target, key, PROMPT, SUBJECT, NEW,
                         settings=ValueSettings(steps=5, lr=10.0, clamp_norm=0.1, weight_decay=0.0))
    assert (value - v0).norm() <= 0.1 * v0.norm() * (1 + 1e-4)


def test_key_statistics_are_cached_by_weights_layer_and_corpus(lm, tmp_path):
    cache = StepCache(tmp_path)
    texts = statistics_corpus()[:40]
    C = key_second_moment(lm, 0, texts, cache=cache)
    assert torch.allclose(C, C.T) and torch.linalg.eigvalsh(C).min() > -1e-9  # a second moment
    assert torch.equal(key_second_moment(lm, 0, texts, cache=cache), C)
    assert not torch.equal(key_second_moment(lm, 0, texts[:20], cache=cache), C)
    assert len(list((tmp_path / "key_second_moment").iterdir())) == 2


def test_bad_requests_are_refused(lm):
    C = torch.eye(mlp_output(lm, 0).matrix(lm).shape[1], dtype=torch.float64)
    with pytest.raises(KcircuitsError, match="out of range"):
        rome_edit(lm, PROMPT, SUBJECT, NEW, 99, C)
    with pytest.raises(KcircuitsError, match="exactly once"):
        rome_edit(lm, "The capital of France is", SUBJECT, NEW, 0, C)
    with pytest.raises(KcircuitsError, match="non-empty"):
        rome_edit(lm, PROMPT, SUBJECT, "  ", 0, C)
    with pytest.raises(KcircuitsError, match="empty"):
        key_second_moment(lm, 0, [])


# --------------------------------------------------------------------------- the value optimisation's shortcuts
PREFIXES = ("", "A short one. ", "A longer context, of several more words, before it. ")
EDITS = [(PROMPT, SUBJECT, NEW), ("{} is headquartered in the city of", "Nintendo Co", "Los Angeles")]


def with_stop(stop_loss: float, **fields) -> ValueSettings:
    """ValueSettings with the early-stop threshold ``stop_loss`` (its ``stop_loss`` field when settings.py has
    one, else a subclass adding it: the optimisation reads ``settings.stop_loss`` either way)."""
    if "stop_loss" in {f.name for f in dataclasses.fields(ValueSettings)}:
        return ValueSettings(stop_loss=stop_loss, **fields)
    return _WithStop(stop_loss=stop_loss, **fields)


@dataclasses.dataclass(frozen=True)
class _WithStop(ValueSettings):
    stop_loss: float = STOP_LOSS


def full_forward_value(lm, module, v0, prompt, subject, new_target, prefixes, st) -> torch.Tensor:
    """ROME's value loop written plainly: every step a full forward pass of every row (and of the essence
    prompt) through the whole model, the unembedding of every position; no early stop."""
    before, after = split_template(prompt, subject)
    texts = [p + before + subject + after for p in prefixes]
    targets = [answer_token_ids(lm.tokenizer, t, new_target) for t in texts]
    rows = [lm.tokenizer(t, add_special_tokens=False).input_ids + tgt[:-1]
            for t, tgt in zip(texts, targets, strict=True)]
    at = [subject_position(lm.tokenizer, p + before, subject) for p in prefixes]
    essence = torch.tensor([lm.tokenizer(f"{subject} is a", add_special_tokens=False).input_ids])
    essence_at = subject_position(lm.tokenizer, "", subject)
    delta = torch.zeros_like(v0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=st.lr)

    def run(ids, pos):
        def hook(mod, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = torch.cat([hidden[:, :pos], hidden[:, pos:pos + 1] + delta, hidden[:, pos + 1:]], 1)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = module.register_forward_hook(hook)
        try:
            return torch.log_softmax(lm.hf_model(input_ids=ids).logits[0].float(), -1)
        finally:
            handle.remove()

    with torch.no_grad():
        base = torch.log_softmax(lm.hf_model(input_ids=essence).logits[0, essence_at].float(), -1)
    for p in lm.hf_model.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(st.steps):
            opt.zero_grad()
            nll = 0
            for row, a, tgt in zip(rows, at, targets, strict=True):
                logp = run(torch.tensor([row]), a)
                first = len(row) - len(tgt)
                nll = nll - sum(logp[first + j, t] for j, t in enumerate(tgt)) / len(tgt) / len(rows)
            new = run(essence, essence_at)[essence_at]  # ROME reads the essence prompt at the subject's last token
            kl = (new.exp() * (new - base)).sum()  # KL(new ‖ unedited), ROME's compute_v
            loss = nll + st.kl_factor * kl + st.weight_decay * delta.norm() / v0.norm() ** 2  # ROME's decay form
            loss.backward()
            opt.step()
            with torch.no_grad():
                if delta.norm() > st.clamp_norm * v0.norm():
                    delta.mul_(st.clamp_norm * v0.norm() / delta.norm())
    finally:
        for p in lm.hf_model.parameters():
            p.requires_grad_(True)
    return (v0 + delta).detach()


@pytest.mark.parametrize("passes", ["one pass", "essence apart"])
@pytest.mark.parametrize("where", ["mlp", "block"])
def test_the_shortcut_value_is_the_full_forward_value(lm, where, passes, monkeypatch):
    """Cached positions before the subject, skipped layers below δ, unembedding only where scored and
    several requests in one batch (the essence rows in the same forward pass or in one of their own)
    give what full forward passes give (ROME: δ at an MLP's output; MEMIT: at a decoder layer's), on
    every family."""
    monkeypatch.setattr(rome, "SPLIT_TOKENS", 0 if passes == "essence apart" else 10**9)
    layer = lm.weights.n_layers - 2  # below it, layers to skip (but qwen2's two); above, one δ reaches the answer by
    module = mlp_output(lm, layer).module if where == "mlp" else trace_modules(lm.hf_model).layers[layer]
    d = lm.hf_model.get_input_embeddings().weight.shape[1]
    v0 = torch.randn(len(EDITS), d, generator=torch.Generator().manual_seed(0))
    st = with_stop(0.0, steps=3, lr=0.1, weight_decay=0.1)
    batched = optimised_values(lm, module, v0, EDITS, PREFIXES, st, batch_size=2)
    for i, (prompt, subject, new_target) in enumerate(EDITS):
        plain = full_forward_value(lm, module, v0[i], prompt, subject, new_target, PREFIXES, st)
        assert (batched[i] - plain).norm() / (plain - v0[i]).norm() < 1e-4, (where, i)
        alone = optimised_value(lm, module, v0[i], prompt, subject, new_target, PREFIXES, st)
        assert (alone - plain).norm() / (plain - v0[i]).norm() < 1e-4, (where, i)


def steps_and_losses(caplog, run):
    """``run()``'s value, and the steps and last loss of each request the optimisation logged."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="kcircuits.edit.rome"):
        value = run()
    found = [re.search(r"steps \[(.*)\], last losses \[(.*)\]", r.getMessage()) for r in caplog.records]
    found = [m for m in found if m]
    steps = [int(s) for m in found for s in m.group(1).split(",")]
    losses = [float(s) for m in found for s in m.group(2).split(",")]
    return value, steps, losses


def test_the_value_optimisation_stops_once_its_loss_is_below_the_threshold(lm, caplog):
    target = mlp_output(lm, 0)
    key = subject_key(lm, target, PROMPT, SUBJECT, PREFIXES)
    v0 = (key @ target.matrix(lm).T + (target.bias_vector(lm) if target.bias is not None else 0)).detach()

    def value(stop_loss, steps):
        st = with_stop(stop_loss, steps=steps, lr=1.0, kl_factor=0.0, weight_decay=0.0)
        return steps_and_losses(caplog, lambda: optimised_value(lm, target.module, v0, PROMPT, SUBJECT, NEW, PREFIXES,
                                                                st))

    # a zero threshold runs every step; the loss logged last is the one evaluated before the last step
    runs = [value(0.0, k) for k in (1, 2, 3, 6)]
    assert [r[1] for r in runs] == [[1], [2], [3], [6]]
    loss0, loss1, loss2 = (r[2][0] for r in runs[:3])
    assert loss0 > loss1 > loss2  # plain likelihood ascent on the new target
    # a threshold between the second and third losses: two steps, then it stops, whatever steps allows
    stopped, steps, _ = value((loss1 + loss2) / 2, 6)
    assert steps == [2] and torch.equal(stopped, runs[1][0])
    # a threshold above the first loss: no step at all, v* = v0
    untouched, steps, _ = value(loss0 * 2, 6)
    assert steps == [0] and torch.equal(untouched, v0)


@pytest.mark.parametrize("cut", ["cache cut", "rows run again"])
def test_requests_batched_together_stop_each_on_its_own(lm, caplog, monkeypatch, cut):
    """Two requests in one batch: the one below the threshold keeps its δ and leaves the batch (its rows
    cut from the attention cache, or, for a cache that cannot be cut, the remaining rows' earlier positions
    run again) while the other goes on, as if each had been optimised alone."""
    if cut == "rows run again":
        monkeypatch.setattr(rome, "_cache_rows", lambda cache, rows: None)
    module = mlp_output(lm, 0).module
    d = lm.hf_model.get_input_embeddings().weight.shape[1]
    v0 = torch.randn(len(EDITS), d, generator=torch.Generator().manual_seed(1))
    plain = dict(lr=1.0, kl_factor=0.0, weight_decay=0.0)
    _, _, first = steps_and_losses(caplog, lambda: optimised_values(lm, module, v0, EDITS, PREFIXES,
                                                                    with_stop(0.0, steps=1, **plain)))
    _, _, second = steps_and_losses(caplog, lambda: optimised_values(lm, module, v0, EDITS, PREFIXES,
                                                                     with_stop(0.0, steps=2, **plain)))
    # the request lower after one step stops there: a threshold below the other's losses so far
    i = 0 if second[0] < second[1] else 1
    stop = (second[i] + min(first[0], first[1], second[1 - i])) / 2
    assert second[i] < stop
    st = with_stop(stop, steps=4, **plain)
    batched, steps, _ = steps_and_losses(caplog, lambda: optimised_values(lm, module, v0, EDITS, PREFIXES, st,
                                                                          batch_size=2))
    assert steps[i] == 1 and steps[1 - i] > 1, steps
    for j, edit in enumerate(EDITS):
        alone = optimised_value(lm, module, v0[j], *edit, PREFIXES, st)
        assert (batched[j] - alone).norm() / (alone - v0[j]).norm() < 1e-4


def test_keys_are_read_in_one_cut_short_batch(lm):
    """subject_keys of several prompts and prefixes equals each text's key from its own full forward pass,
    and the forward passes end at the layer read."""
    target = mlp_output(lm, 0)
    items = [(PROMPT, SUBJECT), ("{} is headquartered in the city of", "Nintendo Co")]
    expected = []
    for prompt, subject in items:
        before, after = split_template(prompt, subject)
        keys = []
        for prefix in PREFIXES:
            ids = torch.tensor([lm.tokenizer(prefix + before + subject + after, add_special_tokens=False).input_ids])
            with capture_keys(target) as seen, torch.no_grad():
                lm.hf_model(input_ids=ids)
            keys.append(seen["keys"][0, subject_position(lm.tokenizer, prefix + before, subject)])
        expected.append(torch.stack(keys).mean(0))
    calls = []
    handle = trace_modules(lm.hf_model).layers[-1].register_forward_hook(lambda *args: calls.append(1))
    try:
        got = subject_keys(lm, target, items, PREFIXES, batch_size=4)
    finally:
        handle.remove()
    assert not calls  # nothing above the layer read was run
    assert torch.allclose(got, torch.stack(expected), rtol=1e-4, atol=1e-5)
