"""moto's S3 server on :9000 with BUCKET holding every file under /seed at PREFIX.

The objects live in memory, so each start uploads them again; the pod reports Ready
(by the file /tmp/seeded) only once all are there, so that a batch run that waits for
the revision's health never reads a partial bucket. The bucket and its objects are
public-read: the job reads them anonymously, so no credential is needed anywhere.
"""

import os
import pathlib
import signal

import boto3
from moto.server import ThreadedMotoServer

SEED = pathlib.Path(os.environ.get("SEED_DIR", "/seed"))
BUCKET = os.environ.get("BUCKET", "midi")
PREFIX = os.environ.get("PREFIX", "songs/")


def main():
    server = ThreadedMotoServer(ip_address="0.0.0.0", port=9000)
    server.start()
    # moto checks no signature; the SDK still wants a key to sign with.
    s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:9000", region_name="us-east-1",
                      aws_access_key_id="local", aws_secret_access_key="local")
    s3.create_bucket(Bucket=BUCKET, ACL="public-read")
    count = 0
    for path in sorted(SEED.rglob("*")):
        if path.is_file():
            key = PREFIX + path.relative_to(SEED).as_posix()
            s3.upload_file(str(path), BUCKET, key, ExtraArgs={"ACL": "public-read"})
            count += 1
    print(f"s3://{BUCKET}/{PREFIX}: {count} files from {SEED}", flush=True)
    pathlib.Path("/tmp/seeded").touch()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop()


if __name__ == "__main__":
    main()
