"""Generate the synthetic sample warehouse source used by rlm_dagster examples and tests.

Everything written by this script is SYNTHETIC: companies, people, orders and support
tickets are invented from word lists and sentence fragments. Any resemblance to real
organisations is accidental. Competitor names ("Datavane", "Quantly", ...) are fictional.

The data models a small B2B analytics SaaS vendor:

* ``source/customers.csv`` - ~120 customer accounts (plan, country, seats, MRR).
* ``source/orders.csv`` - ~1,500 orders between 2025-06-01 and 2026-11-15.
* ``source/tickets.csv`` - 600 support tickets between 2026-05-01 and 2026-11-15 with
  free-text subjects and bodies written like real customers (mixed tone, typos, numbers,
  names). Roughly 13% of tickets threaten to cancel / churn - many of them without ever
  using the word "cancel" - and there are deliberate hard negatives that say "cancel"
  without threatening churn ("please cancel the duplicate invoice"). About 8% of bodies
  are exact duplicates of auto-generated texts (password resets, web-form submissions)
  so that deduplication is meaningful.
* ``ground_truth/ticket_labels.csv`` - the labels behind every ticket (threatens_cancel,
  churn_reason, category, sentiment). It is NOT part of the warehouse source; only
  tests and benchmarks read it.

The output is fully deterministic: a single ``random.Random(20261121)`` drives every
choice, and only the standard library is used, so the same Python version always
produces byte-identical files.

Regenerate (from any working directory)::

    python data/generate.py              # writes data/source/ and data/ground_truth/
    python data/generate.py --out DIR    # writes DIR/source/ and DIR/ground_truth/
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TypeVar

SEED = 20261121

N_CUSTOMERS = 120
N_ORDERS = 1500
N_TICKETS = 600
N_CHURN = 78  # ~13% of tickets threaten to churn
N_HARD_NEGATIVES = 34  # non-churn tickets that say "cancel"
N_AUTO = 48  # auto-generated bodies that are exact duplicates of each other

SIGNUP_START = date(2022, 1, 1)
SIGNUP_END = date(2026, 10, 31)
ORDERS_START = date(2025, 6, 1)
ORDERS_END = date(2026, 11, 15)
TICKETS_START = datetime(2026, 5, 1, 0, 0, 0)
TICKETS_END = datetime(2026, 11, 15, 23, 59, 59)
RECENT_START = datetime(2026, 8, 17, 0, 0, 0)  # last 90 days before 2026-11-15

T = TypeVar("T")

# --------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------

NAME_PREFIXES = [
    "Northwind", "Bluefin", "Redwood", "Ironclad", "Silverline", "Brightpath", "Keystone",
    "Harbor", "Summit", "Cobalt", "Evergreen", "Granite", "Lumen", "Pioneer", "Quarry",
    "Riverbend", "Sable", "Tidewater", "Vantage", "Willow", "Alder", "Beacon", "Copperleaf",
    "Driftwood", "Ember", "Foxglove", "Glacier", "Helix", "Juniper", "Kestrel", "Lodestar",
    "Meridian", "Nimbus", "Orchard", "Pinecrest", "Quill", "Rookery", "Saltmarsh",
    "Trellis", "Umber", "Verdant", "Westgate", "Yellowtail", "Zephyr", "Ashford", "Bramble",
    "Crestline", "Fjord", "Halcyon", "Marigold", "Oakhurst", "Starling",
]
NAME_NOUNS = [
    "Analytics", "Logistics", "Health", "Robotics", "Foods", "Labs", "Capital", "Media",
    "Energy", "Software", "Outfitters", "Biotech", "Freight", "Systems", "Retail",
    "Studios", "Insurance", "Partners", "Manufacturing", "Telecom", "Mobility", "Dental",
    "Payments", "Games", "Learning", "Apparel", "Hospitality", "Pharma",
]
COUNTRY_WEIGHTS = {
    "US": 30, "GB": 12, "DE": 10, "FR": 6, "CA": 6, "NL": 5, "AU": 5, "IN": 4, "SE": 3,
    "ES": 3, "BR": 3, "JP": 3, "SG": 3, "IE": 2, "CH": 2, "DK": 2, "PL": 2, "IT": 2,
    "MX": 2, "AT": 1,
}
LEGAL_SUFFIXES = {
    "US": ["Inc.", "LLC", "Co."], "GB": ["Ltd"], "IE": ["Ltd"], "DE": ["GmbH"],
    "AT": ["GmbH"], "CH": ["AG", "GmbH"], "FR": ["SAS"], "NL": ["B.V."], "SE": ["AB"],
    "DK": ["ApS"], "ES": ["S.L."], "IT": ["S.r.l."], "PL": ["sp. z o.o."], "BR": ["Ltda."],
    "JP": ["K.K."], "AU": ["Pty Ltd"], "IN": ["Pvt Ltd"], "SG": ["Pte Ltd"],
    "CA": ["Inc.", "Ltd"], "MX": ["S.A. de C.V."],
}
COUNTRY_TLD = {"US": "com", "CA": "ca", "GB": "co.uk", "AU": "com.au", "DE": "de", "FR": "fr"}

PLAN_COUNTS = {"free": 22, "starter": 36, "pro": 38, "enterprise": 24}
PER_SEAT_USD = {"free": 0.0, "starter": 15.0, "pro": 39.0, "enterprise": 59.0}

FIRST_NAMES = [
    "Priya", "Marcus", "Sofia", "Jonas", "Aisha", "Tom", "Mei", "Lukas", "Chloé", "Diego",
    "Fatima", "Olu", "Hannah", "Raj", "Ingrid", "Kenji", "Zoë", "Mateo", "Nadia", "Sam",
    "Elena", "Björn", "Grace", "Omar", "Yuki", "Tariq", "Lena", "Ravi", "Camille", "Dan",
    "Beatriz", "Kwame", "Anika", "Patrick", "Siobhan", "Wei", "Rosa", "Felix", "Leila",
    "Chris",
]
LAST_NAMES = [
    "Raman", "Okafor", "Lindqvist", "Müller", "Chen", "García", "O'Brien", "Nakamura",
    "Kowalski", "Dubois", "Haddad", "Singh", "Andersen", "Rossi", "Novak", "Mensah",
    "Fischer", "Tanaka", "Silva", "Walsh", "Patel", "Jensen", "Moreau", "Kim",
]
AGENTS = ["Dana", "Alex", "Jordan", "Morgan", "Casey", "Riley", "Jamie", "Taylor"]
COMPETITORS = ["Datavane", "Quantly", "Lumora BI", "Metricsy", "Chartwell", "Tabula Cloud"]
INTEGRATIONS = [
    "Salesforce", "HubSpot", "Snowflake", "BigQuery", "Postgres", "Redshift", "Stripe",
    "Zendesk", "NetSuite", "Shopify", "Jira", "Google Sheets",
]
IDPS = ["Okta", "Azure AD", "Google Workspace", "OneLogin", "JumpCloud"]
DASHBOARDS = [
    "Weekly Revenue", "Churn Cohorts", "Pipeline Overview", "Exec KPIs", "Marketing Funnel",
    "Support SLA", "Inventory Health", "Board Pack", "Ops Daily", "Finance MTD",
]
EXPORT_FORMATS = ["CSV", "XLSX", "Parquet", "PDF"]
BROWSERS = ["Firefox", "Safari", "Edge", "Firefox ESR", "Safari on iPad"]
REGIONS = ["EU", "eu-west", "us-east", "APAC", "the Frankfurt region", "us-west"]
TEAMS = ["finance", "sales", "ops", "marketing", "customer success", "data", "exec"]
TIMEZONES = ["CET", "EST", "PST", "GMT", "AEST", "IST"]
METRICS = ["daily signups", "gross margin", "open pipeline", "NPS", "on-time delivery"]
STREETS = [
    "Kastanienallee 12, Berlin", "41 Canal Street, Manchester", "500 Howard St, San Francisco",
    "Keizersgracht 221, Amsterdam", "12 Rue Oberkampf, Paris", "88 Queen St W, Toronto",
]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]

PRODUCTS = ["Core seats", "Analytics add-on", "Premium support", "Storage pack", "Training"]

CATEGORIES = [
    "billing", "bug", "feature_request", "outage", "onboarding", "account", "praise", "how_to",
]
CATEGORY_WEIGHTS = [16, 19, 12, 7, 10, 12, 8, 16]
CHURN_REASONS = ["pricing", "outage", "missing_feature", "competitor", "support_quality", "bugs"]
CHURN_REASON_WEIGHTS = [25, 15, 15, 15, 12, 18]
REASON_CATEGORY = {
    "pricing": "billing",
    "outage": "outage",
    "missing_feature": "feature_request",
    "competitor": "account",
    "support_quality": "account",
    "bugs": "bug",
}

# --------------------------------------------------------------------------------------
# Ticket text fragments. Placeholders in {braces} are filled per ticket (see TextContext).
# --------------------------------------------------------------------------------------

OPENERS: dict[str, list[str]] = {
    "polite": [
        "Hi team,", "Hello,", "Hi there,", "Good morning,", "Hi {agent},", "Hey folks,",
        "Dear support,", "Hi all,", "Hello support team,", "Good afternoon,",
    ],
    "angry": [
        "This is unacceptable.", "I'm honestly frustrated at this point.",
        "Third email about this.", "Seriously?", "Not happy.", "Again??",
        "I have been patient but this is getting ridiculous.", "What is going on over there?",
        "I don't know how many times I need to say this.",
    ],
    "rambling": [
        "Hi, hope you're well - sorry if this is the wrong place for this.",
        "So this is a bit of a long one, bear with me.",
        "Hey, quick-ish question (maybe not so quick).",
        "Hi! First time writing in so not totally sure how this works.",
        "Hello, I was told by {person} on our side to just email you directly, so here goes.",
        "Hi there, hope your week is going better than mine.",
    ],
    "terse": [""],
}

FILLERS = [
    "We've been customers for about {years} years now, mostly happy.",
    "I also asked {person} on our side and they weren't sure either.",
    "Not sure if it's related but we changed our {idp} config last week.",
    "For context we're a team of about {n} people, mostly in {team}.",
    "I looked through the help center first but couldn't find anything that matched.",
    "We're in the middle of quarter-end so everything is a bit hectic here.",
    "I'm covering for {person} while they're on leave, so apologies if I'm missing context.",
    "Our setup is pretty standard, nothing fancy: {integration} into a few dashboards.",
    "Someone on a community forum mentioned a workaround but I couldn't get it to work.",
    "This might be user error on my part, to be fair.",
    "We migrated from {competitor} about a year ago and this used to be easy there.",
]

CLOSINGS: dict[str, list[str]] = {
    "polite": [
        "Thanks!", "Thanks in advance.", "Appreciate the help.", "Cheers.",
        "Let me know if you need anything else from me.", "Thank you so much.",
        "Any pointers appreciated.", "Thanks for your time.",
    ],
    "angry": [
        "Please escalate this.", "I expect a response today.", "Fix it.",
        "Someone needs to call me.", "We pay a lot of money for this.",
        "Please don't send me another help center link.", "I want a real answer this time.",
    ],
    "rambling": [
        "Anyway, sorry for the wall of text, let me know what you think!",
        "Thanks a lot and have a good weekend.",
        "Not sure if any of that makes sense, happy to clarify on a call.",
        "Okay I think that's everything, thanks for reading this far :)",
    ],
    "terse": ["", "", "thx", "asap pls", "Thanks."],
}

SIGNOFFS_EMAIL = [
    "", "-- {writer}", "Thanks,\n{writer}", "{writer} | {company}", "{fullname}",
    "Best,\n{fullname}", "Best regards,\n{fullname}\n{role}, {company}", "- {writer} ({team})",
    "Cheers,\n{writer}", "Sent from my iPhone", "Regards,\n{fullname}",
]
SIGNOFFS_INLINE = ["", "", "", "- {writer}", "{writer} ({team})", "-- {writer}, {company}"]
ROLES = [
    "Head of Data", "IT Manager", "Finance Director", "Ops Lead", "VP Operations",
    "Analytics Engineer", "Office Manager", "CTO", "Controller", "RevOps Manager",
]

CORE: dict[str, list[str]] = {
    "billing": [
        "Invoice {inv} shows {seats} seats but we only have {seats2} active users.",
        "We were charged twice this month - once on {date} and again two days later.",
        "Can you send a copy of invoice {inv} with our VAT number on it?",
        "Our card on file expired, where do I update the payment details?",
        "Could we switch from monthly to annual billing at our next invoice?",
        "The invoice is still addressed to our old office, please update it to {street}.",
        "Why did our bill go up by ${amount} this month? Nothing changed on our side.",
        "Our AP team needs a W-9 and a vendor onboarding form filled in.",
        "Is it possible to pay by bank transfer instead of credit card?",
        "PO number {po} needs to appear on all future invoices.",
        "We got charged for the Training order even though the session hasn't happened yet.",
        "Can you split invoice {inv} across two cost centers?",
        "The receipt for order {order} is missing the tax line.",
        "We added {n} seats mid-cycle and the proration on {inv} looks off by about ${amount}.",
        "Please confirm the refund for order {order} went through, I don't see it on our statement.",
        "Who do I talk to about a multi-year discount?",
        "The Storage pack shows up on our invoice but we never ordered it.",
        "Our invoices keep going to {person}'s inbox, who left in {month_now}.",
        "Payment for {inv} failed with \"card declined\" but the card works everywhere else.",
        "Can we get invoices in EUR instead of USD going forward?",
    ],
    "bug": [
        "The {dashboard} dashboard shows no data for the last {n} days even though the sync says it succeeded.",
        "Exporting to {export_fmt} fails with \"unexpected error\" for any table over ~{n}k rows.",
        "Filters on the {dashboard} dashboard reset every time I switch tabs.",
        "Getting HTTP {code} from the /v2/query endpoint intermittently.",
        "The API rate limiter kicks in at about {rate_low} req/min, the docs say the limit is {rate}.",
        "SSO login via {idp} loops straight back to the login page.",
        "Charts render blank in {browser} but work fine in Chrome.",
        "Scheduled reports arrive at 3am instead of 9am {tz}, looks like a timezone bug.",
        "The {integration} sync duplicated about {n}00 rows yesterday.",
        "When I rename a column the {dashboard} dashboard breaks and I have to rebuild every chart.",
        "The seat counter in the admin panel says {seats} but we only invited {seats2} people.",
        "CSV exports split quoted fields in the wrong place so Excel shifts all the columns.",
        "Dark mode makes the axis labels unreadable on line charts.",
        "The \"last updated\" label on dashboards always says \"a few seconds ago\", even when the data is stale.",
        "Search in the table browser doesn't find columns that have underscores in the name.",
        "The mobile app crashes when opening any dashboard with more than {n} tiles.",
        "The Slack webhook fires twice for every alert.",
        "Totals on the {dashboard} dashboard don't match the same query run in {integration}.",
        "Drill-down on the map chart throws \"Something went wrong (ref {reqid})\".",
        "Percentages in the pivot table add up to {pct_over}%.",
    ],
    "feature_request": [
        "Would love to be able to schedule exports to S3 as {export_fmt}.",
        "Any plans to support row-level security per team?",
        "Could you add a native {integration} connector?",
        "Please add an option to pin dashboards to the sidebar.",
        "It'd be great to have SCIM provisioning with {idp}.",
        "Can we get an audit log of who changed what on a dashboard?",
        "Feature request: let us set the default timezone per workspace.",
        "We'd like to pay for an API rate limit above {rate} req/min.",
        "Is there a way to get alerts when a sync fails, by email or Slack?",
        "Please support dark mode in embedded dashboards.",
        "Would be nice to export a dashboard as a PDF with our own logo on it.",
        "Let admins transfer ownership of dashboards when someone leaves.",
        "Custom fiscal calendars (4-4-5) would help our finance team a lot.",
        "A cheaper read-only viewer seat would make it much easier to roll out to {n} more people.",
        "Can you add version history for SQL queries, like a simple undo?",
        "Please let us comment on individual charts, our {team} team keeps screenshotting them into Slack.",
    ],
    "outage": [
        "Is the platform down? Everything is returning {code}.",
        "Dashboards won't load for anyone on our team since about {time}.",
        "Data sync from {integration} hasn't run since {date} {time}.",
        "Login page just spins for us in {region}.",
        "API calls are timing out after 30s, started roughly {minutes} minutes ago.",
        "Your status page is green but we can't get into anything.",
        "Scheduled reports didn't go out this morning, none of them.",
        "We're seeing intermittent {code} errors on every single query.",
        "Whole workspace is showing \"Service unavailable\" right now.",
        "SSO is down for us - {idp} says it's fine on their end.",
    ],
    "onboarding": [
        "We just signed up and I'm trying to connect our {integration} account.",
        "What's the recommended way to invite {n} people at once?",
        "Setting up SSO with {idp} - which ACS URL should we use?",
        "Is there a getting-started guide for admins?",
        "Our kickoff call is on {weekday}, who should attend from our side?",
        "We moved over from {competitor} and want to import our old dashboards.",
        "How long does the first full sync usually take for ~{n} million rows?",
        "Can we get a sandbox workspace for testing before we roll out?",
        "I'm the new admin after {person} left - could someone walk me through the setup?",
        "Which IP addresses do we need to allowlist for the {integration} connector?",
        "The warehouse connection test just times out during setup.",
        "Is the admin training included in our plan or is that a separate order?",
    ],
    "account": [
        "Please add {person} as an admin on our workspace.",
        "I need to change the account owner email to {email}.",
        "{person} left the company, please remove their access.",
        "Can we merge our two workspaces into one?",
        "I'm locked out after too many password attempts.",
        "Lost my 2FA device, how do I get back in?",
        "Please update our company name to {company}.",
        "How do I transfer ownership of the workspace to {person}?",
        "We need a data processing agreement (DPA) signed for GDPR.",
        "Can you confirm where our data is hosted? We need EU data residency.",
        "We need to add {n} more seats for new hires starting {date}.",
        "Can you enable API access for our workspace?",
        "Our security team is asking for your latest pen test summary.",
        "Please change the billing contact to {email}.",
    ],
    "praise": [
        "Just wanted to say the new dashboard builder is fantastic.",
        "{agent} on your support team was incredibly helpful yesterday.",
        "The {integration} connector saves us hours every week.",
        "Huge thanks for fixing the export bug so quickly.",
        "Our execs love the {dashboard} dashboard, it's now in every board pack.",
        "Onboarding was the smoothest we've had with any vendor.",
        "The new API docs are so much better, thank you.",
        "We renewed for another year, very happy customers over here.",
        "We rolled out to {n} more people this month and nobody needed training.",
        "The latest release made the {dashboard} dashboard load in like 2 seconds, amazing.",
    ],
    "how_to": [
        "How do I share a dashboard with someone outside our org?",
        "Is there a way to export a whole dashboard to {export_fmt}?",
        "How do I set up an alert when {metric} drops below a threshold?",
        "Where do I find my API key?",
        "What's the rate limit on the REST API?",
        "How do I add a calculated field to an existing chart?",
        "Can I schedule a report to go out every {weekday} at 8am {tz}?",
        "How do I rotate the credentials for the {integration} sync?",
        "How do we change the default date range on the {dashboard} dashboard?",
        "How do I connect a second {integration} instance?",
        "Is it possible to embed a dashboard in our internal wiki?",
        "How do I see which seats are actually being used?",
        "How do I download all invoices for last year in one go?",
        "How do I give {person} edit access to just one dashboard?",
        "Is there a way to paginate API results past {n}000 rows?",
    ],
}

DETAILS: dict[str, list[str]] = {
    "billing": [
        "Our finance contact is {person} ({email}), please cc them.",
        "The amount in question is ${amount}.",
        "This is blocking our month-end close.",
        "Our AP system rejects invoices without a PO number.",
        "We're on the {plan} plan if that helps.",
        "The company name on the invoice should be {company}.",
        "Not urgent, but I'd like it sorted before {date_future}.",
        "I've attached a screenshot of the billing page.",
    ],
    "bug": [
        "Steps: open the dashboard, set the range to last 30 days, hit refresh.",
        "Happens for me and {person}, on different laptops.",
        "Request ID from the error: {reqid}.",
        "I think it started after your release on {date}.",
        "Tried clearing cache and incognito, same thing.",
        "We're on {browser}, latest version.",
        "Not a huge deal but it's confusing for new users.",
        "Workaround right now is re-running the sync by hand.",
        "Console shows a {code} on /api/graphql.",
        "Screen recording attached.",
    ],
    "feature_request": [
        "{competitor} has something like this, for reference.",
        "This came up in our quarterly review with {person}.",
        "Happy to jump on a call to explain our use case.",
        "About {n} people on our side would use it daily.",
        "Not a dealbreaker, just a quality-of-life thing.",
        "Is this on the roadmap?",
        "Right now we hack around it with a script in Google Sheets.",
    ],
    "outage": [
        "This is impacting our whole {team} team.",
        "We have an exec review in {hours} hours, please advise ASAP.",
        "Please update the status page.",
        "Any ETA?",
        "Ref: {reqid}",
        "Roughly {n} users affected on our side.",
    ],
    "onboarding": [
        "We have {seats} seats on the {plan} plan.",
        "Our IT contact is {person} ({email}).",
        "Ideally we'd be live by {date_future}.",
        "Thanks for the welcome email, it was helpful.",
        "The team is pretty excited to get going.",
    ],
    "account": [
        "This is for {company}, workspace ID {wsid}.",
        "Please confirm once done.",
        "I'm the account owner, happy to verify however you need.",
        "Ideally before {date_future}.",
    ],
    "praise": [
        "Keep it up!",
        "Please pass this on to {agent}.",
        "Feel free to use us as a reference.",
        "Genuinely one of the better tools we pay for.",
    ],
    "how_to": [
        "I looked in the docs but the page seems outdated.",
        "We're on the {plan} plan, not sure if that matters.",
        "Screenshots would be great if you have them.",
        "Need this for a {team} meeting on {weekday}.",
        "Sorry if this is obvious.",
    ],
}

# Non-churn tickets that say "cancel" (hard negatives): (category, text)
HARD_NEGATIVES: list[tuple[str, str]] = [
    ("billing", "Please cancel the duplicate invoice {inv}, we were charged twice for the same {product}."),
    ("billing", "Can you cancel order {order}? {person} placed it by mistake."),
    ("billing", "We'd like to cancel just the Storage pack add-on - keep everything else as is."),
    ("billing", "Not looking to cancel or anything, just want to understand how the annual discount works."),
    ("billing", "I cancelled the old card in our billing settings, does the new one need to be verified?"),
    ("how_to", "How do I cancel a pending order?"),
    ("how_to", "How do I cancel a scheduled export that's stuck in the queue?"),
    ("how_to", "Is there a way to cancel a running sync without breaking the next scheduled one?"),
    ("how_to", "How do I cancel a dashboard subscription email for just one user?"),
    ("onboarding", "I cancelled the meeting invite for our onboarding call by mistake - can we get it back on the calendar for {weekday}?"),
    ("onboarding", "We need to cancel Thursday's training session, could we reschedule to next week?"),
    ("account", "Please cancel the invitation I sent to {email}, there's a typo in the address."),
    ("account", "{person} left, can you cancel their seat and reassign it to {person2}?"),
    ("account", "Could you cancel the pending ownership transfer? We changed our minds about who should own the workspace."),
    ("bug", "The Cancel button on the export dialog doesn't do anything."),
    ("bug", "When I cancel a query in the SQL editor, the dashboard keeps showing a spinner forever."),
    ("bug", "Cancelled syncs still show as \"running\" in the history tab."),
    ("feature_request", "Would be great if we could cancel scheduled reports in bulk instead of one at a time."),
    ("praise", "Our old vendor made it impossible to cancel anything without calling them, so kudos for making add-ons so easy to manage."),
]

CHURN_CONTEXT: dict[str, list[str]] = {
    "pricing": [
        "Our renewal quote came in {pct}% higher than last year with zero new features we actually use.",
        "We're paying ${mrr} a month for {seats} seats and half of them sit idle.",
        "The new per-seat pricing basically doubles our bill.",
        "Finance flagged that the Analytics add-on now costs more than the core product.",
        "Nobody told us storage overage would be billed at that rate - invoice {inv} was ${amount}.",
        "Our budget for next year got cut and this line item is first on the chopping block.",
        "The price jump from Pro to Enterprise is absurd for what we need.",
        "We were promised the legacy rate would be honored and now it isn't.",
    ],
    "outage": [
        "Your platform was down for {hours} hours on {date} and we had zero visibility.",
        "This is the third outage this month. Our exec dashboards were blank during the board meeting.",
        "Data sync has been failing silently since {date}; we only found out because a customer complained.",
        "The status page said \"all systems operational\" while we were getting {code} errors for {minutes} minutes.",
        "We missed our month-end close because the warehouse sync was stuck again.",
        "Two incidents in {region} in one week and no RCA for either.",
        "Every {weekday} morning for a month the dashboards have been unavailable when our team logs in.",
    ],
    "missing_feature": [
        "We've been asking for row-level permissions for over a year.",
        "There's still no SCIM provisioning, which our security team now requires.",
        "Without a native {integration} connector we're maintaining a pile of scripts ourselves.",
        "Your roadmap said scheduled Parquet exports would ship in Q2. It's {month_now}.",
        "We need audit logs streamed to our SIEM and you still don't support it.",
        "Procurement won't sign off without a SOC 2 Type II report, and you still don't have one.",
        "We can't do fiscal-year reporting without custom calendars, which you keep saying is \"planned\".",
    ],
    "competitor": [
        "{competitor} offered us the same thing at roughly half the price.",
        "Our new VP came from a company using {competitor} and wants to standardize on it.",
        "We ran a two-week pilot of {competitor} and the team honestly preferred it.",
        "{competitor} has native {integration} support out of the box.",
        "{competitor} reached out with a migration offer that's pretty hard to ignore.",
        "Half my team already uses {competitor} for ad-hoc analysis anyway.",
    ],
    "support_quality": [
        "Ticket #{ticket_ref} has been open for {n} days without a real answer.",
        "Every time we write in we get a canned response asking for screenshots we already sent.",
        "Your support told us to clear the cache three times. That's not a fix.",
        "We pay for Premium support and the response time is worse than when we were on Starter.",
        "{agent} promised a call-back on {date} and nobody ever called.",
        "I've explained this issue to four different people on your team now.",
        "Your chat bot closed my conversation twice before a human ever looked at it.",
    ],
    "bugs": [
        "Dashboards randomly show yesterday's numbers, so nobody trusts them anymore.",
        "Exports to {export_fmt} keep truncating at 65,536 rows.",
        "The API returns {code}s even though we're well under the {rate} req/min limit.",
        "SSO with {idp} breaks every couple of weeks and locks out half the team.",
        "The seat count on the billing page doesn't match the admin panel - it's off by {n}.",
        "Every release breaks something new. Last week it was filters, this week it's the scheduler.",
        "The {dashboard} dashboard has been showing wrong totals since {date} and the bug is still open.",
    ],
}

CHURN_THREAT_EXPLICIT = [
    "If this isn't resolved by {weekday}, we will cancel our subscription.",
    "Please treat this as notice that we intend to cancel at the end of the current term.",
    "I'm very close to cancelling our account.",
    "How do we cancel? I'd like to start that process now.",
    "We're seriously considering cancelling all {seats} seats.",
    "Honestly, give me one reason not to cancel today.",
    "Please send me the cancellation terms for our contract.",
    "Our CFO asked me to cancel before the auto-renewal on {date_future}.",
    "Cancel our plan effective end of month.",
    "What's the penalty if we cancel early?",
    "If nothing changes we're cancelling, simple as that.",
    "I'd like to cancel our subscription. Please confirm the last billing date.",
]
CHURN_THREAT_IMPLICIT = [
    "We won't be renewing in {month_future}.",
    "If this isn't fixed by Friday we're moving our team off your platform.",
    "We've already started migrating our dashboards elsewhere.",
    "Consider this our notice that we're not renewing the contract.",
    "At this point I can't justify the renewal to my boss.",
    "We're going to let the contract lapse unless something changes quickly.",
    "I've been asked to put together an exit plan, including how to get all our data out.",
    "What's the process for exporting everything and closing the account? We're done.",
    "Please turn off auto-renew for our workspace.",
    "This is the last straw, we're shopping for alternatives.",
    "Procurement has been told to find a replacement vendor before {month_future}.",
    "The team voted to switch tools at the end of the term.",
    "Please have someone from your account team reach out, otherwise we're gone at renewal.",
    "I'm recommending we terminate the agreement at renewal.",
    "Honestly we're done. Please tell me how to get a full export of our data.",
    "I'll be recommending to leadership that we don't renew in {month_future}.",
    "Our renewal is on {date_future} and right now the answer is no.",
]
CHURN_THREAT_IMPLICIT_BY_REASON: dict[str, list[str]] = {
    "competitor": [
        "Leadership asked me to evaluate {competitor} as a replacement.",
        "We'll be moving to {competitor} next quarter unless you can match their offer.",
        "We're running a bake-off with {competitor} next month and right now you're not winning it.",
    ],
    "pricing": [
        "Unless the renewal quote comes down, we'll be going with a cheaper tool.",
        "We're not paying that. We'll find something else.",
        "We are not going to renew at this price.",
    ],
    "outage": [
        "One more outage and we're moving the whole team off your platform.",
    ],
    "support_quality": [
        "If this is the level of support we can expect, we won't be staying past this contract.",
    ],
    "missing_feature": [
        "Without it we can't justify renewing next year.",
    ],
    "bugs": [
        "My team has stopped trusting the numbers, and I'm not going to renew a tool nobody trusts.",
    ],
}

SUBJECTS: dict[str, list[str]] = {
    "billing": [
        "Invoice question", "Billing issue", "Billing question", "Question about our invoice",
        "billing", "Invoice", "Payment", "Re: invoice",
    ],
    "bug": ["Bug report", "Something is broken", "bug", "Issue", "Not working", "Error", "Problem"],
    "feature_request": ["Feature request", "Suggestion", "Idea", "Roadmap question", "Would love this"],
    "outage": ["DOWN?", "Is the app down", "Outage", "URGENT", "Service unavailable", "Can't access anything"],
    "onboarding": ["Getting started", "Onboarding question", "New workspace setup", "Setup help", "Onboarding"],
    "account": ["Account access", "Account question", "Admin request", "Our workspace", "User management"],
    "praise": ["Thank you!", "Kudos", "Great work", "Just a thank you", "Shoutout to {agent}"],
    "how_to": ["How do I...", "Quick question", "Question", "Help", "how to", "Quick one"],
}
CHURN_SUBJECTS_EXPLICIT = [
    "Cancellation", "Cancel subscription", "Want to cancel", "Cancelling our account",
]
CHURN_SUBJECTS_NEUTRAL = [
    "Renewal", "Contract renewal", "Very disappointed", "Escalation", "Not happy",
    "Our account", "Need to talk", "Following up (again)", "Urgent - please read",
]

# Auto-generated texts: (body, category, channel). These repeat verbatim on purpose.
AUTO_BODIES: list[tuple[str, str, str]] = [
    ("Password reset request from the login page.", "account", "web"),
    ("Web form submission - Topic: Billing question. Message: (no message provided)", "billing", "web"),
    ("Automated message: a customer requested a call-back via the in-app widget. No further details were provided.", "how_to", "chat"),
    ("Form submission: Request a demo of the Analytics add-on. Company size: 51-200.", "onboarding", "web"),
    ("This is an automated notification: SSO login failed 5 times for this user. Please review.", "account", "web"),
]
AUTO_SUBJECTS = {
    "account": "[Automated] Account notification",
    "billing": "Web form: Billing question",
    "how_to": "Call-back request",
    "onboarding": "Web form: Demo request",
}

MISSPELLINGS = {
    "definitely": "definately", "receive": "recieve", "separate": "seperate",
    "dashboard": "dashbaord", "invoice": "invoce", "because": "becuase", "really": "realy",
    "their": "thier", "which": "wich", "until": "untill", "access": "acess",
    "immediately": "immediatly", "the": "teh", "with": "wiht", "just": "jsut",
    "export": "exprot", "working": "workign", "since": "sicne",
}


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def weighted(rng: random.Random, items: Sequence[T], weights: Sequence[float]) -> T:
    """Pick one item with the given relative weights."""
    return rng.choices(list(items), weights=list(weights), k=1)[0]


def ascii_slug(text: str) -> str:
    """Lower-case ASCII version of a name, for e-mail addresses and domains."""
    norm = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]", "", norm.lower())


def random_date(rng: random.Random, start: date, end: date) -> date:
    return start + timedelta(days=rng.randint(0, (end - start).days))


HOUR_WEIGHTS = [1, 1, 1, 1, 1, 2, 3, 5, 8, 10, 10, 9, 7, 9, 10, 9, 8, 6, 4, 3, 2, 2, 1, 1]


def random_timestamp(rng: random.Random, start: datetime, end: datetime) -> datetime:
    """A timestamp in [start, end], mostly during (customer) business hours."""
    days = (end.date() - start.date()).days
    while True:
        day = start.date() + timedelta(days=rng.randint(0, days))
        if day.weekday() >= 5 and rng.random() < 0.6:
            continue  # fewer tickets on weekends
        hour = weighted(rng, range(24), HOUR_WEIGHTS)
        ts = datetime(day.year, day.month, day.day, hour, rng.randint(0, 59), rng.randint(0, 59))
        if start <= ts <= end:
            return ts


def fmt_money(value: float) -> str:
    return f"{value:.2f}"


@dataclass(frozen=True)
class Customer:
    customer_id: int
    name: str
    plan: str
    country: str
    signup_date: date
    seats: int
    mrr_usd: float

    @property
    def domain(self) -> str:
        first = ascii_slug(self.name.split()[0])
        return f"{first}.{COUNTRY_TLD.get(self.country, 'io')}"


@dataclass
class Ticket:
    customer: Customer
    created_at: datetime
    channel: str
    priority: str
    subject: str
    body: str
    threatens_cancel: bool
    churn_reason: str
    category: str
    sentiment: str


class TextContext:
    """Fills {placeholders} in fragments with values consistent with one ticket."""

    def __init__(self, rng: random.Random, customer: Customer, created_at: datetime) -> None:
        self.rng = rng
        self.customer = customer
        self.created_at = created_at
        # The writer and one colleague, each reused consistently within a ticket.
        self.writer, self.person = rng.sample(FIRST_NAMES, 2)
        self.competitor = rng.choice(COMPETITORS)
        self.writer_last = rng.choice(LAST_NAMES)
        self.providers: dict[str, Callable[[], str]] = {
            "agent": lambda: rng.choice(AGENTS),
            "person": lambda: self.person,
            "person2": lambda: rng.choice([n for n in FIRST_NAMES if n not in (self.person, self.writer)]),
            "fullname": lambda: f"{self.writer} {self.writer_last}",
            "writer": lambda: self.writer,
            "role": lambda: rng.choice(ROLES),
            "email": lambda: f"{ascii_slug(self.person)}@{customer.domain}",
            "company": lambda: customer.name,
            "plan": lambda: customer.plan.capitalize(),
            "competitor": lambda: self.competitor,
            "mrr": lambda: f"{customer.mrr_usd:,.2f}" if customer.mrr_usd else "1,180.00",
            "integration": lambda: rng.choice(INTEGRATIONS),
            "idp": lambda: rng.choice(IDPS),
            "dashboard": lambda: rng.choice(DASHBOARDS),
            "export_fmt": lambda: rng.choice(EXPORT_FORMATS),
            "browser": lambda: rng.choice(BROWSERS),
            "region": lambda: rng.choice(REGIONS),
            "team": lambda: rng.choice(TEAMS),
            "tz": lambda: rng.choice(TIMEZONES),
            "metric": lambda: rng.choice(METRICS),
            "street": lambda: rng.choice(STREETS),
            "product": lambda: rng.choice(PRODUCTS),
            "weekday": lambda: rng.choice(WEEKDAYS),
            "n": lambda: str(rng.choice([2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40])),
            "years": lambda: rng.choice(["two", "three", "4", "5", "a couple of"]),
            "hours": lambda: str(rng.choice([2, 3, 4, 5, 6, 9, 11])),
            "minutes": lambda: str(rng.choice([15, 20, 25, 40, 45, 50, 90])),
            "pct": lambda: str(rng.choice([18, 22, 25, 30, 35, 40, 45, 60])),
            "pct_over": lambda: str(rng.choice([101, 102, 104, 112, 97])),
            "code": lambda: str(rng.choice([500, 502, 503, 504, 429, 401])),
            "rate": lambda: str(rng.choice([300, 600, 1000, 1200])),
            "rate_low": lambda: str(rng.choice([60, 100, 120, 150, 240])),
            "seats": lambda: str(max(customer.seats, 2)),
            "seats2": lambda: str(max(1, customer.seats - rng.randint(1, max(1, customer.seats // 3)))),
            "amount": lambda: f"{rng.randint(80, 9800):,}.{rng.choice(['00', '00', '50', '99'])}",
            "inv": lambda: f"INV-{created_at.year}-{rng.randint(1000, 9999):05d}",
            "order": lambda: f"ORD-{rng.randint(10000, 99999)}",
            "po": lambda: f"PO-{rng.randint(100000, 999999)}",
            "reqid": lambda: f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}",
            "wsid": lambda: f"ws_{rng.getrandbits(40):010x}",
            "ticket_ref": lambda: str(rng.randint(10000, 48000)),
            "time": lambda: f"{rng.randint(6, 17)}:{rng.choice(['00', '05', '15', '30', '40', '45'])}",
            "date": self._date_past,
            "date_future": self._date_future,
            "month_now": lambda: MONTHS[created_at.month - 1],
            "month_future": lambda: MONTHS[(created_at.month - 1 + rng.randint(1, 4)) % 12],
        }

    def _fmt_day(self, d: date) -> str:
        style = self.rng.randint(0, 3)
        if style == 0:
            return f"{MONTHS[d.month - 1][:3]} {d.day}"
        if style == 1:
            return f"{d.day} {MONTHS[d.month - 1]}"
        if style == 2:
            return d.isoformat()
        return f"{d.month}/{d.day}"

    def _date_past(self) -> str:
        return self._fmt_day(self.created_at.date() - timedelta(days=self.rng.randint(1, 21)))

    def _date_future(self) -> str:
        return self._fmt_day(self.created_at.date() + timedelta(days=self.rng.randint(5, 75)))

    def fill(self, template: str) -> str:
        return re.sub(r"\{(\w+)\}", lambda m: self.providers[m.group(1)](), template)


def add_typos(rng: random.Random, text: str, count: int) -> str:
    """Introduce up to ``count`` realistic typos, never touching words containing 'cancel'."""
    words = text.split(" ")
    for _ in range(count):
        candidates = [
            i
            for i, w in enumerate(words)
            if re.fullmatch(r"[a-z]{3,}[,.?!]?", w) and "cancel" not in w
        ]
        if not candidates:
            break
        i = rng.choice(candidates)
        word = words[i]
        core, tail = (word[:-1], word[-1]) if word[-1] in ",.?!" else (word, "")
        if core in MISSPELLINGS and rng.random() < 0.7:
            core = MISSPELLINGS[core]
        elif len(core) >= 5:
            op = rng.randint(0, 2)
            j = rng.randint(1, len(core) - 2)
            if op == 0:
                core = core[:j] + core[j + 1] + core[j] + core[j + 2 :]
            elif op == 1:
                core = core[:j] + core[j + 1 :]
            else:
                core = core[:j] + core[j] + core[j:]
        words[i] = core + tail
    return " ".join(words)


PROPER_WORDS = frozenset(
    w
    for name in [*FIRST_NAMES, *AGENTS, *COMPETITORS, *INTEGRATIONS, *IDPS, *DASHBOARDS, *PRODUCTS]
    for w in name.split()
) | {"I", "I'm", "I've", "I'd", "I'll"}


def decapitalize(text: str) -> str:
    """Lower-case the first letter unless the first word is a name, acronym or 'I'."""
    first = re.split(r"[\s,.?!']", text, maxsplit=1)[0]
    if not first or first in PROPER_WORDS or first.split("'")[0] in PROPER_WORDS:
        return text
    if sum(ch.isupper() for ch in first) > 1:
        return text
    return text[0].lower() + text[1:]


MAX_SENTENCES = 6


def count_sentences(parts: Sequence[str]) -> int:
    """Rough sentence count; a greeting such as "Hi team," does not count."""
    return sum(len(re.findall(r"[.?!]+(?=\s|$)", p)) or (1 if p and not p.endswith(",") else 0) for p in parts)


def join_sentences(parts: Sequence[str]) -> str:
    return " ".join(p for p in parts if p).strip()


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------


def make_customers(rng: random.Random) -> list[Customer]:
    plans = [plan for plan, count in PLAN_COUNTS.items() for _ in range(count)]
    rng.shuffle(plans)
    used: set[str] = set()
    rows: list[tuple[date, str, str, str, int, float]] = []
    for plan in plans:
        country = weighted(rng, list(COUNTRY_WEIGHTS), list(COUNTRY_WEIGHTS.values()))
        while True:
            base = f"{rng.choice(NAME_PREFIXES)} {rng.choice(NAME_NOUNS)}"
            if rng.random() < 0.55:
                base = f"{base} {rng.choice(LEGAL_SUFFIXES[country])}"
            if base.split()[0] + base.split()[1] not in used:
                used.add(base.split()[0] + base.split()[1])
                break
        if plan == "free":
            seats = rng.randint(1, 3)
        elif plan == "starter":
            seats = rng.randint(2, 15)
        elif plan == "pro":
            seats = rng.randint(8, 75)
        else:
            seats = min(1500, max(60, int(rng.lognormvariate(5.3, 0.6))))
        mrr = seats * PER_SEAT_USD[plan]
        if plan == "enterprise":
            mrr *= 1 - rng.uniform(0.05, 0.30)  # negotiated discount
        if plan in ("pro", "enterprise") and rng.random() < 0.4:
            mrr += 299.0 if plan == "pro" else 899.0  # Analytics add-on
        signup = random_date(rng, SIGNUP_START, SIGNUP_END)
        rows.append((signup, base, plan, country, seats, round(mrr, 2)))
    rows.sort(key=lambda r: r[0])
    return [
        Customer(i + 1, name, plan, country, signup, seats, mrr)
        for i, (signup, name, plan, country, seats, mrr) in enumerate(rows)
    ]


def make_orders(rng: random.Random, customers: list[Customer]) -> list[list[str]]:
    plan_weight = {"free": 0.15, "starter": 1.5, "pro": 3.0, "enterprise": 6.0}
    weights = [plan_weight[c.plan] for c in customers]
    orders: list[tuple[date, int, str, float, str]] = []
    for _ in range(N_ORDERS):
        c = weighted(rng, customers, weights)
        start = max(ORDERS_START, c.signup_date)
        order_date = random_date(rng, start, ORDERS_END)
        product_weights = [45, 20, 10 if c.plan in ("pro", "enterprise") else 0, 15, 10]
        product = weighted(rng, PRODUCTS, product_weights)
        discount = rng.uniform(0.0, 0.2) if c.plan == "enterprise" else 0.0
        if product == "Core seats":
            qty = rng.randint(1, max(1, min(c.seats, 60)))
            per_seat = PER_SEAT_USD[c.plan] or 15.0
            amount = qty * per_seat * rng.choice([1, 1, 1, 12])
        elif product == "Analytics add-on":
            base = {"free": 49.0, "starter": 99.0, "pro": 299.0, "enterprise": 899.0}[c.plan]
            amount = base * rng.choice([1, 1, 1, 12])
        elif product == "Premium support":
            amount = rng.uniform(1500, 6000) if c.plan == "enterprise" else rng.uniform(500, 1500)
        elif product == "Storage pack":
            amount = rng.choice([49.0, 99.0, 249.0]) * rng.randint(1, 3)
        else:
            amount = rng.choice([750.0, 1500.0, 3000.0])
        amount = round(amount * (1 - discount), 2)
        if (ORDERS_END - order_date).days <= 14:
            status = weighted(rng, ["paid", "pending", "failed", "refunded"], [50, 40, 8, 2])
        else:
            status = weighted(rng, ["paid", "refunded", "pending", "failed"], [86, 6, 3, 5])
        orders.append((order_date, c.customer_id, product, amount, status))
    orders.sort(key=lambda o: (o[0], o[1]))
    return [
        [str(i + 1), str(cid), d.isoformat(), product, fmt_money(amount), status]
        for i, (d, cid, product, amount, status) in enumerate(orders)
    ]


def pick_tone(rng: random.Random, churn: bool) -> str:
    if churn:
        return weighted(rng, ["angry", "polite", "terse", "rambling"], [42, 28, 18, 12])
    return weighted(rng, ["polite", "terse", "angry", "rambling"], [45, 25, 15, 15])


def compose(
    rng: random.Random,
    ctx: TextContext,
    tone: str,
    middle: list[str],
    category: str | None,
    channel: str,
) -> str:
    """Wrap the core sentences of a ticket in tone- and channel-appropriate framing.

    E-mails get a greeting line and a multi-line signature; chat and web-form tickets are
    a single paragraph; phone tickets are the agent's call notes (no greeting/signature).
    """
    opener = ""
    if tone != "terse" and channel != "phone" and rng.random() < 0.8:
        opener = rng.choice(OPENERS[tone])
    filler = [rng.choice(FILLERS)] if tone == "rambling" else []
    details: list[str] = []
    if category is not None:
        n_details = {
            "terse": rng.randint(0, 1),
            "polite": rng.randint(0, 2),
            "angry": rng.randint(0, 2),
            "rambling": rng.randint(1, 2),
        }[tone]
        details = rng.sample(DETAILS[category], n_details)
    closing = []
    if rng.random() < 0.75 and channel != "phone":
        closing = [rng.choice(CLOSINGS[tone])]
    # Keep bodies to at most MAX_SENTENCES: drop details, then closing, filler and opener.
    while count_sentences([opener, *filler, *middle, *details, *closing]) > MAX_SENTENCES:
        if details:
            details.pop()
        elif closing:
            closing = []
        elif filler:
            filler = []
        else:
            opener = ""
            break
    sentences = [*filler, *middle, *details, *closing]
    body = join_sentences(sentences)
    if tone == "terse" and body and rng.random() < 0.4:
        body = decapitalize(body)
    if channel == "email":
        greeting = opener if opener.endswith(",") else ""  # "Hi team," goes on its own line
        if not greeting:
            body = join_sentences([opener, body])
        text = "\n\n".join(b for b in (greeting, body, rng.choice(SIGNOFFS_EMAIL)) if b)
    elif channel == "phone":
        text = f"{rng.choice(['[Call notes] Customer said: ', 'Caller: ', 'Phone call - '])}{body}"
    else:
        if opener.endswith(",") and rng.random() < 0.6:
            body = decapitalize(body)  # "Hi all, please add ..."
        signoff = rng.choice(SIGNOFFS_INLINE) if tone != "terse" else ""
        text = join_sentences([opener, body, signoff])
    text = ctx.fill(text)
    typo_rate = {"polite": 0.12, "terse": 0.35, "angry": 0.35, "rambling": 0.4}[tone]
    if rng.random() < typo_rate:
        text = add_typos(rng, text, rng.randint(1, 2))
    if tone == "angry" and rng.random() < 0.15:
        text = text.replace(". ", "!! ", 1)
    return text


def pick_subject(
    rng: random.Random, ctx: TextContext, category: str, first_sentence: str, channel: str
) -> str:
    """Web forms and chats often use the start of the message as the subject."""
    if channel in ("web", "chat") and rng.random() < 0.5:
        if len(first_sentence) <= 60:
            return first_sentence
        return first_sentence[:57].rsplit(" ", 1)[0] + "..."
    return ctx.fill(rng.choice(SUBJECTS[category]))


def pick_priority(rng: random.Random, category: str, tone: str, churn: bool, plan: str) -> str:
    levels = ["low", "normal", "high", "urgent"]
    if churn:
        level = weighted(rng, [1, 2, 3], [20, 50, 30])
    elif category == "outage":
        level = weighted(rng, [2, 3], [40, 60])
    elif category == "bug":
        level = weighted(rng, [1, 2], [65, 35])
    elif category == "praise":
        level = 0
    else:
        level = weighted(rng, [0, 1, 2], [35, 55, 10])
    if tone == "angry" and level < 3 and rng.random() < 0.5:
        level += 1
    if plan == "enterprise" and level < 3 and rng.random() < 0.2:
        level += 1
    return levels[level]


def pick_channel(rng: random.Random) -> str:
    return weighted(rng, ["email", "web", "chat", "phone"], [40, 25, 25, 10])


def make_tickets(rng: random.Random, customers: list[Customer]) -> list[Ticket]:
    tickets: list[Ticket] = []
    churn_plan_weight = {"free": 0.2, "starter": 1.0, "pro": 3.0, "enterprise": 5.0}
    plan_weight = {"free": 0.6, "starter": 1.2, "pro": 2.0, "enterprise": 3.0}
    churn_weights = [churn_plan_weight[c.plan] for c in customers]
    weights = [plan_weight[c.plan] for c in customers]

    def ticket_time(c: Customer, recent: bool) -> datetime:
        start = RECENT_START if recent else TICKETS_START
        day_after_signup = datetime.combine(c.signup_date, datetime.min.time()) + timedelta(days=1)
        return random_timestamp(rng, max(start, day_after_signup), TICKETS_END)

    # Churn threats: skewed to enterprise/pro customers and to the last 90 days.
    explicit_flags = [i < round(N_CHURN * 0.45) for i in range(N_CHURN)]
    rng.shuffle(explicit_flags)
    for explicit in explicit_flags:
        c = weighted(rng, customers, churn_weights)
        created = ticket_time(c, recent=rng.random() < 0.7)
        ctx = TextContext(rng, c, created)
        channel = pick_channel(rng)
        reason = weighted(rng, CHURN_REASONS, CHURN_REASON_WEIGHTS)
        category = REASON_CATEGORY[reason]
        tone = pick_tone(rng, churn=True)
        contexts = [ctx.fill(t) for t in rng.sample(CHURN_CONTEXT[reason], 2)]
        n_ctx = 2 if tone in ("rambling", "polite") and rng.random() < 0.6 else 1
        if explicit:
            threat = rng.choice(CHURN_THREAT_EXPLICIT)
        else:
            threat = rng.choice(CHURN_THREAT_IMPLICIT + CHURN_THREAT_IMPLICIT_BY_REASON[reason] * 3)
        middle = [*contexts[:n_ctx], ctx.fill(threat)]
        body = compose(rng, ctx, tone, middle, None, channel)
        assert ("cancel" in body.lower()) == explicit, body
        if explicit and rng.random() < 0.4:
            subject = rng.choice(CHURN_SUBJECTS_EXPLICIT)
        elif rng.random() < 0.5:
            subject = rng.choice(CHURN_SUBJECTS_NEUTRAL)
        else:
            subject = pick_subject(rng, ctx, category, middle[0], channel)
        priority = pick_priority(rng, category, tone, True, c.plan)
        tickets.append(
            Ticket(c, created, channel, priority, subject, body, True, reason, category, "negative")
        )

    # Hard negatives: say "cancel" but do not threaten churn.
    for i in range(N_HARD_NEGATIVES):
        c = weighted(rng, customers, weights)
        created = ticket_time(c, recent=rng.random() < 0.35)
        ctx = TextContext(rng, c, created)
        channel = pick_channel(rng)
        category, text = HARD_NEGATIVES[i % len(HARD_NEGATIVES)]
        tone = weighted(rng, ["polite", "terse", "rambling", "angry"], [55, 25, 12, 8])
        middle = [ctx.fill(text)]
        body = compose(rng, ctx, tone, middle, category, channel)
        assert "cancel" in body.lower(), body
        if category == "praise":
            sentiment = "positive"
        else:
            sentiment = "negative" if tone == "angry" else "neutral"
        subject = pick_subject(rng, ctx, category, middle[0], channel)
        priority = pick_priority(rng, category, tone, False, c.plan)
        tickets.append(
            Ticket(c, created, channel, priority, subject, body, False, "", category, sentiment)
        )

    # Auto-generated texts, repeated verbatim (each template at least once).
    for i in range(N_AUTO):
        c = weighted(rng, customers, weights)
        created = ticket_time(c, recent=False)
        if i < len(AUTO_BODIES):
            body, category, channel = AUTO_BODIES[i]
        else:
            body, category, channel = weighted(rng, AUTO_BODIES, [40, 20, 15, 15, 10])
        priority = "normal" if category == "account" else "low"
        subject = AUTO_SUBJECTS[category]
        tickets.append(
            Ticket(c, created, channel, priority, subject, body, False, "", category, "neutral")
        )

    # Everything else: ordinary tickets composed from category fragments.
    for _ in range(N_TICKETS - len(tickets)):
        c = weighted(rng, customers, weights)
        created = ticket_time(c, recent=False)
        ctx = TextContext(rng, c, created)
        channel = pick_channel(rng)
        category = weighted(rng, CATEGORIES, CATEGORY_WEIGHTS)
        if category == "praise":
            tone = weighted(rng, ["polite", "rambling", "terse"], [70, 20, 10])
        else:
            tone = pick_tone(rng, churn=False)
        n_core = 2 if tone == "rambling" and rng.random() < 0.4 else 1
        middle = [ctx.fill(t) for t in rng.sample(CORE[category], n_core)]
        body = compose(rng, ctx, tone, middle, category, channel)
        if category == "praise":
            sentiment = "positive"
        elif tone == "angry" or category == "outage":
            sentiment = "negative"
        else:
            sentiment = "neutral"
        subject = pick_subject(rng, ctx, category, middle[0], channel)
        priority = pick_priority(rng, category, tone, False, c.plan)
        tickets.append(
            Ticket(c, created, channel, priority, subject, body, False, "", category, sentiment)
        )

    tickets.sort(key=lambda t: t.created_at)
    return tickets


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        writer.writerow(header)
        writer.writerows(rows)


def generate(out_dir: Path) -> None:
    rng = random.Random(SEED)
    customers = make_customers(rng)
    orders = make_orders(rng, customers)
    tickets = make_tickets(rng, customers)

    source = out_dir / "source"
    write_csv(
        source / "customers.csv",
        ["customer_id", "name", "plan", "country", "signup_date", "seats", "mrr_usd"],
        [
            [
                str(c.customer_id),
                c.name,
                c.plan,
                c.country,
                c.signup_date.isoformat(),
                str(c.seats),
                fmt_money(c.mrr_usd),
            ]
            for c in customers
        ],
    )
    write_csv(
        source / "orders.csv",
        ["order_id", "customer_id", "order_date", "product", "amount_usd", "status"],
        orders,
    )
    write_csv(
        source / "tickets.csv",
        ["ticket_id", "customer_id", "created_at", "channel", "priority", "subject", "body"],
        [
            [
                str(i + 1),
                str(t.customer.customer_id),
                t.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                t.channel,
                t.priority,
                t.subject,
                t.body,
            ]
            for i, t in enumerate(tickets)
        ],
    )
    write_csv(
        out_dir / "ground_truth" / "ticket_labels.csv",
        ["ticket_id", "threatens_cancel", "churn_reason", "category", "sentiment"],
        [
            [
                str(i + 1),
                "true" if t.threatens_cancel else "false",
                t.churn_reason,
                t.category,
                t.sentiment,
            ]
            for i, t in enumerate(tickets)
        ],
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="output directory; source/ and ground_truth/ are created inside (default: data/)",
    )
    args = parser.parse_args(argv)
    generate(args.out)


if __name__ == "__main__":
    main()
