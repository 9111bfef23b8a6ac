"""The Scale viewer: pick instruments and see the songs that use them all; open a song
and see its similar songs, with the score and the instruments they share.

    DATABASE_URL=postgresql://USER@HOST:PORT/DB PGPASSWORD=… gunicorn 'app:create_app()'

Pages: /  and  /songs/<id>.  JSON: /api/instruments, /api/songs?instrument=…,
/api/songs/<id>, /api/songs/<id>/similar.  Operations: /healthz, /readyz, /metrics.

Every query takes its values as parameters, and every parameter is checked before any
query runs: a bad one gets a 400 (a missing song a 404) that says what was wrong.
"""

import os
import time

from flask import Flask, abort, g, jsonify, render_template, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from werkzeug.exceptions import HTTPException

PAGE_SIZE = 50
MAX_PAGE = 10_000
MAX_INSTRUMENTS = 8
MAX_SIMILAR = 200
INSTRUMENTS = {str(p) for p in range(128)} | {"drums"}


def create_app(database_url=None):
    app = Flask(__name__)
    database_url = database_url or os.environ.get("DATABASE_URL")
    if not database_url:
        raise RuntimeError("set DATABASE_URL (postgresql://USER@HOST:PORT/DB; the password in PGPASSWORD)")
    # Connects in the background: the process starts (and /healthz answers) while the
    # database is still down; /readyz says when queries can run. The statement timeout
    # keeps one slow query from holding a connection for long.
    pool = ConnectionPool(database_url, min_size=1, max_size=int(os.environ.get("DB_POOL_SIZE", "8")),
                          open=True, kwargs={"row_factory": dict_row, "application_name": "scale-viewer",
                                             "options": "-c statement_timeout=5s"})
    app.extensions["scale_pool"] = pool
    _metrics(app)

    def fetch(sql, params=(), wait=10):
        with pool.connection(timeout=wait) as conn:
            return conn.execute(sql, params).fetchall()

    @app.get("/")
    def index():
        chosen = _instruments_param()
        page = _int_param("page", 1, 1, MAX_PAGE)
        result = songs_with(fetch, chosen, page) if chosen else None
        return render_template("index.html", instruments=instrument_list(fetch), chosen=chosen,
                               result=result, page=page)

    @app.get("/songs/<int:song_id>")
    def song_page(song_id):
        limit = _int_param("limit", PAGE_SIZE, 1, MAX_SIMILAR)
        song = song_or_404(fetch, song_id)
        names = {row["instrument"]: row for row in instrument_list(fetch)}
        return render_template("song.html", song=song, similar=similar_to(fetch, song, limit), names=names)

    @app.get("/api/instruments")
    def api_instruments():
        return jsonify(instruments=instrument_list(fetch))

    @app.get("/api/songs")
    def api_songs():
        chosen = _instruments_param()
        if not chosen:
            _bad_request("give at least one instrument: ?instrument=0&instrument=drums")
        return jsonify(songs_with(fetch, chosen, _int_param("page", 1, 1, MAX_PAGE)))

    @app.get("/api/songs/<int:song_id>")
    def api_song(song_id):
        return jsonify(song_or_404(fetch, song_id))

    @app.get("/api/songs/<int:song_id>/similar")
    def api_similar(song_id):
        limit = _int_param("limit", PAGE_SIZE, 1, MAX_SIMILAR)
        song = song_or_404(fetch, song_id)
        return jsonify(song=song, similar=similar_to(fetch, song, limit))

    @app.get("/healthz")
    def healthz():
        return "ok\n", 200, {"Content-Type": "text/plain"}

    @app.get("/readyz")
    def readyz():
        try:
            fetch("SELECT 1", wait=2)
        except Exception as error:  # any database trouble means: send no traffic here
            return f"database unavailable: {type(error).__name__}\n", 503, {"Content-Type": "text/plain"}
        return "ok\n", 200, {"Content-Type": "text/plain"}

    @app.errorhandler(HTTPException)
    def http_error(error):
        if request.path.startswith("/api/"):
            return jsonify(error=error.description, status=error.code), error.code
        return render_template("error.html", error=error), error.code

    return app


# Queries. Each returns plain data, the same for the pages and the JSON. The SQL text
# is built only from the constants here; every value travels as a parameter.

def instrument_list(fetch):
    return fetch(
        "SELECT i.instrument, i.name, i.family, count(si.song_id) AS songs"
        " FROM instruments i LEFT JOIN song_instruments si USING (instrument)"
        " GROUP BY i.instrument ORDER BY i.sort_key"
    )


