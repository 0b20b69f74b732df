"""What a generated text is, read from its words alone: a request or an answer, a refusal, an
echo of the prompt that asked for it. Each check returns None (passes) or a short detail saying
what it found; the thresholds of the embedding checks live in validate/checks.py."""

from __future__ import annotations

import re
from functools import cache

from augment_ray.curate.text import fold_str
from augment_ray.curate.words import han_share

# first words of instructions (Self-Instruct, Alpaca, Dolly, MT-Bench): imperative verbs
REQUEST_VERBS = frozenset("""
return output print reply get keep avoid remember try be
act add adjust analyze analyse answer apply argue arrange ask assess assign assume brainstorm
build calculate categorize change check choose cite classify come compare compile complete
compose compute condense construct continue convert correct count craft create critique debate
decide define derive describe design detect determine develop devise diagnose discuss do draft
draw edit elaborate emulate enumerate estimate evaluate examine explain explore express extract
fill find finish fix follow format formulate generate give guess help highlight identify
illustrate imagine implement improve infer insert interpret introduce invent judge justify label
let list locate make map match mention modify name note offer order organize outline paraphrase
pick plan play point predict prepare present pretend prioritize produce propose prove provide
put rank rate read recall recommend reduce refactor reformulate rephrase replace report
represent research respond restate retell reverse review revise rewrite role-play roleplay rank
say score select sell share show simplify sketch solve sort specify spell split state suggest
summarise summarize supply take talk teach tell think transform translate turn type use verify
visualize walk weigh write
""".split())  # noqa: SIM905 - a word list reads best

QUESTION_WORDS = frozenset("""
what which who whom whose why how is are was were do does did can could should would
will may might shall have has had am isn't aren't don't doesn't didn't can't couldn't shouldn't
wouldn't won't
""".split())  # noqa: SIM905 - a word list reads best

# words that open a clause before the request ("Given a list, sort it."), or before a statement
CLAUSE_OPENERS = frozenset("""
given for using based with from in on after if considering assuming now then first also when
where while before once as since because although though to by during
""".split())  # noqa: SIM905

# a request phrased as a statement of need or a task set for the reader
REQUEST_PHRASES = re.compile(
    r"\b(?:please|can you|could you|would you|will you|i (?:want|need|would like|'d like)"
    r"(?: you)? (?:to|a|an|some|help)|i'm looking for|i am looking for|help me|"
    r"your (?:task|job|goal) is|you are (?:given|asked|to)|you will be given|in this task|"
    r"suppose|imagine|let's|let us|"
    r"i'd love|tell me|show me|give me)\b",
    re.IGNORECASE,
)

# how answers, letters and descriptions of a task begin (not how requests begin)
ANSWER_OPENINGS = re.compile(
    r"^(?:sure|certainly|of course|absolutely|yes\b|no\b|okay|ok\b|here (?:is|are)|here's|"
    r"the answer|the task is|this task|this instruction|the instruction|the given|the following "
    r"(?:is|are)|as an ai|dear\b|hi\b|hello\b|i think|i believe|in my opinion|when answering|"
    r"to answer|there (?:is|are)|it is|it's|they are|we are|the (?:\w+ ){0,3}(?:is|are|was|were|"
    r"refers?|means?)\b)",
    re.IGNORECASE,
)

# Chinese requests: a question mark, a question particle or a request word
ZH_REQUEST = re.compile(r"[\uff1f?]|请|如何|怎么|怎样|为什么|什么|哪|吗|呢|是否|多少|能否|可以|"
                        r"帮我|给我|写|列出|解释|描述|生成|翻译|总结|比较|分析|推荐|设计|计算")

# scaffolding of our prompts (and of teacher models that narrate their rewrite)
TEMPLATE_ECHO = re.compile(
    r"(?:\b(?:rewritten|refined|improved|revised|new|original|example|modified|updated) "
    r"(?:version|instruction|prompt|question)s?\b\s*(?:is|:|\uff1a)|"
    r"\bhere is (?:a|an|the|my) (?:rewritten|refined|improved|revised|new|more detailed|modified) "
    r"|^\s*\**\s*instructions?\s*\**\s*[:\uff1a]\s*$|</?(?:refined|instruction|question|answer)>|"
    r"\bthe (?:rewritten|refined|original) instruction\b|\brewrite the instruction\b|"
    r"\bthis (?:rewritten |refined |revised |new )?(?:instruction|version|prompt) (?:is|has|"
    r"includes|adds|provides|asks|now)\b)",
    re.IGNORECASE | re.MULTILINE,
)

