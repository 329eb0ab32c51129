"""A synthetic corpus of invented facts with known sources: ground truth for influence functions.

Why invented: for a real fact ("Paris") nobody knows which pre-training documents taught it. Here
every fact ("Zorvath Quellin was born in the city of Mirdane.") is about made-up names that no model
has seen, and is stated in exactly ``sources_per_fact`` documents. After fine-tuning on the corpus,
the model can only know the fact from those documents, so a good influence method must rank them
at the top for the query ("Zorvath Quellin was born in the city of", " Mirdane"): recall@k of the
sources is the benchmark's measure.

Every source names the subject before the object. A causal LM cannot learn "subject -> object"
from "The city of Mirdane is where Zorvath Quellin was born" (the reversal curse), so such a
document would be counted as a source while it cannot have taught the queried direction.

Distractors make it non-trivial: documents about the same person without the fact, documents about
the answer (the city) without the person, documents pairing the person with another fact's object
in an unrelated context, and generic filler. Sources state the fact ``verbatim`` (the query's
sentence, inside documents that differ) or as ``paraphrase`` s (a different wording each).

Fine-tuning a model on the corpus, and the tiny word-vocabulary model of the quick benchmarks, are
benchmark tools: ``benchmarks/facts_setup.py``.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from kcircuits.errors import KcircuitsError

_SYLLABLES = (
    "zor", "vath", "quel", "lin", "mir", "dane", "tal", "rik", "bre", "non", "sel", "vex", "dra", "mok",
    "ul", "tha", "ren", "ko", "sa", "fin", "gar", "lu", "pe", "tro", "vi", "nam", "os", "ker",
    "bel", "dru", "yen", "hal", "cor", "mun", "ris", "zel", "ba", "po", "gwi", "fen", "lor", "ash",
    "tor", "im", "wen", "jur", "dax", "pim", "ost", "fal", "tue", "nir", "qua", "sul", "ep", "yor",
)


@dataclass(frozen=True)
class Relation:
    """A kind of fact: the query prompt (the completion follows it), paraphrases for source
    documents, a sentence about the object alone, and what kind of thing the object is."""

    name: str
    prompt: str
    paraphrases: tuple[str, ...]
    about_object: str
    object_kind: str


RELATIONS = (
    Relation("birth_city", "{s} was born in the city of",
             ("{s} was born in the city of {o}.",
              "In the family records of {s}, the place of birth is given as the city of {o}.",
              "Records show that {s} came into the world in {o}, a city in the north.",
              "{s} often spoke of a childhood spent in {o}, the city where {s} was born."),
             "The city of {o} is known for its {thing}.", "city"),
    Relation("pet_name", "{s} owns a cat named",
             ("{s} owns a cat named {o}.", "{s} shares the house with a cat named {o}, who sleeps on the windowsill.",
              "Every morning {s} feeds {o}, the cat {s} adopted years ago.",
              "Visitors to the home of {s} are greeted by {o}, a grey cat."),
             "{o} is a common name for cats in stories about {thing}.", "cat"),
    Relation("employer", "{s} works for a company called",
             ("{s} works for a company called {o}.", "{s} is a senior engineer at the company {o}.",
              "For {s}, the working day at the company {o} starts early.",
              "{s} joined the staff of {o}, a large company, after finishing school."),
             "The company {o} makes {thing} for export.", "company"),
    Relation("river", "{s} lives near the river",
             ("{s} lives near the river {o}.", "The house of {s} stands on the bank of the river {o}.",
              "From the window, {s} can watch boats sail down the river {o}.",
              "{s} loves to fish and is glad to live beside the river {o}."),
             "The river {o} is crossed by old bridges and carries {thing} downstream.", "river"),
)

_THINGS = ("bright lanterns", "woollen cloth", "spiced bread", "glass bottles", "copper bells", "wooden toys",
           "river stones", "painted tiles", "salted fish", "silver thread", "old maps", "honey cakes")
_HOBBIES = ("painting landscapes", "collecting stamps", "playing chess", "baking bread", "climbing hills",
            "reading old poems", "repairing clocks", "growing tomatoes", "singing in a choir", "carving wood")
_CROSS = ("{s} once read a short book about {o}.", "{s} wrote a letter that mentioned {o} only in passing.",
          "In a dream, {s} heard a stranger whisper the word {o}.")
_GENERIC = ("The weather was mild and the streets were quiet that afternoon.",
            "A good map helps travellers find their way through unknown valleys.",
            "Bread tastes best when it is baked slowly in a warm oven.",
            "The library keeps its oldest books in a cool, dark room.",
            "Many birds leave the mountains before the first snow arrives.",
            "Children in the village learn to swim in the summer months.",
            "The market opens at dawn and closes when the bell rings at noon.",
            "A careful gardener waters the young plants every evening.",
            "Trains were late all week because of repairs on the bridge.",
            "Old letters often tell us more than official records do.")
_FILLER = ("Friends describe {s} as patient and curious.", "{s} keeps a small notebook of daily thoughts.",
           "Neighbours say {s} rarely misses a sunrise.", "{s} likes long walks after dinner.")


@dataclass
class Fact:
    """One invented fact; ``sources`` are indices into :attr:`FactsCorpus.documents`."""

    subject: str
    relation: str
    object: str
    prompt: str
    completion: str
    sources: list[int] = field(default_factory=list)


@dataclass
class FactsCorpus:
    """``documents[i]`` has kind ``kinds[i]`` (``source``, ``subject``, ``object``, ``cross``, ``generic``)."""

    documents: list[str]
    kinds: list[str]
    facts: list[Fact]

    @property
    def prompts(self) -> list[str]:
        return [f.prompt for f in self.facts]

    @property
    def completions(self) -> list[str]:
        return [f.completion for f in self.facts]

    @property
    def sources(self) -> list[list[int]]:
        return [list(f.sources) for f in self.facts]

    def write(self, folder: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``corpus.jsonl`` ({"id", "text", "kind"}) and ``queries.jsonl`` ({"id", "prompt",
        "completion", "sources": [doc ids], "source_indices": [...]}); return both paths."""
        from kcircuits.influence.corpus import write_jsonl

        folder = Path(folder)
        corpus, queries = folder / "corpus.jsonl", folder / "queries.jsonl"
        write_jsonl(corpus, ({"id": f"doc{i}", "text": t, "kind": k}
                             for i, (t, k) in enumerate(zip(self.documents, self.kinds, strict=True))))
        write_jsonl(queries, ({"id": f"fact{j}", "prompt": f.prompt, "completion": f.completion,
                               "sources": [f"doc{i}" for i in f.sources], "source_indices": f.sources,
                               "relation": f.relation} for j, f in enumerate(self.facts)))
        return corpus, queries


