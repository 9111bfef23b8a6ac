"""The Scale midi batch job: which instruments each song plays, and which songs sound
alike, from a directory or S3 prefix of MIDI files into PostgreSQL.

    spark-submit midi_batch.py --input PATH|s3a://BUCKET/PREFIX \
        --database-url postgresql://USER@HOST:PORT/DB --threshold 0.5 --min-instruments 3

The password comes from PGPASSWORD; USER and DB may be left out of the URL, and libpq
then takes PGUSER and PGDATABASE from the environment (the Kubernetes manifests fill
all three from the Secret `scale-postgres`).

The steps, each logged with its counts:
1. migrate the schema and record the run as running in `runs`;
2. read every file under --input on the executors (Spark's binaryFile source) and
   extract each song's instrument set, or the reason it is rejected;
3. stage songs, instruments and rejected files from the executors into PostgreSQL;
4. find similar songs: MinHash LSH (Spark MLlib) proposes pairs, the exact Jaccard
   similarity of their instrument sets decides and is what gets stored;
5. merge the staged rows into the tables in one transaction (a rerun over the same
   input changes no row) and record the run's counts in `runs`.
"""

import argparse
import logging
import sys
import time
import urllib.parse
from fractions import Fraction
from pathlib import Path

from pyspark.ml.feature import MinHashLSH
from pyspark.ml.linalg import SparseVector, VectorUDT
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (ArrayType, LongType, StringType, StructField, StructType)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the modules beside this file, when run by spark-submit

import midi_instruments  # noqa: E402
import store  # noqa: E402

log = logging.getLogger("midi_batch")

VECTOR_SIZE = 129  # programs 0..127 and drums

EXTRACTED = StructType([
    StructField("path", StringType(), False),
    StructField("song_id", LongType(), True),
    StructField("md5", StringType(), True),
    StructField("instruments", ArrayType(StringType()), True),
    StructField("features", VectorUDT(), True),
    StructField("reason", StringType(), True),
])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="directory or s3a://BUCKET/PREFIX of MIDI files")
    parser.add_argument("--database-url", required=True, help="postgresql://USER@HOST:PORT/DB")
    parser.add_argument("--threshold", type=_fraction_0_1, default=Fraction(1, 2),
                        help="Jaccard distance: pairs with 1 - |A∩B|/|A∪B| <= this are similar")
    parser.add_argument("--min-instruments", type=int, default=3,
                        help="songs with fewer instruments take no part in similarity")
    parser.add_argument("--run-id", help="names this run in `runs`; a retry with the same id replaces it"
                        " (default: Spark's application id)")
    parser.add_argument("--num-hash-tables", type=int, default=10,
                        help="MinHash tables: more find more pairs near the threshold, at more cost")
    parser.add_argument("--seed", type=int, default=20240601, help="MinHash seed (fixed: reruns agree)")
    parser.add_argument("--partitions", type=int, default=0,
                        help="partitions of the file list (default: Spark's default parallelism x 4)")
    args = parser.parse_args(argv)
    if args.min_instruments < 1:
        parser.error("--min-instruments must be at least 1 (MinHash needs a non-empty set)")
    if args.num_hash_tables < 1:
        parser.error("--num-hash-tables must be at least 1")
    return args


def _fraction_0_1(text):
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError("must be at least 0 and below 1")
    return value


def main(argv=None):
    # Our own handler: importing pyspark has already configured the root logger.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    args = parse_args(argv)
    spark = SparkSession.builder.appName("midi-batch").getOrCreate()
    try:
        run(spark, args)
    finally:
        spark.stop()


