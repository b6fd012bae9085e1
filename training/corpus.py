"""The demo model's domain: digit strings, numbers and short phrases in English and Mandarin.

Each utterance has what espeak-ng should say, and its transcript in both text-norm styles:
``woitn`` spells numbers as words ("one two three", "一二三"), ``withitn`` writes numerals
and punctuation ("123.", "123。"). Transcripts are given as token pieces, so the vocabulary
below is closed: a word-level English vocabulary (each word spans several 60 ms frames, as CTC
needs) and single characters for Mandarin.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

WORD = "\u2581"  # sentencepiece's word-boundary mark

EN_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
EN_TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
            "seventeen", "eighteen", "nineteen"]
EN_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
EN_PHRASES = [
    "hello world", "good morning", "good night", "thank you", "see you later",
    "turn on the light", "turn off the light", "open the door", "close the window",
    "what time is it", "how are you", "call my phone", "play some music", "stop the music",
    "yes please", "no thanks",
]
ZH_DIGITS = "零一二三四五六七八九"
# Tone-numbered pinyin of every character above, for espeak-ng's cmn-latn-pinyin voice (which
# reads pinyin far better than its cmn voice reads characters: that one says some digits with
# English letter sounds).
PINYIN = {
    "零": "ling2", "一": "yi1", "二": "er4", "三": "san1", "四": "si4", "五": "wu3", "六": "liu4",
    "七": "qi1", "八": "ba1", "九": "jiu3", "十": "shi2", "百": "bai3", "千": "qian1",
    "你": "ni3", "好": "hao3", "谢": "xie4", "早": "zao3", "上": "shang4", "晚": "wan3",
    "安": "an1", "再": "zai4", "见": "jian4", "打": "da3", "开": "kai1", "灯": "deng1",
    "关": "guan1", "门": "men2", "现": "xian4", "在": "zai4", "几": "ji3", "点": "dian3",
    "吗": "ma5", "播": "bo1", "放": "fang4", "音": "yin1", "乐": "yue4", "停": "ting2",
    "止": "zhi3", "请": "qing3", "坐": "zuo4", "没": "mei2", "问": "wen4", "题": "ti2",
    "明": "ming2", "天": "tian1",
}
ZH_PHRASES = [
    "你好", "谢谢", "早上好", "晚安", "再见", "打开灯", "关上门", "现在几点", "你好吗", "播放音乐",
    "停止播放", "请坐", "没问题", "明天见",
]


@dataclass(frozen=True)
class Utterance:
    language: str  # "en" or "zh"
    kind: str  # "digits", "number" or "phrase"
    spoken: str  # what a synthesiser is asked to say (Mandarin: characters)
    woitn: tuple[str, ...]  # transcript pieces, numbers as words
    withitn: tuple[str, ...]  # transcript pieces, numerals and punctuation


def en_number_words(n: int) -> list[str]:
    """0..999 as English words, without "and": 345 -> three hundred forty five."""
    if n < 10:
        return [EN_ONES[n]]
    if n < 20:
        return [EN_TEENS[n - 10]]
    if n < 100:
        return [EN_TENS[n // 10]] + ([EN_ONES[n % 10]] if n % 10 else [])
    rest = n % 100
    return [EN_ONES[n // 100], "hundred"] + (en_number_words(rest) if rest else [])


def zh_number_chars(n: int) -> str:
    """0..9999 in Mandarin: 305 -> 三百零五, 12 -> 十二, 2000 -> 两千 is not used: 二千."""
    if n == 0:
        return "零"
    units = [(1000, "千"), (100, "百"), (10, "十")]
    out, pending_zero = "", False
    for value, unit in units:
        digit = n // value % 10
        if digit:
            if pending_zero:
                out += "零"
                pending_zero = False
            out += ("" if unit == "十" and digit == 1 and not out else ZH_DIGITS[digit]) + unit
        elif out:
            pending_zero = True
    if n % 10:
        out += ("零" if pending_zero else "") + ZH_DIGITS[n % 10]
    return out


def pinyin(chars: str) -> str:
    """Characters -> tone-numbered pinyin, a syllable per character: 四七一 -> si4 qi1 yi1."""
    return " ".join(PINYIN[ch] for ch in chars)


def _words(words: list[str]) -> tuple[str, ...]:
    return tuple(WORD + word for word in words)


def _numerals(text: str, stop: str, spaced: bool) -> tuple[str, ...]:
    pieces = [WORD + text[0] if spaced else text[0], *text[1:]]
    return tuple(pieces) + (stop,)


def english(kind: str, rng: random.Random) -> Utterance:
    if kind == "digits":
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(2, 6)))
        words = [EN_ONES[int(d)] for d in digits]
        return Utterance("en", kind, " ".join(words), _words(words), _numerals(digits, ".", True))
    if kind == "number":
        n = rng.randint(10, 999)
        words = en_number_words(n)
        return Utterance("en", kind, " ".join(words), _words(words), _numerals(str(n), ".", True))
    phrase = rng.choice(EN_PHRASES)
    words = phrase.split()
    styled = [words[0].capitalize(), *words[1:]]
    stop = "?" if phrase.startswith(("what", "how")) else "."
    return Utterance("en", kind, phrase, _words(words), _words(styled) + (stop,))


def mandarin(kind: str, rng: random.Random) -> Utterance:
    if kind == "digits":
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(2, 6)))
        chars = "".join(ZH_DIGITS[int(d)] for d in digits)
        return Utterance("zh", kind, chars, tuple(chars), _numerals(digits, "。", False))
    if kind == "number":
        n = rng.randint(10, 9999)
        chars = zh_number_chars(n)
        return Utterance("zh", kind, chars, tuple(chars), _numerals(str(n), "。", False))
    phrase = rng.choice(ZH_PHRASES)
    stop = "？" if phrase.endswith(("几点", "吗")) else "。"
    return Utterance("zh", kind, phrase, tuple(phrase), tuple(phrase) + (stop,))


KINDS = ("digits", "number", "phrase")
KIND_WEIGHTS = (0.4, 0.4, 0.2)


def sample_utterance(language: str, rng: random.Random) -> Utterance:
    kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
    return english(kind, rng) if language == "en" else mandarin(kind, rng)


def vocabulary() -> list[str]:
    """Every piece a transcript can contain, in a fixed order (the demo tokenizer's pieces)."""
    words = set(EN_ONES + EN_TEENS + [w for w in EN_TENS if w] + ["hundred"])
    for phrase in EN_PHRASES:
        words.update(phrase.split())
        words.add(phrase.split()[0].capitalize())
    pieces = [WORD] + sorted(WORD + w for w in words)
    pieces += [WORD + d for d in "0123456789"] + list("0123456789") + [".", "?"]
    chars = set(ZH_DIGITS + "十百千")
    for phrase in ZH_PHRASES:
        chars.update(phrase)
    pieces += sorted(chars) + ["。", "？"]
    return pieces
