"""PostgreSQL side of the midi batch job: migrations, the run's row, the executors'
staging copies and the merge that makes a run's results the tables' contents.

Every statement takes its values as parameters; no SQL is built from data. The
password comes from PGPASSWORD (libpq reads it), never from the command line.
"""

import logging
from pathlib import Path

import psycopg

log = logging.getLogger("midi_batch")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"

# Any constant works; it only has to be the same for every run of this job.
MIGRATION_LOCK = 0x5CA1E


def connect(database_url: str) -> psycopg.Connection:
    return psycopg.connect(database_url, application_name="midi-batch")


def migrate(database_url: str) -> list:
    """Applies the migrations not yet applied, in name order; returns their names.

    An advisory lock keeps two runs starting at once from applying the same file twice.
    """
    applied_now = []
    with connect(database_url) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            conn.commit()
            done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
            for path in sorted(MIGRATIONS.glob("*.sql")):
                if path.name in done:
                    continue
                with conn.transaction():
                    conn.execute(path.read_text(encoding="utf-8"))
                    conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (path.name,))
                applied_now.append(path.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
            conn.commit()
    return applied_now


def start_run(database_url: str, run_id: str, input_path: str, threshold: float, min_instruments: int):
    """Records the run as running. A retried driver with the same run id starts its
    row afresh and clears what its earlier attempt staged."""
    with connect(database_url) as conn, conn.transaction():
        conn.execute(
            "INSERT INTO runs (run_id, started_at, status, input, threshold, min_instruments)"
            " VALUES (%(run)s, now(), 'running', %(input)s, %(threshold)s, %(min)s)"
            " ON CONFLICT (run_id) DO UPDATE SET started_at = now(), finished_at = NULL,"
            "  status = 'running', files_read = NULL, files_rejected = NULL, songs = NULL,"
            "  pairs = NULL, rows_written = NULL, error = NULL, input = EXCLUDED.input,"
            "  threshold = EXCLUDED.threshold, min_instruments = EXCLUDED.min_instruments",
            {"run": run_id, "input": input_path, "threshold": threshold, "min": min_instruments},
        )
        _clear_stage(conn, run_id)


def finish_run(database_url: str, run_id: str, counts: dict):
    with connect(database_url) as conn, conn.transaction():
        conn.execute(
            "UPDATE runs SET finished_at = now(), status = 'succeeded',"
            " files_read = %(files_read)s, files_rejected = %(files_rejected)s,"
            " songs = %(songs)s, pairs = %(pairs)s, rows_written = %(rows_written)s"
            " WHERE run_id = %(run)s",
            {"run": run_id, **counts},
        )


def fail_run(database_url: str, run_id: str, error: str):
    with connect(database_url) as conn, conn.transaction():
        conn.execute(
            "UPDATE runs SET finished_at = now(), status = 'failed', error = %s WHERE run_id = %s",
            (error[:2000], run_id),
        )
        _clear_stage(conn, run_id)


# Staging: called on the executors, once per partition.

STAGE_COLUMNS = {
    "stage_songs": ("run_id", "song_id", "path", "md5"),
    "stage_song_instruments": ("run_id", "song_id", "instrument"),
    "stage_similar_songs": ("run_id", "song_a", "song_b", "jaccard", "shared", "union_size"),
    "stage_rejected_files": ("run_id", "path", "reason"),
}


def stage_rows(database_url: str, rows_by_table: dict) -> None:
    """COPYs rows into staging tables in one transaction. A Spark task retried after
    its first attempt committed stages its rows twice; the merge reads DISTINCT rows."""
    if not any(rows_by_table.values()):
        return
    with connect(database_url) as conn, conn.transaction(), conn.cursor() as cur:
        for table, rows in rows_by_table.items():
            if not rows:
                continue
            columns = STAGE_COLUMNS[table]  # a fixed name from the dict, never from data
            with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)


# The merge: one transaction, so the viewer sees the previous run's tables or this one's.

MERGE_STATEMENTS = [
    # Songs no longer in the input go, and their instruments and pairs with them.
    """DELETE FROM songs s WHERE NOT EXISTS
         (SELECT 1 FROM stage_songs t WHERE t.run_id = %(run)s AND t.song_id = s.song_id)""",
    """INSERT INTO songs (song_id, path, md5)
         SELECT DISTINCT song_id, path, md5 FROM stage_songs WHERE run_id = %(run)s
       ON CONFLICT (song_id) DO UPDATE SET path = EXCLUDED.path, md5 = EXCLUDED.md5
         WHERE (songs.path, songs.md5) IS DISTINCT FROM (EXCLUDED.path, EXCLUDED.md5)""",
    """DELETE FROM song_instruments s WHERE NOT EXISTS
         (SELECT 1 FROM stage_song_instruments t
           WHERE t.run_id = %(run)s AND t.song_id = s.song_id AND t.instrument = s.instrument)""",
    """INSERT INTO song_instruments (song_id, instrument)
         SELECT DISTINCT song_id, instrument FROM stage_song_instruments WHERE run_id = %(run)s
       ON CONFLICT DO NOTHING""",
    """DELETE FROM similar_songs s WHERE NOT EXISTS
         (SELECT 1 FROM stage_similar_songs t
           WHERE t.run_id = %(run)s AND t.song_a = s.song_a AND t.song_b = s.song_b)""",
    """INSERT INTO similar_songs (song_a, song_b, jaccard, shared, union_size)
         SELECT DISTINCT song_a, song_b, jaccard, shared, union_size
           FROM stage_similar_songs WHERE run_id = %(run)s
       ON CONFLICT (song_a, song_b) DO UPDATE
         SET jaccard = EXCLUDED.jaccard, shared = EXCLUDED.shared, union_size = EXCLUDED.union_size
         WHERE (similar_songs.jaccard, similar_songs.shared, similar_songs.union_size)
               IS DISTINCT FROM (EXCLUDED.jaccard, EXCLUDED.shared, EXCLUDED.union_size)""",
    """DELETE FROM rejected_files r WHERE NOT EXISTS
         (SELECT 1 FROM stage_rejected_files t WHERE t.run_id = %(run)s AND t.path = r.path)""",
    """INSERT INTO rejected_files (path, reason)
         SELECT DISTINCT ON (path) path, reason FROM stage_rejected_files
          WHERE run_id = %(run)s ORDER BY path, reason
       ON CONFLICT (path) DO UPDATE SET reason = EXCLUDED.reason
         WHERE rejected_files.reason IS DISTINCT FROM EXCLUDED.reason""",
]


def merge(database_url: str, run_id: str) -> int:
    """Makes the run's staged rows the tables' contents; returns the rows changed.

    Only differences are written, so a rerun over the same input writes no row."""
    written = 0
    with connect(database_url) as conn, conn.transaction():
        # Two runs merging at once would each delete what the other inserts.
        conn.execute("LOCK TABLE songs, song_instruments, similar_songs, rejected_files IN EXCLUSIVE MODE")
        for statement in MERGE_STATEMENTS:
            written += conn.execute(statement, {"run": run_id}).rowcount
        _clear_stage(conn, run_id)
    return written


def _clear_stage(conn, run_id: str):
    for table in STAGE_COLUMNS:
        conn.execute(f"DELETE FROM {table} WHERE run_id = %s", (run_id,))
