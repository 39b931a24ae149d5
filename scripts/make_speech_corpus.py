"""python scripts/make_speech_corpus.py --out d2vjax/data/embedded/speech --seed 20240611 --num-utterances 300 --valid-fraction 0.1

Builds the small English speech corpus shipped inside the package (``d2vjax/data/embedded``).

Everything is synthetic and owned by this project:

* Text comes from the deterministic sentence generator below (templates over a hand-written
  vocabulary of a few hundred common English words). No external text is used.
* Audio comes from ``espeak-ng`` (formant synthesis, no recorded speech) over many accents
  (``en``, ``en-us``, ``en-gb-scotland`` ...) combined with ``+variant`` voice modifiers
  (``+m3``, ``+f2``, ``+klatt``, ``+croak``, ``+whisper`` ...), speeds and pitches.

Per utterance ``i``, the voice, speed, pitch, amplitude and a duration cap come from
``random.Random(f"{seed}:voice:{i}")`` and each sentence draw from
``random.Random(f"{seed}:{i}:{attempt}")``, so the corpus is reproducible for a given seed and
espeak-ng version (only the Ogg Vorbis stream serial numbers differ between runs). A sentence whose
trimmed clip is shorter than ``--min-seconds`` (2.05 s) is re-drawn with more optional phrases;
one longer than its cap (2.5 s for most clips, up to ``--max-seconds``, see ``DURATION_CAPS``)
is re-drawn with fewer, and a transcript already used is re-drawn.

Signal path: ``espeak-ng -w`` (22050 Hz, 16-bit mono WAV) -> float64 -> ``soxr`` resampling to
16 kHz ("HQ") -> silence trimmed to within 100 ms of the first / last frame louder than -40 dB
below the loudest 10 ms frame -> peak normalised to 0.9 -> float32 -> Ogg Vorbis via
``soundfile`` with ``compression_level=0.8`` (about 40 kbit/s; libsndfile's default 0.6 makes the
corpus ~25 % larger for a log-mel difference that does not matter for synthetic speech). Where
the decoded Vorbis overshoots a peak of 0.98 the clip is scaled down and encoded again.

Split rule: utterance ids are ``0000 .. N-1`` in generation order; the last
``max(20, round(N * valid_fraction))`` ids form ``valid``, the rest ``train``. Valid utterances
with an even id take their voice variant from ``HELD_OUT_VARIANTS`` (variants never used in
train), the others from the train pool. Transcripts are unique across the whole corpus, so the
splits share no text.

Outputs (fairseq layout, all paths relative to ``--out``): ``train/<id>.ogg``, ``valid/<id>.ogg``,
``{train,valid}.tsv`` (first line ``.``, then ``<split>/<id>.ogg<TAB><num_samples>`` with the
decoded length at 16 kHz), ``{train,valid}.wrd`` (uppercase words), ``{train,valid}.ltr``
(letters separated by spaces, ``|`` word boundaries), ``voices.tsv`` (provenance per id) and
``../PROVENANCE.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000

# ---------------------------------------------------------------------------------------------
# Voices
# ---------------------------------------------------------------------------------------------

# espeak-ng English accents (the mbrola ``mb-*`` voices need mbrola and are not used).
ACCENTS = [
    "en",  # British English (gmw/en)
    "en-us",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-029",  # Caribbean
    "en-gb-x-gbclan",  # Lancaster
    "en-gb-x-gbcwmd",  # West Midlands
    "en-us-nyc",
]

# ``+variant`` modifiers (files in espeak-ng-data/voices/!v). "" is the accent's default voice.
# Robotic / effect variants (robosoft*, Demonic, UniRobot, announcer, fast ...) are left out.
TRAIN_VARIANTS = [
    "", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt4", "klatt5", "klatt6", "croak", "whisper", "whisperf",
    "Alex", "Alicia", "Andrea", "Andy", "Annie", "aunty", "belinda", "benjamin", "boris",
    "caleb", "david", "ed", "edward", "gustave", "grandma", "grandpa", "iven", "iven3", "john",
    "linda", "max", "michel", "norbert", "paul", "quincy", "rob", "steph", "steph2", "zac",
    "Gene", "Lee", "Michael", "Mike", "Nguyen", "robert", "shelby",
]
# Only ever used for valid utterances (unseen speakers for evaluation).
HELD_OUT_VARIANTS = ["klatt3", "steph3", "travis", "anika"]

SPEED_RANGE = (120, 200)  # espeak-ng -s, words per minute
PITCH_RANGE = (25, 75)  # espeak-ng -p, 0..99
AMPLITUDE_RANGE = (40, 60)  # espeak-ng -a (default 100 clips with some variants)

# ---------------------------------------------------------------------------------------------
# Vocabulary (hand-written; every word is common English)
# ---------------------------------------------------------------------------------------------

# Person nouns (singular, plural).
PERSON_NOUNS = [
    ("farmer", "farmers"), ("teacher", "teachers"), ("doctor", "doctors"), ("baker", "bakers"),
    ("driver", "drivers"), ("sailor", "sailors"), ("painter", "painters"), ("nurse", "nurses"),
    ("student", "students"), ("captain", "captains"), ("shopkeeper", "shopkeepers"),
    ("fisherman", "fishermen"), ("gardener", "gardeners"), ("pilot", "pilots"),
    ("writer", "writers"), ("singer", "singers"), ("carpenter", "carpenters"),
    ("mechanic", "mechanics"), ("librarian", "librarians"), ("neighbor", "neighbors"),
    ("visitor", "visitors"), ("worker", "workers"), ("soldier", "soldiers"),
    ("stranger", "strangers"), ("traveler", "travelers"), ("musician", "musicians"),
    ("cook", "cooks"), ("waiter", "waiters"), ("guard", "guards"), ("child", "children"),
    ("man", "men"), ("woman", "women"), ("boy", "boys"), ("girl", "girls"),
]
RELATIVES = [
    "brother", "sister", "mother", "father", "uncle", "aunt", "cousin", "friend", "grandmother",
    "grandfather", "son", "daughter", "partner", "colleague", "teacher", "doctor",
]
POSSESSIVES = ["my", "his", "her", "our", "their", "your"]
NAMES = [
    "anna", "peter", "maria", "james", "sarah", "thomas", "helen", "david", "lucy", "robert",
    "emma", "henry", "grace", "daniel", "alice", "oliver", "clara", "samuel", "ruth", "martin",
    "laura", "george", "nora", "william", "rose", "edward", "julia", "frank", "ella", "simon",
]
PERSON_ADJS = [
    "old", "young", "tall", "quiet", "busy", "tired", "cheerful", "clever", "kind", "patient",
    "careful", "nervous", "friendly", "brave", "lazy", "polite", "angry", "happy", "hungry",
    "proud", "curious", "sleepy",
]

# Verbs: base, past, past participle, -ing, third person singular; object categories they take.
# Categories: t = thing, f = food, d = document, p = person.
VERBS = [
    ("carry carried carried carrying carries", "tfd"),
    ("paint painted painted painting paints", "t"),
    ("find found found finding finds", "tfdp"),
    ("buy bought bought buying buys", "tfd"),
    ("clean cleaned cleaned cleaning cleans", "t"),
    ("sell sold sold selling sells", "tfd"),
    ("wash washed washed washing washes", "tf"),
    ("fix fixed fixed fixing fixes", "t"),
    ("move moved moved moving moves", "t"),
    ("bring brought brought bringing brings", "tfdp"),
    ("take took taken taking takes", "tfdp"),
    ("hold held held holding holds", "td"),
    ("lift lifted lifted lifting lifts", "t"),
    ("pack packed packed packing packs", "tf"),
    ("pull pulled pulled pulling pulls", "t"),
    ("push pushed pushed pushing pushes", "t"),
    ("repair repaired repaired repairing repairs", "t"),
    ("send sent sent sending sends", "tfd"),
    ("share shared shared sharing shares", "fd"),
    ("show showed shown showing shows", "td"),
    ("drop dropped dropped dropping drops", "tf"),
    ("hide hid hidden hiding hides", "tfd"),
    ("keep kept kept keeping keeps", "td"),
    ("lose lost lost losing loses", "td"),
    ("borrow borrowed borrowed borrowing borrows", "td"),
    ("check checked checked checking checks", "td"),
    ("choose chose chosen choosing chooses", "tfd"),
    ("fetch fetched fetched fetching fetches", "tf"),
    ("polish polished polished polishing polishes", "t"),
    ("wrap wrapped wrapped wrapping wraps", "tf"),
    ("return returned returned returning returns", "td"),
    ("order ordered ordered ordering orders", "tf"),
    ("cook cooked cooked cooking cooks", "f"),
    ("eat ate eaten eating eats", "f"),
    ("bake baked baked baking bakes", "f"),
    ("cut cut cut cutting cuts", "f"),
    ("taste tasted tasted tasting tastes", "f"),
    ("serve served served serving serves", "f"),
    ("prepare prepared prepared preparing prepares", "fd"),
    ("read read read reading reads", "d"),
    ("write wrote written writing writes", "d"),
    ("sign signed signed signing signs", "d"),
    ("copy copied copied copying copies", "d"),
    ("fold folded folded folding folds", "d"),
    ("print printed printed printing prints", "d"),
    ("study studied studied studying studies", "d"),
    ("finish finished finished finishing finishes", "fd"),
    ("meet met met meeting meets", "p"),
    ("call called called calling calls", "p"),
    ("visit visited visited visiting visits", "p"),
    ("help helped helped helping helps", "p"),
    ("thank thanked thanked thanking thanks", "p"),
    ("see saw seen seeing sees", "tp"),
    ("follow followed followed following follows", "p"),
    ("invite invited invited inviting invites", "p"),
    ("greet greeted greeted greeting greets", "p"),
    ("remember remembered remembered remembering remembers", "p"),
    ("teach taught taught teaching teaches", "p"),
    ("wake woke woken waking wakes", "p"),
]
MOVE_VERBS = {"carry", "bring", "take", "send", "move", "pull", "push", "fetch", "return"}

# Object nouns: singular, plural (None = mass noun), category.
OBJECTS = [
    ("box", "boxes", "t"), ("basket", "baskets", "t"), ("bag", "bags", "t"),
    ("bottle", "bottles", "t"), ("chair", "chairs", "t"), ("table", "tables", "t"),
    ("lamp", "lamps", "t"), ("bicycle", "bicycles", "t"), ("coat", "coats", "t"),
    ("hat", "hats", "t"), ("umbrella", "umbrellas", "t"), ("key", "keys", "t"),
    ("ladder", "ladders", "t"), ("bucket", "buckets", "t"), ("blanket", "blankets", "t"),
    ("rope", "ropes", "t"), ("clock", "clocks", "t"), ("mirror", "mirrors", "t"),
    ("candle", "candles", "t"), ("kettle", "kettles", "t"), ("bell", "bells", "t"),
    ("jacket", "jackets", "t"), ("radio", "radios", "t"), ("camera", "cameras", "t"),
    ("suitcase", "suitcases", "t"), ("hammer", "hammers", "t"), ("brush", "brushes", "t"),
    ("cup", "cups", "t"), ("plate", "plates", "t"), ("bowl", "bowls", "t"), ("jar", "jars", "t"),
    ("drum", "drums", "t"), ("guitar", "guitars", "t"), ("wheel", "wheels", "t"),
    ("pillow", "pillows", "t"), ("flag", "flags", "t"), ("ring", "rings", "t"),
    ("tent", "tents", "t"), ("barrel", "barrels", "t"), ("parcel", "parcels", "t"),
    ("shoe", "shoes", "t"), ("glove", "gloves", "t"), ("toy", "toys", "t"),
    ("apple", "apples", "f"), ("orange", "oranges", "f"), ("pie", "pies", "f"),
    ("cake", "cakes", "f"), ("egg", "eggs", "f"), ("potato", "potatoes", "f"),
    ("carrot", "carrots", "f"), ("sandwich", "sandwiches", "f"), ("lemon", "lemons", "f"),
    ("onion", "onions", "f"), ("tomato", "tomatoes", "f"), ("pear", "pears", "f"),
    ("plum", "plums", "f"), ("melon", "melons", "f"), ("pumpkin", "pumpkins", "f"),
    ("cookie", "cookies", "f"), ("loaf", "loaves", "f"), ("fish", "fish", "f"),
    ("cherry", "cherries", "f"), ("peach", "peaches", "f"), ("biscuit", "biscuits", "f"),
    ("bread", None, "f"), ("soup", None, "f"), ("cheese", None, "f"), ("rice", None, "f"),
    ("butter", None, "f"), ("honey", None, "f"),
    ("letter", "letters", "d"), ("book", "books", "d"), ("map", "maps", "d"),
    ("report", "reports", "d"), ("note", "notes", "d"), ("story", "stories", "d"),
    ("newspaper", "newspapers", "d"), ("poem", "poems", "d"), ("list", "lists", "d"),
    ("card", "cards", "d"), ("ticket", "tickets", "d"), ("recipe", "recipes", "d"),
    ("message", "messages", "d"), ("form", "forms", "d"), ("postcard", "postcards", "d"),
    ("magazine", "magazines", "d"), ("notebook", "notebooks", "d"), ("diary", "diaries", "d"),
]
OBJECT_ADJS = {
    "t": ["old", "new", "heavy", "light", "small", "large", "big", "red", "blue", "green",
          "yellow", "brown", "black", "white", "wooden", "broken", "clean", "dirty", "empty",
          "round", "cheap", "expensive", "strange", "beautiful", "tiny", "wet", "dry", "shiny",
          "plain", "bright", "dark", "metal", "heavy"],
    "f": ["fresh", "ripe", "warm", "sweet", "hot", "cold", "delicious", "small", "large", "green",
          "red", "juicy", "soft", "homemade", "spicy"],
    "d": ["long", "short", "old", "new", "strange", "secret", "important", "funny", "boring",
          "torn", "handwritten", "official", "private", "simple", "interesting", "brief", "famous"],
}
PREDICATE_ADJS = {
    "t": ["heavy", "broken", "too small", "much too big", "very old", "quite new", "rather dirty",
          "almost empty", "surprisingly light", "very expensive", "still wet"],
    "f": ["delicious", "still warm", "too salty", "very sweet", "not fresh", "perfectly ripe",
          "much too hot", "quite cold"],
    "d": ["very long", "hard to read", "quite boring", "really funny", "full of mistakes",
          "very important", "too short", "rather strange"],
    "p": ["very tired", "quite happy", "a little nervous", "late again", "very busy"],
}
NUMBERS = [
    "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "fifteen", "twenty", "thirty", "forty", "fifty", "a hundred", "several", "a few", "many",
    "some", "a dozen", "twenty five", "sixty",
]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
PARTS_OF_DAY = ["morning", "afternoon", "evening"]
SEASONS = ["spring", "summer", "autumn", "winter"]
CLOCK_HOURS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
               "eleven", "twelve"]

# Locations: (preposition, noun phrase). Usable for "at / in", "to" and "arrived at / in".
LOCATIONS = [
    ("at", "the station"), ("at", "the market"), ("in", "the village"), ("in", "the city"),
    ("at", "the hospital"), ("in", "the library"), ("at", "the school"), ("in", "the kitchen"),
    ("in", "the garden"), ("at", "the harbor"), ("at", "the bakery"), ("in", "the office"),
    ("at", "the farm"), ("in", "the park"), ("at", "the airport"), ("in", "the museum"),
    ("at", "the hotel"), ("at", "the post office"), ("in", "the old barn"), ("in", "the forest"),
    ("at", "the beach"), ("in", "the town square"), ("at", "the factory"), ("in", "the cellar"),
    ("at", "the theater"), ("in", "the classroom"), ("at", "the bus stop"), ("in", "the shop"),
    ("at", "the castle"), ("in", "the valley"), ("at", "the bank"), ("in", "the hall"),
]
POSITIONS = [
    "under the tree", "beside the lake", "by the window", "near the river", "behind the house",
    "next to the door", "across the street", "on the bridge", "on the hill", "near the fountain",
    "behind the wall", "in the corner", "near the gate", "at the end of the road",
    "in the attic", "beside the fire", "outside the church",
]
# Only after things, food and documents (never after people).
OBJECT_POSITIONS = ["on the top shelf", "under the bed", "on the table", "in the drawer",
                    "on the back seat", "in the box", "under the stairs"]
MANNERS = [
    "very carefully", "slowly", "quickly", "with great care", "without a word", "once again",
    "for the first time", "in the rain", "with a smile", "in a hurry", "as fast as possible",
    "without any help", "very quietly", "with both hands", "in the dark", "just in time",
    "by mistake", "on purpose", "for a long time",
]
REASONS = [
    "because it was raining", "because the shop was closed", "because there was no time",
    "because it was too late", "because the road was blocked", "because of the storm",
    "because the bus was late", "because nobody asked", "because it was far too cold",
    "because the door was locked", "because the light went out", "because of the noise",
]
INTRANSITIVES = [  # base, past, -ing, third person
    ("walk", "walked", "walking", "walks"), ("run", "ran", "running", "runs"),
    ("wait", "waited", "waiting", "waits"), ("work", "worked", "working", "works"),
    ("sleep", "slept", "sleeping", "sleeps"), ("sing", "sang", "singing", "sings"),
    ("dance", "danced", "dancing", "dances"), ("rest", "rested", "resting", "rests"),
    ("sit", "sat", "sitting", "sits"), ("stay", "stayed", "staying", "stays"),
    ("swim", "swam", "swimming", "swims"), ("play", "played", "playing", "plays"),
    ("travel", "traveled", "traveling", "travels"), ("study", "studied", "studying", "studies"),
    ("laugh", "laughed", "laughing", "laughs"), ("listen", "listened", "listening", "listens"),
]
DURATIONS = [
    "for an hour", "for two hours", "for ten minutes", "for a while", "all day", "all night",
    "for three days", "until noon", "until midnight", "for half an hour", "the whole afternoon",
]
REPORT_VERBS = ["said", "told me", "explained", "promised", "wrote", "mentioned", "believed",
                "remembered"]
OPINIONS = ["i think that", "we hope that", "everybody knows that", "it seems that",
            "i am sure that", "they say that", "nobody believed that"]
DEADLINES = ["before noon", "before lunch", "before the train leaves", "by friday",
             "after the meeting", "before it gets dark"]
REPORTED_TIMES = ["the next day", "in the morning", "soon", "before noon", "that evening"]
COMINGS = ["arrived", "left", "came home", "woke up", "went out"]
WEATHER = ["cold", "warm", "windy", "sunny", "cloudy", "foggy", "quiet", "dark", "very hot"]


def _a(word: str) -> str:
  """Indefinite article for the following word (no word in the vocabulary needs special cases)."""
  return "an" if word[0] in "aeiou" else "a"


class Gen:
  """Draws grammatical sentences; ``level`` (0..4) controls how many optional phrases appear."""

  def __init__(self, rng: random.Random, level: int):
    self.r = rng
    self.level = level
    self.subjects: set[str] = set()  # person phrases already used (no "grace followed grace")

  # -- helpers ---------------------------------------------------------------------------------
  def p(self, base: float) -> bool:
    """Optional-phrase coin: probability grows with ``level``."""
    return self.r.random() < min(0.95, base + 0.18 * self.level)

  def c(self, seq):
    return self.r.choice(seq)

  # -- noun phrases ----------------------------------------------------------------------------
  def person(self, subject: bool = True) -> tuple[str, str]:
    """A person noun phrase (not used before in this sentence) and its agreement class:
    'sg', 'pl' or '1sg'."""
    for _ in range(20):
      np_, agr = self._person(subject)
      if np_ not in self.subjects:
        break
    self.subjects.add(np_)
    return np_, agr

  def _person(self, subject: bool) -> tuple[str, str]:
    k = self.r.random()
    if k < 0.22:
      return self.c(NAMES), "sg"
    if k < 0.40:
      return f"{self.c(POSSESSIVES)} {self.c(RELATIVES)}", "sg"
    if k < 0.50:
      if subject:
        pron = self.c([("i", "1sg"), ("we", "pl"), ("they", "pl"), ("she", "sg"), ("he", "sg"),
                       ("you", "pl")])
      else:
        pron = self.c([("me", "1sg"), ("us", "pl"), ("them", "pl"), ("her", "sg"),
                       ("him", "sg")])
      return pron
    sg, pl = self.c(PERSON_NOUNS)
    adj = f"{self.c(PERSON_ADJS)} " if self.p(0.25) else ""
    if self.r.random() < 0.7:
      det = self.c(["the", "the", "the", "a", "that", "this"])
      if det == "a":
        det = _a(adj or sg)
      return f"{det} {adj}{sg}", "sg"
    det = self.c(["the", "the", "some", "two", "three", "these", "those", "our"])
    return f"{det} {adj}{pl}", "pl"

  def obj(self, cats: str, plural_ok: bool = True) -> tuple[str, str]:
    """An object noun phrase for one of ``cats`` and its category."""
    cat = self.c(cats)
    if cat == "p":
      return self.person(subject=False)[0], "p"
    sg, pl, _ = self.c([o for o in OBJECTS if o[2] == cat])
    adj = f"{self.c(OBJECT_ADJS[cat])} " if self.p(0.3) else ""
    if pl is None:
      det = self.c(["the", "some", "my", "our", "their", "the", "this"])
      return f"{det} {adj}{sg}", cat
    if plural_ok and self.r.random() < 0.4:
      det = self.c(NUMBERS + ["the", "her", "his", "these", "those", "the"])
      return f"{det} {adj}{pl}", cat
    det = self.c(["the", "the", "a", "a", "my", "his", "her", "our", "their", "that", "this"])
    if det == "a":
      det = _a(adj or sg)
    return f"{det} {adj}{sg}", cat

  def location(self) -> str:
    prep, np_ = self.c(LOCATIONS)
    return f"{prep} {np_}"

  def where(self, objects: bool = False) -> str:
    """A location or position; ``objects`` admits positions only things can occupy."""
    if self.r.random() < 0.55:
      return self.location()
    return self.c(POSITIONS + OBJECT_POSITIONS if objects else POSITIONS)

  def clock(self) -> str:
    h = self.c(CLOCK_HOURS)
    return self.c([f"{h} o'clock", f"half past {h}", f"a quarter to {h}", f"ten past {h}",
                   f"twenty to {h}"])

  def time_past(self) -> str:
    return self.c([
        "yesterday", f"yesterday {self.c(PARTS_OF_DAY)}", "last night", "last week",
        "last year", f"last {self.c(SEASONS)}", f"last {self.c(DAYS)}", "two days ago",
        "a few minutes ago", "long ago", "this morning", f"on {self.c(DAYS)}",
        f"on {self.c(DAYS)} {self.c(PARTS_OF_DAY)}", f"at {self.clock()}", "after dinner",
        "before breakfast", "earlier today", "the day before yesterday", "a week ago",
    ])

  def time_future(self) -> str:
    return self.c([
        "tomorrow", f"tomorrow {self.c(PARTS_OF_DAY)}", "next week", f"next {self.c(DAYS)}",
        f"next {self.c(SEASONS)}", "in two hours", "later today", "tonight", "this afternoon",
        "soon", f"on {self.c(DAYS)}", f"at {self.clock()}", "after lunch", "before sunset",
        "the day after tomorrow", "in a few minutes", "next year",
    ])

  def time_habit(self) -> str:
    return self.c([
        "every morning", f"every {self.c(DAYS)}", "every evening", "on weekends",
        "twice a week", "once a month", f"every {self.c(SEASONS)}", "after school",
        "before work", f"on {self.c(DAYS)}s",
    ])

  def verb(self, cats: str | None = None) -> tuple[list[str], str]:
    """Verb forms [base, past, pp, ing, s3] and the object category string it accepts."""
    forms, vc = self.c(VERBS if cats is None else [v for v in VERBS if set(v[1]) & set(cats)])
    return forms.split(), vc

  def vp(self, form: int, dest_ok: bool = True, place: bool = True) -> str:
    """Transitive verb phrase with verb form index ``form`` (0 base, 1 past, 2 pp, 3 ing, 4 s3)."""
    v, cats = self.verb()
    o, cat = self.obj(cats)
    out = f"{v[form]} {o}"
    if place:
      if dest_ok and v[0] in MOVE_VERBS and cat != "p" and self.p(0.35):
        out += f" to {self.c(LOCATIONS)[1]}"
      elif self.p(0.3):
        out += f" {self.where(objects=cat != 'p')}"
    if self.p(0.0):
      out += f" {self.c(MANNERS)}"
    return out

  @staticmethod
  def be(agr: str, past: bool = False) -> str:
    if past:
      return "were" if agr == "pl" else "was"
    return {"sg": "is", "pl": "are", "1sg": "am"}[agr]

  # -- clause templates ------------------------------------------------------------------------
  def past_clause(self) -> str:
    s, _ = self.person()
    if self.r.random() < 0.2:
      iv = self.c(INTRANSITIVES)
      out = f"{s} {iv[1]}"
      if self.p(0.4):
        out += f" {self.where()}"
      if self.p(0.2):
        out += f" {self.c(DURATIONS)}"
      return out
    return f"{s} {self.vp(1)}"

  def t_past(self) -> str:
    if self.p(0.1):
      return f"{self.time_past()}, {self.past_clause()}"
    out = self.past_clause()
    if self.p(0.1):
      out += f" {self.time_past()}"
    return out

  def t_future(self) -> str:
    s, agr = self.person()
    if self.r.random() < 0.5:
      out = f"{s} will {self.vp(0)}"
    else:
      out = f"{s} {self.be(agr)} going to {self.vp(0)}"
    return out + f" {self.time_future()}" if self.p(0.4) else out

  def t_question(self) -> str:
    s, agr = self.person()
    k = self.r.random()
    if k < 0.3:
      out = f"did {s} {self.vp(0)}"
      if self.p(0.0):
        out += f" {self.time_past()}"
    elif k < 0.55:
      wh = self.c(["why", "when", "how", "where"])
      out = f"{wh} did {s} {self.vp(0, place=wh != 'where')}"
    elif k < 0.75:
      modal = self.c(["will", "can", "could", "should", "would"])
      out = f"{modal} {s} {self.vp(0)}"
      if modal == "will" and self.p(0.1):
        out += f" {self.time_future()}"
    else:
      out = f"{self.be(agr)} {s} {self.vp(3)}"
      if self.p(0.0):
        out += f" {self.c(['right now', 'at the moment', 'today', 'this week'])}"
    return out + "?"

  def t_progressive(self) -> str:
    s, agr = self.person()
    past = self.r.random() < 0.4
    out = f"{s} {self.be(agr, past)} {self.vp(3)}"
    if self.p(0.1):
      out += " " + (f"when the phone rang" if past else
                    self.c(["right now", "at the moment", "this afternoon", "today"]))
    return out

  def t_negative(self) -> str:
    s, agr = self.person()
    aux = self.c(["didn't", "couldn't", "wouldn't"])
    out = f"{s} {aux} {self.vp(0)}"
    if self.p(0.1):
      out += f" {self.time_past()}"
    return out + f" {self.c(REASONS)}" if self.p(0.3) else out

  def t_habit(self) -> str:
    s, agr = self.person()
    v, cats = self.verb()
    o, cat = self.obj(cats)
    out = f"{s} {v[4] if agr == 'sg' else v[0]} {o}"
    if self.p(0.2):
      out += f" {self.where(objects=cat != 'p')}"
    if self.p(0.3):
      return f"{self.time_habit()}, {out}"
    return f"{out} {self.time_habit()}"

  def t_there(self) -> str:
    cat = self.c("tfd")
    sg, pl, _ = self.c([o for o in OBJECTS if o[2] == cat and o[1] is not None])
    adj = f"{self.c(OBJECT_ADJS[cat])} " if self.p(0.4) else ""
    if self.r.random() < 0.6:
      out = f"there {self.c(['were', 'are', 'will be'])} {self.c(NUMBERS[:-4])} {adj}{pl}"
    else:
      out = f"there {self.c(['was', 'is'])} {_a(adj or sg)} {adj}{sg}"
    out += f" {self.where(objects=True)}"
    if self.p(0.0):
      out += f" {self.c(['this morning', 'last night', 'yesterday', 'again'])}"
    return out

  def t_relative(self) -> str:
    v, cats = self.verb("tfd")
    cat = self.c([c for c in cats if c != "p"])
    sg, _, _ = self.c([o for o in OBJECTS if o[2] == cat])
    adj = f"{self.c(OBJECT_ADJS[cat])} " if self.p(0.2) else ""
    s, _ = self.person()
    out = f"the {adj}{sg} that {s} {v[1]}"
    if self.p(0.1):
      out += f" {self.time_past()}"
    return f"{out} was {self.c(PREDICATE_ADJS[cat])}"

  def t_imperative(self) -> str:
    k = self.r.random()
    if k < 0.4:
      out = f"please {self.vp(0)}"
    elif k < 0.7:
      out = f"don't forget to {self.vp(0)}"
    else:
      out = f"{self.c(['try to', 'remember to', 'you should', 'we must', 'let us'])} {self.vp(0)}"
    if self.p(0.2):
      out += f" {self.c(DEADLINES)}"
    return out

  def t_compound(self) -> str:
    a, b = self.past_clause(), self.past_clause()
    k = self.r.random()
    if k < 0.3:
      return f"{a}, and {b}"
    if k < 0.5:
      return f"{a}, but {b}"
    if k < 0.7:
      return f"when {a}, {b}"
    if k < 0.85:
      return f"{a} while {b}"
    return f"after {a}, {b}"

  def t_reported(self) -> str:
    s, _ = self.person()
    rv = self.c(REPORT_VERBS)
    if self.r.random() < 0.5:
      s2, _ = self.person()
      out = f"{s} {rv} that {s2} would {self.vp(0)}"
      if self.p(0.2):
        out += f" {self.c(REPORTED_TIMES)}"
      return out
    return f"{s} {rv} that {self.past_clause()}"

  def t_opinion(self) -> str:
    op = self.c(OPINIONS)
    if self.r.random() < 0.5:
      return f"{op} {self.past_clause()}"
    op = self.c([o for o in OPINIONS if "believed" not in o])
    s, _ = self.person()
    return f"{op} {s} will {self.vp(0)} {self.time_future()}"

  def t_intransitive(self) -> str:
    s, agr = self.person()
    iv = self.c(INTRANSITIVES)
    k = self.r.random()
    if k < 0.5:
      out = f"{s} {iv[1]} {self.where()}"
      if self.p(0.3):
        out += f" {self.c(DURATIONS)}"
      return out + (f" {self.time_past()}" if self.p(0.1) else "")
    if k < 0.75:
      prep, np_ = self.c(LOCATIONS)
      verb = self.c(["arrived", "stopped", "waited", "stayed", "worked"])
      out = f"{s} {verb} {prep} {np_}"
      if self.p(0.3):
        out += f" {self.time_past()}"
      return out
    out = f"it was {self.c(WEATHER)} when {s} {self.c(COMINGS)}"
    return out + (f" {self.time_past()}" if self.p(0.1) else "")

  def t_perfect(self) -> str:
    s, agr = self.person()
    aux = "has" if agr == "sg" else "have"
    adv = self.c(["already ", "just ", "never ", "", "finally ", "recently "])
    return f"{s} {aux} {adv}{self.vp(2)}"

  TEMPLATES = [
      ("t_past", 4), ("t_future", 2), ("t_question", 2), ("t_progressive", 1.5),
      ("t_negative", 1.5), ("t_habit", 1.5), ("t_there", 1), ("t_relative", 1),
      ("t_imperative", 1), ("t_compound", 1.5), ("t_reported", 1), ("t_opinion", 1),
      ("t_intransitive", 1.5), ("t_perfect", 1),
  ]

  def sentence(self) -> str:
    """Sentence with punctuation, for the synthesizer (lowercase, names lowercase too)."""
    names, weights = zip(*self.TEMPLATES)
    if self.level >= 3 and self.r.random() < 0.5:
      out = self.t_compound()
    else:
      out = getattr(self, self.r.choices(names, weights)[0])()
    if self.level >= 2 and not out.endswith("?") and self.r.random() < 0.4:
      out += " " + self.c(MANNERS + REASONS + DURATIONS[:3])
    if not out.endswith("?"):
      out += "."
    return out


def transcript(text: str) -> str:
  """LibriSpeech-style transcript: uppercase words of A-Z and apostrophes, single spaces."""
  words = re.sub(r"[^a-z' ]", " ", text.lower()).split()
  out = " ".join(words).upper()
  assert re.fullmatch(r"[A-Z' ]+", out), out
  return out


def letters(wrd: str) -> str:
  """fairseq ``.ltr`` line: characters separated by spaces, ``|`` between words, trailing ``|``."""
  return " ".join(wrd.replace(" ", "|")) + " |"


def espeak_display(text: str) -> str:
  """Text as handed to espeak-ng: sentence case, names capitalised."""
  names = set(NAMES) | {"i"} | set(DAYS)
  words = [w.capitalize() if w.strip(",.?") in names else w for w in text.split(" ")]
  out = " ".join(words)
  return out[0].upper() + out[1:]


# ---------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------


def synthesize(text: str, voice: str, speed: int, pitch: int, amplitude: int,
               tmpdir: str) -> np.ndarray:
  """espeak-ng -> 16 kHz float64 mono waveform (untrimmed)."""
  wav = os.path.join(tmpdir, "u.wav")
  subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-a",
                  str(amplitude), "-w", wav, text], check=True, capture_output=True)
  x, sr = sf.read(wav, dtype="float64", always_2d=True)
  x = x.mean(axis=1)
  return soxr.resample(x, sr, SAMPLE_RATE, "HQ")


def trim(x: np.ndarray, top_db: float = 40.0, margin_s: float = 0.1) -> np.ndarray:
  """Drops leading/trailing audio quieter than ``top_db`` below the loudest 10 ms frame,
  keeping ``margin_s`` seconds of context on each side."""
  hop = SAMPLE_RATE // 100
  n = len(x) // hop
  rms = np.sqrt(np.mean(x[:n * hop].reshape(n, hop) ** 2, axis=1) + 1e-20)
  loud = np.nonzero(20 * np.log10(rms / rms.max()) > -top_db)[0]
  margin = int(margin_s * SAMPLE_RATE)
  start = max(0, loud[0] * hop - margin)
  end = min(len(x), (loud[-1] + 1) * hop + margin)
  return x[start:end]


def pick_voice(rng: random.Random, held_out: bool) -> tuple[str, int, int, int]:
  """(voice, speed, pitch, amplitude); ``held_out`` picks a variant from ``HELD_OUT_VARIANTS``."""
  accent = rng.choice(ACCENTS)
  variant = rng.choice(HELD_OUT_VARIANTS if held_out else TRAIN_VARIANTS)
  voice = f"{accent}+{variant}" if variant else accent
  return (voice, rng.randint(*SPEED_RANGE), rng.randint(*PITCH_RANGE),
          rng.randint(*AMPLITUDE_RANGE))


# Per-utterance maximum duration (seconds), its probability and the starting optional-phrase
# level: most clips are short (2-3 s) so that ~300 clips make ~12 minutes, a tail reaches 8 s.
DURATION_CAPS = [(2.5, 0.6, 0), (3.2, 0.25, 1), (4.5, 0.1, 2), (7.5, 0.05, 3)]


def make_utterance(seed: int, index: int, valid: bool, seen: set[str], min_s: float,
                   max_s: float, tmpdir: str):
  """Returns (text, wrd, voice, speed, pitch, audio) for utterance ``index``."""
  vrng = random.Random(f"{seed}:voice:{index}")
  voice, speed, pitch, amp = pick_voice(vrng, held_out=valid and index % 2 == 0)
  cap, _, level = vrng.choices(DURATION_CAPS, [c[1] for c in DURATION_CAPS])[0]
  cap = min(cap, max_s)
  for attempt in range(500):
    rng = random.Random(f"{seed}:{index}:{attempt}")
    text = Gen(rng, level).sentence()
    wrd = transcript(text)
    if wrd in seen:
      continue
    y = trim(synthesize(espeak_display(text), voice, speed, pitch, amp, tmpdir))
    dur = len(y) / SAMPLE_RATE
    if dur < min_s:
      level = min(level + 1, 6)
      continue
    if dur > cap:
      level = max(level - 1, 0)
      continue
    y = (0.9 / np.abs(y).max() * y).astype(np.float32)
    return text, wrd, voice, speed, pitch, y
  raise RuntimeError(f"utterance {index}: no sentence between {min_s} and {cap} s")


def write_ogg(path: Path, y: np.ndarray, compression: float) -> int:
  """Writes Ogg Vorbis and returns the decoded length (samples at 16 kHz).

  Lossy coding can overshoot the 0.9 peak (by up to ~20 % on espeak's sharpest transients);
  the clip is scaled down and re-encoded until the decoded peak is at most 0.98."""
  for _ in range(5):
    sf.write(str(path), y, SAMPLE_RATE, format="OGG", subtype="VORBIS",
             compression_level=compression)
    z, sr = sf.read(str(path), dtype="float32", always_2d=True)
    if sr != SAMPLE_RATE or z.shape[1] != 1 or not np.all(np.isfinite(z)):
      raise RuntimeError(f"{path}: bad decode sr={sr} shape={z.shape}")
    peak = float(np.abs(z).max())
    if peak <= 0.98:
      return z.shape[0]
    y = (y * (0.9 / peak)).astype(np.float32)
  raise RuntimeError(f"{path}: decoded peak {peak:.3f} stays above 0.98")


def espeak_version() -> str:
  out = subprocess.run(["espeak-ng", "--version"], check=True, capture_output=True, text=True)
  return out.stdout.split("Data at:")[0].strip()


def stats_row(name: str, durs: list[float]) -> str:
  d = np.asarray(durs)
  return (f"| {name} | {len(d)} | {d.sum() / 60:.2f} | {d.min():.2f} | {d.mean():.2f} | "
          f"{np.median(d):.2f} | {d.max():.2f} |")


def write_provenance(path: Path, args, rows, out: Path) -> None:
  durs = {s: [r["n"] / SAMPLE_RATE for r in rows if r["split"] == s] for s in ("train", "valid")}
  all_d = durs["train"] + durs["valid"]
  voices = {s: sorted({r["voice"] for r in rows if r["split"] == s}) for s in ("train", "valid")}
  size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
  hist = np.histogram(all_d, bins=[2, 3, 4, 5, 6, 8, 100])[0]
  rel_out = os.path.relpath(out, Path.cwd()) if out.is_absolute() else str(out)
  cmd = (f"python scripts/make_speech_corpus.py --out {rel_out} --seed {args.seed} "
         f"--num-utterances {args.num_utterances} --valid-fraction {args.valid_fraction}")
  variants_used = sorted({r["voice"].partition("+")[2] or "(default)" for r in rows})
  text = f"""# Embedded speech corpus: provenance

Synthetic English speech shipped inside the package (`d2vjax/data/embedded/speech`) so that
pre-training, fine-tuning and tests run without downloading anything. It is NOT a substitute for
LibriSpeech: it has one synthesizer, a small vocabulary and no real recording conditions.

## How it was made

* Generator: `scripts/make_speech_corpus.py` (its docstring describes the whole signal path).
* Regenerate (from the repository root, needs `espeak-ng`, `numpy`, `soundfile`, `soxr`):

      {cmd}

* Seed: `{args.seed}`; utterances: {len(rows)}; valid fraction: {args.valid_fraction}.
* Synthesizer: `{espeak_version()}` (formant synthesis; the mbrola voices are not used).
* Audio: espeak-ng 22050 Hz WAV -> soxr "HQ" resampling to 16 kHz -> silence trimmed to within
  100 ms of speech (-40 dB below the loudest 10 ms frame) -> peak normalised to 0.9 (scaled down
  further where the decoded Vorbis would overshoot 0.98) -> Ogg Vorbis
  (libsndfile {sf.__libsndfile_version__}, `compression_level={args.vorbis_compression}`) via
  soundfile {sf.__version__}.
  Decoded audio is 16 kHz mono float; `num_samples` in the `.tsv` files is the decoded length.
* Voices: {len(ACCENTS)} espeak-ng English accents ({", ".join(ACCENTS)}) combined with `+variant`
  voice modifiers; speed `-s` uniform in {SPEED_RANGE[0]}..{SPEED_RANGE[1]} wpm, pitch `-p`
  uniform in {PITCH_RANGE[0]}..{PITCH_RANGE[1]}, amplitude `-a` uniform in
  {AMPLITUDE_RANGE[0]}..{AMPLITUDE_RANGE[1]} (before peak normalisation), all drawn per
  utterance from the seed. Per-utterance choices are in `speech/voices.tsv`
  (`id, voice, speed, pitch, split`).
* Text: produced by the template sentence generator in the script (a hand-written vocabulary of
  a few hundred common English words; numbers and times spelled out). Transcripts are uppercase
  LibriSpeech style (`A-Z`, apostrophe, space) and unique across the corpus.

## Split rule

Ids `0000`..`{len(rows) - 1:04d}` are numbered in generation order; the last
{len(durs["valid"])} ids are `valid`, the rest `train`. Valid utterances with an even id take their
voice variant from variants never used in train ({", ".join("+" + v for v in HELD_OUT_VARIANTS)}),
the others from the train pool. No transcript occurs in both splits.

## Files

* `speech/{{train,valid}}/<id>.ogg`: audio.
* `speech/{{train,valid}}.tsv`: fairseq manifest; first line `.` (root relative to the tsv's
  folder), then `<split>/<id>.ogg<TAB><num_samples>`.
* `speech/{{train,valid}}.wrd`: transcripts, one per line in tsv order.
* `speech/{{train,valid}}.ltr`: fairseq letter targets (`H E L L O | W O R L D |`).
* `speech/voices.tsv`: header then `id<TAB>voice<TAB>speed<TAB>pitch<TAB>split`.

## Statistics (durations in seconds, totals in minutes)

| split | utterances | minutes | min s | mean s | median s | max s |
|---|---|---|---|---|---|---|
{stats_row("train", durs["train"])}
{stats_row("valid", durs["valid"])}
{stats_row("all", all_d)}

Duration histogram (all): 2-3 s: {hist[0]}, 3-4 s: {hist[1]}, 4-5 s: {hist[2]}, 5-6 s: {hist[3]},
6-8 s: {hist[4]}, >8 s: {hist[5]}.

Distinct voices (accent+variant): train {len(voices["train"])}, valid {len(voices["valid"])},
total {len(set(voices["train"]) | set(voices["valid"]))}. Variants used: {", ".join(variants_used)}.

Size on disk of `speech/`: {size / 1e6:.2f} MB.

## License

The text is generated by this project's own sentence generator (no third-party text) and the
audio is the output of espeak-ng; the output of a program is not covered by the GPL that covers
the espeak-ng engine itself. The corpus is distributed under the project's license (Apache-2.0).
"""
  path.write_text(text)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[2],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", type=Path, default=Path("d2vjax/data/embedded/speech"),
                  help="output folder (gets train/, valid/, *.tsv, *.wrd, *.ltr, voices.tsv)")
  ap.add_argument("--seed", type=int, default=20240611)
  ap.add_argument("--num-utterances", type=int, default=300)
  ap.add_argument("--valid-fraction", type=float, default=0.1)
  ap.add_argument("--min-seconds", type=float, default=2.05,
                  help="re-draw sentences whose trimmed clip is shorter (pre-training drops < 2 s)")
  ap.add_argument("--max-seconds", type=float, default=8.0)
  ap.add_argument("--vorbis-compression", type=float, default=0.8,
                  help="soundfile compression_level for Vorbis (0 best quality .. 1 smallest; "
                  "libsndfile's default is 0.6). 0.8 is about 38 kbit/s at 16 kHz mono")
  ap.add_argument("--provenance", type=Path, default=None,
                  help="PROVENANCE.md path (default: <out>/../PROVENANCE.md)")
  args = ap.parse_args(argv)
  if shutil.which("espeak-ng") is None:
    sys.exit("espeak-ng not found (apt-get install espeak-ng)")

  out: Path = args.out
  n = args.num_utterances
  n_valid = max(20, round(n * args.valid_fraction))
  if n_valid >= n:
    sys.exit(f"--num-utterances {n} leaves no train utterances with {n_valid} valid")
  for split in ("train", "valid"):
    (out / split).mkdir(parents=True, exist_ok=True)
    for f in (out / split).glob("*.ogg"):
      f.unlink()

  rows, seen = [], set()
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(n):
      split = "valid" if i >= n - n_valid else "train"
      text, wrd, voice, speed, pitch, y = make_utterance(
          args.seed, i, split == "valid", seen, args.min_seconds, args.max_seconds, tmp)
      seen.add(wrd)
      uid = f"{i:04d}"
      num = write_ogg(out / split / f"{uid}.ogg", y, args.vorbis_compression)
      rows.append(dict(id=uid, split=split, wrd=wrd, voice=voice, speed=speed, pitch=pitch,
                       n=num))
      if i % 25 == 0:
        print(f"{uid} {split} {voice} -s{speed} -p{pitch} {num / SAMPLE_RATE:.2f}s {wrd}",
              flush=True)

  for split in ("train", "valid"):
    sel = [r for r in rows if r["split"] == split]
    with open(out / f"{split}.tsv", "w") as f:
      f.write(".\n")
      for r in sel:
        f.write(f"{split}/{r['id']}.ogg\t{r['n']}\n")
    (out / f"{split}.wrd").write_text("".join(r["wrd"] + "\n" for r in sel))
    (out / f"{split}.ltr").write_text("".join(letters(r["wrd"]) + "\n" for r in sel))
  with open(out / "voices.tsv", "w") as f:
    f.write("id\tvoice\tspeed\tpitch\tsplit\n")
    for r in rows:
      f.write(f"{r['id']}\t{r['voice']}\t{r['speed']}\t{r['pitch']}\t{r['split']}\n")

  prov = args.provenance or out.parent / "PROVENANCE.md"
  write_provenance(prov, args, rows, out)
  total = sum(r["n"] for r in rows) / SAMPLE_RATE
  print(f"wrote {len(rows)} utterances ({n - n_valid} train, {n_valid} valid), "
        f"{total / 60:.2f} min, to {out}; provenance {prov}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
