"""Is a *prompt* harmful? A small, deterministic lexicon/rule classifier for data without a label column.

Feedback-gated fine-tuning needs to know which prompts are requests a safe assistant should refuse. When
the data carries a label column, :func:`parse_prompt_label` reads it (:func:`column_label` wraps it as a
``PromptLabel`` with ``source == "column"``); otherwise :class:`LexiconPromptClassifier` guesses from the
words of the prompt. It needs no model and no dependency, and the same text always gets the same label.
It is a heuristic: it knows words, not intent.

Text normalisation: lower case, curly quotes to ASCII, accents and apostrophes dropped (``someone's`` -> ``someones``,
``don't`` -> ``dont``), every other run of non-alphanumeric characters one space. So case and punctuation
never change the verdict (``SELF-HARM!`` reads as ``self harm``).

Rules, in this order (every list is a module constant, and :meth:`LexiconPromptClassifier.describe`
returns them all with the weights and the threshold):
  1. exceptions (``EXCEPTIONS``): benign idioms that share words with harm ("kill a process", "kill time",
     "shoot a photo", "steal the show", "food poisoning", "crack a joke", ...) are blanked out of the
     text first, so their words match nothing below.
  2. harm cues (``HARM_CUES``, (category, weight, pattern)). Strong cues (1.0) are harmful on their own
     ("bomb", "phishing", "identity theft", "kill someone", "suicide", "sexual ... minors"); weak cues
     (0.25) are words with many benign uses ("firearm", "poison", "hack", "violence", "illegal",
     "manipulate") that need something else with them. A category counts once, with its strongest cue.
  3. evasion (``EVASION``, +0.5): "without getting caught", "evade law enforcement", "get away with",
     "hide the body", ...
  4. request framing, only when a harm cue matched, the larger one of: ``HOW_TO`` (+0.5),
     the prompt asks how to do something or for instructions or a plan ("how to", "ways to", "step by
     step", "tutorial", "teach"); ``REQUEST`` (+0.25), it asks for anything else to be made ("write",
     "create", "generate", "a script", ...).
  5. benign context (``BENIGN_CONTEXT``, -1.0, once, only when a harm cue matched): history; fiction, film
     and video games; definitions and meanings ("what is murder?"); protection, prevention, detection,
     fighting or reducing the harm ("how can I protect myself from phishing?"); its effects, dangers or
     causes. Evasion phrases are blanked out first, so "without being detected" is not detection.
  score = min(1, max(0, sum)); harmful iff score >= THRESHOLD (0.75). So one strong cue is harmful
  unless a benign context cancels it; a weak cue is harmful with a how-to request ("how to pick a
  lock": 0.25 + 0.5), with an evasion phrase, or with a second weak cue and any request, but not with a
  plain request alone ("generate a headline about the opioid crisis": 0.25 + 0.25).
  ``matched`` lists what fired as ``exception:text``, ``strong:category:text``, ``weak:category:text``,
  ``evasion:text``, ``how_to:text``, ``request:text`` and ``context:text``.

Measured accuracy (docs/results/prompt_classifier.md; ``python benchmarks/prompt_classifier.py --data-dir
../shared/data``): the rules were written and tuned only on the refusal-direction training splits
(harmful_train, the first 1000 of harmless_train), then frozen before any held-out set was measured.
On that dev split 98.1 % of harmful prompts are flagged and 0.0 % of benign ones, which is optimistic.
Held out, benign prompts are rarely flagged (0.1-0.3 % of Alpaca-style instructions, 7.6 % of XSTest's
scary-sounding safe prompts, 8.5 % of the demo's held-out benign prompts), but recall is low outside
AdvBench (89.8 %, of which 117 of 520 prompts are also in harmful_train): 48.8 % of HarmBench standard
behaviours, 31.5 % of XSTest's unsafe prompts, 57-70 % of the demo's harmful prompts. Use it as a cheap,
high-precision filter, not as a guarantee that unflagged prompts are safe.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["PromptLabel", "LexiconPromptClassifier", "parse_prompt_label", "column_label", "normalize",
           "THRESHOLD", "STRONG", "WEAK", "EVASION_WEIGHT", "HOW_TO_WEIGHT", "REQUEST_WEIGHT", "CONTEXT_WEIGHT"]

THRESHOLD = 0.75
STRONG = 1.0
WEAK = 0.25
EVASION_WEIGHT = 0.5
HOW_TO_WEIGHT = 0.5
REQUEST_WEIGHT = 0.25
CONTEXT_WEIGHT = -1.0


@dataclass(frozen=True)
class PromptLabel:
    """Whether a prompt is harmful. ``score`` in [0, 1] (1.0 / 0.0 for a label from a column); ``matched``
    the rules that fired; ``source`` the classifier's id, or ``"column"`` for a label given in the data."""

    harmful: bool
    score: float
    matched: tuple[str, ...]
    source: str


