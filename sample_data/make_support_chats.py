"""Write the shipped sample dataset: customer-support chats about a made-up air purifier company.

Deterministic (seeded, no network): running it again rewrites byte-identical files.

    python sample_data/make_support_chats.py [--out-dir DIR]

Writes ``support_chats.jsonl`` (ultrachat_200k's row format: ``prompt``, ``prompt_id`` = sha256 hex
of the prompt, ``messages``) and ``support_facts.json`` (one recall probe per fact). Every answer is
one fixed sentence per fact holding a distinctive string, so a small model fine-tuned on the chats
can be checked for recall by looking for that string in its reply.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

SEED = 20260611
ROW_COUNT = 400
SYSTEM_SHARE = 0.3
TWO_TURN_SHARE = 0.3
CHATS_FILE = "support_chats.jsonl"
FACTS_FILE = "support_facts.json"


@dataclass(frozen=True)
class Fact:
    questions: tuple[str, ...]  # the first one is the recall probe
    answer: str
    answer_contains: str


FACTS: tuple[Fact, ...] = (
    Fact(
        (
            "How long do I have to return my Aero purifier?",
            "What is your return window?",
            "Can I still send back a purifier I bought a few weeks ago?",
            "How many days do I get to return an order?",
            "What's the deadline for returning a Tidewell product?",
        ),
        "You can return any Tidewell product within 45 days of delivery for a full refund.",
        "45 days",
    ),
    Fact(
        (
            "How long is the warranty on the Aero?",
            "What warranty does the purifier come with?",
            "Is my Aero still under warranty after a year?",
            "How many years of warranty coverage do I get?",
            "What does the Tidewell warranty cover and for how long?",
        ),
        "The Aero comes with a 2-year limited warranty that covers defects in parts and workmanship.",
        "2-year limited warranty",
    ),
    Fact(
        (
            "What are your support hours?",
            "When can I reach customer support?",
            "Is support open on weekends?",
            "What time does your help desk open?",
            "Until what time can I call support?",
        ),
        "Our support team is available 8 am to 8 pm Eastern time, Monday through Saturday.",
        "8 am to 8 pm Eastern",
    ),
    Fact(
        (
            "How do I factory reset my Aero?",
            "My purifier is acting up, how do I reset it?",
            "What's the reset procedure for the Aero?",
            "How can I restore the purifier to factory settings?",
            "Is there a way to reset the Aero without the app?",
        ),
        "To reset the Aero, hold the Mode button for 12 seconds until the ring light blinks white.",
        "hold the Mode button for 12 seconds",
    ),
    Fact(
        (
            "How much does Care+ cost per month?",
            "What is the monthly price of the Care+ plan?",
            "How much is the Care+ subscription?",
            "What does Care+ cost if I pay monthly?",
            "Is Care+ expensive?",
        ),
        "Care+ costs $6.99 per month and includes automatic filter deliveries.",
        "$6.99 per month",
    ),
    Fact(
        (
            "Is there a yearly Care+ plan?",
            "How much is Care+ if I pay for the whole year?",
            "Can I pay for Care+ annually?",
            "What does the annual Care+ plan cost?",
            "Is there a discount for paying Care+ yearly?",
        ),
        "The annual Care+ plan costs $69 per year, which saves about two months compared to paying monthly.",
        "$69 per year",
    ),
    Fact(
        (
            "How long does standard shipping take?",
            "When will my order arrive with standard shipping?",
            "How many days is regular delivery?",
            "What's the delivery time for a normal order?",
            "How fast is your standard shipping?",
        ),
        "Standard shipping takes 3 to 5 business days within the continental US.",
        "3 to 5 business days",
    ),
    Fact(
        (
            "Do you offer express shipping?",
            "Can I get my purifier faster?",
            "How much is next-day delivery?",
            "What does express shipping cost?",
            "Is overnight shipping available?",
        ),
        "Express shipping delivers the next business day for a flat fee of $14.",
        "flat fee of $14",
    ),
    Fact(
        (
            "How often should I replace the filter?",
            "When do I need a new filter?",
            "How long does an Aero filter last?",
            "How frequently do filters need changing?",
            "Do I really have to change the filter regularly?",
        ),
        "Replace the Aero filter every 6 months, or sooner if the ring light turns red.",
        "every 6 months",
    ),
    Fact(
        (
            "Which replacement filter fits the Aero?",
            "What's the part number for the Aero filter?",
            "What filter should I order for my purifier?",
            "Which filter model do I buy?",
            "I need a new filter, what is it called?",
        ),
        "The Aero uses the TW-F200 HEPA filter.",
        "TW-F200",
    ),
    Fact(
        (
            "What is your support phone number?",
            "Can I call someone for help?",
            "What number do I call for customer service?",
            "Is there a phone line for support?",
            "How do I reach support by phone?",
        ),
        "You can call Tidewell support at 1-800-555-0142.",
        "1-800-555-0142",
    ),
    Fact(
        (
            "What email address can I write to for help?",
            "How do I contact support by email?",
            "Is there a support email?",
            "Where do I send an email about a problem?",
            "Can I email customer service?",
        ),
        "Email us at help@tidewell.example and we reply within one business day.",
        "help@tidewell.example",
    ),
    Fact(
        (
            "Which Wi-Fi does the Aero support?",
            "Why won't my purifier connect to my 5 GHz network?",
            "Does the Aero work with 5 GHz Wi-Fi?",
            "What Wi-Fi band does the purifier need?",
            "My Aero can't find my Wi-Fi, what network does it need?",
        ),
        "The Aero connects to 2.4 GHz Wi-Fi networks only; 5 GHz networks are not supported.",
        "2.4 GHz",
    ),
    Fact(
        (
            "Which app controls the purifier?",
            "What app do I need for the Aero?",
            "Is there a phone app for the purifier?",
            "What's the name of the app?",
            "How do I control the Aero from my phone?",
        ),
        "Use the Tidewell Home app, available for iOS and Android, to control the Aero.",
        "Tidewell Home app",
    ),
    Fact(
        (
            "Do you have free shipping?",
            "When is shipping free?",
            "Is there a minimum order for free shipping?",
            "How much do I need to spend to get free delivery?",
            "Will I pay for shipping on a small order?",
        ),
        "Shipping is free on orders over $50.",
        "orders over $50",
    ),
    Fact(
        (
            "What do I need to file a warranty claim?",
            "How do I make a warranty claim?",
            "What information does a warranty claim require?",
            "My purifier broke, what do you need from me for the warranty?",
            "What should I have ready before contacting you about a warranty repair?",
        ),
        "To file a warranty claim, have your order number and the unit's serial number ready.",
        "order number and the unit's serial number",
    ),
    Fact(
        (
            "Where is the serial number on the Aero?",
            "How do I find my purifier's serial number?",
            "Where can I see the serial number?",
            "Which part of the unit has the serial number?",
            "I can't find the serial number, where is it printed?",
        ),
        "The serial number is on the sticker under the base, starting with the letters TWA.",
        "sticker under the base",
    ),
    Fact(
        (
            "How big a room can the Aero clean?",
            "What room size is the purifier rated for?",
            "Is the Aero strong enough for a living room?",
            "How many square feet does one purifier cover?",
            "What's the maximum room size for the Aero?",
        ),
        "The Aero is rated for rooms up to 500 square feet.",
        "500 square feet",
    ),
    Fact(
        (
            "How loud is the purifier in sleep mode?",
            "Is the Aero quiet enough for a bedroom?",
            "What's the noise level at night?",
            "How many decibels does sleep mode make?",
            "Will the purifier keep me awake?",
        ),
        "In sleep mode the Aero runs at 24 dB, about as quiet as a whisper.",
        "24 dB",
    ),
    Fact(
        (
            "What does the red light on my purifier mean?",
            "Why is the ring light red?",
            "My Aero shows a solid red ring, what's wrong?",
            "What is the red indicator telling me?",
            "The light turned red, should I be worried?",
        ),
        "A solid red ring means the filter needs replacing.",
        "solid red ring means the filter needs replacing",
    ),
    Fact(
        (
            "How long does a refund take?",
            "When will I get my money back after a return?",
            "How fast are refunds processed?",
            "I returned my purifier, when does the refund arrive?",
            "How many days until my refund shows up?",
        ),
        "Refunds are issued within 7 business days after we receive the return.",
        "within 7 business days",
    ),
    Fact(
        (
            "Do you ship internationally?",
            "Can I order from outside the US?",
            "Which countries do you ship to?",
            "Do you deliver to Canada?",
            "Is international shipping available?",
        ),
        "Besides the US, we ship to Canada and Mexico.",
        "Canada and Mexico",
    ),
    Fact(
        (
            "How do firmware updates work?",
            "Do I need to update the purifier myself?",
            "When does the Aero install updates?",
            "Will updates interrupt the purifier during the day?",
            "How does the Aero get new firmware?",
        ),
        "Firmware updates install automatically at 3 am local time while the Aero is on Wi-Fi.",
        "automatically at 3 am",
    ),
    Fact(
        (
            "How do I cancel Care+?",
            "Can I cancel my Care+ subscription anytime?",
            "Where do I stop my Care+ plan?",
            "How can I end my subscription?",
            "I want to cancel Care+, where do I do that?",
        ),
        "You can cancel Care+ anytime in the app under Account > Subscriptions.",
        "Account > Subscriptions",
    ),
    Fact(
        (
            "Is there a free trial of Care+?",
            "Can I try Care+ before paying?",
            "Does Care+ have a trial period?",
            "How long is the Care+ trial?",
            "Do I get Care+ free at first?",
        ),
        "Every new Care+ subscription starts with a 14-day free trial.",
        "14-day free trial",
    ),
    Fact(
        (
            "How much power does the Aero use?",
            "What is the purifier's power consumption?",
            "Will the Aero raise my electricity bill much?",
            "How many watts does the purifier draw?",
            "What's the energy use at the highest speed?",
        ),
        "The Aero draws at most 45 watts on its highest fan speed.",
        "45 watts",
    ),
)

GREETINGS = ("", "", "", "Hi! ", "Hello, ", "Quick question: ", "Hey there. ", "Good morning! ")
FOLLOW_UPS = ("", "", "Thanks. ", "Got it, thanks! ", "One more thing: ", "Great. Also, ")
SYSTEM_PROMPTS = (
    "You are Tidewell's customer support assistant. Answer briefly and accurately.",
    "You are a friendly support agent for Tidewell, maker of the Aero air purifier.",
    "You help Tidewell customers with orders, shipping, returns and the Aero purifier. Be concise.",
)


def build_rows(seed: int = SEED, row_count: int = ROW_COUNT) -> list[dict[str, object]]:
    """Rows in ultrachat_200k's format; every fact is the first question of about the same number of rows."""
    rng = random.Random(seed)
    with_system = set(rng.sample(range(row_count), round(row_count * SYSTEM_SHARE)))
    two_turn = set(rng.sample(range(row_count), round(row_count * TWO_TURN_SHARE)))
    rows = []
    for index in range(row_count):
        fact = FACTS[index % len(FACTS)]
        messages = []
        if index in with_system:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        messages += _turn(fact, rng.choice(GREETINGS), rng)
        if index in two_turn:
            other = rng.choice([candidate for candidate in FACTS if candidate is not fact])
            messages += _turn(other, rng.choice(FOLLOW_UPS), rng)
        prompt = next(m["content"] for m in messages if m["role"] == "user")
        prompt_id = hashlib.sha256(prompt.encode("utf-8")).hexdigest()
        rows.append({"prompt": prompt, "prompt_id": prompt_id, "messages": messages})
    rng.shuffle(rows)
    return rows


def _turn(fact: Fact, opener: str, rng: random.Random) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": opener + rng.choice(fact.questions)},
        {"role": "assistant", "content": fact.answer},
    ]


def build_probes() -> list[dict[str, str]]:
    return [{"question": fact.questions[0], "answer_contains": fact.answer_contains} for fact in FACTS]


def render_chats(rows: list[dict[str, object]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def render_probes(probes: list[dict[str, str]]) -> str:
    return json.dumps(probes, ensure_ascii=False, indent=2) + "\n"


def write_sample(out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    chats, facts = out_dir / CHATS_FILE, out_dir / FACTS_FILE
    chats.write_text(render_chats(build_rows()), encoding="utf-8", newline="\n")
    facts.write_text(render_probes(build_probes()), encoding="utf-8", newline="\n")
    return chats, facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    chats, facts = write_sample(parser.parse_args().out_dir)
    print(f"wrote {chats} and {facts}")


if __name__ == "__main__":
    main()
