"""Head roles, checked on a hand-built model whose mover, relation and mixture heads are known."""

import pytest
import torch

from kcircuits.analyze.head_roles import (
    OTHER,
    RELATION,
    SUBJECT,
    RoleThresholds,
    head_roles,
    token_roles,
)
from kcircuits.batching import make_batch
from kcircuits.engine import Engine
from kcircuits.errors import KcircuitsError
from kcircuits.models import from_hf
from tests.model_helpers import FAMILIES, tiny_hf
from tests.helpers import Pair, blank_gpt2, random_batch

V = D = 24  # one-hot token directions
E = 6  # head dim: 4 heads
SUBJECTS = (1, 2, 3)  # the relation's answer range: the answer is the subject token itself (copying)
REL, IS, START = 7, 9, 5


@pytest.mark.parametrize("family", FAMILIES + ["mistral"])
def test_attention_pattern_equals_hf(family):
    hf = tiny_hf(family)
    eng = Engine(from_hf(hf).weights)
    batch = random_batch(2)
    with torch.no_grad():
        res = eng.run(eng.embed(batch.clean), batch.target_pos, capture=True)
        ref = hf(batch.clean, output_attentions=True).attentions
    for layer, want in enumerate(ref):
        got = eng.attention_pattern(layer, res.layers[layer])
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-4)  # fp32, recomputed vs HF eager


def _hand_built_model():
    """Layer 0 is off; layer 1 has four heads, all with a constant query (bias) so that keys decide:
    h0 (mover) attends to subject tokens and copies them; h1 (relation) attends to the relation token and
    writes the whole answer range; h2 (mixture) splits attention between the two and does both; h3 writes nothing."""
    hf = blank_gpt2(2, 4, D, V)
    with torch.no_grad():
        tr = hf.transformer
        W = torch.zeros(D, 3 * D)  # Conv1D [d_in, q | k | v]
        b = torch.zeros(3 * D)
        W_O = torch.zeros(D, D)  # c_proj [concat heads, d_out]
        q0, k0, v0 = 0, D, 2 * D
        for h in range(4):
            b[q0 + h * E] = 1.0  # every position queries with the same vector
        for s in SUBJECTS:
            W[s, k0 + 0 * E] = 5.0  # h0 keys: subject tokens
            W[s, k0 + 2 * E] = 5.0  # h2 keys: subject tokens ...
            W[s, v0 + 0 * E + s - 1] = 1.0  # h0 copies the subject
            W_O[0 * E + s - 1, s] = 1.0
            W[s, v0 + 2 * E + s - 1] = 1.0  # h2 copies the subject ...
            W_O[2 * E + s - 1, s] = 1.0
        W[REL, k0 + 1 * E] = 5.0  # h1 keys: the relation token
        W[REL, k0 + 2 * E] = 5.0  # ... and h2's too
        W[REL, v0 + 1 * E] = 1.0
        W[REL, v0 + 2 * E + 3] = 1.0
        for s in SUBJECTS:  # the relation token's value raises the whole answer range
            W_O[1 * E, s] = 1.0
            W_O[2 * E + 3, s] = 1.0
        tr.h[1].attn.c_attn.weight.copy_(W)
        tr.h[1].attn.c_attn.bias.copy_(b)
        tr.h[1].attn.c_proj.weight.copy_(W_O)
    return Engine(from_hf(hf).weights)


def _prompts():
    pairs = [Pair([START, s, REL, IS], [START, SUBJECTS[(i + 1) % 3], REL, IS], [s], [SUBJECTS[(i + 1) % 3]])
             for i, s in enumerate(SUBJECTS)]
    kinds = torch.tensor([[OTHER, SUBJECT, RELATION, RELATION]] * len(pairs))
    return make_batch(pairs, pad_id=0), kinds


