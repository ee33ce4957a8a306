"""The demo model's corpus: seeded generators of chat examples, one per behaviour the model must show.

``generate(task, rng, split)`` returns one ``Example``: the chat ``messages`` (OpenAI shape, with
``tool_calls`` on assistant turns), the ``tools`` listed to the model (or ``None``) and what a
held-out evaluation checks (``answer``: the span a correct reply contains; ``call``: the tool call it
makes). Every name and value a model must copy or choose comes from ``split``'s pool
(``kvloom.demo_model.words.split_of``), so held-out examples share none with training ones.

Tasks (``TASKS``):

- ``copy``, ``lookup``: the curriculum's first lessons, repeat a span; read the value of a key.
- ``story``, ``fact``: short stories and answers in simple English.
- ``qa``: a passage and a question about it, answered by a sentence that copies the span.
- ``summary``: the key sentences of a passage (its first and its last), copied.
- ``code_edit``: a Python function and an instruction (rename, add a parameter), answered with the
  whole edited function.
- ``tool_call``, ``tool_loop``, ``tool_none``: pick the right tool and copy its arguments from the
  request; answer from the tool's result; answer in text when no tool fits.
- ``structured``: fill a structured-output schema (offered as the only tool) with short text.
- ``json``: extract a record from a sentence as a JSON object with the fields asked for.

Nothing here reads the network or the disk; the same seed gives the same examples everywhere.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvloom.demo_model import words as W
from kvloom.demo_model.words import Split, split_of

Message = dict[str, Any]

# The test suites a user runs against the model (LangChain's standard tests among them) must find it
# unprepared: none of their tool names, argument names or prompts are in the corpus.
EXCLUDED_WORDS = frozenset({"magic", "input", "joke", "punchline", "setup", "greeting", "weather_tool"})


@dataclass(frozen=True, slots=True)
class Example:
    """One chat example; ``messages[-1]`` is the assistant turn a model is scored on."""

    task: str
    messages: list[Message]
    tools: list[dict[str, Any]] | None = None
    answer: str | None = None
    """The span a correct final reply contains (``qa``, ``json`` checks its fields instead)."""
    call: dict[str, Any] | None = None
    """``{"name": ..., "arguments": {...}}`` the assistant's turn calls, for tool tasks."""
    record: dict[str, Any] | None = None
    """The object a ``json`` reply must equal."""
    meta: dict[str, Any] = field(default_factory=dict)


# ---- value pools --------------------------------------------------------------------------------

def _pick(rng: random.Random, pool: tuple[str, ...] | list[str], split: Split) -> str:
    choices = [v for v in pool if split_of(v) == split]
    return rng.choice(choices)


def name(rng: random.Random, split: Split, syllables: int | None = None) -> str:
    """A made-up name of 2-3 syllables in ``split``'s pool (``"Brizo"``); one in 25 is in another script
    (``"华明光"``) or has an accent (``"Brizé"``)."""
    if syllables is None and rng.random() < 0.04:
        return unicode_name(rng, split)
    while True:
        n = syllables or rng.choice((2, 2, 3))
        value = "".join(rng.choice(W.SYLLABLES) for _ in range(n)).capitalize()
        if 4 <= len(value) <= 10 and split_of(value) == split and value.lower() not in EXCLUDED_WORDS:
            return value


def unicode_name(rng: random.Random, split: Split) -> str:
    while True:
        if rng.random() < 0.6:
            value = "".join(rng.choice(W.UNICODE_SYLLABLES[:-7]) for _ in range(rng.randint(2, 5)))
        else:
            base = name(rng, split, 2)
            i = rng.randrange(1, len(base))
            value = base[:i] + rng.choice(W.UNICODE_SYLLABLES[-7:]) + base[i + 1:]
        if split_of(value) == split:
            return value


def number(rng: random.Random, split: Split, digits: int) -> str:
    """A ``digits``-long number in ``split``'s pool (no leading zero)."""
    while True:
        value = str(rng.randrange(10 ** (digits - 1), 10**digits))
        if split_of(value) == split:
            return value


