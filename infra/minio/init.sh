#!/bin/sh
# Create the registry's bucket in MinIO; safe to run again.
set -eu
mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing "local/$BUCKET"
mc anonymous set none "local/$BUCKET"
echo "bucket $BUCKET ready"
