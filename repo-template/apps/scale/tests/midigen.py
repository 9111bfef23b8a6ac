"""Writes MIDI files for the tests with mido, and says what they contain.

A song is described by the instruments it plays; the description is the truth the
job's output is compared with.
"""

import random
from pathlib import Path

import mido

DRUMS = "drums"
MELODIC_CHANNELS = [c for c in range(16) if c != 9]


def write(path: Path, tracks, midi_type=1) -> Path:
    """Writes tracks (lists of mido messages, delta times in ticks) as a MIDI file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    midi = mido.MidiFile(type=midi_type, ticks_per_beat=480)
    for messages in tracks:
        track = mido.MidiTrack()
        track.extend(messages)
        track.append(mido.MetaMessage("end_of_track", time=0))
        midi.tracks.append(track)
    midi.save(str(path))
    return path


def note(channel, pitch=60, start=0, length=240, velocity=90):
    """A note as note_on/note_off, `start` ticks after the previous message."""
    return [mido.Message("note_on", channel=channel, note=pitch, velocity=velocity, time=start),
            mido.Message("note_off", channel=channel, note=pitch, velocity=0, time=length)]


def program(channel, number, start=0):
    return mido.Message("program_change", channel=channel, program=number, time=start)


def song(path: Path, instruments) -> frozenset:
    """A type 1 file with one track per instrument: drums on channel 10, each program
    on a channel of its own. Returns the instruments as the job names them."""
    instruments = list(instruments)
    tracks = [[mido.MetaMessage("set_tempo", tempo=500000, time=0)]]
    channels = iter(MELODIC_CHANNELS)
    for instrument in instruments:
        if instrument == DRUMS:
            tracks.append(note(9, pitch=36) + note(9, pitch=38, start=240))
        else:
            channel = next(channels)
            tracks.append([program(channel, int(instrument))] + note(channel) + note(channel, 64, start=120))
    write(path, tracks)
    return frozenset(str(i) for i in instruments)


def random_corpus(directory: Path, count: int, seed: int, pool=None, sizes=(1, 7)) -> dict:
    """`count` songs with random instrument sets drawn from a small pool, so that many
    pairs are similar. Returns {relative path: instruments}."""
    rng = random.Random(seed)
    pool = pool or [DRUMS, "0", "24", "25", "32", "33", "40", "48", "56", "65", "73", "81"]
    known = {}
    for n in range(count):
        size = rng.randint(*sizes)
        relative = f"{['rock', 'jazz', 'folk'][n % 3]}/song-{n:04d}.mid"
        known[relative] = song(directory / relative, rng.sample(pool, size))
    return known


def jaccard(a, b) -> float:
    return len(a & b) / len(a | b)


def exact_similar_pairs(known: dict, threshold: float, min_instruments: int) -> dict:
    """Brute force over every pair: {(path_a, path_b): jaccard} for pairs whose Jaccard
    distance is at most the threshold (path_a < path_b)."""
    eligible = sorted(p for p, s in known.items() if len(s) >= min_instruments)
    pairs = {}
    for i, a in enumerate(eligible):
        for b in eligible[i + 1:]:
            similarity = jaccard(known[a], known[b])
            if similarity > 0 and 1 - similarity <= threshold + 1e-12:
                pairs[(a, b)] = similarity
    return pairs