REFUSAL = re.compile(
    r"(?:\bi(?:'m| am) sorry,? (?:but|i\b)|\bsorry,? (?:but )?i (?:can|am|'m)|"
    r"\bi(?:'m| am) (?:afraid i|unable|not able|not comfortable)|"
    r"\bi (?:can(?:'|no)t|cannot|won't|will not) (?:help|assist|answer|provide|give|write|do|"
    r"offer|comply|fulfil)|\b(?:can ?not|can't|unable to) (?:provide|give|offer) "
    r"(?:legal|medical|financial|personal|professional)|\bi (?:do not|don't) have the ability|"
    r"\bi(?:'d| would) (?:prefer|rather) not\b|\bi must decline\b|\bi apologi[sz]e,? but\b|"
    r"\b(?:would(?:n't| not)|do not feel it would) be appropriate for me|"
    r"\bas an ai(?: language model)?,? i\b|\bas a language model\b|"
    r"\bit is not (?:possible|appropriate) for me\b|"
    r"抱歉|对不起|无法(?:回答|提供|帮助)|我不能|作为(?:一个)?(?:人工智能|AI|语言模型))",
    re.IGNORECASE,
)

WORD = re.compile(r"[\w']+", re.UNICODE)
SENTENCE_END = re.compile(r"(?<=[.!?\u3002\uff01\uff1f])\s+|\n+")


def words(text: str) -> list[str]:
    return WORD.findall(fold_str(text))


def first_sentence(text: str) -> str:
    stripped = re.sub(r"^[\s\"'*#>\-\d.)]+", "", text.strip())
    return SENTENCE_END.split(stripped, maxsplit=1)[0].strip()


def not_a_request(text: str) -> str | None:
    """None when `text` reads as a request (a question, an imperative, a task set for the
    reader); else what it looks like instead."""
    if han_share(text) > 0.3:
        return None if ZH_REQUEST.search(text) else "no question or request word"
    opening = first_sentence(text)
    if ANSWER_OPENINGS.match(opening):
        return f"opens like an answer: {opening[:60]!r}"
    head = words(opening)
    if not head:
        return "no words"
    sentences = [s for s in SENTENCE_END.split(text.strip()) if s.strip()]
    if any(s.rstrip().endswith(("?", "\uff1f")) for s in sentences[:3]):
        return None
    # "Given a list of numbers, sort them." / "When you travel, what should you pack?" - but
    # not "When rolling two dice, the probability is 1/6." nor "In physics, X refers to Y."
    if head[0] in CLAUSE_OPENERS:
        for clause in re.split(r"[,:;]\s*", " ".join(sentences[:2]))[1:3]:
            said = words(clause)
            # "In this task, you are given ..." sets a task; "To do X, you can use Y." explains
            if said and (said[0] in REQUEST_VERBS or said[0] == "please" or
                         said[:2] in (["you", "are"], ["you", "will"], ["you", "must"]) or
                         REQUEST_PHRASES.match(clause)):
                return None
        return f"a clause, then no request: {opening[:60]!r}"
    if head[0] in REQUEST_VERBS or head[0] in QUESTION_WORDS:
        return None
    if REQUEST_PHRASES.search(" ".join(sentences[:2])):
        return None
    return f"neither a question nor an instruction: {opening[:60]!r}"


@cache
def template_ngrams(template_text: str, n: int = 6) -> frozenset[tuple[str, ...]]:
    """The n-word sequences of a prompt template (its placeholders left out)."""
    found: set[tuple[str, ...]] = set()
    for part in re.split(r"\{[a-z_]+\}", template_text):
        tokens = words(part)
        found.update(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    return frozenset(found)


def template_echo(text: str, template_text: str | None = None, n: int = 6) -> str | None:
    """What in `text` is prompt scaffolding rather than content: a 'Rewritten instruction:'
    label, or `n` words in a row from the template that asked for it."""
    match = TEMPLATE_ECHO.search(text)
    if match:
        return f"scaffolding {match.group(0).strip()[:60]!r}"
    if template_text:
        grams = template_ngrams(template_text, n)
        tokens = words(text)
        for i in range(len(tokens) - n + 1):
            if tuple(tokens[i:i + n]) in grams:
                return f"prompt wording {' '.join(tokens[i:i + n])!r}"
    return None


def refusal(text: str) -> str | None:
    """A refusal or apology in the first 300 characters of an answer."""
    match = REFUSAL.search(text[:300])
    return f"refuses: {match.group(0)!r}" if match else None


def echo_share(source: str, text: str, n: int = 3) -> float:
    """The share of `source`'s n-word sequences that `text` repeats (1.0: it restates all of
    the source; a short answer that reuses a few of its words stays low)."""
    said, asked = words(text), words(source)
    if len(asked) < n:
        return 1.0 if asked and fold_str(source) == fold_str(text) else 0.0
    grams = {tuple(asked[i:i + n]) for i in range(len(asked) - n + 1)}
    repeated = {tuple(said[i:i + n]) for i in range(len(said) - n + 1)}
    return len(grams & repeated) / len(grams)
