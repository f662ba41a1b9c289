"""Code store and extract-codes: round trip, atomic resumable shards, rank sharding, bad inputs counted."""

import io
import json
import os

import numpy as np
import pytest
from test_mllm_train_helpers import make_folder, one_thread, save_tiny_unitok, write_image  # noqa: F401 (autouse fixture)

from unitok.data.codes import CodeStore, decode_codes, encode_codes, shard_name, store_summary
from unitok.data.extract import extract_codes
from unitok.data.extract import main as extract_main
from unitok.data.formats import write_tar_shard
from unitok.tokenizer import UniTok
from unitok.tokenizer.preprocess import load_image


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return save_tiny_unitok(tmp_path_factory.mktemp("tok") / "unitok")


def run(tokenizer, data, out, **kwargs):
    return extract_codes(tokenizer, str(data), out, num_workers=0, progress=False, **kwargs)


def test_codes_bytes_round_trip_and_range_check():
    codes = np.random.default_rng(0).integers(0, 4096, size=(16, 16, 8))
    assert np.array_equal(decode_codes(encode_codes(codes, 4096), 16, 16, 8), codes)
    assert len(encode_codes(codes, 4096)) == 16 * 16 * 8 * 2
    codes[0, 0, 0] = 4096
    with pytest.raises(ValueError, match=r"\[0, 4096\)"):
        encode_codes(codes, 4096)


def test_folder_extraction_matches_the_encoder_and_keeps_both_texts(tokenizer, tmp_path):
    data = make_folder(tmp_path / "data", 6)
    result = run(tokenizer, data, tmp_path / "store", shard_size=4)
    assert result["shards_written"] == 2 and result["images"] == 6 and result["skipped"] == {}
    store = CodeStore(tmp_path / "store")
    assert len(store) == 6 and store.has_caption.all() and store.has_conversations.all()
    record = store[3]
    unitok = UniTok.from_pretrained(tokenizer)
    expected = unitok.encode(load_image(data / "images/train/0003.png", size=64)[None])[0]
    assert record.codes.shape == (4, 4, 8) and np.array_equal(record.codes, expected.numpy())
    assert record.caption == "a yellow square"
    assert record.conversations[1] == {"from": "gpt", "value": "yellow"}
    summary = store_summary(tmp_path / "store")
    assert summary["rows"] == 6 and summary["shards_done"] == summary["shards_planned"] == 2


def test_rerun_skips_finished_shards_and_rank_sharding(tokenizer, tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data", 6)
    out = tmp_path / "store"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = run(tokenizer, data, out, shard_size=2)
    # Rank 1 of 2 takes shards 1 (of 0, 1, 2); the store is not complete yet.
    assert result["shards_written"] == 1
    assert sorted(os.listdir(out / "shards")) == [shard_name(1)]
    with pytest.raises(ValueError, match="incomplete: 2 of 3 shards missing"):
        CodeStore(out)
    monkeypatch.setenv("RANK", "0")
    assert run(tokenizer, data, out, shard_size=2)["shards_written"] == 2
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    before = (out / "shards" / shard_name(0)).stat().st_mtime_ns
    (out / "shards" / shard_name(2)).unlink()
    again = run(tokenizer, data, out, shard_size=2)
    assert again["shards_written"] == 1 and again["shards_skipped"] == 2
    assert (out / "shards" / shard_name(0)).stat().st_mtime_ns == before
    assert len(CodeStore(out)) == 6
    with pytest.raises(ValueError, match="different"):
        run(tokenizer, data, out, shard_size=3)


def test_bad_inputs_are_skipped_and_counted(tokenizer, tmp_path):
    data = make_folder(tmp_path / "data", 5)
    (data / "images/train/0001.png").unlink()
    (data / "images/train/0002.png").write_bytes(b"not an image")
    with open(data / "captions" / "train.jsonl", "a") as f:
        f.write("{broken json\n")
    records = json.loads((data / "llava" / "train.json").read_text())
    records[3]["conversations"] = records[3]["conversations"][:1]
    (data / "llava" / "train.json").write_text(json.dumps(records))
    result = run(tokenizer, data, tmp_path / "store", shard_size=10)
    assert result["skipped"] == {"bad_conversation": 1, "bad_image": 1, "bad_json": 1, "missing_image": 1}
    store = CodeStore(tmp_path / "store")
    assert [store[i].id for i in range(len(store))] == ["0000", "0003", "0004"]
    # The caption of image 3 survives its malformed conversation.
    assert store[1].caption == "a yellow square" and store[1].conversations is None
    assert store_summary(tmp_path / "store")["skipped"] == result["skipped"]


def test_webdataset_shards_and_the_command_line(tokenizer, tmp_path, capsys):
    members = []
    for i in range(3):
        write_image(tmp_path / "img.png", i)
        buf = io.BytesIO((tmp_path / "img.png").read_bytes())
        members.append((f"s{i}", {"png": buf.getvalue(), "txt": f"caption {i}".encode()}))
    members.append(("s3", {"txt": b"no image here"}))
    write_tar_shard(tmp_path / "train-000000.tar", members)
    out = tmp_path / "store"
    args = ["--tokenizer", str(tokenizer), "--data", str(tmp_path / "train-000000.tar"), "--out", str(out)]
    assert extract_main([*args, "--workers", "0", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "1/1 shards, 3 images" in printed and "missing_image" in printed
    store = CodeStore(out)
    assert [store[i].caption for i in range(3)] == ["caption 0", "caption 1", "caption 2"]


def test_a_shard_opens_with_hugging_face_datasets(tokenizer, tmp_path):
    datasets = pytest.importorskip("datasets")
    run(tokenizer, make_folder(tmp_path / "data", 2), tmp_path / "store")
    table = datasets.Dataset.from_file(str(tmp_path / "store" / "shards" / shard_name(0)))
    assert table.num_rows == 2 and table[0]["caption"] == "a red square"
