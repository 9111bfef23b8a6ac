"""The pipeline as a user runs it: `spark-submit --master local[2]` of the job with the
contract's command line over a generated corpus, then the viewer over the database it
filled, through Flask's test client and through gunicorn on a real socket."""

import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pyspark
import pytest

import midigen
from conftest import MEASURED, SCALE, free_port, query

THRESHOLD = 0.5
MIN_INSTRUMENTS = 3
SPARK_SUBMIT = Path(pyspark.__file__).parent / "bin" / "spark-submit"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("submit-corpus")
    known = midigen.random_corpus(root, 120, seed=11)
    (root / "broken" / "noise.mid").parent.mkdir()
    (root / "broken" / "noise.mid").write_bytes(b"RIFF" + os.urandom(300))
    return root, known


@pytest.fixture(scope="module")
def submitted(postgres, corpus):
    """The database after one spark-submit run, and that run's output."""
    root, _ = corpus
    url = postgres.create_database("submitted")
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    command = [str(SPARK_SUBMIT), "--master", "local[2]", "--conf", "spark.ui.enabled=false",
               str(SCALE / "batch" / "midi_batch.py"), "--input", str(root), "--database-url", url,
               "--threshold", str(THRESHOLD), "--min-instruments", str(MIN_INSTRUMENTS)]
    started = time.monotonic()
    # spark-submit runs the Python driver with its stderr merged into its stdout.
    job = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    MEASURED["spark-submit --master local[2], 121 files, JVM start included"] = f"{time.monotonic() - started:.1f} s"
    assert job.returncode == 0, job.stdout[-5000:]
    return url, job.stdout


def test_spark_submit_fills_the_tables_and_logs_its_progress(submitted, corpus):
    url, log = submitted
    _, known = corpus
    progress = [line for line in log.splitlines() if " midi_batch: " in line]
    assert any(line.endswith("read 121 files: 120 songs, 1 rejected") for line in progress), progress
    assert " succeeded in " in progress[-1], progress
    assert postgres_password_not_in(log)
    [run] = query(url, "SELECT status, files_read, files_rejected, songs, pairs FROM runs")
    expected_pairs = midigen.exact_similar_pairs(known, THRESHOLD, MIN_INSTRUMENTS)
    assert run[:4] == ("succeeded", 121, 1, 120)
    assert run[4] == len(expected_pairs)
    assert query(url, "SELECT path, reason FROM rejected_files") == [
        ("broken/noise.mid", "not a MIDI file: no MThd header")]


def postgres_password_not_in(text):
    return os.environ["PGPASSWORD"] not in text


# The viewer over the filled database.

@pytest.fixture(scope="module")
def client(submitted):
    import app as viewer

    url, _ = submitted
    application = viewer.create_app(url)
    yield application.test_client()
    application.extensions["scale_pool"].close()


@pytest.fixture(scope="module")
def ids(submitted):
    url, _ = submitted
    return dict(query(url, "SELECT path, song_id FROM songs"))


@pytest.fixture(scope="module")
def names(submitted):
    url, _ = submitted
    return dict(query(url, "SELECT instrument, name FROM instruments"))


def similar_of(path, known):
    """{other path: jaccard} for a song, by brute force over the generated sets."""
    pairs = midigen.exact_similar_pairs(known, THRESHOLD, MIN_INSTRUMENTS)
    return {(b if a == path else a): j for (a, b), j in pairs.items() if path in (a, b)}


def most_connected(known):
    return max(sorted(known), key=lambda p: len(similar_of(p, known)))


def test_the_json_of_a_known_songs_similar_songs(client, corpus, ids):
    _, known = corpus
    song = most_connected(known)
    expected = similar_of(song, known)
    assert len(expected) >= 5
    answer = client.get(f"/api/songs/{ids[song]}/similar?limit=200")
    assert answer.status_code == 200
    body = answer.get_json()
    assert body["song"]["path"] == song
    assert set(body["song"]["instruments"]) == known[song]
    got = {row["path"]: row["jaccard"] for row in body["similar"]}
    assert got == expected
    scores = [row["jaccard"] for row in body["similar"]]
    assert scores == sorted(scores, reverse=True)
    for row in body["similar"]:
        assert set(row["shared"]) == known[song] & known[row["path"]]
        assert row["song_id"] == ids[row["path"]]


