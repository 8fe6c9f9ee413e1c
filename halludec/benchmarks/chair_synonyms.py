# ruff: noqa: E501  (the table's lines are data and stay exactly as released)
"""CHAIR's synonym table and word rules: benchmark-defining data, reproduced exactly.

Source of the table: ``data/synonyms.txt`` of LisaAnne/Hallucination (Rohrbach et al., 2018, "Object Hallucination in
Image Captioning"); the same bytes are embedded as ``synonyms_txt`` in shikiw/OPERA:chair.py (commit 61426ef) and used
by OPERA, HALC, PAI, DeCo and lmms-eval. 80 lines, one per COCO category, entries separated by ", ", the first entry
being the COCO category name ("node word"); 416 entries, 403 distinct. The table is kept byte for byte, typos
("televison", "solider", "phon", "knive"), duplicates, trailing spaces and the two entries with a leading space
(" motor bike", " cheesecake", from a doubled space after the comma) included; sha256 of ``SYNONYMS_TXT``:
b685537b36fe21b791c87151b96a991ceb582edff19f3da204dcc7a7905502f2.

Source of the rules (two-word phrases, "baby"/"adult" animals, "passenger" vehicles, "bow tie", "toilet seat",
"wine glas"): ``CHAIR.__init__`` and ``caption_to_words`` in shikiw/OPERA:chair.py (the Maxlinn port of
LisaAnne/Hallucination:utils/chair.py); OPERA's list adds "train track" to the original one.

``compat_opera_synonyms=True`` reproduces the released code exactly: entries are used as split, so " motor bike" and
" cheesecake" (leading space) and "iPhone" (capital letter, while captions are lowercased) can never match. The
default (``False``) strips and lowercases every entry, so "motor bike", "cheesecake" and "iphone" count. Results
record which setting was used.
"""

from __future__ import annotations

from dataclasses import dataclass

# fmt: off
# Byte-for-byte copy of LisaAnne/Hallucination data/synonyms.txt (== shikiw/OPERA:chair.py synonyms_txt).
SYNONYMS_TXT = (
    "person, girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, worker, passenger, sister, biker, policeman, cop, officer, lady, cowboy, bride, groom, male, female, guy, traveler, mother, father, gentleman, pitcher, player, skier, snowboarder, skater, skateboarder, person, woman, guy, foreigner, child, gentleman, caller, offender, coworker, trespasser, patient, politician, soldier, grandchild, serviceman, walker, drinker, doctor, bicyclist, thief, buyer, teenager, student, camper, driver, solider, hunter, shopper, villager\n"
    "bicycle, bike, bicycle, bike, unicycle, minibike, trike\n"
    "car, automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi\n"
    "motorcycle, scooter,  motor bike, motor cycle, motorbike, scooter, moped\n"
    "airplane, jetliner, plane, air plane, monoplane, aircraft, jet, jetliner, airbus, biplane, seaplane\n"
    "bus, minibus, trolley\n"
    "train, locomotive, tramway, caboose\n"
    "truck, pickup, lorry, hauler, firetruck\n"
    "boat, ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, catamaran, pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, schooner, barge, ferry, sailboard, paddleboat, lifeboat, freighter, steamboat, riverboat, battleship, steamship\n"
    "traffic light, street light, traffic signal, stop light, streetlight, stoplight\n"
    "fire hydrant, hydrant\n"
    "stop sign\n"
    "parking meter\n"
    "bench, pew\n"
    "bird, ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, hummingbird, mallard, finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, woodpecker, egret, chickadee, quail, bluebird, kingfisher, buzzard, willet, gull, swan, bluejay, flamingo, cormorant, parrot, loon, gosling, waterbird, pheasant, rooster, sandpiper, crow, raven, turkey, oriole, cowbird, warbler, magpie, peacock, cockatiel, lorikeet, puffin, vulture, condor, macaw, peafowl, cockatoo, songbird\n"
    "cat, kitten, feline, tabby\n"
    "dog, puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, terrier, poodle, labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, weimaraner, corgi, cocker, greyhound, retriever, brindle, hound, whippet, husky\n"
    "horse, colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, bronco\n"
    "sheep, lamb, ram, lamb, goat, ewe\n"
    "cow, cattle, oxen, ox, calf, cattle, holstein, heifer, buffalo, bull, zebu, bison \n"
    "elephant\n"
    "bear, panda\n"
    "zebra\n"
    "giraffe\n"
    "backpack, knapsack\n"
    "umbrella\n"
    "handbag, wallet, purse, briefcase\n"
    "tie, bow, bow tie\n"
    "suitcase, suit case, luggage\n"
    "frisbee\n"
    "skis, ski\n"
    "snowboard\n"
    "sports ball, ball\n"
    "kite\n"
    "baseball bat\n"
    "baseball glove\n"
    "skateboard\n"
    "surfboard, longboard, skimboard, shortboard, wakeboard\n"
    "tennis racket, racket\n"
    "bottle\n"
    "wine glass\n"
    "cup\n"
    "fork\n"
    "knife, pocketknife, knive\n"
    "spoon\n"
    "bowl, container\n"
    "banana\n"
    "apple\n"
    "sandwich, burger, sub, cheeseburger, hamburger\n"
    "orange\n"
    "broccoli\n"
    "carrot\n"
    "hot dog\n"
    "pizza\n"
    "donut, doughnut, bagel\n"
    "cake,  cheesecake, cupcake, shortcake, coffeecake, pancake\n"
    "chair, seat, stool\n"
    "couch, sofa, recliner, futon, loveseat, settee, chesterfield \n"
    "potted plant, houseplant\n"
    "bed\n"
    "dining table, table, desk\n"
    "toilet, urinal, commode, toilet, lavatory, potty\n"
    "tv, monitor, televison, television\n"
    "laptop, computer, notebook, netbook, lenovo, macbook, laptop computer\n"
    "mouse\n"
    "remote\n"
    "keyboard\n"
    "cell phone, mobile phone, phone, cellphone, telephone, phon, smartphone, iPhone\n"
    "microwave\n"
    "oven, stovetop, stove, stove top oven\n"
    "toaster\n"
    "sink\n"
    "refrigerator, fridge, fridge, freezer\n"
    "book\n"
    "clock\n"
    "vase\n"
    "scissors\n"
    "teddy bear, teddybear\n"
    "hair drier, hairdryer\n"
    "toothbrush\n"
)
# fmt: on