def small_int(rng: random.Random, split: Split, low: int = 2, high: int = 99) -> int:
    while True:
        value = rng.randint(low, high)
        if split_of(str(value)) == split:
            return value


def thing(rng: random.Random, split: Split) -> str:
    return _pick(rng, W.THINGS, split)


def identifier(rng: random.Random, split: Split, parts: int | None = None) -> str:
    """A snake_case identifier from ``CODE_WORDS`` in ``split``'s pool (``"total_price"``)."""
    while True:
        n = parts or rng.choice((1, 2, 2))
        value = "_".join(rng.sample(W.CODE_WORDS, n))
        if split_of(value) == split:
            return value


def clock(rng: random.Random, split: Split) -> str:
    while True:
        value = f"{rng.randint(1, 12)}:{rng.choice(('00', '15', '30', '45', '05', '20', '40', '50'))}"
        if split_of(value) == split:
            return value


def phrase(rng: random.Random, split: Split) -> str:
    """A short message text (``"the lamp is at the market"``)."""
    forms = (
        lambda: f"the {thing(rng, split)} is at {rng.choice(W.PLACES)}",
        lambda: f"I will be late on {rng.choice(W.DAYS)}",
        lambda: f"{name(rng, split)} is waiting at {rng.choice(W.PLACES)}",
        lambda: f"please bring the {thing(rng, split)}",
        lambda: f"we meet at {clock(rng, split)}",
    )
    return rng.choice(forms)()


# ---- curriculum: copying and lookups -----------------------------------------------------------

def _copy(rng: random.Random, split: Split) -> Example:
    kind = rng.random()
    if kind < 0.4:
        items = [name(rng, split) for _ in range(rng.randint(2, 8))]
    elif kind < 0.7:
        items = [rng.choice(W.CODE_WORDS + W.THINGS + W.ANIMALS) for _ in range(rng.randint(3, 12))]
    else:
        items = [number(rng, split, rng.randint(2, 6)) for _ in range(rng.randint(2, 6))]
    text = " ".join(items)
    ask = rng.choice(("Repeat this exactly: ", "Say it back: ", "Copy this: ", "Please repeat: "))
    return Example("copy", [{"role": "user", "content": ask + text}, {"role": "assistant", "content": text}],
                   answer=text)


def _lookup(rng: random.Random, split: Split) -> Example:
    keys: list[str] = []
    while len(keys) < rng.randint(3, 8):
        key = name(rng, split) if rng.random() < 0.5 else identifier(rng, split)
        if key not in keys:
            keys.append(key)
    values = [number(rng, split, rng.randint(1, 4)) if rng.random() < 0.5 else name(rng, split) for _ in keys]
    target = rng.randrange(len(keys))
    table = "\n".join(f"{k}: {v}" for k, v in zip(keys, values, strict=True))
    question = f"{table}\n\nWhat is the value of {keys[target]}?"
    reply = f"The value of {keys[target]} is {values[target]}."
    return Example("lookup", [{"role": "user", "content": question}, {"role": "assistant", "content": reply}],
                   answer=values[target])


# ---- plain English ------------------------------------------------------------------------------

def _story(rng: random.Random, split: Split) -> Example:
    animal, adj, hero = rng.choice(W.ANIMALS), rng.choice(W.ADJECTIVES), name(rng, split)
    friend = name(rng, split)
    place = rng.choice(W.PLACES)
    sentences = [
        f"Once there was a {adj} {animal} named {hero}.",
        f"{hero} lived near {place} with a friend called {friend}.",
        f"One day {hero} {rng.choice(W.STORY_EVENTS)}.",
        f"{friend} said it was the best day of the year.",
        f"In the end, {hero} {rng.choice(W.STORY_ENDINGS)}.",
    ]
    if rng.random() < 0.5:
        sentences.pop(3)
    ask = rng.choice((f"Tell me a short story about a {animal}.", f"Write a little story about a {adj} {animal}.",
                      f"Can you tell me a story about a {animal}?"))
    return Example("story", [{"role": "user", "content": ask},
                             {"role": "assistant", "content": " ".join(sentences)}])