class SimilarTable(html.parser.HTMLParser):
    """The rows of the song page's similar-songs table: link text, score text, and which
    instrument names are highlighted (<mark>) or not."""

    def __init__(self):
        super().__init__()
        self.rows, self.inside, self.tag = [], False, None

    def handle_starttag(self, tag, attrs):
        if tag == "table" and ("id", "similar") in attrs:
            self.inside = True
        elif self.inside and tag == "tr":
            self.rows.append({"song": "", "score": "", "marked": [], "plain": [], "cell": -1})
        elif self.inside and tag == "td":
            self.rows[-1]["cell"] += 1
        self.tag = tag

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False
        self.tag = None

    def handle_data(self, data):
        if not self.inside or not self.rows or not data.strip():
            return
        row = self.rows[-1]
        if row["cell"] == 0:
            row["song"] += data.strip()
        elif row["cell"] == 1:
            row["score"] += data.strip()
        elif row["cell"] == 2:
            row["marked" if self.tag == "mark" else "plain"].append(data.strip())


def test_the_song_page_shows_scores_and_highlights_shared_instruments(client, corpus, ids, names):
    _, known = corpus
    song = most_connected(known)
    page = client.get(f"/songs/{ids[song]}?limit=200")
    assert page.status_code == 200
    text = page.get_data(as_text=True)
    assert f"<h1>{song}</h1>" in text
    table = SimilarTable()
    table.feed(text)
    rows = [r for r in table.rows if r["cell"] >= 0]
    expected = similar_of(song, known)
    assert {r["song"] for r in rows} == set(expected)
    for row in rows:
        other = known[row["song"]]
        assert row["score"] == f"{expected[row['song']] * 100:.0f}%"
        assert sorted(row["marked"]) == sorted(names[i] for i in other & known[song])
        assert sorted(row["plain"]) == sorted(names[i] for i in other - known[song])


def test_picking_instruments_lists_the_songs_that_use_them_all(client, corpus):
    _, known = corpus
    for chosen in (["drums"], ["0", "33"], ["24", "drums", "65"]):
        expected = sorted(p for p, s in known.items() if set(chosen) <= s)
        query_string = "&".join(f"instrument={i}" for i in chosen)
        body = client.get(f"/api/songs?{query_string}").get_json()
        assert body["total"] == len(expected)
        pages = [body]
        while pages[-1]["total"] > pages[-1]["page"] * pages[-1]["page_size"]:
            pages.append(client.get(f"/api/songs?{query_string}&page={pages[-1]['page'] + 1}").get_json())
        assert [s["path"] for p in pages for s in p["songs"]] == expected
        page = client.get(f"/?{query_string}").get_data(as_text=True)
        assert f"{len(expected)} songs using all of them" in page
        for path in expected[:50]:
            assert f">{path}</a>" in page


def test_the_instrument_list_counts_songs(client, corpus):
    _, known = corpus
    body = client.get("/api/instruments").get_json()
    counts = {row["instrument"]: row["songs"] for row in body["instruments"]}
    assert len(counts) == 129
    for instrument, n in counts.items():
        assert n == sum(instrument in s for s in known.values()), instrument
    page = client.get("/").get_data(as_text=True)
    assert "Acoustic Grand Piano" in page and 'value="drums"' in page


def snapshot(url):
    tables = ("songs", "song_instruments", "similar_songs", "rejected_files", "instruments", "runs")
    return {t: query(url, f"SELECT * FROM {t} ORDER BY 1, 2") for t in tables}


