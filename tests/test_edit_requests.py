"""Edit requests (issue 14, item 2): the three sources, target tokenisation, and one-line errors for bad input."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from kcircuits.data import answer_token_ids, load_dataset
from kcircuits.edit.requests import (
    EditRequest,
    load_counterfact,
    load_requests,
    load_zsre,
    requests_from_relation,
    target_ids,
    validate_requests,
)
from kcircuits.errors import KcircuitsError

CF = [
    {"case_id": 7,
     "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                           "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French"},
                           "relation_id": "P103"},
     "paraphrase_prompts": ["Danielle Darrieux spoke the language", "Danielle Darrieux's native language is"],
     "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Montesquieu spoke the language"],
     "generation_prompts": ["Danielle Darrieux's mother tongue is"]},
    {"case_id": 8,
     "requested_rewrite": {"prompt": "{} is a citizen of", "subject": "Edwin Hubble",
                           "target_new": {"str": "Buenos Aires"}, "target_true": {"str": "United States"}}},
]

ZSRE = [
    {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
     "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"], "pred": "Yale",
     "rephrase": "What university did Watts Humphrey take part in?",
     "loc": "nq question: who played desmond doss father in hacksaw ridge", "loc_ans": "Hugo Weaving"},
    {"subject": "Ramalinaceae", "src": "Which family does Ramalinaceae belong to?", "alt": "Lamiinae"},
]


def write(tmp_path, data, name="requests.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return str(path)


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(KcircuitsError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


# --------------------------------------------------------------------------- bundled relation


def test_requests_from_relation_are_seeded_counterfactuals_with_held_out_neighbours():
    ds = load_dataset("country_capital")
    facts = {s["subject"]: s["object"] for s in ds.samples}
    reqs = requests_from_relation("country_capital", 4, seed=3, n_paraphrases=2, n_neighbours=3)
    assert reqs == requests_from_relation("country_capital", 4, seed=3, n_paraphrases=2, n_neighbours=3)
    assert reqs != requests_from_relation("country_capital", 4, seed=4, n_paraphrases=2, n_neighbours=3)
    edited = {r.subject for r in reqs}
    assert len(reqs) == 4 == len(edited) == len({r.case_id for r in reqs})
    for r in reqs:
        assert r.prompt == ds.prompt_templates[0] and r.prompt_text == r.prompt.replace("{}", r.subject)
        assert r.target_true == facts[r.subject]
        assert r.target_new in facts.values() and r.target_new != r.target_true
        assert r.paraphrase_prompts == tuple(t.replace("{}", r.subject) for t in ds.prompt_templates[1:3])
        assert len(r.neighborhood_prompts) == 3
        for prompt, expected in r.neighborhood_prompts:
            subject = next(s for s in facts if r.prompt.replace("{}", s) == prompt)
            # neighbours keep their own answer, are not edited in this batch, and do not answer the new target
            assert expected == facts[subject] != r.target_new and subject not in edited
        assert r.relation == "country_capital" and r.other_prompts == ()


def test_requests_from_relation_other_relation_probes():
    fruit = load_dataset("fruit_color")
    probes = {(fruit.prompt_templates[0].replace("{}", s["subject"]), s["object"]) for s in fruit.samples}
    reqs = requests_from_relation("country_capital", 2, other_relations=["fruit_color"], n_other=3)
    assert all(len(r.other_prompts) == 3 and set(r.other_prompts) <= probes for r in reqs)
    assert "is the edited relation" in one_line_error(requests_from_relation, "country_capital", 1,
                                                      other_relations=["country_capital"])


# --------------------------------------------------------------------------- files


def test_counterfact_file_round_trips(tmp_path):
    reqs = load_counterfact(write(tmp_path, CF))
    a, b = reqs
    assert (a.prompt, a.subject, a.target_new, a.target_true) == ("The mother tongue of {} is", "Danielle Darrieux",
                                                                  "English", "French")
    assert a.prompt_text == "The mother tongue of Danielle Darrieux is"
    assert a.paraphrase_prompts == tuple(CF[0]["paraphrase_prompts"])
    # CounterFact's neighbours share the true object: each expects the request's true target
    assert a.neighborhood_prompts == tuple((p, "French") for p in CF[0]["neighborhood_prompts"])
    assert a.generation_prompts == tuple(CF[0]["generation_prompts"])
    assert (a.relation, a.case_id, b.case_id) == ("P103", 7, 8)
    assert (b.target_new, b.paraphrase_prompts, b.neighborhood_prompts) == ("Buenos Aires", (), ())
    assert load_counterfact(write(tmp_path, CF), n=1) == [a]
    as_json = json.loads(json.dumps(a.to_dict()))
    assert as_json["neighborhood_prompts"][0] == [CF[0]["neighborhood_prompts"][0], "French"]


def test_zsre_file_round_trips(tmp_path):
    a, b = load_zsre(write(tmp_path, ZSRE))
    assert a.prompt == "What university did {} attend?" and a.prompt_text == ZSRE[0]["src"]
    assert (a.target_new, a.target_true) == ("University of Michigan", "Illinois Institute of Technology")
    assert a.paraphrase_prompts == (ZSRE[0]["rephrase"],)
    assert a.neighborhood_prompts == ((ZSRE[0]["loc"], "Hugo Weaving"),)
    assert (a.relation, a.case_id, a.generation_prompts) == ("", 0, ())
    # no answers: no true target (pred is a model's guess, not the truth); optional keys may be missing
    assert (b.target_true, b.paraphrase_prompts, b.neighborhood_prompts, b.case_id) == (None, (), (), 1)


def test_load_requests_dispatches_on_name_and_content(tmp_path):
    assert load_requests("country_capital", 2, seed=1) == requests_from_relation("country_capital", 2, seed=1)
    assert load_requests(write(tmp_path, CF, "cf.json")) == load_counterfact(write(tmp_path, CF, "cf.json"))
    assert load_requests(write(tmp_path, ZSRE, "z.json"), 1) == load_zsre(write(tmp_path, ZSRE, "z.json"))[:1]
    relation = {"name": "tiny", "prompt_templates": ["{} lives in", "The home of {} is"],
                "samples": [{"subject": "Ann", "object": "Oslo"}, {"subject": "Bob", "object": "Rome"},
                            {"subject": "Cy", "object": "Lima"}]}
    reqs = load_requests(write(tmp_path, relation, "rel.json"), n_neighbours=1)
    assert {r.subject for r in reqs} == {"Ann", "Bob", "Cy"} and all(r.relation == "tiny" for r in reqs)
    assert all(r.neighborhood_prompts == () for r in reqs)  # every subject is edited: no neighbour left
    assert "cannot tell the file's shape" in one_line_error(load_requests, write(tmp_path, [{"x": 1}], "odd.json"))
    assert "unknown option" in one_line_error(load_requests, "country_capital", n_neighbors=2)
    assert "only to relation sources" in one_line_error(load_requests, write(tmp_path, CF, "cf.json"), n_neighbours=2)
    assert "unknown relation" in one_line_error(load_requests, "no_such_relation")


# --------------------------------------------------------------------------- bad input


def cf_with(**changes) -> list:
    """CF with record #1's requested_rewrite changed (a key set to None is removed)."""
    data = json.loads(json.dumps(CF))
    for key, value in changes.items():
        if value is None:
            del data[1]["requested_rewrite"][key]
        else:
            data[1]["requested_rewrite"][key] = value
    return data


