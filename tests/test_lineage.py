"""stages.core.lineage in plain values: which environment variables count as credentials, how they
are masked, params flattening, the git state of a checkout and the dataset hash from dvc.lock."""
import subprocess

import pytest
import yaml

from stages.core import lineage


@pytest.mark.parametrize("name,secret", [
    ("HF_TOKEN", True), ("hf_token", True), ("AWS_SECRET_ACCESS_KEY", True), ("DB_PASSWORD", True),
    ("FTP_PASSWD", True), ("GPG_PASSPHRASE", True), ("GOOGLE_CREDENTIALS", True), ("OPENAI_API_KEY", True),
    ("MY_APIKEY", True), ("AWS_ACCESS_KEY_ID", True), ("ACCESSKEY", True), ("SIGNING_KEY", True), ("KEY", True),
    ("BASIC_AUTH", True), ("MONKEY", False), ("KEYBOARD_LAYOUT", False), ("HOME", False), ("PATH", False),
])
def test_credential_names(name, secret):
    assert bool(lineage.SECRET_NAME.search(name)) is secret


def test_secret_values_are_long_enough_and_longest_first(monkeypatch):
    for k in [k for k in __import__("os").environ if lineage.SECRET_NAME.search(k)]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("A_TOKEN", "abcdef")       # 6 characters: a credential
    monkeypatch.setenv("B_TOKEN", "abcde")        # 5: too short to be one (and would mask common words)
    monkeypatch.setenv("C_TOKEN", "abcdefghij")
    monkeypatch.setenv("GREETING", "abcdefghijkl")  # not named like a credential
    assert lineage.secret_values() == ["abcdefghij", "abcdef"]
    # the longer one is masked whole, not as "***ghij"
    assert lineage.scrub("x abcdefghij y abcdef z abcde") == "x *** y *** z abcde"
    assert lineage.scrub(12345, secrets=["234"]) == "1***5"
    assert lineage.scrub("abcdef", secrets=[]) == "abcdef"


def test_flatten_nests_with_dots_and_keeps_empty_dicts_and_lists_whole():
    assert lineage.flatten({"a": {"b": {"c": 1}, "d": [1, {"e": 2}]}, "f": {}, "g": None}) == {
        "a.b.c": 1, "a.d": [1, {"e": 2}], "f": {}, "g": None}
    assert lineage.flatten({"x": 1}, "p.") == {"p.x": 1}
    assert lineage.flatten({}) == {}


def git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_git_state_clean_dirty_untracked_and_outside_git(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.txt").write_text("1")
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert lineage.git_state(repo) == (head, False)
    (repo / "new.txt").write_text("untracked")  # untracked files don't count
    assert lineage.git_state(repo) == (head, False)
    (repo / "a.txt").write_text("2")
    assert lineage.git_state(repo) == (head, True)
    outside = tmp_path / "plain"
    outside.mkdir()
    assert lineage.git_state(outside) == (None, None)
    assert lineage.git_state(tmp_path / "missing") == (None, None)


def test_dataset_hash_finds_the_curated_output_and_tolerates_bad_locks(tmp_path):
    lock = tmp_path / "dvc.lock"
    stages = {"download": {"outs": [{"path": "data/raw", "md5": "raw.dir"}]},
              "caption": {"outs": [{"path": "reports/caption", "md5": "rep.dir"},
                                   {"path": "data/curated/", "md5": "cur.dir"}]}}
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}))
    assert lineage.dataset_hash(lock) == "cur.dir"  # a trailing slash is the same path
    assert lineage.dataset_hash(lock, "data/raw") == "raw.dir"
    assert lineage.dataset_hash(lock, "data/other") is None
    lock.write_text("")
    assert lineage.dataset_hash(lock) is None
    lock.write_text("stages: [unclosed")
    assert lineage.dataset_hash(lock) is None
    assert lineage.dataset_hash(tmp_path / "missing.lock") is None


def test_repo_root_of_a_dvc_temp_copy_deep_below(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    deep = tmp_path / "proj/.dvc/tmp/exps/tmp1/stages/sub"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert lineage.repo_root() == (tmp_path / "proj").resolve()
    plain = tmp_path / "plain/x"
    plain.mkdir(parents=True)
    monkeypatch.chdir(plain)
    assert lineage.repo_root() == plain.resolve()  # no git, no DVC: the working directory


def test_git_gives_none_for_a_failure_or_an_empty_answer(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    assert lineage._git("status", "--porcelain", cwd=repo) is None  # ran fine, said nothing
    assert lineage._git("rev-parse", "HEAD", cwd=repo) is None      # no commit yet: git fails
    assert lineage._git("rev-parse", "--show-toplevel", cwd=repo) == str(repo.resolve())
    assert lineage._git("status", cwd=tmp_path / "missing") is None   # no such folder (OSError)


def test_dataset_hash_matches_the_whole_path():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        lock = Path(d) / "dvc.lock"
        lock.write_text(yaml.safe_dump({"stages": {"s": {"outs": [{"md5": "no-path"}, {"path": "data/set_X", "md5": "x"},
                                                                   {"path": "data/set_", "md5": "y"}]}}}))
        assert lineage.dataset_hash(lock, "data/set_X") == "x" and lineage.dataset_hash(lock, "data/set_") == "y"
