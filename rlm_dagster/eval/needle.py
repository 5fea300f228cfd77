"""A needle: one fact hidden in N office notes, said in other words than the question's.

    >>> task = needle_task(seed=3, rows=300)
    >>> task.kind, len(task.tables["notes"]), len(str(task.truth)) == 4
    ('integer', 300, True)

The note holding the fact paraphrases its subject ("the room where the network racks live"
for the server room), while distractor notes use the question's own words with other
four-digit numbers nearby (a ticket number about the server room's air conditioning, the
old code, the bike cage's keypad). A rule that greps for the subject or for "code" and a
number picks a distractor.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime

import pandas as pd

from rlm_dagster.eval.task import Task
from rlm_dagster.eval.text import fill, person, pick, slots, timestamp


@dataclass(frozen=True)
class Target:
    question: str
    needles: tuple[str, ...]
    distractors: tuple[str, ...]
    keywords: tuple[str, ...]  # what a keyword rule would search for


TARGETS: dict[str, Target] = {
    "server_room": Target(
        "One of these office notes gives the new keypad code for the server room door. "
        "What is the new code? Answer with the digits only.",
        (
            "Heads-up: the door to the room where the network racks live now opens with "
            "{code}; the old combination was retired this morning.",
            "New combo for the comms closet (the one full of blinking machines): {code}. "
            "Please don't write it on a sticky note.",
            "If you need to get at the racks, punch {code} into the keypad. IT changed it "
            "after the audit.",
        ),
        (
            "Server room AC is making that rattling noise again, ticket {inv} is open with "
            "facilities.",
            "The server room tour for the {team} team starts at {time}, meet at room {roomno}.",
            "Bike cage keypad is now {code2}, same as the side gate.",
            "Old server room code {code3} stops working on {weekday}; IT will share the new "
            "one separately.",
            "Keypad on the stationery cupboard was reset to {code4}.",
        ),
        ("server room", "keypad", "code"),
    ),
    "loading_dock": Target(
        "One note tells delivery drivers the new code for the gate where trucks unload. "
        "What is that code? Answer with the digits only.",
        (
            "Drivers: from today the rear entrance where the lorries back in takes {code}.",
            "Couriers bringing pallets round the back need {code} for the shutter now, please "
            "pass it on.",
            "The goods-in gate got a new PIN: {code}. Front reception does not need it.",
        ),
        (
            "Loading dock lights in bay {n} are out, please be careful after dark.",
            "Delivery from {company} (order {inv}) expected at the loading dock around {time}.",
            "Visitor gate at the front uses code {code2} after 6pm.",
            "The code for the staff car park barrier is {code3} this month.",
            "Truck drivers asked for the wifi code again; it's on the whiteboard, not {code4}.",
        ),
        ("loading dock", "gate", "code", "truck"),
    ),
    "petty_cash": Target(
        "One note gives the new combination of the petty cash box in the finance office. "
        "What is it? Answer with the digits only.",
        (
            "Finance: the little money box in accounts now opens with {code}, ask {person} "
            "before taking anything.",
            "The tin with the float in the accounts room was changed to {code} after the audit.",
            "If you need float for the team lunch, the dial on the accounts office box is "
            "{code} now.",
        ),
        (
            "Petty cash receipts for {month} need to reach finance by {weekday}, invoice "
            "{inv} included.",
            "Locker {n} combination is {code2}, it's the spare one for visitors.",
            "The finance office is closed {weekday} afternoon for the quarter-end, extension "
            "{ext} for urgent things.",
            "Safe in reception: combination {code3} is only for the night guard.",
            "Old petty cash combination {code4} no longer works.",
        ),
        ("petty cash", "finance", "combination", "code"),
    ),
}

FILLER = (
    "Lunch order for {weekday} goes to {person} by 11, we're doing {food}.",
    "Reminder: the {room} meeting room is booked all afternoon for the {team} offsite.",
    "Printer on floor {floor} is jammed again, I've put a sign on it.",
    "Parking spots {n} and {n2} are reserved for visitors this week.",
    "Whoever left the {food} in the fridge: it is developing a personality.",
    "Fire drill on {weekday} at {time}, please don't use the lifts.",
    "The plants by the window need water while {person} is on leave.",
    "Package for {person} arrived at reception, it's heavy.",
    "{person} is out until {weekday}; ping {person2} for anything urgent.",
    "Cleaners come at {time} on {weekday}, please clear your desks.",
    "The projector in {room} needs an HDMI adapter, there's one in the drawer.",
    "Coffee machine descaled, it should stop making that noise now.",
    "Team photo on {weekday} at {time} in the lobby.",
    "Lost: a blue water bottle with stickers, last seen in {room}.",
    "New starter {person} joins the {team} team on Monday, say hi!",
    "The heating on floor {floor} is stuck on high, facilities know.",
    "Timesheets are due {weekday} by {time}.",
    "Extension for the front desk is now {ext}.",
    "Room {roomno} is being repainted, use {room} instead.",
    "Invoice {inv} from the catering company is on my desk if anyone needs it.",
    "The blinds in {room} are broken again.",
    "Recycling collection moved to {weekday}.",
    "Who borrowed the long extension cable from the {team} corner?",
    "Cake in the kitchen for {person}'s birthday, help yourselves.",
)
CHANNELS = ("#office", "#facilities", "#general", "#it-help", "#random")
START = datetime(2026, 9, 1)


def _codes(rng: random.Random, n: int) -> list[int]:
    return rng.sample(range(1_000, 10_000), n)


def needle_task(seed: int, rows: int, *, index: int = 0, group: str = "") -> Task:
    """``rows`` notes; one holds the answer, about five use the question's words."""
    rng = random.Random(f"needle:{seed}:{rows}:{index}")
    name = pick(rng, list(TARGETS))
    target = TARGETS[name]
    code, *others = _codes(rng, 4)
    texts = []
    for _ in range(rows - 1 - len(target.distractors)):
        texts.append(fill(pick(rng, FILLER), slots(rng)))
    for template in target.distractors:
        values = slots(rng)
        values.update(zip(("code2", "code3", "code4"), others, strict=True))
        texts.append(fill(template, values))
    rng.shuffle(texts)
    position = rng.randrange(len(texts) + 1)
    values = slots(rng) | {"code": code}
    texts.insert(position, fill(pick(rng, target.needles), values))
    notes = pd.DataFrame(
        {
            "note_id": range(1, rows + 1),
            "posted_at": sorted(timestamp(rng, START, 60) for _ in range(rows)),
            "author": [person(rng) for _ in range(rows)],
            "channel": [pick(rng, CHANNELS) for _ in range(rows)],
            "text": texts,
        }
    )
    return Task(
        id=f"needle-{index + 1}",
        family="needle",
        group=group or "needle",
        question=target.question,
        tables={"notes": notes},
        kind="integer",
        truth=code,
        params={"seed": seed, "rows": rows, "target": name, "note_id": position + 1},
    )