def songs_with(fetch, instruments, page):
    """Songs that use every one of the instruments, by path, a page at a time."""
    params = {"instruments": instruments, "n": len(instruments),
              "limit": PAGE_SIZE, "offset": (page - 1) * PAGE_SIZE}
    matching = ("SELECT song_id FROM song_instruments WHERE instrument = ANY(%(instruments)s)"
                " GROUP BY song_id HAVING count(*) = %(n)s")
    [total] = fetch(f"SELECT count(*) AS n FROM ({matching}) m", params)
    rows = fetch(
        f"SELECT s.song_id, s.path, {_INSTRUMENTS_OF_S} AS instruments"
        f" FROM songs s WHERE s.song_id IN ({matching})"
        " ORDER BY s.path LIMIT %(limit)s OFFSET %(offset)s",
        params,
    )
    return {"instruments": instruments, "page": page, "page_size": PAGE_SIZE, "total": total["n"], "songs": rows}


def song_or_404(fetch, song_id):
    if song_id >= 2**53:  # no song has such an id (see the job's song_id_of), nor fits a bigint
        abort(404, description=f"no song {song_id}")
    rows = fetch(f"SELECT s.song_id, s.path, s.md5, {_INSTRUMENTS_OF_S} AS instruments"
                 " FROM songs s WHERE s.song_id = %s", (song_id,))
    if not rows:
        abort(404, description=f"no song {song_id}")
    return rows[0]


def similar_to(fetch, song, limit):
    """The song's similar songs, most similar first, each with the instruments it
    shares with the song."""
    rows = fetch(
        f"SELECT s.song_id, s.path, p.jaccard, {_INSTRUMENTS_OF_S} AS instruments"
        " FROM (SELECT song_b AS other, jaccard FROM similar_songs WHERE song_a = %(id)s"
        "       UNION ALL"
        "       SELECT song_a, jaccard FROM similar_songs WHERE song_b = %(id)s) p"
        " JOIN songs s ON s.song_id = p.other"
        " ORDER BY p.jaccard DESC, s.path LIMIT %(limit)s",
        {"id": song["song_id"], "limit": limit},
    )
    mine = set(song["instruments"])
    for row in rows:
        row["shared"] = [i for i in row["instruments"] if i in mine]
    return rows


# A song's instruments in the reference table's order (programs, then drums).
_INSTRUMENTS_OF_S = ("ARRAY(SELECT si.instrument FROM song_instruments si JOIN instruments i USING (instrument)"
                     " WHERE si.song_id = s.song_id ORDER BY i.sort_key)")


# Parameters.

def _bad_request(message):
    abort(400, description=message)


def _int_param(name, default, low, high):
    values = request.args.getlist(name)
    if not values:
        return default
    if len(values) > 1 or not values[0].isascii() or not values[0].isdigit() or len(values[0]) > 9:
        _bad_request(f"{name} must be one whole number from {low} to {high}")
    value = int(values[0])
    if not low <= value <= high:
        _bad_request(f"{name} must be one whole number from {low} to {high}")
    return value


def _instruments_param():
    """?instrument=0&instrument=drums → ['0', 'drums'] (General MIDI program numbers
    0-127 or 'drums'), without repeats, in the order given."""
    values = request.args.getlist("instrument")
    chosen = []
    for value in values:
        if value not in INSTRUMENTS:
            _bad_request("instrument must be a General MIDI program number from 0 to 127, or drums")
        if value not in chosen:
            chosen.append(value)
    if len(chosen) > MAX_INSTRUMENTS:
        _bad_request(f"pick at most {MAX_INSTRUMENTS} instruments")
    return chosen


# Metrics: one registry per app, so tests can make several apps in one process.

def _metrics(app):
    registry = CollectorRegistry()
    requests = Counter("scale_viewer_requests_total", "HTTP requests answered",
                       ["endpoint", "method", "status"], registry=registry)
    duration = Histogram("scale_viewer_request_duration_seconds", "Time to answer a request",
                         ["endpoint"], registry=registry)

    @app.before_request
    def start_timer():
        g.started = time.perf_counter()

    @app.after_request
    def count(response):
        # The route's pattern, not the path: one series per endpoint, whatever the ids.
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        requests.labels(endpoint, request.method, str(response.status_code)).inc()
        duration.labels(endpoint).observe(time.perf_counter() - g.get("started", time.perf_counter()))
        return response

    @app.get("/metrics")
    def metrics():
        return generate_latest(registry), 200, {"Content-Type": CONTENT_TYPE_LATEST}
