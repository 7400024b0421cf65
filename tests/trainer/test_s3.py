"""The local S3 server the tests (and the e2e suite and demo) use, and the trainer's S3 error mapping."""

from __future__ import annotations

import hashlib
import os

import botocore.exceptions
import pytest
from boto3.s3.transfer import TransferConfig
from e2e.cluster.s3 import S3Server

from kubetune_trainer.contract import S3Config, TrainerReason
from kubetune_trainer.errors import TrainerError
from kubetune_trainer.storage import S3Uri, Storage, make_client


def test_the_server_does_what_the_trainer_needs(s3: S3Server, tmp_path) -> None:
    client = s3.client()
    client.create_bucket(Bucket="caps")
    put = client.put_object(Bucket="caps", Key="a/one.jsonl", Body=b"hello")
    assert put["ETag"].strip('"') == hashlib.md5(b"hello").hexdigest()
    client.put_object(Bucket="caps", Key="a/b/two.json", Body=b"x")
    client.put_object(Bucket="caps", Key="other.txt", Body=b"x")
    listed = client.list_objects_v2(Bucket="caps", Prefix="a/")
    assert [o["Key"] for o in listed["Contents"]] == ["a/b/two.json", "a/one.jsonl"]
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * 1024 * 1024))
    client.upload_file(
        str(big),
        "caps",
        "big.bin",
        Config=TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20),
    )
    head = client.head_object(Bucket="caps", Key="big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload of three parts
    assert client.get_object(Bucket="caps", Key="big.bin")["Body"].read() == big.read_bytes()
    with pytest.raises(botocore.exceptions.ClientError) as denied:
        s3.client(secret_key="wrong").get_object(Bucket="caps", Key="a/one.jsonl")
    assert denied.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_stop_ends_the_process_and_removes_its_data() -> None:
    server = S3Server().start()
    process, root = server.process, server.root
    assert process is not None and root.exists()
    server.stop()
    assert process.poll() is not None
    assert not root.exists()


def storage_for(s3: S3Server, monkeypatch, secret: str | None = None) -> Storage:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret or s3.secret_key)
    return Storage(make_client(S3Config(endpoint=s3.endpoint, region=s3.region, force_path_style=True)))


def test_storage_reads_with_provenance_and_maps_errors(s3: S3Server, monkeypatch) -> None:
    s3.client().create_bucket(Bucket="mapping")
    s3.client().put_object(Bucket="mapping", Key="d/x.jsonl", Body=b'{"text": "a"}\n')
    storage = storage_for(s3, monkeypatch)
    fetched = storage.read(S3Uri.parse("s3://mapping/d/x.jsonl"))
    assert fetched.sha256 == hashlib.sha256(b'{"text": "a"}\n').hexdigest()
    assert fetched.etag == hashlib.md5(b'{"text": "a"}\n').hexdigest()
    with pytest.raises(TrainerError) as missing:
        storage.read(S3Uri.parse("s3://mapping/d/none.jsonl"), not_found=TrainerReason.DATASET_NOT_FOUND)
    assert missing.value.reason == TrainerReason.DATASET_NOT_FOUND
    with pytest.raises(TrainerError) as no_bucket:
        storage.list(S3Uri.parse("s3://no-such-bucket/x/"), not_found=TrainerReason.MODEL_NOT_FOUND)
    assert no_bucket.value.reason == TrainerReason.MODEL_NOT_FOUND
    with pytest.raises(TrainerError) as denied:
        storage_for(s3, monkeypatch, secret="wrong").read(S3Uri.parse("s3://mapping/d/x.jsonl"))
    assert denied.value.reason == TrainerReason.ACCESS_DENIED and denied.value.permanent


def test_an_unreachable_endpoint_is_a_retryable_storage_error(monkeypatch) -> None:
    from e2e.cluster.procs import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    client = make_client(S3Config(endpoint=f"http://127.0.0.1:{free_port()}", force_path_style=True))
    client.meta.config.retries = {"max_attempts": 1}
    with pytest.raises(TrainerError) as err:
        Storage(client).list(S3Uri.parse("s3://b/p/"))
    assert err.value.reason == TrainerReason.STORAGE_ERROR and not err.value.permanent