@pytest.mark.parametrize("loader, data, expected", [
    (load_counterfact, '[{"requested_rewrite":\n  {"prompt": "x {} is",, }}]', "malformed JSON at line 2 column"),
    (load_counterfact, [], "empty"),
    (load_counterfact, {"requested_rewrite": {}}, "top level must be a JSON list"),
    (load_counterfact, [CF[0], {"paraphrase_prompts": []}], "record #1 has no 'requested_rewrite'"),
    (load_counterfact, cf_with(subject=None), "record #1 has no 'requested_rewrite.subject'"),
    (load_counterfact, cf_with(target_new={"str": "  "}), "record #1 has an empty 'requested_rewrite.target_new.str'"),
    (load_counterfact, cf_with(prompt="{} is a citizen of {}"), "2 '{}' placeholders"),
    (load_counterfact, cf_with(prompt="Hubble is a citizen of"), "subject is not in the prompt"),
    (load_counterfact, cf_with(target_new={"str": "united states"}), "is the true target"),
    (load_zsre, [ZSRE[0], {"subject": "Rome", "src": "Where is Paris?", "alt": "Italy"}],
     "record #1: subject 'Rome' is not in the prompt"),
    (load_zsre, [{"subject": "A", "src": "Who is A?"}], "record #0 has no 'alt'"),
    (load_zsre, [{"subject": "A", "src": "Who is A?", "alt": ""}], "record #0 has an empty 'alt'"),
    (load_zsre, [{"subject": "A", "src": "Who is A?", "alt": "B", "loc": "q"}], "has no 'loc_ans'"),
])
def test_bad_files_give_one_line_errors(tmp_path, loader, data, expected):
    message = one_line_error(loader, write(tmp_path, data))
    assert expected in message and str(tmp_path) in message


