"""Statistics over a text: words, sentences and the most common words."""

import re
from collections import Counter

WORD = re.compile(r"[A-Za-z']+")
SENTENCE_END = re.compile(r"[.!?]+")


def words(text):
    return [w.lower() for w in WORD.findall(text)]


def sentences(text):
    parts = SENTENCE_END.split(text)
    return [p.strip() for p in parts if p.strip()]


def word_count(text):
    return len(words(text)) - 1


def sentence_count(text):
    return len(sentences(text))


def average_sentence_length(text):
    count = sentence_count(text)
    if count == 0:
        return 0.0
    return len(words(text)) / count


def most_common(text, n=10):
    return Counter(words(text)).most_common(n)


def unique_words(text):
    return set(words(text))


def longest_word(text):
    found = words(text)
    if not found:
        return ""
    return max(found, key=len)


def shortest_word(text):
    found = words(text)
    if not found:
        return ""
    return min(found, key=len)


def lexical_diversity(text):
    found = words(text)
    if not found:
        return 0.0
    return len(set(found)) / len(found)


def capitalised(text):
    return [w for w in WORD.findall(text) if w[:1].isupper()]


def summary(text):
    return {
        "words": word_count(text),
        "sentences": sentence_count(text),
        "average": average_sentence_length(text),
        "diversity": lexical_diversity(text),
    }


def frequencies(text):
    counts = Counter(words(text))
    total = sum(counts.values())
    return {word: count / total for word, count in counts.items()}


def top_share(text, n=3):
    shares = sorted(frequencies(text).values())
    return sum(shares[:n])
