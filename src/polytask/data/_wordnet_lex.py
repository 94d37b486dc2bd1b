"""WordNet 3.0 synsets, their usage examples and pointers, and morphy: what the ``wordnet-tags`` and
``wordnet-instruct`` suites are built from (Debian ``wordnet-base``; Miller, "WordNet: A Lexical
Database for English", CACM 1995; file formats wndb(5WN), base forms morphy(7WN)).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from polytask.data._sources import WORDNET_DIR, WORDNET_LEXNAMES, WORDNET_POS, wordnet_records
from polytask.sources import system_file

POS_FILES = ("noun", "verb", "adj", "adv")
WORD = re.compile(r"[A-Za-z0-9]+(?:['-][A-Za-z0-9]+)*|[^\sA-Za-z0-9]")  # words, then single punctuation marks

# morphy(7WN)'s detachment rules: (inflectional ending, base-form ending) per part of speech
_RULES = {
    "noun": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"), ("men", "man"),
             ("ies", "y")),
    "verb": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    "adj": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "adv": (),
}


@dataclass(frozen=True)
class Synset:
    """One synset: ``offset`` within its data file, part of speech (satellites count as adj),
    lexicographer file, lemmas (lower case, words joined by spaces), definition, usage examples and
    the pointer fields as written (four per pointer; read them with :func:`pointers`)."""

    offset: int
    pos: str
    lexname: str
    lemmas: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]
    pointer_fields: tuple[str, ...]


def _lemma(word: str) -> str:
    if word.endswith(")"):  # an adjective marker: galore(ip)
        word = word[:word.rindex("(")]
    return word.replace("_", " ").lower()


@lru_cache(maxsize=2)  # read once per process
def synsets(needed_by: str) -> tuple[Synset, ...]:
    """Every WordNet synset with its lemmas, definition, quoted usage examples and pointers."""
    out = []
    for head, gloss in wordnet_records(needed_by):
        fields = head.split()
        n_words = int(fields[3], 16)
        lemmas = tuple(_lemma(fields[4 + 2 * i]) for i in range(n_words))
        at = 4 + 2 * n_words
        gloss = gloss.strip()
        examples = tuple(e.strip() for e in re.findall(r'"([^"]+)"', gloss))
        out.append(Synset(int(fields[0]), WORDNET_POS[fields[2]], WORDNET_LEXNAMES[int(fields[1])], lemmas,
                          gloss.split('; "')[0].strip(), examples,
                          tuple(fields[at + 1: at + 1 + 4 * int(fields[at])])))
    return tuple(out)


def pointers(synset: Synset, symbol: str) -> list[tuple[int, str, int, int]]:
    """The synset's ``symbol`` pointers (``@`` hypernym, ``!`` antonym, ...) as (target offset, target
    part of speech, source word number, target word number); word numbers are 0 between whole synsets."""
    f = synset.pointer_fields
    return [(int(f[i + 1]), WORDNET_POS[f[i + 2]], int(f[i + 3][:2], 16), int(f[i + 3][2:], 16))
            for i in range(0, len(f), 4) if f[i] == symbol]


@lru_cache(maxsize=2)
def exceptions(needed_by: str) -> dict[str, dict[str, tuple[str, ...]]]:
    """morphy's exception lists: {pos: {inflected form: base forms}} (e.g. verb ``ran`` -> ``run``)."""
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for pos in POS_FILES:
        table: dict[str, tuple[str, ...]] = {}
        path = system_file(WORDNET_DIR, f"{pos}.exc", "wordnet", needed_by)
        for line in path.read_text(errors="replace").splitlines():
            words = line.split()
            if len(words) > 1:
                table[words[0]] = tuple(w.replace("_", " ") for w in words[1:])
        out[pos] = table
    return out


def base_forms(word: str, pos: str, exc: dict[str, dict[str, tuple[str, ...]]]) -> set[str]:
    """The word itself, its exception-list base forms and its detached forms (morphy(7WN), without
    the lexicon check: callers compare the candidates with the lemmas they look for)."""
    word = word.lower()
    forms = {word, *exc[pos].get(word, ())}
    forms.update(word[:-len(end)] + base for end, base in _RULES[pos] if word.endswith(end) and len(word) > len(end))
    return forms


@lru_cache(maxsize=2)
def sense_counts(needed_by: str) -> dict[str, dict[str, tuple[int, int]]]:
    """{pos: {lemma: (tagged sense count, sense count)}} from the index files (tagsense_cnt is the
    number of the lemma's senses tagged in the Princeton semantic concordances)."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for pos in POS_FILES:
        table = {}
        path = system_file(WORDNET_DIR, f"index.{pos}", "wordnet", needed_by)
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("  "):
                continue
            f = line.split()
            n_ptr = int(f[3])
            table[f[0].replace("_", " ")] = (int(f[5 + n_ptr]), int(f[4 + n_ptr]))
        out[pos] = table
    return out