# Two-word phrases merged into one token before the vocabulary lookup (shikiw/OPERA:chair.py, in its order, with its
# duplicates). A merged pair that is not a vocabulary entry swallows both words ("train track" yields no train).
COCO_DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier", "potted plant",
    "bow tie", "laptop computer", "stove top oven", "hot dog", "teddy bear", "home plate", "train track",
)  # fmt: skip
# "baby X" / "adult X" -> X, so "baby elephant" does not fire "person" (from "baby").
ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
# "passenger X" -> X, so "passenger jet" does not fire "person" (from "passenger").
VEHICLE_WORDS = ("jet", "train")
SPECIAL_PAIRS = (("bow tie", "tie"), ("toilet seat", "toilet"), ("wine glas", "wine glass"))


@dataclass(frozen=True)
class ChairVocabulary:
    """The CHAIR vocabulary for one synonym setting.

    Attributes:
        compat_opera_synonyms: Whether entries are used exactly as released (see the module docstring).
        objects: Every synonym entry (the words a caption token must equal to count as an object mention).
        node_word: Entry -> COCO category name (its line's first entry).
        double_words: Two-word phrase -> the token it becomes.
        categories: The 80 category names in table order.
    """

    compat_opera_synonyms: bool
    objects: frozenset[str]
    node_word: dict[str, str]
    double_words: dict[str, str]
    categories: tuple[str, ...]

    @property
    def words(self) -> frozenset[str]:
        """Every single word that occurs in an entry or a two-word rule (what a lemmatiser must get right)."""
        out: set[str] = set()
        for phrase in [*self.objects, *self.double_words, *self.double_words.values()]:
            out.update(phrase.split())
        return frozenset(out)


def parse_synonyms(compat_opera_synonyms: bool = False) -> list[list[str]]:
    """The table as a list of lines, each a list of entries (first = category name).

    Args:
        compat_opera_synonyms: Keep entries exactly as split from the released text (leading spaces, capitals).

    Returns:
        80 lists of entries, in table order.
    """
    lines = [line.strip().split(", ") for line in SYNONYMS_TXT.splitlines() if line.strip()]
    if compat_opera_synonyms:
        return lines
    return [[entry.strip().lower() for entry in line] for line in lines]


def build_vocabulary(compat_opera_synonyms: bool = False) -> ChairVocabulary:
    """Build the lookup tables used by CHAIR.

    Args:
        compat_opera_synonyms: ``True`` reproduces the released code's quirks bit for bit; ``False`` (default)
            strips and lowercases the entries.

    Returns:
        The vocabulary.
    """
    lines = parse_synonyms(compat_opera_synonyms)
    node_word: dict[str, str] = {}
    objects: set[str] = set()
    for line in lines:
        objects.update(line)
        for entry in line:
            node_word[entry] = line[0]
    double: dict[str, str] = {pair: pair for pair in COCO_DOUBLE_WORDS}
    for animal in ANIMAL_WORDS:
        double[f"baby {animal}"] = animal
        double[f"adult {animal}"] = animal
    for vehicle in VEHICLE_WORDS:
        double[f"passenger {vehicle}"] = vehicle
    double.update(dict(SPECIAL_PAIRS))
    return ChairVocabulary(
        compat_opera_synonyms=compat_opera_synonyms,
        objects=frozenset(objects),
        node_word=node_word,
        double_words=double,
        categories=tuple(line[0] for line in lines),
    )
