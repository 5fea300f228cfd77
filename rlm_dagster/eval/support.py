"""OOLONG-style aggregation: count support tickets by a label that only reading reveals.

    >>> task = aggregation_task(seed=1, rows=200)
    >>> sorted(task.tables), task.kind, task.rows >= 200
    (['customers', 'tickets'], 'integer', True)

Every ticket is about one topic (billing, access, performance, export, feature request,
churn). The topic is never a column: the body is composed from paraphrases that mostly
avoid the topic's obvious keywords, around distractor sentences that use *other* topics'
keywords in passing ("Logging in works fine", "we're not planning to cancel"), so neither a
keyword rule nor a SQL ``ILIKE`` finds the answer; a reader does. The question joins the
label with a column (the customer's plan), as OOLONG's "how many X from users with Y" does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime

import pandas as pd

from rlm_dagster.eval.task import Task
from rlm_dagster.eval.text import (
    COUNTRIES,
    PLANS,
    company,
    fill,
    pick,
    slots,
    timestamp,
)


@dataclass(frozen=True)
class Topic:
    """A hidden label: how questions describe it, how tickets say it, and the keywords a
    naive rule would search for (used by tests to show that such a rule fails)."""

    name: str
    description: str
    phrases: tuple[str, ...]
    distractors: tuple[str, ...]  # sentences using this topic's words, about something else
    keywords: tuple[str, ...]


TOPICS: dict[str, Topic] = {
    t.name: t
    for t in (
        Topic(
            "billing",
            "a wrong or duplicate charge",
            (
                "We got hit twice for {month}, same amount, two days apart. Can someone "
                "reverse one of them?",
                "The statement says ${amount} but we only have {seats} people on the account, "
                "that number can't be right.",
                "Our card was debited again on the {day}th even though finance settled "
                "everything last week.",
                "Accounts payable flagged your latest document: it lists {extra} more seats "
                "than we actually use.",
                "Why did the amount jump from ${amount} to ${amount2}? Nobody here approved an "
                "upgrade.",
                "There are two identical line items on the {month} paperwork you sent us.",
                "My company card shows a second transaction from you for ${amount} that I "
                "can't explain.",
                "We downgraded in {month} but we're still paying the old price.",
                "Finance wants to know why we were billed for the annual tier when we're on "
                "monthly.",
                "The VAT line is applied twice on what you sent for {month}.",
                "Got a receipt for ${amount} this morning for an add-on we removed months ago.",
                "Can you credit back the extra ${amount2}? It looks like a proration mistake.",
            ),
            (
                "Our invoice for {month} was fine, this is about something else.",
                "Payment went through without issues, by the way.",
                "No billing questions this time.",
                "I had a refund from you last year and that was handled well.",
            ),
            ("invoice", "charge", "billing", "refund", "payment", "bill"),
        ),
        Topic(
            "access",
            "being unable to sign in",
            (
                "Since {weekday} none of us can get past the first screen, it just reloads "
                "the form.",
                "{person} keeps getting bounced back to the start page after entering her details.",
                "The one-time code never arrives, so I'm stuck at the second step every morning.",
                "After our IT moved us to {idp}, the single sign-on redirect just spins forever.",
                "I reset my credentials three times and it still says they don't match.",
                "Our new hire got the invite but the link says it has expired, so she can't "
                "get in.",
                "It says the account is locked after one attempt, and I'm sure the passphrase "
                "is right.",
                "The phone app throws me out every few minutes and won't let me back in.",
                "Half the {team} team sees a blank page right after they authenticate.",
                "I can't get into the workspace at all since the domain change on the {day}th.",
            ),
            (
                "Logging in works fine.",
                "I can sign in, that's not the problem.",
                "Password resets are OK now, thanks for last time.",
            ),
            ("log in", "login", "sign in", "password", "locked", "sso"),
        ),
        Topic(
            "performance",
            "the product being slow",
            (
                "The {report} dashboard takes about {secs} seconds to show anything, it used "
                "to be instant.",
                "Everything crawls between 9 and 11 our time, the spinner just sits there.",
                "Opening a chart with more than a few filters freezes the tab for a minute.",
                "Queries that ran in a blink last month now take ages to come back.",
                "My team gave up on the {report} view because it's unusable at this pace.",
                "Scrolling through the table view is choppy and the page hangs when I sort.",
                "We hit a gateway timeout on the {report} report almost every time.",
                "Each filter change means a {secs}-second wait, which kills our Monday review.",
                "The mobile app is so sluggish that {person} stopped using it.",
                "Refreshing the board with last quarter's data sometimes never finishes.",
            ),
            (
                "Speed is fine otherwise.",
                "It's not a slow-loading issue, pages load quickly.",
                "Performance has been great lately, so thanks for that.",
            ),
            ("slow", "speed", "performance", "load", "timeout", "lag"),
        ),
        Topic(
            "export",
            "getting data out of the product (exports, downloads or syncs to another system)",
            (
                "How do I get the raw numbers behind the {report} chart into a spreadsheet?",
                "The file we pull every Friday is missing the last {n} rows.",
                "Our nightly push to {tool} stopped on the {day}th and nothing has arrived since.",
                "The spreadsheet comes out with all the accented names garbled.",
                "Is there a way to drop a copy of the orders table into our S3 bucket every night?",
                "Pulling the full history as Excel fails once it's over {n},000 rows.",
                "The connector to {tool} duplicates every record it sends.",
                "I need last year's ticket data in a format our auditors can open.",
                "The {tool} connector reports success but the rows never show up on their side.",
                "Our BI team wants all of our data loaded into {tool} before the quarter "
                "closes. How?",
            ),
            (
                "We don't export anything, so that's not it.",
                "The CSV download we set up last month still works great.",
                "The sync to {tool} is fine.",
            ),
            ("export", "csv", "download", "sync"),
        ),
        Topic(
            "feature",
            "a request for a capability the product does not have yet",
            (
                "It would make our lives easier if charts could be shared with a password "
                "instead of an account.",
                "Any chance of a dark mode? Half the team works late.",
                "We'd love to get alerted when a metric drops below a threshold.",
                "Could you support fiscal years that start in {month}?",
                "Please consider letting us pin comments to a specific data point.",
                "Is there anything planned for row-level permissions per team?",
                "Wish list from the {team} team: a way to duplicate a whole workspace.",
                "A morning digest of the {report} numbers in Slack would be amazing.",
                "Right now labels can't be translated into German; that would help us a lot.",
                "Can the scheduler send to a distribution list rather than individual people?",
            ),
            (
                "Not asking for a new feature, we just want this fixed.",
                "I know there's a feature request board, but this is different.",
                "We'd love it if this got looked at soon.",
            ),
            ("feature", "would love", "wish", "roadmap", "add support"),
        ),
        Topic(
            "churn",
            "the customer considering leaving or not renewing",
            (
                "Honestly we're weighing whether to keep this going past {month}.",
                "{competitor} offered us a deal and at this point it's hard to argue against it.",
                "If this isn't sorted by the end of the quarter, our contract won't be extended.",
                "Management asked me to look at other vendors before the term ends.",
                "We're paying for {seats} seats and use maybe a third, so we may just walk away.",
                "The team already moved half our reporting to {competitor}; the rest may follow.",
                "Please tell me how to close our account, we're done after this month.",
                "Our budget for next year doesn't include you unless something changes.",
                "I've been told to wind down our usage by {month}.",
                "We like the product but after the price increase we're probably out at the "
                "next term.",
            ),
            (
                "We're not planning to cancel, to be clear.",
                "We renewed in {month} and are happy overall.",
                "No intention of switching, we like the tool.",
            ),
            ("cancel", "renew", "competitor", "switch", "leave", "leaving"),
        ),
    )
}

OPENERS = ("Hi,", "Hello team,", "Hey there,", "Good morning,", "Hi support,", "", "", "Hiya,")
CONTEXT = (
    "We're a team of {seats}.",
    "This is for the {team} team.",
    "Ticket reference from before: #{ref}.",
    "Screenshot attached.",
    "Happy to jump on a call {weekday}.",
    "Not urgent but would appreciate a reply.",
    "{person2} from our side is cc'd.",
)
CLOSERS = (
    "Thanks, {person}",
    "Cheers,\n{person}",
    "Regards, {person} ({team})",
    "Thank you!",
    "",
    "-- {person}, sent from my phone",
)
SUBJECTS = (
    "Question",
    "Help",
    "Quick one",
    "Issue",
    "Re: previous ticket",
    "Need help asap",
    "Account",
    "Hello",
    "Following up",
    "{team} team",
    "Problem since {weekday}",
    "Feedback",
)
CHANNELS = ("email", "web", "chat")
START = datetime(2026, 5, 1)
QUESTIONS = (
    "How many support tickets are about {desc} and come from customers on the {plan} plan? "
    "Answer with a single integer.",
    "Count the tickets from customers on the {plan} plan whose message is about {desc}. "
    "Answer with a single integer.",
    "Among tickets sent by {plan}-plan customers, how many are about {desc}? Answer with a "
    "single integer.",
)


def ticket_body(rng: random.Random, topic: Topic) -> str:
    """One ticket about ``topic``: its phrase among context and other topics' distractors."""
    values = slots(rng)
    others = [t for t in TOPICS.values() if t.name != topic.name]
    middle = [pick(rng, topic.phrases)]
    for _ in range(rng.choice((0, 1, 1, 2))):
        middle.append(pick(rng, pick(rng, others).distractors))
    if rng.random() < 0.5:
        middle.append(pick(rng, CONTEXT))
    rng.shuffle(middle)
    parts = [pick(rng, OPENERS), *middle, pick(rng, CLOSERS)]
    return fill(" ".join(p for p in parts if p), values)


