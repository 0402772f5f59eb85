"""Provenance: hashes against coreutils' sha256sum, git against git itself, and the record diff."""

import hashlib
import json
import shutil
import subprocess

import pytest

from minisirev import provenance
from minisirev.provenance import (
    check_provenance,
    git_commit,
    iteration_provenance,
    sha256_file,
    sha256_path,
    sha256_tree,
)


def _make_tree(root):
    (root / "sub dir").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}\n')
    (root / "sub dir" / "weights.bin").write_bytes(bytes(range(256)) * 9000)  # > 2 chunks of 1 MiB
    (root / "B.txt").write_text("upper case sorts first in byte order\n")
    (root / ".hidden").write_text("hidden files count too\n")


def test_sha256_file_streams_the_bytes(tmp_path):
    p = tmp_path / "big.bin"
    data = bytes(range(256)) * (3 * 4096 + 17)  # not a whole number of chunks
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


@pytest.mark.skipif(shutil.which("sha256sum") is None or shutil.which("find") is None, reason="needs coreutils")
def test_sha256_tree_matches_the_coreutils_recipe(tmp_path):
    _make_tree(tmp_path / "ckpt")
    recipe = ("cd ckpt && find . -type f -printf '%P\\n' | LC_ALL=C sort | xargs -d '\\n' sha256sum | sha256sum")
    shell = subprocess.run(["bash", "-c", recipe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert sha256_tree(tmp_path / "ckpt") == shell.stdout.split()[0]
    assert sha256_path(tmp_path / "ckpt") == sha256_tree(tmp_path / "ckpt")


def test_sha256_tree_is_stable_and_sensitive(tmp_path):
    _make_tree(tmp_path / "a")
    _make_tree(tmp_path / "b")
    assert sha256_tree(tmp_path / "a") == sha256_tree(tmp_path / "b")  # where it lives does not matter
    (tmp_path / "b" / "config.json").write_text('{"a": 2}\n')
    assert sha256_tree(tmp_path / "a") != sha256_tree(tmp_path / "b")  # contents do
    (tmp_path / "a" / "config.json").rename(tmp_path / "a" / "config2.json")
    (tmp_path / "b" / "config.json").write_text('{"a": 1}\n')
    (tmp_path / "b" / "config.json").rename(tmp_path / "b" / "config3.json")
    assert sha256_tree(tmp_path / "a") != sha256_tree(tmp_path / "b")  # so do names
    assert sha256_tree(tmp_path / "a", suffixes=(".bin",)) == sha256_tree(tmp_path / "b", suffixes=(".bin",))
    with pytest.raises(FileNotFoundError, match="neither a file nor a directory"):
        sha256_path(tmp_path / "missing")


def test_git_commit_of_this_checkout_and_elsewhere(tmp_path, monkeypatch):
    if shutil.which("git") is None:
        assert git_commit() is None
        return
    inside = subprocess.run(["git", "-C", str(provenance.REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                            text=True)
    got = git_commit()
    if inside.returncode == 0:
        assert got["commit"] == inside.stdout.strip() and isinstance(got["dirty"], bool)
    else:
        assert got is None
    assert git_commit(tmp_path) is None  # not a checkout
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "pkg").mkdir()
    assert git_commit(tmp_path / "pkg") is None  # inside another repository, not its top: not ours

    def no_git(*a, **kw):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert git_commit() is None  # never fails


def test_iteration_provenance_and_check(tmp_path):
    _make_tree(tmp_path / "m1")
    (tmp_path / "train_data.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    prev = {"path": str(tmp_path / "m1"), "sha256": "0" * 64}
    rec = iteration_provenance(iter=2, files={"start_model": tmp_path / "m1", "ref_model": prev,
                                              "train_data": tmp_path / "train_data.jsonl", "samples": None},
                               verifier=provenance.verifier_version("arith"), seeds={"seed": 0},
                               sampling={"n": 8, "temperature": 0.7}, step_methods=["dpo"])
    json.dumps(rec, allow_nan=False)
    assert rec["iter"] == 2 and rec["step_methods"] == ["dpo"]
    assert rec["files"]["start_model"]["sha256"] == sha256_tree(tmp_path / "m1")
    assert rec["files"]["ref_model"] == prev and rec["files"]["samples"] is None  # reused as is, not rehashed
    assert rec["files"]["train_data"]["sha256"] == sha256_file(tmp_path / "train_data.jsonl")
    assert set(rec["packages"]) == set(provenance.PACKAGES) and rec["packages"]["numpy"]
    assert rec["python"] and rec["device"] and len(rec["verifier"]["code_sha256"]) == 64
    assert check_provenance(rec, json.loads(json.dumps(rec))) == []

    rerun = json.loads(json.dumps(rec))
    rerun["files"]["train_data"] = {"path": "/elsewhere/train_data.jsonl", "sha256": "f" * 64}
    rerun["sampling"]["temperature"] = 1.0
    del rerun["seeds"]["seed"]
    rerun["packages"]["extra-pkg"] = "1.0"
    diffs = check_provenance(rec, rerun)
    assert diffs == [f"files.train_data.sha256: recorded {rec['files']['train_data']['sha256']!r}, now {'f' * 64!r}",
                     "packages.extra-pkg: absent in the record, now '1.0'",
                     "sampling.temperature: recorded 0.7, now 1.0",
                     "seeds.seed: recorded 0, now absent"]  # the path differs too, but paths are ignored
    assert check_provenance(rec, rerun, ignore=()) != diffs


def test_device_name():
    assert provenance.device_name() == provenance.device_name("cpu") and provenance.device_name("cpu")
    assert provenance.device_name("cuda:7")  # a name or a one-line reason, never an exception


def test_cpu_name_names_the_vector_extension():
    # two machines a hypervisor names alike: the widest vector extension tells them apart
    info = "processor\t: {i}\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2{extra} fma\n\n"
    zen3 = "".join(info.format(i=i, extra="") for i in range(2))
    zen5 = "".join(info.format(i=i, extra=" avx512f avx512bw") for i in range(2))
    assert provenance._cpu_model(zen3) == "AMD EPYC (AVX2)"
    assert provenance._cpu_model(zen5) == "AMD EPYC (AVX-512)"
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes\n"  # aarch64 Linux: no model name line
    assert provenance._cpu_model(arm).endswith("(NEON)")
    assert provenance._cpu_model("") and "(" not in provenance._cpu_model("model name : Some CPU\n")
