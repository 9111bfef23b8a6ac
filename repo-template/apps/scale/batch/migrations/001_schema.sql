-- The tables the viewer and the dashboards read (a contract: see design.md, "The Scale
-- batch job and its tables"). Every statement is safe to re-run.

CREATE TABLE IF NOT EXISTS instrument_families (
    family_id   smallint PRIMARY KEY,
    name        text NOT NULL UNIQUE
);

CREATE TABLE IF NOT EXISTS instruments (
    instrument  text PRIMARY KEY,          -- '0'..'127' (General MIDI program) or 'drums'
    name        text NOT NULL,
    family      text NOT NULL,
    -- Sorts programs numerically and drums last, for the viewer's lists.
    sort_key    smallint NOT NULL UNIQUE
);

CREATE TABLE IF NOT EXISTS songs (
    song_id     bigint PRIMARY KEY,        -- derived from path: stable across runs
    path        text NOT NULL UNIQUE,      -- relative to the job's --input
    md5         text NOT NULL
);

CREATE TABLE IF NOT EXISTS song_instruments (
    song_id     bigint NOT NULL REFERENCES songs ON DELETE CASCADE,
    instrument  text NOT NULL REFERENCES instruments,
    PRIMARY KEY (song_id, instrument)
);
-- "Songs that use instrument X" is the viewer's main question.
CREATE INDEX IF NOT EXISTS song_instruments_by_instrument ON song_instruments (instrument, song_id);

CREATE TABLE IF NOT EXISTS similar_songs (
    song_a      bigint NOT NULL REFERENCES songs ON DELETE CASCADE,
    song_b      bigint NOT NULL REFERENCES songs ON DELETE CASCADE,
    jaccard     double precision NOT NULL CHECK (jaccard > 0 AND jaccard <= 1),
    shared      smallint NOT NULL,         -- |A ∩ B|
    union_size  smallint NOT NULL,         -- |A ∪ B|; jaccard = shared / union_size
    PRIMARY KEY (song_a, song_b),
    CHECK (song_a < song_b)
);
CREATE INDEX IF NOT EXISTS similar_songs_by_b ON similar_songs (song_b, song_a);

CREATE TABLE IF NOT EXISTS rejected_files (
    path        text PRIMARY KEY,
    reason      text NOT NULL
);

CREATE TABLE IF NOT EXISTS runs (
    run_id          text PRIMARY KEY,
    started_at      timestamptz NOT NULL,
    finished_at     timestamptz,           -- NULL while running or after a crash
    files_read      integer,
    files_rejected  integer,
    songs           integer,
    pairs           integer,
    status          text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    rows_written    integer,               -- rows inserted, updated or deleted by the run
    input           text NOT NULL,
    threshold       double precision NOT NULL,
    min_instruments integer NOT NULL,
    error           text
);

-- Executors copy their results here, keyed by run; the driver then merges them into
-- the tables above in one transaction. UNLOGGED: a crash loses only a run's scratch.
CREATE UNLOGGED TABLE IF NOT EXISTS stage_songs (
    run_id text NOT NULL, song_id bigint NOT NULL, path text NOT NULL, md5 text NOT NULL
);
CREATE UNLOGGED TABLE IF NOT EXISTS stage_song_instruments (
    run_id text NOT NULL, song_id bigint NOT NULL, instrument text NOT NULL
);
CREATE UNLOGGED TABLE IF NOT EXISTS stage_similar_songs (
    run_id text NOT NULL, song_a bigint NOT NULL, song_b bigint NOT NULL,
    jaccard double precision NOT NULL, shared smallint NOT NULL, union_size smallint NOT NULL
);
CREATE UNLOGGED TABLE IF NOT EXISTS stage_rejected_files (
    run_id text NOT NULL, path text NOT NULL, reason text NOT NULL
);
CREATE INDEX IF NOT EXISTS stage_songs_run ON stage_songs (run_id);
CREATE INDEX IF NOT EXISTS stage_song_instruments_run ON stage_song_instruments (run_id);
CREATE INDEX IF NOT EXISTS stage_similar_songs_run ON stage_similar_songs (run_id);
CREATE INDEX IF NOT EXISTS stage_rejected_files_run ON stage_rejected_files (run_id);
