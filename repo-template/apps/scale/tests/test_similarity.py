"""Similar songs on a few hundred generated songs, at the job's default settings:
MinHash LSH must find (nearly) every pair the exact Jaccard says is similar, and every
score stored must be that exact Jaccard."""

import shutil

import pytest

import midigen
from conftest import MEASURED, query, run_job

THRESHOLD = 0.5
MIN_INSTRUMENTS = 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("similarity-corpus")
    return root, midigen.random_corpus(root, 300, seed=7)


@pytest.fixture(scope="module")
def filled(postgres, spark, corpus):
    root, _ = corpus
    url = postgres.create_database("similarity")
    counts, seconds = run_job(spark, "--input", root, "--database-url", url, "--threshold", THRESHOLD,
                              "--min-instruments", MIN_INSTRUMENTS, "--run-id", "similarity-1")
    MEASURED["job time, 300 songs (local[2], session already started)"] = f"{seconds:.1f} s"
    return url, counts


def stored_pairs(url):
    rows = query(url, "SELECT a.path, b.path, p.jaccard FROM similar_songs p"
                      " JOIN songs a ON a.song_id = p.song_a JOIN songs b ON b.song_id = p.song_b")
    return {tuple(sorted((a, b))): jaccard for a, b, jaccard in rows}


def test_minhash_finds_the_exact_pairs_above_the_threshold(filled, corpus):
    url, _ = filled
    _, known = corpus
    expected = midigen.exact_similar_pairs(known, THRESHOLD, MIN_INSTRUMENTS)
    found = stored_pairs(url)
    recall = len(expected.keys() & found.keys()) / len(expected)
    MEASURED["recall at the default settings"] = f"{recall:.4f} ({len(found)} of {len(expected)} exact pairs)"
    print(f"recall {recall:.4f}: {len(found)} of {len(expected)} pairs")
    assert len(expected) > 1000, "the corpus should have many similar pairs to measure recall on"
    assert recall >= 0.95
    assert found.keys() <= expected.keys(), "a stored pair is below the threshold"


def test_every_score_is_the_exact_jaccard(filled, corpus):
    url, _ = filled
    _, known = corpus
    for (a, b), score in stored_pairs(url).items():
        assert score == midigen.jaccard(known[a], known[b]), (a, b)


def test_songs_with_too_few_instruments_have_no_pairs(filled, corpus):
    url, _ = filled
    _, known = corpus
    small = {path for path, instruments in known.items() if len(instruments) < MIN_INSTRUMENTS}
    assert small, "the corpus should have songs below the minimum"
    assert not {p for pair in stored_pairs(url) for p in pair} & small
    # ...but they are songs all the same.
    assert small <= {path for (path,) in query(url, "SELECT path FROM songs")}


def test_pairs_are_stored_once_in_id_order(filled):
    url, counts = filled
    assert query(url, "SELECT count(*) FROM similar_songs WHERE song_a >= song_b") == [(0,)]
    assert query(url, "SELECT count(*) FROM similar_songs")[0][0] == counts["pairs"]


CORE_TABLES = {"songs": "song_id", "song_instruments": "song_id, instrument",
               "similar_songs": "song_a, song_b", "rejected_files": "path", "instruments": "instrument"}


def snapshot(url):
    return {table: query(url, f"SELECT * FROM {table} ORDER BY {order}") for table, order in CORE_TABLES.items()}


def test_running_twice_gives_identical_tables(filled, spark, corpus):
    url, _ = filled
    root, _ = corpus
    before = snapshot(url)
    counts, _ = run_job(spark, "--input", root, "--database-url", url, "--threshold", THRESHOLD,
                        "--min-instruments", MIN_INSTRUMENTS)
    assert snapshot(url) == before
    assert counts["rows_written"] == 0
    runs = query(url, "SELECT status, songs, pairs FROM runs ORDER BY started_at")
    assert runs == [("succeeded", 300, counts["pairs"])] * 2


def test_a_song_removed_from_the_input_leaves_the_tables(filled, spark, corpus, tmp_path):
    url, _ = filled
    root, known = corpus
    copy = tmp_path / "corpus"
    shutil.copytree(root, copy)
    gone = next(p for p, s in sorted(known.items()) if len(s) >= MIN_INSTRUMENTS
                and any(p in pair for pair in stored_pairs(url)))
    (copy / gone).unlink()
    run_job(spark, "--input", copy, "--database-url", url, "--run-id", "similarity-removed")
    assert query(url, "SELECT count(*) FROM songs WHERE path = %s", (gone,)) == [(0,)]
    assert not any(gone in pair for pair in stored_pairs(url))
    remaining = {p: s for p, s in known.items() if p != gone}
    assert set(stored_pairs(url)) <= set(midigen.exact_similar_pairs(remaining, THRESHOLD, MIN_INSTRUMENTS))
