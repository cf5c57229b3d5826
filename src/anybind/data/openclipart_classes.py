"""Curated noun classes on openclipart, for zero-shot classification.

The built-in openclipart index labels items with their top-level category ("animals",
"signs_and_symbols", "computer"), which no caption-trained model can name from a picture. This
module maps item ids (the PNG path without extension, "animals/birds/owl_01") to a small set of
concrete nouns instead, the words a prompt uses ("a picture of a playing card"), by an explicit
rule table. Abstract or unsortable themes (unsorted, special, logos, buttons, computer icon
sets, gradients, patterns, diagrams) get no class (None), and so does any item a rule leaves out.

How a rule matches (`RULES`, in order; the first rule that matches decides, so no item ever gets
two classes, and a rule that does not match passes the item on to the next one):

- ``folder``: the item lies in this folder or below it ("animals/birds" covers
  "animals/birds/penguin/...");
- ``words`` (when given): the file name has one of these words;
- ``unless``: the file name has none of these words.

The words of a file name are its lower-case runs of letters and digits, and the runs of letters
inside them: "smiley001" gives smiley001 and smiley, "star_05pt02step" gives star, 05pt02step,
pt and step. A rule whose class is None drops the items it matches (computer icon themes, body
parts, the star polygons that look like rings) before a broader rule below it sees them.

The same picture is often linked under several folders (1,221 of the PNGs are symlinks); the rules
never give two copies of one picture two different classes (checked on the real set, together
with byte-identical copies).

Classes and their item counts over the whole set (Debian openclipart-png, 8,121 PNGs, of which
1,967 get a class), measured. Themes with fewer than 15 nameable items were left out (cat,
chess piece, fish, cloud, bus, truck, airplane, globe, light bulb, ...). "star" is the 24
pictures that look like stars: 1,357 of the 1,375 thin-line star polygons of shapes/stars
(up to 98 points) look like rings and spirographs, and get no class.

=================== =====
class               items
=================== =====
flag                  478
playing card          228
person                168
arrow                  95
map                    82
fruit                  78
road sign              69
ice cream              56
stick figure           53
puzzle piece           49
bird                   45
car                    44
insect                 41
flower                 39
musical instrument     37
smiley face            37
house                  34
tree                   31
boat                   30
ball                   28
hat                    26
speech bubble          26
star                   24
clock                  23
balloon                21
dog                    21
book                   18
computer               18
moon                   18
telephone              18
heart                  17
dinosaur               15
=================== =====

>>> curated_class("animals/birds/owl_on_branch_ganson")
'bird'
>>> curated_class("unsorted/mucca") is None
True
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    """Items under `folder` whose file name has one of `words` (any, when empty) and none of
    `unless` get `label` (None: no class, and no later rule is tried)."""

    folder: str
    label: str | None
    words: tuple[str, ...] = ()
    unless: tuple[str, ...] = ()


def _r(folder: str, label: str | None, words: str = "", unless: str = "") -> Rule:
    return Rule(folder, label, tuple(words.split()), tuple(unless.split()))


# fmt: off
#: the star polygons of shapes/stars that look like stars: up to 16 points, each line skipping at
#: least a quarter of them ("star_05pt02step"); the other 1,357 look like rings and spirographs
STAR_POLYGONS: tuple[str, ...] = tuple(
    f"{n:02d}pt{m:02d}step" for n in range(5, 17) for m in range(2, n // 2 + 1) if m / n >= 0.25
)
#: links from the flag folders to maps, buildings and other things that are no flags
_NOT_FLAGS = (
    "honeychur southen capitol umbrella arkansas route ampelfrau ampelmaennchen coat fleur "
    "inukshuk map amrum andalusia aragon asturias balearian canarian cantabria castilla "
    "catalunya euskadi extremadura galicia madrid murcia navarra peninsule rios spanish valencia"
)

RULES: tuple[Rule, ...] = (
    # themes that are no objects: dropped before any broader rule sees them
    _r("computer/icons", None),
    _r("people/bodypart", None),
    _r("signs_and_symbols/flags/semaphore", None),  # people holding semaphore flags
    # animals
    _r("animals/dinosaurs", "dinosaur"),
    _r("animals/birds", "bird", unless="bat ii didier mirjam wing platter"),
    _r("animals/bugs", "insect",
       unless="lumaca ragnetto ragno spider virus cretina mostriciattolo"),
    _r("animals/mammals/dogs", "dog"),
    _r("animals/mammals", "dog", words="dog"),
    # buildings
    _r("buildings/homes", "house", unless="lighthouse pinkhome3 home8 home10 home11 home13"),
    _r("buildings", "house", words="house"),
    # food
    _r("food/desserts", "ice cream", words="cone glace gelato ice"),
    _r("recreation/party", "ice cream", words="cone"),
    _r("food/fruit", "fruit",
       unless="juice pie champignon gumnut kallisti straw tile tree turkey slate candied"),
    _r("food/fruit", None),
    _r("food", "fruit", words="apple grapes watermelon", unless="juice pie candied"),
    # plants
    _r("plants/flowers", "flower", unless="cactus tree mirjam"),
    _r("plants", "flower", words="daffodil flower flowers magnolia sakura tulips"),
    _r("plants", "tree", words="tree palmtree palm evergreen albero arbre olivier"),
    _r("recreation/holiday/christmas", "tree", words="tree evergreen", unless="wreath"),
    _r("decorations", "tree", words="evergreen sapin", unless="wreath"),
    # people
    _r("people/smilies", "smiley face", words="smiley smileytwinkle base chav"),
    _r("people/smilies", None),
    _r("people/stickmen", "stick figure"),
    _r("people/clothing/hats", "hat", unless="crown jacob"),
    _r("people/clothing", "hat", words="hat tophat turban"),
    _r("people/clothing", None),
    _r("people", "person",
       unless="faces alien bottle beach eye eyes camper car card chat don feet fingerprint "
              "fire gender handshake icons jazz hand maya safety samoa self skull stylized van "
              "runner sailing"),
    # recreation
    _r("recreation/games/cards", "playing card",
       unless="andalusia as audio brown celtic jacob photo two"),
    _r("recreation/party", "balloon", words="balloon balloons baloon palloncini"),
    _r("recreation/music", "musical instrument",
       words="africandrum bass cello derbouk djambf drums guitar flute horn harp maracas "
             "dulcimer oboe piano saxophone trombone tpt trumpet violin xylophone",
       unless="clef keys theory mute"),
    _r("recreation", "ball", words="ball baseball basebalm beachball ballon blowling",
       unless="bat cap glove flag"),
    _r("recreation/holiday/valentines", "heart", unless="ballons"),
    # shapes
    _r("shapes/stars", "star", words=" ".join(("estrella", *STAR_POLYGONS))),
    _r("shapes/stars", None, words="step"),
    _r("shapes", "star", words="star starwalker"),
    _r("shapes", "heart", words="heart"),
    _r("shapes/arrows", "arrow", unless="tasto reincarnate arrow11 arrow12 sign"),
    _r("shapes/callouts", "speech bubble"),
    _r("shapes/jigsaw", "puzzle piece"),
    # signs and symbols
    _r("signs_and_symbols/flags", "flag", unless=_NOT_FLAGS),
    _r("signs_and_symbols/clocks", "clock", unless="sand sandglass minute"),
    _r("signs_and_symbols", "heart", words="heart", unless="card ballons"),
    _r("signs_and_symbols", "star", words="star", unless="rating rat"),  # no star ratings
    _r("signs_and_symbols/weather", "moon", words="moon"),
    _r("science/astronomy", "moon", words="moon"),
    _r("geography", "moon",
       words="moon waxingcrescent firstquarter waxinggibbous fullmoon waninggibbous "
             "lastquarter waningcrescent"),
    # geography: the maps (of countries, regions, the world)
    _r("geography/astronomy", None),
    _r("geography", "map",
       unless="arkansas ayers basque calebasse umbrella earth eclipse eiffel garmin globe "
              "gps geko magelan mount mountain hemisphere planet pseudo shi spyglass "
              "symbol teide drum"),
    # transportation
    _r("transportation/roadsigns", "road sign", unless="ampelfrau ampelmaennchen nws"),
    _r("transportation/vehicles/hummers", "car"),
    _r("transportation", "car",
       words="car autos blazer chevrolet 4wd hummer bmw dodge formula redcar shelby skoda "
             "sportcar toyota",
       unless="aiga"),
    _r("transportation", "boat", words="boat sailboat sailing boating trawler ship",
       unless="points"),
    # office, books, computers
    _r("office/telephone", "telephone", unless="numero telefono"),
    _r("office", "telephone", words="phone handphone"),
    _r("education/books", "book", unless="cartoon newspaper"),
    _r("computer/hardware", "computer",
       words="computer desktop tower workstation laptop", unless="keyboardlayout keyboard"),
    _r("computer", "computer", words="computer notebook workstation pc",
       unless="keyboardlayout keyboard speaker"),
)
# fmt: on

#: the class names, in the order their first rule comes in `RULES`
CURATED_CLASSES: tuple[str, ...] = tuple(dict.fromkeys(r.label for r in RULES if r.label))

_WORD = re.compile(r"[a-z0-9]+")
_LETTERS = re.compile(r"[a-z]+")


def _words(name: str) -> set[str]:
    """The words of a file name: its runs of letters and digits, and the letter runs in them."""
    name = name.lower()
    return set(_WORD.findall(name)) | set(_LETTERS.findall(name))


def _matches(rule: Rule, folder: str, words: set[str]) -> bool:
    if folder != rule.folder and not folder.startswith(rule.folder + "/"):
        return False
    if rule.words and not words.intersection(rule.words):
        return False
    return not words.intersection(rule.unless)


def curated_class(item_id: str) -> str | None:
    """The curated class of one openclipart item id, or None (first matching rule wins)."""
    folder, _, name = item_id.rpartition("/")
    words = _words(name)
    for rule in RULES:
        if _matches(rule, folder, words):
            return rule.label
    return None


def curated_labels(item_ids: list[str]) -> list[str | None]:
    """`curated_class` of each item id, in order."""
    return [curated_class(i) for i in item_ids]


__all__ = ["CURATED_CLASSES", "RULES", "Rule", "curated_class", "curated_labels"]
