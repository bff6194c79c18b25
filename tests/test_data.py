import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from hgf.cli import main
from hgf.config import config_from_dict
from hgf.data import EOT, load_prepared, prepare, read_stories, token_dtype, train_bpe, write_stories
from hgf.data import sources as sources_mod
from hgf.errors import HGFError

SHARED = Path(__file__).resolve().parents[1] / "../shared/data/tinystories"
WORDS = ["the", "cat", "dog", "sun", "tree", "ran", "jumped", "happy", "little", "girl", "boy", "played", "with", "ball", "in", "park", "and", "saw", "big", "red", "friend", "said", "hello", "mom", "home", "ate", "cake", "smiled", "é", "ü", "你好"]


def make_stories(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        paras = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))).capitalize() + "."
                 for _ in range(rng.randint(1, 3))]
        out.append("\n".join(paras))
    return out


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_stories(folder / "train.txt", make_stories(120, seed=1))
    write_stories(folder / "valid.txt", make_stories(30, seed=2))
    return folder


def cfg_for(tmp_path, folder, **data):
    d = dict(path=str(folder), cache_dir=str(tmp_path / "cache"), **data)
    return config_from_dict({"data": d, "train": {"seq_len": 32}, "model": {"vocab_size": 512}})


def split_stories(ids: np.ndarray, eot: int) -> list[np.ndarray]:
    cuts = np.flatnonzero(ids == eot)
    assert cuts[-1] == len(ids) - 1  # every story, the last included, ends with EOT
    return np.split(ids, cuts + 1)[:-1]


# --- sources ---------------------------------------------------------------------------------


