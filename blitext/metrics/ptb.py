"""A pure-Python stand-in for the Stanford PTBTokenizer (CoreNLP 3.4.1) that pycocoevalcap runs
as `java ... PTBTokenizer -preserveLines -lowerCase`, for machines without Java.

It follows the JFlex lexer's way of working, so that its mistakes are rare and local: at each
position every rule below is tried, the longest match wins (a rule's trailing context counts
toward its length, as in flex) and ties go to the earlier rule. The rules are the ones of
PTBLexer.flex that captions meet (words, clitics, numbers, fractions, abbreviations, hyphenated
and slashed words, quotes, brackets, dashes, smileys), checked token by token against the jar;
bench/tokenizer_diff.py measures what is left. Output tokens are lower-cased like the jar's,
including the bracket names ("-lrb-"), which pycocoevalcap's punctuation filter therefore
keeps, as it does with the jar.
"""
from __future__ import annotations

import re

L = r"[^\W\d_\u00B2\u00B3\u00B9\u00BC-\u00BE\u2070-\u209F\u2150-\u218F]"  # a letter ([:letter:]), not a ½ or ²
LD = r"[^\W_]"                                    # a letter or digit
APOS = r"(?:['\u0092\u2019]|&apos;)"
APOSETC = r"(?:['\u0092\u2019`\u0091\u2018\u201B]|&apos;)"
HYPHEN = r"[-_\u058A\u2010\u2011]"
ACRO = r"(?:[A-Za-z](?:\.[A-Za-z])+)"
WORD = rf"{L}{LD}*(?:[.!?]{L}{LD}*)*"
THINGPART = rf"(?:[dDoOlL]{APOSETC}{LD})?{LD}+"
THING = rf"{THINGPART}(?:{HYPHEN}{THINGPART})*"
REDAUX = rf"{APOS}(?i:[msd]|re|ve|ll)"
NUM = r"(?:\d*(?:[.:,\u00AD\u066B\u066C]\d+)+|\d+)"
FRAC = r"(?:\d{1,4}[- \u00A0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}"



def _upper_first(words: str) -> str:
    """An alternation matching each word with its first letter in upper case and the rest in any
    case: the flex's "[M]ass" (its literals are caseless, its character classes are not)."""
    return "(?:" + "|".join(w[0] + "(?i:" + w[1:] + ")" if len(w) > 1 else w for w in words.split("|")) + ")"


# Abbreviations whose final period belongs to the token (PTBLexer's ABBREV1/2/3). Literal
# words match in any case, ABSTATE_UPPER only with an upper-case first letter.
ABMONTH = "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec"
ABDAYS = "Mon|Tue|Tues|Wed|Thu|Thurs|Fri"
ABSTATE_CASELESS = ("Ala|Ariz|Calif|Colo|Conn|Ct|Dak|Fla|Ga|Ind|Kans?|Ky|Md|Mich|Minn|Mo|Mont|Neb|Nev|Okla|Penn|"
                    "Tenn|Va|Vt|Wisc?|Wyo")
ABSTATE_UPPER = "Az|Ark|Del|Ill|La|Mass|Miss|Ore|Pa|Tex|Wash"
ABCOMP = r"Inc|Cos?|Corp|Pp?t[ye]s?|Ltd|Plc|Rt|Bancorp|Dept|Bhd|Assn|Univ|Intl|Sys"
ABNUM = "tel|est|ext|sq|ft"
ABPTIT = r"Jr|Sr|Bros|(?:Ed|Ph)\.D|Blvd|Rd|Esq"
ABTITLE = (r"Mr|Mrs|Ms|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt|Cpl|Pvt|"
           r"Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Mme|Mmes|Mlle|Mlles")
ABBREV1 = (rf"(?:(?i:{ABMONTH}|{ABDAYS}|{ABSTATE_CASELESS}|{ABCOMP}|{ABNUM}|{ABPTIT}|etc|al|seq|Bldg)"
           rf"|{_upper_first(ABSTATE_UPPER)})\.")
ABBREV2 = rf"(?:[A-Za-z]|(?i:{ABTITLE}|vs|Alex|Wm|Jos|Cie|cf|TREAS|Ph|Invt|Elec|Natl|M[ft]g))\."
ABBREV3 = r"(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\."
# A single letter and a period before one of these capitalised words ends a sentence: "e ." not "e.".
SENTENCE_STARTS = ("A|About|According|After|An|As|At|But|Earlier|He|Her|Here|However|If|In|It|Last|Many|More|Mr\\.|"
                   "Ms\\.|Now|Once|One|Other|Our|She|Since|So|Some|Such|That|The|Their|Then|There|These|They|This|"
                   "We|When|While|What|Yet|You")
