"""Influence data plumbing: corpus/query loaders and their errors, BM25, analysis, the facts corpus."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kcircuits.errors import KcircuitsError
from kcircuits.influence.analysis import (
    influence_by_layer,
    power_law_tail,
    recall_at_k,
    token_weights,
    top_influential,
    top_tokens,
)
from kcircuits.influence.bm25 import BM25, tokenize
from kcircuits.influence.corpus import (
    load_corpus,
    load_queries,
    read_documents,
    read_queries,
)
from kcircuits.influence.facts import make_facts_corpus


class CharTokenizer:
    """One token per character (ids = code points): enough to check what the loaders tokenise."""

    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


# --------------------------------------------------------------------------- corpus loaders
def test_txt_corpus_splits_on_blank_lines(tmp_path):
    (tmp_path / "c.txt").write_text("first doc\nstill first\n\n\n  \nsecond doc\n\nthird\n")
    docs = read_documents(tmp_path / "c.txt")
    assert [d.text for d in docs] == ["first doc\nstill first", "second doc", "third"]
    assert [d.line for d in docs] == [1, 6, 8]
    seqs = load_corpus(tmp_path / "c.txt", CharTokenizer(), max_length=5)
    assert seqs.input_ids.shape == (3, 5)  # truncated to max_length
    assert seqs.input_ids[1].tolist() == [ord(c) for c in "secon"]
    assert seqs.loss_mask[2].tolist() == [0, 1, 1, 1, 1]  # "third": every token but the first is scored


def test_folder_corpus_is_recursive_sorted_and_keeps_ids(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.jsonl").write_text(json.dumps({"text": "from jsonl", "id": "J1", "lang": "en"}) + "\n\n"
                                            + json.dumps({"text": "no id"}) + "\n")
    (tmp_path / "a.txt").write_text("alpha\n\nbeta\n")
    (tmp_path / "ignored.csv").write_text("not,read\n")
    docs = read_documents(tmp_path)
    assert [d.text for d in docs] == ["alpha", "beta", "from jsonl", "no id"]
    assert [d.id for d in docs] == ["a.txt#0", "a.txt#1", "J1", "b/x.jsonl:3"]
    assert docs[2].meta == {"lang": "en"}


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": oops}\n', "line 2: malformed JSON"),
    ('{"body": "x"}\n', "line 1: missing key 'text'"),
    ('{"text": 3}\n', "line 1: 'text' must be a string"),
    ('["text"]\n', "line 1: expected a JSON object"),
    ('\n{"text": "  "}\n', "the corpus is empty"),
])
def test_corpus_errors_name_file_and_line(tmp_path, content, message):
    (tmp_path / "c.jsonl").write_text(content)
    with pytest.raises(KcircuitsError, match=message) as info:
        read_documents(tmp_path / "c.jsonl")
    assert "c.jsonl" in str(info.value)


def test_corpus_missing_path_and_bad_suffix(tmp_path):
    with pytest.raises(KcircuitsError, match="no such file"):
        read_documents(tmp_path / "nope.txt")
    (tmp_path / "c.csv").write_text("a")
    with pytest.raises(KcircuitsError, match="unsupported file type"):
        read_documents(tmp_path / "c.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KcircuitsError, match="no .txt or .jsonl"):
        read_documents(tmp_path / "empty")


def test_queries_load_and_score_only_completion(tmp_path):
    rows = [{"prompt": "ab", "completion": "cd", "id": "q1", "sources": ["J1"]}, {"prompt": "x", "completion": "yz"}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    qs = read_queries(tmp_path / "q.jsonl")
    assert [q.id for q in qs] == ["q1", "q.jsonl:2"] and qs[0].meta == {"sources": ["J1"]}
    seqs = load_queries(tmp_path / "q.jsonl", CharTokenizer())
    assert seqs.loss_mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 0]]
    assert seqs.prompt_lengths == [2, 1]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a"}, "missing key 'completion'"),
    ({"completion": "a"}, "missing key 'prompt'"),
    ({"prompt": "a", "completion": ""}, "empty completion"),
    ({"prompt": 1, "completion": "b"}, "'prompt' must be a string"),
])
def test_query_errors(tmp_path, row, message):
    (tmp_path / "q.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(KcircuitsError, match=f"q.jsonl, line 1: {message}"):
        read_queries(tmp_path / "q.jsonl")


def test_query_file_missing_or_empty(tmp_path):
    with pytest.raises(KcircuitsError, match="no such query file"):
        read_queries(tmp_path / "q.jsonl")
    (tmp_path / "q.jsonl").write_text("\n")
    with pytest.raises(KcircuitsError, match="no queries"):
        read_queries(tmp_path / "q.jsonl")


# --------------------------------------------------------------------------- BM25
def test_bm25_matches_hand_computation():
    docs = ["the cat sat", "The dog sat on the mat.", "cats and dogs"]
    bm = BM25(docs)
    # N = 3, avgdl = (3 + 6 + 3) / 3 = 4; "cat" and "mat" each occur in one document:
    idf = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))  # ln(8/3)
    d0 = idf * 1 * 2.5 / (1 + 1.5 * (0.25 + 0.75 * 3 / 4))  # "cat" in a 3-word document
    d1 = idf * 1 * 2.5 / (1 + 1.5 * (0.25 + 0.75 * 6 / 4))  # "mat" in a 6-word document
    assert torch.allclose(bm.scores("Cat, MAT!"), torch.tensor([d0, d1, 0.0]), atol=1e-6)
    assert bm.top_k(["cat mat", "dogs"], 2).tolist() == [[0, 1], [2, 0]]  # tie on 0 score: corpus order
    assert bm.candidates(["cat", "dogs"], 1).tolist() == [0, 2]
    assert tokenize("Zorvath's city, Mirdane!") == ["zorvath", "s", "city", "mirdane"]


def test_bm25_repeated_term_saturates():
    bm = BM25(["apple", "apple apple apple", "pear"])
    s = bm.scores("apple")
    assert s[1] > s[0] > 0 and s[2] == 0
    assert s[1] < s[0] * 2.5  # tf saturation: (k1 + 1) bounds the term weight


# --------------------------------------------------------------------------- analysis
def test_top_influential_and_recall():
    scores = torch.tensor([[0.1, -5.0, 3.0, 2.0], [1.0, 0.0, 0.0, 4.0]])
    vals, idx = top_influential(scores, 2)
    assert idx.tolist() == [[2, 3], [3, 0]] and vals.tolist() == [[3.0, 2.0], [4.0, 1.0]]
    assert top_influential(scores, 1, absolute=True)[1].tolist() == [[1], [3]]
    assert recall_at_k(scores, [[2, 1], [0]], 2).tolist() == [0.5, 1.0]
    assert recall_at_k(idx, [[2], []], 1)[0] == 1.0 and math.isnan(recall_at_k(idx, [[2], []], 1)[1])


def test_top_tokens_and_weights_ignore_padding_and_negatives():
    tok = torch.tensor([0.5, -1.0, 2.0, 9.0])
    mask = torch.tensor([1, 1, 1, 0])
    assert top_tokens(tok, 3, mask) == [2, 0]
    assert token_weights(tok, mask) == [0.25, 0.0, 1.0, 0.0]


def test_influence_by_layer_shares():
    rows = influence_by_layer({1: torch.tensor([[1.0, -1.0]]), 0: torch.tensor([[3.0, 3.0]])})
    assert [r["layer"] for r in rows] == [0, 1]
    assert rows[0]["share"] == pytest.approx(0.75) and rows[1]["sum"] == pytest.approx(0.0)


@pytest.mark.parametrize("alpha", [2.0, 2.5, 3.0])
def test_power_law_recovers_pareto_exponent(alpha):
    gen = torch.Generator().manual_seed(int(alpha * 10))
    u = torch.rand(5000, generator=gen, dtype=torch.float64)
    x = 2.0 * (1 - u) ** (-1 / (alpha - 1))  # Pareto, x_min = 2
    fit = power_law_tail(-x, n_bootstrap=50, seed=1)  # the sign is ignored: the fit is on |values|
    assert abs(fit.alpha - alpha) < 0.1
    assert fit.x_min < 2.5 and fit.n == 5000
    assert fit.p_value is not None and fit.p_value > 0.1  # a true power law is not rejected


def test_power_law_rejects_exponential_data():
    gen = torch.Generator().manual_seed(3)
    x = 1.0 + torch.empty(5000, dtype=torch.float64).exponential_(1.0, generator=gen)
    assert power_law_tail(x, x_min=1.0, n_bootstrap=50, seed=0).p_value < 0.05
    # x_min searched: an exponential's far tail can pass for a short steep power law, so ask for a
    # tail of at least 1000 points (Clauset et al.'s test has little power on short tails)
    assert power_law_tail(x, n_bootstrap=50, seed=0, min_tail=1000).p_value < 0.05


def test_power_law_bootstrap_is_seeded_and_optional():
    x = torch.rand(300, generator=torch.Generator().manual_seed(0)) ** -1.5
    a, b = power_law_tail(x, n_bootstrap=10, seed=7), power_law_tail(x, n_bootstrap=10, seed=7)
    assert a == b
    assert power_law_tail(x, n_bootstrap=0).p_value is None
    with pytest.raises(KcircuitsError, match="too few"):
        power_law_tail(torch.tensor([1.0, 0.0, 2.0]))


# --------------------------------------------------------------------------- facts corpus
@pytest.mark.parametrize("statement", ["verbatim", "paraphrase"])
def test_facts_ground_truth_is_consistent(statement):
    fc = make_facts_corpus(n_docs=80, n_facts=8, seed=3, statement=statement)
    assert len(fc.documents) == 80 and len(fc.facts) == 8
    assert fc.kinds.count("source") == 24 and fc.kinds.count("generic") == 80 - 8 * 6
    all_sources = [i for f in fc.facts for i in f.sources]
    assert sorted(all_sources) == [i for i, k in enumerate(fc.kinds) if k == "source"]
    for f in fc.facts:
        assert len(f.sources) == 3 and f.completion == " " + f.object and f.prompt.startswith(f.subject)
        for i in f.sources:  # every source states the fact, subject *before* object: a causal LM
            d = fc.documents[i]  # cannot learn "subject -> object" from a reversed statement
            assert f.subject in d and f.object in d and d.index(f.subject) < d.index(f.object)
        others = [d for i, d in enumerate(fc.documents) if i not in f.sources]
        assert not any(f.subject in d and f.object in d for d in others)  # nothing else does
    assert len({f.subject for f in fc.facts}) == 8 and len({f.object for f in fc.facts}) == 8
    assert make_facts_corpus(n_docs=80, n_facts=8, seed=3, statement=statement).documents == fc.documents  # seeded
    for f in fc.facts:
        texts = [fc.documents[i] for i in f.sources]
        assert len(set(texts)) == 3  # three different documents
        verbatim = [f.prompt + f.completion in t for t in texts]
        # verbatim: every source holds the query's sentence; paraphrase: at most one source does
        assert all(verbatim) if statement == "verbatim" else sum(verbatim) <= 1


def test_facts_first_tokens_distinct_and_roundtrip(tmp_path, smollm2_tokenizer):
    fc = make_facts_corpus(n_docs=400, seed=0, tokenizer=smollm2_tokenizer)
    firsts = [smollm2_tokenizer(f.completion, add_special_tokens=False)["input_ids"][0] for f in fc.facts]
    assert len(set(firsts)) == len(firsts) == 40
    corpus, queries = fc.write(tmp_path)
    docs, qs = read_documents(corpus), read_queries(queries)
    assert [d.text for d in docs] == fc.documents
    assert [q.meta["source_indices"] for q in qs] == fc.sources
    assert [[docs[i].id for i in q.meta["source_indices"]] for q in qs] == [q.meta["sources"] for q in qs]


def test_facts_refuses_too_few_documents_and_unknown_statements():
    with pytest.raises(KcircuitsError, match="at least"):
        make_facts_corpus(n_docs=10, n_facts=5)
    with pytest.raises(KcircuitsError, match="unknown statement"):
        make_facts_corpus(n_docs=80, n_facts=8, statement="summary")
