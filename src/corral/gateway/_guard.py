"""The semantic cache's guard: what two similar questions must agree on to share an answer.

A text is read into `Facts` once (about 0.1 ms; a stored text's facts are kept with it), and
two texts' facts are compared in under 0.1 ms. Each rule refuses on a difference that
embeddings blur: the vectors of "refund within 30 days" and "refund after 30 days" are 0.99
alike in MiniLM. The rules: numbers (number words, units, currencies, times, dates), units in
swapped places, negations, opposite words and un-/dis- prefixes, codes, emails, URLs, quoted
strings, named entities, periods, from/to and order swaps, and a few content words swapped in an
otherwise identical question.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from difflib import SequenceMatcher


def _list(words: str) -> list[str]:
    return words.split()


def _set(words: str) -> frozenset[str]:
    return frozenset(words.split())


def _table(groups: dict[str, str]) -> dict[str, str]:
    return {word: name for name, words in groups.items() for word in words.split()}


_UNITS = _table({
    "usd": "$ usd dollar dollars buck bucks", "eur": "€ eur euro euros",
    "gbp": "£ gbp quid sterling", "jpy": "¥ jpy yen", "inr": "₹ inr rupee rupees",
    "%": "% percent pct percentage", "x": "x times fold",
    "s": "s sec secs second seconds", "min": "min mins minute minutes",
    "h": "h hr hrs hour hours", "day": "d day days", "week": "wk wks week weeks",
    "month": "mo month months", "year": "y yr yrs year years",
    "km": "km kms kilometer kilometers kilometre kilometres", "mile": "mi mile miles",
    "m": "m meter meters metre metres", "cm": "cm centimeter centimeters", "mm": "mm",
    "ft": "ft foot feet", "inch": "inch inches", "kg": "kg kgs kilo kilos kilogram kilograms",
    "g": "g gram grams", "lb": "lb lbs pound pounds", "oz": "oz ounce ounces",
    "l": "l liter liters litre litres", "ml": "ml milliliter milliliters", "cup": "cup cups",
    "tbsp": "tbsp tablespoon tablespoons", "tsp": "tsp teaspoon teaspoons",
    "gal": "gal gallon gallons", "kb": "kb kilobyte kilobytes", "mb": "mb megabyte megabytes",
    "gb": "gb gig gigs gigabyte gigabytes", "tb": "tb terabyte terabytes",
    "c": "°c celsius", "f": "°f fahrenheit", "deg": "degree degrees", "am": "am a.m",
    "pm": "pm p.m", "th": "st nd rd th", "ms": "ms millisecond milliseconds", "k": "k",
})
_TIME_UNITS = frozenset(("s", "min", "h", "day", "week", "month", "year", "ms"))
_PERIODS = _table({
    "day": "day days daily", "week": "week weeks weekly", "month": "month months monthly",
    "year": "year years yearly annual annually", "quarter": "quarter quarters quarterly",
    "morning": "morning mornings", "afternoon": "afternoon",
    "evening": "evening evenings", "night": "night nights nightly overnight",
    "weekend": "weekend weekends",
})
_DATES = _set("monday tuesday wednesday thursday friday saturday sunday january february "
              "march april june july august september october november december today "
              "tonight tomorrow yesterday")
_TIME_NOUNS = _set("day week month year quarter weekend monday tuesday wednesday thursday "
                   "friday saturday sunday")
_MONTHS = _list("january february march april may june july august september october "
                "november december")
_MULTIPLIERS = {"hundred": 100, "thousand": 1000, "k": 1000, "million": 10**6, "mn": 10**6,
                "billion": 10**9, "bn": 10**9, "trillion": 10**12}
_SMALL = {w: i for i, w in enumerate(_list(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"))}
_TENS = {w: 10 * i for i, w in enumerate(
    _list("twenty thirty forty fifty sixty seventy eighty ninety"), start=2)}
_ORDINALS = {w: i for i, w in enumerate(_list(
    "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth"), start=1)}
_COUNT_WORDS = {"dozen": 12, "twice": 2, "thrice": 3, "double": 2, "triple": 3, "half": 0.5,
                "pair": 2, "couple": 2}
# say no more than "a": "one liter" is "a liter", "the first signs" are "the early signs"
_LIKE_A = _set("one single once first")
_ROMAN = {r: i for i, r in enumerate(_list(
    "II III IV V VI VII VIII IX X XI XII XIII XIV XV XVI XVII XVIII XIX XX"), start=2)}
_NEGATIONS = _set("not no never none nobody nothing nowhere neither nor cannot without unable "
                  "non")

# each axis: words at one pole, words at the other; two texts at opposite poles differ
_AXES: list[tuple[frozenset[str], frozenset[str]]] = [(_set(a), _set(b)) for a, b in [
    ("increase increases increased increasing raise raises raised raising higher highest more "
     "most greater greatest larger largest bigger biggest maximum max maximize grow grows "
     "growing extend extends extended upper tall taller tallest",
     "decrease decreases decreased decreasing reduce reduces reduced reducing lower lowest less "
     "least fewer fewest smaller smallest minimum min minimize shrink shrinks shorten "
     "shortens"),
    ("enable enables enabled enabling activate activates activated",
     "disable disables disabled disabling deactivate deactivates deactivated"),
    ("add adds added adding insert inserts inserted include includes included including attach "
     "attaches attached create creates created creating",
     "remove removes removed removing delete deletes deleted deleting exclude excludes "
     "excluded excluding detach detaches detached drop drops"),
    ("buy buys bought buying purchase purchases purchased purchasing",
     "sell sells sold selling"),
    ("upload uploads uploaded uploading", "download downloads downloaded downloading"),
    ("upgrade upgrades upgraded upgrading", "downgrade downgrades downgraded downgrading"),
    ("import imports imported importing", "export exports exported exporting"),
    ("encrypt encrypts encrypted encrypting encryption encode encodes encoded encoding",
     "decrypt decrypts decrypted decrypting decryption decode decodes decoded decoding"),
    ("before earlier earliest early prior previous oldest older first within",
     "after later latest late newer newest last final past"),
    ("above over exceed exceeds exceeding beyond", "below under beneath within"),
    ("open opens opened opening", "close closes closed closing"),
    ("start starts started starting begin begins began beginning",
     "stop stops stopped stopping end ends ended finish finishes pause paused"),
    ("accept accepts accepted accepting approve approves approved approving",
     "reject rejects rejected rejecting decline declines declined declining deny denied "
     "denies"),
    ("profit profits profitable gain gains", "loss losses unprofitable"),
    ("succeed succeeds succeeded success successful successfully",
     "fail fails failed failing failure unsuccessful"),
    ("debit", "credit"),
    ("deposit deposits deposited", "withdraw withdraws withdrew withdrawal withdrawals"),
    ("send sends sent sending", "receive receives received receiving"),
    ("arrive arrives arrived arrival arrivals arriving",
     "depart departs departed departure departures departing leave leaves leaving"),
    ("join joins joined joining", "leave leaves left leaving quit quits"),
    ("hire hires hired hiring", "fire fires fired firing"),
    ("promote promoted promotion", "demote demoted demotion"),
    ("charge charged charges charging", "refund refunded refunds refunding"),
    ("overpaid overcharged overpay", "underpaid undercharged underpay"),
    ("asc ascending", "desc descending"), ("push pushes pushed", "pull pulls pulled"),
    ("uppercase", "lowercase"), ("inner", "outer"), ("left", "right"), ("true", "false"),
    ("online", "offline"), ("inbound incoming", "outbound outgoing"),
    ("positive", "negative"), ("public", "private"), ("internal", "external"),
    ("inside", "outside"), ("local locally", "remote remotely"),
    ("domestic", "international abroad"), ("horizontal horizontally", "vertical vertically"),
    ("background", "foreground"), ("read reads reading", "write writes writing"),
    ("cheap cheaper cheapest inexpensive", "expensive pricier priciest costly"),
    ("fast faster fastest quick quicker quickest", "slow slower slowest"),
    ("long longer longest", "short shorter shortest"),
    ("good better best", "bad worse worst"), ("strong stronger", "weak weaker"),
    ("north northern", "south southern"), ("east eastern", "west western"),
    ("hot hotter", "cold colder"), ("sunrise", "sunset"), ("boil boiling", "freeze freezing"),
    ("allow allows allowed permit permitted", "forbid forbidden prohibit prohibited ban "
                                              "banned block blocks blocked"),
    ("login", "logout"), ("lend lends lent lending", "borrow borrows borrowed borrowing"),
    ("win wins won winning", "lose loses losing"), ("lost", "found"),
    ("input inputs", "output outputs"), ("min", "max"), ("full", "part"),
    ("gain", "lose"), ("high", "low"), ("checkin", "checkout"),
]]
_POLES: dict[str, list[tuple[int, int]]] = {}
for _axis, (_plus, _minus) in enumerate(_AXES):
    for _sign, _pole in ((1, _plus), (-1, _minus)):
        for _word in _pole:
            _POLES.setdefault(_word, []).append((_axis, _sign))
_PHRASES = [(re.compile(p), r) for p, r in [
    (r"\b(?:log|logged|logging|sign|signed|signing)[ -]?in(?:to)?\b", "login"),
    (r"\b(?:log|logged|logging|sign|signed|signing)[ -]?(?:out|off)\b", "logout"),
    (r"\b(?:turn|turns|turned|turning|switch|switches|switched|switching)\s+on\b", "enable"),
    (r"\b(?:turn|turns|turned|turning|switch|switches|switched|switching)\s+off\b", "disable"),
    (r"\bmore than\b", "over"), (r"\b(?:less|fewer) than\b", "under"),
    (r"\bat least\b", "minimum"), (r"\bat most\b", "maximum"), (r"\bno longer\b", "not"),
    (r"\bset(?:ting)? up\b", "setup"), (r"\bback up\b", "backup"),
    (r"\b(next|last|same)-(day|week|month|year)\b", r"\1 \2"),
    (r"\btoo (?:much|many|long|late|early|often|high|low|big|small)\b", "excess"),
    (r"\bcheck(?:ed|ing|s)?[ -]?in\b", "checkin"), (r"\bcheck(?:ed|ing|s)?[ -]?out\b", "checkout"),
]]
# opposites made by a prefix: un- and non- on any word, the others on these words only
_PREFIXED = {
    "dis": _set("connect connects connected allow allowed approve agree like appear appeared "
                "arm trust own continue continued mount mounted qualify qualified honor"),
    "de": _set("activate activated compress compressed serialize serialized register "
               "registered select selected value prioritize duplicate authorize authorized"),
    "in": _set("valid correct complete active accurate secure sensitive visible compatible "
               "direct"),
    "im": _set("possible proper mature partial mutable"), "il": _set("legal legible"),
    "ir": _set("regular relevant reversible"),
}
_FUNCTION = _set(
    "a an the to of in on at for by with from into onto about as and or but if so than then "
    "is are was were be been being am do does did done doing have has had having can could "
    "would should will shall may might must need i me my mine we us our you your it its "
    "this that these those they them their he him his she her there here how what when where "
    "which who whom whose why whether please any some all each every also just only yet "
    "still very really too way get got getting make made let tell know want like "
    "possible ok okay best way steps step process option options use using vs versus per "
    "typical usually normally actually exactly again new many much")
_DETERMINERS = _set("the a an my our your their his her its this that these those some")
_SYNONYMS = [_set(group) for group in (
    "buy purchase order", "get obtain receive", "cost price fee", "big large huge",
    "small little tiny", "child children kid kids", "fix repair solve", "error issue problem",
    "change update modify edit switch", "show display", "make create", "need require",
    "car vehicle", "phone mobile cell", "email mail e-mail", "book reserve", "trip journey",
    "photo photos picture pictures image images", "doc document", "employee staff worker",
    "salary pay wage", "shop store", "sofa couch", "tap faucet", "film movie", "say tell",
    "find locate", "help assist", "allowed permitted", "cancel terminate", "safe ok",
    "link connect", "bill billed charge charged", "move transfer", "see view visible",
    "author wrote write", "signup enroll register", "share shares stock stocks",
    "symptom symptoms sign signs", "quit resign", "deadline cutoff", "rate price",
)]
_SYNONYM = {word: i for i, group in enumerate(_SYNONYMS) for word in group}
_ROLE_WORDS = {"from": "from", "to": "to", "into": "to", "onto": "to", "towards": "to",
               "toward": "to"}
_EXCHANGES = _set("substitute substituting swap swapping exchange exchanging trade trading "
                  "replace replacing")
_NOT_FREE_UNITS = _set("times am pm st nd rd th mo fold")
_MARKERS = _table({"from": "from", "to": "to into onto towards toward", "than": "than vs versus",
                   "after": "after", "before": "before", "over": "over", "under": "under"})
_ALIKE = 0.6  # difflib's ratio of two word sequences from which they count as one template

_SPECIAL = re.compile(
    r"(?P<url>\b(?:https?://|www\.)\S+[^\s.,;:!?)\]'\"])"
    r"|(?P<email>\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+)"
    r"|(?P<quoted>\"[^\"\n]{1,80}\"|“[^”\n]{1,80}”|`[^`\n]{1,80}`|(?<!\w)'[^'\n]{1,80}'(?!\w))"
    r"|(?P<handle>(?<!\w)[@#][A-Za-z_][\w.-]*)"
    r"|(?P<iso>\b\d{4}-\d{2}-\d{2}\b)"
    r"|(?P<clock>\b\d{1,2}:\d{2}(?:\s?[ap]\.?m\b\.?)?)", re.IGNORECASE)
_TOKEN = re.compile(
    r"[$€£¥₹%]|°[cf]|\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)"
    r"|[^\W_]+(?:[-_./'][^\W_]+)*(?:\(\))?", re.IGNORECASE)
_NUMBER = re.compile(r"^(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?$")
_RATIO = re.compile(r"^\d+(?:\.\d+)?(?:/\d+(?:\.\d+)?)+$")
_NUMBER_UNIT = re.compile(r"^(\d+(?:\.\d+)?)-?([a-z%]+)$")
_SENTENCE_END = frozenset(".!?:;\n")


@dataclass(slots=True)
class Facts:
    """What of a text must match another's for both to share an answer."""

    words: list[str] = field(default_factory=list)
    numbers: list[tuple[str, str]] = field(default_factory=list)  # (value, unit or "")
    free_units: list[str] = field(default_factory=list)  # unit words with no number
    negations: int = 0
    poles: dict[int, int] = field(default_factory=dict)
    codes: dict[str, str] = field(default_factory=dict)  # emails, URLs, quoted, A-1: squashed
    names: dict[str, str] = field(default_factory=dict)  # capitalized words, acronyms: squashed
    dates: set[str] = field(default_factory=set)
    periods: set[str] = field(default_factory=set)
    roles: dict[str, set[str]] = field(default_factory=dict)
    joined: set[str] = field(default_factory=set)  # squashed words and word pairs and triples
    content: dict[str, str] = field(default_factory=dict)  # stem -> word, for the subject
    sequence: list[str] = field(default_factory=list)  # content stems, numbers and markers

    def has(self, squashed: str) -> bool:
        return squashed in self.joined or squashed in self.codes or squashed in self.names