def support_tables(rng: random.Random, rows: int) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """``customers`` and ``tickets`` (``rows`` tickets), and each ticket's hidden topic."""
    n_customers = max(20, rows // 8)
    customers = pd.DataFrame(
        {
            "customer_id": range(1, n_customers + 1),
            "name": [company(rng) for _ in range(n_customers)],
            "plan": [pick(rng, PLANS) for _ in range(n_customers)],
            "country": [pick(rng, COUNTRIES) for _ in range(n_customers)],
        }
    )
    names = list(TOPICS)
    labels = [pick(rng, names) for _ in range(rows)]
    tickets = pd.DataFrame(
        {
            "ticket_id": range(1, rows + 1),
            "customer_id": [rng.randrange(1, n_customers + 1) for _ in range(rows)],
            "created_at": sorted(timestamp(rng, START, 180) for _ in range(rows)),
            "channel": [pick(rng, CHANNELS) for _ in range(rows)],
            "subject": [fill(pick(rng, SUBJECTS), slots(rng)) for _ in range(rows)],
            "body": [ticket_body(rng, TOPICS[label]) for label in labels],
        }
    )
    return customers, tickets, labels


def aggregation_task(
    seed: int, rows: int, *, index: int = 0, family: str = "aggregation", group: str = ""
) -> Task:
    """How many tickets about topic X come from customers on plan Y (both drawn by seed)."""
    rng = random.Random(f"{family}:{seed}:{rows}:{index}")
    customers, tickets, labels = support_tables(rng, rows)
    # The questions of one family ask about distinct (topic, plan) pairs, so no two of a
    # suite read alike; the scale steps (index 0 at every size) ask the same one.
    combos = [(topic, plan) for topic in TOPICS for plan in PLANS]
    random.Random(f"{family}-combos:{seed}").shuffle(combos)
    topic, plan = combos[index % len(combos)]
    plan_of = dict(zip(customers.customer_id, customers.plan, strict=True))
    truth = sum(
        1
        for customer, label in zip(tickets.customer_id, labels, strict=True)
        if label == topic and plan_of[customer] == plan
    )
    question = pick(rng, QUESTIONS).format(desc=TOPICS[topic].description, plan=plan)
    return Task(
        id=f"{group or family}-{index + 1}",
        family=family,
        group=group or family,
        question=question,
        tables={"customers": customers, "tickets": tickets},
        kind="integer",
        truth=truth,
        params={"seed": seed, "rows": rows, "topic": topic, "plan": plan},
    )


def ticket_labels(seed: int, rows: int, index: int = 0, family: str = "aggregation") -> list[str]:
    """The hidden topic of every ticket of :func:`aggregation_task` (tests and baselines)."""
    rng = random.Random(f"{family}:{seed}:{rows}:{index}")
    return support_tables(rng, rows)[2]
