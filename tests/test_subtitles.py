"""SRT / WebVTT rendering."""

from __future__ import annotations

import re
import time

import pytest

from sensevoice_core.result import Segment, Token, Word
from sensevoice_core.subtitles import (
    SubtitleOptions,
    Unit,
    timestamp,
    to_srt,
    to_vtt,
    wrap,
)


def cue(start: float, end: float, text: str) -> Segment:
    return Segment(start=start, end=end, text=text, raw=text, language="en", emotion=None,
                   event=None)


@pytest.mark.parametrize(("seconds", "srt", "vtt"), [
    (0.0, "00:00:00,000", "00:00:00.000"),
    (1.2345, "00:00:01,234", "00:00:01.234"),
    (61.9996, "00:01:02,000", "00:01:02.000"),
    (3725.5, "01:02:05,500", "01:02:05.500"),
    (-0.2, "00:00:00,000", "00:00:00.000"),
])
def test_timestamps(seconds, srt, vtt):
    assert timestamp(seconds, ",") == srt
    assert timestamp(seconds, ".") == vtt


CUES = [cue(0.0, 1.5, " Hello. "), cue(1.5, 2.0, ""), cue(2.25, 4.0, "World.")]


def test_srt_numbers_cues_and_skips_empty_ones():
    assert to_srt(CUES) == ("1\n00:00:00,000 --> 00:00:01,500\nHello.\n\n"
                            "2\n00:00:02,250 --> 00:00:04,000\nWorld.\n")


def test_vtt_has_its_header_and_dot_milliseconds():
    assert to_vtt(CUES) == ("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello.\n\n"
                            "00:00:02.250 --> 00:00:04.000\nWorld.\n")


def test_no_speech_gives_empty_documents():
    assert to_srt([cue(0, 1, "")]) == ""
    assert to_vtt([]) == "WEBVTT\n"


def test_cue_text_cannot_break_the_format():
    cues = [cue(0, 1, "Hello & <b>world</b>\n\n2\n00:00:00,000 --> 00:00:01,000")]
    srt = to_srt(cues)
    assert srt.count("-->") == 1 and srt.count("\n\n") == 0
    vtt = to_vtt(cues)
    assert vtt.count("-->") == 1 and vtt.count("\n\n") == 1  # after the header alone
    assert "00:00:00.000 -&gt;" not in vtt  # SRT times stay SRT
    text = " ".join(vtt.split("\n")[3:])
    assert text == "Hello &amp; &lt;b&gt;world&lt;/b&gt; 2 00:00:00,000 -&gt; 00:00:01,000 "


# --- cues from word times -----------------------------------------------------------------

WORD_S, GAP_S = 0.3, 0.05  # hand-made words: each 0.3 s long, 50 ms apart unless paused


def timed(texts: list[str], start: float = 0.0, pauses: dict[int, float] | None = None,
          language: str = "en") -> Segment:
    """A segment of words said one after another; pauses: seconds of silence after word i."""
    words, clock = [], start
    for i, text in enumerate(texts):
        words.append(Word(word=text, start=round(clock, 3), end=round(clock + WORD_S, 3),
                          probability=0.9))
        clock += WORD_S + GAP_S + (pauses or {}).get(i, 0.0)
    joined = ("" if language in ("zh", "yue", "ja") else " ").join(texts)
    return Segment(start=start, end=words[-1].end if words else start, text=joined, raw=joined,
                   language=language, emotion=None, event=None, words=tuple(words))


def srt_cues(document: str) -> list[tuple[float, float, list[str]]]:
    """(start, end, lines) of each cue of an SRT document, checking its numbering."""
    found = []
    for number, block in enumerate(filter(None, document.split("\n\n")), start=1):
        index, times, *lines = block.strip("\n").split("\n")
        assert index == str(number)
        start, end = (seconds(t.replace(",", ".")) for t in times.split(" --> "))
        found.append((start, end, lines))
    return found


def vtt_cues(document: str) -> list[tuple[float, float, list[str]]]:
    header, *blocks = document.split("\n\n")
    assert header.rstrip("\n") == "WEBVTT"
    found = []
    for block in blocks:
        times, *lines = block.strip("\n").split("\n")
        start, end = (seconds(t) for t in times.split(" --> "))
        found.append((start, end, lines))
    return found


def seconds(stamp: str) -> float:
    hours, minutes, secs = stamp.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(secs)


# Words of 2 to 11 characters, cycling: no two cues' worth of them look alike.
VOCABULARY = ("the", "quick", "brown", "fox", "jumps", "over", "a", "remarkably", "lazy",
              "dog", "while", "everyone", "watches", "in", "astonishment")