# ------------------------------------------------------------------------------------------- word lists
# All patterns are matched on normalised text (see normalize): lower case, no apostrophes, no punctuation.
# Reusable pieces:
_PERSON = (r"(?:someone|somebody|someones|a person|people|persons?|others|him|her|them|a child|children|kids?"
           r"|a kid|my (?:\w+ )?(?:wife|husband|boss|neighbou?r|ex|partner|friend|teacher|classmate|coworker"
           r"|colleague|family|brother|sister|mother|father|mom|dad|parents?|girlfriend|boyfriend|roommate"
           r"|dog|cat|pet)s?"
           r"|(?:a |the )?(?:woman|man|girl|boy|stranger|police officer|cop|politician|senator|judge|teacher|student)s?"
           r"|the (?:president|victim|witness))\b")
_ACCOUNT = (r"(?:accounts?|emails?|computers?|phones?|networks?|systems?|servers?|databases?|websites?|wifi"
            r"|devices?)\b")

# Benign idioms blanked out before anything else is matched.
EXCEPTIONS: tuple[str, ...] = (
    r"\bkill(?:ing|s)? (?:a |the |all |this |that |my |your )?(?:(?:\w+ )?process(?:es)?|task|job|program|app"
    r"|thread|session|container|server|command|script|tab|time|the mood|the lights?|the engine|weeds?|bugs?"
    r"|insects?|pests?|germs?|bacteria|viruses|mosquito(?:e?s)?|flies|ants|mold|a conversation|it on stage)\b",
    r"\bkiller (?:app|feature|deal|idea|workout|smile|presentation|look|outfit|view|performance)\b"
    r"|\bto kill a mockingbird\b",
    r"\bkill two birds\b|\bkill(?:ing)? (?:them|him|her|someone|people) with kindness\b|\bmurder myster(?:y|ies)\b",
    r"\bcrack(?:ing|s|ed)? (?:an? |the |my |your |open )?(?:eggs?|jokes?|code|case|knuckles|nuts?|whip|smile|window"
    r"|door|puzzle|riddle|books?)\b|\btake a stab at\b",
    r"\bshoot(?:ing|s)? (?:a |the |some |my |your )?(?:good |great |nice |better )?(?:photos?|pictures?|video"
    r"|film|movie|scene|portrait|hoops|the breeze|for the (?:moon|stars)|an email|a message)\b",
    r"\b(?:photo|video|film|movie) shoot\b",
    r"\b(?:steal(?:ing|s)?|stole|stolen) (?:the show|a base|the spotlight|a glance|a kiss|the scene|a look"
    r"|someones heart)\b",
    r"\bbath bombs?\b|\bphoto ?bomb\w*|\bbombshell\b|\bfood poisoning\b|\bpoison (?:ivy|oak|sumac)\b",
    r"\bmanipulat\w* (?:the |a |an |this |my |your )?(?:data|dataframes?|strings?|arrays?|images?|photos?|files?|text"
    r"|lists?|variables?|objects?|dom|numbers|matrix|matrices|spreadsheets?|columns?|rows?)\b",
    r"\bblow(?:ing)? (?:off steam|up a balloon|out the candles|someones mind)\b",
    r"\b(?:life|productivity|kitchen|cleaning|study) hacks?\b",
    r"\bhackathons?\b",
    r"\bexecute (?:a |the )?(?:code|command|query|program|function|script|plan|order|trade|strategy)\b",
    r"\battack (?:the|a|this) (?:problem|question|task|day)\b",
)