INJECTIONS = ["0' OR '1'='1", "0; DROP TABLE songs; --", "drums'--", "1 OR 1=1", "-1", "1e3", "",
              "99999999999999999999", "0x10", "<script>alert(1)</script>", "٣", "1\x00"]
OUT_OF_RANGE = {"instrument": ["128", "Drums"], "page": ["0", "10001"], "limit": ["0", "201"]}


def test_injection_in_every_parameter_is_a_clean_4xx_and_changes_nothing(client, submitted, ids):
    url, _ = submitted
    song_id = next(iter(ids.values()))
    before = snapshot(url)
    attempts = []
    for parameter, extra in OUT_OF_RANGE.items():
        for bad in INJECTIONS + extra:
            q = urllib.parse.quote(bad)
            attempts += {
                "instrument": [f"/?instrument={q}", f"/api/songs?instrument={q}",
                               f"/api/songs?instrument=0&instrument={q}"],
                "page": [f"/api/songs?instrument=0&page={q}", f"/?instrument=0&page={q}"],
                "limit": [f"/songs/{song_id}?limit={q}", f"/api/songs/{song_id}/similar?limit={q}"],
            }[parameter]
    for bad in INJECTIONS:
        q = urllib.parse.quote(bad, safe="")
        attempts += [f"/songs/{q}", f"/api/songs/{q}", f"/api/songs/{q}/similar"]
    for attempt in attempts:
        answer = client.get(attempt)
        assert 400 <= answer.status_code < 500, (attempt, answer.status_code)
        if attempt.startswith("/api/"):
            assert answer.get_json()["error"], attempt
        assert "<script>" not in answer.get_data(as_text=True), attempt
    assert snapshot(url) == before


def test_health_and_metrics(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    client.get("/api/songs?instrument=nope")
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'scale_viewer_requests_total{endpoint="/api/songs",method="GET",status="400"}' in metrics
    assert "scale_viewer_request_duration_seconds_bucket" in metrics


def test_the_viewer_serves_under_gunicorn_as_in_its_image(submitted, ids):
    url, _ = submitted
    gunicorn = shutil.which("gunicorn") or pytest.fail("gunicorn is not installed (requirements-viewer.txt)")
    port = free_port()
    server = subprocess.Popen(
        [gunicorn, "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "4", "app:create_app()"],
        cwd=SCALE / "viewer", env={**os.environ, "DATABASE_URL": url},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as answer:
                    assert answer.status == 200
                    break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()
                assert time.monotonic() < deadline, "gunicorn did not answer within 30 s"
                time.sleep(0.2)
        song_id = next(iter(ids.values()))
        with urllib.request.urlopen(f"{base}/songs/{song_id}", timeout=5) as answer:
            assert answer.status == 200 and b"Similar songs" in answer.read()
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as answer:
            assert b'endpoint="/songs/<int:song_id>"' in answer.read()
    finally:
        server.terminate()
        server.wait(timeout=10)


DASHBOARDS = SCALE.parent.parent / "dashboards"


def grafana_sql(raw):
    """A panel's SQL as Grafana's PostgreSQL data source sends it for the last day."""
    expanded = re.sub(r"\$__timeFilter\((\w+)\)", r"\1 BETWEEN now() - interval '1 day' AND now() + interval '1 hour'",
                      raw)
    assert "$" not in expanded, f"a Grafana macro this test does not expand: {raw}"
    return expanded


def panels(panel_list):
    for panel in panel_list:
        yield panel
        yield from panels(panel.get("panels", []))


def test_every_sql_panel_of_the_dashboards_finds_the_jobs_rows(submitted):
    url, _ = submitted
    checked = 0
    for path in sorted(DASHBOARDS.rglob("*.json")):
        for panel in panels(json.loads(path.read_text())["panels"]):
            for target in panel.get("targets", []):
                if "rawSql" in target:
                    rows = query(url, grafana_sql(target["rawSql"]))
                    assert rows, f"{path.name}: panel {panel['title']!r} finds no rows after a run"
                    checked += 1
    assert checked >= 3, "the pipeline dashboard reads the runs table"