def run(spark, args) -> dict:
    """Runs the job in an existing session; returns the counts written to `runs`."""
    started = time.monotonic()
    # The executors' Python workers import these to unpickle the functions they run.
    for module in ("midi_instruments.py", "store.py", "midi_batch.py"):
        spark.sparkContext.addPyFile(str(HERE / module))
    run_id = args.run_id or spark.sparkContext.applicationId
    url = args.database_url
    threshold = Fraction(args.threshold)

    log.info("run %s: input %s, threshold %s, min instruments %d", run_id, args.input,
             float(threshold), args.min_instruments)
    applied = store.migrate(url)
    log.info("migrations applied now: %s", ", ".join(applied) or "none (schema up to date)")
    store.start_run(url, run_id, args.input, float(threshold), args.min_instruments)
    try:
        counts = _run_steps(spark, args, run_id, threshold)
    except BaseException as error:
        log.error("run %s failed: %s", run_id, error)
        try:
            store.fail_run(url, run_id, f"{type(error).__name__}: {error}")
        except Exception as db_error:  # the database may be why it failed; keep the first error
            log.error("could not record the failure in runs: %s", db_error)
        raise
    store.finish_run(url, run_id, counts)
    log.info("run %s succeeded in %.1f s: %s", run_id, time.monotonic() - started, counts)
    return counts


def _run_steps(spark, args, run_id, threshold):
    url = args.database_url
    extracted = extract(spark, args.input, args.partitions).cache()

    counts_by_outcome = dict(
        extracted.groupBy(F.col("reason").isNull().alias("ok")).count().collect()
    )
    files_read = sum(counts_by_outcome.values())
    songs = counts_by_outcome.get(True, 0)
    rejected = counts_by_outcome.get(False, 0)
    if files_read == 0:
        # An empty or mistyped input would otherwise empty every table at the merge.
        raise RuntimeError(f"no files under {args.input}: refusing to replace the tables with nothing")
    log.info("read %d files: %d songs, %d rejected", files_read, songs, rejected)

    extracted.foreachPartition(_stage_extracted(url, run_id))
    log.info("staged songs, their instruments and the rejected files")

    pairs = similar_pairs(extracted, threshold, args.min_instruments, args.num_hash_tables, args.seed)
    pairs.foreachPartition(_stage_pairs(url, run_id))
    pair_count = pairs.count()
    log.info("found %d similar pairs (Jaccard distance <= %s)", pair_count, float(threshold))

    rows_written = store.merge(url, run_id)
    log.info("merged: %d rows inserted, updated or deleted", rows_written)
    extracted.unpersist()
    pairs.unpersist()
    return {"files_read": files_read, "files_rejected": rejected, "songs": songs,
            "pairs": pair_count, "rows_written": rows_written}


def extract(spark, input_path, partitions=0):
    """One row per file: its song id, md5 and instruments, or why it was rejected.

    The files' bytes stay on the executors that read them; only the small results move.
    """
    files = (spark.read.format("binaryFile")
             .option("recursiveFileLookup", "true")
             .load(input_path)
             .select("path", "content"))
    root = _qualified(spark, input_path)
    partitions = partitions or spark.sparkContext.defaultParallelism * 4
    rows = files.repartition(partitions).rdd.mapPartitions(lambda part: _extract_partition(part, root))
    extracted = spark.createDataFrame(rows, EXTRACTED)
    return extracted.unionByName(_empty_files(spark, files, root))


def _empty_files(spark, files, root):
    """Spark's file sources skip zero-length files without a word; they are rejected
    files all the same. The file index's listing (names only, which Spark lists on the
    driver anyway) minus the files read gives them."""
    listed = spark.createDataFrame([(_hadoop_path(uri),) for uri in files.inputFiles()], "path string")
    # Without the content column, binaryFile reads no file's bytes.
    empty = listed.join(files.select("path"), "path", "left_anti")
    rows = empty.rdd.map(lambda row: (_relative(row.path, root), None, None, None, None, "empty file"))
    return spark.createDataFrame(rows, EXTRACTED)


