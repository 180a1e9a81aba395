"""Data on object storage: the pipeline reads s3:// URIs through pyarrow, tested against moto's S3 server."""
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import free_port
from tests.test_sources import zip_folder


@pytest.fixture(scope="module")
def s3_server():
    """moto's standalone S3 server on loopback, started and stopped here."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield endpoint
    process.terminate()
    process.wait(10)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_zip_and_folder_on_s3(s3_server, synthetic_folder, tmp_path, ray_session):
    import boto3

    from pipeline.data.datasets import training_dataset, training_refs
    from pipeline.io.sources import list_images

    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="nuclei")
    archive = zip_folder(synthetic_folder, str(tmp_path / "train.zip"))
    client.upload_file(archive, "nuclei", "stage1_train.zip")
    for directory, _, files in os.walk(synthetic_folder):
        for name in files:
            full = os.path.join(directory, name)
            client.upload_file(full, "nuclei", "images/" + os.path.relpath(full, synthetic_folder))
    query = f"?endpoint_override={s3_server}&scheme=http"
    # Credentials travel to Ray's workers from the driver's environment when Ray starts: restart it now
    # that the test's AWS_* variables are set (the rest of the session keeps using this instance).
    from pipeline.data.datasets import ensure_ray

    ray_session.shutdown()
    ensure_ray(num_cpus=2)

    refs = training_refs("s3://nuclei/stage1_train.zip" + query, 0, 0)
    assert len(refs) == 12
    batch = training_dataset(refs, 64, 10**8, 2).take_batch(12)  # decoded inside Ray tasks, from S3
    assert batch["image"].shape == (12, 64, 64, 3) and batch["mask"].max() == 1

    listing = list_images("s3://nuclei/images" + query)
    assert sorted(r.image_id for r in listing.refs) == sorted(r.image_id for r in refs)
