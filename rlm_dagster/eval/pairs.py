"""Pairs: posts on a neighbourhood give-away board that relate by meaning.

    >>> task = pairs_task(seed=2, rows=40)
    >>> task.kind, all(a != b for a, b in task.truth)
    ('pairs', True)

An offer ("our pushchair is up for grabs") and a request ("baby due in May, anything to wheel
her around in?") for the same kind of item form a pair; the answer is every such pair, scored
by F1 (OOLONG-Pairs asks the same of users with related labels). Offers and requests name
their item in different words, and the board also holds thank-you notes, lost-and-found posts
and requests that name an item only to rule it out ("a desk chair, not a desk"): matching
shared nouns gets pairs wrong both ways.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime

import pandas as pd

from rlm_dagster.eval.task import Task
from rlm_dagster.eval.text import FIRST_NAMES, fill, pick, slots, timestamp


@dataclass(frozen=True)
class Item:
    offers: tuple[str, ...]
    requests: tuple[str, ...]
    keywords: tuple[str, ...]  # what a keyword rule would match on


ITEMS: dict[str, Item] = {
    "bike": Item(
        (
            "Giving away my old road bike, needs new brake pads but rides fine.",
            "Two-wheeler in the shed, 21 gears, free to anyone who'll use it.",
            "Free: a city bicycle with a basket, my daughter outgrew it.",
        ),
        (
            "Looking for something I can pedal to work on, nothing fancy.",
            "My son wants to ride to school, anything with two wheels and working brakes?",
            "Does anyone have a cycle they no longer use? Happy to collect.",
        ),
        ("bike", "bicycle", "cycle"),
    ),
    "pram": Item(
        (
            "Our pushchair is up for grabs, folds flat, rain cover included.",
            "Free pram, used for two kids, wheels still good.",
            "Passing on the buggy we used for our twins' first year.",
        ),
        (
            "Baby due in May, we'd love something to wheel her around in.",
            "Anyone have a stroller gathering dust? Our little one arrives next month.",
            "Grandson visiting for the summer, need a way to take a toddler on walks.",
        ),
        ("pram", "pushchair", "stroller", "buggy"),
    ),
    "sofa": Item(
        (
            "Three-seater couch free to collect, grey fabric, one cushion slightly faded.",
            "Leather settee, a few scuffs, yours if you can carry it down two floors.",
            "Free sofa bed, the mattress part is nearly new.",
        ),
        (
            "Just moved into an empty flat, anything to sit on in the living room would help.",
            "Looking for a couch for our student house, can pick up with a van.",
            "Our old settee collapsed, does anyone have a spare one?",
        ),
        ("sofa", "couch", "settee"),
    ),
    "desk": Item(
        (
            "Writing table with two drawers, free, must go by {weekday}.",
            "Giving away an IKEA desk, easy to take apart.",
            "Standing desk (manual crank) free to a good home.",
        ),
        (
            "Working from home now and my laptop lives on the ironing board, need a proper "
            "surface to work at.",
            "Does anyone have a desk for a teenager's bedroom?",
            "Need a table to put a computer on for my mum's study.",
        ),
        ("desk", "table"),
    ),
    "mower": Item(
        (
            "Petrol grass cutter, starts first pull, we've paved the garden.",
            "Free lawnmower, electric, cable is a bit short.",
            "Push mower (no engine) free, blades sharpened last spring.",
        ),
        (
            "Our lawn is knee-high, could anyone give us something to cut it with?",
            "Looking for a mower, any kind, for a small back garden.",
            "New house came with a garden and no tools, the grass needs taming.",
        ),
        ("mower", "lawnmower", "grass"),
    ),
    "sewing": Item(
        (
            "Singer sewing machine with spare bobbins, free.",
            "Giving away my old stitching machine, works, needs a new foot pedal cable.",
            "Free machine for dressmaking, comes with a box of threads.",
        ),
        (
            "Want to learn to hem my own trousers, anyone have a sewing machine they don't use?",
            "Looking for something to run up curtains with, a basic machine would do.",
            "My daughter is into making clothes, anything to stitch with would be great.",
        ),
        ("sewing", "stitch"),
    ),
    "guitar": Item(
        (
            "Acoustic six-string with a soft case, a bit scratched.",
            "Free guitar, needs new strings, otherwise fine.",
            "Electric guitar and a tiny practice amp, both free.",
        ),
        (
            "My nephew wants to learn to strum, looking for a cheap starter six-string.",
            "Anyone have a guitar lying around? Even a battered one.",
            "Looking for an instrument to learn chords on, happy to restring it.",
        ),
        ("guitar", "strings", "six-string"),
    ),
    "tent": Item(
        (
            "Two-person tent, all pegs there, used twice.",
            "Free family tent (sleeps 6), one pole is taped but holds.",
            "Giving away a pop-up shelter for camping, packs into a round bag.",
        ),
        (
            "Going to a festival in July and need somewhere to sleep outdoors for two.",
            "Anyone have a tent we could have for a scout trip?",
            "Looking for camping gear, mainly something to sleep under.",
        ),
        ("tent", "camping"),
    ),
}

DISTRACTORS = (
    "Thanks to the lovely neighbour who gave us the pushchair last week!",
    "Found a bike lock on {street}, message me if it's yours.",
    "Looking for a desk chair, not a desk, I have one already.",
    "Has anyone seen a grey cat near {street}? Answers to Biscuit.",
    "Street party on {weekday}, bring a chair and something to share.",
    "Please stop leaving sofas on the pavement, the council charges us for pickup.",
    "The guitar lessons at the community hall moved to {weekday}.",
    "Someone's car alarm went off all night on {street}, anyone know whose it is?",
    "Thank you to whoever returned my tent pegs!",
    "Not looking for a bike any more, thanks everyone who offered.",
    "Does anyone know a good mower repair shop nearby? Ours is broken but we'll keep it.",
    "Free firewood, you collect, {street}.",
)
ENDINGS = ("", " Pick up from {street}.", " DM me.", " Can collect {weekday}.", " Thanks!")
START = datetime(2026, 10, 1)
QUESTION = (
    "The table `posts` holds posts from a neighbourhood give-away board. Find every pair of "
    "posts in which one post offers an item and the other post asks for that kind of item. "
    "Answer with one pair per line, as offer_post_id-request_post_id."
)


def pairs_task(seed: int, rows: int, *, index: int = 0) -> Task:
    """``rows`` posts: offers and requests of a few item kinds, plus distractors."""
    rng = random.Random(f"pairs:{seed}:{rows}:{index}")
    kinds = list(ITEMS)
    posts: list[tuple[str, str | None, str]] = []  # (role, item kind, text)
    n_distractors = max(2, rows // 5)
    while len(posts) < rows - n_distractors:
        kind = pick(rng, kinds)
        role = pick(rng, ("offer", "request"))
        bank = ITEMS[kind].offers if role == "offer" else ITEMS[kind].requests
        posts.append((role, kind, pick(rng, bank) + pick(rng, ENDINGS)))
    while len(posts) < rows:
        posts.append(("other", None, pick(rng, DISTRACTORS)))
    rng.shuffle(posts)
    texts = [fill(text, slots(rng)) for _, _, text in posts]
    ids = range(1, rows + 1)
    truth = frozenset(
        (o, r)
        for o, (o_role, o_kind, _) in zip(ids, posts, strict=True)
        for r, (r_role, r_kind, _) in zip(ids, posts, strict=True)
        if o_role == "offer" and r_role == "request" and o_kind == r_kind
    )
    frame = pd.DataFrame(
        {
            "post_id": list(ids),
            "posted_at": sorted(timestamp(rng, START, 45) for _ in ids),
            "member": [pick(rng, FIRST_NAMES) for _ in ids],
            "text": texts,
        }
    )
    return Task(
        id=f"pairs-{index + 1}",
        family="pairs",
        question=QUESTION,
        tables={"posts": frame},
        kind="pairs",
        truth=truth,
        params={"seed": seed, "rows": rows, "pairs": len(truth)},
    )
