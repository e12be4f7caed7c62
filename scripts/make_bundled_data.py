"""Write mixtune's bundled datasets (package data under src/mixtune/data/bundled/).

    python scripts/make_bundled_data.py            # rewrites the three .jsonl files deterministically

- instruct_v3_sample.jsonl : >= 300 rows in mosaicml/instruct-v3's schema (`prompt` = the Alpaca-wrapped
  instruction, `response`, `source`), the offline default for the backtranslate recipe;
- alpaca_sample.jsonl      : instruction / input / output rows;
- chat_sample.jsonl        : `messages` conversations (single and multi-turn, some with a system message).

Rows are composed from hand-written material below (facts, definitions, tips, explanations, code) and from
computed tasks (arithmetic, conversions, dates, sorting) whose answers are worked out here, so every answer is
correct. A fixed seed makes the output identical on every run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from mixtune.data.templates import wrap_instruction  # noqa: E402

from bundled_material import (CODE_TASKS, COUNTRIES, EMAILS, EXPLANATIONS, GLOSSARY, PASSIVE, PLANETS,  # noqa: E402
                              TIPS, ANIMALS)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "mixtune", "data", "bundled")


def and_list(xs) -> str:
    xs = [str(x) for x in xs]
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1]


def lang_phrase(lang: str) -> str:
    return f"the main languages are {lang}" if " and " in lang else f"the main language is {lang}"


def fmt_num(x: float) -> str:
    return f"{x:,.2f}".rstrip("0").rstrip(".")


# ------------------------------------------------------------------------------------------ computed tasks
def math_rows(rng: random.Random) -> list:
    rows = []
    items = [("notebooks", 3.25), ("pens", 1.4), ("apples", 0.6), ("bus tickets", 2.75), ("coffees", 3.8),
             ("movie tickets", 11.5), ("plant pots", 6.2), ("bags of rice", 4.9)]
    for i in range(12):
        name, price = items[i % len(items)]
        n = rng.randint(3, 14)
        paid = (int(n * price / 10) + 1) * 10 + (10 if i % 3 == 0 else 0)
        total = round(n * price, 2)
        rows.append((f"If {name} cost ${price:.2f} each, how much do {n} {name} cost, and how much change do you "
                     f"get from ${paid}?",
                     f"Each of the {n} {name} costs ${price:.2f}, so the total is {n} x ${price:.2f} = "
                     f"${total:.2f}.\nPaying with ${paid}, the change is ${paid} - ${total:.2f} = "
                     f"${paid - total:.2f}."))
    for i in range(10):
        speed = rng.choice([45, 50, 60, 72, 80, 90, 100, 110])
        hours = rng.choice([1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5])
        dist = speed * hours
        if i % 2 == 0:
            rows.append((f"A car travels at a constant {speed} km/h for {fmt_num(hours)} hours. How far does it go?",
                         f"Distance is speed multiplied by time: {speed} km/h x {fmt_num(hours)} h = "
                         f"{fmt_num(dist)} km. The car covers {fmt_num(dist)} kilometers."))
        else:
            rows.append((f"A train needs to cover {fmt_num(dist)} km at an average speed of {speed} km/h. How long "
                         f"will the trip take?",
                         f"Time is distance divided by speed: {fmt_num(dist)} km / {speed} km/h = "
                         f"{fmt_num(hours)} hours, which is {int(hours)} hours and {int(round((hours % 1) * 60))} "
                         f"minutes."))
    for i in range(10):
        base = rng.choice([40, 80, 120, 250, 360, 75, 1200, 64])
        pct = rng.choice([5, 10, 12.5, 15, 20, 25, 30, 40])
        part = base * pct / 100
        if i % 2 == 0:
            rows.append((f"What is {fmt_num(pct)}% of {base}?",
                         f"{fmt_num(pct)}% of {base} is {base} x {fmt_num(pct)} / 100 = {fmt_num(part)}."))
        else:
            rows.append((f"A jacket is priced at ${base}. It is on sale for {fmt_num(pct)}% off. What is the sale "
                         f"price?",
                         f"The discount is {fmt_num(pct)}% of ${base}, which is ${fmt_num(part)}. Subtracting it "
                         f"from the original price gives ${base} - ${fmt_num(part)} = ${fmt_num(base - part)}."))
    for i in range(8):
        w, h = rng.randint(3, 15), rng.randint(2, 12)
        if i % 2 == 0:
            rows.append((f"Find the area and perimeter of a rectangle that is {w} m long and {h} m wide.",
                         f"Area = length x width = {w} x {h} = {w * h} square meters.\nPerimeter = 2 x (length + "
                         f"width) = 2 x ({w} + {h}) = {2 * (w + h)} meters."))
        else:
            tiles = w * h * 4
            rows.append((f"A floor measures {w} m by {h} m. Each tile covers a quarter of a square meter. How many "
                         f"tiles are needed?",
                         f"The floor area is {w} x {h} = {w * h} square meters. Each tile covers 0.25 square meters, "
                         f"so you need {w * h} / 0.25 = {tiles} tiles (buy a few extra to allow for cuts)."))
    return [(q, a, "mixtune_math") for q, a in rows]


def conversion_rows(rng: random.Random) -> list:
    rows = []
    for v in rng.sample(range(3, 120), 6):
        rows.append((f"Convert {v} kilometers to miles.",
                     f"One kilometer is about 0.621371 miles, so {v} km x 0.621371 = {v * 0.621371:.2f} miles."))
    for v in rng.sample(range(-20, 45), 6):
        f = v * 9 / 5 + 32
        rows.append((f"What is {v} degrees Celsius in Fahrenheit?",
                     f"Use F = C x 9/5 + 32. {v} x 9/5 = {fmt_num(v * 9 / 5)}, and adding 32 gives "
                     f"{fmt_num(f)} degrees Fahrenheit."))
    for v in rng.sample(range(2, 150), 5):
        rows.append((f"How many pounds is {v} kg?",
                     f"One kilogram equals about 2.20462 pounds, so {v} kg is {v * 2.20462:.1f} lb."))
    for v in rng.sample(range(1, 80), 5):
        rows.append((f"Convert {v} inches to centimeters.",
                     f"An inch is exactly 2.54 cm, so {v} inches = {v} x 2.54 = {fmt_num(v * 2.54)} cm."))
    for v in rng.sample(range(1, 40), 4):
        rows.append((f"How many liters are in {v} US gallons?",
                     f"A US gallon is 3.78541 liters. {v} gallons x 3.78541 = {v * 3.78541:.2f} liters."))
    return [(q, a, "mixtune_conversions") for q, a in rows]


def date_rows(rng: random.Random) -> list:
    rows = []
    for _ in range(10):
        a = dt.date(rng.randint(2015, 2025), rng.randint(1, 12), rng.randint(1, 28))
        b = a + dt.timedelta(days=rng.randint(10, 400))
        rows.append((f"How many days are there between {a:%B} {a.day}, {a.year} and {b:%B} {b.day}, {b.year}?",
                     f"Counting from {a:%B} {a.day}, {a.year} up to {b:%B} {b.day}, {b.year} gives "
                     f"{(b - a).days} days (the first day is not counted, the last one is)."))
    for _ in range(8):
        d = dt.date(rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28))
        tense = "was" if d < dt.date(2026, 1, 1) else "will be"
        rows.append((f"What day of the week {tense} {d:%B} {d.day}, {d.year}?",
                     f"{d:%B} {d.day}, {d.year} {tense} a {d:%A}."))
    for y in rng.sample(range(1890, 2100), 6):
        leap = (y % 4 == 0 and y % 100 != 0) or y % 400 == 0
        why = ("it is divisible by 400" if y % 400 == 0 else "it is divisible by 100 but not by 400"
               if y % 100 == 0 else "it is divisible by 4 and not by 100" if y % 4 == 0 else "it is not divisible by 4")
        rows.append((f"Is {y} a leap year?", f"{'Yes' if leap else 'No'}, {y} is {'' if leap else 'not '}a leap "
                                              f"year because {why}."))
    return [(q, a, "mixtune_dates") for q, a in rows]


def sorting_rows(rng: random.Random) -> list:
    rows = []
    words = ["river", "apple", "mountain", "candle", "zebra", "orchard", "lantern", "bicycle", "harbor", "violet",
             "quartz", "meadow", "falcon", "ember", "glacier", "pepper", "saddle", "tunnel", "walnut", "kettle"]
    for _ in range(8):
        nums = rng.sample(range(-50, 500), rng.randint(5, 9))
        rows.append((f"Sort these numbers from smallest to largest: {', '.join(map(str, nums))}.",
                     ", ".join(map(str, sorted(nums)))))
    for _ in range(7):
        ws = rng.sample(words, rng.randint(4, 8))
        rows.append((f"Put the following words in alphabetical order: {', '.join(ws)}.", ", ".join(sorted(ws))))
    for _ in range(7):
        ns = rng.sample(range(2, 100), 8)
        primes = [n for n in ns if all(n % k for k in range(2, int(n ** 0.5) + 1))]
        ans = (f"The primes in the list are {and_list(primes)}." if len(primes) > 1 else
               f"The only prime in the list is {primes[0]}." if primes else
               "None of these numbers is prime.")
        rows.append((f"Which of these numbers are prime? {', '.join(map(str, ns))}",
                     ans + " A prime has exactly two divisors, 1 and itself; the others can be divided by a "
                           "smaller number."))
    names = list(ANIMALS)
    for _ in range(8):
        pick = rng.sample(names, rng.randint(4, 6))
        rows.append((f"Classify each of these animals as a mammal, bird, reptile, amphibian or fish: "
                     f"{', '.join(pick)}.", "\n".join(f"- {a.capitalize()}: {ANIMALS[a]}" for a in pick)))
    return [(q, a, "mixtune_reasoning") for q, a in rows]


# ------------------------------------------------------------------------------------------ written tasks
def glossary_rows(rng: random.Random) -> list:
    asks = ["What is {t}?", "Explain {t} in simple terms.", "Define the term \"{t}\".", "What does {t} mean?",
            "Give a short definition of {t}.", "Can you explain what {t} is?"]
    return [(rng.choice(asks).format(t=t), d, "mixtune_glossary") for t, d in GLOSSARY]


def country_rows(rng: random.Random) -> list:
    rows = []
    for name, capital, continent, lang, currency, fact in COUNTRIES:
        k = rng.randrange(4)
        if k == 0:
            rows.append((f"What is the capital of {name}?", f"The capital of {name} is {capital}."))
        elif k == 1:
            rows.append((f"Give me a few basic facts about {name}.",
                         f"{name} is a country in {continent}. Its capital is {capital}, {lang_phrase(lang)}, "
                         f"and it uses the {currency}. {fact}"))
        elif k == 2:
            rows.append((f"Which currency is used in {name}, and what language do people speak there?",
                         f"{name} uses the {currency}, and {lang_phrase(lang)}."))
        else:
            rows.append((f"Write a two-sentence introduction to {name} for a travel brochure.",
                         f"Welcome to {name}, where the capital {capital} is the natural starting point for any "
                         f"trip through this corner of {continent}. {fact}"))
    for name, desc in PLANETS:
        rows.append((rng.choice([f"Tell me about the planet {name}.", f"Describe {name} briefly.",
                                 f"What is special about {name}?"]), desc))
    return [(q, a, "mixtune_facts") for q, a in rows]


def tips_rows(rng: random.Random) -> list:
    rows = []
    for goal, tips in TIPS:
        for n in sorted(rng.sample([2, 3, 4, 5], 2)):
            chosen = rng.sample(tips, min(n, len(tips)))
            ask = rng.choice([f"Give me {n} tips to {goal}.", f"What are {n} ways to {goal}?",
                              f"List {n} pieces of advice for someone who wants to {goal}."])
            rows.append((ask, "\n".join(f"{i}. {t}" for i, t in enumerate(chosen, 1)), "mixtune_advice"))
    return rows


def email_rows(rng: random.Random) -> list:
    rows = []
    for recipient, rname, purpose, body, sign in EMAILS:
        rows.append((f"Write a short email to {recipient} {purpose}.",
                     f"Subject: {body[0]}\n\nHi {rname},\n\n{body[1]}\n\nBest regards,\n{sign}", "mixtune_writing"))
    for active, passive in PASSIVE:
        rows.append((f"Rewrite this sentence in the passive voice: \"{active}\"", passive, "mixtune_writing"))
    return rows


def build_instruct() -> list:
    rng = random.Random(1234)
    pairs = []
    pairs += math_rows(rng)
    pairs += conversion_rows(rng)
    pairs += date_rows(rng)
    pairs += sorting_rows(rng)
    pairs += glossary_rows(rng)
    pairs += country_rows(rng)
    pairs += tips_rows(rng)
    pairs += email_rows(rng)
    pairs += [(q, a, "mixtune_explain") for q, a in EXPLANATIONS]
    pairs += [(q, a, "mixtune_code") for q, a in CODE_TASKS]
    rng.shuffle(pairs)
    return [{"prompt": wrap_instruction(q), "response": a, "source": s} for q, a, s in pairs]


def build_alpaca() -> list:
    rng = random.Random(99)
    rows = []
    for active, passive in PASSIVE[:8]:
        rows.append({"instruction": "Rewrite the sentence in the passive voice.", "input": active, "output": passive})
    for _ in range(8):
        nums = rng.sample(range(1, 300), 6)
        rows.append({"instruction": "Sort the numbers in descending order.", "input": ", ".join(map(str, nums)),
                     "output": ", ".join(map(str, sorted(nums, reverse=True)))})
    for t, d in GLOSSARY[:12]:
        rows.append({"instruction": f"Explain what {t} is.", "input": "", "output": d})
    for name, capital, continent, lang, currency, fact in COUNTRIES[:10]:
        rows.append({"instruction": "Name the capital city of the given country.", "input": name,
                     "output": f"The capital of {name} is {capital}."})
    for q, a in CODE_TASKS[:4]:
        rows.append({"instruction": q, "input": "", "output": a})
    return rows


def build_chat() -> list:
    rng = random.Random(7)
    convs = []
    for name, capital, continent, lang, currency, fact in COUNTRIES[:12]:
        convs.append([{"role": "user", "content": f"What's the capital of {name}?"},
                      {"role": "assistant", "content": f"The capital of {name} is {capital}."},
                      {"role": "user", "content": "And what currency do they use there?"},
                      {"role": "assistant", "content": f"{name} uses the {currency}."}])
    for goal, tips in TIPS[:8]:
        msgs = [{"role": "user", "content": f"I want to {goal}. Any advice?"},
                {"role": "assistant", "content": f"Here are a few ideas:\n" +
                 "\n".join(f"- {t}" for t in tips[:3])},
                {"role": "user", "content": "Which one should I start with?"},
                {"role": "assistant", "content": f"Start with the first one: {tips[0][0].lower() + tips[0][1:]} "
                                                 f"It is the easiest to keep up, and the others build on it."}]
        if rng.random() < 0.5:
            msgs.insert(0, {"role": "system", "content": "You are a friendly coach. Keep answers short and practical."})
        convs.append(msgs)
    for t, d in GLOSSARY[12:24]:
        convs.append([{"role": "user", "content": f"Can you explain {t}?"}, {"role": "assistant", "content": d}])
    for q, a in EXPLANATIONS[:4]:
        convs.append([{"role": "system", "content": "You are a patient teacher."},
                      {"role": "user", "content": q}, {"role": "assistant", "content": a}])
    return [{"messages": m} for m in convs]


def write(name: str, rows: list) -> None:
    path = os.path.join(OUT, name)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{path}: {len(rows)} rows, {os.path.getsize(path):,} bytes")


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    write("instruct_v3_sample.jsonl", build_instruct())
    write("alpaca_sample.jsonl", build_alpaca())
    write("chat_sample.jsonl", build_chat())
