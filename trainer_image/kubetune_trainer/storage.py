"""S3 access: custom endpoints, path-style addressing, credentials from the environment, and S3 errors
turned into the contract's reasons. Everything the trainer reads is recorded (ETag + sha256)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_trainer.contract import S3Config, TrainerReason
from kubetune_trainer.errors import TrainerError

_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "403",
        "AllAccessDisabled",
        "ExpiredToken",
    }
)
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "404", "NotFound"})


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str  # "" for a whole bucket; a prefix ends with "/"

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        if not uri.startswith("s3://"):
            raise ValueError(f"{uri!r} is not an s3:// URI")
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"{uri!r} has no bucket")
        return cls(bucket, key)

    def join(self, name: str) -> S3Uri:
        base = self.key if not self.key or self.key.endswith("/") else self.key + "/"
        return S3Uri(self.bucket, base + name)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class ObjectInfo:
    uri: S3Uri
    size: int
    etag: str


@dataclass(frozen=True)
class FetchedObject:
    """Bytes read from S3 with what proves which bytes they were."""

    uri: S3Uri
    data: bytes
    etag: str
    sha256: str

    def provenance(self) -> dict[str, Any]:
        return {"uri": str(self.uri), "etag": self.etag, "sha256": self.sha256, "bytes": len(self.data)}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_client(s3: S3Config) -> Any:
    """A boto3 S3 client; credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and an optional
    AWS_SESSION_TOKEN), which the pod receives from the job's Secret."""
    import boto3
    from botocore.config import Config

    config = Config(
        s3={"addressing_style": "path" if s3.force_path_style else "auto"},
        retries={"max_attempts": 5, "mode": "standard"},
        connect_timeout=10,
        read_timeout=120,
    )
    # A fresh session reads the environment now (the default session caches the first credentials it saw).
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=s3.endpoint or None, region_name=s3.region, config=config)


class Storage:
    """The trainer's only door to S3. Errors become ``TrainerError`` with a reason and the URI."""

    def __init__(self, client: Any) -> None:
        self.client = client

    # -- errors ---------------------------------------------------------------------------------------------
    def _error(
        self, err: Exception, action: str, uri: S3Uri | str, not_found: str | None = None
    ) -> TrainerError:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(err, ClientError):
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = str(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _DENIED_CODES or status == "403":
                return TrainerError(
                    TrainerReason.ACCESS_DENIED,
                    f"S3 refused to {action} {uri} ({code or status}); check the credentials in the job's "
                    "s3.credentialsSecretRef and the bucket policy",
                )
            if code in _MISSING_CODES or status == "404":
                return TrainerError(
                    not_found or TrainerReason.STORAGE_ERROR, f"{uri} does not exist ({code or status})"
                )
            return TrainerError(TrainerReason.STORAGE_ERROR, f"S3 failed to {action} {uri}: {code} {err}")
        if isinstance(err, BotoCoreError):
            return TrainerError(
                TrainerReason.STORAGE_ERROR,
                f"S3 failed to {action} {uri}: {err}; check s3.endpoint and that the store is reachable",
            )
        raise err

    def _call(
        self, action: str, uri: S3Uri | str, fn: Any, *args: Any, not_found: str | None = None, **kwargs: Any
    ) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (ClientError, BotoCoreError) as err:
            raise self._error(err, action, uri, not_found) from err

    # -- reads ----------------------------------------------------------------------------------------------
    def list(self, prefix: S3Uri, not_found: str | None = None) -> list[ObjectInfo]:
        """Every object under ``prefix`` (recursively), sorted by key."""
        found: list[ObjectInfo] = []
        paginator = self.client.get_paginator("list_objects_v2")
        pages: Iterator[dict[str, Any]] = self._call(
            "list",
            prefix,
            lambda: list(paginator.paginate(Bucket=prefix.bucket, Prefix=prefix.key)),
            not_found=not_found,
        )
        for page in pages:
            for item in page.get("Contents", []):
                found.append(ObjectInfo(S3Uri(prefix.bucket, item["Key"]), item["Size"], _etag(item["ETag"])))
        return sorted(found, key=lambda o: o.uri.key)

    def exists(self, uri: S3Uri, not_found: str | None = None) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=uri.bucket, Key=uri.key)
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in _MISSING_CODES:
                return None
            raise self._error(err, "read", uri, not_found) from err
        except Exception as err:
            raise self._error(err, "read", uri, not_found) from err
        return ObjectInfo(uri, int(head["ContentLength"]), _etag(head["ETag"]))

    def read(self, uri: S3Uri, not_found: str | None = None) -> FetchedObject:
        response = self._call(
            "read", uri, self.client.get_object, Bucket=uri.bucket, Key=uri.key, not_found=not_found
        )
        data = self._call("read", uri, response["Body"].read)
        return FetchedObject(uri, data, _etag(response["ETag"]), hashlib.sha256(data).hexdigest())

    def download(self, uri: S3Uri, dest: Path, not_found: str | None = None) -> FetchedObject:
        """Stream one object to ``dest`` (for model weights, which may not fit in memory twice)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        response = self._call(
            "read", uri, self.client.get_object, Bucket=uri.bucket, Key=uri.key, not_found=not_found
        )
        digest = hashlib.sha256()
        with dest.open("wb") as f:
            for chunk in self._call("read", uri, response["Body"].iter_chunks, 1 << 20):
                digest.update(chunk)
                f.write(chunk)
        return FetchedObject(uri, b"", _etag(response["ETag"]), digest.hexdigest())

    # -- writes ---------------------------------------------------------------------------------------------
    def upload_file(self, path: Path, uri: S3Uri) -> None:
        # upload_file switches to multipart above its threshold, so multi-GB weights stream.
        self._call(
            "write",
            uri,
            self.client.upload_file,
            str(path),
            uri.bucket,
            uri.key,
            not_found=TrainerReason.UPLOAD_FAILED,
        )

    def write(self, uri: S3Uri, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._call(
            "write",
            uri,
            self.client.put_object,
            Bucket=uri.bucket,
            Key=uri.key,
            Body=data,
            ContentType=content_type,
            not_found=TrainerReason.UPLOAD_FAILED,
        )

    def delete_prefix(self, prefix: S3Uri) -> None:
        keys = [o.uri.key for o in self.list(prefix)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self._call(
                "delete",
                prefix,
                self.client.delete_objects,
                Bucket=prefix.bucket,
                Delete={"Objects": batch, "Quiet": True},
            )


def _etag(raw: str) -> str:
    return raw.strip('"')