SENTENCE_START = _upper_first(SENTENCE_STARTS)

URL = r"https?://[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},-]"
LIKELYURL = (r"(?:www\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}"
             r"|(?:[^ \t\n\f\r\"`'<>|.!?(){},\-_$]+\.)+(?:com|net|org|edu))"
             r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?")
EMAIL = r"[a-zA-Z0-9][^ \t\n\f\r\"<>|(){}]*@(?:[^ \t\n\f\r\"<>|(){}.]+\.)*[^ \t\n\f\r\"<>|(){}.]+"
SMILEY = r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]"
MISC = ("+%&~^|\\\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00BA\u00D7\u00F7"
        "\u2020-\u2023\u2030-\u2038\u2100-\u214F\u2190-\u21FF\u2200-\u2BFF")   # symbols that stand alone
QUOTECHARS = "`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092\u0093\u0094\u201E\u201F\u2039\u203A\u00AB\u00BB"

# (kind, pattern): the token is group "t" when the pattern has one (the rest is trailing
# context), else the whole match. Order breaks ties between equally long matches. Each
# alternative is its own rule because a Python alternation takes the first branch that
# matches, not the longest.
RULES: list[tuple[str, str]] = [
    ("word", r"(?P<t>(?i:can))(?i:not)"),                       # cannot -> can not
    ("word", r"(?P<t>(?i:gon|wan))(?i:na)"),                    # gonna -> gon na
    ("word", r"(?P<t>(?i:got))(?i:ta)"),
    ("word", r"(?P<t>(?i:lem|gim))(?i:me)"),
    ("word", r"(?P<t>'(?i:t))(?i:is|was)"),                     # 'tis -> 't is
    ("word", rf"(?P<t>{WORD}){REDAUX}"),                         # dog's -> dog 's
    ("word", rf"(?P<t>[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*)(?i:n){APOSETC}(?i:t)"),  # don't -> do n't
    ("word", WORD),
    # words with an apostrophe inside (PTBLexer's APOWORD)
    ("word", rf"{APOS}n{APOS}"),                                 # rock 'n' roll
    ("word", rf"(?P<t>{APOS}n)(?:\s|$)"),
    ("word", rf"[lLdDjJ]{APOS}"),
    ("word", rf"(?i:Dunkin|somethin|ol){APOS}"),
    ("word", rf"{APOS}(?i:em|till?|cause)"),
    ("word", rf"{APOS}[2-9]0s"),
    ("word", rf"[A-HJ-XZn]{APOSETC}{L}{{2}}{L}*"),
    ("word", rf"{L}+[aeiouyAEIOUY]{APOSETC}[aeiouA-Z]{L}*"),
    ("word", rf"(?i:cont'd\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l|cap{APOS}n|c{APOS}est)"),
    ("word", rf"O{APOSETC}o"),
    ("word", rf"(?P<t>[yY]{APOS}){L}"),                          # y'all -> y' all
    ("word", URL), ("word", LIKELYURL), ("word", EMAIL),
    ("word", rf"#{L}+"), ("word", r"@[A-Za-z0-9_]+"),            # hashtags, user names
    ("word", rf"(?P<t>{REDAUX})(?:[^A-Za-z]|$)"),
    ("word", rf"(?i:n){APOSETC}(?i:t)"),
    ("word", r"\d{1,2}[-/]\d{1,2}[-/]\d{2,4}"),                  # dates
    ("word", rf"[-+]?{NUM}"),
    ("frac", FRAC),                                              # 3 1/2 -> one token
    ("frac2", "[\u00BC\u00BD\u00BE\u2153-\u215E]"),
    ("word", r"(?i:pro-|anti-)"),
    ("word", rf"{APOS}\d\d"),                                    # '90
    ("word", rf"{THING}(?:/{THING}){{1,2}}"),                    # and/or, a/b/c
    ("word", r"[A-Z]+(?:[+&][A-Z]+)+"),                          # AT&T
    ("word", r"[A-Z]*\$"), ("word", "#"),
    ("currency", "[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]"),
    ("word", ABBREV1), ("word", ABBREV2), ("word", rf"{ACRO}\."), ("word", r"(?i:a\.k\.a)\."),
    ("word", rf"(?P<t>{ABBREV3})[ \t]?\d"),                     # no. 5
    ("word", rf"(?P<t>[A-Za-z])\.\s+{SENTENCE_START}(?:\s|$)"),   # ... plan b. The next
    ("word", rf"(?P<t>{WORD}\.)[,;:\u3001]"),                    # a period before a comma is an abbreviation's
    ("dblquote", r"(?P<t>\"|&quot;)[A-Za-z0-9$]"),
    ("dblquote_close", r"\"|&quot;"),
    ("word", THING),
    ("word", rf"{LD}[A-Za-z0-9.,\u00AD]*(?:-(?:{ACRO}\.|[A-Za-z0-9\u00AD]+))+"),  # 3.5-inch, non-U.S.
    ("quote", rf"{APOS}"), ("quote", "''"), ("quote", f"[{QUOTECHARS}]{{1,2}}"),
    ("ellipsis", r"\.\.\.+"), ("ellipsis", "[\u0085\u2026]"),
    ("word", r"@+"), ("word", r"#+"), ("word", r"_+"), ("word", r"\*+"), ("word", "[,;:\u3001]"),
    ("word", r"[?!]+"), ("word", r"\."), ("word", "="), ("word", "/"), ("word", "<"), ("word", ">"),
    ("word", "&amp;"), ("word", "&lt;"), ("word", "&gt;"), ("word", r"(?i:c\+\+|[cf]#)"),
    ("dashes", r"-+"), ("dashes", "[\u2013\u2014\u2015]"),
    ("bracket", r"[()\[\]{}]"),
    ("smiley", rf"(?P<t>{SMILEY})(?:[^A-Za-z]|$)"),
    ("word", f"[{MISC}]"),
]
_COMPILED = [(kind, re.compile(pattern)) for kind, pattern in RULES]
BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
CURRENCY = {"\u20AC": "$", "\u00A3": "#", "\u00A2": "cents", "\u0080": "$", "\u20A0": "$"}
FRACTIONS = {"\u00BC": "1/4", "\u00BD": "1/2", "\u00BE": "3/4"}
ENTITIES = {"&amp;": "&", "&lt;": "<", "&gt;": ">"}