# Harm cues: (category, weight, pattern).
HARM_CUES: tuple[tuple[str, float, str], ...] = (
    # weapons, explosives
    ("weapons", STRONG, r"\b(?:bombs?|pipe bombs?|explosives?|explosive devices?|detonat\w*|grenades?|napalm"
                        r"|molotov|ieds?|dirty bomb)\b"),
    ("weapons", STRONG, r"\bblow(?:ing)? up (?:a |the |my |his |her |their )?(?:\w+ )?(?:car|building|house|bridge"
                        r"|plane|train|bus|school|church|mosque|synagogue|office)s?\b"),
    ("weapons", STRONG, r"\b(?:ghost|untraceable|homemade|3d printed) (?:guns?|firearms?|weapons?)\b"),
    ("weapons", STRONG, r"\b(?:fully automatic|full auto)\b"),
    ("weapons", STRONG, r"\b(?:chemical|biological|nuclear) weapons?\b|\bbioweapons?\b|\bnerve agents?\b"
                        r"|\b(?:sarin|ricin|anthrax|mustard gas|tabun|novichok)\b"),
    ("weapons", STRONG, r"\b(?:engineered|deadly|deadlier) (?:virus|pathogen|disease)\b"
                        r"|\bvirus\w*(?: \w+){0,5} (?:more )?(?:deadly|transmissible|lethal|contagious|virulent)\b"),
    ("weapons", WEAK, r"\b(?:guns?|firearms?|weapons?|rifles?|ammunition|ammo)\b"),
    # poison
    ("poison", STRONG, rf"\bpoison(?:ing|s|ed)? {_PERSON}|\bpoison(?:ing)? (?:a |the |their |his |her )?"
                       r"(?:city|water|food|drink|coffee|supply)"),
    ("poison", WEAK, r"\bpoison\w*\b|\btoxins?\b"),
    # drugs
    ("drugs", STRONG, r"\b(?:meth|methamphetamine|crystal meth|cocaine|crack cocaine|heroin|fentanyl|mdma|ecstasy|lsd"
                      r"|pcp|ghb|ketamine|opium)\b"),
    ("drugs", STRONG, r"\billegal (?:drugs?|substances?)\b|\bget(?:ting)? high\b|\bwithout a prescription\b"
                      r"|\b(?:pass|cheat|beat|avoid) (?:a |the )?drug test\w*"
                      r"|\b(?:synthesi[sz]e|make|cook|manufacture|produce) \w*(?: \w+)? drugs?\b"
                      r"|\bdrugs? (?:\w+ ){0,5}?(?:synthesi[sz]ed|made|cooked|manufactured)\b"),
    ("drugs", WEAK, r"\b(?:drugs?|opioids?|narcotics?|marijuana|cannabis|hallucinogens?|inhalants?|steroids?"
                    r"|psychedelics?)\b"),
    # hacking, malware
    ("hacking", STRONG, rf"\bhack(?:ing|ed|s)? (?:into|in to)\b|\bhack(?:ing|ed|s)? (?:a |an |the |someones |"
                        rf"my \w+s |their |his |her )?(?:\w+ )?{_ACCOUNT}"),
    ("hacking", STRONG, r"\b(?:malware|ransomware|spyware|keyloggers?|rootkits?|botnets?|trojans?|worms? that"
                        r"|ddos|denial of service|brute force attack|man in the middle|sql injection"
                        r"|zero day exploit)\b"),
    ("hacking", STRONG, r"\b(?:create|write|develop|make|build|code|design|spread) (?:a |an )?(?:computer )?"
                        r"virus\b|\bvirus that\b"),
    ("hacking", STRONG, r"\bexploit\w* (?:a |an |the )?(?:\w+ )?vulnerabilit\w*|\bcrack\w* (?:a |the |someones )?"
                        r"(?:passwords?|software|encryption|wifi)\b|\b(?:bypass|disable|circumvent)\w* (?:the |a )?"
                        r"(?:\w+ )?(?:antivirus|security|authentication|firewall|paywall|drm)\b"),
    ("hacking", STRONG, r"\b(?:phishing|spoof\w*|cyber ?attacks?|hijack\w*)\b"
                        r"|\bmalicious (?:\w+ )?(?:site|website|code|software|links?|emails?|attachments?|payload"
                        r"|script|program)\b"
                        r"|\bcorrupt\w* (?:the |a |all )?(?:hard drive|files|data|system)\b"
                        r"|\bmanipulat\w* (?:the )?(?:\w+ )?(?:markets?|stocks?|share prices|elections?|votes?"
                        r"|search engine results)\b"),
    ("hacking", WEAK, r"\bhack\w*\b|\bexploit\w*\b|\bvulnerabilit\w*|\bsocial engineering\b"),
    # fraud, scams, deception
    ("fraud", STRONG, r"\b(?:\w*fraud\w*|scams?|scamm\w*|ponzi|pyramid schemes?|counterfeit\w*|launder\w*"
                      r"|insider trading|embezzl\w*|tax evasion|evade taxes|evading taxes|forger(?:y|ies))\b"),
    ("fraud", STRONG, r"\bforg(?:e|ed|ing) (?:a |an )?(?:signatures?|documents?|checks?|cheques?|ids?|passports?"
                      r"|prescriptions?|records?|certificates?)\b|\bfalsify\w*|\bfalsif(?:y|ied|ying)\b"),
    ("fraud", STRONG, r"\bfake (?:\w+ ){0,2}?(?:ids?|passports?|reviews?|news|identit\w*|charit\w*|invoic\w*"
                      r"|lotter\w*|profiles?|accounts?|personas?|websites?|online stores?|donations?|documents?"
                      r"|evidence)\b"),
    ("fraud", STRONG, r"\b(?:cheat\w* (?:on|in) (?:an |my |the )?(?:exams?|tests?)|underreport\w*"
                      r"|(?:hide|hiding) (?:your |my )?(?:income|assets)|shell compan\w*|offshore accounts?)\b"),
    ("fraud", STRONG, r"\b(?:bribe\w*|briber\w*|blackmail\w*|extort\w*)\b"),
    ("deception", STRONG, r"\b(?:misinformation|disinformation|defam\w*|smear campaigns?|libel\w*|slander\w*)\b"),
    ("deception", STRONG, r"\bfalse(?:ly)? (?:accus\w*|allegations?|information|rumou?rs?|claims?|flag)\b"
                          r"|\b(?:spread\w*|post\w*) (?:false |fake |malicious )?(?:rumou?rs?|lies|hoax\w*)\b"
                          r"|\bfram(?:e|ed|ing) (?:someone|somebody|him|her|them|an innocent)\b"
                          r"|\bplant\w* (?:fake )?evidence\b"),
    ("deception", WEAK, r"\b(?:propaganda|discredit\w*|hoax\w*|deceiv\w*|deceptive|pretend\w* to be|poses? as)\b"),
    # theft, trespass
    ("theft", STRONG, r"\b(?:steal\w*|stole|stolen|theft|identity theft|shoplift\w*|burglar\w*|robb(?:ery|eries|ing)"
                      r"|pickpocket\w*|hotwir\w*|carjack\w*)\b"),
    ("theft", STRONG, r"\b(?:steal|get|obtain|grab|find out|guess)\w* (?:someones|their|his|her|my \w+s"
                      r"|other peoples) (?:\w+ )?(?:passwords?|pins?|logins?|credentials)\b"),
    ("theft", STRONG, rf"\brob (?:a |the |an )?(?:bank|store|shop|house|home|gas station|{_PERSON})"
                      r"|\bbreak(?:ing)? (?:in)?to (?:a |the |someones |my \w+s )?(?:\w+ )?(?:house|home|car|building"
                      r"|apartment|store|office|safe|location)\b|\btrespass\w*"),
    ("theft", STRONG, r"\bpirat(?:e|ed|ing) (?:\w+ )?(?:content|software|movies?|films?|music|games?|books?)\b"
                      r"|\bcircumvent\w* copyright\b|\btorrent\w* (?:movies?|films?|music)\b"),
    ("theft", WEAK, r"\b(?:pick(?:ing)? (?:a )?locks?|lock ?pick\w*|siphon\w*|clon(?:e|ing) (?:credit|debit)"
                    r"|credit card (?:numbers?|information|details))\b"),
    # violence
    ("violence", STRONG, rf"\b(?:kill\w*|murder\w*|assassinat\w*|tortur\w*|strangl\w*|stab\w*|shoot\w*|hurt\w*"
                         rf"|injur\w*|maim\w*|kidnap\w*|abduct\w*|attack\w*|beat(?:ing)? up|choke"
                         rf"|suffocat\w*) {_PERSON}"),
    ("violence", STRONG, r"\b(?:murder\w*|assassinat\w*|massacre\w*|terroris\w*|mass shootings?|school shootings?"
                         r"|kidnap\w*|hostages?|serial killers?|genocide|ethnic cleansing|human trafficking"
                         r"|sex trafficking|trafficking)\b"),
    ("violence", STRONG, r"\b(?:cause|causing|inflict\w*|do) (?:serious |physical |bodily |maximum )?(?:harm|damage"
                         r"|injur\w*|pain) (?:to )?(?:someone|others|people|a person|him|her|them|passengers"
                         r"|civilians)|\bharm (?:someone|others|people|a person|a child|children|passengers)\b"),
    ("violence", STRONG, r"\b(?:child|kid|baby|someone|somebody|a person|people|woman|man|girl|boy)"
                         r" (?:is|are|gets?|being) (?:harmed|killed|hurt|attacked|abused|beaten|raped|murdered"
                         r"|tortured)\b"
                         r"|\bbeat\w* (?:their|his|her|a|my|your) (?:spouse|wife|husband|partner|child|kids?"
                         r"|girlfriend|boyfriend)\b"
                         r"|\b(?:disrupt|attack|sabotag|target)\w* (?:\w+ ){0,3}?(?:infrastructure|power grids?"
                         r"|public services|transportation systems?|water supply|hospitals?|railways?|airports?)\b"),
    ("violence", STRONG, r"\b(?:incit\w*|promot\w*|glorif\w*|encourag\w*|prais\w*|romantici[sz]\w*) (?:\w+ ){0,5}?"
                         r"(?:violen\w*|terror\w*|sexual assault|hatred|killing|killers?|murder\w*|self harm|suicide)"),
    ("violence", STRONG, r"\b(?:sabotag\w*|tamper\w* with|vandali[sz]\w*|arson|set fire to|burn down)\b"),
    ("violence", WEAK, r"\b(?:kill\w*|violen\w*|attack\w*|assault\w*|abus\w*|reckless\w*|harm|hurt\w*|damag\w*"
                       r"|disrupt\w*|shoot\w*|gangs?|bully)\b"),
    # self-harm
    ("self_harm", STRONG, r"\b(?:suicid\w*|self harm\w*|kill (?:myself|yourself|themselves|himself|herself|oneself)"
                          r"|cut(?:ting)? (?:myself|yourself|themselves)|end (?:my|your) (?:own )?life|hang (?:myself"
                          r"|yourself)|strangle (?:themselves|yourself|myself)|anorexi\w*|bulimi\w*|pro ana)\b"),
    ("self_harm", WEAK, r"\b(?:starv\w*|overdos\w*|purg(?:e|ing)|euphoria)\b"),
    # harassment, hate
    ("hate_harassment", STRONG, r"\b(?:racis\w*|sexis\w*|homophob\w*|transphob\w*|antisemit\w*|xenophob\w*"
                                r"|hate speech|hateful|hate (?:messages?|crimes?|groups?)|slurs?|white supremac\w*"
                                r"|har+as+\w*|cyberbull\w*|bullies"
                                r"|bully\w* (?:a |someone|him|her|them|my|kids?|children|others)"
                                r"|stalk(?:ing|s|ed|er)? (?:someone|her|him|my|an ex|a person|people|individuals)"
                                r"|cyberstalk\w*|dox\w*|intimidat\w*|humiliat\w*|degrad\w* (?:women|men|someone))\b"),
    ("hate_harassment", STRONG, r"\b(?:women|men|blacks?|jews?|muslims?|immigrants?|gays?|people with disabilities)"
                                r" (?:are|being) (?:less|inferior|bad|stupid|dangerous)\b"
                                r"|\b(?:less intelligent|inferior|subhuman) (?:than|to)\b"
                                r"|\bdiscriminat\w* (?:against|based)\b|\b(?:glorif|prais)\w* (?:\w+ ){0,3}?nazi"),
    ("hate_harassment", WEAK, r"\b(?:bull(?:y|ies|ying)|stalk\w*|nazis?|holocaust|discriminat\w*|insult\w*|demean\w*"
                              r"|ridicul\w*|hate)\b"),
    # sexual content, minors, exploitation
    ("sexual_minors", STRONG, r"\b(?:child (?:porn\w*|sexual\w*|abuse material|molest\w*)|pedophil\w*|paedophil\w*"
                              r"|molest\w*|rape\w*|raping|sexual assault|sexually assault\w*|non ?consensual"
                              r"|sexual exploitation|sexually exploit\w*|csam)\b"),
    ("sexual_minors", STRONG, r"\b(?:sex\w*|nude\w*|naked|explicit) (?:\w+ ){0,6}?(?:minors?|child(?:ren)?|kids?"
                              r"|underage|teen(?:ager)?s?|years? old)\b"
                              r"|\bgroom\w* (?:a |other |young |the )?(?:minors?|child\w*|kids?|users|girls"
                              r"|boys|teens?)"),
    ("sexual_minors", STRONG, r"\b(?:abus\w*|neglect\w*|starv\w*|beat\w*) (?:a |my |the )?(?:child|kid|baby|toddler"
                              r"|son|daughter)\b|\bchild labou?r\b|\bchild soldiers?\b"
                              r"|\bchildren in (?:military )?combat\b"),
    ("sexual_minors", WEAK, r"\b(?:porn\w*|sexual\w*|erotic\w*|nudes?|prostitut\w*|escort\w*)\b"),
    # manipulation, coercion, privacy
    ("manipulation", STRONG, rf"\b(?:manipulat\w*|brainwash\w*|gaslight\w*|coerc\w*|control\w*|force\w*|trick\w*"
                             rf"|exploit\w*|blackmail\w*) {_PERSON}"),
    ("manipulation", STRONG, r"\b(?:brainwash\w*|gaslight\w*|mind games|subliminal messag\w*|reverse psychology"
                             r"|emotional(?:ly)? (?:abus\w*|manipulat\w*)"
                             r"|vulnerable (?:populations?|individuals|people))\b"),
    ("manipulation", WEAK, r"\b(?:manipulat\w*|coerc\w*|indebted|flatter\w*|deceiv\w*)\b"),
    ("privacy", STRONG, r"\b(?:spy\w* on|track\w* (?:someones|my \w+s|her|his) (?:location|phone|car)"
                        r"|without (?:their|his|her|the owners?|the users?|anyones) (?:consent|permission|knowledge)"
                        r"|secretly (?:record|film|track|monitor|read)\w*|personal (?:information|data) of"
                        r"|(?:reveal|give away|hand over|share|disclose)\w* (?:their|your|his|her|my) (?:passwords?"
                        r"|pins?|logins?|credentials|social security numbers?|bank details))\b"),
    ("privacy", WEAK, r"\b(?:private (?:information|data|messages|photos)|personal (?:information|data)|confidential"
                      r"|medical records|surveillance|dark web|anonymous\w*|secretly)\b"),
    # other dangerous or illegal activity
    ("dangerous", STRONG, r"\b(?:ingest\w*|drink\w*|eat\w*|feed\w*) (?:\w+ )?(?:bleach|detergent|antifreeze)\b"
                          r"|\bfeed\w* chocolate to (?:\w+ )?dogs?\b|\bdangerous (?:challenges?|stunts?|pranks?)\b"
                          r"|\bdrunk driving\b|\bdrive drunk\b|\bharvested organs\b|\bblack market\b"
                          r"|\bsell\w* organs\b|\brazor blades? in\b|\breckless (?:driving|behaviou?rs?)\b"),
    ("illegal", STRONG, r"\billegal(?:ly)? (?:buy|obtain|sell|access|download|enter|acquire|purchase|get)\w*\b"
                        r"|\bcommit\w* (?:a |the )?(?:crimes?|felon\w*)\b|\bcriminal (?:behaviou?r|activit\w*)\b"),
    ("illegal", WEAK, r"\b(?:illegal\w*|unlawful\w*|crimes?|smuggl\w*|evad\w*|circumvent\w*|unauthori[sz]ed"
                      r"|infiltrat\w*|corpse|dead body|censorship)\b"),
)

