import json

import pytest

from persrep.storage import MANIFEST, CorruptUnitError, Storage, StorageError, validate_root_uri


def _roundtrip(st: Storage):
    st.check_writable()
    assert not st.is_finished("gen", "k1")
    with st.unit_writer("gen", "k1", meta={"instance": "mug_0"}) as w:
        w.write("weights.safetensors", b"abc" * 100)
        w.write("sub/info.json", b"{}")
        # not yet published: readers must not see it
        assert not st.is_finished("gen", "k1")
        assert st.list_finished("gen") == []
    assert st.is_finished("gen", "k1")
    assert st.list_finished("gen") == ["k1"]
    man = st.verify_unit("gen", "k1")
    assert man.meta == {"instance": "mug_0"} and set(man.files) == {"weights.safetensors", "sub/info.json"}
    assert st.read_unit_file("gen", "k1", "weights.safetensors") == b"abc" * 100
    # units are immutable
    with pytest.raises(StorageError, match="already published"):
        st.publish("gen", "k1", {"x": b"1"})
    # corruption is detected on read
    st.write_bytes("gen/k1/weights.safetensors", b"tampered")
    with pytest.raises(CorruptUnitError, match="checksum mismatch"):
        st.read_unit_file("gen", "k1", "weights.safetensors")


def test_local_roundtrip(tmp_path):
    _roundtrip(Storage(str(tmp_path / "root")))


def test_s3_roundtrip_on_real_s3_server(s3_bucket):
    _roundtrip(Storage(f"s3://{s3_bucket}/prefix"))


def test_failed_block_publishes_nothing_and_rerun_completes(tmp_path):
    st = Storage(str(tmp_path))
    with pytest.raises(RuntimeError):
        with st.unit_writer("shards", "u") as w:
            w.write("part-0.parquet", b"1")
            raise RuntimeError("worker died")
    assert not st.is_finished("shards", "u") and st.list_finished("shards") == []
    st.publish("shards", "u", {"part-0.parquet": b"1", "part-1.parquet": b"2"})
    assert st.list_finished("shards") == ["u"]
    man = json.loads((tmp_path / "shards" / "u" / MANIFEST).read_text())
    assert man["files"]["part-1.parquet"]["size"] == 1


def test_local_writes_leave_no_temp_files(tmp_path):
    st = Storage(str(tmp_path))
    st.publish("a", "b", {"f": b"x"})
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == [MANIFEST, "f"]


@pytest.mark.parametrize("bad", ["../x", "a/../b", "a b", "", "x\n"])
def test_unsafe_names_refused(tmp_path, bad):
    st = Storage(str(tmp_path))
    with pytest.raises(StorageError, match="unsafe"):
        st.publish("stage", bad, {"f": b"1"})
    with pytest.raises(StorageError, match="unsafe"):
        st.publish(bad, "key", {"f": b"1"})
    with pytest.raises(StorageError, match="unsafe"):
        st.publish("stage", "key", {bad: b"1"})
    assert st.list_dir("") == []  # nothing written anywhere


@pytest.mark.parametrize("uri", ["gs://b/x", "s3://", "s3://ab", "s3://Bad_Bucket/x", "   "])
def test_malformed_roots(uri):
    with pytest.raises(ValueError):
        validate_root_uri(uri)


def test_missing_bucket_is_one_clear_line(s3_server):
    st = Storage("s3://no-such-bucket-xyz/p")
    with pytest.raises(StorageError, match="does not exist") as exc:
        st.check_writable()
    assert "no-such-bucket-xyz" in str(exc.value) and len(str(exc.value).splitlines()) == 1


def test_endpoint_down_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    st = Storage("s3://some-bucket/p", s3_endpoint="http://127.0.0.1:9")  # nothing listens on 9
    with pytest.raises(StorageError) as exc:
        st.write_bytes("a", b"1")
    assert "some-bucket" in str(exc.value) or "127.0.0.1:9" in str(exc.value)