def thirty_seconds(pauses: dict[int, float] | None = None) -> Segment:
    texts = [VOCABULARY[i % len(VOCABULARY)] for i in range(86)]  # 86 x 0.35 s = 30.1 s
    return timed(texts, start=12.0, pauses=pauses)


def test_a_30_s_segment_becomes_several_cues_within_every_limit():
    segment = thirty_seconds()
    assert segment.end - segment.start > 30
    options = SubtitleOptions()

    found = srt_cues(to_srt([segment], options))

    assert len(found) >= 5  # 86 words, ~500 characters: at least 6 cues of 2 x 42 by width
    for start, end, lines in found:
        assert 1 <= len(lines) <= options.max_line_count
        assert all(0 < len(line) <= options.max_line_width for line in lines)
        assert 0 < end - start <= options.max_cue_s
    # Every word once, in order; each cue from its first word's start to its last word's end.
    cue_words = [" ".join(lines).split() for _, _, lines in found]
    assert [w for words in cue_words for w in words] == [w.word for w in segment.words]
    first = 0
    for (start, end, _), words in zip(found, cue_words):
        last = first + len(words) - 1
        assert start == pytest.approx(segment.words[first].start, abs=5e-4)
        assert end == pytest.approx(segment.words[last].end, abs=5e-4)
        first = last + 1
    assert [start for start, _, _ in found] == sorted(start for start, _, _ in found)


@pytest.mark.parametrize(("width", "count", "cue_s"), [(20, 1, 7.0), (42, 2, 2.0), (80, 3, 60.0)])
def test_other_limits_are_kept_too(width, count, cue_s):
    options = SubtitleOptions(max_line_width=width, max_line_count=count, max_cue_s=cue_s)
    for start, end, lines in vtt_cues(to_vtt([thirty_seconds()], options)):
        assert len(lines) <= count and all(len(line) <= width for line in lines)
        assert end - start <= cue_s + 1e-9


def cut_after(segment: Segment, document: str) -> list[int]:
    """The index of the last word of each cue but the last."""
    counts = [len(" ".join(lines).split()) for _, _, lines in srt_cues(document)]
    return [sum(counts[:i + 1]) - 1 for i in range(len(counts) - 1)]


def test_cuts_fall_at_pauses_rather_than_where_lines_fill():
    # Phrases of 7 to 10 words (30 to 60 characters) with 0.4 s between them: two never fit
    # one cue, so each cut must fall somewhere; a writer filling lines would cut mid-phrase.
    phrase_ends = [8, 15, 25, 33, 41, 50, 57, 66, 75]
    segment = thirty_seconds({i: 0.4 for i in phrase_ends})

    document = to_srt([segment])

    assert set(cut_after(segment, document)) <= set(phrase_ends)
    greedy = wrap([Unit(w.word, True) for w in segment.words], 42)  # lines filled in turn
    greedy_cuts = {sum(len(line) for line in greedy[:i]) - 1 for i in range(2, len(greedy), 2)}
    assert not greedy_cuts <= set(phrase_ends)  # so the test could fail


def test_cuts_prefer_sentence_ends_then_clauses_without_pauses():
    texts = [VOCABULARY[i % len(VOCABULARY)] for i in range(40)]
    texts[9] += "."  # 9 words of 5.7 characters: about 56, so a cut is needed near here
    texts[21] += ","
    texts[30] += "?"
    segment = timed(texts)

    assert cut_after(segment, to_srt([segment])) == [9, 21, 30]


def test_a_long_silence_ends_a_cue_that_would_fit():
    segment = timed(["Yes.", "Well", "then"], pauses={0: 2.0})
    assert [lines for _, _, lines in srt_cues(to_srt([segment]))] == [["Yes."], ["Well then"]]
    short_pause = timed(["Yes.", "Well", "then"], pauses={0: 1.0})
    assert [lines for _, _, lines in srt_cues(to_srt([short_pause]))] == [["Yes. Well then"]]


def test_a_cue_never_spans_two_segments():
    segments = [timed(["Hello", "there."]), timed(["General", "Kenobi."], start=1.0)]
    found = srt_cues(to_srt(segments))
    assert [lines for _, _, lines in found] == [["Hello there."], ["General Kenobi."]]
    assert found[0][1] <= found[1][0]