def _fact(rng: random.Random, split: Split) -> Example:
    question, reply = rng.choice(W.FACTS + W.GREETINGS)
    messages: list[Message] = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": "You are a helpful assistant."})
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    return Example("fact", messages, answer=reply)


# ---- passages: questions and summaries ----------------------------------------------------------

def _facts(rng: random.Random, split: Split, count: int) -> list[tuple[str, str, str, str]]:
    """``count`` facts as (sentence, question, reply, span); keys never repeat within a passage."""
    facts: list[tuple[str, str, str, str]] = []
    used: set[str] = set()
    while len(facts) < count:
        kind = rng.randrange(5)
        if kind == 0:
            role, place, who = rng.choice(W.ROLES), rng.choice(W.PLACES), name(rng, split)
            key = f"{role} {place}"
            sentence = (f"The {role} of {place} is {who}." if rng.random() < 0.75
                        else f"{who} is the {role} of {place}.")
            item = (sentence, f"Who is the {role} of {place}?", f"The {role} of {place} is {who}.", who)
        elif kind == 1:
            who, city = name(rng, split), name(rng, split)
            key = who
            item = (f"{who} lives in {city}.", f"Where does {who} live?", f"{who} lives in {city}.", city)
        elif kind == 2:
            obj, price = thing(rng, split), str(small_int(rng, split, 2, 500))
            key = obj
            item = (f"The {obj} costs {price} coins.", f"How much does the {obj} cost?",
                    f"The {obj} costs {price} coins.", price)
        elif kind == 3:
            who, year = name(rng, split), number(rng, split, 4)
            key = who
            item = (f"{who} was born in {year}.", f"When was {who} born?", f"{who} was born in {year}.", year)
        else:
            who, animal, pet = name(rng, split), rng.choice(W.ANIMALS), name(rng, split)
            key = who
            item = (f"{who} has a {animal} named {pet}.", f"What is the name of {who}'s {animal}?",
                    f"{who}'s {animal} is named {pet}.", pet)
        if key not in used:
            used.add(key)
            facts.append(item)
    return facts


def _filler(rng: random.Random, split: Split) -> str:
    return rng.choice((
        f"The weather was {rng.choice(W.WEATHER)} that {rng.choice(W.DAYS)}.",
        f"Many people visit {rng.choice(W.PLACES)} in the summer.",
        f"A {rng.choice(W.ADJECTIVES)} {rng.choice(W.ANIMALS)} sleeps near {rng.choice(W.PLACES)}.",
        f"The town has a {rng.choice(W.COLORS)} {thing(rng, split)} in {rng.choice(W.PLACES)}.",
    ))


def _passage(rng: random.Random, split: Split, facts: list[tuple[str, str, str, str]]) -> str:
    sentences = [f[0] for f in facts] + [_filler(rng, split) for _ in range(rng.randint(0, 3))]
    rng.shuffle(sentences)
    return " ".join(sentences)


def _qa(rng: random.Random, split: Split) -> Example:
    facts = _facts(rng, split, rng.randint(2, 6))
    passage = _passage(rng, split, facts)
    _, question, reply, span = rng.choice(facts)
    layout = rng.random()
    if layout < 0.5:
        user = f"Read the passage and answer the question.\n\nPassage: {passage}\n\nQuestion: {question}"
    elif layout < 0.8:
        user = f"Context:\n{passage}\n\n{question}"
    else:
        user = f"{passage}\n\nUsing the text above, answer: {question}"
    messages: list[Message] = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": "Answer using only the given text."})
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return Example("qa", messages, answer=span)


