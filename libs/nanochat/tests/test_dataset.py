"""nanochat.dataset: the shard downloader against a local HTTP server, splits, strided row groups."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from nanochat.dataset import BASE_URL, download_shards, iter_documents, iter_row_groups, shard_name, split_shards


def write_shard(path, docs, row_group_size):
    pq.write_table(pa.table({"text": docs}), path, row_group_size=row_group_size)


class Server:
    """Serves files from a dict; can fail a path N times (503) or cut its body short once."""

    def __init__(self, files):
        self.files, self.fail, self.truncate, self.requests = files, {}, set(), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append((name, self.headers.get("Range")))
                if server.fail.get(name, 0) > 0:
                    server.fail[name] -= 1
                    self.send_error(503)
                    return
                if name not in server.files:
                    self.send_error(404)
                    return
                body, status = server.files[name], 200
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                    body, status = body[start:], 206
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in server.truncate:
                    server.truncate.discard(name)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path):
    files = {}
    for i in (0, 1, 2, 1822):
        path = tmp_path / f"src-{i}.parquet"
        write_shard(path, [f"doc {i}-{j} " * 20 for j in range(30)], 10)
        files[shard_name(i)] = path.read_bytes()
    server = Server(files)
    yield server
    server.close()


def test_real_url_layout():
    assert BASE_URL == "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
    assert shard_name(1822) == "shard_01822.parquet"


def test_download_retries_resumes_and_skips(tmp_path, served):
    served.fail[shard_name(1)] = 2
    served.truncate.add(shard_name(2))
    dest = tmp_path / "data"
    paths = download_shards([0, 1, 2, 1822], dest, base_url=served.url, workers=4, backoff=0.01)
    for path in paths:
        assert path.read_bytes() == served.files[path.name]
    assert not list(dest.glob("*.part"))
    assert [r for r in served.requests if r[0] == shard_name(1)].count((shard_name(1), None)) == 3
    resumed = [rng for name, rng in served.requests if name == shard_name(2) and rng]
    assert resumed and resumed[0].startswith("bytes=")
    served.requests.clear()
    download_shards([0, 1822], dest, base_url=served.url, backoff=0.01)
    assert served.requests == []
    assert [p.name for p in split_shards(dest, "val")] == [shard_name(1822)]
    assert len(split_shards(dest, "train")) == 3


def test_download_gives_up_with_a_clear_error(tmp_path, served):
    served.fail[shard_name(0)] = 10
    with pytest.raises(OSError, match="shard_00000.parquet"):
        download_shards([0], tmp_path, base_url=served.url, retries=3, backoff=0.01)
    with pytest.raises(OSError, match="HTTP 404"):
        download_shards([5], tmp_path, base_url=served.url, retries=3, backoff=0.01)
    assert not (tmp_path / shard_name(0)).exists()


def test_row_groups_are_strided_by_rank_and_resumable(tmp_path):
    for s in range(3):
        write_shard(tmp_path / shard_name(s), [f"s{s}d{j}" for j in range(25)], 10)  # groups of 10, 10, 5
    train = [d for d in iter_documents(tmp_path, "train")]
    assert train == [f"s{s}d{j}" for s in range(2) for j in range(25)]
    by_rank = [[docs[0] for docs, _ in iter_row_groups(tmp_path, "train", r, 2)] for r in range(2)]
    assert by_rank == [["s0d0", "s0d20", "s1d0", "s1d20"], ["s0d10", "s1d10"]]
    steps = list(iter_row_groups(tmp_path, "train", 0, 2))
    resumed = [docs[0] for docs, _ in iter_row_groups(tmp_path, "train", 0, 2, start=steps[1][1])]
    assert resumed == ["s1d0", "s1d20"]
    looped = iter_row_groups(tmp_path, "train", 1, 2, loop=True)
    assert [next(looped)[0][0] for _ in range(3)] == ["s0d10", "s1d10", "s0d10"]
    with pytest.raises(ValueError, match="not read by rank"):
        next(iter_row_groups(tmp_path, "train", 1, 2, start=(0, 2)))


def test_a_rank_without_row_groups_is_a_clear_error(tmp_path):
    for s in range(2):
        write_shard(tmp_path / shard_name(s), ["a", "b"], 10)
    with pytest.raises(ValueError, match="at least 2 row groups"):
        next(iter_row_groups(tmp_path, "val", 1, 2))


def test_missing_data_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_data"):
        split_shards(tmp_path, "train")
