"""Shared storage for real: `dvc push` to a local-directory remote and to an S3 remote (moto's
standalone S3 server on 127.0.0.1 through dvc-s3), a fresh `git clone` + `dvc pull` that restores
every output byte for byte with `dvc status` clean and nothing for `dvc repro` to do, and
`dvc exp push`/`pull` of an experiment with its outputs through a bare git repo on disk."""
import hashlib
import sys
from pathlib import Path

import pytest

from tests.servers import free_port, serve
from tests.tinydvc import commit_all, dvc, make_project, sh

OFF = {"FLUXIMP_MLFLOW": "0"}  # these tests are about storage: keep the stages fast
UP_TO_DATE = "Data and pipelines are up to date."


def hashes(root: Path) -> dict[str, str]:
    files = [f for d in ("data/curated", "models/lora") for f in (root / d).rglob("*") if f.is_file()]
    return {f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def built_project(tmp_path: Path) -> Path:
    root = make_project(tmp_path / "proj")
    dvc(root, "repro", **OFF)
    return root


def fresh_clone_and_pull(src: Path, dst: Path, expected: dict[str, str], **env) -> None:
    sh(dst.parent, "git", "clone", "-q", str(src), dst.name)
    assert not (dst / "models" / "lora").exists()  # outputs are not in git...
    dvc(dst, "pull", **env)
    assert hashes(dst) == expected  # ...the remote restores them byte for byte
    assert dvc(dst, "status", **env).stdout.strip() == UP_TO_DATE
    out = dvc(dst, "repro", **OFF, **env).stdout
    assert "Running stage" not in out and "didn't change" in out


@pytest.mark.slow
def test_local_directory_remote_push_then_fresh_clone_pull(tmp_path):
    root = built_project(tmp_path)
    dvc(root, "remote", "add", "-d", "storage", str(tmp_path / "remote"))
    commit_all(root, "baseline + local remote")
    expected = hashes(root)
    assert dvc(root, "push").stdout.strip().endswith("pushed")
    assert any((tmp_path / "remote" / "files" / "md5").rglob("*"))
    assert "Everything is up to date." in dvc(root, "push").stdout  # second push: nothing to send
    fresh_clone_and_pull(root, tmp_path / "clone", expected)


@pytest.fixture
def s3_server(tmp_path):
    """moto's standalone S3 server on 127.0.0.1 (a free port, bounded start), killed at the end."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with serve(cmd, url + "/moto-api/", tmp_path / "moto.log", timeout=90):
        yield url


@pytest.mark.slow
def test_s3_remote_on_a_real_s3_server(tmp_path, s3_server, monkeypatch):
    import boto3

    key_id, secret = "AKIATESTFLUXIMP", "fluximp-secret-never-committed"
    creds = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id=key_id, aws_secret_access_key=secret,
                      region_name="us-east-1")
    s3.create_bucket(Bucket="fluximp-dvc")

    root = built_project(tmp_path)
    dvc(root, "remote", "add", "-d", "shared", "s3://fluximp-dvc/store")
    dvc(root, "remote", "modify", "shared", "endpointurl", s3_server)
    # credentials only in .dvc/config.local (git-ignored by DVC) or the environment
    dvc(root, "remote", "modify", "--local", "shared", "access_key_id", key_id)
    dvc(root, "remote", "modify", "--local", "shared", "secret_access_key", secret)
    commit_all(root, "baseline + s3 remote")
    assert secret not in sh(root, "git", "show", "HEAD:.dvc/config").stdout
    assert "config.local" not in sh(root, "git", "ls-files", ".dvc").stdout
    sh(root, "git", "check-ignore", "-q", ".dvc/config.local")

    expected = hashes(root)
    pushed = dvc(root, "push").stdout
    assert "pushed" in pushed, pushed
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="fluximp-dvc", Prefix="store/")["Contents"]]
    assert len(keys) >= len(expected)  # every file, plus the .dir manifests of the folders

    fresh_clone_and_pull(root, tmp_path / "clone", expected, **creds)  # the clone gets keys from the env


@pytest.mark.slow
def test_exp_push_and_pull_with_outputs_through_a_bare_git_remote(tmp_path):
    root = built_project(tmp_path)
    dvc(root, "remote", "add", "-d", "storage", str(tmp_path / "remote"))
    commit_all(root, "baseline")
    dvc(root, "push")
    sh(tmp_path, "git", "init", "-q", "--bare", "-b", "main", "origin.git")
    sh(root, "git", "remote", "add", "origin", str(tmp_path / "origin.git"))
    sh(root, "git", "push", "-q", "origin", "main")

    dvc(root, "exp", "run", "-n", "r16", "-S", "lora.rank=16", **OFF)
    exp_hashes = hashes(root)
    out = dvc(root, "exp", "push", "origin", "r16").stdout
    assert "Pushed experiment r16" in out, out
    assert "r16" in dvc(root, "exp", "list", "origin").stdout

    clone = tmp_path / "teammate"
    sh(tmp_path, "git", "clone", "-q", str(tmp_path / "origin.git"), clone.name)
    dvc(clone, "exp", "pull", "origin", "r16")
    assert "r16" in dvc(clone, "exp", "list").stdout
    dvc(clone, "exp", "apply", "r16")  # outputs come from the cache that `exp pull` fetched
    assert hashes(clone) == exp_hashes
    assert (clone / "models" / "lora" / "weights.txt").read_text().startswith("rank=16")
    assert dvc(clone, "status").stdout.strip() == UP_TO_DATE