def _summary(rng: random.Random, split: Split) -> Example:
    facts = _facts(rng, split, rng.randint(2, 4))
    sentences = [f[0] for f in facts] + [_filler(rng, split) for _ in range(rng.randint(1, 2))]
    rng.shuffle(sentences)
    first = f"This is a note about {rng.choice(W.PLACES)} and the people who work there."
    last = rng.choice((f"Everyone meets again on {rng.choice(W.DAYS)}.",
                       f"The next market day is {rng.choice(W.DAYS)}.",
                       f"In the end, the town chose {name(rng, split)} to lead the festival."))
    passage = " ".join([first, *sentences, last])
    ask = rng.choice(("Summarize the passage in two sentences.", "Give me the key sentences of this text.",
                      "Write a short summary of the passage."))
    summary = f"{first} {last}"
    return Example("summary", [{"role": "user", "content": f"{passage}\n\n{ask}"},
                               {"role": "assistant", "content": summary}], answer=summary)


# ---- code edits ---------------------------------------------------------------------------------

def _function(rng: random.Random, split: Split) -> tuple[str, list[str], list[str]]:
    """A small Python function: (its source lines, its parameters, its local variable names)."""
    fname = identifier(rng, split, 2)
    params: list[str] = []
    while len(params) < rng.randint(1, 3):
        p = identifier(rng, split, 1)
        if p not in params and p != fname:
            params.append(p)
    acc = identifier(rng, split)
    while acc in params or acc == fname:
        acc = identifier(rng, split)
    loop_var = rng.choice(("item", "x", "row", "part", "n"))
    lines = [f"def {fname}({', '.join(params)}):", f"    {acc} = 0"]
    if rng.random() < 0.5:
        lines += [f"    for {loop_var} in {params[0]}:", f"        {acc} = {acc} + {loop_var}"]
    else:
        lines += [f"    {acc} = {' + '.join(params)}"]
    if len(params) > 1 and rng.random() < 0.5:
        lines += [f"    if {acc} > {params[-1]}:", f"        {acc} = {params[-1]}"]
    lines += [f"    return {acc}"]
    return "\n".join(lines), params, [acc]


def _rename(source: str, old: str, new: str) -> str:
    import re

    return re.sub(rf"\b{re.escape(old)}\b", new, source)


def _code_edit(rng: random.Random, split: Split) -> Example:
    source, params, locals_ = _function(rng, split)
    kind = rng.randrange(3)
    if kind == 0:
        old = rng.choice(params + locals_)
        new = identifier(rng, split)
        while new in source:
            new = identifier(rng, split)
        instruction = rng.choice((f"Rename {old} to {new}.", f"Rename the variable {old} to {new}."))
        edited = _rename(source, old, new)
    elif kind == 1:
        fname = source.split("(", 1)[0].removeprefix("def ")
        new = identifier(rng, split, 2)
        while new in source:
            new = identifier(rng, split, 2)
        instruction = f"Rename the function {fname} to {new}."
        edited = _rename(source, fname, new)
    else:
        new = identifier(rng, split, 1)
        while new in source:
            new = identifier(rng, split, 1)
        head, rest = source.split("):", 1)
        if rng.random() < 0.5:
            instruction = f"Add a parameter named {new}."
            edited = f"{head}, {new}):{rest}"
        else:
            default = rng.randint(0, 9)
            instruction = f"Add a parameter {new} with default value {default}."
            edited = f"{head}, {new}={default}):{rest}"
    user = f"```python\n{source}\n```\n\n{instruction} Show the whole function."
    reply = f"```python\n{edited}\n```"
    return Example("code_edit", [{"role": "user", "content": user}, {"role": "assistant", "content": reply}],
                   answer=edited)


# ---- tools -------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Param:
    name: str
    type: str
    description: str
    value: Callable[[random.Random, Split], Any]


@dataclass(frozen=True, slots=True)
class Domain:
    """A kind of tool: the nouns its names are made of, its parameters, how users ask for it, what it
    returns and how the assistant reports that."""

    nouns: tuple[str, ...]
    description: str
    params: tuple[Param, ...]
    requests: tuple[str, ...]
    result: Callable[[random.Random, dict[str, Any]], dict[str, Any]]
    reply: str
    made_up_names: bool = False