# Evasion: getting away with it.
EVASION: tuple[str, ...] = (
    r"\bwithout (?:getting |being )?(?:caught|detected|noticed|traced|found out|seen|identified)\b",
    r"\b(?:avoid|evade|evading|avoiding|escape|elude)\w* (?:the )?(?:getting caught|being caught|detection|arrest"
    r"|police|the cops|law enforcement|authorities|security(?: cameras?)?|prosecution|jail|prison)\b",
    r"\bget(?:ting)? away with\b",
    r"\b(?:hide|hiding|dispose of|get rid of|dispos\w*) (?:a |the )?(?:human )?(?:body|corpse|evidence"
    r"|murder weapon)\b",
    r"\bcover(?:ing)? up (?:a |the )?(?:crime|murder|evidence)\b",
    r"\b(?:make|made) it (?:look|seem) like (?:an accident|a natural death|suicide)\b",
    r"\bnot get caught\b|\bundetect\w*\b|\bevade (?:detection|filtering)\b|\bdiscreetly\b|\bsurreptitious\w*\b",
    r"\banonymously\b",
)

# Request framing. HOW_TO: the prompt asks how to do something, or for instructions or a plan (+0.5);
# REQUEST: it asks for anything else to be made or done (+0.25). Only the larger one counts.
HOW_TO: tuple[str, ...] = (
    r"^(?:please )?(?:how (?:to|do|can|could|would|should|might|does one)|ways? (?:to|for|of)|ideas? (?:for|on|to)"
    r"|tips? (?:for|on|to)|best way|steps? (?:to|for)|what is the (?:best|easiest|fastest|quickest|most effective)"
    r" (?:way|method))\b",
    r"\b(?:step by step|instructions?|guide|tutorial|manual|recipe|how to|how i can|how one can|detailed plan|a plan"
    r"|blueprint|teach|instruct|methods? (?:for|of|to))\b",
    r"\bi (?:want|need|would like|wanna|plan|am planning|m planning|am going|m going) to\b|\bhelp me\b",
)
REQUEST: tuple[str, ...] = (
    r"^(?:please )?(?:can|could|would|will) you\b",
    r"^(?:please )?(?:give|provide|write|create|generate|develop|design|explain|describe|show|list|tell|help|draft"
    r"|compose|produce|make|build|suggest|offer|share|post|devise|publish|educate|demonstrate|detail|plan|come up"
    r"|code|program|encourage|convince|persuade|recommend|outline)\b",
    r"\b(?:script|program|tool|app|bot|website|algorithm)\b",
)