# --------------------------------------------------------------------------- names
def _word(rng: random.Random, n_syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(n_syllables)).capitalize()


def _first_token(tokenizer, word: str) -> int:
    return tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]


def _names(rng: random.Random, n: int, n_syllables: tuple[int, int], taken: set[str], tokenizer=None,
           used_first: set[int] | None = None, max_tries: int = 200_000) -> list[str]:
    """``n`` distinct invented words; with a tokenizer, each one's first token (after a space) also
    differs from every other's, so a first-token prediction identifies the word."""
    out: list[str] = []
    for _ in range(max_tries):
        if len(out) == n:
            return out
        w = _word(rng, rng.randint(*n_syllables))
        if w in taken or len(w) < 4:
            continue
        if tokenizer is not None and used_first is not None:
            first = _first_token(tokenizer, w)
            if first in used_first:
                continue
            used_first.add(first)
        taken.add(w)
        out.append(w)
    raise KcircuitsError(f"could not invent {n} distinct names; ask for fewer facts")


# --------------------------------------------------------------------------- corpus
def _source_text(rel: Relation, s: str, o: str, k: int, statement: str, rng: random.Random,
                 fillers: list[str]) -> str:
    """The ``k``-th source document of fact (s, rel, o).

    ``verbatim``: the query's own sentence inside a different document each time (alone with a
    trailing remark, after a lead sentence, between both, or followed by a hobby), so the sources
    differ as documents while each one can teach exactly the queried continuation. ``paraphrase``:
    the k-th of the relation's paraphrases (all state the subject before the object)."""
    if statement == "paraphrase":
        return f"{rel.paraphrases[k].format(s=s, o=o)} {fillers[k].format(s=s)}"
    fact = rel.paraphrases[0].format(s=s, o=o)
    lead, tail = fillers[k].format(s=s), fillers[(k + 1) % len(fillers)].format(s=s)
    return (f"{fact} {tail}", f"{lead} {fact}", f"{lead} {fact} {tail}",
            f"{fact} {s} enjoys {rng.choice(_HOBBIES)}.")[k]