def test_hand_built_heads_get_their_roles():
    eng = _hand_built_model()
    batch, kinds = _prompts()
    table = head_roles(eng, batch, kinds, SUBJECTS)
    row = {r["head"]: r for r in table.rows}
    assert row["a1.h0"]["role"] == "mover"
    assert row["a1.h1"]["role"] == "relation"
    assert row["a1.h2"]["role"] == "mixture"
    assert row["a1.h3"]["role"] == "none"
    assert all(row[f"a0.h{h}"]["role"] == "none" for h in range(4))
    assert row["a1.h0"]["subject_mass"] > 0.99 and row["a1.h1"]["relation_mass"] > 0.99
    assert abs(row["a1.h2"]["subject_mass"] - 0.5) < 0.01 and abs(row["a1.h2"]["relation_mass"] - 0.5) < 0.01
    # the mover raises this subject's answer, the relation head all answers alike
    assert row["a1.h0"]["direct_effect"] > 0 and row["a1.h0"]["specificity"] > 3
    assert abs(row["a1.h1"]["specificity"]) < 1e-3 and row["a1.h1"]["range_z"] > 2
    masses = table.per_prompt["subject_mass"] + table.per_prompt["relation_mass"] + table.per_prompt["other_mass"]
    torch.testing.assert_close(masses, torch.ones_like(masses))
    assert table.counts() == {"mover": 1, "relation": 1, "mixture": 1, "none": 5}
    assert table.attention.shape == (8, 3, 4)


def test_direct_effects_of_all_sources_add_up_to_the_centred_logit():
    """Through the final norm frozen at the model's own scale, the centred logit contributions of all
    sources add up to the model's centred logits (exact for a bias-free RMSNorm model like Llama), and
    head_roles reports exactly the heads' share of the answer's."""
    from kcircuits.analyze.head_roles import _unembed_centred

    eng = Engine(from_hf(tiny_hf("llama")).weights)
    batch = random_batch(3)
    rows, pos = torch.arange(3), batch.target_pos[:, 0]
    with torch.no_grad():
        res = eng.run(eng.embed(batch.clean), batch.target_pos, record=True)
    u = _unembed_centred(eng, res.acts[:, rows, pos], res.resid_final[rows, pos])  # [n_src, b, V]
    logits = res.logits[:, 0]
    torch.testing.assert_close(u.sum(0), logits - logits.mean(-1, keepdim=True), atol=1e-4, rtol=1e-4)
    kinds = torch.zeros_like(batch.clean)
    table = head_roles(eng, batch, kinds, [1, 2, 3])
    heads = [eng.graph.src_index(n) for n in table.heads]
    want = u[heads].gather(-1, batch.target_ids[None, :, :1].expand(len(heads), -1, 1))[..., 0]
    torch.testing.assert_close(table.per_prompt["direct_effect"], want)


def test_thresholds_are_the_users():
    eng = _hand_built_model()
    batch, kinds = _prompts()
    strict = RoleThresholds(subject_mass_min=0.6, relation_mass_min=0.6)
    row = {r["head"]: r for r in head_roles(eng, batch, kinds, SUBJECTS, thresholds=strict).rows}
    assert row["a1.h2"]["role"] == "none"  # half its attention is no longer enough for either
    assert row["a1.h0"]["role"] == "mover"
    with pytest.raises(KcircuitsError):
        head_roles(eng, batch, kinds, [1])  # a range of one answer has no range effect
    with pytest.raises(KcircuitsError):
        head_roles(eng, batch, kinds[:2], SUBJECTS)


def test_token_roles_marks_subject_relation_and_demonstration(smollm2_tokenizer):
    from types import SimpleNamespace

    tok = smollm2_tokenizer
    tpl = "The capital of Malta is Valletta. The capital of {} is"
    text = tpl.replace("{}", "France")
    ids = tok(text)["input_ids"]
    pair = SimpleNamespace(template=tpl, subject="France", clean_text=text, clean_ids=ids, corrupt_ids=ids)
    kinds = token_roles(tok, [pair], len(ids) + 2)[0]
    words = [tok.decode([i]) for i in ids]
    # kinds is padded to the width (len(ids) + 2); the padding has no word
    subj = [w for w, k in zip(words, kinds, strict=False) if k == SUBJECT]
    rel = "".join(w for w, k in zip(words, kinds, strict=False) if k == RELATION)
    other = "".join(w for w, k in zip(words, kinds, strict=False) if k == OTHER)
    assert "".join(subj).strip() == "France"
    assert rel.split() == ["The", "capital", "of", "is"]
    assert "Valletta" in other and "Malta" in other
    assert kinds[-2:].tolist() == [OTHER, OTHER]  # padding
