#!/bin/bash
# The executor side of Spark's own image entrypoint (/opt/entrypoint.sh in apache/spark),
# for the `pip` flavour of this image: a driver started with `--master k8s://…` creates
# executor pods from this image with the argument `executor` and says in their
# environment where the driver is. Anything else runs as given.
set -euo pipefail

if [ "${1:-}" != executor ]; then
  exec "$@"
fi

# The driver passes the executor's JVM options one per variable, in order.
java_opts=()
while IFS= read -r opt; do
  java_opts+=("$opt")
done < <(env | grep '^SPARK_JAVA_OPT_' | sort -t_ -k4 -n | sed 's/^[^=]*=//')

exec java "${java_opts[@]}" \
  -Xms"$SPARK_EXECUTOR_MEMORY" -Xmx"$SPARK_EXECUTOR_MEMORY" \
  -cp "/opt/spark/conf:/opt/spark/jars/*" \
  org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend \
  --driver-url "$SPARK_DRIVER_URL" \
  --executor-id "$SPARK_EXECUTOR_ID" \
  --cores "$SPARK_EXECUTOR_CORES" \
  --app-id "$SPARK_APPLICATION_ID" \
  --hostname "$SPARK_EXECUTOR_POD_IP" \
  --resourceProfileId "${SPARK_RESOURCE_PROFILE_ID:-0}" \
  --podName "${SPARK_EXECUTOR_POD_NAME:-$HOSTNAME}"
