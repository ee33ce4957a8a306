"""The word lists the demo corpus is written from, and the rule that splits values into train and held-out.

Everything here is plain data the project wrote. Values a model must copy or choose (people, places,
items, identifiers, tool names, numbers) are split by ``split_of``: a stable hash puts one in five into
the held-out split, so the held-out examples use only names and values the training examples never
contain. Common words (roles, animals, verbs) are shared: the model must know the language, not the
values.
"""

from __future__ import annotations

import zlib
from typing import Literal

Split = Literal["train", "heldout"]

HELDOUT_FRACTION_DENOM = 5
"""One value in five is held out."""


def split_of(value: str) -> Split:
    """``"heldout"`` for one value in ``HELDOUT_FRACTION_DENOM`` (a CRC32 of the lower-cased value), else
    ``"train"``. Stable across runs, platforms and Python versions (no ``hash()`` randomisation)."""
    return "heldout" if zlib.crc32(value.lower().encode()) % HELDOUT_FRACTION_DENOM == 0 else "train"


# Names are 2-3 of these syllables, capitalised: "Brizo", "Talmeno". Short pieces keep a name a few
# tokens long however the tokenizer merges them.
SYLLABLES = ["ba", "be", "bi", "bo", "bu", "da", "de", "di", "do", "ka", "ke", "ki", "ko", "la", "le", "li", "lo", "lu", "ma", "me", "mi", "mo", "na", "ne", "ni", "no", "ra", "re", "ri", "ro", "ru", "sa", "se", "si", "so", "ta", "te", "ti", "to", "va", "ve", "vi", "vo", "za", "ze", "zo", "bran", "dor", "fen", "gal", "har", "jor", "kel", "lin", "mar", "nor", "pel", "quin", "rav", "sel", "tam", "vor", "wen", "yas", "zan"]

ROLES = ["baker", "keeper", "teacher", "captain", "healer", "builder", "singer", "farmer", "guard", "painter", "miller", "weaver", "potter", "gardener", "cook", "driver", "doctor", "writer", "pilot", "sailor", "hunter", "tailor", "smith", "clerk", "judge", "mayor"]

PLACES = ["the mill", "the north gate", "the river bridge", "the old school", "the harbor", "the market", "the tower", "the library", "the bakery", "the farm", "the castle", "the station", "the garden", "the museum", "the inn", "the clinic", "the workshop", "the lighthouse", "the theater", "the square"]

THINGS = ["lamp", "chair", "kettle", "blanket", "basket", "mirror", "clock", "candle", "rug", "bowl", "jacket", "hat", "shovel", "ladder", "bucket", "pillow", "teapot", "umbrella", "lantern", "drum", "violin", "bicycle", "saddle", "anchor", "compass"]

ANIMALS = ["fox", "rabbit", "owl", "bear", "cat", "dog", "horse", "mouse", "frog", "duck", "goat", "deer", "wolf", "hen", "otter", "crow"]
ADJECTIVES = ["small", "brave", "quiet", "clever", "kind", "old", "young", "happy", "shy", "curious", "tired", "gentle", "busy", "proud"]
COLORS = ["red", "blue", "green", "yellow", "white", "black", "brown", "orange", "gray", "purple"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
LANGUAGES = ["French", "Spanish", "German", "Italian", "Dutch", "Swedish", "Polish", "Greek"]
WEATHER = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "stormy", "clear"]
STATUSES = ["shipped", "packed", "delivered", "delayed", "on its way", "waiting for payment"]

# Names in other scripts, so a model learns to copy any bytes: CJK and kana syllables, accented Latin.
UNICODE_SYLLABLES = (*"华明光东海山云天星林雪春夏秋月风花田中川本木村さくらゆきはなこんにちみやまかわ",
                     "é", "ñ", "ö", "å", "ç", "ü", "ø")
STYLES = ["Cowboy", "Royal", "Robot", "Poet", "Sailor", "Wizard", "Knight", "Farmer", "Teacher", "Ghost", "Dragon", "Baby"]
RIDDLE_SUBJECTS = ["the moon", "the sea", "a candle", "a clock", "a river", "the wind", "a shadow", "a key", "an egg", "a map"]

# Words for identifiers in code: variables are one or two of them joined by "_".
CODE_WORDS = ["count", "total", "items", "price", "value", "result", "name", "data", "index", "size", "score", "rate", "amount", "length", "width", "height", "speed", "weight", "limit", "offset", "step", "start", "stop", "left", "right", "first", "last", "text", "line", "word", "key", "values", "names", "prices", "scores", "rows", "cols", "parts", "sum", "average", "minimum", "maximum", "buffer", "cache", "queue"]

# Tool names are verb + noun (+ suffix); the nouns tie a tool to the requests it serves.
TOOL_VERBS = ["get", "fetch", "lookup", "find", "check", "read", "show", "query", "load", "request"]
TOOL_SUFFIXES = ("", "_now", "_info", "_v2", "_tool", "_data", "_api", "_service")

STORY_EVENTS = ["found a shiny stone by the river", "lost a red ball in the grass", "met a new friend at the market", "climbed to the top of a tall hill", "helped an old owl find its home", "built a small boat from sticks", "planted seeds in the garden", "heard a song in the forest", "saw the first snow of winter", "baked a cake for the whole village"]
STORY_ENDINGS = ["went home happy", "learned to be patient", "shared the joy with everyone", "slept well that night", "never forgot that day", "smiled all the way home", "made a promise to come back"]

# Simple facts for short answers (shared: they are knowledge, not values to copy).
FACTS = (
    ("What color is the sky?", "The sky is blue."),
    ("What color is grass?", "Grass is green."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many legs does a cat have?", "A cat has four legs."),
    ("How many legs does a bird have?", "A bird has two legs."),
    ("What do bees make?", "Bees make honey."),
    ("What do cows give us?", "Cows give us milk."),
    ("Is the sun hot or cold?", "The sun is hot."),
    ("Is ice hot or cold?", "Ice is cold."),
    ("What falls from clouds when it rains?", "Water falls from the clouds as rain."),
    ("What do we use to write?", "We use a pen or a pencil to write."),
    ("When do people sleep?", "Most people sleep at night."),
    ("What is the opposite of big?", "The opposite of big is small."),
    ("What is the opposite of up?", "The opposite of up is down."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What comes after Monday?", "Tuesday comes after Monday."),
    ("What comes after Friday?", "Saturday comes after Friday."),
    ("How many months are in a year?", "There are twelve months in a year."),
    ("What do fish live in?", "Fish live in water."),
    ("What color is snow?", "Snow is white."),
)
GREETINGS = (
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi there.", "Hi! What can I do for you?"),
    ("Good morning.", "Good morning! How can I help?"),
    ("Thank you!", "You are welcome."),
    ("Who are you?", "I am a small assistant trained on a simple synthetic corpus."),
    ("What can you do?", "I can answer questions about a passage, call tools and write JSON."),
)