def differs(query: str, cached: str) -> str | None:
    """Why ``query`` must not be served ``cached``'s answer however similar they read, or None.

    Two texts differ when they have:

    - other numbers, in digits or words, with amounts, units, times of day and ISO dates
      normalized ("$5k" is 5000 usd, "2 pm" is 14:00), or the same units the other way round
      ("15% of 80", "ounces in a pound");
    - another count of negations (not, never, n't, without, unable...);
    - words at opposite poles (enable/disable, buy/sell, before/after, more/less, local/remote)
      or a word and its un-/dis-/de- opposite (lock/unlock);
    - a name or code that one of them lacks: capitalized words past a sentence's start,
      acronyms, quoted strings, emails, URLs, @handles, codes such as A-1042 or 2FA;
    - other dates (Monday, March, tomorrow, next week), or other periods (monthly, per year);
    - roles swapped: "from Paris to London" against "from London to Paris", "Go faster than
      Rust" against "Rust faster than Go";
    - one or two words swapped for others in an otherwise alike question ("by key" against
      "by value", "my dog" against "my cat"), unless they are common synonyms.

    It errs on the side of refusing: a refused paraphrase costs one model call, a wrong answer
    served costs far more.
    """
    return differs_facts(facts(query), facts(cached))


def differs_facts(a: Facts, b: Facts) -> str | None:
    if sorted(v for v, _ in a.numbers) != sorted(v for v, _ in b.numbers):
        return f"other numbers: {_show(v for v, _ in a.numbers)} against " \
               f"{_show(v for v, _ in b.numbers)}"
    reason = _units(a, b)
    if reason:
        return reason
    if a.negations != b.negations:
        return f"negation in one only ({a.negations} against {b.negations})"
    for axis, pole in a.poles.items():
        if b.poles.get(axis, 0) == -pole:
            plus, minus = _AXES[axis]
            ours, theirs = (plus, minus) if pole > 0 else (minus, plus)
            return f"opposite meaning: {_pick(a.words, ours)!r} against " \
                   f"{_pick(b.words, theirs)!r}"
    for one, two in ((a, b), (b, a)):
        for word in one.words:
            opposite = _prefixed_opposite(word, two)
            if opposite:
                return f"opposite meaning: {word!r} against {opposite!r}"
    for one, two in ((a, b), (b, a)):
        for squashed, written in one.codes.items():
            if not two.has(squashed):
                return f"another code: {written!r} is in one only"
    names_a = [w for s, w in a.names.items() if not b.has(s)]
    names_b = [w for s, w in b.names.items() if not a.has(s)]
    if names_a and names_b:  # a name only added is for _substituted to judge
        return f"another name: {_show(names_a)} against {_show(names_b)}"
    if a.dates != b.dates:
        return f"other dates: {_show(a.dates)} against {_show(b.dates)}"
    if a.periods and b.periods and not a.periods & b.periods:
        return f"other periods: {_show(a.periods)} against {_show(b.periods)}"
    reason = _swapped_roles(a, b)
    if reason:
        return reason
    return _substituted(a, b)