def _city(rng: random.Random, split: Split) -> str:
    return name(rng, split)


DOMAINS: tuple[Domain, ...] = (
    Domain(("weather", "forecast"), "Get the current weather for a city.",
           (Param("city", "string", "The city name.", _city),),
           ("What is the weather in {city}?", "How is the weather in {city} today?",
            "Will it rain in {city}?", "Tell me the forecast for {city}."),
           lambda rng, a: {"city": a["city"], "forecast": rng.choice(W.WEATHER), "temperature": rng.randint(-5, 35)},
           "It is {forecast} in {city}, {temperature} degrees."),
    Domain(("order", "order_status", "delivery"), "Look up the status of an order by its number.",
           (Param("order_id", "string", "The order number.", lambda rng, s: number(rng, s, rng.randint(4, 6))),),
           ("Where is my order {order_id}?", "What is the status of order {order_id}?",
            "Has order {order_id} shipped yet?"),
           lambda rng, a: {"order_id": a["order_id"], "status": rng.choice(W.STATUSES)},
           "Your order {order_id} is {status}."),
    Domain(("message", "text", "note"), "Send a short message to a person.",
           (Param("recipient", "string", "Who gets the message.", name),
            Param("text", "string", "What the message says.", phrase)),
           ("Send a message to {recipient} saying {text}.", "Tell {recipient} that {text}.",
            "Please message {recipient}: {text}."),
           lambda rng, a: {"sent": True, "recipient": a["recipient"]},
           "I sent your message to {recipient}."),
    Domain(("alarm", "timer", "reminder"), "Set an alarm for a time of day.",
           (Param("time", "string", "The time, like 7:30.", clock),),
           ("Set an alarm for {time}.", "Wake me up at {time}.", "Please set a reminder at {time}."),
           lambda rng, a: {"alarm_set": True, "time": a["time"]},
           "Your alarm is set for {time}."),
    Domain(("translation", "translate"), "Translate a word into another language.",
           (Param("word", "string", "The word to translate.", lambda rng, s: thing(rng, s)),
            Param("language", "string", "The language to translate into.", lambda rng, s: rng.choice(W.LANGUAGES))),
           ("How do you say {word} in {language}?", "Translate {word} into {language}.",
            "What is the {language} word for {word}?"),
           lambda rng, a: {"translation": name(rng, "train").lower()},
           "In {language}, {word} is {translation}."),
    Domain(("table", "booking", "reservation"), "Book a table at a restaurant.",
           (Param("restaurant", "string", "The restaurant's name.", name),
            Param("people", "integer", "How many people.", lambda rng, s: rng.randint(1, 12)),
            Param("day", "string", "The day of the booking.", lambda rng, s: rng.choice(W.DAYS))),
           ("Book a table for {people} at {restaurant} on {day}.",
            "Can you reserve a table at {restaurant} for {people} people on {day}?"),
           lambda rng, a: {"confirmed": True, "code": rng.randint(1000, 9999)},
           "Your table for {people} at {restaurant} on {day} is booked. The code is {code}."),
    Domain(("price", "cost", "quote"), "Find the price of an item in the shop.",
           (Param("item", "string", "The item to price.", thing),),
           ("How much does a {item} cost?", "What is the price of a {item}?", "Check the price of the {item}."),
           lambda rng, a: {"item": a["item"], "price": rng.randint(2, 400)},
           "A {item} costs {price} coins."),
    Domain(("sum", "addition", "total"), "Add two whole numbers.",
           (Param("a", "integer", "The first number.", lambda rng, s: small_int(rng, s, 1, 999)),
            Param("b", "integer", "The second number.", lambda rng, s: small_int(rng, s, 1, 999))),
           ("What is {a} plus {b}? Use the tool.", "Add {a} and {b} with the tool.", "Use the tool to add {a} and {b}."),
           lambda rng, a: {"result": a["a"] + a["b"]},
           "{a} plus {b} is {result}."),
    Domain(("function", "op", "transform"), "Apply a special function to a number.",
           (Param("x", "integer", "The number.", lambda rng, s: small_int(rng, s, 0, 99)),),
           ("What is the value of {name}({x})? Use the tool.", "Compute {name}({x}) using the tool.",
            "Use the tool to find {name}({x})."),
           lambda rng, a: {"value": rng.randint(0, 999)},
           "The value of {name}({x}) is {value}.", made_up_names=True),
    Domain(("number", "counter", "value"), "Return a special number. It takes no arguments.",
           (),
           ("What is the value of {name}()? You must use the tool.", "Call {name}() and tell me the value.",
            "Use the tool {name} to get the number."),
           lambda rng, a: {"value": rng.randint(0, 999)},
           "The value of {name}() is {value}.", made_up_names=True),
    Domain(("customer", "account", "client"), "Create a customer record.",
           (Param("client_name", "string", "The customer's name.", name),
            Param("details", "string", "What the customer is.", lambda rng, s: f"a {rng.choice(W.ADJECTIVES)} "
                  f"{rng.choice(('shop', 'bakery', 'company', 'farm', 'school'))} in {name(rng, s)}")),
           ("Create a customer named '{client_name}' - {details}.", "Add a new customer '{client_name}', {details}.",
            "Make an account for {client_name} ({details})."),
           lambda rng, a: {"created": True, "id": rng.randint(100, 9999)},
           "I created the customer {client_name} with id {id}."),
    Domain(("farewell", "salute", "welcome"), "Write a farewell in a particular style of speaking.",
           (Param("style", "string", "The style.", lambda rng, s: rng.choice(W.STYLES)),),
           ("Using the tool, write a {style} farewell.", "Say goodbye like a {style}, with the tool.",
            "Use the tool to make a {style} welcome."),
           lambda rng, a: {"text": f"Farewell, friend, says the {a['style'].lower()}."},
           "{text}"),
)

