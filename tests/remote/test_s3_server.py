"""The moto S3 server fixture itself: reachable through storage_options, conditional puts honoured."""

from __future__ import annotations

import pytest


def test_server_answers_through_storage_options_and_refuses_a_second_create(s3_server) -> None:
    import s3fs

    bucket = s3_server.bucket()
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options)
    fs.pipe_file(f"{bucket}/x", b"first", mode="create")
    with pytest.raises(FileExistsError):  # S3 If-None-Match: * -> 412 PreconditionFailed
        fs.pipe_file(f"{bucket}/x", b"second", mode="create")
    assert fs.cat_file(f"{bucket}/x") == b"first"