def _units(a: Facts, b: Facts) -> str | None:
    ours: dict[str, set[str]] = {}
    theirs: dict[str, set[str]] = {}
    for facts, units in ((a, ours), (b, theirs)):
        for value, unit in facts.numbers:
            if unit:
                units.setdefault(value, set()).add(unit)
    for value, mine in ours.items():
        other = theirs.get(value)
        if other and not mine & other:
            return f"other units: {value} {_show(mine)} against {value} {_show(other)}"
    for value, mine in ours.items():
        for unit in mine - theirs.get(value, set()):
            moved = [v for v, units in theirs.items() if unit in units - ours.get(v, set())]
            if moved:
                return f"{unit} on {value} in one, on {moved[0]} in the other"
    if a.free_units and b.free_units:
        if sorted(a.free_units) != sorted(b.free_units):
            return f"other units: {_show(a.free_units)} against {_show(b.free_units)}"
        if a.free_units != b.free_units:
            return f"units the other way round: {' '.join(a.free_units)} against " \
                   f"{' '.join(b.free_units)}"
    return None


def _swapped_roles(a: Facts, b: Facts) -> str | None:
    for one, two in ((a, b), (b, a)):
        for x in one.roles.get("from", set()) - one.roles.get("to", set()):
            if x in two.roles.get("to", set()) and x not in two.roles.get("from", set()):
                return f"direction swapped: from {x!r} in one, to {x!r} in the other"
    return _reordered(a, b)