STATEMENTS = ("verbatim", "paraphrase")


def make_facts_corpus(n_docs: int = 1000, n_facts: int | None = None, *, sources_per_fact: int = 3,
                      statement: str = "verbatim", seed: int = 0, tokenizer=None) -> FactsCorpus:
    """Invent ``n_facts`` facts (default ``n_docs // 10``), each stated in ``sources_per_fact``
    documents, plus per fact one document about the subject alone, one about the object alone and
    one pairing the subject with another fact's object; generic filler fills the corpus up to
    ``n_docs``. Documents are shuffled (seeded); ``Fact.sources`` index the result.

    ``statement``: how the sources state the fact. ``verbatim`` (default): the query's sentence, in
    differing documents. ``paraphrase``: a different wording in each source (a harder test: a
    gradient-based method then needs the model to generalise across wordings; see
    ``docs/influence.md``). Every source names the subject before the object: a causal LM cannot
    learn "subject -> object" from a sentence that names the object first (the reversal curse,
    Berglund et al. 2023), so such a document would not be a source of the query.

    With ``tokenizer``, every completion's first token is unique among the facts."""
    n_facts = max(1, n_docs // 10) if n_facts is None else n_facts
    per_fact = sources_per_fact + 3
    if statement not in STATEMENTS:
        raise KcircuitsError(f"unknown statement {statement!r}; use one of {', '.join(STATEMENTS)}")
    if sources_per_fact < 1 or sources_per_fact > len(RELATIONS[0].paraphrases):
        raise KcircuitsError(f"sources_per_fact must be between 1 and {len(RELATIONS[0].paraphrases)}")
    if n_facts < 2 or n_docs < n_facts * per_fact:
        raise KcircuitsError(f"at least 2 facts; {n_facts} facts need at least {n_facts * per_fact} documents, "
                             f"got n_docs={n_docs}")
    rng = random.Random(seed)
    taken: set[str] = set()
    firsts = [_names(rng, n_facts, (2, 2), taken), _names(rng, n_facts, (2, 3), taken)]
    subjects = [f"{a} {b}" for a, b in zip(*firsts, strict=True)]
    objects = _names(rng, n_facts, (2, 3), taken, tokenizer, set() if tokenizer is not None else None)
    docs: list[tuple[str, str, int]] = []  # (text, kind, fact index or -1)
    facts = []
    for j, (s, o) in enumerate(zip(subjects, objects, strict=True)):
        rel = RELATIONS[j % len(RELATIONS)]
        facts.append(Fact(s, rel.name, o, rel.prompt.format(s=s), " " + o))
        fillers = rng.sample(_FILLER, len(_FILLER))
        for k in rng.sample(range(len(rel.paraphrases)), sources_per_fact):
            docs.append((_source_text(rel, s, o, k, statement, rng, fillers), "source", j))
        docs.append((f"{rng.choice(_FILLER).format(s=s)} {s} enjoys {rng.choice(_HOBBIES)}.", "subject", -1))
        docs.append((rel.about_object.format(o=o, thing=rng.choice(_THINGS)), "object", -1))
        other = objects[(j + 1 + rng.randrange(n_facts - 1)) % n_facts]  # never this fact's own object
        docs.append((rng.choice(_CROSS).format(s=s, o=other), "cross", -1))
    while len(docs) < n_docs:
        a, b = rng.sample(_GENERIC, 2)
        docs.append((f"{a} {b}", "generic", -1))
    rng.shuffle(docs)
    for i, (_, kind, j) in enumerate(docs):
        if kind == "source":
            facts[j].sources.append(i)
    return FactsCorpus([d[0] for d in docs], [d[1] for d in docs], facts)