def test_missing_file_and_directory(tmp_path):
    assert "not found" in one_line_error(load_counterfact, tmp_path / "nope.json")
    assert "is a directory" in one_line_error(load_zsre, tmp_path)


def test_validate_requests_rules():
    ok = EditRequest("The capital of {} is", "France", "Berlin", "Paris", relation="capital")
    assert validate_requests([ok]) == [ok] and validate_requests(ok) == [ok]
    assert "no edit requests" in one_line_error(validate_requests, [])
    assert "empty" in one_line_error(validate_requests, [EditRequest("The capital of {} is", "France", " ")])
    assert "ends with whitespace" in one_line_error(validate_requests, [EditRequest("Capital of {} is ", "X", "Y")])
    assert "expected answer is empty" in one_line_error(
        validate_requests, [EditRequest("Capital of {} is", "X", "Y", neighborhood_prompts=[("Capital of Z is", "")])])
    # one subject, one question, two answers: a MEMIT batch cannot write both
    clash = EditRequest("The capital city of {} is", "France", "Rome", relation="capital")
    assert "conflicting requests for one subject" in one_line_error(validate_requests, [ok, clash])
    same_prompt = EditRequest("The capital of {} is", "France", "Madrid")
    assert "#0 and #1" in one_line_error(validate_requests, [ok, same_prompt])
    assert len(validate_requests([ok, clash], one_batch=False)) == 2  # measured or edited one by one: fine
    # the same subject in another relation, or the same edit twice, is fine
    other = EditRequest("The language of {} is", "France", "German", "French", relation="language")
    assert len(validate_requests([ok, other, ok])) == 3


class LettersOnly:
    """A tokenizer that keeps letters only: a target of punctuation tokenises to nothing."""

    def __call__(self, text, add_special_tokens=True):
        return SimpleNamespace(input_ids=[ord(c) for c in text if c.isalpha()])


def test_target_that_tokenises_to_nothing():
    tokenizer = LettersOnly()
    good = EditRequest("The capital of {} is", "France", "Berlin", "Paris")
    assert validate_requests([good], tokenizer) == [good]
    bad = EditRequest("The capital of {} is", "France", "!!!", "Paris")
    assert validate_requests([bad]) == [bad]  # without a tokenizer this cannot be seen
    assert "target_new '!!!' tokenises to nothing" in one_line_error(validate_requests, [bad], tokenizer)


def test_target_ids_follow_the_prompt(smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt = "The capital of Argentina is"
    assert target_ids(tok, "Paris", "The capital of France is") == [7042]
    ids = target_ids(tok, "Buenos Aires", prompt)
    assert ids == answer_token_ids(tok, prompt, "Buenos Aires") and len(ids) > 1
    assert tok.decode(ids) == " Buenos Aires"
    assert tok(prompt).input_ids + ids == tok(prompt + " Buenos Aires").input_ids
