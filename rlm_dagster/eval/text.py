"""Shared vocabulary for the generated tasks: people, companies, dates and slot filling.

    >>> import random
    >>> fill("{person} on the {team} team", slots(random.Random(1)))
    'Nadia on the ops team'

Everything is synthetic and drawn from a seeded :class:`random.Random`, so a task is the same
on every machine for the same seed.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

T = TypeVar("T")

FIRST_NAMES = (
    "Priya", "Marcus", "Sofia", "Jonas", "Aisha", "Tom", "Mei", "Lukas", "Chloé", "Diego",
    "Fatima", "Olu", "Hannah", "Raj", "Ingrid", "Kenji", "Zoë", "Mateo", "Nadia", "Sam",
    "Elena", "Björn", "Grace", "Omar", "Yuki", "Tariq", "Lena", "Ravi", "Camille", "Dan",
)  # fmt: skip
LAST_NAMES = (
    "Raman", "Okafor", "Lindqvist", "Müller", "Chen", "García", "O'Brien", "Nakamura",
    "Kowalski", "Dubois", "Haddad", "Singh", "Andersen", "Rossi", "Novak", "Mensah",
)  # fmt: skip
COMPANY_HEADS = (
    "Northwind", "Bluefin", "Redwood", "Ironclad", "Silverline", "Brightpath", "Keystone",
    "Harbor", "Summit", "Cobalt", "Evergreen", "Granite", "Lumen", "Pioneer", "Quarry",
    "Riverbend", "Sable", "Tidewater", "Vantage", "Willow", "Alder", "Beacon", "Ember",
)  # fmt: skip
COMPANY_TAILS = (
    "Analytics", "Logistics", "Health", "Robotics", "Foods", "Labs", "Capital", "Media",
    "Energy", "Software", "Freight", "Systems", "Retail", "Studios", "Insurance", "Dental",
)  # fmt: skip
COUNTRIES = ("US", "GB", "DE", "FR", "CA", "NL", "AU", "IN", "SE", "ES", "BR", "JP")
PLANS = ("free", "starter", "pro", "enterprise")
TEAMS = ("finance", "ops", "marketing", "sales", "data", "support", "HR", "product")
REPORTS = ("Weekly Revenue", "Churn Cohorts", "Pipeline", "Exec KPIs", "Funnel", "Inventory")
TOOLS = ("Snowflake", "BigQuery", "Salesforce", "HubSpot", "Redshift", "Google Sheets")
COMPETITORS = ("Datavane", "Quantly", "Lumora BI", "Metricsy", "Chartwell")
IDPS = ("Okta", "Azure AD", "Google Workspace", "OneLogin")
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)  # fmt: skip
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
ROOMS = ("Atlas", "Birch", "Comet", "Delta", "Elm", "Fjord")
FOODS = ("curry", "sushi", "pizza", "falafel wraps", "noodles", "salads")
STREETS = ("Elm St", "Mill Lane", "Church Rd", "Harbour View", "Oak Avenue", "Station Rd")


def pick(rng: random.Random, items: Sequence[T]) -> T:
    """One item of ``items``."""
    return items[rng.randrange(len(items))]


def person(rng: random.Random) -> str:
    return f"{pick(rng, FIRST_NAMES)} {pick(rng, LAST_NAMES)}"


def company(rng: random.Random) -> str:
    return f"{pick(rng, COMPANY_HEADS)} {pick(rng, COMPANY_TAILS)}"


def timestamp(rng: random.Random, start: datetime, days: int) -> str:
    """A time within ``days`` after ``start``, as ``YYYY-MM-DD HH:MM:SS``."""
    moment = start + timedelta(seconds=rng.randrange(days * 86_400))
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def slots(rng: random.Random) -> dict[str, Any]:
    """Values for every ``{slot}`` a phrase may use; unused ones are ignored."""
    amount = rng.randrange(300, 9_000)
    return {
        "person": pick(rng, FIRST_NAMES),
        "person2": pick(rng, FIRST_NAMES),
        "team": pick(rng, TEAMS),
        "report": pick(rng, REPORTS),
        "tool": pick(rng, TOOLS),
        "competitor": pick(rng, COMPETITORS),
        "idp": pick(rng, IDPS),
        "month": pick(rng, MONTHS),
        "weekday": pick(rng, WEEKDAYS),
        "room": pick(rng, ROOMS),
        "food": pick(rng, FOODS),
        "street": pick(rng, STREETS),
        "company": company(rng),
        "amount": f"{amount:,}",
        "amount2": f"{amount + rng.randrange(100, 2_000):,}",
        "seats": rng.randrange(4, 400),
        "extra": rng.randrange(2, 30),
        "secs": rng.randrange(20, 120),
        "day": rng.randrange(2, 28),
        "n": rng.randrange(2, 60),
        "n2": rng.randrange(61, 99),
        "floor": rng.randrange(1, 7),
        "ref": rng.randrange(10_000, 99_999),
        "inv": rng.randrange(1_000, 9_999),
        "ext": rng.randrange(1_000, 9_999),
        "roomno": rng.randrange(100, 699),
        "time": f"{rng.randrange(8, 18)}:{pick(rng, ('00', '15', '30', '45'))}",
        "word": "".join(rng.choice(string.ascii_lowercase) for _ in range(6)),
    }


def fill(template: str, values: dict[str, Any]) -> str:
    """``template`` with its ``{slot}`` placeholders filled from ``values``."""
    return template.format(**values)
