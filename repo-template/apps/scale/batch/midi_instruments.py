"""Which General MIDI instruments a MIDI file plays: pure Python, no Spark.

Runs on the executors, one file at a time. The rules, from the General MIDI spec:
- A melodic channel plays the program most recently selected on it; a channel that
  plays notes before any program change plays program 0 (Acoustic Grand Piano).
- Channel 10 (index 9) is the percussion channel: whatever program changes it gets
  select drum kits, so it is always the token 'drums', never a program number.
- An instrument counts only when a note sounds on it (note_on with velocity > 0): a
  program change nothing plays, or a note_on of velocity 0 (a note off), adds nothing.
"""

import hashlib
import io

import mido

DRUMS = "drums"
PERCUSSION_CHANNEL = 9


class Rejected(Exception):
    """A file that is not a usable song; the message is the reason users see."""


def instruments_of(data: bytes) -> frozenset:
    """The instruments a MIDI file plays, as tokens '0'..'127' and 'drums'.

    Raises Rejected with the reason when the file is empty, not MIDI, truncated,
    corrupt or plays no note.
    """
    if not data:
        raise Rejected("empty file")
    if not data.startswith(b"MThd"):
        raise Rejected("not a MIDI file: no MThd header")
    try:
        midi = mido.MidiFile(file=io.BytesIO(data))
    except EOFError:
        raise Rejected("truncated: the file ends inside a chunk") from None
    except Exception as error:  # mido raises OSError, ValueError, KeyError... on bad bytes
        raise Rejected(f"corrupt: {error}") from None

    # Type 0 and 1 tracks play at the same time, so a program change in one track
    # applies to notes of the same channel in another: follow them merged, in time
    # order. Type 2 tracks are independent sequences played one after another.
    if midi.type == 2:
        sequences = [iter(track) for track in midi.tracks]
    else:
        sequences = [mido.merge_tracks(midi.tracks)]

    used = set()
    program = {}  # channel -> program selected now
    for sequence in sequences:
        for message in sequence:
            if message.type == "program_change":
                program[message.channel] = message.program
            elif message.type == "note_on" and message.velocity > 0:
                if message.channel == PERCUSSION_CHANNEL:
                    used.add(DRUMS)
                else:
                    used.add(str(program.get(message.channel, 0)))
    if not used:
        raise Rejected("no notes: the file plays nothing")
    return frozenset(used)


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def song_id_of(path: str) -> int:
    """A stable id from the song's path: the same file gets the same id in every run,
    on every executor and in a fresh database, so reruns write identical rows without
    asking the database for ids. 53 bits keep it exact in JavaScript's numbers (the
    viewer's JSON); two of a million songs collide with probability about 5·10⁻⁵, and
    then the merge fails loudly (one id, two paths) rather than mixing them up."""
    digest = hashlib.sha256(path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 11


def instrument_index(token: str) -> int:
    """Position of an instrument in the 129-wide vectors MinHash reads."""
    return 128 if token == DRUMS else int(token)