def test_unwritable_local_root(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(StorageError, match="cannot write to storage root"):
        Storage(str(blocker / "sub")).check_writable()


def test_storage_pickles_without_filesystem(tmp_path):
    import pickle

    st = Storage(str(tmp_path))
    st.publish("s", "k", {"f": b"1"})
    st2 = pickle.loads(pickle.dumps(st))
    assert st2._fs is None and st2.list_finished("s") == ["k"]


# -- a re-run's skip check reads manifests, not data (issue #29) -------------------------------------
def _bytes_read() -> int:
    """Bytes this process has read through system calls so far (Linux /proc/self/io ``rchar``)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_skip_check_reads_no_unit_data_and_records_size_and_time(tmp_path):
    import os

    st = Storage(str(tmp_path / "root"))
    big = os.urandom(1024) * (32 * 1024)  # 32 MiB
    man = st.publish("generators", "k", {"unet.safetensors": big, "meta.json": b"{}"})
    assert man.files["unet.safetensors"]["size"] == len(big) and man.files["unet.safetensors"]["mtime_ns"] > 0
    before = _bytes_read()
    assert st.is_intact("generators", "k")
    assert _bytes_read() - before < 64 * 1024  # the manifest only, not 32 MiB
    before = _bytes_read()
    assert st.read_unit_file("generators", "k", "unet.safetensors") == big  # reading verifies the checksum
    assert _bytes_read() - before >= len(big)


def test_skip_check_catches_truncated_rewritten_and_missing_files(tmp_path):
    import os

    st = Storage(str(tmp_path / "root"))
    unit = tmp_path / "root" / "adapters" / "k"
    for damage in ("truncate", "same_size_rewrite", "delete"):
        st.publish("adapters", "k", {"adapter.safetensors": b"weights" * 100})
        f = unit / "adapter.safetensors"
        if damage == "truncate":
            f.write_bytes(f.read_bytes()[:10])
        elif damage == "same_size_rewrite":  # same size, a new modification time: its checksum is read
            t = f.stat().st_mtime_ns
            f.write_bytes(b"WEIGHTS" * 100)
            os.utime(f, ns=(t + 10**9, t + 10**9))
        else:
            f.unlink()
        assert not st.is_intact("adapters", "k"), damage
        assert not st.is_finished("adapters", "k"), damage  # unpublished: the stage recomputes it


def test_altered_file_with_its_time_kept_is_refused_when_read_and_unpublished(tmp_path):
    """Size and time unchanged (bit rot, a deliberate edit that restored the time): the skip check
    trusts it, but its data is never used: reading it verifies the checksum, fails in one line
    (not retried) and unpublishes the unit, so the re-run recomputes it."""
    import os

    from persrep.pipeline.retry import POLICY

    st = Storage(str(tmp_path / "root"))
    st.publish("synthesis", "k", {"part-00000.parquet": b"rows" * 50})
    f = tmp_path / "root" / "synthesis" / "k" / "part-00000.parquet"
    stat = f.stat()
    f.write_bytes(b"ROWS" * 50)
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert st.is_intact("synthesis", "k")
    with pytest.raises(CorruptUnitError, match="checksum mismatch.*re-run to recompute it") as exc:
        st.read_unit_file("synthesis", "k", "part-00000.parquet")
    assert not POLICY.retryable(exc.value) and len(str(exc.value).splitlines()) == 1
    assert not st.is_finished("synthesis", "k")


def test_manifest_without_sizes_or_times_still_loads_with_the_full_check(tmp_path):
    st = Storage(str(tmp_path / "root"))
    st.publish("evaluations", "k", {"results.parquet": b"r" * 100})
    man_path = tmp_path / "root" / "evaluations" / "k" / MANIFEST
    doc = json.loads(man_path.read_text())
    doc["files"] = {n: {"sha256": e["sha256"]} for n, e in doc["files"].items()}  # a manifest of old
    man_path.write_text(json.dumps(doc))
    assert st.is_intact("evaluations", "k")
    assert st.read_unit_file("evaluations", "k", "results.parquet") == b"r" * 100
    f = tmp_path / "root" / "evaluations" / "k" / "results.parquet"
    import os

    stat = f.stat()
    f.write_bytes(b"R" * 100)
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert not st.is_intact("evaluations", "k")  # no times to trust: every checksum read, as before


def test_s3_skip_check_stats_but_does_not_get_files(s3_bucket):
    st = Storage(f"s3://{s3_bucket}/skip")
    man = st.publish("adapters", "k", {"adapter.safetensors": b"w" * 1000, "metrics.json": b"{}"})
    assert all("mtime_ns" in e for e in man.files.values())
    assert st.is_intact("adapters", "k")
    import time

    time.sleep(1.1)  # S3 times are whole seconds
    st.write_bytes("adapters/k/adapter.safetensors", b"W" * 1000)  # same size, a new PUT: a new time
    assert not st.is_intact("adapters", "k") and not st.is_finished("adapters", "k")
