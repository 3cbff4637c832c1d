"""The built-in `instruct` task: labelled data rewritten as instructions (FLAN's recipe), plus dialogue.

    rotten-tomatoes  "Is this movie review positive or negative?\\n\\n{text}"  ->  "positive"
    bbc-news         "Classify the news story into one of: business, ...\\n{text}"  ->  "sport"
    chatterbot       "Hello"  ->  "Hi, how are you?"                              (the pairs as they are)

Each classification task has five phrasings. The last one is never trained on: validation and test
examples alternate between a seen phrasing and the unseen one, in groups named
"rotten-tomatoes/seen phrasing", "rotten-tomatoes/unseen phrasing", ... so the metrics show whether a
model follows a wording it never saw (Wei et al. 2022, "Finetuned language models are zero-shot
learners"). Answers are the label words of the task's verbalizer (templates.BUILTIN_PROMPTS), so
accuracy is read off the reply. A BBC article keeps its first ARTICLE_WORDS words (~110 tokens); the
mixture takes a fixed sample of ROTTEN_TOMATOES_SIZE reviews so no source dominates.
"""

from __future__ import annotations

import random
from dataclasses import replace

from deltatune.data import builtin

ARTICLE_WORDS = 80
ROTTEN_TOMATOES_SIZE = 2400
SEEN, UNSEEN = "seen phrasing", "unseen phrasing"
TOPICS = "business, entertainment, politics, sport or technology"
PHRASINGS: dict[str, tuple[str, ...]] = {  # the last phrasing of each task is held out of training
    "rotten-tomatoes": (
        "Is this movie review positive or negative?\n\n{text}",
        "Review: {text}\nWhat is the sentiment of this review? Answer positive or negative.",
        "Classify the sentiment of the following film review as positive or negative.\n{text}",
        "{text}\n\nDid the critic like the movie? Reply with positive or negative.",
        'Here is what a critic wrote: "{text}" Would you call that review positive or negative?',
    ),
    "bbc-news": (
        f"What is the topic of this news article? Choose from {TOPICS}.\n\n{{text}}",
        f"Article: {{text}}\nWhich section of the newspaper does it belong to ({TOPICS})?",
        f"Classify the news story into one of: {TOPICS}.\n{{text}}",
        f"{{text}}\n\nTopic ({TOPICS}):",
        f"A BBC journalist wrote the following. Is it about {TOPICS}?\n{{text}}",
    ),
}
LABEL_WORDS = {"rotten-tomatoes": {"fresh": "positive", "rotten": "negative"},
               "bbc-news": {"business": "business", "entertainment": "entertainment", "politics": "politics",
                            "sports": "sport", "tech": "technology"}}


def raw_examples() -> list[tuple[str, str, str]]:
    """(raw input, answer, source task) of every example, before phrasing."""
    reviews = list(builtin.read_rotten_tomatoes())
    random.Random("instruct:rotten-tomatoes").shuffle(reviews)
    sources = {"rotten-tomatoes": reviews[:ROTTEN_TOMATOES_SIZE],
               "bbc-news": [(" ".join(text.split()[:ARTICLE_WORDS]), topic) for text, topic in builtin.read_bbc_news()]}
    examples = [(text, LABEL_WORDS[name][label], name) for name, pairs in sources.items() for text, label in pairs]
    return examples + [(prompt, reply, "chatterbot") for prompt, reply in builtin.read_chatterbot()]


def phrase(examples, split: str):
    """Each classification example as an instruction: train takes the seen phrasings; validation and test
    alternate between a seen phrasing and the unseen one (grouped by which)."""
    rng = random.Random(f"instruct:{split}")
    counts: dict[str, int] = {}
    out = []
    for example in examples:
        phrasings = PHRASINGS.get(example.group)
        if phrasings is None:  # dialogue: as it is
            out.append(example)
            continue
        index = counts[example.group] = counts.get(example.group, -1) + 1
        unseen = split != "train" and index % 2 == 1
        template = phrasings[-1] if unseen else rng.choice(phrasings[:-1])
        out.append(replace(example, text=template.replace("{text}", example.text),
                           group=f"{example.group}/{UNSEEN if unseen else SEEN}"))
    return out