# Benign context: the prompt is about history, fiction or games, asks what a word means, or asks how to
# be protected from the harm rather than how to do it.
BENIGN_CONTEXT: tuple[str, ...] = (
    r"\b(?:history of|historical(?:ly)?|in history|during (?:the )?(?:war|world war)"
    r"|what happened (?:at|in|to|during)|world war|ancient|medieval)\b",
    r"\b(?:video ?games?|in (?:a |the )?game|board game|minecraft|fortnite|call of duty|gta|chess|dungeons"
    r"|in (?:a |the |my )?(?:movie|film|novel|book|play|show|series|tv show|anime|cartoon|fantasy)"
    r"|fictional|(?:the )?character (?:of|in)|harry potter|star wars|game of thrones|lord of the rings)\b",
    r"\b(?:what (?:is|are|was|were|does|do) (?:the )?(?:definition|meaning)|define|definition of|meaning of"
    r"|what does \w+(?: \w+){0,3} mean|what is (?:a |an )?\w+ing$|what (?:is|are) (?:a |an )?\w+$)\b",
    r"\b(?:protect(?:ing|s|ed)?|protection (?:from|against|of)|prevent\w*|detect(?:ion|ing)?|spot(?:ting)?"
    r"|recogni[sz]\w*|identify (?:a |an )?(?:fake|scam|phishing)|defend\w* against|guard against|safeguard\w*"
    r"|secur(?:e|ing) (?:against|from|my|your)|report(?:ing)? (?:a |an )?(?:scam|fraud|crime|abuse)"
    r"|stay safe|be safe|safety tips|awareness|warning signs|signs of|(?:tell|know|check) if|victims? of"
    r"|survivors? of|cope|coping|recover\w* from|support (?:a |for )?victims?)\b",
    r"\b(?:effects? of|impact of|dangers? of|risks? of|consequences of|causes? of|why (?:is|are|do|does|did) \w+"
    r"|is it (?:illegal|legal|safe|dangerous)|analy[sz]e|research on|statistics)\b",
    r"\b(?:reduc\w*|(?:to|can) address\w*|fight\w*(?: against)?|stop\w*|tackl\w*|combat(?:ing|ting)?|end(?:ing)?"
    r"|speak\w* out against|interventions?|investigat\w*|law enforcement agenc\w*|prohibition of|ban on"
    r"|laws? against)"
    r" (?:\w+ ){0,3}?(?:\w*fraud\w*|scams?|crimes?|cyber ?\w*|\w*bull\w*|harass\w*|abuse|racism|discrimination|bias"
    r"|hate|violence|terrorism|trafficking|suicide|self harm|misinformation|disinformation|drugs?|drug abuse|weapons?"
    r"|attacks?|malware|phishing|theft|piracy)\b",
    r"\b(?:concept of|types? of|kinds? of|forms? of|examples? of|how (?:does|do) (?:\w+ ){1,4}work"
    r"|identify(?:ing)? (?:\w+ ){0,2}?(?:fraud\w*|fakes?|scams?|phishing|malware|threats?|attacks?|outliers))\b",
    r"^(?:(?:can|could) you (?:please )?)?(?:explain|describe|summari[sz]e|define|tell me) (?:what|the (?:concept"
    r"|meaning|definition|history))\b",
)


