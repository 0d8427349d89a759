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
