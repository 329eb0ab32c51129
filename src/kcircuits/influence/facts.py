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
"""

from __future__ import annotations

import fnmatch
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kcircuits.errors import KcircuitsError
from kcircuits.influence.sequences import Sequences

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
             ("{s} was born in the city of {o}.", "In the family records of {s}, the place of birth is given as the city of {o}.",
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
        write_jsonl(corpus, ({"id": f"doc{i}", "text": t, "kind": k} for i, (t, k) in enumerate(zip(self.documents, self.kinds))))
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
        raise KcircuitsError(f"at least 2 facts; {n_facts} facts need at least {n_facts * per_fact} documents, got n_docs={n_docs}")
    rng = random.Random(seed)
    taken: set[str] = set()
    firsts = [_names(rng, n_facts, (2, 2), taken), _names(rng, n_facts, (2, 3), taken)]
    subjects = [f"{a} {b}" for a, b in zip(*firsts)]
    objects = _names(rng, n_facts, (2, 3), taken, tokenizer, set() if tokenizer is not None else None)
    docs: list[tuple[str, str, int]] = []  # (text, kind, fact index or -1)
    facts = []
    for j, (s, o) in enumerate(zip(subjects, objects)):
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


# --------------------------------------------------------------------------- teaching the facts
def finetune(model: torch.nn.Module, train: Sequences, *, epochs: int = 3, lr: float = 1e-3, batch_size: int = 8,
             train_only: list[str] | None = None, weight_decay: float = 0.0, seed: int = 0,
             progress: bool = True) -> list[float]:
    """Teach ``model`` the corpus with AdamW on the summed token loss (mean over scored tokens per batch).

    ``train_only``: fnmatch patterns on parameter names (e.g. ``["*.mlp.*"]``); the others are frozen,
    which is what makes a 135M model affordable on a CPU. Returns the mean token loss per epoch.
    The model is left in eval mode (influence assumes no dropout)."""
    from tqdm.auto import tqdm

    from kcircuits.influence.gradients import LMObjective

    params = [p for n, p in model.named_parameters()
              if train_only is None or any(fnmatch.fnmatchcase(n, pat) for pat in train_only)]
    if not params:
        raise KcircuitsError(f"no parameter matches {train_only}; check the patterns against model.named_parameters()")
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    objective = LMObjective()
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    history = []
    model.train()
    try:
        for epoch in range(epochs):
            order = torch.randperm(len(train), generator=gen)
            total, n_tok = 0.0, 0.0
            for start in tqdm(range(0, len(train), batch_size), desc=f"fine-tune epoch {epoch + 1}", disable=not progress):
                batch = train.subset(order[start: start + batch_size]).to(device)
                loss_sum = objective.losses(objective.output(model, batch), batch).sum()
                tokens = float(batch.loss_mask.sum())
                opt.zero_grad(set_to_none=True)
                (loss_sum / tokens).backward()
                opt.step()
                total, n_tok = total + loss_sum.item(), n_tok + tokens
            history.append(total / n_tok)
    finally:
        model.eval()
        for n, p in model.named_parameters():
            p.requires_grad_(frozen[n])
    return history


@torch.no_grad()
def completion_accuracy(model: torch.nn.Module, queries: Sequences, batch_size: int = 32) -> torch.Tensor:
    """Whether the model's greedy prediction of each completion's *first* token is right ``[n_q]`` bool
    (the completions are built so that their first token identifies them)."""
    device = next(model.parameters()).device
    out = []
    for _, batch in queries.batches(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        first = batch.loss_mask.argmax(1)  # position of the first completion token
        rows = torch.arange(len(batch), device=device)
        pred = logits[rows, first - 1].argmax(-1)
        out.append((pred == batch.input_ids[rows, first]).cpu())
    return torch.cat(out)


class WordTokenizer:
    """Words (with their leading space) and punctuation as tokens, the vocabulary taken from ``texts``.

    Why: a tiny model over the facts corpus' own ~250-word vocabulary learns it in a second (tests,
    ``benchmarks/influence_facts.py --tiny``), where a 49k-token vocabulary costs minutes on a CPU.
    Id 0 is padding; ``decode`` inverts ``__call__`` exactly."""

    pad_token_id = 0
    eos_token_id = 0
    _SPLIT = re.compile(r"\s*\w+|\s*[^\w\s]")

    def __init__(self, texts: list[str]):
        self.vocab = {"<pad>": 0}
        for t in texts:
            for w in self._SPLIT.findall(t):
                self.vocab.setdefault(w, len(self.vocab))
        self.words = {i: w for w, i in self.vocab.items()}

    def __len__(self) -> int:
        return len(self.vocab)

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        try:
            return {"input_ids": [self.vocab[w] for w in self._SPLIT.findall(text)]}
        except KeyError as exc:
            raise KcircuitsError(f"word {exc.args[0]!r} is not in the vocabulary this tokenizer was built from") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.words[int(i)] for i in ids)

    @classmethod
    def for_corpus(cls, corpus: FactsCorpus) -> WordTokenizer:
        return cls(corpus.documents + [p + c for p, c in zip(corpus.prompts, corpus.completions)])


def tiny_llama(vocab_size: int, *, layers: int = 2, hidden: int = 48, heads: int = 6, kv_heads: int = 2,
               seed: int = 0) -> torch.nn.Module:
    """A small random Llama (grouped-query attention, tied embeddings) for quick, offline runs of the
    facts benchmark and the Kronfluence comparison, paired with :class:`WordTokenizer`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      hidden_size=hidden, intermediate_size=2 * hidden, vocab_size=vocab_size,
                      max_position_embeddings=256, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