def _hadoop_path(uri):
    """inputFiles() gives URIs (file:///a%20b); the path column gives Hadoop's
    spelling of the same path (file:/a b)."""
    parts = urllib.parse.urlsplit(uri)
    authority = f"//{parts.netloc}" if parts.netloc else ""
    return f"{parts.scheme}:{authority}{urllib.parse.unquote(parts.path)}"


def _qualified(spark, input_path):
    """The input as Spark will spell the files' paths (file:/…, s3a://…), so each
    song's stored path can be made relative to it."""
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(input_path)
    fs = path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    return fs.makeQualified(path).toString().rstrip("/")


def _extract_partition(files, root):
    for file in files:
        path = _relative(file.path, root)
        data = bytes(file.content)
        try:
            instruments = midi_instruments.instruments_of(data)
        except midi_instruments.Rejected as reason:
            yield (path, None, None, None, None, str(reason))
            continue
        tokens = sorted(instruments, key=midi_instruments.instrument_index)
        indices = [midi_instruments.instrument_index(token) for token in tokens]
        features = SparseVector(VECTOR_SIZE, indices, [1.0] * len(indices))
        yield (path, midi_instruments.song_id_of(path), midi_instruments.md5_hex(data), tokens, features, None)


def _relative(path, root):
    if path == root:  # --input named a single file
        return path.rsplit("/", 1)[-1]
    if path.startswith(root + "/"):
        return path[len(root) + 1:]
    return path


def _stage_extracted(url, run_id):
    def stage(rows):
        songs, instruments, rejected = [], [], []
        for row in rows:
            if row.reason is not None:
                rejected.append((run_id, row.path, row.reason))
                continue
            songs.append((run_id, row.song_id, row.path, row.md5))
            instruments.extend((run_id, row.song_id, token) for token in row.instruments)
        store.stage_rows(url, {"stage_songs": songs, "stage_song_instruments": instruments,
                               "stage_rejected_files": rejected})
    return stage


def similar_pairs(extracted, threshold, min_instruments, num_hash_tables, seed):
    """Pairs (song_a < song_b) whose instrument sets' Jaccard distance is at most the
    threshold, with their exact similarity.

    MinHash LSH proposes candidates: a pair at similarity s shares a bucket in at least
    one of the L tables with probability 1 - (1 - s)^L. Each candidate's exact Jaccard
    is then computed from the two sets, in exact rational arithmetic, and decides.
    """
    eligible = (extracted
                .where(F.col("reason").isNull() & (F.size("instruments") >= min_instruments))
                .select("song_id", "instruments", "features"))
    model = MinHashLSH(inputCol="features", outputCol="hashes", numHashTables=num_hash_tables,
                       seed=seed).fit(eligible)
    # Spark keeps pairs strictly below its threshold; ours includes the threshold itself,
    # so ask for a little more and let the exact test below decide.
    candidates = (model.approxSimilarityJoin(eligible, eligible, float(threshold) + 1e-9, distCol="distance")
                  .where(F.col("datasetA.song_id") < F.col("datasetB.song_id"))
                  .select(F.col("datasetA.song_id").alias("song_a"), F.col("datasetA.instruments").alias("a"),
                          F.col("datasetB.song_id").alias("song_b"), F.col("datasetB.instruments").alias("b")))
    minimum_similarity = 1 - threshold

    def exact(rows):
        for row in rows:
            a, b = set(row.a), set(row.b)
            shared, union = len(a & b), len(a | b)
            if Fraction(shared, union) >= minimum_similarity:
                yield (row.song_a, row.song_b, shared / union, shared, union)

    schema = "song_a long, song_b long, jaccard double, shared int, union_size int"
    return extracted.sparkSession.createDataFrame(candidates.rdd.mapPartitions(exact), schema).cache()


def _stage_pairs(url, run_id):
    def stage(rows):
        store.stage_rows(url, {"stage_similar_songs": [(run_id, *row) for row in rows]})
    return stage


if __name__ == "__main__":
    main()
