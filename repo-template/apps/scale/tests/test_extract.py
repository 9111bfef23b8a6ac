"""The job over a corpus whose every file's content is known: the instruments it
extracts, the files it rejects and why, the reference table and the run's counts."""

import mido
import pytest

import midigen
from conftest import query, run_job
from midigen import note, program

# Each case: (relative path, how to write it, the instruments it plays)


def drums_with_program_changes(path):
    # Channel 10 gets program changes (drum kit selections): still drums, never a program.
    midigen.write(path, [[program(9, 25)] + note(9, 36) + [program(9, 0)] + note(9, 38)])


def two_tracks_one_channel(path):
    # Track 1 selects the program; track 2 plays on the same channel without one.
    midigen.write(path, [[program(2, 33)], note(2, 40, start=100), [program(4, 73)] + note(4)])


def program_change_mid_song(path):
    midigen.write(path, [[program(0, 40)] + note(0) + [program(0, 41, start=480)] + note(0)
                         + [program(0, 42, start=480)]])  # 42 never plays


def notes_without_program(path):
    # No program change at all: General MIDI's default, program 0.
    midigen.write(path, [note(3), note(9, 42)])


def velocity_zero_is_silence(path):
    # note_on with velocity 0 is a note off: program 56 never sounds.
    midigen.write(path, [[program(5, 56), mido.Message("note_on", channel=5, note=60, velocity=0)],
                         [program(6, 19)] + note(6)])


def single_track_file(path):
    midigen.write(path, [[program(0, 4), program(1, 32)] + note(0) + note(1) + note(9, 36)], midi_type=0)


KNOWN_SONGS = {
    "drums/kit-changes.mid": (drums_with_program_changes, {"drums"}),
    "channels/two-tracks-one-channel.mid": (two_tracks_one_channel, {"33", "73"}),
    "changes/mid-song.mid": (program_change_mid_song, {"40", "41"}),
    "defaults/no-program.mid": (notes_without_program, {"0", "drums"}),
    "defaults/velocity-zero.mid": (velocity_zero_is_silence, {"19"}),
    "type0/one-track.mid": (single_track_file, {"4", "32", "drums"}),
    "with space/band.mid": (lambda p: midigen.song(p, ["drums", "0", "33", "65"]), {"drums", "0", "33", "65"}),
}


def truncated(path):
    midigen.song(path, ["0", "24", "drums"])
    path.write_bytes(path.read_bytes()[:-20])


def no_notes(path):
    midigen.write(path, [[program(0, 12)]])


def corrupt_data_byte(path):
    midigen.write(path, [note(0)])
    data = bytearray(path.read_bytes())
    data[data.index(bytes([0x90, 60])) + 1] = 0xC3  # a status byte where a note number belongs
    path.write_bytes(bytes(data))


KNOWN_REJECTS = {
    "bad/empty.mid": (lambda p: p.write_bytes(b""), "empty file"),
    "bad/garbage.mid": (lambda p: p.write_bytes(bytes(range(256)) * 3), "not a MIDI file"),
    "bad/readme.txt": (lambda p: p.write_text("not music\n"), "not a MIDI file"),
    "bad/truncated.mid": (truncated, "truncated"),
    "bad/silent.mid": (no_notes, "no notes"),
    "bad/corrupt.mid": (corrupt_data_byte, "corrupt"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("edge-corpus")
    for relative, (write, _) in {**KNOWN_SONGS, **KNOWN_REJECTS}.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        write(root / relative)
    return root


@pytest.fixture(scope="module")
def filled(postgres, spark, corpus):
    url = postgres.create_database("extract")
    counts, _ = run_job(spark, "--input", corpus, "--database-url", url, "--threshold", "0.5",
                        "--min-instruments", "3", "--run-id", "edge-1")
    return url, counts


def test_each_song_has_exactly_the_instruments_it_plays(filled):
    url, _ = filled
    rows = query(url, "SELECT s.path, si.instrument FROM songs s JOIN song_instruments si USING (song_id)")
    extracted = {}
    for path, instrument in rows:
        extracted.setdefault(path, set()).add(instrument)
    assert extracted == {path: expected for path, (_, expected) in KNOWN_SONGS.items()}


def test_every_bad_file_is_listed_with_its_reason(filled):
    url, _ = filled
    rejected = dict(query(url, "SELECT path, reason FROM rejected_files"))
    assert set(rejected) == set(KNOWN_REJECTS)
    for path, (_, reason) in KNOWN_REJECTS.items():
        assert rejected[path].startswith(reason), (path, rejected[path])


def test_songs_carry_the_md5_of_their_bytes(filled, corpus):
    import hashlib

    url, _ = filled
    for path, md5 in query(url, "SELECT path, md5 FROM songs"):
        assert md5 == hashlib.md5((corpus / path).read_bytes()).hexdigest()


def test_the_run_row_counts_what_happened(filled):
    url, counts = filled
    [row] = query(url, "SELECT status, files_read, files_rejected, songs, pairs, finished_at IS NOT NULL"
                       " FROM runs WHERE run_id = %s", ("edge-1",))
    files = len(KNOWN_SONGS) + len(KNOWN_REJECTS)
    assert row == ("succeeded", files, len(KNOWN_REJECTS), len(KNOWN_SONGS), counts["pairs"], True)
    assert counts["pairs"] == query(url, "SELECT count(*) FROM similar_songs")[0][0]


def test_the_reference_table_names_all_general_midi_programs_and_drums(filled):
    url, _ = filled
    names = dict(query(url, "SELECT instrument, name FROM instruments"))
    assert set(names) == {str(p) for p in range(128)} | {"drums"}
    assert names["0"] == "Acoustic Grand Piano" and names["127"] == "Gunshot"
    families = query(url, "SELECT family, count(*) FROM instruments WHERE instrument <> 'drums' GROUP BY family")
    assert len(families) == 16 and all(n == 8 for _, n in families)
    assert query(url, "SELECT family FROM instruments WHERE instrument = 'drums'") == [("Drums",)]


def test_a_rerun_over_the_same_input_writes_nothing(filled, spark, corpus):
    url, _ = filled
    before = {t: query(url, f"SELECT * FROM {t} ORDER BY 1, 2") for t in ("songs", "song_instruments",
                                                                          "rejected_files", "similar_songs")}
    counts, _ = run_job(spark, "--input", corpus, "--database-url", url, "--run-id", "edge-1")
    after = {t: query(url, f"SELECT * FROM {t} ORDER BY 1, 2") for t in before}
    assert after == before
    assert counts["rows_written"] == 0
    # The same run id replaces its row rather than adding one.
    assert query(url, "SELECT run_id, status FROM runs") == [("edge-1", "succeeded")]


def test_an_empty_input_fails_the_run_and_keeps_the_tables(filled, spark, tmp_path):
    url, _ = filled
    songs = query(url, "SELECT count(*) FROM songs")
    with pytest.raises(RuntimeError, match="no files"):
        run_job(spark, "--input", tmp_path, "--database-url", url, "--run-id", "empty-input")
    assert query(url, "SELECT count(*) FROM songs") == songs
    assert query(url, "SELECT status FROM runs WHERE run_id = 'empty-input'") == [("failed",)]