def _reordered(a: Facts, b: Facts) -> str | None:
    """The same two things on the two sides of "to", "than", "after"... the other way round:
    "convert a string to an integer" against "convert an integer to a string"."""
    ours = _bound(a.sequence)
    for marker, x, y in _bound(b.sequence):
        if x != y and (marker, y, x) in ours:
            return f"the other way round: {x!r} {marker} {y!r} against {y!r} {marker} {x!r}"
    return None


def _bound(sequence: list[str]) -> set[tuple[str, str, str]]:
    """(marker, x, y) for x up to three places before a marker and y up to three after."""
    pairs: set[tuple[str, str, str]] = set()
    for k, token in enumerate(sequence):
        if token.startswith("@"):
            left = _near(reversed(sequence[max(0, k - 3):k]))
            right = _near(sequence[k + 1:k + 4])
            pairs.update((token[1:], x, y) for x in left for y in right)
    return pairs


def _near(tokens: Iterable[str]) -> list[str]:
    near = []
    for token in tokens:
        if token.startswith("@"):
            break
        near.append(token)
    return near


def _substituted(a: Facts, b: Facts) -> str | None:
    """Up to three words swapped for others, or added, in an otherwise alike question."""
    ours = [a.content[s] for s in a.content.keys() - b.content.keys()]
    theirs = [b.content[s] for s in b.content.keys() - a.content.keys()]
    if not ours and not theirs:
        return None
    if len(ours) > 3 or len(theirs) > 3:
        return None
    matcher = SequenceMatcher(None, a.words, b.words, autojunk=False)
    if matcher.quick_ratio() < _ALIKE or matcher.ratio() < _ALIKE:
        return None  # worded otherwise: the embedding judges a paraphrase, not this rule
    if ours and theirs:
        if all(any(_synonyms(w, t) for t in theirs) for w in ours):
            return None
        return f"other words in an alike question: {_show(ours)} against {_show(theirs)}"
    if a.content.keys() & b.content.keys():
        return f"asks about more: {_show(ours or theirs)} in one only"
    return None


