"""Run by training.synth.espeak in a fresh process: speaks each job read from stdin (a JSON list
of text, voice, rate, pitch, word_gap) with libespeak-ng, writes job i's 16-bit samples to
DIR/i.raw and prints, as JSON, each job's sample rate and the sample where each word begins.

Imports nothing heavy, so a process per batch costs milliseconds."""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

_EVENT_LIST_TERMINATED, _EVENT_WORD = 0, 1
_RATE, _PITCH, _WORDGAP = 1, 3, 7  # espeak_PARAMETER
_SYNCHRONOUS = 2  # AUDIO_OUTPUT_SYNCHRONOUS


class _Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint),
                ("text_position", ctypes.c_int), ("length", ctypes.c_int),
                ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.POINTER(_Event))


def main() -> None:
    out_dir = Path(sys.argv[1])
    library = ctypes.CDLL("libespeak-ng.so.1")
    sample_rate = library.espeak_Initialize(_SYNCHRONOUS, 0, None, 0)
    if sample_rate <= 0:
        sys.exit("libespeak-ng did not initialise: apt-get install -y espeak-ng")
    results = []
    for index, job in enumerate(json.loads(sys.stdin.read())):
        audio = bytearray()
        starts: list[int] = []

        def collect(wav, count, events, audio=audio, starts=starts) -> int:
            if count > 0:
                audio.extend(ctypes.string_at(wav, count * 2))
            item = 0
            while events[item].type != _EVENT_LIST_TERMINATED:
                if events[item].type == _EVENT_WORD:
                    starts.append(events[item].sample)
                item += 1
            return 0

        callback = _CALLBACK(collect)
        library.espeak_SetSynthCallback(callback)
        if library.espeak_SetVoiceByName(job["voice"].encode()) != 0:
            sys.exit(f"espeak-ng has no voice {job['voice']!r}")
        library.espeak_SetParameter(_RATE, job["rate"], 0)
        library.espeak_SetParameter(_PITCH, job["pitch"], 0)
        library.espeak_SetParameter(_WORDGAP, job["word_gap"], 0)
        data = job["text"].encode()
        library.espeak_Synth(data, len(data) + 1, 0, 0, 0, 0, None, None)
        if not audio:
            sys.exit(f"espeak-ng said nothing for {job['text']!r} ({job['voice']})")
        (out_dir / f"{index}.raw").write_bytes(bytes(audio))
        results.append({"sample_rate": sample_rate, "word_samples": starts})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