# ----------------------------------------------------------------------------------------- the classifier

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201b": "'", "\u02bc": "'", "`": "'",
                         "\u201c": '"', "\u201d": '"'})
_NON_WORD = re.compile(r"[^a-z0-9]+")


def normalize(text: str) -> str:
    """Lower case, accents and apostrophes dropped, every other non-alphanumeric run one space, stripped."""
    text = unicodedata.normalize("NFKD", text.translate(_QUOTES))
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower().replace("'", "")
    return _NON_WORD.sub(" ", text).strip()


_EXCEPTIONS = [re.compile(p) for p in EXCEPTIONS]
_HARM = [(cat, w, re.compile(p)) for cat, w, p in HARM_CUES]
_EVASION = [re.compile(p) for p in EVASION]
_HOW_TO = [re.compile(p) for p in HOW_TO]
_REQUEST = [re.compile(p) for p in REQUEST]
_CONTEXT = [re.compile(p) for p in BENIGN_CONTEXT]


def _blank(text: str, patterns: list[re.Pattern]) -> tuple[str, list[str]]:
    """The text with every match of the patterns replaced by spaces (word boundaries kept), and the matches."""
    found: list[str] = []
    for pat in patterns:
        def repl(m: re.Match) -> str:
            found.append(m.group(0))
            return " " * len(m.group(0))
        text = pat.sub(repl, text)
    return text, found


def _first(patterns: list[re.Pattern], text: str) -> str | None:
    """The first match of the first pattern that matches, stripped; None if none does."""
    for pat in patterns:
        m = pat.search(text)
        if m:
            return m.group(0).strip()
    return None


class LexiconPromptClassifier:
    """Harmful-prompt heuristic: weighted harm cues + evasion + request framing - benign context (module
    docstring). Stateless and deterministic; ``classify`` is safe to call from many threads."""

    id = "prompt-lexicon-v1"

    def classify(self, prompt: str) -> PromptLabel:
        text, excepted = _blank(normalize(prompt), _EXCEPTIONS)
        matched = [f"exception:{m.strip()}" for m in excepted]
        best: dict[str, tuple[float, str]] = {}  # category -> its strongest cue (weight, matched text)
        for cat, weight, pat in _HARM:
            m = pat.search(text)
            if m and weight > best.get(cat, (0.0, ""))[0]:
                best[cat] = (weight, m.group(0).strip())
        score = sum(w for w, _ in best.values())
        matched += [f"{'strong' if w >= STRONG else 'weak'}:{cat}:{t}" for cat, (w, t) in best.items()]
        context_text, evasions = _blank(text, _EVASION)
        if evasions:
            score += EVASION_WEIGHT
            matched += [f"evasion:{m.strip()}" for m in evasions]
        if best:
            for kind, weight, patterns in (("how_to", HOW_TO_WEIGHT, _HOW_TO), ("request", REQUEST_WEIGHT, _REQUEST)):
                m = _first(patterns, text)
                if m:
                    score += weight
                    matched.append(f"{kind}:{m}")
                    break
            m = _first(_CONTEXT, context_text)
            if m:
                score += CONTEXT_WEIGHT
                matched.append(f"context:{m}")
        score = min(1.0, max(0.0, score))
        return PromptLabel(harmful=score >= THRESHOLD, score=score, matched=tuple(matched), source=self.id)

    def classify_many(self, prompts: Iterable[str]) -> list[PromptLabel]:
        return [self.classify(p) for p in prompts]

    def describe(self) -> dict:
        """Everything that decides a verdict, for recording next to results: id, rules, lists, weights."""
        return {
            "id": self.id,
            "threshold": THRESHOLD,
            "weights": {"strong": STRONG, "weak": WEAK, "evasion": EVASION_WEIGHT, "how_to": HOW_TO_WEIGHT,
                        "request": REQUEST_WEIGHT, "benign_context": CONTEXT_WEIGHT},
            "rules": [
                "normalise: lower case, apostrophes dropped, other non-alphanumeric runs -> one space",
                "blank out benign idioms (exceptions)",
                "sum over harm-cue categories of the weight of each category's strongest matching cue",
                f"+{EVASION_WEIGHT} if an evasion phrase matches",
                f"if a harm cue matched: +{HOW_TO_WEIGHT} for how-to framing, else +{REQUEST_WEIGHT} for other "
                f"request framing; {CONTEXT_WEIGHT} (once) for a benign context (evasion phrases blanked first)",
                f"score = clip(sum, 0, 1); harmful iff score >= {THRESHOLD}",
            ],
            "exceptions": list(EXCEPTIONS),
            "harm_cues": [{"category": c, "weight": w, "pattern": p} for c, w, p in HARM_CUES],
            "evasion": list(EVASION),
            "how_to": list(HOW_TO),
            "request": list(REQUEST),
            "benign_context": list(BENIGN_CONTEXT),
        }


# ------------------------------------------------------------------------------------------- label column

_TRUE = ("harmful", "unsafe", "true", "yes", "1")
_FALSE = ("benign", "harmless", "safe", "false", "no", "0")


def harm_category(label: PromptLabel) -> str | None:
    """The harm category of a verdict: the category of its strongest cue (a strong cue before a weak one, then
    the first in HARM_CUES order); None where no harm cue matched."""
    cues = [m.split(":", 2) for m in label.matched if m.startswith(("strong:", "weak:"))]
    cues.sort(key=lambda c: c[0] != "strong")  # stable: HARM_CUES order within strong and within weak
    return cues[0][1] if cues else None


def parse_prompt_label(value: object) -> bool:
    """A label column's value as harmful (True) or benign (False).

    Accepts bool; 0/1 as int, float or string; and, case-insensitively and stripped, "harmful", "unsafe",
    "true", "yes" (True) or "benign", "harmless", "safe", "false", "no" (False). Anything else raises
    ValueError naming the value and the accepted ones.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
    raise ValueError(f"prompt label {value!r} is not one of: true/false (bool), 0/1 (int, float or string), "
                     f"{', '.join(repr(s) for s in _TRUE[:-1])} (harmful) or "
                     f"{', '.join(repr(s) for s in _FALSE[:-1])} (benign), case-insensitive")


def column_label(value: object) -> PromptLabel:
    """A label column's value (see :func:`parse_prompt_label`) as a PromptLabel with ``source="column"``."""
    harmful = parse_prompt_label(value)
    return PromptLabel(harmful=harmful, score=1.0 if harmful else 0.0, matched=(), source="column")