def _synonyms(a: str, b: str) -> bool:
    group = _SYNONYM.get(a)
    if group is not None and group == _SYNONYM.get(b):
        return True
    if set(_POLES.get(a, ())) & set(_POLES.get(b, ())):
        return True  # raise and increase
    a, b = _stem(a), _stem(b)
    shorter = min(len(a), len(b))
    common = next((i for i in range(shorter) if a[i] != b[i]), shorter)
    return common >= 5 or (common >= 4 and common == shorter)  # invest, investment


def _show(values: Iterable[str]) -> str:
    return ", ".join(sorted(values)) or "none"


def _pick(words: list[str], pole: frozenset[str]) -> str:
    return next((w for w in words if w in pole), "?")


def _prefixed_opposite(word: str, other: Facts) -> str | None:
    if word in other.joined:
        return None
    word = word.replace("-", "")
    for prefix in ("un", "non"):
        rest = word[len(prefix):]
        if word.startswith(prefix) and len(rest) >= 3 and rest in other.joined:
            return rest
    for prefix, stems in _PREFIXED.items():
        rest = word[len(prefix):]
        if word.startswith(prefix) and rest in stems and rest in other.joined:
            return rest
    return None


def _number(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def _canon(value: Decimal) -> str:
    return format(value.normalize(), "f")


def _squash(text: str) -> str:
    text = text.lower()
    if text.endswith("'s"):
        text = text[:-2]
    return "".join(ch for ch in text if ch.isalnum())


def _stem(word: str) -> str:
    """A crude English stemmer: enough that "ships", "shipped" and "shipping" meet."""
    word = _squash(word)
    if word in _UNSTEMMED:
        return word
    if len(word) > 4 and word.endswith("ies"):
        word = word[:-3] + "y"
    elif len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]
    if len(word) > 5 and word.endswith("ing"):
        word = word[:-3]
    elif len(word) > 4 and word.endswith("ed"):
        word = word[:-2]
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]
    if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "s":
        word = word[:-1]
    return word


