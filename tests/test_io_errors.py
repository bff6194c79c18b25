"""Errors of the user's disks and folders are one line (``hgf: error: PATH: what``, exit 2), never a
traceback, and leave what was already written as it was, with no temporary file behind.

A full disk is simulated by making the writer raise what the real one raises (safetensors reports
ENOSPC as ``SafetensorError("... (os error 28)")``, Python as ``OSError(28, ...)`` without a path);
a read-only folder by chmod where that blocks writes (not as root) and by making the temporary file
fail with EACCES / EROFS as the kernel would.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest
from safetensors import SafetensorError

from hgf.cli import main
from hgf.errors import io_error_message
from hgf.runs import atomic_write, atomic_write_text
from infer_utils import make_run, make_tokenizer, train_tiny

pytest_plugins = ["train_fixtures"]  # the dataset fixture of the train test

ENOSPC_SAFETENSORS = "Error while serializing: I/O error: No space left on device (os error 28)"


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hgf: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    model, cfg, _ = train_tiny("hgf", 3)
    return make_run(tmp_path_factory.mktemp("io") / "run", model, cfg, make_tokenizer())


# ---------------------------------------------------------------------------------------------
# The CLI: which errors become one line


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                                  errno.ENOTDIR, errno.EISDIR, errno.ENOENT])
def test_cli_reports_user_os_errors_as_one_line(code, tmp_path, monkeypatch, capsys) -> None:
    import hgf.commands.info as info

    def fail(args, overrides):
        raise OSError(code, os.strerror(code), str(tmp_path / "f"))

    monkeypatch.setattr(info, "run", fail)
    assert main(["info", "configs/hgf.toml"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == f"hgf: error: {tmp_path / 'f'}: {os.strerror(code)[0].lower()}{os.strerror(code)[1:]}"


def test_library_errors_carrying_an_errno_are_one_line_and_others_stay_tracebacks() -> None:
    assert io_error_message(SafetensorError(ENOSPC_SAFETENSORS)) == "no space left on device"
    assert io_error_message(OSError(errno.ENOSPC, "No space left on device")) == \
        "no space left on device"
    assert io_error_message(OSError(errno.EIO, "Input/output error", "x")) is None  # not the user's
    assert io_error_message(ValueError("a bug")) is None
    assert io_error_message(OSError(errno.EXDEV, "Invalid cross-device link", "a", "b")) is None
    assert io_error_message(PermissionError(errno.EACCES, "Permission denied", "a", None, "b")) == \
        "a -> b: permission denied"


# ---------------------------------------------------------------------------------------------
# The atomic writers: the previous file stays, no temporary file is left, the error names the path


@pytest.mark.parametrize("raised", [OSError(errno.ENOSPC, "No space left on device"),
                                    SafetensorError(ENOSPC_SAFETENSORS)])
def test_atomic_write_on_a_full_disk_keeps_the_previous_file(raised, tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_text("previous")

    def write(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise raised

    with pytest.raises(OSError) as e:
        atomic_write(path, write)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert path.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_atomic_write_into_a_read_only_folder_names_the_file(code, tmp_path, monkeypatch) -> None:
    def refuse(prefix, suffix, dir):  # what mkstemp raises when the folder cannot be written
        raise OSError(code, os.strerror(code), os.path.join(dir, prefix + "x1y2" + suffix))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OSError) as e:
        atomic_write_text(tmp_path / "config.json", "{}")
    assert e.value.errno == code and e.value.filename == str(tmp_path / "config.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 555 folder anyway")
def test_atomic_write_into_a_chmod_read_only_folder(tmp_path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "config.json").write_text("previous")
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError) as e:
            atomic_write_text(folder / "config.json", "{}")
        assert e.value.filename == str(folder / "config.json")
        assert (folder / "config.json").read_text() == "previous"
        assert [p.name for p in folder.iterdir()] == ["config.json"]
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("hard_links", [True, False])
def test_atomic_write_without_overwrite_never_replaces_a_file(hard_links, tmp_path,
                                                             monkeypatch) -> None:
    if not hard_links:  # a file system without them: os.link fails with EPERM
        def no_link(src, dst):
            raise OSError(errno.EPERM, os.strerror(errno.EPERM), src, None, dst)

        monkeypatch.setattr(os, "link", no_link)
    path = tmp_path / "m.hgf"

    def write(tmp: str) -> None:  # someone else writes the file while ours is being written
        Path(tmp).write_text("ours")
        path.write_text("theirs")

    with pytest.raises(FileExistsError) as e:
        atomic_write(path, write, overwrite=False)
    assert e.value.filename == str(path) and path.read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["m.hgf"]
    atomic_write(tmp_path / "new.hgf", lambda tmp: Path(tmp).write_text("new"), overwrite=False)
    assert (tmp_path / "new.hgf").read_text() == "new"
    assert oct((tmp_path / "new.hgf").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------
# Through the commands


def test_export_on_a_full_disk_is_one_line_and_keeps_the_previous_file(
        run, tmp_path, monkeypatch, capsys) -> None:
    import hgf.infer.export as export

    out = tmp_path / "m.hgf"
    out.write_text("previous export")

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError(ENOSPC_SAFETENSORS)

    monkeypatch.setattr(export, "save_file", full_disk)
    assert main(["export", str(run), "-o", str(out), "--force"]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"hgf: error: {out}: no space left on device"
    assert out.read_text() == "previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.hgf"]


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_export_into_a_read_only_folder_is_one_line(code, run, tmp_path, monkeypatch,
                                                    capsys) -> None:
    def refuse(prefix, suffix, dir):
        raise OSError(code, os.strerror(code), os.path.join(dir, prefix + "x1y2" + suffix))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert main(["export", str(run), "-o", str(tmp_path / "m.hgf")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"hgf: error: {tmp_path / 'm.hgf'}: ")
    assert list(tmp_path.iterdir()) == []


def test_convert_needs_a_folder(run, tmp_path, capsys) -> None:
    for src in (run / "config.json", run / "model.safetensors"):
        for fmt in ([], ["--from", "run"]):
            assert main(["convert", str(src), "--to", "hf", str(tmp_path / "out"), *fmt]) == 2
            line = _one_error_line(capsys.readouterr().err)
            assert line == f"hgf: error: {src}: not a folder (convert reads a run, Hugging Face or " \
                           "BitNet folder, or a .gguf file)"
    assert not (tmp_path / "out").exists()


def test_convert_on_a_full_disk_is_one_line_and_leaves_nothing(run, tmp_path, monkeypatch,
                                                               capsys) -> None:
    import hgf.runs

    def full_disk(model, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError(ENOSPC_SAFETENSORS)

    monkeypatch.setattr(hgf.runs, "save_model", full_disk)
    out = tmp_path / "out"
    assert main(["convert", str(run), "--to", "run", str(out)]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"hgf: error: {out}: no space left on device"
    assert list(tmp_path.iterdir()) == []


def test_convert_output_under_a_file_is_one_line(run, tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("mine")
    assert main(["convert", str(run), "--to", "hf", str(tmp_path / "file" / "out")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(tmp_path / "file") in line
    assert (tmp_path / "file").read_text() == "mine"


def test_train_on_a_full_disk_is_one_line_and_keeps_the_run(tmp_path, dataset, monkeypatch,
                                                            capsys) -> None:
    import hgf.runs
    from trainkit import ROOT, VOCAB

    data, cache = dataset
    run_dir = tmp_path / "run"
    args = ["train", str(ROOT / "configs" / "tinystories" / "hgf-debug.toml"),
            f"--model.vocab_size={VOCAB}", "--model.d_model=32", "--model.d_ff=64",
            "--train.steps=2", "--train.seq_len=16", "--train.batch_size=4", "--eval.every=0",
            "--eval.batches=1", "--eval.full_at_end=false", "--train.threads=1",
            "--train.progress=false", f"--train.out_dir={run_dir}", f"--data.path={data}",
            f"--data.cache_dir={cache}"]
    assert main(args) == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    def full_disk(model, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError(ENOSPC_SAFETENSORS)

    monkeypatch.setattr(hgf.runs, "save_model", full_disk)
    capsys.readouterr()
    assert main(args) == 2  # a finished run resumes at its end and writes its weights again
    line = _one_error_line(capsys.readouterr().err)
    assert line == f"hgf: error: {run_dir / 'model.safetensors'}: no space left on device"
    weights = run_dir / "model.safetensors"
    assert weights.read_bytes() == before[weights]
    # no temporary file left (the run folder's lock file, hgf.runs.run_lock, is not one)
    assert not [p for p in run_dir.rglob("*")
                if p.name.startswith(".") and p.name != hgf.runs.LOCK_FILE]


@pytest.mark.parametrize("command", [["eval", "{f}"], ["export", "{f}", "-o", "{out}"]],
                         ids=["eval", "export"])
def test_a_file_given_for_a_run_directory_is_one_line(command, run, tmp_path, capsys) -> None:
    f = run / "config.json"
    assert main([a.format(f=f, out=tmp_path / "m.hgf") for a in command]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"hgf: error: {f}: not a run directory (a file)"
    assert list(tmp_path.iterdir()) == []