def test_lines_of_a_cue_are_balanced():
    segment = timed(["one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                     "ten", "eleven"])
    ((_, _, lines),) = srt_cues(to_srt([segment], SubtitleOptions(max_line_width=60)))
    assert lines == ["one two three four five six seven eight nine ten eleven"]
    # Filled in turn, 42 characters make lines of 39 and 15; balanced, 27 and 27.
    ((_, _, lines),) = srt_cues(to_srt([segment], SubtitleOptions(max_line_width=42)))
    assert lines == ["one two three four five six", "seven eight nine ten eleven"]


def test_a_word_wider_than_a_line_stays_whole_on_its_own_line():
    long_word = "pneumonoultramicroscopicsilicovolcanoconiosis"  # 45 characters
    segment = timed(["a", long_word, "b", "c"])
    options = SubtitleOptions(max_line_width=20, max_line_count=2)
    lines = [line for _, _, cue_lines in srt_cues(to_srt([segment], options))
             for line in cue_lines]
    assert long_word in lines
    assert all(len(line) <= 20 for line in lines if line != long_word)
    assert " ".join(lines).split() == ["a", long_word, "b", "c"]


def test_a_word_longer_than_a_cue_may_last_is_still_shown():
    segment = Segment(start=0.0, end=9.0, text="Hmmm", raw="Hmmm", language="en", emotion=None,
                      event=None, words=(Word(word="Hmmm", start=0.5, end=9.0, probability=0.5),))
    assert srt_cues(to_srt([segment])) == [(0.5, 9.0, ["Hmmm"])]


def test_a_long_number_is_split_between_its_tokens_within_the_limits():
    """ITN writes a spoken digit string as one word ("1145926358..."): it is cut between its
    tokens, which carry their own times, so no cue breaks the width or time limit."""
    digits = "11459263587931415936" * 4 + "."
    pieces = ["▁" + digits[0]] + [digits[i:i + 2] for i in range(1, 80, 2)] + ["."]
    tokens = tuple(Token(id=i + 3, piece=piece, start=round(0.3 * i, 3),
                         end=round(0.3 * i + 0.2, 3), probability=0.9)
                   for i, piece in enumerate(pieces))
    word = Word(word=digits, start=0.0, end=tokens[-2].end, probability=0.9)
    segment = Segment(start=0.0, end=word.end, text=digits, raw=digits, language="en",
                      emotion=None, event=None, words=(word,), tokens=tokens)
    found = srt_cues(to_srt([segment]))
    assert len(found) >= 2
    assert "".join(line for _, _, lines in found for line in lines) == digits
    for start, end, lines in found:
        assert all(len(line) <= 42 for line in lines) and len(lines) <= 2
        assert end - start <= 7
    assert found[0][0] == 0.0 and found[-1][1] == word.end


@pytest.mark.parametrize("language", ["zh", "yue", "ja"])
def test_unspaced_languages_are_joined_without_spaces(language):
    texts = ["今", "天", "我", "用", "GPU", "跑", "iPhone", "15", "的", "模", "型。", "hello,",
             "world", "好。"]
    document = to_srt([timed(texts, language=language)])
    assert srt_cues(document)[0][2] == ["今天我用GPU跑iPhone 15的模型。hello, world好。"]


def test_a_long_chinese_segment_is_cut_without_spaces_within_the_limits():
    texts = [chr(0x4E00 + i * 7) for i in range(50)]  # 50 characters, 17.5 s: 3 cues of 7 s
    texts[14] += "。"
    segment = timed(texts, language="zh")
    options = SubtitleOptions(max_line_width=16)
    found = srt_cues(to_srt([segment], options))
    assert "".join(line for _, _, lines in found for line in lines) == "".join(texts)
    for start, end, lines in found:
        assert all(" " not in line and len(line) <= 16 for line in lines)
        assert len(lines) <= 2 and end - start <= 7
    assert found[0][2][-1].endswith("。")  # the first cut falls at the sentence's end


def test_karaoke_times_each_word_in_order_inside_its_cue():
    segment = thirty_seconds({8: 0.4, 25: 0.4})
    plain = to_vtt([segment])
    karaoke = to_vtt([segment], SubtitleOptions(karaoke=True))

    stamped = vtt_cues(karaoke)
    assert [(s, e) for s, e, _ in stamped] == [(s, e) for s, e, _ in vtt_cues(plain)]
    assert re.sub(r"<[0-9:.]+>", "", karaoke) == plain
    starts = {round(w.start, 3) for w in segment.words}
    for start, end, lines in stamped:
        text = "\n".join(lines)
        assert not re.match(r"<", text)  # the first word shows with the cue
        tags = [seconds(t) for t in re.findall(r"<([0-9:.]+)>", text)]
        assert len(tags) == len(text.split()) - 1
        assert tags == sorted(tags) and len(set(tags)) == len(tags)
        assert all(start < tag < end and tag in starts for tag in tags)
    # Karaoke is WebVTT's: SRT cannot time words inside a cue.
    assert to_srt([segment], SubtitleOptions(karaoke=True)) == to_srt([segment])


def test_karaoke_leaves_out_tags_that_would_not_move_forward():
    words = (Word(word="a", start=1.0, end=1.2, probability=1.0),
             Word(word="b", start=1.0, end=1.4, probability=1.0),  # no later than "a"
             Word(word="c", start=1.4, end=1.4, probability=1.0))  # at the cue's end
    segment = Segment(start=1.0, end=1.4, text="a b c", raw="a b c", language="en",
                      emotion=None, event=None, words=words)
    assert to_vtt([segment], SubtitleOptions(karaoke=True)) == (
        "WEBVTT\n\n00:00:01.000 --> 00:00:01.400\na b c\n")


def test_words_are_escaped_like_text():
    segment = timed(["Tom", "&", "<Jerry>", "-->", "run"])
    assert srt_cues(to_srt([segment]))[0][2] == ["Tom & <Jerry> -> run"]
    assert vtt_cues(to_vtt([segment], SubtitleOptions(karaoke=True)))[0][2][0].startswith(
        "Tom <00:00:00.350>&amp; <00:00:00.700>&lt;Jerry&gt; <00:00:01.050>-&gt;")


@pytest.mark.parametrize("language", ["en", "ja"])
def test_no_arrow_survives_in_any_form(language):
    texts = ["a", "--->", "b", "---->", "-", "->", "-", "-", ">", "c"]
    srt, vtt = to_srt([timed(texts, language=language)]), to_vtt([timed(texts, language=language)])
    assert srt.count("-->") == 1 and vtt.count("-->") == 1  # the cue's timing line alone
    assert to_srt([cue(0, 1, "a ---> b ----> c")]).count("-->") == 1


def test_words_with_no_text_give_no_cue():
    segment = timed([" ", "\n", ""])
    assert to_srt([segment]) == "" and to_vtt([segment]) == "WEBVTT\n"
    assert srt_cues(to_srt([timed(["", "Hi", " "])])) == [(0.35, 0.65, ["Hi"])]


# --- segments without words ---------------------------------------------------------------


def test_a_segment_without_words_is_one_cue_wrapped_into_lines():
    text = " ".join(VOCABULARY * 2)  # 140 characters
    found = srt_cues(to_srt([cue(3.0, 40.0, text)]))
    assert len(found) == 1
    start, end, lines = found[0]
    assert (start, end) == (3.0, 40.0)  # no times invented inside it
    assert len(lines) >= 4 and all(len(line) <= 42 for line in lines)
    assert " ".join(lines) == text


def test_an_unspaced_segment_without_words_wraps_between_characters():
    text = "今天天气很好，我们去公园散步吧。" * 3 + "Hello world"
    segment = Segment(start=0.0, end=9.0, text=text, raw=text, language="zh", emotion=None,
                      event=None)
    ((_, _, lines),) = srt_cues(to_srt([segment], SubtitleOptions(max_line_width=10)))
    assert "".join(lines) == text.replace(" ", "")
    assert all(len(line) <= 10 for line in lines)
    assert not any(line.startswith(("，", "。")) for line in lines)
    assert lines[-1] == "Hello world" or lines[-1].endswith("world")


@pytest.mark.parametrize(("options", "named"), [
    ({"max_line_width": 0}, "max_line_width=0"),
    ({"max_line_width": -3}, "max_line_width=-3"),
    ({"max_line_width": 2.5}, "max_line_width=2.5"),
    ({"max_line_width": True}, "max_line_width=True"),
    ({"max_line_width": 10_001}, "max_line_width=10001"),
    ({"max_line_count": 0}, "max_line_count=0"),
    ({"max_line_count": -1}, "max_line_count=-1"),
    ({"max_cue_s": 0}, "max_cue_s=0"),
    ({"max_cue_s": -7.0}, "max_cue_s=-7.0"),
    ({"max_cue_s": float("inf")}, "max_cue_s=inf"),
    ({"max_cue_s": float("nan")}, "max_cue_s=nan"),
])
def test_bad_options_are_value_errors_naming_the_option(options, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        SubtitleOptions(**options)


def test_huge_limits_keep_a_long_segment_fast_and_whole():
    texts = [VOCABULARY[i % len(VOCABULARY)] for i in range(400)]  # two minutes of speech
    options = SubtitleOptions(max_line_width=10_000, max_line_count=10_000, max_cue_s=10**6)
    started = time.perf_counter()
    found = srt_cues(to_srt([timed(texts)], options))
    assert time.perf_counter() - started < 5
    assert [lines for _, _, lines in found] == [[" ".join(texts)]]