def facts(text: str) -> Facts:
    facts = Facts()
    text = unicodedata.normalize("NFKC", text).replace("\u2019", "'")
    plain = list(text)  # the text with its special spans blanked out
    for match in _SPECIAL.finditer(text):
        kind, value = match.lastgroup, match.group()
        plain[match.start():match.end()] = " " * len(value)
        if kind == "iso":
            year, month, day = value.split("-")
            facts.numbers += [(year, ""), (str(int(day)), "")]
            if 1 <= int(month) <= 12:
                facts.dates.add(_MONTHS[int(month) - 1])
        elif kind == "clock":
            colon = value.index(":")
            hours, minutes = int(value[:colon]), value[colon + 1:colon + 3]
            if value[colon + 3:].strip(" ."):
                hours = hours % 12 + (12 if "p" in value[colon + 3:].lower() else 0)
            facts.numbers.append((f"{hours}:{minutes}", ""))
        else:
            inner = value.strip("\"'`“”") if kind == "quoted" else value
            facts.codes[_squash(inner)] = inner
            facts.joined.update(_squash(w) for w in _TOKEN.findall(inner))
    _read_words("".join(plain), facts)
    return facts


def _read_words(text: str, facts: Facts) -> None:
    lowered = text.lower()
    for pattern, replacement in _PHRASES:
        lowered = pattern.sub(replacement, lowered)
    facts.words = words = [w.removesuffix("'s") for m in _TOKEN.finditer(lowered)
                           for w in _split_number_words(m.group())]
    squashed = [_squash(w) for w in words]
    facts.joined.update(s for s in squashed if s)
    for n in (2, 3):
        facts.joined.update("".join(squashed[i:i + n]) for i in range(len(squashed) - n + 1))
    counted = _read_numbers(words, facts)
    roles: dict[str, set[str]] = {}
    for i, word in enumerate(words):
        if word in _NEGATIONS or word.endswith(("n't", "-free")) or \
                word.split("-")[0] in _NEGATIONS:
            facts.negations += 1
            continue
        for axis, sign in _POLES.get(word, ()):
            facts.poles[axis] = facts.poles.get(axis, 0) + sign
        if word in _DATES:
            facts.dates.add(word)
        elif word in ("next", "last", "this", "previous") and i + 1 < len(words) \
                and words[i + 1] in _TIME_NOUNS:
            facts.dates.add(f"{word} {words[i + 1]}")
        if i in counted:
            if i - 1 not in counted:
                facts.sequence.append("#" + counted[i])
            continue
        if word == "for" and _EXCHANGES & set(words[max(0, i - 5):i]):
            facts.sequence.append("@for")  # substitute X for Y, swap X for Y
            continue
        if word in _MARKERS:
            facts.sequence.append("@" + _MARKERS[word])
            if word in _ROLE_WORDS:
                filler = next((w for w in words[i + 1:i + 4] if w not in _DETERMINERS), None)
                if filler is not None:
                    roles.setdefault(_ROLE_WORDS[word], set()).add(
                        "#" + counted[i + 1] if i + 1 in counted else _stem(filler))
            continue
        if word in _PERIODS:
            facts.periods.add(_PERIODS[word])
        elif word in _UNITS and len(word) > 1 and word not in _NOT_FREE_UNITS \
                and _UNITS[word] not in _TIME_UNITS:
            facts.free_units.append(_UNITS[word])
        elif not (word in _FUNCTION or word in _DATES or word in _SMALL or word in _TENS
                  or word in _ORDINALS or word in _COUNT_WORDS or word in _MULTIPLIERS
                  or (word in _UNITS and len(word) > 1) or any(ch.isdigit() for ch in word)):
            stem = _stem(word)
            if stem:
                facts.content.setdefault(stem, word)
                facts.sequence.append(stem)
    facts.roles = roles
    facts.poles = {axis: (1 if p > 0 else -1) for axis, p in facts.poles.items() if p}
    _read_names(text, facts)


