#!/bin/sh
# One-shot MinIO setup for docker-compose.yml (runs in the minio/mc image, then exits 0).
# Idempotent: safe on every `docker compose up`.
#
# - creates the bucket MINIO_BUCKET, private (no anonymous access: workers hand out presigned URLs),
#   with its lifecycle rules: left-over checkpoints expire after a day, and videos and input images
#   after RENDER_RETENTION_DAYS when it is set;
# - creates the workers' own MinIO user MINIO_ACCESS_KEY / MINIO_SECRET_KEY with a policy limited
#   to that bucket, so the root credentials never leave the minio and minio-init containers.
set -eu

: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${MINIO_ACCESS_KEY:?}" "${MINIO_SECRET_KEY:?}"
bucket="${MINIO_BUCKET:-renders}"
mc alias set farm http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "farm/$bucket"
mc anonymous set none "farm/$bucket"

# Lifecycle: checkpoints left behind under checkpoints/ (a render that failed for good or was
# cancelled; the workers delete the others when the video is stored) expire after a day; videos
# under renders/ and conditioning images under inputs/ expire RENDER_RETENTION_DAYS after they were
# stored (0: kept). The rules are the bucket's whole lifecycle, imported again on every run
# (idempotent); workers whose key may set lifecycle rules merge the same ones into the bucket's.
days="${RENDER_RETENTION_DAYS:-0}"
rules='{"ID": "renderfarm-checkpoints", "Status": "Enabled", "Filter": {"Prefix": "checkpoints/"}, "Expiration": {"Days": 1}}'
if [ "$days" -gt 0 ]; then
    rules="$rules$(printf ', {"ID": "renderfarm-retention", "Status": "Enabled", "Filter": {"Prefix": "renders/"}, "Expiration": {"Days": %d}}, {"ID": "renderfarm-retention-inputs", "Status": "Enabled", "Filter": {"Prefix": "inputs/"}, "Expiration": {"Days": %d}}' "$days" "$days")"
    echo "minio-init: videos and input images in $bucket expire after $days days"
fi
printf '{"Rules": [%s]}\n' "$rules" | mc ilm import "farm/$bucket"
echo "minio-init: checkpoints left in $bucket/checkpoints/ expire after 1 day"

if [ "$MINIO_ACCESS_KEY" = "$MINIO_ROOT_USER" ]; then
    echo "minio-init: workers use the root user (MINIO_ACCESS_KEY = MINIO_ROOT_USER); no bucket-scoped user created"
    exit 0
fi

policy="/tmp/renderfarm-$bucket.json"
cat >"$policy" <<EOF
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow",
     "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
     "Resource": ["arn:aws:s3:::$bucket"]},
    {"Effect": "Allow",
     "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
     "Resource": ["arn:aws:s3:::$bucket/*"]}
  ]
}
EOF
mc admin user add farm "$MINIO_ACCESS_KEY" "$MINIO_SECRET_KEY"
mc admin policy create farm "renderfarm-$bucket" "$policy"
# attach refuses a policy that is already attached, so check the outcome rather than its exit code.
mc admin policy attach farm "renderfarm-$bucket" --user "$MINIO_ACCESS_KEY" 2>/dev/null || true
if ! mc admin user info farm "$MINIO_ACCESS_KEY" | grep -q "renderfarm-$bucket"; then
    echo "minio-init: could not attach policy renderfarm-$bucket to $MINIO_ACCESS_KEY" >&2
    exit 1
fi
echo "minio-init: bucket $bucket ready; user $MINIO_ACCESS_KEY may read and write it"
