"""Three small synthetic text corpora with distinct styles (general prose, legal, chat).

Generated from word lists with a seeded RNG, so the example needs no data download and every run
writes the same text.
"""
from __future__ import annotations

import random

_NOUNS = "river city garden lantern mountain library harbor forest engine window market bridge".split()
_ADJS = "quiet bright old narrow golden distant busy small cold green".split()
_VERBS = "crosses watches follows builds opens finds carries remembers".split()
_PARTIES = "Licensee Licensor Tenant Landlord Supplier Purchaser Contractor Client".split()
_DUTIES = ["pay all fees", "deliver the goods", "maintain the premises", "keep the information confidential",
           "provide written notice", "indemnify the other party", "return all materials", "comply with the law"]
_EVENTS = "termination delivery signature notice breach renewal invoice closing".split()
_TOPICS = "the weather|a recipe for soup|the train schedule|a good book|my password|the meeting time".split("|")
_REPLIES = ["Sure, here is what I know.", "Happy to help with that.", "Let me check for you.",
            "Here is a short answer.", "Good question, thank you."]


def general(num_sentences: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(
        f"The {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the {rng.choice(_ADJS)} "
        f"{rng.choice(_NOUNS)}." for _ in range(num_sentences))


def legal(num_sentences: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    return " ".join(
        f"The {rng.choice(_PARTIES)} shall {rng.choice(_DUTIES)} within {rng.randint(2, 90)} days of the "
        f"{rng.choice(_EVENTS)}." for _ in range(num_sentences))


def chat(num_turns: int, seed: int = 2) -> str:
    rng = random.Random(seed)
    return "\n".join(
        f"User: Can you tell me about {rng.choice(_TOPICS)}?\nAssistant: {rng.choice(_REPLIES)}"
        for _ in range(num_turns))