def _split_number_words(word: str) -> list[str]:
    parts = word.split("-")
    if len(parts) > 1 and all(p in _SMALL or p in _TENS for p in parts):
        return parts  # twenty-five
    return [word]


def _read_numbers(words: list[str], facts: Facts) -> dict[int, str]:
    """Reads the numbers into ``facts``; returns the words they took: index -> value."""
    taken: dict[int, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        value: Decimal | None = None
        unit: str | None = None
        if word in _LIKE_A:
            pass
        elif _NUMBER.match(word):
            value = _number(word)
        elif _RATIO.match(word):  # 120/80, 24/7
            for part in word.split("/")[:-1]:
                facts.numbers.append((_canon(Decimal(part)), ""))
            value = _number(word.rsplit("/", 1)[1])
        elif (m := _NUMBER_UNIT.match(word)) and m.group(2) in _UNITS:
            value, unit = _number(m.group(1)), _UNITS[m.group(2)]
        elif word in _SMALL or word in _TENS:
            value = Decimal(_SMALL.get(word, _TENS.get(word, 0)))
            if word in _TENS and i + 1 < len(words) and words[i + 1] in _SMALL:
                value += _SMALL[words[i + 1]]
                i += 1
        elif word in _ORDINALS:
            value = Decimal(_ORDINALS[word])
        elif word in _COUNT_WORDS:
            value = Decimal(str(_COUNT_WORDS[word]))
        elif word in ("a", "an") and i + 1 < len(words) and words[i + 1] in _MULTIPLIERS:
            value = Decimal(1)
        if value is None:
            i += 1
            continue
        start = i
        while i + 1 < len(words) and words[i + 1] in _MULTIPLIERS:
            value *= _MULTIPLIERS[words[i + 1]]
            i += 1
        if words[i + 1:i + 4] == ["and", "a", "half"]:
            value += Decimal("0.5")
            i += 3
        if unit == "k":
            value, unit = value * 1000, None
        if unit is None and i + 1 < len(words) and words[i + 1] in _UNITS:
            unit = _UNITS[words[i + 1]]
            i += 1
            if unit == "deg" and i + 1 < len(words) and _UNITS.get(words[i + 1]) in ("c", "f"):
                unit = _UNITS[words[i + 1]]
                i += 1
        if unit is None and start and words[start - 1] in _UNITS \
                and not words[start - 1].isalpha():
            unit = _UNITS[words[start - 1]]  # a currency sign before the amount
        if unit in ("am", "pm"):
            number = f"{int(value) % 12 + (12 if unit == 'pm' else 0)}:00"
            unit = None
        else:
            number = _canon(value)
        facts.numbers.append((number, "" if unit in (None, "th") else unit))
        taken.update(dict.fromkeys(range(start, i + 1), number))
        i += 1
    return taken


def _read_names(text: str, facts: Facts) -> None:
    written = [(m.group(), m.start()) for m in _TOKEN.finditer(text)]
    letters = [w for w, _ in written if w[:1].isalpha()]
    capitals = sum(1 for w in letters if w[:1].isupper())
    title_case = len(letters) >= 3 and capitals / len(letters) > 0.6
    for word, start in written:
        has_digit = any(ch.isdigit() for ch in word)
        has_alpha = any(ch.isalpha() for ch in word)
        lowered = word.lower()
        if has_digit and (has_alpha or not (_NUMBER.match(word) or _RATIO.match(word))):
            m = _NUMBER_UNIT.match(lowered)
            if not (m and m.group(2) in _UNITS):
                facts.codes[_squash(word)] = word  # a code: A-1, 2FA, 10.0.0.0/8, v1.2.3
            continue
        if word in _ROMAN and not (word in ("V", "X") and len(written) < 2):
            facts.numbers.append((str(_ROMAN[word]), ""))  # World War II
            continue
        if not has_alpha or title_case or lowered in _UNITS or lowered in _NOT_NAMES:
            continue
        inner_capital = any(ch.isupper() for ch in word[1:])
        if not (word[:1].isupper() or inner_capital):
            continue
        before = text[:start].rstrip(" \t\"'(“-*")
        at_start = not before or before[-1] in _SENTENCE_END
        if lowered == "may":
            if not at_start:
                facts.dates.add("may")  # the month; the verb starts a question
        elif lowered not in _DATES and (inner_capital or not at_start
                                        or (len(word) > 1 and word.isupper())):
            facts.names[_squash(word)] = word


_UNSTEMMED = _set("https ios macos dns sms gps aws css")
_NOT_NAMES = _set("i i'm i've i'd i'll ok okay faq asap fyi pls thx")