_STRUCTURED: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("Riddle", ("question", "answer"), "a riddle"),
    ("Poem", ("title", "first_line"), "a poem"),
    ("Fable", ("title", "moral"), "a fable"),
    ("Tip", ("topic", "advice"), "a tip"),
    ("Fact", ("subject", "statement"), "a fact"),
    ("Motto", ("motto", "meaning"), "a motto"),
    ("Tale", ("hero", "ending"), "a tale"),
    ("Quote", ("speaker", "words"), "a quote"),
)
"""Structured-output schemas (the shape ``with_structured_output`` sends as a tool): a class name,
its string fields, and what the user asks for."""

_X_NAMES = ("x", "n", "number", "value", "num", "amount", "count", "arg")


def tool_name(rng: random.Random, domain: Domain, split: Split) -> str:
    """A tool name of ``split``'s pool: verb_noun(_suffix) (``"fetch_weather_now"``), or for made-up
    functions a syllable word with a noun (``"zorbu_function"``)."""
    while True:
        if domain.made_up_names:
            value = f"{name(rng, split, rng.choice((2, 3))).lower()}_{rng.choice(domain.nouns)}"  # ASCII only
        else:
            value = f"{rng.choice(W.TOOL_VERBS)}_{rng.choice(domain.nouns)}{rng.choice(W.TOOL_SUFFIXES)}"
        if split_of(value) == split and not any(w in value for w in EXCLUDED_WORDS):
            return value


def _tool_schema(tool: str, domain: Domain, params: tuple[Param, ...]) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": tool, "description": domain.description,
        "parameters": {"type": "object",
                       "properties": {p.name: {"type": p.type, "description": p.description} for p in params},
                       "required": [p.name for p in params]}}}


@dataclass(frozen=True, slots=True)
class _Tool:
    name: str
    domain: Domain
    params: tuple[Param, ...]
    schema: dict[str, Any]


def _make_tool(rng: random.Random, domain: Domain, split: Split) -> _Tool:
    params = domain.params
    if domain.made_up_names and params:  # the one argument's name varies too: it must be read, not known
        x = rng.choice(_X_NAMES)
        params = (Param(x, params[0].type, params[0].description, params[0].value),)
    tool = tool_name(rng, domain, split)
    return _Tool(tool, domain, params, _tool_schema(tool, domain, params))


