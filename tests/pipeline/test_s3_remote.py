"""Sharing artefacts through a real S3 remote: dvc-s3 pushes the first stages' outputs to an
S3-compatible server (moto) on 127.0.0.1, a second clone pulls them, and nothing reruns. The
remote commands are the README's S3 instructions, word for word."""

import logging
from pathlib import Path

import pytest
import yaml
from dvc_helpers import copy_sources, dvc_env, ran_stages, run

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dvc")]

# The copy keeps only prepare and train, so a whole-repo push, pull and repro stay cheap (TF trains a
# tiny net once) and still move a directory out and a file out through the bucket.
STAGES = ("prepare", "train")
TINY_TRAIN = {"hidden_units": [8, 8], "epochs": 5}
BUCKET = "serving-optimiser-test"

# The README's S3 section, run verbatim with the server's address and keys for the capitals.
README_REMOTE_COMMANDS = [
    ["dvc", "remote", "add", "-d", "store", f"s3://{BUCKET}/serving-optimiser"],
    ["dvc", "remote", "modify", "store", "endpointurl", "ENDPOINT"],
]
# The README's other way to give credentials: in .dvc/config.local, which git ignores.
README_LOCAL_CREDENTIALS = [
    ["dvc", "remote", "modify", "--local", "store", "access_key_id", "KEY_ID"],
    ["dvc", "remote", "modify", "--local", "store", "secret_access_key", "SECRET"],
]
KEY_ID, SECRET = "test-key-id", "test-secret"  # throwaway: only the local server accepts them


@pytest.fixture
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    requests_log = logging.getLogger("werkzeug")
    level = requests_log.level
    requests_log.setLevel(logging.WARNING)  # one line per S3 request would bury a failure's output
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: any free port
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        requests_log.setLevel(level)


def _env(home: Path) -> dict:
    return dvc_env(
        # No ~/.aws file is read, so a developer's own profile can neither leak into nor break the test.
        AWS_ACCESS_KEY_ID=KEY_ID,
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=str(home / "aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(home / "aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )


def _copy_repo(target: Path) -> None:
    """The sources, tiny training params, and a dvc.yaml cut down to STAGES."""
    copy_sources(target)
    pipeline = yaml.safe_load((target / "dvc.yaml").read_text())
    pipeline = {"stages": {name: pipeline["stages"][name] for name in STAGES}}
    (target / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    params = yaml.safe_load((target / "params.yaml").read_text())
    params["train"].update(TINY_TRAIN)
    (target / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _files(root: Path, outs: list[str]) -> dict[str, bytes]:
    found = {}
    for out in outs:
        path = root / out
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            found[str(file.relative_to(root))] = file.read_bytes()
    return found


def _filled(command: list[str], endpoint: str) -> list[str]:
    return [{"ENDPOINT": endpoint, "KEY_ID": KEY_ID, "SECRET": SECRET}.get(word, word) for word in command]


def test_push_to_s3_then_pull_into_a_second_clone(tmp_path, s3_endpoint):
    import boto3

    env = _env(tmp_path)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                      aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET)
    s3.create_bucket(Bucket=BUCKET)  # a real bucket exists before anyone configures DVC for it

    repo = tmp_path / "repo"
    _copy_repo(repo)
    run(repo, env, "git", "init", "-q", "-b", "main")
    run(repo, env, "git", "add", "-A")
    run(repo, env, "git", "commit", "-qm", "tiny params")
    assert ran_stages(run(repo, env, "dvc", "repro")) == set(STAGES)

    for command in README_REMOTE_COMMANDS:
        run(repo, env, *_filled(command, s3_endpoint))
    run(repo, env, "git", "add", "-A")
    run(repo, env, "git", "commit", "-qm", "lock and S3 remote")
    assert "s3://" in (repo / ".dvc" / "config").read_text()
    run(repo, env, "dvc", "push")  # credentials from the environment
    pushed = s3.list_objects_v2(Bucket=BUCKET, Prefix="serving-optimiser/").get("KeyCount", 0)
    assert pushed >= 3, f"only {pushed} objects reached the bucket"

    assert not (tmp_path / "serving-optimiser-dvc-remote").exists()  # the default local remote was not used

    clone = tmp_path / "clone"
    run(tmp_path, env, "git", "clone", "-q", str(repo), str(clone))
    # The fresh clone has no cache and its default remote is the bucket: stale until pulled.
    run(clone, env, "dvc", "status", "-q", expect=1)
    # The clone pulls with credentials in .dvc/config.local and none in the environment.
    clone_env = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    assert "Unable to locate credentials" in run(clone, clone_env, "dvc", "pull", expect=1)
    for command in README_LOCAL_CREDENTIALS:
        run(clone, clone_env, *_filled(command, s3_endpoint))
    assert run(clone, clone_env, "git", "status", "--porcelain") == ""  # the keys stay out of git
    run(clone, clone_env, "dvc", "pull")

    outs = ["data/prepared", "models/weights.npz"]
    assert _files(clone, outs) == _files(repo, outs) != {}
    run(clone, clone_env, "dvc", "status", "-q")  # exit 0: clean (plain `dvc status` exits 0 either way)
    assert ran_stages(run(clone, clone_env, "dvc", "repro")) == set()