def test_layout_parsing(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text(f"One.\nTwo lines.\n{EOT}\nSecond story.\n{EOT}\n\n{EOT}\nThird, no final separator",
                 encoding="utf-8")
    assert read_stories(f) == ["One.\nTwo lines.", "Second story.", "Third, no final separator"]
    assert read_stories(f, max_stories=2) == ["One.\nTwo lines.", "Second story."]
    f.write_bytes(f"A.\r\n{EOT}\r\nB.\r\n{EOT}\r\n".encode())
    assert read_stories(f) == ["A.", "B."]


# --- prepare ---------------------------------------------------------------------------------


def test_bpe_prepare_round_trip(tmp_path, dataset):
    p = prepare(cfg_for(tmp_path, dataset), progress=False)
    assert p.built and p.dir.parent == tmp_path / "cache"
    assert sorted(x.name for x in p.dir.iterdir()) == ["manifest.json", "tokenizer.json", "train.bin",
                                                       "valid.bin"]
    m = p.manifest
    assert m["tokenizer_kind"] == "bpe" and p.eot_id == 0 == m["eot_id"]
    assert m["dtype"] == "uint16" and p.vocab_size == m["vocab_size"] <= 512
    tok = p.tokenizer()
    for split, seed, n in (("train", 1, 120), ("valid", 2, 30)):
        stories = make_stories(n, seed)
        ids = p.tokens(split)
        assert isinstance(ids, np.memmap) and ids.ndim == 1 and ids.dtype == np.uint16
        assert int(ids.max()) < p.vocab_size
        pieces = split_stories(np.asarray(ids), p.eot_id)
        assert [tok.decode(x.tolist(), skip_special_tokens=False) for x in pieces] == \
            [s + EOT for s in stories]
        info = m["splits"][split]
        text_bytes = sum(len(s.encode()) + 1 for s in stories)
        assert (info["stories"], info["tokens"], info["text_bytes"]) == (n, len(ids), text_bytes)
        assert p.bytes_per_token(split) == pytest.approx(text_bytes / len(ids))
        assert 1.0 < p.bytes_per_token(split) < 10.0
    with pytest.raises(HGFError, match="unknown data split 'test'"):
        p.tokens("test")


def test_cache_is_idempotent_and_keyed_by_content(tmp_path, dataset):
    cfg = cfg_for(tmp_path, dataset)
    p1 = prepare(cfg, progress=False)
    stamp = {f.name: f.stat().st_mtime_ns for f in p1.dir.iterdir()}
    p2 = prepare(cfg, progress=False)
    assert not p2.built and p2.dir == p1.dir and p2.manifest == p1.manifest
    assert {f.name: f.stat().st_mtime_ns for f in p2.dir.iterdir()} == stamp
    # a cap or an edited file lands in another folder
    p3 = prepare(cfg_for(tmp_path, dataset, max_train_stories=50), progress=False)
    assert p3.built and p3.dir != p1.dir and p3.manifest["splits"]["train"]["stories"] == 50
    write_stories(dataset / "valid.txt", make_stories(31, seed=3))
    p4 = prepare(cfg, progress=False)
    assert p4.built and p4.dir not in (p1.dir, p3.dir)
    assert not any(x.name.startswith(".tmp-") for x in (tmp_path / "cache").iterdir())


def test_truncated_cache_is_detected_and_rebuilt(tmp_path, dataset, capsys):
    cfg = cfg_for(tmp_path, dataset)
    p = prepare(cfg, progress=False)
    train_bin = p.dir / "train.bin"
    good = train_bin.read_bytes()
    train_bin.write_bytes(good[:-6])
    with pytest.raises(HGFError, match=rf"train.bin: {len(good) - 6} bytes, the manifest says {len(good)} "
                                       r"bytes \(truncated or corrupt cache\)"):
        load_prepared(p.dir)
    q = prepare(cfg, progress=False)
    assert q.built and q.dir == p.dir and train_bin.read_bytes() == good
    assert "rebuilding" in capsys.readouterr().err


# --- errors ----------------------------------------------------------------------------------


def _one_line_error(cfg) -> str:
    with pytest.raises(HGFError) as e:
        prepare(cfg, progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_folder_and_file(tmp_path, dataset):
    assert _one_line_error(cfg_for(tmp_path, tmp_path / "nope")) == \
        f"data.path='{tmp_path / 'nope'}': dataset folder not found (it must hold train.txt and valid.txt)"
    (dataset / "valid.txt").unlink()
    assert _one_line_error(cfg_for(tmp_path, dataset)) == \
        f"{dataset / 'valid.txt'}: file not found (a dataset folder holds train.txt, valid.txt)"


def test_empty_file(tmp_path, dataset):
    (dataset / "train.txt").write_text("\n \n", encoding="utf-8")
    assert _one_line_error(cfg_for(tmp_path, dataset)) == \
        f"{dataset / 'train.txt'}: file is empty (expected stories separated by {EOT} lines)"


def test_tiny_file(tmp_path, dataset):
    write_stories(dataset / "valid.txt", ["Tiny.", "Story."])
    msg = _one_line_error(cfg_for(tmp_path, dataset))
    assert msg.startswith(f"{dataset / 'valid.txt'}: too small: 2 stories give ")
    assert msg.endswith("tokens, fewer than one training window (train.seq_len+1 = 33)")
    assert not [x for x in (tmp_path / "cache").iterdir() if x.is_dir()]  # nothing cached, no tmp left


def test_not_utf8_names_byte_offset(tmp_path, dataset):
    (dataset / "train.txt").write_bytes(f"Good story.\n{EOT}\nBad ".encode() + b"\xff\xfe caf\xe9")
    offset = len(f"Good story.\n{EOT}\nBad ".encode())
    assert _one_line_error(cfg_for(tmp_path, dataset)) == (
        f"{dataset / 'train.txt'}: not valid UTF-8 at byte offset {offset} (is the file mis-encoded? "
        "re-save it as UTF-8)")


def test_no_separator(tmp_path, dataset):
    text = "\n".join(make_stories(300))
    (dataset / "train.txt").write_text(text, encoding="utf-8")
    size = len(text.encode())
    assert _one_line_error(cfg_for(tmp_path, dataset)) == \
        f"{dataset / 'train.txt'}: no {EOT} separator in {size:,} bytes; put a line {EOT} after every story"


def test_negative_cap(tmp_path, dataset):
    assert _one_line_error(cfg_for(tmp_path, dataset, max_valid_stories=-1)) == \
        "data.max_valid_stories=-1: must be >= 0 (0 = all stories)"


# --- tokenizers ------------------------------------------------------------------------------


def test_vocab_too_large(tmp_path, dataset):
    cfg = config_from_dict({"data": {"path": str(dataset), "cache_dir": str(tmp_path / "c")},
                            "model": {"vocab_size": 200}, "train": {"seq_len": 32}})
    assert _one_line_error(cfg) == ("model.vocab_size=200 is smaller than the vocabulary of tokenizer "
                                    "'bpe' (257 ids); set --model.vocab_size=257 (or larger)")


def test_tokenizer_json_file(tmp_path, dataset):
    tok = train_bpe(make_stories(200, seed=5), 300)
    tok_file = tmp_path / "my_tok.json"
    tok.save(str(tok_file))
    p = prepare(cfg_for(tmp_path, dataset, tokenizer=str(tok_file)), progress=False)
    assert p.manifest["tokenizer_kind"] == "json" and p.vocab_size == tok.get_vocab_size() <= 300
    story = make_stories(1, seed=1)[0]
    assert p.tokens("train")[: len(tok.encode(story).ids) + 1].tolist() == tok.encode(story).ids + [0]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    msg = _one_line_error(cfg_for(tmp_path, dataset, tokenizer=str(bad)))
    assert msg.startswith(f"data.tokenizer='{bad}': cannot load {bad}: ")
    msg = _one_line_error(cfg_for(tmp_path, dataset, tokenizer=str(tmp_path / "missing.json")))
    assert msg.endswith("with encoder.json + vocab.bpe (path not found)")


def test_gpt2_style_folder(tmp_path, dataset):
    folder = tmp_path / "gpt2ish"
    folder.mkdir()
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("h", "e"), ("he", "l"), ("Ġ", "t"), ("Ġt", "he")]
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab[EOT] = len(vocab)
    (folder / "encoder.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                      encoding="utf-8")
    p = prepare(cfg_for(tmp_path, dataset, tokenizer=str(folder)), progress=False)
    assert p.manifest["tokenizer_kind"] == "gpt2"
    assert p.eot_id == vocab[EOT] == p.vocab_size - 1
    tok = p.tokenizer()
    assert tok.encode(" the hello").tokens == ["Ġthe", "Ġ", "hel", "l", "o"]
    pieces = split_stories(np.asarray(p.tokens("valid")), p.eot_id)
    assert tok.decode(pieces[0].tolist(), skip_special_tokens=True) == make_stories(30, seed=2)[0]
    (folder / "vocab.bpe").unlink()
    msg = _one_line_error(cfg_for(tmp_path, dataset, tokenizer=str(folder)))
    assert msg == (f"data.tokenizer='{folder}': {folder / 'vocab.bpe'} not found (a tokenizer folder "
                   "holds GPT-2 encoder.json + vocab.bpe)")


def test_dtype_choice(tmp_path, dataset):
    assert token_dtype(4096) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(100_000) == np.uint32
    # a 70,000-id byte-level vocabulary: ids beyond 65535 exist, so the files are uint32
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({f"<unused{i}>": len(vocab) for i in range(70_000 - len(vocab) - 1)})
    vocab[EOT] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(tmp_path / "big.json"))
    cfg = config_from_dict({"data": {"path": str(dataset), "cache_dir": str(tmp_path / "c"),
                                     "tokenizer": str(tmp_path / "big.json")},
                            "model": {"vocab_size": 70_000}, "train": {"seq_len": 32}})
    p = prepare(cfg, progress=False)
    ids = p.tokens("valid")
    assert p.manifest["dtype"] == "uint32" and ids.dtype == np.uint32 and p.eot_id == 69_999
    assert (p.dir / "valid.bin").stat().st_size == 4 * len(ids)
    assert np.asarray(ids).tobytes() == np.asarray(ids, dtype="<u4").tobytes()  # little-endian
    first = make_stories(1, seed=2)[0]
    assert ids[: len(first.encode()) + 1].tolist() == tok.encode(first).ids + [69_999]


# --- Hugging Face download -------------------------------------------------------------------


def test_hf_download_with_fake_load_dataset(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        seed = 7 if split.startswith("train") else 8
        return [{"text": "\n" + s + "\n\n"} for s in make_stories(40, seed)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = config_from_dict({"data": {"source": "hf", "cache_dir": str(tmp_path / "c"),
                                     "max_train_stories": 25},
                            "model": {"vocab_size": 512}, "train": {"seq_len": 32}})
    p = prepare(cfg, progress=False)
    assert calls == [("roneneldan/TinyStories", "validation"), ("roneneldan/TinyStories", "train[:25]")]
    folder = tmp_path / "c" / "hf" / "TinyStories-train25-validall"
    assert (folder / "train.txt").read_text(encoding="utf-8") == \
        "".join(f"{s}\n{EOT}\n" for s in make_stories(40, 7)[:25])
    assert read_stories(folder / "valid.txt") == make_stories(40, 8)
    assert p.manifest["origin"] == "hf" and p.manifest["splits"]["train"]["stories"] == 25
    assert prepare(cfg, progress=False).dir == p.dir and len(calls) == 2  # downloaded once


def test_auto_source_fallbacks(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(sources_mod, "shared_path", lambda rel: None)  # no local TinyStories copy
    cfg = config_from_dict({"data": {"source": "local", "cache_dir": str(tmp_path / "c")}})
    msg = _one_line_error(cfg)
    assert msg.startswith("no dataset found: put train.txt and valid.txt") and "data.path" in msg

    def offline(name, split):
        raise ConnectionError("Couldn't reach 'roneneldan/TinyStories' on the Hub\nmore lines")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    cfg = config_from_dict({"data": {"source": "auto", "cache_dir": str(tmp_path / "c")}})
    msg = _one_line_error(cfg)
    assert msg.startswith("could not download roneneldan/TinyStories (Couldn't reach 'roneneldan/"
                          "TinyStories' on the Hub); put train.txt and valid.txt")
    monkeypatch.setitem(sys.modules, "datasets", None)  # `datasets` not installed
    assert _one_line_error(cfg).startswith("no dataset found: ")
    cfg = config_from_dict({"data": {"source": "hf", "cache_dir": str(tmp_path / "c")}})
    assert _one_line_error(cfg) == "data.source=hf needs the `datasets` package: pip install hgf[hf]"


# --- CLI -------------------------------------------------------------------------------------


def test_cli_prepare_and_info(tmp_path, dataset, capsys):
    args = ["data", "prepare", "configs/hgf.toml", f"--data.path={dataset}", "--model.vocab_size=512",
            f"--data.cache_dir={tmp_path / 'c'}", "--train.seq_len=32", "--train.progress=false"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    folder = out[0].split()[0]
    assert "(built in" in out[0] and out[1].startswith("tokenizer bpe (bpe): vocab ")
    assert out[3].split()[:2] == ["train", "120"] and out[4].split()[:2] == ["valid", "30"]
    assert main(args) == 0 and "(cached in" in capsys.readouterr().out
    assert main(["data", "info", folder]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == out[1:]
    assert main(["data", "info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"hgf: error: {tmp_path / 'manifest.json'}: not found (not a prepared data folder; " \
                  "run `hgf data prepare`)\n"


# --- the real shared data --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "train.txt").is_file(), reason="shared TinyStories copy absent")
def test_real_tinystories_gpt2_counts(tmp_path):
    gpt2 = SHARED.parent / "tokenizers/gpt2"
    cfg = config_from_dict({"data": {"path": str(SHARED), "cache_dir": str(tmp_path),
                                     "tokenizer": str(gpt2)}, "model": {"vocab_size": 50257}})
    p = prepare(cfg, progress=False)
    s = p.manifest["splits"]
    assert (s["train"]["stories"], s["valid"]["stories"]) == (17_647, 800)
    assert p.eot_id == 50256 and p.manifest["dtype"] == "uint16"
    # README: 3,595,346 GPT-2 tokens for the raw file, i.e. with "\n" before and after each
    # <|endoftext|>; the stories alone plus one EOT each are 2 tokens/story fewer.
    assert s["train"]["tokens"] == 3_595_346 - 2 * 17_647
    assert os.path.getsize(p.dir / "train.bin") == 2 * s["train"]["tokens"]
