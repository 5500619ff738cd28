"""``make gpu-bundle``: what the GPU smoke check carries to a machine without network (issue 13, part 7).

Downloads the bundle from the package index (as CI's own installs do), then checks that it holds one
wheel per package and Debian's redis-server, that it fits one device call with the project's tracked
files, and that the two pruned wheels still serve S3 as moto's endpoint: a bucket, an upload and a
download through the minio SDK, with the pruned botocore and moto ahead of the full ones on the path.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

from bench.gpu_bundle import DEBS, LIMIT, PACKAGES, tracked_bytes

ROOT = Path(__file__).resolve().parent.parent

S3_ROUND_TRIP = textwrap.dedent("""
    import io, sys
    sys.path.insert(0, sys.argv[1])
    import botocore, moto
    assert all(m.__file__.startswith(sys.argv[1]) for m in (botocore, moto)), (botocore.__file__, moto.__file__)
    from minio import Minio
    from renderfarm.localstack import S3Server
    server = S3Server()
    client = Minio(server.endpoint, access_key="k", secret_key="s", secure=False)
    client.make_bucket("smoke")
    client.put_object("smoke", "renders/a.mp4", io.BytesIO(b"video"), 5, metadata={"sha256": "x"})
    stat = client.stat_object("smoke", "renders/a.mp4")
    response = client.get_object("smoke", "renders/a.mp4")
    print(response.read().decode(), stat.metadata.get("x-amz-meta-sha256"))
    response.close(); response.release_conn()
    server.stop()
""")


def test_the_bundle_holds_each_package_once_fits_a_device_call_and_its_pruned_s3_endpoint_serves(tmp_path):
    dest = tmp_path / "bundle"
    done = subprocess.run([sys.executable, "-m", "bench.gpu_bundle", "--dest", str(dest)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "of 64 MiB" in done.stdout

    wheels = sorted((dest / "wheels").glob("*.whl"))
    assert len(wheels) == len(PACKAGES)  # --no-deps: exactly the named ones, one version each
    assert all(("cp312" in w.name or "abi3" in w.name or "py3-none" in w.name) for w in wheels)
    assert sorted(d.name.split("_")[0] for d in (dest / "debs").glob("*.deb")) == sorted(DEBS)
    bundle = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    assert bundle + tracked_bytes() < LIMIT

    [botocore] = [w for w in wheels if w.name.startswith("botocore-")]
    with zipfile.ZipFile(botocore) as wheel:
        names = set(wheel.namelist())
        record = wheel.read(next(n for n in names if n.endswith(".dist-info/RECORD"))).decode()
    assert "botocore/data/s3/2006-03-01/service-2.json.gz" in names and "botocore/data/endpoints.json" in names
    assert not any(n.startswith("botocore/data/ec2/") for n in names) and "botocore/data/ec2/" not in record
    assert botocore.stat().st_size < 3_000_000  # from about 17 MB

    site = tmp_path / "site"
    pruned = [str(w) for w in wheels if w.name.startswith(("botocore-", "moto-"))]
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target",
                    str(site), *pruned], check=True, capture_output=True)  # fmt: skip
    served = subprocess.run([sys.executable, "-c", S3_ROUND_TRIP, str(site)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert served.returncode == 0, served.stderr[-3000:]
    assert served.stdout.split() == ["video", "x"]