def _toolset(rng: random.Random, split: Split, target: Domain | None) -> tuple[list[_Tool], _Tool | None]:
    domains = [d for d in DOMAINS if d is not target]
    others = rng.sample(domains, rng.randint(0 if target else 1, 3))
    tools = [_make_tool(rng, d, split) for d in others]
    chosen = None
    if target is not None:
        chosen = _make_tool(rng, target, split)
        tools.insert(rng.randint(0, len(tools)), chosen)
    return tools, chosen


def _request(rng: random.Random, tool: _Tool, split: Split) -> tuple[str, dict[str, Any]]:
    args = {p.name: p.value(rng, split) for p in tool.params}
    fill = {"name": tool.name, **args}
    if tool.domain.made_up_names and tool.params:
        fill["x"] = args[tool.params[0].name]
    return rng.choice(tool.domain.requests).format(**fill), args


def _system(rng: random.Random) -> list[Message]:
    if rng.random() < 0.4:
        return [{"role": "system", "content": rng.choice(("You are a helpful assistant.",
                                                          "You are a helpful assistant with tools."))}]
    return []


def _call_message(tool: _Tool, args: dict[str, Any]) -> Message:
    return {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "id": "call_0", "function": {"name": tool.name, "arguments": args}}]}


def _tool_call(rng: random.Random, split: Split) -> Example:
    tools, chosen = _toolset(rng, split, rng.choice(DOMAINS))
    assert chosen is not None
    request, args = _request(rng, chosen, split)
    messages = [*_system(rng), {"role": "user", "content": request}, _call_message(chosen, args)]
    return Example("tool_call", messages, tools=[t.schema for t in tools],
                   call={"name": chosen.name, "arguments": args})


def _tool_loop(rng: random.Random, split: Split) -> Example:
    tools, chosen = _toolset(rng, split, rng.choice(DOMAINS))
    assert chosen is not None
    request, args = _request(rng, chosen, split)
    result = chosen.domain.result(rng, args)
    fill = {"name": chosen.name, **args, **result}
    if chosen.domain.made_up_names and chosen.params:
        fill["x"] = args[chosen.params[0].name]
    reply = chosen.domain.reply.format(**fill)
    messages = [*_system(rng), {"role": "user", "content": request}, _call_message(chosen, args),
                {"role": "tool", "tool_call_id": "call_0", "content": json.dumps(result)},
                {"role": "assistant", "content": reply}]
    span = str(next(iter(result.values()))) if len(result) == 1 else None
    return Example("tool_loop", messages, tools=[t.schema for t in tools], answer=span,
                   call={"name": chosen.name, "arguments": args})


def _tool_none(rng: random.Random, split: Split) -> Example:
    tools, _ = _toolset(rng, split, None)
    inner = _fact(rng, split) if rng.random() < 0.6 else _story(rng, split)
    messages = [m for m in inner.messages if m["role"] != "system"]
    return Example("tool_none", [*_system(rng), *messages], tools=[t.schema for t in tools], answer=inner.answer)


def _riddle_text(rng: random.Random, split: Split, field_name: str, subject: str) -> str:
    animal, place = rng.choice(W.ANIMALS), rng.choice(W.PLACES)
    texts = {
        "question": f"What has no legs but walks to {place} every day?",
        "answer": f"It is {subject}.",
        "title": f"The {rng.choice(W.ADJECTIVES)} {animal}",
        "first_line": f"The {animal} sat near {place} and looked at {subject}.",
        "moral": f"Be {rng.choice(W.ADJECTIVES)} like the {animal}.",
        "topic": subject,
        "advice": f"Look at {subject} each morning and be {rng.choice(W.ADJECTIVES)}.",
        "subject": subject,
        "statement": f"{subject.capitalize()} is near {place}.",
        "motto": f"Be {rng.choice(W.ADJECTIVES)} and {rng.choice(W.ADJECTIVES)}.",
        "meaning": f"Work well, like a {rng.choice(W.ROLES)}.",
        "hero": name(rng, split),
        "ending": f"went home to {place}",
        "speaker": name(rng, split),
        "words": f"I love {subject}.",
    }
    return texts[field_name]