def _longest(text: str, pos: int) -> tuple[str, str, int] | None:
    """The token starting at pos as JFlex picks it: longest match, earliest rule on ties."""
    best = None
    for kind, pattern in _COMPILED:
        m = pattern.match(text, pos)
        if m is None or m.end() == pos or (best is not None and m.end() <= best[0]):
            continue
        end = m.end("t") if "t" in pattern.groupindex else m.end()
        best = (m.end(), kind, end)
    return None if best is None else (best[1], text[pos:best[2]], best[2])


def _normalise(kind: str, token: str) -> str:
    """The PTB3 output form of a raw token (brackets named, quotes in LaTeX style, dashes)."""
    if kind == "bracket":
        return BRACKETS[token]
    if kind == "smiley":
        return token.replace("(", "-LRB-").replace(")", "-RRB-")
    if kind == "dblquote":
        return "``"
    if kind == "dblquote_close":
        return "''"
    if kind == "quote":
        opening = token[0] in "`\u2018\u201A\u201B\u201C\u201E\u2039\u00AB\u0091\u0093"
        double = len(token) == 2 or token in "\u201C\u201D\u201E\u201F\u00AB\u00BB\u0093\u0094"
        return ("``" if opening else "''") if double else ("`" if opening else "'")
    if kind == "ellipsis":
        return "..."
    if kind == "dashes":
        return "--" if token[0] != "-" or 3 <= len(token) <= 4 else token
    if kind == "frac":
        return token.replace(" ", "\u00A0")
    if kind == "frac2":
        return FRACTIONS.get(token, token)
    if kind == "currency":
        return CURRENCY.get(token, token)
    return ENTITIES.get(token, token)


def ptb_tokenize(lines: list[str]) -> list[list[str]]:
    """Tokens of each line as `PTBTokenizer -preserveLines -lowerCase` prints them for a file
    holding these lines: a line's tokens can depend on the next line (a "b." before "The ..."
    loses its period), so lines are tokenised together, as pycocoevalcap does.

    Characters no rule covers (emoji, control characters) are dropped, as the jar drops
    untokenizable characters."""
    if not lines:
        return []
    text = "\n".join(line.replace("\n", " ") for line in lines)
    out: list[list[str]] = [[]]
    pos = 0
    while pos < len(text):
        if text[pos].isspace():
            if text[pos] == "\n":
                out.append([])
            pos += 1
            continue
        found = _longest(text, pos)
        if found is None:
            pos += 1
            continue
        kind, token, pos = found
        out[-1].append(_normalise(kind, token).lower())
    return out