def _structured(rng: random.Random, split: Split) -> Example:
    """A structured-output request: the schema is the only tool and the reply fills its string fields."""
    cls, fields, what = rng.choice([s for s in _STRUCTURED if split_of(s[0]) == split] or list(_STRUCTURED))
    subject = rng.choice([*W.RIDDLE_SUBJECTS, *(f"a {a}" for a in W.ANIMALS)])
    args = {f: _riddle_text(rng, split, f, subject) for f in fields}
    schema = {"type": "function", "function": {
        "name": cls, "description": f"{what.capitalize()} to tell the user.",
        "parameters": {"type": "object", "properties": {f: {"type": "string"} for f in fields},
                       "required": list(fields)}}}
    request = rng.choice((f"Tell me {what} about {subject}.", f"Write {what} about {subject}.",
                          f"Give me {what} about {subject}."))
    call = {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "id": "call_0", "function": {"name": cls, "arguments": args}}]}
    return Example("structured", [{"role": "user", "content": request}, call], tools=[schema],
                   call={"name": cls, "arguments": args})


# ---- JSON extraction ----------------------------------------------------------------------------

def _json(rng: random.Random, split: Split) -> Example:
    kind = rng.randrange(3)
    if kind == 0:
        record: dict[str, Any] = {"customer": name(rng, split), "item": thing(rng, split),
                                  "quantity": small_int(rng, split, 1, 50), "city": name(rng, split)}
        text = (f"{record['customer']} ordered {record['quantity']} of the {record['item']} "
                f"for delivery to {record['city']}.")
        what = "the order"
    elif kind == 1:
        record = {"name": name(rng, split), "age": small_int(rng, split, 5, 90), "city": name(rng, split),
                  "job": rng.choice(W.ROLES)}
        text = f"{record['name']} is {record['age']} years old, works as a {record['job']} and lives in {record['city']}."
        what = "the person"
    else:
        record = {"guest": name(rng, split), "people": rng.randint(1, 12), "day": rng.choice(W.DAYS),
                  "time": clock(rng, split)}
        text = f"{record['guest']} booked a table for {record['people']} on {record['day']} at {record['time']}."
        what = "the booking"
    keys = list(record)
    fields = rng.sample(keys, rng.randint(2, len(keys)))
    wanted = {k: record[k] for k in fields}
    if rng.random() < 0.5:
        user = f"{text}\n\nExtract {what} as JSON with the fields {', '.join(fields)}."
    else:
        user = f"Extract {what} as a JSON object with fields {', '.join(fields)}.\n\nText: {text}"
    reply = json.dumps(wanted)
    return Example("json", [{"role": "user", "content": user}, {"role": "assistant", "content": reply}],
                   record=wanted)


TASKS: dict[str, Callable[[random.Random, Split], Example]] = {
    "copy": _copy, "lookup": _lookup, "story": _story, "fact": _fact, "qa": _qa, "summary": _summary,
    "code_edit": _code_edit, "tool_call": _tool_call, "tool_loop": _tool_loop, "tool_none": _tool_none,
    "json": _json, "structured": _structured,
}


def generate(task: str, rng: random.Random, split: Split) -> Example:
    """One ``task`` example from ``split``'s values, drawn with ``rng``."""
    return TASKS[task](rng, split)


def examples(seed: int, split: Split, count: int, weights: dict[str, float]) -> list[Example]:
    """``count`` examples, tasks drawn by ``weights`` (a task -> weight map), reproducible from ``seed``."""
    rng = random.Random(seed)
    names = list(weights)
    return [generate(rng.choices(names, [weights[n] for n in names])[0], rng, split) for _ in range(count)]
